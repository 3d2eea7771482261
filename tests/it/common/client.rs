//! Clients for talking to keygate the way real clients do: HTTP/1.1 and h2c
//! (hyper's connection API, one fresh connection per request so nothing is
//! pooled behind a test's back), HTTP over TLS with ALPN, and raw TCP for
//! requests no well-behaved client would send.
//!
//! Every call has a deadline ([`CALL_TIMEOUT`]) so a bug cannot hang the suite,
//! and every answer is a [`Resp`] that prints the request and the whole
//! response when an assertion on it fails.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::upstream::Echo;

/// Upper bound on any single request/response exchange in the harness.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type of every client here.
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// A small request description: method, target (origin-form path and query),
/// headers in order, and a body.
#[derive(Clone)]
pub struct Req {
    pub method: Method,
    pub target: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Req {
    pub fn new(method: Method, target: &str) -> Req {
        Req {
            method,
            target: target.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn get(target: &str) -> Req {
        Req::new(Method::GET, target)
    }

    pub fn post(target: &str, body: impl Into<Bytes>) -> Req {
        Req::new(Method::POST, target).body(body)
    }

    /// Adds a header (repeatable: the same name twice sends two fields).
    pub fn header(mut self, name: &str, value: &str) -> Req {
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|e| panic!("bad header name {name:?}: {e}"));
        let value = HeaderValue::from_str(value)
            .unwrap_or_else(|e| panic!("bad header value {value:?}: {e}"));
        self.headers.push((name, value));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = body.into();
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
    }

    /// How the request is shown in failure messages.
    pub fn describe(&self, via: &str, addr: SocketAddr) -> String {
        let mut s = format!("{} {} ({via} to {addr})\n", self.method, self.target);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        if !self.body.is_empty() {
            s.push_str(&format!("[body: {} bytes]\n", self.body.len()));
        }
        s
    }

    /// The request as hyper sends it. `authority` makes the URI absolute
    /// (HTTP/2 needs `:scheme` and `:authority`).
    fn to_http(&self, scheme_authority: Option<(&str, &str)>) -> Request<ReqBody> {
        let uri = match scheme_authority {
            Some((scheme, authority)) => format!("{scheme}://{authority}{}", self.target),
            None => self.target.clone(),
        };
        let mut b = Request::builder().method(self.method.clone()).uri(uri);
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(full(self.body.clone()))
            .unwrap_or_else(|e| panic!("cannot build request {}: {e}", self.target))
    }
}

/// A complete body from bytes, boxed.
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A complete answer, with the request that produced it (for failure messages).
pub struct Resp {
    pub request: String,
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl fmt::Display for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- request:\n{}", self.request.trim_end())?;
        writeln!(f, "--- response:\n{:?} {}", self.version, self.status)?;
        for (k, v) in &self.headers {
            writeln!(f, "{k}: {}", String::from_utf8_lossy(v.as_bytes()))?;
        }
        let shown = &self.body[..self.body.len().min(4096)];
        writeln!(f, "\n{}", String::from_utf8_lossy(shown))?;
        if self.body.len() > shown.len() {
            writeln!(f, "[... {} more bytes]", self.body.len() - shown.len())?;
        }
        Ok(())
    }
}

impl Resp {
    /// The header's single value as text (`None` if absent).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not text>"))
    }

    /// The body as JSON; panics with the whole exchange if it is not.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e})\n{self}"))
    }

    /// The upstream's echo of the request it received; asserts a 200 first.
    #[track_caller]
    pub fn echo(&self) -> Echo {
        self.assert_status(200);
        Echo::new(self.json(), self.to_string())
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Resp {
        assert_eq!(self.status.as_u16(), status, "unexpected status\n{self}");
        self
    }

    #[track_caller]
    pub fn assert_header(&self, name: &str, value: &str) -> &Resp {
        assert_eq!(self.header(name), Some(value), "header {name}\n{self}");
        self
    }

    /// Asserts an RFC 9457 problem of DESIGN.md section 4: the status, the
    /// content type, the `code`, the other required fields, and `request_id`
    /// equal to the `X-Request-Id` header. Returns the problem document.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, code: &str) -> serde_json::Value {
        self.assert_status(status);
        self.assert_header("content-type", "application/problem+json");
        let p = self.json();
        assert_eq!(p["status"], status, "problem status\n{self}");
        assert_eq!(p["code"], code, "problem code\n{self}");
        assert!(p["title"].is_string(), "problem title\n{self}");
        assert!(p["detail"].is_string(), "problem detail\n{self}");
        let id = self
            .header("x-request-id")
            .unwrap_or_else(|| panic!("no X-Request-Id header\n{self}"));
        assert!(!id.is_empty(), "empty X-Request-Id\n{self}");
        assert_eq!(
            p["request_id"], id,
            "request_id must equal X-Request-Id\n{self}"
        );
        p
    }
}

