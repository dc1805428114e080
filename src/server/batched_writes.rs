//! Batches an HTTP/2 connection's small writes into one TLS record and one `writev`.
//!
//! hyper runs each HTTP/2 stream in its own task, and each finished response wakes the
//! connection, which writes and flushes it at once: with 8 streams in flight, a cached manifest
//! cost one TLS record and one system call per response, a third of the server's CPU. Here a
//! flush with small writes buffered first yields to the runtime once, so the other streams'
//! responses, already runnable, join the same record; the next flush sends them all. Large
//! writes (blob data) go straight through, with whatever is buffered in front of them.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes smaller than this, taken together, are buffered: one TLS record's worth.
const BATCH: usize = 16 * 1024;

pub struct BatchedWrites<I> {
    inner: I,
    buf: Vec<u8>,
    /// Bytes of `buf` the inner writer has taken.
    sent: usize,
    /// The flush has yielded once for what is in `buf`.
    yielded: bool,
}

impl<I> BatchedWrites<I> {
    pub fn new(inner: I) -> BatchedWrites<I> {
        BatchedWrites {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<I: AsyncWrite + Unpin> BatchedWrites<I> {
    /// Writes out `buf` and then as much of `data` as the inner writer takes; returns how much
    /// of `data` it took (nothing until `buf` is out).
    fn poll_send(&mut self, cx: &mut Context<'_>, data: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            let pending = self.buf.len() - self.sent;
            let n = if pending == 0 {
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, data))?
            } else {
                let mut slices = Vec::with_capacity(data.len() + 1);
                slices.push(IoSlice::new(&self.buf[self.sent..]));
                slices.extend(data.iter().map(|d| IoSlice::new(d)));
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?
            };
            if n == 0 && (pending > 0 || data.iter().any(|d| !d.is_empty())) {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < pending {
                self.sent += n;
                continue;
            }
            self.buf.clear();
            self.sent = 0;
            return Poll::Ready(Ok(n - pending));
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() {
            ready!(self.poll_send(cx, &[]))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_all(
        &mut self,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = data.iter().map(|d| d.len()).sum();
        if self.buf.len() + len <= BATCH {
            for d in data {
                self.buf.extend_from_slice(d);
            }
            return Poll::Ready(Ok(len));
        }
        self.poll_send(cx, data)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for BatchedWrites<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_all(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_all(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.len() > this.sent && !this.yielded {
            // Back of the run queue: the streams woken meanwhile run first and add theirs.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    /// Takes at most `per_call` bytes a call and counts its calls.
    #[derive(Default)]
    struct Sink {
        bytes: Vec<u8>,
        calls: usize,
        per_call: usize,
        flushes: usize,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(d)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let mut room = this.per_call;
            for d in data {
                let n = d.len().min(room);
                this.bytes.extend_from_slice(&d[..n]);
                room -= n;
            }
            Poll::Ready(Ok(this.per_call - room))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn writer(per_call: usize) -> (BatchedWrites<Sink>, Arc<Wakes>) {
        let sink = Sink {
            per_call,
            ..Sink::default()
        };
        (BatchedWrites::new(sink), Arc::new(Wakes::default()))
    }

    fn write(w: &mut BatchedWrites<Sink>, cx: &mut Context<'_>, data: &[u8]) -> usize {
        match Pin::new(w).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("write: {other:?}"),
        }
    }

    #[test]
    fn small_writes_leave_in_one_call_after_the_flush_yields_once() {
        let (mut w, wakes) = writer(usize::MAX);
        let waker = wakes.clone().into();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(write(&mut w, &mut cx, b"first "), 6);
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the yield wakes itself");
        assert_eq!(write(&mut w, &mut cx, b"second"), 6);
        assert_eq!(w.inner.calls, 0);
        assert!(matches!(
            Pin::new(&mut w).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!((w.inner.calls, w.inner.flushes), (1, 1));
        assert_eq!(w.inner.bytes, b"first second");
        // Nothing buffered: a flush goes straight through.
        assert!(matches!(
            Pin::new(&mut w).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!((w.inner.calls, w.inner.flushes), (1, 2));
    }

    #[test]
    fn a_large_write_goes_through_behind_what_is_buffered() {
        let (mut w, wakes) = writer(usize::MAX);
        let waker = wakes.into();
        let mut cx = Context::from_waker(&waker);
        let large: Vec<u8> = (0..BATCH + 7).map(|i| i as u8).collect();
        write(&mut w, &mut cx, b"head");
        assert_eq!(write(&mut w, &mut cx, &large), large.len());
        assert_eq!(w.inner.calls, 1);
        assert_eq!(&w.inner.bytes[..4], b"head");
        assert_eq!(&w.inner.bytes[4..], &large[..]);
        assert!(w.buf.is_empty());
    }

    #[test]
    fn an_inner_writer_that_takes_a_little_at_a_time_gets_every_byte_in_order() {
        let (mut w, wakes) = writer(5);
        let waker = wakes.into();
        let mut cx = Context::from_waker(&waker);
        let mut expected = Vec::new();
        for i in 0..40u8 {
            let chunk = vec![i; 1 + (i as usize * 997) % (2 * BATCH)];
            let mut at = 0;
            while at < chunk.len() {
                at += write(&mut w, &mut cx, &chunk[at..]);
            }
            expected.extend_from_slice(&chunk);
        }
        let _ = Pin::new(&mut w).poll_flush(&mut cx);
        assert!(matches!(
            Pin::new(&mut w).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(w.inner.bytes, expected);
    }

    #[test]
    fn shutdown_sends_what_is_buffered() {
        let (mut w, wakes) = writer(usize::MAX);
        let waker = wakes.into();
        let mut cx = Context::from_waker(&waker);
        write(&mut w, &mut cx, b"goaway");
        assert!(matches!(
            Pin::new(&mut w).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(w.inner.bytes, b"goaway");
    }
}
