//! `server.write_timeout`: an HTTP/1.1 response whose client reads nothing is dropped with its
//! connection; one whose client reads slowly is not.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::time::Duration;

use common::{FakeUpstream, TestMirror};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_millis(800);

/// A socket that asks for `path` and returns before reading anything; the receive buffer is
/// kept small so that the server's writes block early.
async fn ask(m: &TestMirror, path: &str) -> TcpStream {
    let addr = m.url.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tcp
}

fn write_timeouts(text: &str) -> f64 {
    common::metric(text, "pullthrough_write_timeouts_total")
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_dropped_after_the_write_timeout_and_a_slow_reader_is_not() {
    let up = FakeUpstream::start().await;
    let (_, layers) = up.add_image("library/app", "v1", &[32 * MIB]);
    let m = TestMirror::start_with(&up, |c| c.server.write_timeout = WRITE_TIMEOUT).await;
    let path = format!("/v2/library/app/blobs/{}", layers[0]);
    let cached = m.get(&path).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(cached.len(), 32 * MIB);
    common::wait_committed(&m, &path).await;

    let mut stalled = ask(&m, &path).await;
    let mut slow = ask(&m, &path).await;
    // The slow reader takes 64 KiB every tenth of the timeout: far slower than the server
    // writes, never still for a whole timeout.
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0usize;
        loop {
            tokio::time::sleep(WRITE_TIMEOUT / 10).await;
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return read,
                Ok(n) => read += n,
            }
        }
    });

    common::wait_for("a write timeout", Duration::from_secs(20), || {
        let m = &m;
        async move { (write_timeouts(&m.metrics().await) >= 1.0).then_some(()) }
    })
    .await;
    // The stalled connection is gone: what the kernel buffered reads out, then the end.
    let mut drained = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => drained += n,
            Err(_) => panic!("the stalled connection was not closed ({drained} bytes drained)"),
        }
    }
    assert!(
        drained < 32 * MIB,
        "the whole blob went out: it was not stalled"
    );
    // Only the one that read nothing.
    assert!(!reader.is_finished(), "the slow reader was dropped");
    assert_eq!(write_timeouts(&m.metrics().await), 1.0);
    reader.abort();
}
