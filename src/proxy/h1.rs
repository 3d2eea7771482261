//! keygate's own HTTP/1.1 server loop for the plain request.
//!
//! hyper's server dispatcher was over 60% of keygate's instructions per
//! request (BENCHMARKS.md, "Where the time goes"). Most requests through an
//! API gateway are plain: HTTP/1.1, an origin-form target, no body, no
//! upgrade. [`serve`] reads and answers those itself: it parses heads with
//! `httparse` (the parser hyper uses, with the same strict defaults), runs
//! [`Gateway::handle`] and writes the answer, head and a small body in one
//! write.
//!
//! Everything else goes to hyper, from the first request that is not plain
//! on, with the bytes already read put back in front of the stream
//! ([`Rewind`]): HTTP/2 prior knowledge, request bodies (`Content-Length`,
//! `Transfer-Encoding`), `Expect`, `Upgrade`, HTTP/1.0, targets not in origin
//! form and `CONNECT`. The hand-over happens between requests, where hyper
//! starts as on a new connection.
//!
//! Heads this path cannot accept are answered here with problem+json, and
//! the connection closes: malformed heads (httparse's strict defaults, as in
//! hyper) and unsound body framing (an invalid or differing
//! `Content-Length`, `Content-Length` with `Transfer-Encoding`, a
//! `Transfer-Encoding` not ending in `chunked`) are 400 `bad_request`;
//! more than `max_headers` fields or `max_head_bytes` of head are 431
//! `headers_too_large`. (hyper would answer these with an empty body.)
//!
//! While a request is handled the connection is still read: a client that
//! closes it cancels its request, as with hyper (no half-close).
//!
//! Limits as hyper's: a head must arrive whole within `header_read_timeout`
//! of starting to wait for it (so an idle keep-alive connection is closed
//! after that long), with at most `max_headers` fields in at most
//! `max_header_bytes`. On shutdown an idle connection is closed at once and
//! a busy one after its answer (`Connection: close`).

use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::body::{ClientBody, ProxyBody};
use super::client;
use super::framing;
use super::headers::{RawFields, put_field};
use super::{ConnInfo, Gateway};
use crate::error::GatewayError;

/// The most header fields this path reads; with a larger `max_headers` every
/// request goes to hyper.
pub const MAX_FIELDS: usize = 128;
/// Read buffer growth.
const READ_CHUNK: usize = 8 * 1024;
/// Body bytes gathered behind the head before they are written.
const GATHER: usize = 16 * 1024;

/// What this path enforces (from `limits:`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_head_bytes: usize,
}

impl Limits {
    /// Whether this path can serve with these limits, and is not switched
    /// off (`KEYGATE_H1_FAST_PATH=0`, to compare with hyper alone).
    pub fn enabled(&self) -> bool {
        let off = std::env::var("KEYGATE_H1_FAST_PATH").is_ok_and(|v| v == "0" || v == "off");
        !off && self.max_headers <= MAX_FIELDS
    }
}

/// How a connection left this path.
pub enum Ended<S> {
    /// Closed (by the client, a timeout, shutdown, or a broken answer).
    Closed,
    /// For hyper, from a request boundary on.
    HandOver(Rewind<S>),
}

