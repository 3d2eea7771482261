//! A watcher of HTTP/1 request framing, in front of hyper.
//!
//! DESIGN.md promises that a request with both `Content-Length` and
//! `Transfer-Encoding` is answered 400 and never forwarded. hyper treats such
//! a request by RFC 9112 section 6.3 (Transfer-Encoding wins, the connection
//! closes afterwards) and drops the `Content-Length` before keygate sees the
//! request, so the conflict cannot be seen from the handler. [`FramingGuard`]
//! wraps the connection's reads, follows HTTP/1 message boundaries (heads,
//! Content-Length bodies, chunked bodies) and records, for each request head
//! in order, whether it had both headers. The handler pops one verdict per
//! HTTP/1 request ([`Verdicts::next_conflicted`]) and refuses conflicted ones;
//! hyper then closes the connection, so nothing after them is read as a new
//! request.
//!
//! HTTP/2 connections (the client preface) and anything the watcher cannot
//! follow (an oversized head) switch it off: hyper's own parser rejects those.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Per-connection verdicts, one per HTTP/1 request head, in order.
#[derive(Debug, Default, Clone)]
pub struct Verdicts(Arc<Mutex<VecDeque<bool>>>);

impl Verdicts {
    /// Whether the next request on this connection had both Content-Length
    /// and Transfer-Encoding. Call once per HTTP/1 request, in order.
    pub fn next_conflicted(&self) -> bool {
        match self.0.lock() {
            Ok(mut q) => q.pop_front().unwrap_or(false),
            Err(poisoned) => poisoned.into_inner().pop_front().unwrap_or(false),
        }
    }

    fn push(&self, conflicted: bool) {
        match self.0.lock() {
            Ok(mut q) => q.push_back(conflicted),
            Err(poisoned) => poisoned.into_inner().push_back(conflicted),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Collecting a request head (bytes so far in `head`).
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailers,
    /// Not watching any more (HTTP/2, or past a conflict or an oversized head).
    Off,
}

/// Wraps an I/O stream and watches the HTTP/1 requests read from it.
pub struct FramingGuard<S> {
    inner: S,
    state: State,
    /// The head being collected, or the current chunk-size/trailer line.
    line: Vec<u8>,
    max_head: usize,
    verdicts: Verdicts,
}

impl<S> FramingGuard<S> {
    pub fn new(inner: S, max_head: usize, verdicts: Verdicts) -> FramingGuard<S> {
        FramingGuard {
            inner,
            state: State::Head,
            line: Vec::new(),
            max_head: max_head + 1024,
            verdicts,
        }
    }

    /// Follows `data` through the message grammar.
    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => {
                    // Skip empty lines between requests (RFC 9112 section 2.2).
                    if self.line.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        // The usual case: the whole head in this read. Judge
                        // it in place, no copy.
                        if let Some(i) = memchr::memmem::find(data, b"\r\n\r\n") {
                            if data.starts_with(H2_PREFACE) {
                                self.state = State::Off;
                                return;
                            }
                            let (conflicted, next) = after_head(&data[..i + 4]);
                            self.verdicts.push(conflicted);
                            self.state = next;
                            data = &data[i + 4..];
                            continue;
                        }
                    }
                    let start = self.line.len().saturating_sub(3);
                    self.line.extend_from_slice(data);
                    match find(&self.line[start..], b"\r\n\r\n") {
                        Some(i) => {
                            let end = start + i + 4;
                            if self.line.starts_with(H2_PREFACE) {
                                self.state = State::Off;
                                return;
                            }
                            let (conflicted, next) = after_head(&self.line[..end]);
                            self.verdicts.push(conflicted);
                            self.state = next;
                            // Continue with what followed the head in this read
                            // (usually nothing: no allocation then).
                            let rest = self.line[end..].to_vec();
                            self.line.clear();
                            if !rest.is_empty() {
                                self.observe(&rest);
                            }
                            return;
                        }
                        None if self.line.len() > self.max_head => {
                            self.line = Vec::new();
                            self.state = State::Off;
                            return;
                        }
                        None => return,
                    }
                }
                State::Body(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if n == take {
                        State::Head
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > 4096 {
                            self.state = State::Off;
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    let text = trim_crlf(&self.line);
                    let next = match self.state {
                        State::ChunkSize => match parse_chunk_size(text) {
                            Some(0) => State::Trailers,
                            // Chunk data plus its CRLF.
                            Some(n) => State::ChunkData(n.saturating_add(2)),
                            None => State::Off,
                        },
                        _ if text.is_empty() => State::Head,
                        _ => State::Trailers,
                    };
                    self.state = next;
                    self.line.clear();
                }
                State::ChunkData(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if n == take {
                        State::ChunkSize
                    } else {
                        State::ChunkData(n - take)
                    };
                }
            }
        }
    }
}