/// Runs `fut` with [`CALL_TIMEOUT`], panicking with `what` when it runs out.
pub async fn deadline<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {CALL_TIMEOUT:?}: {what}"),
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens an HTTP/1.1 connection over `io` and returns the request sender.
async fn h1_handshake<I>(
    io: I,
) -> Result<hyper::client::conn::http1::SendRequest<ReqBody>, BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("client h1 connection ended: {e}");
        }
    });
    Ok(sender)
}

/// Opens an HTTP/2 connection (prior knowledge, or after ALPN) over `io`.
async fn h2_handshake<I>(
    io: I,
) -> Result<hyper::client::conn::http2::SendRequest<ReqBody>, BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("client h2 connection ended: {e}");
        }
    });
    Ok(sender)
}

async fn collect(request: String, resp: Response<Incoming>) -> Result<Resp, BoxError> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Resp {
        request,
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// Sends `req` over a new HTTP/1.1 connection (adds `Host: <addr>` unless set).
pub async fn h1(addr: SocketAddr, req: Req) -> Resp {
    let req = if req.has_header("host") {
        req
    } else {
        req.header("host", &addr.to_string())
    };
    let shown = req.describe("HTTP/1.1", addr);
    let exchange = async {
        let mut sender = h1_handshake(connect(addr).await?).await?;
        let resp = sender.send_request(req.to_http(None)).await?;
        collect(shown.clone(), resp).await
    };
    match deadline(&shown, exchange).await {
        Ok(r) => r,
        Err(e) => panic!("request failed: {e}\n--- request:\n{shown}"),
    }
}

/// Sends `req` as h2c with prior knowledge. The `:authority` is the `Host`
/// header of `req` when it has one, else `addr`.
pub async fn h2c(addr: SocketAddr, req: Req) -> Resp {
    let shown = req.describe("h2c", addr);
    let authority = authority_of(&req, addr);
    let req = without_host(req);
    let exchange = async {
        let mut sender = h2_handshake(connect(addr).await?).await?;
        let resp = sender
            .send_request(req.to_http(Some(("http", &authority))))
            .await?;
        collect(shown.clone(), resp).await
    };
    match deadline(&shown, exchange).await {
        Ok(r) => r,
        Err(e) => panic!("request failed: {e}\n--- request:\n{shown}"),
    }
}

fn authority_of(req: &Req, addr: SocketAddr) -> String {
    req.headers
        .iter()
        .find(|(k, _)| k == http::header::HOST)
        .map(|(_, v)| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| addr.to_string())
}

fn without_host(mut req: Req) -> Req {
    req.headers.retain(|(k, _)| k != http::header::HOST);
    req
}

/// Sends a streaming request over a new HTTP/1.1 connection and returns the
/// response head with its body still streaming (for bodies too big to hold).
/// Only the connection and the response head are bounded by [`CALL_TIMEOUT`]
/// plus `extra`; the caller bounds the body.
pub async fn h1_stream(
    addr: SocketAddr,
    req: Request<ReqBody>,
    extra: Duration,
) -> Result<Response<Incoming>, BoxError> {
    let shown = format!(
        "{} {} (HTTP/1.1, streamed, to {addr})",
        req.method(),
        req.uri()
    );
    let exchange = async {
        let mut sender = h1_handshake(connect(addr).await?).await?;
        Ok::<_, BoxError>(sender.send_request(req).await?)
    };
    match tokio::time::timeout(CALL_TIMEOUT + extra, exchange).await {
        Ok(r) => r,
        Err(_) => panic!("timed out: {shown}"),
    }
}

// --- TLS ---------------------------------------------------------------------

/// A test certificate authority and a server certificate it issued for
/// `localhost` and `127.0.0.1`, made with rcgen.
pub struct TestCerts {
    pub ca_pem: String,
    pub ca_der: rustls_pki_types::CertificateDer<'static>,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keygate test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-signed CA");
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server cert params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("sign server cert");
        let ca_cert: &rcgen::Certificate = ca.as_ref();
        TestCerts {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }

    /// A client config trusting only this CA and offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add test CA");
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// Sends `req` over TLS to `addr` (server name `localhost`), offering `alpn`,
/// and speaks whatever protocol the server picked. Returns the response and
/// the negotiated ALPN protocol.
pub async fn tls(
    addr: SocketAddr,
    certs: &TestCerts,
    alpn: &[&[u8]],
    req: Req,
) -> (Resp, Option<Vec<u8>>) {
    let offered: Vec<String> = alpn
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let shown = req.describe(&format!("TLS, ALPN offered {offered:?}"), addr);
    let config = certs.client_config(alpn);
    let exchange = async {
        let tcp = connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let resp = if negotiated.as_deref() == Some(b"h2") {
            let authority = authority_of(&req, addr);
            let mut sender = h2_handshake(stream).await?;
            let r = without_host(req.clone()).to_http(Some(("https", &authority)));
            sender.send_request(r).await?
        } else {
            let req = if req.has_header("host") {
                req.clone()
            } else {
                req.clone().header("host", &addr.to_string())
            };
            let mut sender = h1_handshake(stream).await?;
            sender.send_request(req.to_http(None)).await?
        };
        Ok::<_, BoxError>((collect(shown.clone(), resp).await?, negotiated))
    };
    match deadline(&shown, exchange).await {
        Ok(r) => r,
        Err(e) => panic!("request failed: {e}\n--- request:\n{shown}"),
    }
}

// --- raw TCP -------------------------------------------------------------------

/// What came back on a raw connection: the bytes, and the response parsed
/// from them if they held one.
pub struct RawReply {
    pub request: String,
    pub bytes: Vec<u8>,
    /// How reading ended: "closed", "complete", "timeout" or an I/O error.
    pub ended: String,
}

impl RawReply {
    /// Every complete response in the bytes, in order.
    pub fn responses(&self) -> Vec<Resp> {
        let mut out = Vec::new();
        let mut rest = &self.bytes[..];
        while let Some(Ok((resp, used))) = parse_response(rest, false) {
            out.push(Resp {
                request: self.request.clone(),
                ..resp
            });
            rest = &rest[used..];
        }
        out
    }

    /// The parsed response; panics with the raw bytes if there is none.
    #[track_caller]
    pub fn resp(&self) -> Resp {
        match parse_response(&self.bytes, true) {
            Some(Ok((resp, _))) => Resp {
                request: self.request.clone(),
                ..resp
            },
            _ => panic!("no complete HTTP response\n{self}"),
        }
    }
}

impl fmt::Display for RawReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- raw request:\n{}", self.request)?;
        writeln!(
            f,
            "--- raw reply ({} bytes, reading ended: {}):\n{}",
            self.bytes.len(),
            self.ended,
            escape(&self.bytes[..self.bytes.len().min(4096)])
        )
    }
}

