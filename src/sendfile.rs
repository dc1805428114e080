//! Zero-copy file bodies for plain-TCP HTTP/1.x connections.
//!
//! hyper owns the socket and writes bodies from memory, so a cached blob would be copied from
//! the page cache into a buffer and from there into the socket. Here a body instead yields a
//! *placeholder* chunk (a slice of a static region nobody reads) and queues the file range it
//! stands for on its connection; the connection's writer recognises placeholder slices by
//! address and sends the queued range with `sendfile(2)` in their place. hyper still frames
//! the response and counts `Content-Length`; the bytes go from the page cache to the socket.
//!
//! This relies on hyper passing body chunks to `poll_write_vectored` as they are (its queue
//! write strategy, which `server` forces with `writev(true)`), never copying them; HTTP/2 and
//! TLS connections copy, so they never get a [`Sendfile`] that hands out placeholders. A
//! placeholder that arrives with no range queued cuts the connection instead of sending zeros.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::platform;

/// The most one placeholder chunk stands for. Kept at 1 MiB so that the byte counts taken
/// when a chunk is produced (logs, metrics) run at most that far ahead of the socket.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Never read: only its addresses matter. Zero-initialised, so it costs no resident memory.
static PLACEHOLDER: [u8; MAX_CHUNK] = [0; MAX_CHUNK];

fn is_placeholder(slice: &[u8]) -> bool {
    let base = PLACEHOLDER.as_ptr() as usize;
    let p = slice.as_ptr() as usize;
    !slice.is_empty() && p >= base && p + slice.len() <= base + MAX_CHUNK
}

/// A file range whose bytes are owed to the socket.
struct Region {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

/// One connection's queue of ranges, shared by its response bodies (which add) and its writer
/// (which sends). Bodies and writer run in the connection's task, so the lock is uncontended.
///
/// An HTTP/2 stream instead gets a [`Sendfile::copy_only`]: no placeholders ever, only a
/// smaller read size for copied file chunks, and no queue (so making one allocates nothing).
#[derive(Clone)]
pub struct Sendfile {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Queue(Arc<Mutex<VecDeque<Region>>>),
    CopyOnly(usize),
}

impl Sendfile {
    /// For a connection that copies every body chunk (HTTP/2 copies them into its frames):
    /// never a placeholder, and file bodies read in chunks of at most `chunk` bytes, so that
    /// what a stream holds stays near its send buffer (see `server`).
    pub fn copy_only(chunk: usize) -> Sendfile {
        Sendfile {
            mode: Mode::CopyOnly(chunk.max(1)),
        }
    }

    /// The most a copied file chunk should hold on this connection, when it wants less than
    /// the default.
    pub fn copy_chunk(&self) -> Option<usize> {
        match self.mode {
            Mode::CopyOnly(chunk) => Some(chunk),
            Mode::Queue(_) => None,
        }
    }

    /// A placeholder chunk for `file[offset..offset + len]`, or `None` when those pages are not
    /// all in the page cache: `sendfile` would then wait for the disk on an async worker, so
    /// the caller reads them on the blocking pool instead. Always `None` when copy-only.
    pub fn chunk(&self, file: &Arc<File>, offset: u64, len: usize) -> Option<Bytes> {
        let len = len.min(MAX_CHUNK);
        let Mode::Queue(pending) = &self.mode else {
            return None;
        };
        if len == 0 || !platform::is_resident(file, offset, len) {
            return None;
        }
        crate::sync::lock(pending).push_back(Region {
            file: file.clone(),
            offset,
            len,
        });
        Some(Bytes::from_static(&PLACEHOLDER[..len]))
    }
}

/// A TCP connection whose writer sends placeholder slices as file ranges.
pub struct Connection {
    tcp: TcpStream,
    pending: Arc<Mutex<VecDeque<Region>>>,
}

impl Connection {
    pub fn new(tcp: TcpStream) -> (Connection, Sendfile) {
        let pending = Arc::<Mutex<VecDeque<Region>>>::default();
        let sendfile = Sendfile {
            mode: Mode::Queue(pending.clone()),
        };
        (Connection { tcp, pending }, sendfile)
    }

