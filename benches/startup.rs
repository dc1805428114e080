//! Start-up time of the cache index with 100 000 cached files: `cargo bench --bench startup`.
//!
//! Prints the index rebuild time after a clean shutdown (access order saved) and after a crash
//! (no saved order: every file is stat'ed), each beside a plain directory walk of the same tree
//! measured in the same run, and checks the 1-second target.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

use std::path::Path;
use std::time::{Duration, Instant};

use pullthrough::store::{Limits, Mode, Store};
use sha2::{Digest as _, Sha256};

const FILES: usize = 100_000;

fn populate(root: &Path) {
    for i in 0..FILES {
        let bytes = (i as u64).to_le_bytes();
        let hex = hex::encode(Sha256::digest(bytes));
        let dir = root.join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(&hex), bytes).unwrap();
    }
}

/// The reference: list every file, nothing else.
fn walk(root: &Path) -> usize {
    let mut n = 0;
    for prefix in std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .flatten()
    {
        n += std::fs::read_dir(prefix.path()).unwrap().flatten().count();
    }
    n
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    eprintln!("writing {FILES} files under {} ...", root.display());
    populate(root);
    let walk_time = best_of(3, || assert_eq!(walk(root), FILES));

    // After a crash: no saved access order.
    let crash = best_of(3, || {
        let s = Store::open(root, Limits::default(), Mode::Serve).unwrap();
        assert_eq!(s.index.stats().entries, FILES);
    });
    // After a clean shutdown: the saved order spares a stat per file.
    Store::open(root, Limits::default(), Mode::Serve)
        .unwrap()
        .write_index()
        .unwrap();
    let clean = best_of(3, || {
        let s = Store::open(root, Limits::default(), Mode::Serve).unwrap();
        assert_eq!(s.index.stats().entries, FILES);
    });

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:<44} {:>10} {:>14} {:>7}",
        "start-up, 100 000 cached files", "ours (ms)", "dir walk (ms)", "ratio"
    );
    for (name, t) in [
        ("after a clean shutdown (saved order)", clean),
        ("after a crash (stat every file)", crash),
    ] {
        println!(
            "{:<44} {:>10.1} {:>14.1} {:>7.2}",
            name,
            ms(t),
            ms(walk_time),
            t.as_secs_f64() / walk_time.as_secs_f64()
        );
    }
    let worst = clean.max(crash);
    println!(
        "target < 1000 ms: {}",
        if worst < Duration::from_secs(1) {
            "met"
        } else {
            "MISSED"
        }
    );
}
