//! Pre-warming: pulls every manifest and blob of a list of images through the cache, so that
//! they are hot before clients ask. One walk (resolve the tag, pick the platforms of an index,
//! list and fetch the blobs) over a [`Source`]: the HTTP API of a running mirror
//! (`pullthrough warm --mirror`, in `admin`), or the pull layer in this process ([`Local`]:
//! `pullthrough warm` on a storage directory, and the `[warm]` schedule of a running server).
//!
//! The walk spends no counted pull it can avoid: whatever is cached is answered by the cache,
//! a tag past its TTL is revalidated with a HEAD, and before each image and each platform
//! manifest it reads the upstream's pull budget and stops at the reserve.

mod local;
pub mod schedule;

use std::future::Future;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use serde::Serialize;

pub use local::Local;

pub use crate::image::Blob;
use crate::image::{ImageRef, Listing, Platform};
use crate::oci::{Digest, Reference};

/// How many blobs of one image are fetched at once (dockerd's default).
const BLOB_CONCURRENCY: usize = 3;

/// A failure of a [`Source`], whatever its kind (HTTP, the pull layer).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A manifest as a source answered it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
    /// Answered from the cache (a hit, or a tag the upstream confirmed with a HEAD).
    pub cached: bool,
}

/// An upstream's remaining counted pulls and the reserve the walk must not eat into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub remaining: u64,
    pub reserve: u64,
}

/// Where the walk pulls from: a running mirror over HTTP, or the pull layer in process.
pub trait Source: Sync {
    /// The pull budget of `registry`'s upstream, as last reported; `None` when unknown.
    fn budget(
        &self,
        registry: &str,
    ) -> impl Future<Output = Result<Option<Budget>, SourceError>> + Send;

    /// The manifest `reference` of `image`'s repository, through the cache.
    fn manifest(
        &self,
        image: &ImageRef,
        reference: &Reference,
    ) -> impl Future<Output = Result<Manifest, SourceError>> + Send;

    /// Makes sure the blob is cached, reporting bytes as they arrive to `progress`; returns
    /// whether it already was.
    fn blob(
        &self,
        image: &ImageRef,
        blob: &Blob,
        progress: &(dyn Fn(u64) + Sync),
    ) -> impl Future<Output = Result<bool, SourceError>> + Send;
}

/// Why one image could not be warmed, or why the walk stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the pull budget of {registry} is at its reserve ({remaining} left, reserve \
         {reserve}); stopping before spending more"
    )]
    BudgetReserve {
        registry: String,
        remaining: u64,
        reserve: u64,
    },
    #[error("cannot read the pull budget of {registry}")]
    Budget {
        registry: String,
        #[source]
        source: SourceError,
    },
    #[error("cannot fetch {what}")]
    Fetch {
        what: String,
        #[source]
        source: SourceError,
    },
    #[error("manifest {digest} is not usable: {detail}")]
    InvalidManifest { digest: Digest, detail: String },
    #[error("no manifest in the index matches the platforms {platforms}")]
    NoPlatform { platforms: String },
}

/// The error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What happened to one image.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageReport {
    pub image: String,
    /// The digest the reference resolved to.
    pub digest: Option<String>,
    pub manifests: u64,
    pub manifests_cached: u64,
    pub blobs: u64,
    pub blobs_cached: u64,
    /// Bytes of the image's blobs, cached or fetched.
    pub bytes: u64,
    pub bytes_fetched: u64,
    /// Why it is not (entirely) warm; `None` when it is.
    pub error: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub images: Vec<ImageReport>,
    /// Images not tried because the walk stopped before them.
    pub skipped: Vec<String>,
    /// Why the walk stopped early (the pull budget's reserve).
    pub stopped: Option<String>,
}

impl Summary {
    /// Whether every image was warmed.
    pub fn complete(&self) -> bool {
        self.stopped.is_none() && self.images.iter().all(|i| i.error.is_none())
    }

    fn sum(&self, f: impl Fn(&ImageReport) -> u64) -> u64 {
        self.images.iter().map(f).sum()
    }

    /// `3 images (1 failed, 2 skipped), 12 blobs (9 cached, 3 fetched), 80.0 MiB (12.0 MiB fetched)`
    pub fn line(&self) -> String {
        let failed = self.images.iter().filter(|i| i.error.is_some()).count();
        let blobs = self.sum(|i| i.blobs);
        let cached = self.sum(|i| i.blobs_cached);
        let mut line = format!(
            "{} images ({failed} failed, {} skipped), {} manifests ({} cached), {blobs} blobs \
             ({cached} cached, {} fetched), {} ({} fetched)",
            self.images.len() + self.skipped.len(),
            self.skipped.len(),
            self.sum(|i| i.manifests),
            self.sum(|i| i.manifests_cached),
            blobs - cached,
            bytesize::ByteSize(self.sum(|i| i.bytes)),
            bytesize::ByteSize(self.sum(|i| i.bytes_fetched)),
        );
        if let Some(why) = &self.stopped {
            line.push_str(&format!("; stopped: {why}"));
        }
        line
    }
}

/// What the walk tells whoever shows its progress; images are numbered in list order.
pub trait Observer: Sync {
    /// The image's manifests are resolved: this many blobs of this many bytes to go.
    fn planned(&self, index: usize, image: &ImageRef, blobs: usize, bytes: u64);
    /// `bytes` more of the image's blobs are cached.
    fn progress(&self, index: usize, bytes: u64);
    fn finished(&self, index: usize, report: &ImageReport);
}

