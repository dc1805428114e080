//! First-read verification of blobs found on disk at start-up: one hashing pass per blob on
//! the blocking pool, however many clients read it meanwhile.
//!
//! Readers are not held up: they stream the file (zero-copy where possible) with a
//! [`Progress`] that says every byte is readable but the verdict is pending, so each one's last
//! chunk waits for the hash, exactly as followers of a download do. A mismatch cuts them all
//! and removes the file; the next request fetches it again.

use std::fs::File;
use std::io;
use std::sync::Arc;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::singleflight::{Flights, Joined};
use crate::store::handle::{Failed, Progress};
use crate::store::Store;

pub struct Verifications {
    flights: Flights<Digest, watch::Sender<Progress>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

/// How a verification ended; each is logged by name.
#[derive(Debug)]
enum Outcome {
    Verified,
    Mismatch {
        actual: Digest,
    },
    /// Reading the file failed; it is left in place and tried again by the next reader.
    Unreadable(Arc<io::Error>),
    Panicked,
}

impl Verifications {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Verifications {
        Verifications {
            flights: Flights::default(),
            store,
            metrics,
        }
    }

    /// Joins the verification of `digest` (the file `file` of `size` bytes), starting it if
    /// none runs, and returns the progress its readers follow.
    pub fn join(&self, digest: &Digest, file: Arc<File>, size: u64) -> watch::Receiver<Progress> {
        let (sender, guard) = match self.flights.join_or_start(digest, || {
            watch::channel(Progress::Writing {
                written: size,
                ahead: Default::default(),
            })
            .0
        }) {
            Joined::Follower(sender) => return sender.subscribe(),
            Joined::Leader(sender, guard) => (sender, guard),
        };
        let rx = sender.subscribe();
        let (store, metrics, digest) = (self.store.clone(), self.metrics.clone(), digest.clone());
        tokio::spawn(async move {
            let expected = digest.clone();
            let outcome = tokio::task::spawn_blocking(move || hash(&file, size))
                .await
                .map_or(Outcome::Panicked, |hashed| match hashed {
                    Ok(actual) if actual == expected => Outcome::Verified,
                    Ok(actual) => Outcome::Mismatch { actual },
                    Err(e) => Outcome::Unreadable(Arc::new(e)),
                });
            match &outcome {
                Outcome::Verified => {
                    store.blobs.mark_verified(&digest);
                    tracing::debug!(%digest, "cached blob verified");
                }
                Outcome::Mismatch { actual } => {
                    tracing::error!(%digest, %actual, "cached blob is corrupt; removed, will be fetched again");
                    metrics.digest_mismatch();
                    let (store, digest) = (store.clone(), digest.clone());
                    let _ = tokio::task::spawn_blocking(move || store.blobs.discard(&digest)).await;
                }
                Outcome::Unreadable(e) => {
                    tracing::error!(%digest, error = %e, "cannot read cached blob to verify it")
                }
                Outcome::Panicked => tracing::error!(%digest, "blob verification panicked"),
            }
            // The entry goes before the verdict, so a reader woken by a failure that asks again
            // starts afresh instead of joining this finished pass.
            drop(guard);
            sender.send_replace(match outcome {
                Outcome::Verified => Progress::Complete,
                Outcome::Mismatch { actual } => Progress::Failed(Failed::Mismatch { actual }),
                Outcome::Unreadable(e) => Progress::Failed(Failed::Unreadable(e)),
                Outcome::Panicked => Progress::Failed(Failed::Panicked),
            });
        });
        rx
    }
}

/// Hashes `file[..size]` with positional reads: the descriptor is shared with readers and the
/// open-file cache, so its cursor must not move.
fn hash(file: &File, size: u64) -> io::Result<Digest> {
    struct At<'a> {
        file: &'a File,
        pos: u64,
    }
    impl io::Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = crate::platform::read_into_at(self.file, buf, self.pos)?;
            self.pos += n as u64;
            Ok(n)
        }
    }
    Digest::sha256_of_reader(io::Read::take(At { file, pos: 0 }, size))
}