    /// Sends up to `want` bytes of the oldest queued range.
    fn poll_send_file(&self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut pending = crate::sync::lock(&self.pending);
            let Some(region) = pending.front_mut() else {
                return Poll::Ready(Err(io::Error::other(
                    "placeholder chunk without a file range",
                )));
            };
            let count = want.min(region.len);
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                platform::send_file(&self.tcp, &region.file, region.offset, count)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cached file is shorter than expected",
                    )))
                }
                Ok(n) => {
                    region.offset += n as u64;
                    region.len -= n;
                    if region.len == 0 {
                        pending.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// `writev` with `MSG_MORE`: more data follows at once.
    fn poll_write_more(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self
                .tcp
                .try_io(Interest::WRITABLE, || platform::send_more(&self.tcp, bufs))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Writes runs of ordinary slices with `writev` and each placeholder slice with
    /// `sendfile`, in order, stopping at the first short write.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut written = 0;
        let mut i = 0;
        while i < bufs.len() {
            let next_placeholder = bufs[i..]
                .iter()
                .position(|b| is_placeholder(b))
                .map_or(bufs.len(), |p| i + p);
            let (step, want, next) = if next_placeholder == i {
                let want = bufs[i].len();
                (this.poll_send_file(cx, want), want, i + 1)
            } else {
                let run = &bufs[i..next_placeholder];
                let want = run.iter().map(|b| b.len()).sum();
                let step = if next_placeholder < bufs.len() {
                    // Response headers followed by file bytes: let the kernel pack them into
                    // the same segments instead of pushing the headers out alone.
                    this.poll_write_more(cx, run)
                } else {
                    Pin::new(&mut this.tcp).poll_write_vectored(cx, run)
                };
                (step, want, next_placeholder)
            };
            match step {
                Poll::Ready(Ok(n)) => {
                    written += n;
                    if n < want {
                        break;
                    }
                    i = next;
                }
                // Bytes already written must be reported; the error or the wait comes back on
                // the next call.
                Poll::Ready(Err(_)) | Poll::Pending if written > 0 => break,
                other => return other,
            }
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use std::io::Write;
    use tokio::io::AsyncReadExt;

    /// A connected pair with small socket buffers, so that big writes come back short.
    async fn pair() -> (Connection, Sendfile, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(16 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(8).unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(16 * 1024).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (conn, sendfile) = Connection::new(server);
        (conn, sendfile, client)
    }

    /// Writes the chunks as hyper's queue strategy does: vectored, advancing on short writes.
    /// Returns how many writes it took.
    async fn write_all(conn: &mut Connection, mut chunks: Vec<Bytes>) -> io::Result<usize> {
        let mut writes = 0;
        while chunks.iter().any(|c| c.has_remaining()) {
            let n = std::future::poll_fn(|cx| {
                let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
                Pin::new(&mut *conn).poll_write_vectored(cx, &slices)
            })
            .await?;
            writes += 1;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut left = n;
            for c in chunks.iter_mut() {
                let k = left.min(c.remaining());
                c.advance(k);
                left -= k;
            }
        }
        Ok(writes)
    }

    #[tokio::test]
    async fn placeholders_become_file_bytes_in_order_across_short_writes() {
        let data: Vec<u8> = (0..3 * MAX_CHUNK as u32)
            .map(|i| (i * 7 + i / 4093) as u8)
            .collect();
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&data).unwrap();
        let file = Arc::new(tmp);
        let (mut conn, sendfile, mut client) = pair().await;

        let first = sendfile
            .chunk(&file, 100, MAX_CHUNK)
            .expect("just written: resident");
        let second = sendfile
            .chunk(&file, 2 * MAX_CHUNK as u64, MAX_CHUNK)
            .unwrap();
        let chunks = vec![
            Bytes::from_static(b"head"),
            first,
            Bytes::from_static(b"middle"),
            second,
            Bytes::from_static(b"tail"),
        ];
        // The reader starts late, so the socket fills and writes come back short.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let writes = write_all(&mut conn, chunks).await.unwrap();
        drop(conn);
        assert!(writes > 5, "expected short writes, took {writes}");

        let mut expected = b"head".to_vec();
        expected.extend_from_slice(&data[100..100 + MAX_CHUNK]);
        expected.extend_from_slice(b"middle");
        expected.extend_from_slice(&data[2 * MAX_CHUNK..]);
        expected.extend_from_slice(b"tail");
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ from the file's");
    }

    #[tokio::test]
    async fn a_placeholder_without_a_queued_range_is_an_error_not_zeros() {
        let (mut conn, _sendfile, _client) = pair().await;
        let stray = Bytes::from_static(&PLACEHOLDER[..10]);
        assert!(write_all(&mut conn, vec![stray]).await.is_err());
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_range_cuts_the_response() {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&[1u8; 8192]).unwrap();
        let file = Arc::new(tmp);
        let (mut conn, sendfile, _client) = pair().await;
        let chunk = sendfile.chunk(&file, 0, 8192).unwrap();
        file.set_len(4096).unwrap();
        let err = write_all(&mut conn, vec![chunk]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
