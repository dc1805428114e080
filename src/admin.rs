//! Operator commands. On a storage directory: `cache stats`, `cache prune`, `verify`. They open
//! the store without cleaning or evicting anything, so they are safe next to a running mirror:
//! a file they delete is, to the mirror, a miss it fetches again. Besides: `config check`,
//! `completions`, `man`, `healthcheck`, `warm` (which pulls through a running mirror, or
//! serves the storage directory itself: see `admin/warm.rs`) and `cache purge|refresh` (a
//! running mirror's admin API, or the storage directory at rest: `admin/purge.rs`). [`run`] dispatches a parsed [`Command`].

mod config_check;
mod healthcheck;
mod pin;
mod progress;
mod purge;
mod warm;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::cli::{CacheCommand, Command, ConfigCommand, GlobalArgs};
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
/// holds at most `to` bytes; content `pins` (and the directory's own pins) name stays.
pub fn prune(dir: &Path, to: u64, pins: Vec<crate::config::PinConfig>) -> anyhow::Result<String> {
    if !dir.is_dir() {
        anyhow::bail!("storage dir {} does not exist", dir.display());
    }
    let store = Store::open_pinned(dir, Limits::default(), Mode::Inspect, pins)?;
    let before = store.index.total();
    let evicted = store.index.evict_bytes(before.saturating_sub(to));
    store.delete_files(&evicted);
    if !evicted.is_empty() {
        store.mark_pruned()?;
    }
    Ok(format!(
        "pruned {} files: {} -> {}\n",
        evicted.len(),
        bytesize::ByteSize(before),
        bytesize::ByteSize(store.index.total())
    ))
}

/// A reader that reports how many bytes each read returned.
struct Counting<'a, R> {
    inner: R,
    on_read: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// Whether a stored file's content matches its digest; `on_read` hears of every chunk read.
fn file_ok(store: &Store, entry: &Entry, on_read: &mut dyn FnMut(u64)) -> std::io::Result<bool> {
    let file = std::fs::File::open(store.path_of(&entry.key))?;
    let counting = Counting {
        inner: file,
        on_read,
    };
    let mut reader = BufReader::with_capacity(1024 * 1024, counting);
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

/// What `pullthrough verify` found; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub storage_dir: PathBuf,
    /// Files hashed (or found unreadable).
    pub files_checked: u64,
    /// Bytes read from them.
    pub bytes_checked: u64,
    pub files_ok: u64,
    /// Files whose content does not match their digest, or that could not be read.
    pub corrupt: Vec<CorruptFile>,
    /// How many of `corrupt` were removed (`--repair`).
    pub repaired: u64,
    /// Files in the index that were gone when their turn came (evicted or pruned meanwhile).
    pub vanished: u64,
    /// Nothing corrupt is left: the exit status is 0.
    pub healthy: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorruptFile {
    /// `blob` or `manifest`.
    pub kind: &'static str,
    pub digest: String,
    /// Its size in the index.
    pub size: u64,
    /// `digest mismatch`, or why it could not be read (or removed).
    pub error: String,
    pub removed: bool,
}

impl VerifyReport {
    /// The plain-text report: one line per corrupt file, then the totals.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for c in &self.corrupt {
            let state = if c.removed {
                "removed corrupt"
            } else {
                "corrupt"
            };
            text.push_str(&format!("{state} {} {} ({})\n", c.kind, c.digest, c.error));
        }
        text.push_str(&format!(
            "{} ok, {} corrupt, {} removed ({} files, {} checked)\n",
            self.files_ok,
            self.corrupt.len(),
            self.repaired,
            self.files_checked,
            indicatif::HumanBytes(self.bytes_checked),
        ));
        text
    }
}

/// How far `verify` has come; handed to its progress callback after every chunk read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// `pullthrough verify [--repair]`: re-hashes every cached file. Returns the report as text
/// and whether everything was sound (or repaired).
pub fn verify(dir: &Path, repair: bool) -> anyhow::Result<(String, bool)> {
    let report = verify_with(dir, repair, &mut |_| {})?;
    Ok((report.to_text(), report.healthy))
}

