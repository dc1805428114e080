//! OpenTelemetry traces of requests, exported over OTLP/HTTP (protobuf) when `[tracing]
//! otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector.
//!
//! Spans are `tracing` spans of the target [`TARGET`], made only through [`span!`] and
//! [`request`], which make nothing while tracing is off: the cost of a request then is one
//! relaxed load per place a span would be (no span, no `traceparent` parsing). When on, the
//! OpenTelemetry layer exports those spans and the log output never sees them.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::{Layer, Registry};

use crate::config::TracingConfig;

/// The target of every span this module exports, and of nothing else.
pub const TARGET: &str = "pullthrough::otel";

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are made: a [`Tracing`] is alive.
#[inline]
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A span of the trace under the current span, or `Span::none()` without any work while
/// tracing is off. Same syntax as `tracing::info_span!` after the name.
macro_rules! span {
    ($name:literal $(, $($fields:tt)*)?) => {
        if $crate::trace::on() {
            ::tracing::info_span!(target: "pullthrough::otel", $name $(, $($fields)*)?)
        } else {
            ::tracing::Span::none()
        }
    };
}
pub(crate) use span;

/// The span of one request, continuing the caller's W3C `traceparent` when it sent one; its
/// outcome fields (`cache`, `bytes`, `http.response.status_code`) are recorded when the
/// response ends. `Span::none()` while tracing is off.
pub(crate) fn request(
    headers: &http::HeaderMap,
    method: &http::Method,
    route: &'static str,
    registry: &str,
    repository: &str,
    reference: &str,
) -> Span {
    if !on() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        route,
        registry,
        repository,
        reference,
        cache = tracing::field::Empty,
        bytes = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Only fails when the span is disabled, which `on()` rules out.
        let _ = span.set_parent(parent);
    }
    span
}

/// A span others may link to (a download, from the clients that joined it); empty while
/// tracing is off.
#[derive(Debug, Clone, Default)]
pub(crate) struct Link(Option<SpanContext>);

impl Link {
    pub(crate) fn of(span: &Span) -> Link {
        if span.is_none() {
            return Link(None);
        }
        let cx = span.context().span().span_context().clone();
        Link(cx.is_valid().then_some(cx))
    }

    /// Links `span` to this one.
    pub(crate) fn add_to(&self, span: &Span) {
        if let (Some(cx), false) = (&self.0, span.is_none()) {
            span.add_link(cx.clone());
        }
    }
}

/// Exports spans until dropped (or [`Tracing::flush`]ed); while it lives, spans are made.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Sends every finished span now; blocks the calling thread until the collector answered
    /// (so not to be called on a runtime's worker).
    pub fn flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|e| e.to_string())
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        ON.store(false, Ordering::Relaxed);
        // At exit: what could not be sent is lost either way.
        let _ = self.provider.shutdown();
    }
}

/// The layer that exports this module's spans and its [`Tracing`], or `None` when no collector
/// is named (in `config` or by `OTEL_EXPORTER_OTLP_ENDPOINT` /
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, which the exporter reads itself). Spans are made from
/// here on, until the `Tracing` is dropped.
#[allow(clippy::type_complexity)]
pub fn layer(
    config: &TracingConfig,
) -> Result<Option<(Box<dyn Layer<Registry> + Send + Sync>, Tracing)>, String> {
    let from_env = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    if config.otlp_endpoint.is_none() && !from_env {
        return Ok(None);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(Client::default());
    if let Some(base) = &config.otlp_endpoint {
        // As for `OTEL_EXPORTER_OTLP_ENDPOINT`, the base URL of an OTLP/HTTP collector.
        let base = base.as_str().trim_end_matches('/');
        exporter = exporter.with_endpoint(format!("{base}/v1/traces"));
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(Resource::builder().with_service_name("pullthrough").build())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("pullthrough"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(filter_fn(|m| m.target() == TARGET));
    ON.store(true, Ordering::Relaxed);
    Ok(Some((Box::new(layer), Tracing { provider })))
}

/// The most the exporter waits for a collector.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A collector's answer is a small status message; more is not read.
const MAX_ANSWER: u64 = 64 * 1024;

/// The exporter's HTTP client: reqwest's blocking one (rustls), made on first use. The batch
/// exporter calls it on its own thread, outside any runtime, where blocking is what it wants.
#[derive(Debug, Default)]
struct Client(OnceLock<reqwest::blocking::Client>);

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = match self.0.get() {
            Some(c) => c,
            None => {
                let made = reqwest::blocking::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()?;
                self.0.get_or_init(|| made)
            }
        };
        let (parts, body) = request.into_parts();
        let resp = client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut answer = Vec::new();
        resp.take(MAX_ANSWER).read_to_end(&mut answer)?;
        let mut out = Response::new(Bytes::from(answer));
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        Ok(out)
    }
}
