//! `keygate healthcheck`: asks a running keygate's admin listener whether it
//! is healthy, for container health checks in images that have no shell or
//! curl (the Docker image is distroless).
//!
//! One plain HTTP/1.1 GET over a blocking socket with a deadline: exit 0 on a
//! 2xx answer, 1 otherwise, with one sentence on stderr saying why.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What `keygate healthcheck` asks by default: liveness on the default admin
/// address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8081/healthz";

/// The whole check may take at most this long.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// GETs `url` (plain `http://`); `Ok` with the status line on a 2xx answer.
pub fn check(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!("{url:?}: only http:// URLs are supported"));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let deadline = Instant::now() + TIMEOUT;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let io = |e: std::io::Error| format!("{url}: {e}");
    stream.set_write_timeout(Some(left())).map_err(io)?;
    let target = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: keygate-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    // The status line is all we need; read until it is complete.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        stream.set_read_timeout(Some(left())).map_err(io)?;
        match stream.read(&mut buf).map_err(io)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("").trim().to_owned();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: not an HTTP answer: {status_line:?}"))?;
    match (200..300).contains(&status) {
        true => Ok(status_line),
        false => Err(format!("{url} answered {status_line}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_one_sentence() {
        assert!(check("nope").unwrap_err().contains("invalid URL"));
        assert!(
            check("https://127.0.0.1:1/healthz")
                .unwrap_err()
                .contains("only http://")
        );
    }

    #[test]
    fn a_closed_port_is_reported() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = check(&format!("http://127.0.0.1:{port}/healthz")).unwrap_err();
        assert!(e.starts_with("cannot connect to 127.0.0.1:"), "{e}");
    }

    #[test]
    fn statuses_decide() {
        use std::io::BufRead;
        for (answer, ok) in [
            ("HTTP/1.1 200 OK", true),
            ("HTTP/1.1 503 Service Unavailable", false),
        ] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut first = String::new();
                std::io::BufReader::new(&s).read_line(&mut first).unwrap();
                s.write_all(format!("{answer}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .unwrap();
                first
            });
            let got = check(&format!("http://127.0.0.1:{port}/readyz?x=1"));
            assert_eq!(got.is_ok(), ok, "{got:?}");
            assert_eq!(server.join().unwrap(), "GET /readyz?x=1 HTTP/1.1\r\n");
        }
    }
}
