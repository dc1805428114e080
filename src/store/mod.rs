//! The on-disk cache. Layout under the storage directory:
//!
//! ```text
//! blobs/sha256/ab/abcdef…      blob bytes, named by their verified digest
//! manifests/sha256/ab/abcdef…  "<media type>\n" + the manifest's exact bytes
//! tags/<registry>/<repo>/_tags/<tag>   JSON tag record (digest, media type, fetch time)
//! index.snapshot               sizes and last-access times, least recently used first
//! pruned                       changed by each `cache prune`, for a running mirror to notice
//! tmp/                         downloads in progress; emptied at start-up
//! lock                         locked by the one process serving the directory
//! links                        which (registry, repository) each digest was fetched for
//! pins                         the pins of `cache pin` (see `pins.rs`)
//! ```
//!
//! Paths are only ever built from parsed `Digest`, `RepoName` and `Tag` values and from
//! configured registry names, so no request can name a file outside this tree. A file appears
//! under its final name only by an atomic rename after verification. Blobs and manifests count
//! against the size bound; evicting one deletes its file (a reader holding it open keeps
//! reading: an unlinked file lives until closed).

pub mod blobs;
pub mod coverage;
pub mod handle;
pub mod index;
pub mod links;
pub mod manifests;
pub mod pins;
pub mod s3;
pub mod shared;
pub mod tags;
#[cfg(test)]
pub(crate) mod testing;
pub mod tier;
pub mod tiers;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tempfile::NamedTempFile;

use crate::clock::Clock;
use crate::oci::Digest;
use index::{Entry, Index, Key, Kind};

const SNAPSHOT: &str = "index.snapshot";
/// Rewritten by `cache prune` (with the time), read by the server: see [`Store::notice_prune`].
const PRUNE_MARKER: &str = "pruned";
/// Locked by the process that serves the directory (see [`Store::open`]).
const LOCK: &str = "lock";

/// How the store is opened: by the server (owns the directory: cleans temp files, evicts) or
/// by an operator command next to a possibly running server (touches nothing on open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Inspect,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_size: Option<u64>,
    pub low_watermark: Option<u64>,
}

impl Limits {
    pub fn from_config(storage: &crate::config::StorageConfig) -> Limits {
        Limits {
            max_size: storage.max_size.map(|b| b.as_u64()),
            low_watermark: storage.low_watermark.map(|b| b.as_u64()),
        }
    }
}

pub struct Store {
    root: PathBuf,
    disk: DiskState,
    evictions: std::sync::atomic::AtomicU64,
    tmp: PathBuf,
    /// The prune marker's content when last looked at.
    prune_seen: Mutex<Option<String>>,
    /// The lock a serving store holds on the directory for as long as it is open.
    _lock: Option<std::fs::File>,
    pub index: Arc<Index>,
    pub blobs: blobs::Blobs,
    pub manifests: manifests::Manifests,
    pub tags: tags::Tags,
    pub links: links::Links,
    pins: pins::Pins,
}