/// Serves plain HTTP/1.1 requests on `io` until the connection ends or a
/// request needs hyper.
pub async fn serve<S>(
    mut io: S,
    gateway: &Gateway,
    conn: &ConnInfo,
    limits: Limits,
    shutdown: &CancellationToken,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut fields: Vec<Field> = Vec::with_capacity(16);
    let stop = shutdown.cancelled();
    tokio::pin!(stop);
    // One timer per connection, moved on only when it fires: the deadline of
    // the head being waited for is `waiting_since + header_read_timeout`.
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    // The route timeout of each request in turn (see `Gateway::handle`).
    let route_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(route_timer);
    loop {
        let waiting_since = tokio::time::Instant::now();
        let head = loop {
            match parse(&buf, limits.max_headers, &mut fields) {
                Parsed::Head(head) if head.len <= limits.max_head_bytes => break head,
                Parsed::Partial if buf.len() < limits.max_head_bytes => {}
                Parsed::NotPlain => return Ended::HandOver(Rewind::new(buf.freeze(), io)),
                Parsed::Head(_) | Parsed::Partial | Parsed::TooLarge => {
                    let too_large = GatewayError::HeadersTooLarge {
                        max_fields: limits.max_headers,
                        max_bytes: limits.max_head_bytes,
                    };
                    return refuse(io, &mut out, gateway, conn, &too_large).await;
                }
                Parsed::Malformed(why) => {
                    let malformed = GatewayError::BadRequest(why);
                    return refuse(io, &mut out, gateway, conn, &malformed).await;
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => r,
                () = &mut stop, if buf.is_empty() => return Ended::Closed,
                () = &mut timer => {
                    let deadline = waiting_since + limits.header_read_timeout;
                    if tokio::time::Instant::now() >= deadline {
                        tracing::debug!("no complete request head within the header read timeout; closing");
                        return Ended::Closed;
                    }
                    timer.as_mut().reset(deadline);
                    continue;
                }
            };
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            }
        };
        let head_bytes = buf.split_to(head.len).freeze();
        let Some(req) = request(&head, &head_bytes, &fields) else {
            // Valid for httparse but not for `http` (rare): hyper decides.
            let mut all = BytesMut::with_capacity(head_bytes.len() + buf.len());
            all.extend_from_slice(&head_bytes);
            all.extend_from_slice(&buf);
            return Ended::HandOver(Rewind::new(all.freeze(), io));
        };
        let is_head = req.method() == Method::HEAD;
        // Keep reading while the request is handled, as hyper does: a client
        // that goes away cancels its request (and frees its connection slot)
        // instead of holding it until the upstream answers. Bytes of
        // pipelined requests wait in `buf`.
        let handling = gateway.handle(req, conn, route_timer.as_mut());
        tokio::pin!(handling);
        let resp = loop {
            tokio::select! {
                biased;
                resp = &mut handling => break resp,
                read = io.read_buf(&mut buf), if buf.len() < limits.max_head_bytes => match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {}
                },
            }
        };
        let keep_alive = !head.close && !shutdown.is_cancelled();
        match respond(&mut io, &mut out, resp, is_head, keep_alive).await {
            Ok(true) if keep_alive => {}
            Ok(true) => {
                let _ = io.shutdown().await;
                return Ended::Closed;
            }
            // The answer could not be written whole: the client cannot
            // tell where it ends, so the connection goes.
            Ok(false) | Err(_) => return Ended::Closed,
        }
    }
}

/// A header field's name and value, as offsets into the head.
#[derive(Clone, Copy)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

/// A complete plain request head.
struct Head {
    len: usize,
    method: Method,
    path: (u32, u32),
    /// `Connection: close`.
    close: bool,
}

