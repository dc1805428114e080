//! Traces: the spans of a pull, as an OTLP/HTTP collector receives them (the protobuf decoded
//! here as a collector would), continuing the client's `traceparent`.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::upstream::sha256;
use common::{wait_committed, wait_for, x_cache, FakeUpstream, TestMirror};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use pullthrough::config::TracingConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP trace receiver on a port-0 listener: every span it was sent, decoded.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let got = spans.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let got = got.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let got = got.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        for resource in export.resource_spans {
                            let service = resource.resource.as_ref().and_then(|r| {
                                r.attributes.iter().find(|a| a.key == "service.name")
                            });
                            assert_eq!(
                                service.and_then(|a| text(a.value.as_ref()?.value.as_ref()?)),
                                Some("pullthrough".to_owned())
                            );
                            for scope in resource.scope_spans {
                                got.lock().unwrap().extend(scope.spans);
                            }
                        }
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, spans)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let a = span.attributes.iter().find(|a| a.key == key)?;
    text(a.value.as_ref()?.value.as_ref()?)
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_is_traced_under_the_clients_traceparent() {
    let (collector, received) = receiver().await;
    let config = TracingConfig {
        otlp_endpoint: Some(collector.parse().unwrap()),
        sample_ratio: 1.0,
    };
    let (layer, tracing) = pullthrough::trace::layer(&config).unwrap().unwrap();
    tracing_subscriber::registry().with(layer).init();
    let tracing = Arc::new(tracing);

    // An upstream that wants a token, and holds the blob's second half back until released,
    // so that a second client joins the download in progress.
    let up = FakeUpstream::start().await;
    let size = 2 * 1024 * 1024;
    let (_, layers) = up.add_image("library/app", "v1", &[size]);
    up.behave(|b| {
        b.require_token = true;
        b.hold_blob_after = Some(size as u64 / 2);
    });
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);

    let leader = m
        .get(&path)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&leader), "MISS");
    let mut leader_body = leader.bytes_stream();
    let mut all = leader_body.next().await.unwrap().unwrap().to_vec();
    let follower = m.get(&path).send().await.unwrap();
    assert_eq!(x_cache(&follower), "COALESCED");
    up.state.release.notify_one();
    while let Some(c) = leader_body.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert_eq!(sha256(&all), layers[0]);
    assert_eq!(sha256(&follower.bytes().await.unwrap()), layers[0]);
    wait_committed(&m, &path).await;
    assert_eq!(up.tokens(), 1);

    // Flushed until the spans of both requests and the download are in (the download's span
    // ends when its task does, after the commit).
    let spans = wait_for(
        "the spans of both requests and the download",
        Duration::from_secs(30),
        || {
            let (tracing, received) = (tracing.clone(), received.clone());
            async move {
                tokio::task::spawn_blocking(move || tracing.flush())
                    .await
                    .unwrap()
                    .unwrap();
                let spans = received.lock().unwrap().clone();
                let done =
                    named(&spans, "GET blob").len() >= 2 && !named(&spans, "download").is_empty();
                done.then_some(spans)
            }
        },
    )
    .await;

    let trace_id = hex::decode(TRACE_ID).unwrap();
    // A request's span is named after its method and route.
    let requests = named(&spans, "GET blob");
    let leader = requests
        .iter()
        .find(|s| s.trace_id == trace_id)
        .expect("no request span continues the client's traceparent");
    assert_eq!(hex::encode(&leader.parent_span_id), PARENT_ID);
    assert_eq!(attr(leader, "cache").as_deref(), Some("MISS"));
    assert_eq!(attr(leader, "route").as_deref(), Some("blob"));
    assert_eq!(attr(leader, "registry").as_deref(), Some("docker.io"));
    assert_eq!(attr(leader, "repository").as_deref(), Some("library/app"));
    assert_eq!(
        attr(leader, "reference").as_deref(),
        Some(layers[0].as_str())
    );
    assert_eq!(attr(leader, "bytes"), Some(size.to_string()));
    assert_eq!(
        attr(leader, "http.response.status_code").as_deref(),
        Some("200")
    );

    // The download runs under the leader's request; the token fetch and the upstream request
    // under the download, the commit at its end.
    let download = named(&spans, "download");
    let [download] = download.as_slice() else {
        panic!("one download span expected: {download:?}")
    };
    assert_eq!(download.trace_id, trace_id);
    assert_eq!(download.parent_span_id, leader.span_id);
    let in_download = |name: &str| {
        named(&spans, name)
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect::<Vec<_>>()
    };
    let upstream = in_download("upstream.request");
    assert!(!upstream.is_empty(), "no upstream request span: {spans:?}");
    let blob_get = upstream
        .iter()
        .find(|s| attr(s, "kind").as_deref() == Some("blob_get"))
        .expect("no span for the blob's upstream GET");
    assert_eq!(blob_get.parent_span_id, download.span_id);
    assert_eq!(attr(blob_get, "url.index").as_deref(), Some("0"));
    assert_eq!(attr(blob_get, "fallback").as_deref(), Some("false"));
    assert_eq!(attr(blob_get, "challenge_retry").as_deref(), Some("true"));
    // 206 when the download asks for a range (a download in parts, or resumed).
    let status = attr(blob_get, "http.response.status_code");
    assert!(
        matches!(status.as_deref(), Some("200" | "206")),
        "{status:?}"
    );
    let token = in_download("upstream.token");
    let [token] = token.as_slice() else {
        panic!("one token fetch expected: {token:?}")
    };
    assert_eq!(token.parent_span_id, blob_get.span_id);
    let commit = in_download("store.commit");
    let [commit] = commit.as_slice() else {
        panic!("one commit expected: {commit:?}")
    };
    assert_eq!(commit.parent_span_id, download.span_id);

    // The follower's request is a trace of its own, whose wait links to the download.
    let follower = requests
        .iter()
        .find(|s| s.trace_id != trace_id)
        .expect("no span for the follower's request");
    assert_eq!(attr(follower, "cache").as_deref(), Some("COALESCED"));
    let wait = named(&spans, "download.wait");
    let [wait] = wait.as_slice() else {
        panic!("one wait expected: {wait:?}")
    };
    assert_eq!(wait.trace_id, follower.trace_id);
    assert_eq!(wait.parent_span_id, follower.span_id);
    assert!(
        wait.links
            .iter()
            .any(|l| l.trace_id == trace_id && l.span_id == download.span_id),
        "the wait does not link to the download: {:?}",
        wait.links
    );
}