impl Store {
    /// Opens (creating if needed) the storage directory and rebuilds the index from the files
    /// on disk, in the access order saved by the last run. Blocking: call before serving or
    /// from `spawn_blocking`.
    ///
    /// Serving takes the directory's lock: two processes serving one directory would delete
    /// each other's downloads in progress (temp files are cleaned at start), keep two size
    /// bounds and overwrite each other's index, so the second is refused (`ResourceBusy`).
    /// Inspecting takes no lock (see `admin`).
    /// Decides the full-disk pause on `clock` (the mirror's), not on the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Store {
        self.disk.clock = clock;
        self
    }

    pub fn open(root: &Path, limits: Limits, mode: Mode) -> io::Result<Store> {
        Store::open_pinned(root, limits, mode, Vec::new())
    }

    /// [`Store::open`] with the config's pins (and those kept in the directory): their
    /// content is never evicted. Refused (`InvalidInput`, with the figures) when the pinned
    /// content is larger than `limits.max_size`.
    pub fn open_pinned(
        root: &Path,
        limits: Limits,
        mode: Mode,
        config_pins: Vec<crate::config::PinConfig>,
    ) -> io::Result<Store> {
        let tmp = root.join("tmp");
        let mut lock = None;
        if mode == Mode::Serve {
            std::fs::create_dir_all(root)?;
            lock = Some(lock_dir(root)?);
            for dir in ["blobs/sha256", "manifests/sha256", "tags"] {
                std::fs::create_dir_all(root.join(dir))?;
            }
            std::fs::create_dir_all(&tmp)?;
            clean_temp(&tmp)?;
        }
        let index = Arc::new(Index::new(limits.max_size, limits.low_watermark));
        let store = Store {
            root: root.to_owned(),
            disk: DiskState::default(),
            evictions: std::sync::atomic::AtomicU64::new(0),
            blobs: blobs::Blobs::new(root.join("blobs"), tmp.clone(), index.clone()),
            manifests: manifests::Manifests::new(
                root.join("manifests"),
                tmp.clone(),
                index.clone(),
            ),
            tags: tags::Tags::new(root.join("tags"), tmp.clone()),
            links: links::Links::open(root, mode == Mode::Serve)?,
            tmp,
            prune_seen: Mutex::new(std::fs::read_to_string(root.join(PRUNE_MARKER)).ok()),
            _lock: lock,
            pins: pins::Pins::load(root, config_pins),
            index,
        };
        let found = scan(root)?;
        // Pinned before the index is loaded, which evicts down to the bound.
        let sizes: HashMap<Key, u64> = found.iter().map(|e| (e.key.clone(), e.size)).collect();
        store
            .pins
            .start(&store, &sizes, limits.max_size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let evicted = store.index.load(found);
        if mode == Mode::Serve {
            store.delete_files(&evicted);
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, key: &Key) -> PathBuf {
        digest_path(&self.root.join(key.kind.dir()), &key.digest)
    }

    /// Deletes evicted files. Blocking.
    pub fn delete_files(&self, keys: &[Key]) {
        for key in keys {
            match key.kind {
                Kind::Manifest => self.manifests.forget(&key.digest),
                Kind::Blob => self.blobs.forget(&key.digest),
            }
            self.evictions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match std::fs::remove_file(self.path_of(key)) {
                Ok(()) => tracing::debug!(digest = %key.digest, kind = ?key.kind, "evicted"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(digest = %key.digest, error = %e, "cannot delete evicted file")
                }
            }
        }
    }

    /// Removes a blob or manifest on an operator's request (a purge): from memory, the index
    /// and the disk. With `before`, a file written after that time is kept: it was fetched
    /// again since the purge was asked for. Whether something was removed. Blocking.
    pub fn purge(&self, key: &Key, before: Option<SystemTime>) -> io::Result<bool> {
        let path = self.path_of(key);
        if let Some(before) = before {
            match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(written) if written > before => return Ok(false),
                _ => {}
            }
        }
        let in_memory = match key.kind {
            Kind::Manifest => {
                self.manifests.forget(&key.digest);
                self.manifests.forget_unwritten(&key.digest)
            }
            Kind::Blob => {
                self.blobs.forget(&key.digest);
                false
            }
        };
        let indexed = self.index.contains(key);
        self.index.remove(key);
        let on_disk = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        Ok(in_memory || indexed || on_disk)
    }

    /// Tells a running server that files were deleted under it (by `cache prune`). Blocking.
    pub fn mark_pruned(&self) -> io::Result<()> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::fs::write(self.root.join(PRUNE_MARKER), format!("{stamp}\n"))
    }

    /// If a `cache prune` ran since the last look (its marker changed), drops from the index
    /// the files that are gone, so the size and entry counts are right again; returns how
    /// many. Reads directories, stats no file, and only after a prune. Blocking.
    pub fn notice_prune(&self) -> io::Result<usize> {
        let stamp = std::fs::read_to_string(self.root.join(PRUNE_MARKER)).ok();
        {
            let mut seen = crate::sync::lock(&self.prune_seen);
            if *seen == stamp {
                return Ok(0);
            }
            *seen = stamp;
        }
        // The index first: a file committed after this is not in it, so it cannot be
        // mistaken for a pruned one by the scan below.
        let indexed = self.index.snapshot();
        let on_disk: HashSet<Key> = scan(&self.root)?.into_iter().map(|e| e.key).collect();
        let mut gone = 0;
        for entry in indexed {
            if on_disk.contains(&entry.key) {
                continue;
            }
            match entry.key.kind {
                Kind::Manifest => self.manifests.forget(&entry.key.digest),
                Kind::Blob => self.blobs.forget(&entry.key.digest),
            }
            self.index.remove(&entry.key);
            gone += 1;
        }
        Ok(gone)
    }

    /// Writes the index (sizes and access order) if it changed since the last save, so a
    /// restart keeps the LRU order. Batched: called periodically and at shutdown, never per
    /// access. Blocking.
    pub fn save_index(&self) -> io::Result<()> {
        if !self.index.is_dirty() {
            return Ok(());
        }
        self.write_index()
    }

    /// Writes the index unconditionally. Blocking.
    pub fn write_index(&self) -> io::Result<()> {
        let mut text = String::new();
        for entry in self.index.snapshot() {
            text.push_str(&entry.to_line());
            text.push('\n');
        }
        write_atomic(&self.tmp, &self.root.join(SNAPSHOT), text.as_bytes())
    }

    /// A writer for a blob download (the miss side of the seam).
    pub async fn blob_writer(self: &Arc<Self>) -> io::Result<writer::BlobWriter> {
        let temp = self.blobs.create_temp().await?;
        writer::BlobWriter::new(self.clone(), temp)
    }

    /// Why the storage directory cannot take new content now, if it cannot: too little free
    /// space (measured at most [`SPACE_READING_TTL`] ago), a write that failed for lack of
    /// space and no measure since, or a temp file that cannot be created.
    pub async fn unwritable(&self) -> Option<Unwritable> {
        let dir = self.root.clone();
        match self.space().await {
            Ok(space) if space.is_low() => return Some(Unwritable::LowSpace { dir, space }),
            Ok(_) => {}
            Err(_) if self.disk.is_full() => return Some(Unwritable::Full { dir }),
            Err(_) => {}
        }
        self.blobs
            .create_temp()
            .await
            .err()
            .map(|source| Unwritable::Io { dir, source })
    }

    /// Free space on the storage file system: the reading of the last [`SPACE_READING_TTL`],
    /// else a new one (`statvfs`, off the async workers). A reading with space enough lifts
    /// the pause a write that failed for lack of space began.
    pub async fn space(&self) -> io::Result<Space> {
        if let Some(space) = self.disk.recent_reading() {
            return Ok(space);
        }
        let root = self.root.clone();
        let space = blocking(move || {
            Ok(Space {
                free: fs4::available_space(&root)?,
                total: fs4::total_space(&root)?,
            })
        })
        .await?;
        self.disk.record(space);
        Ok(space)
    }

    /// The last reading of the free space, however old; `None` before the first.
    pub fn last_space(&self) -> Option<Space> {
        crate::sync::lock(&self.disk.reading).map(|(_, space)| space)
    }

    /// Whether caching is paused for lack of space: a write failed for it, and no reading
    /// since shows space again.
    async fn paused(&self) -> bool {
        self.disk.is_full() && self.space().await.ok().is_none_or(|s| s.is_low())
    }

    /// Whether the disk can take `size` more bytes, evicting old content to make room. Never
    /// evicts for content that could not fit even in an empty cache.
    pub async fn make_room(self: &Arc<Self>, size: u64) -> bool {
        if self.paused().await {
            self.disk.warn("a recent write failed for lack of space");
            return false;
        }
        let needed = size + SPACE_MARGIN;
        for attempt in 0..2 {
            let store = self.clone();
            let available = match tokio::task::spawn_blocking(move || store.available_space()).await
            {
                Ok(Ok(a)) => a,
                // Cannot tell: try, and let a failed write decide.
                _ => return true,
            };
            if available >= needed {
                return true;
            }
            // Evicting everything would still leave too little: keep the cache as it is.
            if available.saturating_add(self.index.total()) < needed {
                break;
            }
            if attempt == 0 {
                let evicted = self.index.evict_bytes(needed - available);
                if evicted.is_empty() || self.evict(evicted).await.is_err() {
                    break;
                }
            }
        }
        self.disk.warn("not enough free space");
        false
    }

    /// Records a failed write; returns whether it failed for lack of space, in which case
    /// caching pauses for a while (content is served uncached meanwhile).
    pub fn note_write_failure(&self, e: &io::Error) -> bool {
        if !crate::platform::is_no_space(e) {
            return false;
        }
        self.disk.set_full();
        self.disk.warn("a write failed: no space left on device");
        true
    }

    /// Commits a verified blob download and applies the evictions it causes.
    async fn publish_blob(
        self: &Arc<Self>,
        temp: NamedTempFile,
        digest: &Digest,
        size: u64,
    ) -> io::Result<()> {
        let evicted = self.blobs.commit(temp, digest, size).await?;
        self.evict(evicted).await
    }

    /// Writes a tag record; a tag a pin follows resolves the pins again (see `pins.rs`).
    pub async fn put_tag(
        self: &Arc<Self>,
        key: &tags::TagKey,
        record: tags::TagRecord,
    ) -> io::Result<()> {
        self.tags.put(key, record).await?;
        if self.pins.follows(key) {
            self.refresh_pins().await;
        }
        Ok(())
    }

    /// Resolves the pins again (a tag or manifest they name arrived), off the async workers.
    async fn refresh_pins(self: &Arc<Self>) {
        let store = self.clone();
        let _ = blocking(move || {
            store.pins.refresh(&store);
            Ok(())
        })
        .await;
    }

    /// Adds runtime pins (kept in the directory's pins file), refused with the figures when
    /// the pinned content would exceed the bound; what is pinned then.
    pub async fn pin(
        self: &Arc<Self>,
        add: Vec<crate::config::PinConfig>,
    ) -> Result<pins::PinSummary, pins::PinError> {
        let store = self.clone();
        pin_blocking(move || {
            store.pins.pin(&store, add)?;
            Ok(store.pins.report(&store))
        })
        .await
    }

    /// Removes runtime pins; what is pinned then.
    pub async fn unpin(
        self: &Arc<Self>,
        images: Vec<crate::image::ImageRef>,
    ) -> Result<pins::PinSummary, pins::PinError> {
        let store = self.clone();
        pin_blocking(move || {
            store.pins.unpin(&store, &images)?;
            Ok(store.pins.report(&store))
        })
        .await
    }

    /// What is pinned and how much of it is held (no files read: for the status page).
    pub fn pin_summary(&self) -> pins::PinSummary {
        self.pins.summary(self)
    }

    /// What is pinned, with the bytes not held yet. Blocking.
    pub fn pin_report(&self) -> pins::PinSummary {
        self.pins.report(self)
    }

    /// Stores a verified manifest and applies the evictions it causes. When it cannot be
    /// written it is still kept in memory, so it is served without another upstream fetch.
    pub async fn put_manifest(self: &Arc<Self>, m: Arc<manifests::Manifest>) -> io::Result<()> {
        if self.paused().await {
            self.disk.warn("a recent write failed for lack of space");
            self.manifests.keep_unwritten(m);
            return Ok(());
        }
        let wanted = self.pins.wants(&m.digest);
        let evicted = match self.manifests.put(m).await {
            Ok(evicted) => evicted,
            Err(e) => {
                self.note_write_failure(&e);
                return Err(e);
            }
        };
        if wanted {
            self.refresh_pins().await;
        }
        self.evict(evicted).await
    }

    /// Deletes the files of evicted entries, off the async workers.
    pub async fn evict(self: &Arc<Self>, keys: Vec<Key>) -> io::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let store = self.clone();
        blocking(move || {
            store.delete_files(&keys);
            Ok(())
        })
        .await
    }

    /// Files evicted since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes free on the storage file system. Blocking.
    pub fn available_space(&self) -> io::Result<u64> {
        fs4::available_space(&self.root)
    }
}

