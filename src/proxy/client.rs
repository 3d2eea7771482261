//! keygate's own HTTP/1.1 client, for the plain upstream request.
//!
//! hyper's client connection was the largest cost left per request
//! (BENCHMARKS.md, "Where the time goes"): every exchange crosses a channel to
//! a spawned connection task and back. A request read by keygate's own
//! HTTP/1 path ([`super::h1`]) has no body, so its exchange with a plain-HTTP
//! upstream is simple enough to run inline, in the request's own task: write
//! the head in one write, read the response head with `httparse` (the parser
//! hyper uses), and stream the body from the same socket as the client reads
//! it. Requests with a body, and every HTTPS upstream, stay on hyper's client
//! ([`super::forward`]).
//!
//! The response body is delimited as RFC 9112 section 6.3 says: none for
//! HEAD, 1xx, 204 and 304; chunked when `Transfer-Encoding` ends in
//! `chunked` (decoded here; trailers are read and dropped, as the HTTP/1
//! answer has none); otherwise `Content-Length`; otherwise until the
//! upstream closes. Interim 1xx answers are skipped (keygate never asks for
//! an upgrade, so 101 is an error). A connection goes back to the pool only
//! when its answer was read exactly to its end and the upstream did not ask
//! to close it (HTTP/1.1, no `Connection: close`, no length-by-close).
//!
//! The answer's end-to-end fields are not put into a `HeaderMap`: they are
//! collected as the `name: value` lines keygate's own HTTP/1 path writes to
//! the client ([`RawFields`], carried by the body), less the hop-by-hop and
//! framing fields. Only a head whose `Connection` names other fields gets a
//! map, so that those fields can be removed by name.
//!
//! Anything malformed (a bad status line, a conflicting or invalid
//! `Content-Length`, a bad chunk, too many fields, a head over
//! [`MAX_HEAD_BYTES`]) fails the exchange: 502 before the head, a broken
//! body after it; the connection is never reused.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::forward::Lease;
use super::framing;
use super::headers::{Added, FieldKind, RawFields, RawFieldsBuilder, field_kind};
use crate::error::GatewayError;

/// The most header fields in an upstream response head (hyper's default).
pub const MAX_FIELDS: usize = 100;
/// The largest upstream response head (hyper's default read buffer limit).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer bytes after the last chunk.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Read buffer growth.
const READ_CHUNK: usize = 16 * 1024;

/// TCP keep-alive probes on upstream connections.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A TCP connection to an upstream at `addr`, opened within `timeout`, with
/// Nagle off and keep-alive probes on.
pub async fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, GatewayError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, upstream = addr, "upstream connect failed");
            return Err(GatewayError::UpstreamUnavailable);
        }
        Err(_) => {
            tracing::debug!(upstream = addr, "upstream connect timed out");
            return Err(GatewayError::UpstreamUnavailable);
        }
    };
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(stream)
}

/// One connection to a plain-HTTP upstream.
pub struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet consumed; empty between exchanges.
    buf: BytesMut,
    /// The request head being written, kept for its allocation.
    out: Vec<u8>,
}