/// Writes `request` on a new connection and reads until a complete response
/// has arrived, the server closes, or `wait` passes.
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> RawReply {
    raw_chunks(addr, vec![Bytes::copy_from_slice(request)], wait).await
}

/// Writes `request` on a new connection and reads everything until the
/// server closes or `wait` passes (`ended` tells which): to check that a
/// connection is closed, or what pipelined requests got.
pub async fn raw_to_close(addr: SocketAddr, request: &[u8], wait: Duration) -> RawReply {
    exchange(addr, vec![Bytes::copy_from_slice(request)], wait, false).await
}

/// Like [`raw`], writing `chunks` in order from a separate task while reading,
/// so an early answer (413 in the middle of a body) is read as it arrives.
pub async fn raw_chunks(addr: SocketAddr, chunks: Vec<Bytes>, wait: Duration) -> RawReply {
    exchange(addr, chunks, wait, true).await
}

async fn exchange(
    addr: SocketAddr,
    chunks: Vec<Bytes>,
    wait: Duration,
    stop_at_response: bool,
) -> RawReply {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut shown = escape(&chunks.first().cloned().unwrap_or_default()[..]);
    if shown.len() > 2048 {
        shown.truncate(2048);
        shown.push_str("[...]");
    }
    let request = format!(
        "(to {addr}, {total} bytes in {} writes)\n{shown}",
        chunks.len()
    );
    let stream = match deadline(&request, connect(addr)).await {
        Ok(s) => s,
        Err(e) => panic!("cannot connect: {e}\n{request}"),
    };
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for c in chunks {
            wr.write_all(&c).await?;
        }
        // Keep the write half open: closing it could end the exchange early.
        Ok::<_, std::io::Error>(wr)
    });
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(wait, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return "closed".to_owned(),
                Ok(n) => {
                    bytes.extend_from_slice(&buf[..n]);
                    if stop_at_response && matches!(parse_response(&bytes, false), Some(Ok(_))) {
                        return "complete".to_owned();
                    }
                }
                Err(e) => return format!("read error: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "timeout".to_owned());
    writer.abort();
    RawReply {
        request,
        bytes,
        ended,
    }
}

fn escape(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\r' => s.push_str("\\r"),
                '\n' => s.push_str("\\n\n"),
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// Parses one HTTP/1.x response from `bytes`. `None`: incomplete (unless
/// `at_eof`, where a body without framing ends at the end of the bytes).
fn parse_response(bytes: &[u8], at_eof: bool) -> Option<Result<(Resp, usize), String>> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = match std::str::from_utf8(&bytes[..head_end]) {
        Ok(h) => h,
        Err(_) => return Some(Err("response head is not UTF-8".into())),
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = match parts.next() {
        Some("HTTP/1.0") => Version::HTTP_10,
        Some("HTTP/1.1") => Version::HTTP_11,
        other => return Some(Err(format!("bad status line version {other:?}"))),
    };
    let status = match parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        Some(s) => s,
        None => return Some(Err(format!("bad status line {status_line:?}"))),
    };
    let mut headers = HeaderMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(':') else {
            return Some(Err(format!("bad header line {line:?}")));
        };
        let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        ) else {
            return Some(Err(format!("bad header line {line:?}")));
        };
        headers.append(k, v);
    }
    let rest = &bytes[head_end..];
    let chunked = headers.get("transfer-encoding").is_some_and(|v| {
        v.to_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("chunked")
    });
    let length = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let (body, used) = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        (Bytes::new(), 0)
    } else if chunked {
        match dechunk(rest)? {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        }
    } else if let Some(n) = length {
        if rest.len() < n {
            return None;
        }
        (Bytes::copy_from_slice(&rest[..n]), n)
    } else if at_eof {
        (Bytes::copy_from_slice(rest), rest.len())
    } else {
        return None;
    };
    let resp = Resp {
        request: String::new(),
        status,
        version,
        headers,
        body,
    };
    Some(Ok((resp, head_end + used)))
}