/// The verdict for a complete head (both Content-Length and
/// Transfer-Encoding?) and the body state that follows it.
fn after_head(head: &[u8]) -> (bool, State) {
    let mut content_length: Option<u64> = None;
    let mut has_cl = false;
    let mut chunked = false;
    let mut has_te = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        // Only two names matter; most lines start with another letter.
        if !matches!(line.first(), Some(b'c' | b'C' | b't' | b'T')) {
            continue;
        }
        let line = trim_crlf(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = trim_ws(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            has_cl = true;
            content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            chunked = ends_in_chunked(value);
        }
    }
    if has_cl && has_te {
        // hyper closes the connection after this request: stop watching.
        return (true, State::Off);
    }
    let next = match (chunked, content_length) {
        (true, _) => State::ChunkSize,
        (false, Some(n)) if n > 0 => State::Body(n),
        (false, _) if has_te => State::Off,
        _ => State::Head,
    };
    (false, next)
}

/// Whether an answer with `status`, to a HEAD request or not, has no body
/// whatever its fields say (RFC 9112 section 6.3).
pub fn bodiless(is_head: bool, status: http::StatusCode) -> bool {
    is_head
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`, which
/// makes the body chunked (RFC 9112 section 6.3).
pub fn ends_in_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| trim_ws(last).eq_ignore_ascii_case(b"chunked"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ws(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|&b| b == b';').next()?;
    let size = std::str::from_utf8(trim_ws(size)).ok()?;
    u64::from_str_radix(size, 16).ok()
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll
            && !matches!(this.state, State::Off)
        {
            this.observe(&buf.filled()[before..]);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_for(chunks: &[&[u8]]) -> Vec<bool> {
        let v = Verdicts::default();
        let mut g = FramingGuard::new((), 64 * 1024, v.clone());
        for c in chunks {
            g.observe(c);
        }
        let q = v.0.lock().unwrap();
        q.iter().copied().collect()
    }

    #[test]
    fn plain_requests_are_not_conflicted() {
        let r = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(verdicts_for(&[r]), vec![false, false]);
    }

    #[test]
    fn both_orders_of_cl_and_te_are_conflicted() {
        let a = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let b = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_for(&[a]), vec![true]);
        assert_eq!(verdicts_for(&[b]), vec![true]);
    }

    #[test]
    fn bodies_are_skipped_even_when_they_look_like_heads() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(verdicts_for(&[&req]), vec![false, false]);
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = req.chunks(1).collect();
        assert_eq!(verdicts_for(&bytes), vec![false, false]);
    }

    #[test]
    fn chunked_bodies_and_trailers_are_followed() {
        let req = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(verdicts_for(&[req]), vec![false, true]);
        let bytes: Vec<&[u8]> = req.chunks(3).collect();
        assert_eq!(verdicts_for(&bytes), vec![false, true]);
    }

    #[test]
    fn http2_preface_switches_the_watcher_off() {
        let req = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(verdicts_for(&[req]).is_empty());
    }
}
