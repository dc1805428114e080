//! `GET referrers/<subject>` (OCI 1.1): the descriptors of the manifests that refer to one.

use http::{header, HeaderMap, HeaderValue, Method};

use super::send::Call;
use super::{Error, Upstream, MAX_MANIFEST_BYTES};
use crate::identity::Caller;
use crate::oci::{Digest, RepoName};

/// The descriptors of an upstream's referrers answer (`GET /v2/<name>/referrers/<digest>`):
/// the `manifests` of the image index it sent, unfiltered.
#[derive(Debug, Clone, Default)]
pub struct ReferrersIndex {
    pub manifests: Vec<serde_json::Value>,
}

impl Upstream {
    /// `GET referrers/<subject>` (OCI 1.1), unfiltered: the mirror caches one list per subject
    /// and filters it itself. Not a manifest GET, so not a counted pull. A `404` means the
    /// upstream has no referrers API (one that has it answers `200` for any subject).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        caller: &Caller,
        subject: &Digest,
    ) -> Result<ReferrersIndex, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(crate::oci::media::OCI_INDEX),
        );
        let sent = self
            .send(Call {
                kind: "referrers",
                method: Method::GET,
                repo,
                caller,
                tail: &format!("referrers/{subject}"),
                query: None,
                headers,
                by: None,
            })
            .await?;
        let body = self.read_limited(sent.resp, MAX_MANIFEST_BYTES).await?;
        let protocol = |detail: &str| Error::Protocol {
            upstream: self.name.clone(),
            detail: detail.to_owned(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| protocol("referrers answer is not JSON"))?;
        let manifests = match v.get("manifests") {
            Some(serde_json::Value::Array(a)) => a.clone(),
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(_) => return Err(protocol("referrers answer has no manifests list")),
        };
        Ok(ReferrersIndex { manifests })
    }
}