/// [`verify`], reporting progress to `progress` as it goes.
pub fn verify_with(
    dir: &Path,
    repair: bool,
    progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<VerifyReport> {
    let store = open(dir)?;
    let entries = store.index.snapshot();
    let mut at = Progress {
        files_total: entries.len() as u64,
        bytes_total: entries.iter().map(|e| e.size).sum(),
        ..Progress::default()
    };
    let mut report = VerifyReport {
        storage_dir: dir.to_owned(),
        files_checked: 0,
        bytes_checked: 0,
        files_ok: 0,
        corrupt: Vec::new(),
        repaired: 0,
        vanished: 0,
        healthy: true,
    };
    progress(&at);
    for entry in entries {
        let result = file_ok(&store, &entry, &mut |n| {
            at.bytes_done += n;
            report.bytes_checked += n;
            progress(&at);
        });
        at.files_done += 1;
        let error = match result {
            Ok(true) => None,
            Ok(false) => Some("digest mismatch".to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                report.vanished += 1;
                progress(&at);
                continue;
            }
            Err(e) => Some(format!("unreadable: {e}")),
        };
        report.files_checked += 1;
        progress(&at);
        let Some(mut error) = error else {
            report.files_ok += 1;
            continue;
        };
        let mut removed = false;
        if repair {
            match std::fs::remove_file(store.path_of(&entry.key)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => removed = true,
                Err(e) => error.push_str(&format!("; cannot remove: {e}")),
            }
        }
        report.repaired += u64::from(removed);
        report.corrupt.push(CorruptFile {
            kind: match entry.key.kind {
                Kind::Blob => "blob",
                Kind::Manifest => "manifest",
            },
            digest: entry.key.digest.to_string(),
            size: entry.size,
            error,
            removed,
        });
    }
    report.healthy = report.corrupt.iter().all(|c| c.removed);
    Ok(report)
}

/// Runs an operator command and prints its result: the report on stdout, errors on stderr.
/// Exit status 0 on success, 1 when the command ran and found a problem (corrupt files, an
/// invalid config, an unhealthy mirror), 2 when it could not run.
pub fn run(global: &GlobalArgs, command: &Command) -> ExitCode {
    match command {
        Command::Completions { shell } => {
            crate::cli::completions(*shell, &mut std::io::stdout().lock());
            ExitCode::SUCCESS
        }
        Command::Man => finish(crate::cli::man(&mut std::io::stdout().lock()).map_err(Into::into)),
        Command::Healthcheck { url, timeout } => match healthcheck::check(url, *timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pullthrough: unhealthy: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Config(ConfigCommand::Check { explain }) => {
            config_check::run(global, explain, &mut std::io::stdout().lock())
        }
        Command::Cache(CacheCommand::Stats) => {
            with_storage_dir(global, |dir| finish(stats(dir).map(|r| print!("{r}"))))
        }
        Command::Cache(CacheCommand::Prune { to }) => match global.load_config() {
            Ok(config) => finish(
                prune(&config.storage.dir, to.as_u64(), config.pins()).map(|r| print!("{r}")),
            ),
            Err(e) => {
                eprintln!("pullthrough: {e}");
                ExitCode::from(2)
            }
        },
        Command::Cache(CacheCommand::Purge(args)) => purge::run_purge(global, args),
        Command::Cache(CacheCommand::Refresh(args)) => purge::run_refresh(global, args),
        Command::Cache(CacheCommand::Pin(args)) => pin::run(global, args, pin::Change::Pin),
        Command::Cache(CacheCommand::Unpin(args)) => pin::run(global, args, pin::Change::Unpin),
        Command::Warm(args) => warm::run(global, args),
        Command::Verify { repair, json } => {
            with_storage_dir(global, |dir| verify_command(dir, *repair, *json))
        }
    }
}

/// Runs `f` on the configured storage directory (the config loaded as the server would).
fn with_storage_dir(global: &GlobalArgs, f: impl FnOnce(&Path) -> ExitCode) -> ExitCode {
    match global.load_config() {
        Ok(config) => f(&config.storage.dir),
        Err(e) => {
            eprintln!("pullthrough: {e}");
            ExitCode::from(2)
        }
    }
}

fn verify_command(dir: &Path, repair: bool, json: bool) -> ExitCode {
    let mut reporter = progress::Reporter::for_stderr();
    let report = verify_with(dir, repair, &mut |p| reporter.update(p));
    reporter.finish();
    let report = match report {
        Ok(r) => r,
        Err(e) => return finish(Err(e)),
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return finish(Err(e.into())),
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Exit status 0, or the error on stderr and 2.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::from(2)
        }
    }
}
