//! The client side of the peer endpoint: a replica streams a blob that another replica is
//! downloading from that replica (`GET <advertise>/_pullthrough/peer/blobs/<digest>`, with a
//! `Range` to resume), authenticated by the cluster secret. The server side is a route like
//! any other (see `routes` and `handlers::blobs::peer`).

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use http::header;

use crate::config::Secret;
use crate::oci::Digest;

/// The header that carries the cluster secret between replicas.
pub const SECRET_HEADER: &str = "pullthrough-cluster-secret";

/// Why a peer could not serve a blob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer has no such blob (its download ended without keeping it).
    #[error("the peer does not have the blob")]
    NotFound,
    #[error("the peer answered {0}")]
    Status(u16),
    #[error("cannot reach the peer: {0}")]
    Unreachable(String),
    #[error("the peer's answer is unusable: {0}")]
    Protocol(String),
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
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            // A peer follows its upstream: its first byte can take as long as the upstream's.
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Peers { client, secret }
    }

    /// The blob `digest` from `offset` on, as the replica at `peer` serves it.
    pub async fn blob(
        &self,
        peer: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<PeerBlob, PeerError> {
        let url = format!(
            "{}/_pullthrough/peer/blobs/{digest}",
            peer.trim_end_matches('/')
        );
        let mut request = self
            .client
            .get(&url)
            .header(SECRET_HEADER, self.secret.expose());
        if offset > 0 {
            request = request.header(header::RANGE, format!("bytes={offset}-"));
        }
        let resp = request
            .send()
            .await
            .map_err(|e| PeerError::Unreachable(e.without_url().to_string()))?;
        let headers = resp.headers();
        let size = match resp.status().as_u16() {
            200 if offset == 0 => headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            206 => headers
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| range_total(v, offset)),
            404 => return Err(PeerError::NotFound),
            s => return Err(PeerError::Status(s)),
        }
        .ok_or_else(|| PeerError::Protocol("no usable length or range".into()))?;
        let chunks = resp
            .bytes_stream()
            .map(|c| c.map_err(|e| PeerError::Unreachable(e.without_url().to_string())))
            .boxed();
        Ok(PeerBlob { size, chunks })
    }
}

/// The total of `bytes <offset>-<end>/<total>`, when it starts at `offset`.
fn range_total(content_range: &str, offset: u64) -> Option<u64> {
    let (range, total) = content_range.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    (start.parse::<u64>().ok()? == offset).then_some(())?;
    total.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_range_gives_the_total_only_from_the_offset_asked() {
        assert_eq!(range_total("bytes 10-99/100", 10), Some(100));
        assert_eq!(range_total("bytes 0-99/100", 10), None);
        assert_eq!(range_total("bytes 10-99/*", 10), None);
    }
}