/// No progress to show (the schedule logs the summary only).
impl Observer for () {
    fn planned(&self, _: usize, _: &ImageRef, _: usize, _: u64) {}
    fn progress(&self, _: usize, _: u64) {}
    fn finished(&self, _: usize, _: &ImageReport) {}
}

/// Warms `images` one after the other (each image's blobs a few at a time), keeping of an
/// index only the manifests for `platforms` (all when empty). Stops at the pull budget's
/// reserve; a failed image does not stop the others.
pub async fn warm(
    source: &impl Source,
    images: &[ImageRef],
    platforms: &[Platform],
    observer: &dyn Observer,
) -> Summary {
    let mut summary = Summary::default();
    for (index, image) in images.iter().enumerate() {
        if summary.stopped.is_some() {
            summary.skipped.push(image.to_string());
            continue;
        }
        let mut report = ImageReport {
            image: image.to_string(),
            ..ImageReport::default()
        };
        match warm_image(source, index, image, platforms, observer, &mut report).await {
            Ok(()) => {}
            Err(e @ Error::BudgetReserve { .. }) => {
                summary.stopped = Some(e.to_string());
                report.error = Some(e.to_string());
            }
            Err(e) => report.error = Some(chain(&e)),
        }
        observer.finished(index, &report);
        summary.images.push(report);
    }
    summary
}

async fn check_budget(source: &impl Source, registry: &str) -> Result<(), Error> {
    let budget = source
        .budget(registry)
        .await
        .map_err(|source| Error::Budget {
            registry: registry.to_owned(),
            source,
        })?;
    match budget {
        Some(b) if b.remaining <= b.reserve => Err(Error::BudgetReserve {
            registry: registry.to_owned(),
            remaining: b.remaining,
            reserve: b.reserve,
        }),
        _ => Ok(()),
    }
}

async fn warm_image(
    source: &impl Source,
    index: usize,
    image: &ImageRef,
    platforms: &[Platform],
    observer: &dyn Observer,
    report: &mut ImageReport,
) -> Result<(), Error> {
    check_budget(source, image.registry()).await?;
    let top = fetch_manifest(source, image, image.reference(), report).await?;
    report.digest = Some(top.digest.to_string());
    let mut blobs = Vec::new();
    match parse(&top)? {
        Listing::Image(b) => blobs.extend(b),
        Listing::Index(children) => {
            let chosen: Vec<_> = children.iter().filter(|c| c.is_for(platforms)).collect();
            if chosen.is_empty() && !platforms.is_empty() {
                let names: Vec<String> = platforms.iter().map(Platform::to_string).collect();
                return Err(Error::NoPlatform {
                    platforms: names.join(","),
                });
            }
            for child in chosen {
                check_budget(source, image.registry()).await?;
                let reference = Reference::Digest(child.digest.clone());
                let m = fetch_manifest(source, image, &reference, report).await?;
                if m.digest != child.digest {
                    return Err(Error::InvalidManifest {
                        digest: child.digest.clone(),
                        detail: format!("answered as {}", m.digest),
                    });
                }
                match parse(&m)? {
                    Listing::Image(b) => blobs.extend(b),
                    Listing::Index(_) => {
                        return Err(Error::InvalidManifest {
                            digest: m.digest,
                            detail: "an index inside an index".into(),
                        })
                    }
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    blobs.retain(|b| seen.insert(b.digest.clone()));
    report.blobs = blobs.len() as u64;
    report.bytes = blobs.iter().map(|b| b.size).sum();
    observer.planned(index, image, blobs.len(), report.bytes);
    let progress = |n: u64| observer.progress(index, n);
    let results: Vec<(Blob, Result<bool, SourceError>)> = stream::iter(blobs)
        .map(|blob| {
            let progress = &progress;
            async move {
                let result = source.blob(image, &blob, progress).await;
                (blob, result)
            }
        })
        .buffer_unordered(BLOB_CONCURRENCY)
        .collect()
        .await;
    let mut first_error = None;
    for (blob, result) in results {
        match result {
            Ok(true) => report.blobs_cached += 1,
            Ok(false) => report.bytes_fetched += blob.size,
            Err(source) => {
                first_error.get_or_insert(Error::Fetch {
                    what: format!("blob {}", blob.digest),
                    source,
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn fetch_manifest(
    source: &impl Source,
    image: &ImageRef,
    reference: &Reference,
    report: &mut ImageReport,
) -> Result<Manifest, Error> {
    let m = source
        .manifest(image, reference)
        .await
        .map_err(|source| Error::Fetch {
            what: format!("manifest {reference}"),
            source,
        })?;
    report.manifests += 1;
    report.manifests_cached += u64::from(m.cached);
    Ok(m)
}

/// An index's entries, or an image manifest's config and layers.
fn parse(m: &Manifest) -> Result<Listing, Error> {
    Listing::parse(&m.media_type, &m.bytes).map_err(|e| Error::InvalidManifest {
        digest: m.digest.clone(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::media;

    fn manifest(json: &str, media_type: &str) -> Manifest {
        Manifest {
            media_type: media_type.into(),
            digest: Digest::sha256_of(json.as_bytes()),
            bytes: Bytes::from(json.to_owned()),
            cached: false,
        }
    }

    #[test]
    fn a_manifest_that_is_not_json_is_named_in_the_error() {
        let m = manifest("<html>", media::OCI_MANIFEST);
        let Err(e) = parse(&m) else {
            panic!("parsed");
        };
        assert!(e.to_string().contains(&m.digest.to_string()), "{e}");
    }
}