/// Space kept free on the storage file system beyond a download's own size.
const SPACE_MARGIN: u64 = 8 * 1024 * 1024;
/// After a write fails for lack of space, caching pauses this long before trying again,
/// unless a reading of the free space shows space back before.
const DISK_FULL_PAUSE: Duration = Duration::from_secs(60);
/// How long a reading of the free space is used: readiness probes and downloads ask often,
/// and a second's lag is nothing to either.
pub const SPACE_READING_TTL: Duration = Duration::from_secs(1);
/// Free space below which the store is not ready, unless 1 % of the file system is less.
const LOW_SPACE: u64 = 64 * 1024 * 1024;

/// Free space on the storage file system.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// Bytes this process may still write.
    pub free: u64,
    /// The file system's size.
    pub total: u64,
}

impl Space {
    /// Below this, the store takes no new content: 1 % of the file system or 64 MiB,
    /// whichever is smaller (a small volume is not "full" at 64 MiB left, nor a large one at
    /// 1 % left).
    pub fn low(&self) -> u64 {
        LOW_SPACE.min(self.total / 100)
    }

    pub fn is_low(&self) -> bool {
        self.free < self.low()
    }
}

/// Why the storage directory cannot take new content (see [`Store::unwritable`]).
#[derive(Debug, thiserror::Error)]
pub enum Unwritable {
    #[error(
        "storage dir {}: {} free of {}, less than {}",
        dir.display(),
        fmt_bytes(space.free),
        fmt_bytes(space.total),
        fmt_bytes(space.low())
    )]
    LowSpace { dir: PathBuf, space: Space },
    #[error("storage dir {}: a write failed for lack of space", dir.display())]
    Full { dir: PathBuf },
    #[error("storage dir {}: cannot create a file: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