/// Decodes a chunked body; `None` while incomplete.
fn dechunk(mut rest: &[u8]) -> Option<Result<(Bytes, usize), String>> {
    let start = rest.len();
    let mut out = BytesMut::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let Ok(size) = usize::from_str_radix(&size_text, 16) else {
            return Some(Err(format!("bad chunk size {size_text:?}")));
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let end = rest.windows(2).position(|w| w == b"\r\n")?;
                rest = &rest[end + 2..];
                if end == 0 {
                    return Some(Ok((out.freeze(), start - rest.len())));
                }
            }
        }
        if rest.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// --- generated bodies -------------------------------------------------------------

/// A body of `total` bytes produced on the fly as clones of one chunk (no
/// copying, no buffering): for the 1 GiB streaming tests. With `exact` the
/// size is announced (Content-Length); without it HTTP/1.1 sends it chunked.
pub struct RepeatBody {
    chunk: Bytes,
    remaining: u64,
    exact: bool,
}

impl RepeatBody {
    pub fn new(chunk_size: usize, total: u64, exact: bool) -> RepeatBody {
        let chunk = Bytes::from(vec![b'k'; chunk_size]);
        RepeatBody {
            chunk,
            remaining: total,
            exact,
        }
    }
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            true => SizeHint::with_exact(self.remaining),
            false => SizeHint::default(),
        }
    }
}