enum Parsed {
    Head(Head),
    Partial,
    /// Not for this path: hyper reads it.
    NotPlain,
    /// More header fields than allowed: 431.
    TooLarge,
    /// Not HTTP/1.1 keygate can read: 400, with what is wrong.
    Malformed(&'static str),
}

/// The HTTP/2 client preface (prior knowledge), which hyper reads.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Parses the head at the start of `buf`; `fields` receives its fields.
fn parse(buf: &[u8], max_headers: usize, fields: &mut Vec<Field>) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers[..max_headers]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) => {
            return Parsed::NotPlain;
        }
        Err(e) => return malformed(e),
    };
    if req.version != Some(1) {
        return Parsed::NotPlain;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::NotPlain;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::NotPlain;
    };
    if method == Method::CONNECT || !path.starts_with('/') {
        return Parsed::NotPlain;
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
    fields.clear();
    let mut close = false;
    // Requests with a body, an expectation or an upgrade go to hyper, once
    // their framing is known to be sound (DESIGN.md section 4: 400, never
    // forwarded, otherwise).
    let mut for_hyper = false;
    let mut length: Option<u64> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            match (client::content_length(h.value), length) {
                (None, _) => return Parsed::Malformed("an invalid Content-Length"),
                (Some(n), Some(seen)) if n != seen => {
                    return Parsed::Malformed("differing Content-Length values");
                }
                (Some(n), _) => length = Some(n),
            }
            for_hyper = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(h.value);
            for_hyper = true;
        } else if name.eq_ignore_ascii_case("expect") || name.eq_ignore_ascii_case("upgrade") {
            for_hyper = true;
        } else if name.eq_ignore_ascii_case("connection") && has_token(h.value, "close") {
            close = true;
        }
        fields.push(Field {
            name: at(name.as_bytes()),
            value: at(h.value),
        });
    }
    if let Some(coding) = transfer_encoding {
        if length.is_some() {
            return Parsed::Malformed("Content-Length together with Transfer-Encoding");
        }
        if !framing::ends_in_chunked(coding) {
            return Parsed::Malformed("a Transfer-Encoding that does not end in chunked");
        }
    }
    if for_hyper {
        return Parsed::NotPlain;
    }
    Parsed::Head(Head {
        len,
        method,
        path: at(path.as_bytes()),
        close,
    })
}

/// What httparse found wrong, as the answer's detail.
fn malformed(e: httparse::Error) -> Parsed {
    Parsed::Malformed(match e {
        httparse::Error::TooManyHeaders => return Parsed::TooLarge,
        httparse::Error::HeaderName => "an invalid header field name (or an obsolete folded line)",
        httparse::Error::HeaderValue => "an invalid header field value",
        httparse::Error::NewLine => "an invalid line ending",
        httparse::Error::Version => "an unsupported HTTP version",
        httparse::Error::Token | httparse::Error::Status => "an invalid request line",
    })
}

/// Answers a head keygate refuses, then closes the connection, reading
/// what the client still sends for a moment first so that the answer is not
/// lost to a reset (a lingering close, as nginx does).
async fn refuse<S>(
    mut io: S,
    out: &mut Vec<u8>,
    gateway: &Gateway,
    conn: &ConnInfo,
    e: &GatewayError,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const LINGER: Duration = Duration::from_secs(1);
    const LINGER_BYTES: usize = 1 << 20;
    let resp = gateway.refuse(e, conn);
    if let Ok(true) = respond(&mut io, out, resp, false, false).await {
        let _ = io.shutdown().await;
        let drain = async {
            let mut sink = [0u8; 8192];
            let mut total = 0;
            while total < LINGER_BYTES {
                match io.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
    Ended::Closed
}

/// Whether a comma-separated header value lists `token` (any case).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The request `head` describes, its strings shared with `bytes`; `None` if
/// `http` refuses a part of it.
fn request(head: &Head, bytes: &Bytes, fields: &[Field]) -> Option<Request<ClientBody>> {
    let slice = |(at, len): (u32, u32)| bytes.slice(at as usize..(at + len) as usize);
    let uri = Uri::from_maybe_shared(slice(head.path)).ok()?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let (at, len) = f.name;
        let name = HeaderName::from_bytes(&bytes[at as usize..(at + len) as usize]).ok()?;
        let value = HeaderValue::from_maybe_shared(slice(f.value)).ok()?;
        headers.append(name, value);
    }
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(req)
}

/// How the body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes `resp`; `Ok(false)` if its body broke or did not match its
/// length, so the connection must close.
async fn respond<S>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    is_head: bool,
    keep_alive: bool,
) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    out.clear();
    let raw = body.take_raw_fields();
    let framing = encode_head(
        out,
        &parts,
        raw.as_ref(),
        body.size_hint().exact(),
        is_head,
        keep_alive,
    );
    if framing == Framing::None {
        // Read what is already there, so an upstream body that is at its
        // end hands its connection back to the pool.
        while let Some(Some(Ok(_))) = body.frame().now_or_never() {}
        io.write_all(out).await?;
        return Ok(true);
    }
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                // The body is not ready: send what is gathered meanwhile.
                io.write_all(out).await?;
                out.clear();
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "upstream body broke while answering");
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue, // trailers and empty frames
            },
        };
        match framing {
            Framing::Length(_) => {
                if data.len() as u64 > left {
                    return Ok(false);
                }
                left -= data.len() as u64;
            }
            _ => {
                let _ = write!(out, "{:x}\r\n", data.len());
            }
        }
        if out.len() + data.len() <= GATHER {
            out.extend_from_slice(&data);
        } else {
            write_both(io, out, &data).await?;
            out.clear();
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    match framing {
        Framing::Length(n) if left != 0 => {
            tracing::debug!(declared = n, "upstream body ended short of its length");
            io.write_all(out).await?;
            return Ok(false);
        }
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        _ => {}
    }
    io.write_all(out).await?;
    Ok(true)
}