/// A size as an operator reads it: `0B`, `163.8KiB`, `16.0MiB`.
fn fmt_bytes(n: u64) -> String {
    for (unit, factor) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if n >= factor {
            return format!("{:.1}{unit}", n as f64 / factor as f64);
        }
    }
    format!("{n}B")
}

/// Whether the disk recently ran out of space, the last reading of its free space, and when
/// that was last logged, on the mirror's clock.
#[derive(Default)]
struct DiskState {
    clock: Clock,
    full_until: Mutex<Option<SystemTime>>,
    reading: Mutex<Option<(SystemTime, Space)>>,
    warned: Mutex<Option<SystemTime>>,
}

impl DiskState {
    fn is_full(&self) -> bool {
        let until = *crate::sync::lock(&self.full_until);
        until.is_some_and(|t| self.clock.now() < t)
    }

    fn set_full(&self) {
        *crate::sync::lock(&self.full_until) = Some(self.clock.now() + DISK_FULL_PAUSE);
        // A reading from before the failure must not lift the pause it begins.
        *crate::sync::lock(&self.reading) = None;
    }

    fn recent_reading(&self) -> Option<Space> {
        let reading = *crate::sync::lock(&self.reading);
        reading
            .filter(|(at, _)| self.clock.since(*at) < SPACE_READING_TTL)
            .map(|(_, space)| space)
    }

