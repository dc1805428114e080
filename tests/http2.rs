//! What a client cannot do to the mirror over HTTP/2 (cleartext, prior knowledge) or by
//! holding connections: grow its memory by not reading, keep half-open connections for ever,
//! take more than its share of connections, or hold shutdown with a half-sent request.

#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::upstream::sha256;
use common::{FakeUpstream, TestMirror};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The tests here measure the whole process's memory and time connections; running them one at
/// a time keeps one test's allocations out of another's numbers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest flow-control window HTTP/2 allows.
const HUGE_WINDOW: u32 = (1 << 31) - 1;

fn addr(m: &TestMirror) -> String {
    m.url.trim_start_matches("http://").to_owned()
}

/// Resident memory of this process (client and server alike), in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    pages * page
}

/// An HTTP/2 connection whose client asks for `path` on `streams` streams, with flow-control
/// windows as large as allowed, and never reads the answers; held until dropped.
struct NeverReading {
    _send: h2::client::SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
    _responses: Vec<h2::client::ResponseFuture>,
}

impl Drop for NeverReading {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn never_reading(m: &TestMirror, path: &str, streams: usize) -> NeverReading {
    let tcp = TcpStream::connect(addr(m)).await.unwrap();
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(HUGE_WINDOW)
        .initial_connection_window_size(HUGE_WINDOW)
        .handshake::<_, Bytes>(NeverReads(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut responses = Vec::new();
    for _ in 0..streams {
        let req = http::Request::get(format!("{}{path}", m.url))
            .body(())
            .unwrap();
        send = send.ready().await.unwrap();
        let (response, _) = send.send_request(req, true).unwrap();
        responses.push(response);
    }
    NeverReading {
        _send: send,
        driver,
        _responses: responses,
    }
}

/// A connection whose client never reads what the server sends: its writes go out, its reads
/// never complete, so everything the server sends piles up in the kernel and then in the server.
struct NeverReads(TcpStream);

impl AsyncRead for NeverReads {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for NeverReads {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Fetches a blob over HTTP/1.1 so that it is cached, reading it in small pieces (a 64 MiB
/// buffer would stay in the allocator and blur the memory numbers).
async fn cache_blob(m: &TestMirror, path: &str) -> String {
    use sha2::Digest as _;
    let mut r = m.get(path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        hasher.update(&chunk);
    }
    common::wait_committed(m, path).await;
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_that_never_reads_cannot_grow_memory() {
    let _serial = SERIAL.lock().await;
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 100;
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/big", "v1", &[64 * 1024 * 1024]);
    let m = TestMirror::start(&up).await;
    let path = format!("/v2/library/big/blobs/{}", layers[0]);
    assert_eq!(cache_blob(&m, &path).await, layers[0]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss();

    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        held.push(never_reading(&m, &path, STREAMS).await);
    }
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss());
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "RSS growth with {CONNECTIONS} connections x {STREAMS} streams that never read: {:.1} MiB",
        growth as f64 / (1024.0 * 1024.0)
    );
    assert!(
        growth < 48 * 1024 * 1024,
        "RSS grew by {} MiB for {CONNECTIONS} connections that never read",
        growth / (1024 * 1024)
    );
    drop(held);
}

/// Reads until the server closes the connection; how long that took, or `None` if it did not
/// within `within`.
async fn closed_within(mut s: TcpStream, within: Duration) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// A 9-byte HTTP/2 frame header.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const END_STREAM: u8 = 0x1;

async fn mirror_with_header_timeout(up: &FakeUpstream, timeout: Duration) -> TestMirror {
    TestMirror::start_with(up, |c| c.server.header_read_timeout = timeout).await
}

/// Opens a connection, sends `bytes` and asserts that the server closes it within a few
/// header timeouts.
async fn assert_closed_after_sending(bytes: &[u8], what: &str) {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let m = mirror_with_header_timeout(&up, Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(addr(&m)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let took = closed_within(s, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "a connection that sent {what} was still open after 5 s (header_read_timeout 1 s)"
    );
    eprintln!("{what}: closed after {:?}", took.unwrap_or_default());
}

#[tokio::test]
async fn h2_connection_that_sends_half_the_preface_is_closed_at_the_header_timeout() {
    assert_closed_after_sending(&PREFACE[..12], "half the HTTP/2 preface").await;
}

#[tokio::test]
async fn h2_connection_that_sends_only_the_preface_is_closed_at_the_header_timeout() {
    assert_closed_after_sending(PREFACE, "the HTTP/2 preface magic and nothing else").await;
    let mut preface = PREFACE.to_vec();
    preface.extend(frame(SETTINGS, 0, 0, &[]));
    assert_closed_after_sending(&preface, "the HTTP/2 preface and SETTINGS").await;
}

#[tokio::test]
async fn h2_headers_without_end_headers_are_closed_at_the_header_timeout() {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    // `:method: GET` and `:scheme: http` from the static table, then no CONTINUATION.
    bytes.extend(frame(HEADERS, END_STREAM, 1, &[0x82, 0x86]));
    assert_closed_after_sending(&bytes, "HEADERS without END_HEADERS").await;
}

#[tokio::test]
async fn silent_connection_is_closed_at_the_header_timeout() {
    assert_closed_after_sending(&[], "nothing").await;
}

#[tokio::test]
async fn http1_half_a_request_head_is_closed_at_the_header_timeout() {
    assert_closed_after_sending(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", "half an HTTP/1.1 head").await;
    // The same after a whole request on the connection: the next head has the same limit.
    assert_closed_after_sending(
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n",
        "a request, then half a head",
    )
    .await;
}

#[tokio::test]
async fn idle_h2_client_is_sent_away_at_the_header_timeout() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let m = mirror_with_header_timeout(&up, Duration::from_secs(1)).await;
    let tcp = TcpStream::connect(addr(&m)).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, _) = send
        .send_request(
            http::Request::get(format!("{}/v2/", m.url))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let driver = tokio::spawn(conn);
    assert_eq!(response.await.unwrap().status(), 200);
    // A well-behaved client that answers pings but opens no stream is still sent away.
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection outlived 5 header timeouts"
    );
}

// Virtual time: the reader's pauses and the server's header timeout are tokio timers, so the
// stream provably spans the timeout, whatever the machine's speed.
#[tokio::test(start_paused = true)]
async fn h2_stream_in_progress_outlives_the_header_timeout() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[4 * 1024 * 1024]);
    let m = mirror_with_header_timeout(&up, Duration::from_secs(1)).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    cache_blob(&m, &path).await;

    let tcp = TcpStream::connect(addr(&m)).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (response, _) = send
        .send_request(
            http::Request::get(format!("{}{path}", m.url))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut got = Vec::new();
    let started = tokio::time::Instant::now();
    // 2.4 s of pauses in all (16 of 150 ms): longer than the header timeout, with no pause that
    // long. Were the timeout applied to a connection with a stream in flight, it would fire in
    // the middle and cut the body.
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        got.extend_from_slice(&chunk);
        body.flow_control().release_capacity(chunk.len()).unwrap();
        if got.len() % (256 * 1024) < chunk.len() {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the stream spanned two header timeouts: {:?}",
        started.elapsed()
    );
    assert_eq!(sha256(&got), layers[0]);
    driver.abort();
}

/// Sends one HTTP/1.1 request on a kept-alive connection and reads the response head.
async fn h1_request(s: &mut TcpStream) -> io::Result<String> {
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn connections_over_the_per_client_cap_are_closed_at_accept() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let m = TestMirror::start_with(&up, |c| c.server.max_connections_per_client = 3).await;
    let mut first = TcpStream::connect(addr(&m)).await.unwrap();
    let mut second = TcpStream::connect(addr(&m)).await.unwrap();
    assert!(h1_request(&mut first)
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert!(h1_request(&mut second)
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    // HTTP/2 connections count too.
    let tcp = TcpStream::connect(addr(&m)).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let h2_driver = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (response, _) = send
        .send_request(
            http::Request::get(format!("{}/v2/", m.url))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(response.await.unwrap().status(), 200);

    let mut over = TcpStream::connect(addr(&m)).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), h1_request(&mut over))
        .await
        .expect("the fourth connection was neither answered nor closed");
    let served = matches!(&answer, Ok(head) if !head.is_empty());
    assert!(
        !served,
        "a fourth connection from one address was served: {answer:?}"
    );

    // A closed connection frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = TcpStream::connect(addr(&m)).await.unwrap();
        if let Ok(head) = h1_request(&mut again).await {
            if head.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection kept its place"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = m.metrics().await;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pullthrough_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
    h2_driver.abort();
}

// Virtual time: the pause before the stop ends once the server has read what it was sent and
// is idle, and the stop's duration counts the timers it waited for (shutdown_grace is one).
#[tokio::test(start_paused = true)]
async fn shutdown_is_not_held_by_a_half_sent_request_header() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let m =
        TestMirror::start_with(&up, |c| c.server.shutdown_grace = Duration::from_secs(30)).await;
    let mut half = TcpStream::connect(addr(&m)).await.unwrap();
    half.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut half_h2 = TcpStream::connect(addr(&m)).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(HEADERS, END_STREAM, 1, &[0x82, 0x86]));
    half_h2.write_all(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = tokio::time::Instant::now();
    // `stop` gives up after 10 s: a shutdown held by the grace shows as 10 s here; a closing
    // connection's 1 s linger is allowed.
    m.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with a half-sent request open (shutdown_grace 30 s)"
    );
    assert!(closed_within(half, Duration::from_secs(1)).await.is_some());
    assert!(closed_within(half_h2, Duration::from_secs(1))
        .await
        .is_some());
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_h2_stream_finish() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[2 * 1024 * 1024]);
    up.behave(|b| b.hold_blob_after = Some(512 * 1024));
    let m = TestMirror::start(&up).await;
    let tcp = TcpStream::connect(addr(&m)).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (response, _) = send
        .send_request(
            http::Request::get(format!("{}/v2/library/app/blobs/{}", m.url, layers[0]))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let mut body = response.await.unwrap().into_body();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            got.extend_from_slice(&chunk);
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
        got
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(m.stop());
    // Held past the linger of idle connections: an in-flight stream is not one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    up.state.release.notify_one();
    let got = reader.await.unwrap();
    assert_eq!(sha256(&got), layers[0]);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    driver.abort();
}

/// The process-wide bound: connections that never read fill `server.response_buffer_budget`
/// and no more; a new stream is then reset with REFUSED_STREAM at once instead of buffered; the connections
/// holding the most are closed while it stays spent, after which streams are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_response_buffer_is_bounded_per_process() {
    let _serial = SERIAL.lock().await;
    const BUDGET: u64 = 8 * 1024 * 1024;
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 100;
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/big", "v1", &[4 * 1024 * 1024]);
    let m = TestMirror::start_with(&up, |c| {
        c.server.response_buffer_budget = bytesize::ByteSize::b(BUDGET);
    })
    .await;
    let path = format!("/v2/library/big/blobs/{}", layers[0]);
    assert_eq!(cache_blob(&m, &path).await, layers[0]);
    // The budget is a semaphore of bytes: what is charged never exceeds it, whatever the
    // chunk sizes (no slack).
    let buffered = |text: &str| common::metric(text, "pullthrough_response_buffer_bytes") as u64;
    assert_eq!(buffered(&m.metrics().await), 0);

    // Each connection asks for 100 x 4 MiB and reads nothing: 4.8 MiB of h2 buffers each once
    // the kernel's are full, 19 MiB in all, over twice the budget.
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        held.push(never_reading(&m, &path, STREAMS).await);
    }

    // A client that reads, on a connection of its own.
    let tcp = TcpStream::connect(addr(&m)).await.unwrap();
    let (reader, conn) = h2::client::handshake(tcp).await.unwrap();
    let reader_driver = tokio::spawn(conn);
    let ask = |reader: h2::client::SendRequest<Bytes>| {
        let url = format!("{}{path}", m.url);
        async move {
            let mut reader = reader.ready().await.unwrap();
            let req = http::Request::get(url).body(()).unwrap();
            let (response, _) = reader.send_request(req, true).unwrap();
            let started = Instant::now();
            let response = tokio::time::timeout(Duration::from_secs(10), response)
                .await
                .expect("an answer within 10 s");
            (response, started.elapsed())
        }
    };

    // The budget fills: a new stream is refused at once, and the connections' bytes stay
    // within the budget all along.
    let peak = std::cell::Cell::new(0);
    let refused = common::wait_for("a stream refused", Duration::from_secs(20), || {
        let (m, reader, peak) = (&m, reader.clone(), &peak);
        async move {
            let now = buffered(&m.metrics().await);
            assert!(now <= BUDGET, "{now} bytes buffered, over the budget");
            peak.set(peak.get().max(now));
            let (answer, took) = ask(reader).await;
            let reason = answer.err().and_then(|e| e.reason());
            (reason == Some(h2::Reason::REFUSED_STREAM)).then_some(took)
        }
    })
    .await;
    // Refused, not queued: the reset came while the budget was spent (a stream left to wait
    // would have answered within the probe's 10 s or not at all).
    let took = refused;
    // Spent, as the refusal said: all but a chunk's worth of it is held.
    let text = m.metrics().await;
    let peak = peak.get().max(buffered(&text));
    assert!(
        peak > BUDGET / 2,
        "the connections that never read held only {peak} bytes: the test did not fill the budget"
    );
    let text = m.metrics().await;
    assert!(buffered(&text) <= BUDGET);
    assert!(
        common::metric_sum(
            &text,
            "pullthrough_client_refusals_total",
            "response_buffer"
        ) >= 1.0,
        "{text}"
    );

    // While it stays spent, the connections holding the most are closed, one a second, until
    // what is left fits: then streams are answered again, in full.
    common::wait_for("a stream answered 200", Duration::from_secs(30), || {
        let (m, reader) = (&m, reader.clone());
        async move {
            let now = buffered(&m.metrics().await);
            assert!(now <= BUDGET, "{now} bytes buffered, over the budget");
            let response = match ask(reader).await {
                (Ok(response), _) if response.status() == 200 => response,
                _ => return None,
            };
            let mut body = response.into_body();
            let mut len = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                len += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Some(len)
        }
    })
    .await;
    let text = m.metrics().await;
    let shed = common::metric(&text, "pullthrough_connections_shed_total");
    eprintln!(
        "peak {peak} bytes buffered of {BUDGET}; refused in {took:?}; {shed} connections shed"
    );
    assert!(shed >= 1.0, "{text}");
    drop(held);
    reader_driver.abort();
}
