//! `pullthrough healthcheck`: one plain HTTP/1.1 GET with the standard library, so that a
//! container image needs no curl for its HEALTHCHECK.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Asks `url` (http:// only) and succeeds when it answers 200 within `timeout`.
pub fn check(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let status = get_status(url, timeout)?;
    if status != 200 {
        anyhow::bail!("{url} answered {status}");
    }
    Ok(())
}

/// The status code of a GET of `url`.
fn get_status(url: &str, timeout: Duration) -> anyhow::Result<u16> {
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("invalid URL {url:?}: {e}"))?;
    if parsed.scheme() != "http" {
        anyhow::bail!("only http:// URLs are supported, not {url:?}");
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("no host in {url:?}"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("no answer from {url} within {timeout:?}"))
    };
    // url keeps the brackets of an IPv6 host, which socket address parsing wants without.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (bare, port)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last_error = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = Some(format!("cannot connect to {addr}: {e}")),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        anyhow::anyhow!(last_error.unwrap_or_else(|| format!("no address for {host}")))
    })?;
    let mut target = parsed.path().to_owned();
    if let Some(query) = parsed.query() {
        target.push('?');
        target.push_str(query);
    }
    let host_header = match parsed.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: pullthrough-healthcheck\r\n\
         Connection: close\r\n\r\n"
    )?;
    stream.flush()?;
    // Only the status line matters: read until its end.
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 8192 {
        stream.set_read_timeout(Some(left()?))?;
        let n = stream
            .read(&mut buf)
            .map_err(|e| anyhow::anyhow!("reading the answer of {url}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status_line(&head).ok_or_else(|| {
        anyhow::anyhow!(
            "{url} sent no HTTP status line: {:?}",
            String::from_utf8_lossy(&head[..head.len().min(80)])
        )
    })
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    /// A one-shot server on an ephemeral port that answers `status` and returns the request.
    fn serve_once(status: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            let mut request = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                request.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut stream = reader.into_inner();
            write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").unwrap();
            request
        });
        (url, thread)
    }

    #[test]
    fn healthy_when_the_endpoint_answers_200() {
        let (url, server) = serve_once("200 OK");
        check(&url, Duration::from_secs(5)).unwrap();
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nHost: 127.0.0.1:"), "{request}");
    }

    #[test]
    fn unhealthy_when_the_endpoint_answers_otherwise() {
        let (url, server) = serve_once("503 Service Unavailable");
        let err = check(&url, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(err.contains("answered 503"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        let err = check("https://127.0.0.1:5000/healthz", Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
        assert!(check("not a url", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn status_lines_are_parsed_strictly() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 404\r\n"), Some(404));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK\r\n"), None);
    }
}
