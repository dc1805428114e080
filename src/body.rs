//! Response bodies. Every body is a stream of chunks with bounded memory: a cached file is read
//! in fixed-size chunks, an in-flight download is read from its temp file as the writer's
//! progress allows. A body error makes hyper cut the connection, which is how a client learns
//! that bytes it received are not a complete blob.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{stream, TryStreamExt};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use tokio::sync::watch;

use crate::sendfile::{self, Sendfile};

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Read size for file-backed bodies that are copied (not sent with `sendfile`). With hyper's
/// write buffer capped (see `server`), a slow reader holds about one chunk plus that buffer, so
/// 256 slow readers stay within tens of MiB.
/// (Growing the chunk for fast readers was tried: the kernel's socket buffer makes every reader
/// look fast at first, and the big chunk then stays pinned by the slow ones.)
const CHUNK: usize = 128 * 1024;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn from_stream<S>(s: S) -> Body
where
    S: futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    StreamBody::new(s.map_ok(Frame::data)).boxed_unsync()
}

/// How far a file has been written. A committed file is `Complete`; a download in progress
/// publishes its progress through a watch channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// `written` bytes are on disk and readable; more will come.
    Writing { written: u64 },
    /// The whole file is on disk and verified.
    Complete,
    /// The download failed; readers must cut their connection.
    Failed(String),
}

/// Streams `file[start..end)`. With `progress`, waits for the writer before reading past what
/// has been written, so a reader never sees a byte before it is on disk. With `sendfile`, chunks
/// whose pages are in the page cache go to the socket without a copy (see [`crate::sendfile`]);
/// the others are read on the blocking pool. A connection that asks for smaller copied chunks
/// ([`Sendfile::copy_chunk`], HTTP/2) gets them, read in place when their pages are cached.
pub fn file_range(
    file: Arc<File>,
    start: u64,
    end: u64,
    progress: Option<watch::Receiver<Progress>>,
    sendfile: Option<Sendfile>,
) -> Body {
    struct State {
        file: Arc<File>,
        pos: u64,
        end: u64,
        progress: Option<watch::Receiver<Progress>>,
        sendfile: Option<Sendfile>,
    }
    let state = State {
        file,
        pos: start,
        end,
        progress,
        sendfile,
    };
    from_stream(stream::try_unfold(state, |mut st| async move {
        if st.pos >= st.end {
            return Ok(None);
        }
        let mut limit = st.end;
        if let Some(rx) = st.progress.as_mut() {
            let available = loop {
                let p = rx.borrow_and_update().clone();
                match p {
                    Progress::Complete => break st.end,
                    Progress::Failed(why) => {
                        return Err(io::Error::other(format!("download failed: {why}")))
                    }
                    Progress::Writing { written } if written > st.pos => break written,
                    Progress::Writing { .. } => {}
                }
                if rx.changed().await.is_err() {
                    // The writer vanished without a final state: treat as failed.
                    return Err(io::Error::other("download abandoned"));
                }
            };
            limit = limit.min(available);
        }
        let len = (limit - st.pos).min(sendfile::MAX_CHUNK as u64) as usize;
        if st.pos + len as u64 >= st.end {
            // The last chunk waits for the writer's verdict on the whole file, so a client
            // never completes a response whose blob turns out not to match its digest.
            if let Some(rx) = st.progress.as_mut() {
                let verdict = rx
                    .wait_for(|p| !matches!(p, Progress::Writing { .. }))
                    .await
                    .map(|p| p.clone());
                match verdict {
                    Ok(Progress::Complete) => {}
                    Ok(Progress::Failed(why)) => {
                        return Err(io::Error::other(format!("download failed: {why}")))
                    }
                    _ => return Err(io::Error::other("download abandoned")),
                }
            }
        }
        let zero_copy = st
            .sendfile
            .as_ref()
            .and_then(|sf| sf.chunk(&st.file, st.pos, len));
        let chunk = match zero_copy {
            Some(chunk) => chunk,
            None => {
                let (file, pos) = (st.file.clone(), st.pos);
                let most = st.sendfile.as_ref().and_then(Sendfile::copy_chunk);
                let len = len.min(most.unwrap_or(CHUNK));
                if most.is_some() && sendfile::resident(&file, pos, len) {
                    // A small chunk already in the page cache: copying it here costs a few
                    // microseconds, less than the trip to the blocking pool (which cost
                    // HTTP/2 blobs 2.5 times the CPU per byte).
                    read_at(&file, pos, len)?
                } else {
                    tokio::task::spawn_blocking(move || read_at(&file, pos, len))
                        .await
                        .map_err(io::Error::other)??
                }
            }
        };
        st.pos += chunk.len() as u64;
        Ok(Some((chunk, st)))
    }))
}

