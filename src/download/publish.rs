//! Publication of a verified blob to the shared tier: the lease holder's tee'd upload is
//! completed only if its lease is still held; a download taken over midway uploads the
//! committed file instead.

use super::feed::Sources;
use super::{Job, WRITE_BATCH};
use crate::store::tier;
use crate::store::tiers::Upload;

impl Job {
    /// lease is still ours; a download taken over midway uploads the committed file instead,
    /// still under its lease.
    pub(super) async fn publish(&self, upload: Option<Upload>, sources: Sources, size: u64) {
        if !self.tiers.has_shared() {
            return;
        }
        let fenced = match &sources.lease {
            Some(lease) => lease.confirm().await,
            None => true,
        };
        if !fenced {
            tracing::warn!(digest = %self.digest, "lease lost before publication; not published to the shared tier");
            return;
        }
        if let Some(upload) = upload {
            upload.complete(size).await;
            return;
        }
        if sources.lease.is_none() {
            return;
        }
        let handle = match self.tiers.local.blobs.open(&self.digest).await {
            Ok(Some(h)) => h,
            _ => return,
        };
        let Some(mut upload) = self.tiers.upload(&self.digest) else {
            return;
        };
        let digest = self.digest.clone();
        let lease = sources.lease;
        tokio::spawn(async move {
            let (reader, _) = handle.clone().into_parts();
            let mut offset = 0u64;
            while offset < handle.size() {
                let len = (handle.size() - offset).min(WRITE_BATCH as u64) as usize;
                match reader.read_at(offset, len).await {
                    Ok(chunk) => {
                        offset += chunk.len() as u64;
                        upload.write(chunk).await;
                    }
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "cannot read the blob back for the shared tier");
                        return;
                    }
                }
            }
            let still_ours = match &lease {
                Some(l) => l.confirm().await,
                None => true,
            };
            if still_ours {
                upload.complete(size).await;
            }
            drop(lease);
        });
    }

    /// A blob read from the shared tier did not verify: it must not be served again.
    pub(super) fn forget_shared(&self) {
        self.tiers.forget_damaged(tier::Kind::Blob, &self.digest);
    }
}