    fn record(&self, space: Space) {
        *crate::sync::lock(&self.reading) = Some((self.clock.now(), space));
        if !space.is_low() {
            *crate::sync::lock(&self.full_until) = None;
        }
    }

    /// Logs a warning at most once a minute.
    fn warn(&self, why: &str) {
        let mut warned = crate::sync::lock(&self.warned);
        if warned.is_none_or(|t| self.clock.since(t) >= Duration::from_secs(60)) {
            *warned = Some(self.clock.now());
            tracing::warn!(
                reason = why,
                "storage is full: content is served to clients without being cached"
            );
        }
    }
}

/// Takes the lock of a directory to serve, or says which process holds it.
fn lock_dir(root: &Path) -> io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(LOCK))?;
    match crate::platform::try_lock(&file)? {
        None => Ok(file),
        Some(pid) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "in use by another pullthrough process (pid {pid}); while a mirror runs, go \
                 through its HTTP API (`--mirror URL`)"
            ),
        )),
    }
}

fn clean_temp(tmp: &Path) -> io::Result<()> {
    let mut removed = 0usize;
    for entry in std::fs::read_dir(tmp)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed temp files left by an earlier run");
    }
    Ok(())
}

/// Every blob and manifest file on disk, least recently used first: in the saved snapshot's
/// order where known, by modification time otherwise. Only files are stat'ed that the snapshot
/// does not know, so start-up reads directories, not every inode.
fn scan(root: &Path) -> io::Result<Vec<Entry>> {
    let mut known: HashMap<Key, (usize, Entry)> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(root.join(SNAPSHOT)) {
        for (i, entry) in text.lines().filter_map(Entry::from_line).enumerate() {
            known.insert(entry.key.clone(), (i, entry));
        }
    }
    let mut found: Vec<(u64, usize, Entry)> = Vec::new();
    for kind in [Kind::Blob, Kind::Manifest] {
        let base = root.join(kind.dir()).join("sha256");
        let Ok(prefixes) = std::fs::read_dir(&base) else {
            continue;
        };
        for prefix in prefixes.flatten() {
            let Ok(files) = std::fs::read_dir(prefix.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
                else {
                    continue;
                };
                let key = Key { kind, digest };
                match known.remove(&key) {
                    Some((i, entry)) => found.push((entry.last_access, i, entry)),
                    None => {
                        let Ok(meta) = file.metadata() else { continue };
                        let mtime = meta.modified().map_or(0, crate::clock::unix_secs);
                        let entry = Entry {
                            key,
                            size: meta.len(),
                            last_access: mtime,
                            verified: false,
                        };
                        found.push((mtime, usize::MAX, entry));
                    }
                }
            }
        }
    }
    found.sort_by_key(|(access, i, _)| (*access, *i));
    Ok(found.into_iter().map(|(_, _, e)| e).collect())
}

/// `<dir>/sha256/ab/abcdef…` for a sha256 digest.
fn digest_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join(crate::oci::ALGORITHM).join(&hex[..2]).join(hex)
}

/// Writes `bytes` to a temp file and renames it to `path`: readers see the old file or the
/// whole new one, never a part. Blocking.
fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = NamedTempFile::new_in(tmp)?;
    file.write_all(bytes)?;
    persist(file, path)
}

/// The one commit: data synced to disk, then an atomic rename to the final name. Blocking.
fn persist(temp: NamedTempFile, path: &Path) -> io::Result<()> {
    temp.as_file().sync_data()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Runs a pin change off the async runtime.
async fn pin_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, pins::PinError> + Send + 'static,
) -> Result<T, pins::PinError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| pins::PinError::Io(io::Error::other(e)))?
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}
