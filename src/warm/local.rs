//! The pull layer in this process as a [`Source`]: what a client's requests would do, without
//! HTTP. Used by the server's `[warm]` schedule, and by `pullthrough warm` without `--mirror`,
//! which builds its own [`Mirror`] on the storage directory (refused while a running mirror
//! holds it: see `Store::open`).

use std::sync::Arc;

use super::{Blob, Budget, Manifest, Source, SourceError};
use crate::clock::Clock;
use crate::config::Config;
use crate::image::ImageRef;
use crate::metrics::Metrics;
use crate::mirror::{BlobAnswer, Housekeeping, Mirror};
use crate::oci::{media, Accept, Reference};
use crate::outcome::CacheStatus;
use crate::store::handle::Progress;

pub struct Local {
    mirror: Arc<Mirror>,
}

impl Local {
    pub fn new(mirror: Arc<Mirror>) -> Local {
        Local { mirror }
    }

    /// A pull layer of its own on the configured storage directory, as `serve` builds it.
    /// Blocking.
    pub fn open(mut config: Config) -> anyhow::Result<Local> {
        // The walk fetches every blob itself; a prefetch alongside would only make its report
        // call "cached" what the prefetch it triggered fetched first.
        config.cache.prefetch_concurrency = 0;
        let mirror = Mirror::new(
            config,
            Arc::new(Metrics::new()),
            Clock::system(),
            crate::mirror::Services::default(),
        )?;
        Ok(Local::new(Arc::new(mirror)))
    }

    /// Saves the cache index, so the next start keeps the access order.
    pub async fn close(&self) {
        Housekeeping::of(&self.mirror).save_index().await;
    }
}

impl Source for Local {
    async fn budget(&self, registry: &str) -> Result<Option<Budget>, SourceError> {
        Ok(self.mirror.budget(registry)?.map(|b| Budget {
            remaining: b.remaining,
            reserve: b.reserve,
        }))
    }

    async fn manifest(
        &self,
        image: &ImageRef,
        reference: &Reference,
    ) -> Result<Manifest, SourceError> {
        let target = self.mirror.target(Some(image.registry()), image.repo())?;
        let accept = Accept::parse([media::ACCEPT_ALL]);
        let answer = self
            .mirror
            .manifest(&target, reference, false, &accept)
            .await?;
        Ok(Manifest {
            cached: matches!(
                answer.status,
                CacheStatus::Hit | CacheStatus::Revalidated | CacheStatus::Stale
            ),
            media_type: answer.media_type,
            digest: answer.digest,
            bytes: answer.body.unwrap_or_default(),
        })
    }

    async fn blob(
        &self,
        image: &ImageRef,
        blob: &Blob,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<bool, SourceError> {
        let target = self.mirror.target(Some(image.registry()), image.repo())?;
        let answer = self.mirror.blob(&target, &blob.digest, false).await?;
        let handle = match answer {
            BlobAnswer::Hit(handle) => {
                progress(handle.size());
                return Ok(true);
            }
            BlobAnswer::Fetching { handle, .. } => handle,
            BlobAnswer::Relayed { .. } => {
                return Err("the cache has no room for it: not kept".into())
            }
            BlobAnswer::Size { .. } => return Err("answered with its size only".into()),
            // In the shared tier, which every replica reads.
            BlobAnswer::Redirect { .. } => return Ok(true),
        };
        // The download runs in its own task; follow its progress to the verdict.
        let size = handle.size();
        let Some(mut rx) = handle.into_parts().1 else {
            progress(size);
            return Ok(false);
        };
        let mut reported = 0;
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                Progress::Writing { written, .. } => {
                    progress(written.saturating_sub(reported));
                    reported = reported.max(written);
                }
                Progress::Complete => {
                    progress(size.saturating_sub(reported));
                    return Ok(false);
                }
                Progress::Failed(why) => return Err(why.into()),
            }
            if rx.changed().await.is_err() {
                return match &*rx.borrow() {
                    Progress::Complete => Ok(false),
                    _ => Err("the download ended without a verdict".into()),
                };
            }
        }
    }
}
