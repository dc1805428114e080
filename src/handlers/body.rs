//! Response bodies. Every body is a stream of chunks with bounded memory: a cached blob is read
//! in fixed-size chunks, an in-flight download is read behind its writer as its progress
//! allows. A body error makes hyper cut the connection, which is how a client learns
//! that bytes it received are not a complete blob.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{stream, TryStreamExt};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use tokio::sync::watch;

use crate::outcome::Source;
use crate::platform;
use crate::sendfile::{self, Sendfile};
use crate::store::handle::{BlobHandle, BlobRead, Progress};

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

/// Streams `blob[start..end)`. A blob still being written (or verified) is read only as far
/// as its writer has gone (the prefix, or a part written ahead of it), so a reader never sees
/// a byte before it is stored, and the last chunk of the whole blob waits for the writer's
/// verdict. With `sendfile`, chunks of a local file
/// whose pages are in the page cache go to the socket without a copy (see
/// [`crate::sendfile`]); the others are read through the handle (the blocking pool for files).
/// A connection that asks for smaller copied chunks ([`Sendfile::copy_chunk`], HTTP/2) gets
/// them, read in place when their pages are cached.
pub fn blob_range(blob: BlobHandle, start: u64, end: u64, sendfile: Option<Sendfile>) -> Body {
    struct State {
        reader: Arc<dyn BlobRead>,
        pos: u64,
        end: u64,
        progress: Option<watch::Receiver<Progress>>,
        sendfile: Option<Sendfile>,
        whole: bool,
    }
    let whole = start == 0 && end == blob.size();
    let (reader, progress) = blob.into_parts();
    let state = State {
        reader,
        pos: start,
        end,
        progress,
        sendfile,
        whole,
    };
    from_stream(stream::try_unfold(state, |mut st| async move {
        if st.pos >= st.end {
            return Ok(None);
        }
        let mut limit = st.end;
        if let Some(rx) = st.progress.as_mut() {
            let available = loop {
                let readable = {
                    let p = rx.borrow_and_update();
                    if let Progress::Failed(why) = &*p {
                        return Err(io::Error::other(why.clone()));
                    }
                    p.readable_from(st.pos)
                };
                if readable > st.pos {
                    break readable;
                }
                if rx.changed().await.is_err() {
                    // The writer vanished without a final state: treat as failed.
                    return Err(io::Error::other("download abandoned"));
                }
            };
            limit = limit.min(available);
        }
        let len = (limit - st.pos).min(sendfile::MAX_CHUNK as u64) as usize;
        if st.whole && st.pos + len as u64 >= st.end {
            // The last chunk of a whole blob waits for the writer's verdict, so a client never
            // completes a blob that turns out not to match its digest. A range is served as
            // soon as its bytes are written: a lazy-pulling client checks its chunks against
            // the digests of its own table of contents.
            if let Some(rx) = st.progress.as_mut() {
                let verdict = rx
                    .wait_for(|p| !matches!(p, Progress::Writing { .. }))
                    .await
                    .map(|p| p.clone());
                match verdict {
                    Ok(Progress::Complete) => {}
                    Ok(Progress::Failed(why)) => return Err(io::Error::other(why)),
                    _ => return Err(io::Error::other("download abandoned")),
                }
            }
        }
        let zero_copy = match (&st.sendfile, st.reader.file()) {
            (Some(sf), Some(file)) => sf.chunk(file, st.pos, len),
            _ => None,
        };
        let chunk = match zero_copy {
            Some(chunk) => chunk,
            None => {
                let most = st.sendfile.as_ref().and_then(Sendfile::copy_chunk);
                let len = len.min(most.unwrap_or(CHUNK));
                match st.reader.file() {
                    // A small chunk already in the page cache: copying it here costs a few
                    // microseconds, less than the trip to the blocking pool (which cost
                    // HTTP/2 blobs 2.5 times the CPU per byte).
                    Some(file) if most.is_some() && platform::is_resident(file, st.pos, len) => {
                        platform::read_at(file, st.pos, len)?
                    }
                    _ => st.reader.read_at(st.pos, len).await?,
                }
            }
        };
        st.pos += chunk.len() as u64;
        Ok(Some((chunk, st)))
    }))
}

type OnEnd = Box<dyn FnOnce(u64, bool) + Send>;

/// Told when the server asks a response body for a chunk (the last one is written) and when
/// the body hands one over: what the server's write timeout watches.
pub trait WriteWatch: Send + Sync {
    fn polled(&self);
    fn yielded(&self);
}

/// A body that reports, when it ends or is dropped, how many bytes it sent and whether it
/// reached its end: the hook for request logs, byte counters and waiter gauges.
pub struct Observed {
    inner: Body,
    bytes: u64,
    complete: bool,
    on_end: Option<OnEnd>,
    watch: Option<Arc<dyn WriteWatch>>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(w) = &self.watch {
            w.polled();
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    if let Some(w) = &self.watch {
                        w.yielded();
                    }
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
    observe_writes(inner, None, on_end)
}

/// [`observe`], also telling `watch` how the writing goes.
pub fn observe_writes(
    inner: Body,
    watch: Option<Arc<dyn WriteWatch>>,
    on_end: impl FnOnce(u64, bool) + Send + 'static,
) -> Body {
    Observed {
        inner,
        bytes: 0,
        complete: false,
        on_end: Some(Box::new(on_end)),
        watch,
    }
    .boxed_unsync()
}

/// Keeps `guard` alive for as long as the body.
pub fn with_guard<G: Send + 'static>(inner: Body, guard: G) -> Body {
    observe(inner, move |_, _| drop(guard))
}

/// Counts the bytes sent to the client by where they came from.
pub fn count_served(inner: Body, metrics: Arc<crate::metrics::Metrics>, source: Source) -> Body {
    observe(inner, move |bytes, _| metrics.served(source, bytes))
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
        let blob = BlobHandle::complete(
            Arc::new(crate::store::handle::LocalFile(Arc::new(file))),
            bytes.len() as u64,
            true,
        );
        let body = blob_range(
            blob,
            1000,
            bytes.len() as u64,
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
