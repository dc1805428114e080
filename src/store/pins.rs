//! Pinned content: the manifests and blobs of `[[pin]]` entries and of `pullthrough cache pin`,
//! which eviction passes over (the local index and the shared tier's evictor both read the
//! resulting [`Pinned`] set).
//!
//! A pin is resolved against what the store holds: a tag's record names its manifest, an
//! index its platforms' manifests (filtered by the pin's platforms), an image manifest its
//! config and layers. Keys of content not held yet are pinned too, so a pinned blob is
//! protected from the moment it is committed. A pin resolves again when a tag it follows is
//! written or a manifest it names but the store lacked is stored, so a first pull, or a tag
//! that moved, is followed.
//!
//! Runtime pins (those of `cache pin`) are kept in `pins` in the storage directory, one
//! image per line with its platforms, so they outlive a restart; config pins come from the
//! config each start.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::index::{Key, Pinned};
use super::tags::{TagKey, TagRecord};
use super::{fmt_bytes, manifests, write_atomic, Store};
use crate::config::PinConfig;
use crate::image::{ImageRef, Listing, Platform};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::sync::lock;

/// The runtime pins, under the storage directory.
pub const PINS_FILE: &str = "pins";

/// Why a pin, an unpin or a start with pins was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The pinned content would not fit in `storage.max_size`.
    #[error(
        "{what}: the pinned images take {}, more than storage.max_size ({}) by {}; unpin \
         some or raise storage.max_size",
        fmt_bytes(*pinned),
        fmt_bytes(*max),
        fmt_bytes(pinned - max)
    )]
    OverBound { what: String, pinned: u64, max: u64 },
    #[error("{0} is not pinned")]
    NotPinned(String),
    #[error("{0} is pinned by the config ([[pin]] or [warm] pin); change the config instead")]
    PinnedByConfig(String),
    #[error("cannot write the pins file: {0}")]
    Io(#[from] io::Error),
}

/// What is pinned, as the status page and the commands show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinSummary {
    /// The config's pins, as written (`docker.io/library/alpine:3.20 (linux/amd64)`).
    pub config: Vec<String>,
    /// The pins of `cache pin`, kept in the storage directory.
    pub runtime: Vec<String>,
    /// Pinned blobs and manifests held on the local disk, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// Bytes the pinned manifests list that are not held yet (worked out for the commands,
    /// not for the status page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_bytes: Option<u64>,
}

/// What the pins resolve to now.
#[derive(Default)]
struct Resolution {
    keys: HashSet<Key>,
    /// Manifests named (by a tag record or an index) that the store does not hold.
    wanted: HashSet<Digest>,
    /// Blob sizes as the pinned image manifests give them.
    declared: HashMap<Key, u64>,
}

pub struct Pins {
    config: Vec<PinConfig>,
    runtime: Mutex<Vec<PinConfig>>,
    wanted: Mutex<HashSet<Digest>>,
    /// One resolution at a time (on the blocking pool), so an older one never replaces a
    /// newer one.
    resolving: Mutex<()>,
}

impl Pins {
    /// The config's pins and those kept in `root`'s pins file. Blocking.
    pub(super) fn load(root: &Path, config: Vec<PinConfig>) -> Pins {
        Pins {
            config,
            runtime: Mutex::new(read_file(&root.join(PINS_FILE))),
            wanted: Mutex::new(HashSet::new()),
            resolving: Mutex::new(()),
        }
    }

    fn all(&self) -> Vec<PinConfig> {
        let mut all = self.config.clone();
        all.extend(lock(&self.runtime).iter().cloned());
        all
    }

    pub fn is_empty(&self) -> bool {
        self.config.is_empty() && lock(&self.runtime).is_empty()
    }

    /// Whether storing the manifest `digest` may change what is pinned.
    pub(super) fn wants(&self, digest: &Digest) -> bool {
        lock(&self.wanted).contains(digest)
    }

    /// Whether writing this tag's record may change what is pinned.
    pub(super) fn follows(&self, key: &TagKey) -> bool {
        let follows = |p: &PinConfig| p.follows(&key.registry, &key.repo, &key.tag);
        self.config.iter().any(follows) || lock(&self.runtime).iter().any(follows)
    }