/// Reads `file[pos..pos + len]` into fresh, uninitialised memory. `FileExt::read_at` needs an
/// initialised buffer, and zeroing one per chunk cost a quarter of the CPU of serving a hit.
fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let filled = buf.len();
        let offset = libc::off_t::try_from(pos + filled as u64).map_err(io::Error::other)?;
        // SAFETY: the destination is the vector's spare capacity, `len - filled` bytes that it
        // owns; pread writes at most that many and reports how many it wrote, and only those
        // are added to the vector's length.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(filled).cast(),
                len - filled,
                offset,
            )
        };
        match n {
            n if n > 0 => unsafe { buf.set_len(filled + n as usize) },
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cached file is shorter than expected",
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(Bytes::from(buf))
}

type OnEnd = Box<dyn FnOnce(u64, bool) + Send>;

/// A body that reports, when it ends or is dropped, how many bytes it sent and whether it
/// reached its end: the hook for request logs, byte counters and waiter gauges.
pub struct Observed {
    inner: Body,
    bytes: u64,
    complete: bool,
    on_end: Option<OnEnd>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(
                self.bytes,
                self.complete || http_body::Body::is_end_stream(&self.inner),
            );
        }
    }
}

pub fn observe(inner: Body, on_end: impl FnOnce(u64, bool) + Send + 'static) -> Body {
    Observed {
        inner,
        bytes: 0,
        complete: false,
        on_end: Some(Box::new(on_end)),
    }
    .boxed_unsync()
}

/// Keeps `guard` alive for as long as the body.
pub fn with_guard<G: Send + 'static>(inner: Body, guard: G) -> Body {
    observe(inner, move |_, _| drop(guard))
}

/// Counts the bytes sent to the client by where they came from.
pub fn count_served(
    inner: Body,
    metrics: Arc<crate::metrics::Metrics>,
    source: &'static str,
) -> Body {
    observe(inner, move |bytes, _| metrics.served(source, bytes))
}

/// Hashes a body that carries a whole blob, holding back its last chunk until the hash is
/// known: a mismatch turns into an error (a cut connection), so no client takes wrong bytes
/// as a complete blob.
pub fn verify(inner: Body, digest: crate::oci::Digest, len: u64) -> Body {
    use sha2::Digest as _;
    struct State {
        frames: http_body_util::BodyDataStream<Body>,
        hasher: sha2::Sha256,
        seen: u64,
        digest: crate::oci::Digest,
        len: u64,
    }
    let state = State {
        frames: inner.into_data_stream(),
        hasher: sha2::Sha256::new(),
        seen: 0,
        digest,
        len,
    };
    from_stream(stream::try_unfold(state, |mut st| async move {
        use futures_util::StreamExt;
        let Some(chunk) = st.frames.next().await.transpose()? else {
            return Ok(None);
        };
        st.hasher.update(&chunk);
        st.seen += chunk.len() as u64;
        if st.seen >= st.len {
            let actual =
                crate::oci::Digest::from_sha256(std::mem::take(&mut st.hasher).finalize().into());
            if st.seen != st.len || actual != st.digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("content does not match {}", st.digest),
                ));
            }
        }
        Ok(Some((chunk, st)))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn copy_only_file_bodies_come_in_small_copied_chunks() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let body = file_range(
            Arc::new(file),
            1000,
            bytes.len() as u64,
            None,
            Some(Sendfile::copy_only(32 * 1024)),
        );
        let mut frames = body.into_data_stream();
        let mut got = Vec::new();
        while let Some(chunk) = futures_util::StreamExt::next(&mut frames).await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= 32 * 1024, "{}", chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert!(got == bytes[1000..], "the copied bytes are the file's");
    }
}
