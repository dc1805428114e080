//! Log output. Every request writes an access line, so a line must cost the request neither a
//! syscall nor a wake-up of another thread: lines are appended to a shared buffer, and a
//! background thread writes the buffer out in one syscall every [`FLUSH_EVERY`], or sooner once
//! it holds [`FLUSH_AT`] bytes. If the output stalls (a blocked pipe), lines beyond
//! [`MAX_BUFFERED`] are dropped and counted rather than held in memory.
//!
//! Access lines skip tracing's generic field formatting, which cost a quarter of the server's
//! CPU per small request: [`access`] writes them straight into the buffer, in the same shape
//! as tracing's own text or JSON lines. `PULLTHROUGH_LOG` still decides whether they are written.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

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
        crate::sync::lock(&self.buf)
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
                buf = crate::sync::wait_timeout(&shared.wake, buf, FLUSH_EVERY);
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

impl BatchWriter {
    fn push(&self, line: &[u8]) {
        let mut buf = self.shared.lock();
        if buf.len() + line.len() > MAX_BUFFERED {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was = buf.len();
        buf.extend_from_slice(line);
        // Only the line that crosses the mark wakes the drain thread: a wake-up is a syscall,
        // and lines keep arriving until that thread gets a CPU.
        if was < FLUSH_AT && buf.len() >= FLUSH_AT {
            self.shared.wake.notify_one();
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.push(line);
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
/// `info`) picks what is logged, `format` how; with `traces` (from [`crate::trace::layer`]),
/// trace spans are exported beside, and never logged. Keep the guard until exit.
pub fn init(
    format: LogFormat,
    traces: Option<Box<dyn Layer<Registry> + Send + Sync>>,
) -> io::Result<FlushGuard> {
    let (writer, guard) = BatchWriter::new(io::stderr())?;
    // A second `init` (there is none outside tests) keeps the first destination.
    let _ = ACCESS_OUT.set((writer.clone(), format));
    let filter =
        EnvFilter::try_from_env("PULLTHROUGH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let Some(traces) = traces else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(writer);
        match format {
            LogFormat::Json => builder.json().init(),
            LogFormat::Text => builder.init(),
        }
        return Ok(guard);
    };
    // Per-layer filters, since the trace layer wants spans the log filter would drop.
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let log = match format {
        LogFormat::Json => log.json().boxed(),
        LogFormat::Text => log.boxed(),
    };
    let not_traces = filter_fn(|m| m.target() != crate::trace::TARGET);
    tracing_subscriber::registry()
        .with(vec![
            traces,
            log.with_filter(filter.and(not_traces)).boxed(),
        ])
        .init();
    Ok(guard)
}

/// Where [`access`] writes, once [`init`] has run.
static ACCESS_OUT: OnceLock<(BatchWriter, LogFormat)> = OnceLock::new();

/// One request's access line.
pub struct AccessLine<'a> {
    /// The connection's peer.
    pub peer: SocketAddr,
    /// The client: the peer, or the address a trusted proxy forwarded for.
    pub client: IpAddr,
    pub request_id: &'a str,
    pub method: &'a str,
    /// The configured upstream the request went to, or "-".
    pub registry: &'a str,
    /// As the client named it, or "".
    pub repository: &'a str,
    /// The tag or digest, or "".
    pub reference: &'a str,
    pub kind: &'static str,
    pub status: u16,
    /// Body bytes handed to the connection.
    pub bytes: u64,
    /// Whether the whole body went out.
    pub complete: bool,
    /// `X-Cache`, or "-".
    pub cache: &'static str,
    pub elapsed: Duration,
    /// Time spent waiting on the upstream; zero for hits.
    pub upstream: Duration,
    /// `User-Agent`, or "".
    pub user_agent: &'a str,
}

/// A `User-Agent` as the access line shows it: text (invalid UTF-8 replaced), at most 256
/// characters, empty when there was none.
pub fn user_agent(value: Option<&http::HeaderValue>) -> std::borrow::Cow<'_, str> {
    let Some(value) = value else {
        return "".into();
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    match text.char_indices().nth(256) {
        None => text,
        Some((end, _)) => text[..end].to_owned().into(),
    }
}

/// Milliseconds to the microsecond. The text line formats it with integers (float formatting
/// was a visible part of a line's cost); JSON takes the float, free of noise (2.263, not
/// 2.2630000000000003).
struct Millis(Duration);

impl Millis {
    fn as_f64(&self) -> f64 {
        self.0.as_micros() as f64 / 1e3
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.as_micros();
        write!(f, "{}.{:03}", micros / 1000, micros % 1000)
    }
}

/// The fields as tracing's text format writes them.
impl fmt::Display for AccessLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer={} client={} request_id={} method={} registry={} repository={} reference={} \
             kind=\"{}\" status={} bytes={} complete={} cache={} ms={} upstream_ms={} user_agent={:?}",
            self.peer,
            self.client,
            self.request_id,
            self.method,
            self.registry,
            self.repository,
            self.reference,
            self.kind,
            self.status,
            self.bytes,
            self.complete,
            self.cache,
            Millis(self.elapsed),
            Millis(self.upstream),
            self.user_agent,
        )
    }
}