    /// Resolves the pins against `store` and pins what they name. Blocking.
    pub(super) fn refresh(&self, store: &Store) {
        let _one = lock(&self.resolving);
        let resolution = resolve(store, &self.all());
        if let Some(max) = store.index.max() {
            let total = pinned_bytes(store, &resolution);
            if total > max {
                tracing::warn!(
                    pinned = total,
                    max,
                    "the pinned images take more than storage.max_size: only unpinned \
                     content is evicted, so the cache stays above its bound"
                );
            }
        }
        self.apply(store.index.pinned(), resolution);
    }

    /// The start's resolution, against the files `entries` the store found (its index is not
    /// loaded yet): refused when the pinned content is larger than `max`. Blocking.
    pub(super) fn start(
        &self,
        store: &Store,
        sizes: &HashMap<Key, u64>,
        max: Option<u64>,
    ) -> Result<(), PinError> {
        if self.is_empty() {
            return Ok(());
        }
        let resolution = resolve(store, &self.all());
        let total = total_bytes(&resolution, sizes);
        if let Some(max) = max.filter(|&max| total > max) {
            return Err(PinError::OverBound {
                what: "cannot start".into(),
                pinned: total,
                max,
            });
        }
        self.apply(store.index.pinned(), resolution);
        Ok(())
    }

    /// Adds runtime pins (replacing the platforms of one pinned again), unless the pinned
    /// content would then exceed the bound; writes the pins file. Blocking.
    pub(super) fn pin(&self, store: &Store, add: Vec<PinConfig>) -> Result<(), PinError> {
        let _one = lock(&self.resolving);
        let mut runtime = lock(&self.runtime).clone();
        let names: Vec<String> = add.iter().map(ToString::to_string).collect();
        for pin in add {
            runtime.retain(|p| p.image != pin.image);
            runtime.push(pin);
        }
        let mut all = self.config.clone();
        all.extend(runtime.iter().cloned());
        let resolution = resolve(store, &all);
        if let Some(max) = store.index.max() {
            let total = pinned_bytes(store, &resolution);
            if total > max {
                return Err(PinError::OverBound {
                    what: format!("cannot pin {}", names.join(", ")),
                    pinned: total,
                    max,
                });
            }
        }
        write_file(store, &runtime)?;
        *lock(&self.runtime) = runtime;
        self.apply(store.index.pinned(), resolution);
        Ok(())
    }

    /// Removes runtime pins; refused, with nothing changed, when one is not a runtime pin.
    /// Blocking.
    pub(super) fn unpin(&self, store: &Store, images: &[ImageRef]) -> Result<(), PinError> {
        let _one = lock(&self.resolving);
        let mut runtime = lock(&self.runtime).clone();
        for image in images {
            let before = runtime.len();
            runtime.retain(|p| p.image.as_ref() != Some(image));
            if runtime.len() == before {
                let by_config = self.config.iter().any(|p| p.image.as_ref() == Some(image));
                return Err(if by_config {
                    PinError::PinnedByConfig(image.to_string())
                } else {
                    PinError::NotPinned(image.to_string())
                });
            }
        }
        write_file(store, &runtime)?;
        *lock(&self.runtime) = runtime;
        let mut all = self.config.clone();
        all.extend(lock(&self.runtime).iter().cloned());
        self.apply(store.index.pinned(), resolve(store, &all));
        Ok(())
    }

    fn apply(&self, pinned: &Pinned, resolution: Resolution) {
        pinned.replace(resolution.keys);
        *lock(&self.wanted) = resolution.wanted;
    }

    /// What is pinned now and how much of it is held. Blocking only in that it takes the
    /// index's lock.
    pub(super) fn summary(&self, store: &Store) -> PinSummary {
        let held = store.index.pinned_stats();
        PinSummary {
            config: self.config.iter().map(ToString::to_string).collect(),
            runtime: lock(&self.runtime)
                .iter()
                .map(ToString::to_string)
                .collect(),
            files: held.entries,
            bytes: held.bytes,
            pending_bytes: None,
        }
    }

    /// [`Pins::summary`] with the bytes still to come, which needs a resolution. Blocking.
    pub(super) fn report(&self, store: &Store) -> PinSummary {
        let resolution = resolve(store, &self.all());
        let sizes = store.index.sizes(&resolution.keys);
        let pending = resolution
            .declared
            .iter()
            .filter(|(k, _)| !sizes.contains_key(k))
            .map(|(_, size)| size)
            .sum();
        PinSummary {
            pending_bytes: Some(pending),
            ..self.summary(store)
        }
    }
}