impl Conn {
    /// Opens a connection to `addr` within `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Conn, GatewayError> {
        Ok(Conn {
            stream: connect_tcp(addr, timeout).await?,
            buf: BytesMut::new(),
            out: Vec::new(),
        })
    }

    /// Whether an idle connection can carry another request: the upstream
    /// has neither closed it nor sent anything unasked. Costs no system call
    /// while the socket is known not readable.
    pub fn usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Writes the head of a bodiless request. `Ok(false)`: nothing was
    /// written (the connection was already broken), so the request may be
    /// sent on another connection; an error once any byte was written.
    pub async fn write_request(
        &mut self,
        parts: &http::request::Parts,
        added: &Added,
    ) -> io::Result<bool> {
        self.out.clear();
        encode_request(&mut self.out, parts, added);
        let n = match self.stream.write(&self.out).await {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "upstream connection broken before the request");
                return Ok(false);
            }
        };
        self.stream.write_all(&self.out[n..]).await?;
        Ok(true)
    }

    /// Reads the final response head of a request with `method`, skipping
    /// interim (1xx) answers.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, GatewayError> {
        loop {
            if let Some(head) = self.parse_head(method)? {
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(bad_upstream("101 to a request without Upgrade"));
                    }
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD_BYTES {
                return Err(bad_upstream("response head too large"));
            }
            reserve(&mut self.buf);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(bad_upstream("closed before the response head")),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "upstream read failed");
                    return Err(GatewayError::UpstreamUnavailable);
                }
            }
        }
    }

    /// The head at the start of the buffer, taken out of it; `None` if it is
    /// not complete yet.
    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, GatewayError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            &self.buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(bad_upstream("too many response header fields"));
            }
            Err(_) => return Err(bad_upstream("malformed response head")),
        };
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| bad_upstream("bad status code"))?;
        let version = match resp.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let mut fields = Fields::default();
        let mut raw = RawFieldsBuilder::new(len, bodiless(method, status));
        for h in resp.headers.iter() {
            let (name, kind) = (h.name.as_bytes(), field_kind(h.name.as_bytes()));
            fields.note(kind, h.value)?;
            raw.push(name, h.value, kind);
        }
        let framing = fields.framing(method, status)?;
        let (headers, raw) = match fields.lists_others {
            false => (HeaderMap::new(), Some(raw.finish())),
            true => {
                let drop_length = framing != Framing::Empty && fields.chunked.is_some();
                (header_map(resp.headers, drop_length)?, None)
            }
        };
        self.buf.advance(len);
        let close = version == Version::HTTP_10 || framing == Framing::UntilClose || fields.close;
        Ok(Some(Head {
            status,
            headers,
            raw,
            framing,
            reusable: !close,
        }))
    }
}