/// The line as tracing's JSON format writes it.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    timestamp: &'a str,
    level: &'static str,
    fields: JsonFields<'a>,
    target: &'static str,
}

#[derive(serde::Serialize)]
struct JsonFields<'a> {
    message: &'static str,
    peer: SocketAddr,
    client: IpAddr,
    request_id: &'a str,
    method: &'a str,
    registry: &'a str,
    repository: &'a str,
    reference: &'a str,
    kind: &'static str,
    status: u16,
    bytes: u64,
    complete: bool,
    cache: &'static str,
    ms: f64,
    upstream_ms: f64,
    user_agent: &'a str,
}

const ACCESS_TARGET: &str = "pullthrough::access";

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Logs one request, if `PULLTHROUGH_LOG` lets `pullthrough::access` through at `info`.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        return;
    }
    let Some((out, format)) = ACCESS_OUT.get() else {
        // A subscriber installed by an embedding program rather than by `init`.
        tracing::info!(target: ACCESS_TARGET, "request {line}");
        return;
    };
    LINE.with_borrow_mut(|buf| {
        buf.clear();
        write_line(buf, *format, SystemTime::now(), line);
        out.push(buf);
    });
}

fn write_line(buf: &mut Vec<u8>, format: LogFormat, now: SystemTime, line: &AccessLine<'_>) {
    // Writing into a Vec cannot fail.
    let _ = match format {
        LogFormat::Text => {
            text_line(buf, now, line);
            Ok(())
        }
        LogFormat::Json => {
            let timestamp = humantime::format_rfc3339_micros(now);
            let json = JsonLine {
                timestamp: &timestamp.to_string(),
                level: "INFO",
                fields: JsonFields {
                    message: "request",
                    peer: line.peer,
                    client: line.client,
                    request_id: line.request_id,
                    method: line.method,
                    registry: line.registry,
                    repository: line.repository,
                    reference: line.reference,
                    kind: line.kind,
                    status: line.status,
                    bytes: line.bytes,
                    complete: line.complete,
                    cache: line.cache,
                    ms: Millis(line.elapsed).as_f64(),
                    upstream_ms: Millis(line.upstream).as_f64(),
                    user_agent: line.user_agent,
                },
                target: ACCESS_TARGET,
            };
            serde_json::to_writer(&mut *buf, &json)
                .map_err(io::Error::from)
                .and_then(|()| buf.write_all(b"\n"))
        }
    };
}

/// The text line, byte for byte what `{timestamp}  INFO {ACCESS_TARGET}: request {line}` formats
/// (the test `the_text_line_is_the_display_format` holds the two together), written without
/// the formatting machinery, which was most of a cached manifest's access line: numbers with
/// `itoa`, the timestamp's date and second kept per thread until the second changes.
fn text_line(buf: &mut Vec<u8>, now: SystemTime, line: &AccessLine<'_>) {
    timestamp(buf, now);
    buf.extend_from_slice(b"  INFO ");
    buf.extend_from_slice(ACCESS_TARGET.as_bytes());
    buf.extend_from_slice(b": request peer=");
    socket_addr(buf, line.peer);
    buf.extend_from_slice(b" client=");
    ip_addr(buf, line.client);
    let mut int = itoa::Buffer::new();
    for (name, value) in [
        (&b" request_id="[..], line.request_id),
        (b" method=", line.method),
        (b" registry=", line.registry),
        (b" repository=", line.repository),
        (b" reference=", line.reference),
        (b" kind=\"", line.kind),
        (b"\" status=", int.format(line.status)),
    ] {
        buf.extend_from_slice(name);
        buf.extend_from_slice(value.as_bytes());
    }
    buf.extend_from_slice(b" bytes=");
    buf.extend_from_slice(int.format(line.bytes).as_bytes());
    buf.extend_from_slice(if line.complete {
        b" complete=true cache="
    } else {
        b" complete=false cache="
    });
    buf.extend_from_slice(line.cache.as_bytes());
    buf.extend_from_slice(b" ms=");
    millis(buf, line.elapsed);
    buf.extend_from_slice(b" upstream_ms=");
    millis(buf, line.upstream);
    buf.extend_from_slice(b" user_agent=");
    let ua = line.user_agent;
    if ua
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        buf.push(b'"');
        buf.extend_from_slice(ua.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{ua:?}");
    }
    buf.push(b'\n');
}

thread_local! {
    /// The second of the last timestamp written on this thread, and its text up to the dot.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// RFC 3339 in UTC to the microsecond, as `humantime::format_rfc3339_micros` writes it.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            use std::fmt::Write as _;
            text.clear();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            // `…:SS` then `Z`: the fraction goes between.
            text.pop();
            text.push('.');
            *second = secs;
        }
        buf.extend_from_slice(text.as_bytes());
    });
    let mut digits = [b'0'; 6];
    let mut int = itoa::Buffer::new();
    let micros = int.format(since.subsec_micros()).as_bytes();
    digits[6 - micros.len()..].copy_from_slice(micros);
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

