//! Operator commands on a storage directory: `cache stats`, `cache prune`, `verify`. They open
//! the store without cleaning or evicting anything, so they are safe next to a running mirror:
//! a file they delete is, to the mirror, a miss it fetches again.

use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::oci::Digest;
use crate::store::index::{Entry, Kind};
use crate::store::{Limits, Mode, Store};

fn open(dir: &Path) -> anyhow::Result<Store> {
    if !dir.is_dir() {
        anyhow::bail!("storage dir {} does not exist", dir.display());
    }
    Ok(Store::open(dir, Limits::default(), Mode::Inspect)?)
}

fn time(secs: Option<u64>) -> String {
    secs.map(|s| humantime::format_rfc3339_seconds(crate::clock::from_unix_secs(s)).to_string())
        .unwrap_or_else(|| "-".into())
}

/// `pullthrough cache stats`
pub fn stats(dir: &Path) -> anyhow::Result<String> {
    let store = open(dir)?;
    let s = store.index.stats();
    Ok(format!(
        "entries: {}\nbytes: {} ({})\noldest access: {}\nnewest access: {}\n",
        s.entries,
        s.bytes,
        bytesize::ByteSize(s.bytes),
        time(s.oldest_access),
        time(s.newest_access),
    ))
}

/// `pullthrough cache prune --to SIZE`: deletes least recently used files until the cache
/// holds at most `to` bytes.
pub fn prune(dir: &Path, to: u64) -> anyhow::Result<String> {
    let store = open(dir)?;
    let before = store.index.total();
    let evicted = store.index.evict_bytes(before.saturating_sub(to));
    store.delete_files(&evicted);
    Ok(format!(
        "pruned {} files: {} -> {}\n",
        evicted.len(),
        bytesize::ByteSize(before),
        bytesize::ByteSize(store.index.total())
    ))
}

/// Whether a stored file's content matches its digest.
fn file_ok(store: &Store, entry: &Entry) -> std::io::Result<bool> {
    let file = std::fs::File::open(store.path_of(&entry.key))?;
    let mut reader = BufReader::with_capacity(1024 * 1024, file);
    // A manifest file starts with its media type line, which is not part of the digest.
    if entry.key.kind == Kind::Manifest {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            return Ok(false);
        }
    }
    Ok(Digest::sha256_of_reader(reader)? == entry.key.digest)
}

/// `pullthrough verify [--repair]`: re-hashes every cached file. Returns the report and
/// whether everything was sound.
pub fn verify(dir: &Path, repair: bool) -> anyhow::Result<(String, bool)> {
    let store = open(dir)?;
    let mut report = String::new();
    let (mut good, mut bad) = (0usize, 0usize);
    for entry in store.index.snapshot() {
        let ok = match file_ok(&store, &entry) {
            Ok(ok) => ok,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                report.push_str(&format!("unreadable {}: {e}\n", entry.key.digest));
                false
            }
        };
        if ok {
            good += 1;
            continue;
        }
        bad += 1;
        let what = if entry.key.kind == Kind::Blob {
            "blob"
        } else {
            "manifest"
        };
        if repair {
            std::fs::remove_file(store.path_of(&entry.key))?;
            report.push_str(&format!("removed corrupt {what} {}\n", entry.key.digest));
        } else {
            report.push_str(&format!("corrupt {what} {}\n", entry.key.digest));
        }
    }
    report.push_str(&format!("{good} ok, {bad} corrupt\n"));
    Ok((report, bad == 0 || repair))
}