/// What the pinned content takes: the held files' sizes, plus what the pinned manifests
/// list that is not held yet.
fn total_bytes(resolution: &Resolution, held: &HashMap<Key, u64>) -> u64 {
    let mut total = 0;
    for key in &resolution.keys {
        total += held
            .get(key)
            .or_else(|| resolution.declared.get(key))
            .copied()
            .unwrap_or(0);
    }
    total
}

fn pinned_bytes(store: &Store, resolution: &Resolution) -> u64 {
    total_bytes(resolution, &store.index.sizes(&resolution.keys))
}

/// The keys `pins` name in `store`. Reads tag records and manifests from disk, without
/// counting an access. Blocking.
fn resolve(store: &Store, pins: &[PinConfig]) -> Resolution {
    let mut r = Resolution::default();
    for pin in pins {
        if let Some(image) = &pin.image {
            let digest = match image.reference() {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(tag) => tag_digest(store, image.registry(), image.repo(), tag),
            };
            if let Some(digest) = digest {
                walk(store, &digest, &pin.platforms, true, &mut r);
            }
        }
        if let Some(pattern) = &pin.repository {
            let registry = pattern.registry();
            let repos = store
                .tags
                .repositories_on_disk(registry)
                .unwrap_or_default();
            for repo in repos.iter().filter(|repo| pattern.matches(registry, repo)) {
                for (_, record) in store
                    .tags
                    .records_on_disk(registry, repo)
                    .unwrap_or_default()
                {
                    walk(store, &record.digest, &pin.platforms, true, &mut r);
                }
            }
        }
    }
    r
}

fn tag_digest(store: &Store, registry: &str, repo: &RepoName, tag: &Tag) -> Option<Digest> {
    let key = TagKey {
        registry: registry.to_owned(),
        repo: repo.clone(),
        tag: tag.clone(),
    };
    store.tags.record_on_disk(&key).map(|r: TagRecord| r.digest)
}

/// Pins the manifest `digest` and what it lists: an index's manifests for `platforms` (one
/// level: an index in an index is not followed), an image's blobs.
fn walk(store: &Store, digest: &Digest, platforms: &[Platform], top: bool, r: &mut Resolution) {
    let key = Key::manifest(digest);
    if !r.keys.insert(key.clone()) {
        return;
    }
    let manifest = std::fs::read(store.path_of(&key))
        .ok()
        .and_then(|raw| manifests::decode(digest, raw.into()));
    let Some(manifest) = manifest else {
        r.wanted.insert(digest.clone());
        return;
    };
    match Listing::parse(&manifest.media_type, &manifest.bytes) {
        Ok(Listing::Index(entries)) if top => {
            for entry in entries.iter().filter(|e| e.is_for(platforms)) {
                walk(store, &entry.digest, platforms, false, r);
            }
        }
        Ok(Listing::Image(blobs)) => {
            for blob in blobs {
                let key = Key::blob(&blob.digest);
                r.declared.insert(key.clone(), blob.size);
                r.keys.insert(key);
            }
        }
        Ok(Listing::Index(_)) | Err(_) => {}
    }
}

/// The pins file: `<image> [platform,platform]` per line; a line that does not parse is
/// logged and left out.
fn read_file(path: &Path) -> Vec<PinConfig> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut pins = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut words = line.split_whitespace();
        let image = words.next().and_then(|w| w.parse::<ImageRef>().ok());
        let platforms: Option<Vec<Platform>> = words.next().map_or(Some(Vec::new()), |w| {
            w.split(',').map(|p| p.parse().ok()).collect()
        });
        match (image, platforms) {
            (Some(image), Some(platforms)) => pins.push(PinConfig::image(image, platforms)),
            _ => tracing::warn!(path = %path.display(), line, "unreadable pin; ignoring it"),
        }
    }
    pins
}

fn write_file(store: &Store, pins: &[PinConfig]) -> io::Result<()> {
    let mut text = String::new();
    for pin in pins {
        let Some(image) = &pin.image else { continue };
        text.push_str(&image.to_string());
        if !pin.platforms.is_empty() {
            let names: Vec<String> = pin.platforms.iter().map(ToString::to_string).collect();
            text.push(' ');
            text.push_str(&names.join(","));
        }
        text.push('\n');
    }
    write_atomic(&store.tmp, &store.root.join(PINS_FILE), text.as_bytes())
}