/// The status line and header fields, with `Date`, the framing fields and
/// `Connection: close` as hyper would write them. `raw`: the upstream's
/// end-to-end fields, written first, less those keygate sets itself (in
/// `parts`).
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    raw: Option<&RawFields>,
    exact: Option<u64>,
    is_head: bool,
    keep_alive: bool,
) -> Framing {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let no_body = framing::bodiless(is_head, status);
    let mut declared: Option<u64> = None;
    let mut has_date = false;
    let mut raw_length = false;
    if let Some(raw) = raw {
        raw.write(out, &parts.headers);
        has_date = raw.has_date();
        raw_length = raw.has_length();
    }
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue; // framing and connection are this hop's
        }
        if name == header::CONTENT_LENGTH {
            declared = value.to_str().ok().and_then(|v| v.parse().ok());
            if !no_body {
                continue; // written below, from the body
            }
        }
        has_date |= name == header::DATE;
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !has_date {
        DATE.with(|d| put_field(out, b"date", &d.now()));
    }
    if !keep_alive {
        put_field(out, b"connection", b"close");
    }
    let framing = match (no_body, exact.or(declared)) {
        (true, _) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Chunked,
    };
    let mut n = itoa::Buffer::new();
    match framing {
        Framing::Length(len) => put_field(out, b"content-length", n.format(len).as_bytes()),
        Framing::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
        Framing::None => {
            // A HEAD answer of keygate's own states its body's length.
            let stated = declared.is_some() || raw_length;
            if let (true, false, Some(len @ 1..)) = (is_head, stated, exact) {
                put_field(out, b"content-length", n.format(len).as_bytes());
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes `a` then `b` with as few writes as the stream takes.
async fn write_both<S: AsyncWrite + Unpin>(io: &mut S, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    io.write_all(b).await
}

/// The `Date` value, formatted once a second per thread.
struct DateCache {
    second: std::cell::Cell<u64>,
    value: std::cell::RefCell<Bytes>,
}

impl DateCache {
    fn now(&self) -> Bytes {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second.get() {
            self.second.set(second);
            *self.value.borrow_mut() = Bytes::from(httpdate::fmt_http_date(now));
        }
        self.value.borrow().clone()
    }
}

thread_local! {
    static DATE: DateCache = const {
        DateCache {
            second: std::cell::Cell::new(u64::MAX),
            value: std::cell::RefCell::new(Bytes::new()),
        }
    };
}

/// A stream with bytes already read put back in front of it.
pub struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(pre: Bytes, inner: S) -> Rewind<S> {
        Rewind { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn parsed(head: &str) -> (Parsed, Vec<Field>) {
        let mut fields = Vec::new();
        let p = parse(head.as_bytes(), 100, &mut fields);
        (p, fields)
    }

    fn plain(head: &str) -> (Head, Request<ClientBody>) {
        let (p, fields) = parsed(head);
        let Parsed::Head(h) = p else {
            panic!("not plain: {head:?}")
        };
        let bytes = Bytes::copy_from_slice(&head.as_bytes()[..h.len]);
        let req = request(&h, &bytes, &fields).expect("a request");
        (h, req)
    }

    #[test]
    fn a_plain_get_is_read_here() {
        let text = "GET /api/orders?x=1 HTTP/1.1\r\nHost: gw\r\nX-Api-Key: k\r\nAccept: a\r\nAccept: b\r\n\r\nGET /next";
        let (h, req) = plain(text);
        assert_eq!(
            h.len,
            text.find("\r\n\r\n").unwrap() + 4,
            "the head ends before the next"
        );
        assert!(!h.close);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/api/orders");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "gw");
        assert_eq!(req.headers()["x-api-key"], "k");
        let accept: Vec<_> = req.headers().get_all("accept").iter().collect();
        assert_eq!(accept, ["a", "b"]);
        assert!(req.body().is_end_stream());
    }

    #[test]
    fn connection_close_is_seen_in_any_case_and_list() {
        for v in ["close", "Close", "keep-alive, CLOSE", " te ,close "] {
            let (h, _) = plain(&format!("GET / HTTP/1.1\r\nConnection: {v}\r\n\r\n"));
            assert!(h.close, "{v}");
        }
        let (h, _) = plain("GET / HTTP/1.1\r\nConnection: keep-alive, closed\r\n\r\n");
        assert!(!h.close);
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        for head in [
            "",
            "GET",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert!(matches!(parsed(head).0, Parsed::Partial), "{head:?}");
        }
    }

    #[test]
    fn bodies_upgrades_and_other_versions_go_to_hyper() {
        let not_plain = [
            // Bodies with sound framing, expectations and upgrades.
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            // Other versions and target forms.
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            // The HTTP/2 preface, whole or begun.
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "PRI * HTTP/2",
        ];
        for head in not_plain {
            assert!(matches!(parsed(head).0, Parsed::NotPlain), "{head:?}");
        }
    }

    #[test]
    fn malformed_heads_and_unsound_framing_are_refused_here() {
        let malformed = [
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "field name"),
            ("GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n", "folded"),
            ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", "field value"),
            ("GET  / HTTP/1.1\r\n\r\n", "request line"),
            ("GET / HTTP/3.0\r\n\r\n", "version"),
            ("\x16\x03\x01\x02\x00", "request line"),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "differing",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "together",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                "together",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                "end in chunked",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
                "end in chunked",
            ),
        ];
        for (head, why) in malformed {
            match parsed(head).0 {
                Parsed::Malformed(detail) => assert!(detail.contains(why), "{head:?}: {detail}"),
                _ => panic!("{head:?} was not refused"),
            }
        }
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..101 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(parsed(&many).0, Parsed::TooLarge), "101 fields");
    }

    #[test]
    fn content_lengths_are_digits_or_lists_of_equal_ones() {
        use super::client::content_length;
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"7,7 , 7"), Some(7));
        assert_eq!(
            content_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"18446744073709551615",
            b"1,2",
            b"1,",
            b"0x10",
            b"-1",
            b"1 2",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn head_of(resp: Response<ProxyBody>, is_head: bool, keep_alive: bool) -> (String, Framing) {
        let (parts, body) = resp.into_parts();
        let mut out = Vec::new();
        let framing = encode_head(
            &mut out,
            &parts,
            None,
            body.size_hint().exact(),
            is_head,
            keep_alive,
        );
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn heads_state_their_framing() {
        let full = || Response::new(ProxyBody::full(Bytes::from_static(b"hello")));
        let (h, f) = head_of(full(), false, true);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(h.contains("\r\ncontent-length: 5\r\n"), "{h}");
        assert!(h.contains("\r\ndate: "), "{h}");
        assert!(!h.contains("connection"), "{h}");
        assert!(h.ends_with("\r\n\r\n"));
        assert_eq!(f, Framing::Length(5));

        // A HEAD answer of keygate's own states its length and sends nothing.
        let (h, f) = head_of(full(), true, false);
        assert!(h.contains("content-length: 5\r\n") && h.contains("connection: close\r\n"));
        assert_eq!(f, Framing::None);

        // The upstream's framing and connection fields are not passed on.
        let mut resp = full();
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let hdrs = resp.headers_mut();
        hdrs.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        hdrs.insert("connection", HeaderValue::from_static("keep-alive"));
        hdrs.insert(
            "date",
            HeaderValue::from_static("Thu, 03 Dec 2026 10:00:00 GMT"),
        );
        let (h, f) = head_of(resp, false, true);
        assert!(h.starts_with("HTTP/1.1 204 No Content\r\n"), "{h}");
        assert!(
            !h.contains("transfer-encoding") && !h.contains("connection"),
            "{h}"
        );
        assert_eq!(h.matches("date: ").count(), 1, "{h}");
        assert_eq!(f, Framing::None);
    }

    /// An upstream's fields as keygate's own client keeps them.
    const RAW: &[u8] = b"Server: up\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n\
        Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n\
        Trailer: x\r\nUpgrade: h2c\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\
        Content-Length: 5\r\nX-Request-Id: upstream\r\nSet-Cookie: a=1\r\nset-cookie:b=2 \n\r\n";

    fn raw_head(is_head: bool) -> String {
        let mut resp = Response::new(ProxyBody::full(Bytes::from_static(b"hello")));
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("kg"));
        let (parts, body) = resp.into_parts();
        let raw = RawFields::from_lines(RAW, is_head);
        let mut out = Vec::new();
        let exact = body.size_hint().exact();
        encode_head(&mut out, &parts, Some(&raw), exact, is_head, true);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn raw_upstream_fields_pass_less_this_hops_and_keygates() {
        assert_eq!(
            raw_head(false),
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n\
             Set-Cookie: a=1\r\nset-cookie: b=2\r\nx-request-id: kg\r\ncontent-length: 5\r\n\r\n"
        );
        // Without a body, the upstream's length is the one stated.
        assert_eq!(
            raw_head(true),
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n\
             Content-Length: 5\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nx-request-id: kg\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn bodies_are_written_as_framed() {
        let mut wire = Vec::new();
        let mut out = Vec::new();
        let resp = Response::new(ProxyBody::full(Bytes::from_static(b"hello")));
        assert!(
            respond(&mut wire, &mut out, resp, false, true)
                .await
                .unwrap()
        );
        let text = String::from_utf8(wire).unwrap();
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");

        // Unknown length: chunked.
        let (parts, _) = Response::new(()).into_parts();
        let mut head = Vec::new();
        assert_eq!(
            encode_head(&mut head, &parts, None, None, false, true),
            Framing::Chunked
        );
        let text = String::from_utf8(head).unwrap();
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");

        // A large body is written after the head without being gathered.
        let big = Bytes::from(vec![b'x'; 3 * GATHER]);
        let resp = Response::new(ProxyBody::full(big.clone()));
        let mut wire = Vec::new();
        assert!(
            respond(&mut wire, &mut out, resp, false, true)
                .await
                .unwrap()
        );
        assert!(wire.ends_with(&big));
        let head = String::from_utf8_lossy(&wire[..wire.len() - big.len()]).to_string();
        assert!(
            head.contains(&format!("content-length: {}\r\n", big.len())),
            "{head}"
        );
    }

    #[tokio::test]
    async fn rewind_reads_what_was_put_back_first() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Rewind::new(Bytes::from_static(b"hello"), server);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