/// [`Millis`]'s format: whole milliseconds, a dot, three digits.
fn millis(buf: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    let mut int = itoa::Buffer::new();
    buf.extend_from_slice(int.format(micros / 1000).as_bytes());
    buf.push(b'.');
    let frac = (micros % 1000) as u16;
    buf.extend_from_slice(&[
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn socket_addr(buf: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            ip_addr(buf, IpAddr::V4(*v4.ip()));
            buf.push(b':');
            buf.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
        }
        SocketAddr::V6(_) => {
            let _ = write!(buf, "{addr}");
        }
    }
}

fn ip_addr(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut int = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                buf.extend_from_slice(int.format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(buf, "{ip}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_line_is_the_display_format() {
        let line = |peer: &str, client: &str, ua: &'static str, ms: u64| AccessLine {
            peer: peer.parse().unwrap(),
            client: client.parse().unwrap(),
            request_id: "0123456789abcdef",
            method: "GET",
            registry: "docker.io",
            repository: "library/alpine",
            reference: "sha256:0000",
            kind: "manifest",
            status: 200,
            bytes: 709,
            complete: ms % 2 == 0,
            cache: "HIT",
            elapsed: Duration::from_micros(ms),
            upstream: Duration::from_micros(ms / 7),
            user_agent: ua,
        };
        let cases = [
            line("127.0.0.1:38958", "127.0.0.1", "curl/7.88.1", 1281),
            line("10.0.0.255:1", "192.168.1.2", "", 0),
            line("[::1]:8080", "::ffff:10.1.2.3", "quo\"te \\ tab\t", 999_999),
            line(
                "[fe80::1%2]:1",
                "2001:db8::1",
                "ünïcode\u{7f}",
                12_345_678_901,
            ),
        ];
        let times = [
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH + Duration::new(1_796_683_685, 269_545_000),
            SystemTime::UNIX_EPOCH + Duration::new(1_796_683_685, 7_000),
            SystemTime::UNIX_EPOCH + Duration::new(1_796_683_686, 999_999_999),
        ];
        for (line, now) in cases.iter().zip(times) {
            let mut fast = Vec::new();
            text_line(&mut fast, now, line);
            let timestamp = humantime::format_rfc3339_micros(now);
            let slow = format!("{timestamp}  INFO {ACCESS_TARGET}: request {line}\n");
            assert_eq!(String::from_utf8(fast).unwrap(), slow);
        }
    }

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

    fn sample() -> AccessLine<'static> {
        AccessLine {
            peer: "127.0.0.1:44414".parse().unwrap(),
            client: "192.0.2.7".parse().unwrap(),
            request_id: "5f0c2a1e00000001",
            method: "GET",
            registry: "docker.io",
            repository: "library/bench",
            reference: "latest",
            kind: "manifest",
            status: 200,
            bytes: 709,
            complete: true,
            cache: "MISS",
            elapsed: Duration::from_nanos(2_263_456),
            upstream: Duration::from_micros(1_500),
            user_agent: "containerd/2.0 \"x\"",
        }
    }

    #[test]
    fn text_access_line_has_the_shape_of_a_tracing_line() {
        let at = std::time::UNIX_EPOCH + Duration::from_micros(1_795_537_497_056_447);
        let mut buf = Vec::new();
        write_line(&mut buf, LogFormat::Text, at, &sample());
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "2026-11-24T16:24:57.056447Z  INFO pullthrough::access: request peer=127.0.0.1:44414 \
             client=192.0.2.7 request_id=5f0c2a1e00000001 method=GET registry=docker.io \
             repository=library/bench reference=latest kind=\"manifest\" status=200 bytes=709 \
             complete=true cache=MISS ms=2.263 upstream_ms=1.500 \
             user_agent=\"containerd/2.0 \\\"x\\\"\"\n"
        );
    }

    #[test]
    fn json_access_line_has_the_shape_of_a_tracing_json_line() {
        let mut buf = Vec::new();
        write_line(&mut buf, LogFormat::Json, std::time::UNIX_EPOCH, &sample());
        assert_eq!(buf.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "pullthrough::access");
        let f = &v["fields"];
        assert_eq!(f["message"], "request");
        assert_eq!(f["peer"], "127.0.0.1:44414");
        assert_eq!(f["client"], "192.0.2.7");
        assert_eq!(f["request_id"], "5f0c2a1e00000001");
        assert_eq!(f["registry"], "docker.io");
        assert_eq!(f["repository"], "library/bench");
        assert_eq!(f["reference"], "latest");
        assert_eq!(f["status"], 200);
        assert_eq!(f["bytes"], 709);
        assert_eq!(f["complete"], true);
        assert_eq!(f["cache"], "MISS");
        assert_eq!(f["ms"], 2.263);
        assert_eq!(f["upstream_ms"], 1.5);
        assert_eq!(f["user_agent"], "containerd/2.0 \"x\"");
    }
}
