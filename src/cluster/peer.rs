//! The client side of the peer endpoint: a replica streams a blob that another replica is
//! downloading from that replica (`GET <advertise>/_pullthrough/peer/blobs/<digest>`, with a
//! `Range` to resume), authenticated by the cluster secret. The server side is a route like
//! any other (see `routes` and `handlers::blobs::peer`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use http::header;
use tracing::Instrument;

use crate::config::Secret;
use crate::oci::Digest;
use crate::peer_api::{BLOBS_PATH, SECRET_HEADER};

/// Why a peer could not serve a blob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer has no such blob (its download ended without keeping it).
    #[error("the peer does not have the blob")]
    NotFound,
    #[error("the peer answered {0}")]
    Status(u16),
    #[error("cannot reach the peer: {0}")]
    Unreachable(#[source] Arc<reqwest::Error>),
    /// The peer stayed silent for as long as the caller allows (`what` it waited for).
    #[error("the peer sent no {what} within {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    #[error("the peer's answer is unusable: {0}")]
    Protocol(&'static str),
}

impl PeerError {
    fn of(e: reqwest::Error) -> PeerError {
        PeerError::Unreachable(Arc::new(e.without_url()))
    }
}

/// How long a peer may keep a follower waiting.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// For the response headers: a peer follows its upstream, so this is the upstream's
    /// `first_byte_timeout`.
    pub first_byte: Duration,
    /// Between two chunks of the body: the upstream's `idle_timeout`.
    pub idle: Duration,
}

/// A blob streaming from a peer, from the offset asked for.
pub struct PeerBlob {
    /// The whole blob's length.
    pub size: u64,
    pub chunks: BoxStream<'static, Result<Bytes, PeerError>>,
}

pub struct Peers {
    client: reqwest::Client,
    secret: Secret,
}

impl Peers {
    pub fn new(secret: Secret) -> Peers {
        // Each request has its deadlines from the caller ([`Patience`]).
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Peers { client, secret }
    }

    /// The blob `digest` from `offset` on, as the replica at `peer` serves it, waiting for it
    /// no longer than `patience` allows.
    pub async fn blob(
        &self,
        peer: &str,
        digest: &Digest,
        offset: u64,
        patience: Patience,
    ) -> Result<PeerBlob, PeerError> {
        let url = format!("{}{BLOBS_PATH}{digest}", peer.trim_end_matches('/'));
        let mut request = self
            .client
            .get(&url)
            .header(SECRET_HEADER, self.secret.expose());
        if offset > 0 {
            request = request.header(header::RANGE, format!("bytes={offset}-"));
        }
        let span = crate::trace::span!(
            "peer.read",
            otel.kind = "client",
            peer,
            %digest,
            offset,
            http.response.status_code = tracing::field::Empty,
        );
        let resp = tokio::time::timeout(patience.first_byte, request.send())
            .instrument(span.clone())
            .await
            .map_err(|_| PeerError::Timeout {
                what: "response headers",
                limit: patience.first_byte,
            })?
            .map_err(PeerError::of)?;
        span.record("http.response.status_code", resp.status().as_u16());
        let headers = resp.headers();
        let size = match resp.status().as_u16() {
            200 if offset == 0 => headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            206 => headers
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| crate::ranges::content_range_total(v, offset)),
            404 => return Err(PeerError::NotFound),
            s => return Err(PeerError::Status(s)),
        }
        .ok_or(PeerError::Protocol("no usable length or range"))?;
        let limit = patience.idle;
        let body = resp
            .bytes_stream()
            .map(|c| c.map_err(PeerError::of))
            .boxed();
        let chunks = crate::idle::idle_timeout(body, limit, move || PeerError::Timeout {
            what: "body chunk",
            limit,
        });
        Ok(PeerBlob { size, chunks })
    }
}
