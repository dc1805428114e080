//! Log output. Every request writes an access line, so a line must cost the request neither a
//! syscall nor a wake-up of another thread: lines are appended to a shared buffer, and a
//! background thread writes the buffer out in one syscall every [`FLUSH_EVERY`], or sooner once
//! it holds [`FLUSH_AT`] bytes. If the output stalls (a blocked pipe), lines beyond
//! [`MAX_BUFFERED`] are dropped and counted rather than held in memory.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written out at once.
const FLUSH_AT: usize = 64 * 1024;
/// Beyond this, new lines are dropped until the output catches up.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    closed: AtomicBool,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands tracing a writer per line; see the module docs.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Writes out what is buffered when dropped (at exit).
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// A writer into `out`, drained by a background thread until the guard is dropped.
    pub fn new<W: Write + Send + 'static>(out: W) -> io::Result<(BatchWriter, FlushGuard)> {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let drain = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || drain_loop(&drain, out))?;
        Ok((
            BatchWriter {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

fn drain_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::with_capacity(FLUSH_AT);
    loop {
        let closed = {
            let mut buf = shared.lock();
            if buf.len() < FLUSH_AT && !shared.closed.load(Ordering::Acquire) {
                buf = shared
                    .wake
                    .wait_timeout(buf, FLUSH_EVERY)
                    .map(|(b, _)| b)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            // Swap buffers so writers never wait for the output.
            std::mem::swap(&mut *buf, &mut spare);
            shared.closed.load(Ordering::Acquire)
        };
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            spare.extend_from_slice(
                format!("pullthrough: log output stalled; {dropped} lines dropped\n").as_bytes(),
            );
        }
        if !spare.is_empty() {
            // Nowhere to report a failing log output; carry on.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            if spare.capacity() > 4 * FLUSH_AT {
                spare.shrink_to(FLUSH_AT);
            }
        }
        if closed {
            return;
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut buf = self.shared.lock();
        if buf.len() + line.len() > MAX_BUFFERED {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        buf.extend_from_slice(line);
        if buf.len() >= FLUSH_AT {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Installs the global subscriber writing to stderr: `PULLTHROUGH_LOG` (an `EnvFilter`, default
/// `info`) picks what is logged, `format` how. Keep the guard until exit.
pub fn init(format: LogFormat) -> io::Result<FlushGuard> {
    let (writer, guard) = BatchWriter::new(io::stderr())?;
    let filter =
        EnvFilter::try_from_env("PULLTHROUGH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_come_out_in_order_within_the_flush_interval_and_at_exit() {
        let sink = Sink::default();
        let (mut w, guard) = BatchWriter::new(sink.clone()).unwrap();
        w.write_all(b"one\n").unwrap();
        w.write_all(b"two\n").unwrap();
        std::thread::sleep(FLUSH_EVERY * 4);
        assert_eq!(&sink.0.lock().unwrap()[..], b"one\ntwo\n");
        w.write_all(b"three\n").unwrap();
        drop(guard);
        assert_eq!(&sink.0.lock().unwrap()[..], b"one\ntwo\nthree\n");
    }

    /// An output that blocks until released, like a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>, Sink);

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (released, cv) = &*self.0;
            let mut r = released.lock().unwrap();
            while !*r {
                r = cv.wait(r).unwrap();
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_instead_of_growing_or_blocking() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (mut w, guard) = BatchWriter::new(Stuck(gate.clone(), sink.clone())).unwrap();
        let line = [b'x'; 1023];
        for _ in 0..3 * MAX_BUFFERED / 1024 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
        }
        assert!(w.shared.lock().len() <= MAX_BUFFERED);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains("lines dropped"), "the loss is reported");
    }
}