/// The fields of a head whose `Connection` names other fields, in a map for
/// [`super::headers::strip_hop_by_hop`] to remove those from.
/// `Transfer-Encoding` is this hop's and stays out, and so does a
/// `Content-Length` it overrides (`drop_length`).
fn header_map(
    fields: &[httparse::Header<'_>],
    drop_length: bool,
) -> Result<HeaderMap, GatewayError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for h in fields {
        let name = h.name.as_bytes();
        let skip = match field_kind(name) {
            FieldKind::TransferEncoding => true,
            FieldKind::ContentLength => drop_length,
            _ => false,
        };
        if skip {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| bad_upstream("bad header name"))?;
        let value =
            HeaderValue::from_bytes(h.value).map_err(|_| bad_upstream("bad header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// What a head's framing and connection fields say.
#[derive(Default, Debug)]
struct Fields {
    /// With `Transfer-Encoding`: whether its last coding is `chunked`.
    chunked: Option<bool>,
    length: Option<u64>,
    /// `Connection: close`.
    close: bool,
    /// `Connection` names fields other than `close` and `keep-alive`.
    lists_others: bool,
}

impl Fields {
    /// Takes note of the framing and connection fields.
    fn note(&mut self, kind: FieldKind, value: &[u8]) -> Result<(), GatewayError> {
        match kind {
            FieldKind::ContentLength => {
                let n =
                    content_length(value).ok_or_else(|| bad_upstream("invalid Content-Length"))?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(bad_upstream("conflicting Content-Length values"));
                }
                self.length = Some(n);
            }
            FieldKind::TransferEncoding => {
                self.chunked = Some(framing::ends_in_chunked(value));
            }
            FieldKind::Connection => {
                for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        self.lists_others = true;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// How the body of a response to `method` with `status` is delimited
    /// (RFC 9112 section 6.3).
    fn framing(&self, method: &Method, status: StatusCode) -> Result<Framing, GatewayError> {
        if bodiless(method, status) {
            return Ok(Framing::Empty);
        }
        Ok(match (self.chunked, self.length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
        })
    }
}

/// Whether the answer to `method` with `status` has no body, whatever its
/// fields say.
fn bodiless(method: &Method, status: StatusCode) -> bool {
    framing::bodiless(method == Method::HEAD, status)
}

/// A final response head.
pub struct Head {
    pub status: StatusCode,
    /// Empty when the fields are kept as they came (`raw`).
    pub headers: HeaderMap,
    /// The fields as they came, when no `Connection` field names others.
    raw: Option<RawFields>,
    framing: Framing,
    /// The upstream keeps the connection open after this answer.
    reusable: bool,
}

impl Head {
    /// The response, its body streamed from `lease`'s connection.
    pub fn into_response(self, lease: Lease<Conn>) -> Response<ResponseBody> {
        let state = match self.framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = ResponseBody {
            lease: Some(lease),
            state,
            reusable: self.reusable,
            trailer_bytes: 0,
            raw: self.raw,
        };
        if body.state == State::Done {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers;
        resp
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A decimal length: 1 to 19 digits, nothing else.
fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// A `Content-Length` value: a length, or a list of equal ones (RFC 9110
/// section 8.6); `None` if anything else.
pub(super) fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|b| *b == b',') {
        let n = parse_length(part.trim_ascii())?;
        if length.is_some_and(|seen| seen != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// The request line and fields: the request's own, less those `added`
/// replaces, then `added`'s; `Content-Length: 0` for methods that usually
/// carry a body, as curl and most clients send it.
fn encode_request(out: &mut Vec<u8>, parts: &http::request::Parts, added: &Added) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let own = parts
        .headers
        .iter()
        .filter(|(name, _)| !added.replaces(name));
    for (name, value) in own.chain(added.iter().map(|(n, v)| (n, v))) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body_method = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if body_method && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

impl Conn {
    /// Reads more of the answer into the buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        reserve(&mut self.buf);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

fn bad_upstream(what: &'static str) -> GatewayError {
    tracing::debug!(
        problem = what,
        "upstream answered with a malformed response"
    );
    GatewayError::UpstreamUnavailable
}

fn broken(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Where the body reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
    Broken,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section.
    Trailers,
}

/// What one decoding step found in the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Data(Bytes),
    NeedMore,
    End,
}

/// Decodes what it can of a chunked body at the start of `buf`.
fn decode_chunked(
    chunk: &mut Chunk,
    buf: &mut BytesMut,
    trailer_bytes: &mut usize,
) -> Result<Step, io::Error> {
    loop {
        match *chunk {
            Chunk::Size => {
                let Some(line) = line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Step::NeedMore);
                };
                let size = chunk_size(&line)?;
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = left.min(buf.len() as u64);
                *chunk = match left - n {
                    0 => Chunk::DataEnd,
                    rest => Chunk::Data(rest),
                };
                return Ok(Step::Data(buf.split_to(n as usize).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(broken("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(line) = line(buf, MAX_TRAILER_BYTES.saturating_sub(*trailer_bytes))?
                else {
                    return Ok(Step::NeedMore);
                };
                if line.is_empty() {
                    return Ok(Step::End);
                }
                *trailer_bytes += line.len() + 2;
            }
        }
    }
}

/// The CRLF-terminated line at the start of `buf`, without its CRLF, taken
/// out of it; `None` if incomplete; an error past `max` bytes or for a bare LF.
fn line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, io::Error> {
    match memchr::memchr(b'\n', buf) {
        Some(i) if i > max => Err(broken("chunked line too long")),
        Some(0) => Err(broken("bare LF in chunked body")),
        Some(i) if buf[i - 1] != b'\r' => Err(broken("bare LF in chunked body")),
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i - 1);
            Ok(Some(line))
        }
        None if buf.len() > max => Err(broken("chunked line too long")),
        None => Ok(None),
    }
}

/// `chunk-size [ chunk-ext ]`: hex digits, then nothing or (after optional
/// whitespace) `;` and extensions, which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, io::Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(broken("bad chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(broken("bad chunk size"));
    }
    if rest.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return Err(broken("control character in a chunk extension"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| broken("bad chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| broken("bad chunk size"))
}

/// What one pass of [`ResponseBody::poll_frame`] came to.
enum Outcome {
    /// Body bytes; `true` if they were the last.
    Data(Bytes, bool),
    End,
    /// A read into the buffer returned.
    Filled(io::Result<usize>),
    Failed(io::Error),
}

/// An upstream response body read from its connection as the client reads
/// it. Read to its end, the connection goes back to the pool when it can;
/// dropped before that, the connection is closed with it.
pub struct ResponseBody {
    lease: Option<Lease<Conn>>,
    state: State,
    reusable: bool,
    trailer_bytes: usize,
    /// The answer's fields as they came, until the writer of the answer
    /// takes them (they travel with the body, which every path hands on
    /// whole, rather than in the response's extensions, which allocate).
    raw: Option<RawFields>,
}

impl ResponseBody {
    /// The answer's fields as they came, if they were kept that way and not
    /// taken yet. Whoever writes the answer must take them: the response's
    /// `HeaderMap` holds none of them.
    pub fn take_raw_fields(&mut self) -> Option<RawFields> {
        self.raw.take()
    }

    /// The body ended where its framing says: hand the connection back if
    /// nothing follows it.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(lease) = self.lease.take()
            && self.reusable
            && lease.conn().buf.is_empty()
        {
            lease.release();
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state = State::Broken;
        self.lease = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(lease) = this.lease.as_mut() else {
                return match this.state {
                    State::Broken => Poll::Ready(Some(Err(broken("upstream body broken")))),
                    _ => Poll::Ready(None),
                };
            };
            let conn = lease.conn_mut();
            let outcome = match &mut this.state {
                State::Done | State::Broken => return Poll::Ready(None),
                State::Length(left) if !conn.buf.is_empty() => {
                    let n = (*left).min(conn.buf.len() as u64);
                    *left -= n;
                    Outcome::Data(conn.buf.split_to(n as usize).freeze(), *left == 0)
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    Outcome::Data(conn.buf.split().freeze(), false)
                }
                State::Chunked(chunk) => {
                    match decode_chunked(chunk, &mut conn.buf, &mut this.trailer_bytes) {
                        Ok(Step::Data(data)) => Outcome::Data(data, false),
                        Ok(Step::End) => Outcome::End,
                        Ok(Step::NeedMore) => Outcome::Filled(ready!(conn.poll_fill(cx))),
                        Err(e) => Outcome::Failed(e),
                    }
                }
                State::Length(_) | State::UntilClose => Outcome::Filled(ready!(conn.poll_fill(cx))),
            };
            match outcome {
                Outcome::Data(data, end) => {
                    if end {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Outcome::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Outcome::Filled(Ok(0)) if this.state == State::UntilClose => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Outcome::Filled(Ok(0)) => {
                    return this.fail(broken("upstream closed before the body ended"));
                }
                Outcome::Filled(Ok(_)) => {}
                Outcome::Filled(Err(e)) | Outcome::Failed(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded body and how many input bytes the decoder consumed.
    fn decode_all(input: &[u8], splits: &[usize]) -> Result<(Vec<u8>, usize), io::Error> {
        let mut chunk = Chunk::Size;
        let mut trailers = 0;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut cuts = splits.iter().copied().chain(std::iter::once(input.len()));
        loop {
            match decode_chunked(&mut chunk, &mut buf, &mut trailers)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::End => return Ok((out, fed - buf.len())),
                Step::NeedMore => {
                    let Some(to) = cuts.next() else {
                        return Err(broken("input ended"));
                    };
                    buf.extend_from_slice(&input[fed..to.max(fed)]);
                    fed = to.max(fed);
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let input = b"5\r\nhello\r\n1;name=value\r\n \r\n10 ; ext\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let whole = decode_all(input, &[]).unwrap();
        assert_eq!(whole.0, b"hello 0123456789abcdef");
        assert_eq!(whole.1, input.len() - b"NEXT".len());
        for cut in 0..input.len() {
            assert_eq!(decode_all(input, &[cut]).unwrap(), whole, "cut at {cut}");
        }
        let every_byte: Vec<usize> = (1..input.len()).collect();
        assert_eq!(decode_all(input, &every_byte).unwrap(), whole);
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5;a\x01b\r\nhello\r\n0\r\n\r\n",
            b"\r\n",
        ] {
            assert!(
                decode_all(bad, &[]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(decode_all(long.as_bytes(), &[]).is_err());
        let trailers = format!("0\r\nx: {}\r\n\r\n", "t".repeat(MAX_TRAILER_BYTES));
        assert!(decode_all(trailers.as_bytes(), &[]).is_err());
    }

    /// The framing of a head with `fields`.
    fn framing_of(
        method: &Method,
        status: StatusCode,
        fields: &[(&str, &str)],
    ) -> Result<Framing, GatewayError> {
        let mut noted = Fields::default();
        for (n, v) in fields {
            noted.note(field_kind(n.as_bytes()), v.as_bytes())?;
        }
        noted.framing(method, status)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        let f = framing_of;
        let head = f(&Method::HEAD, ok, &[("content-length", "5")]);
        assert_eq!(head.unwrap(), Framing::Empty);
        assert_eq!(
            f(&get, StatusCode::NO_CONTENT, &[]).unwrap(),
            Framing::Empty
        );
        assert_eq!(
            f(&get, StatusCode::NOT_MODIFIED, &[]).unwrap(),
            Framing::Empty
        );
        let cl = |v| f(&get, ok, &[("Content-Length", v)]);
        assert_eq!(cl("5").unwrap(), Framing::Length(5));
        assert_eq!(cl("5, 5").unwrap(), Framing::Length(5));
        assert_eq!(f(&get, ok, &[]).unwrap(), Framing::UntilClose);
        let te = |v| f(&get, ok, &[("transfer-encoding", v)]);
        assert_eq!(te("gzip, chunked").unwrap(), Framing::Chunked);
        assert_eq!(te("chunked, gzip").unwrap(), Framing::UntilClose);
        for bad in ["5, 6", "-1", "+5", "0x5", "", "99999999999999999999"] {
            assert!(cl(bad).is_err(), "{bad}");
        }
        let two = [("content-length", "5"), ("content-length", "6")];
        assert!(f(&get, ok, &two).is_err());
        // Transfer-Encoding wins over Content-Length, whatever the order.
        let both = [("content-length", "5"), ("transfer-encoding", "chunked")];
        assert_eq!(f(&get, ok, &both).unwrap(), Framing::Chunked);
    }

    #[test]
    fn connection_naming_other_fields_is_noted() {
        let mut noted = Fields::default();
        noted
            .note(field_kind(b"Connection"), b"keep-alive")
            .unwrap();
        noted.note(field_kind(b"Keep-Alive"), b"timeout=5").unwrap();
        assert!(!noted.close && !noted.lists_others);
        noted
            .note(field_kind(b"connection"), b"Keep-Alive, Close")
            .unwrap();
        assert!(noted.close && !noted.lists_others);
        noted
            .note(field_kind(b"connection"), b" , x-secret")
            .unwrap();
        assert!(noted.lists_others);
    }

    #[test]
    fn requests_are_encoded_as_sent() {
        let mut req = http::Request::post("/a/b?c=d").body(()).unwrap();
        req.headers_mut()
            .insert("host", HeaderValue::from_static("up"));
        req.headers_mut()
            .append("x-two", HeaderValue::from_static("1"));
        req.headers_mut()
            .append("x-two", HeaderValue::from_static("2"));
        req.headers_mut()
            .insert("x-forwarded-host", HeaderValue::from_static("forged"));
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_request(&mut out, &parts, &Added::default());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: up\r\nx-two: 1\r\nx-two: 2\r\ncontent-length: 0\r\n\r\n"
        );
        // Fields keygate sets replace the client's, and go last.
        let mut added = Added::default();
        added.push(header::HOST, HeaderValue::from_static("upstream"));
        added.push(
            HeaderName::from_static("x-two"),
            HeaderValue::from_static("3"),
        );
        let mut out = Vec::new();
        encode_request(&mut out, &parts, &added);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: upstream\r\nx-two: 3\r\ncontent-length: 0\r\n\r\n"
        );
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let mut out = Vec::new();
        encode_request(&mut out, &parts, &Added::default());
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }
}
