//! HTTP/2 abuse with raw frames (h2c with prior knowledge on the proxy
//! listener): rapid reset (CVE-2023-44487), MadeYouReset (CVE-2025-8671), the
//! CONTINUATION flood (CVE-2024-27316 class), too many concurrent streams and
//! huge header lists. A small frame writer over a TCP stream sends exactly the
//! frames an attacker would (no client library would); HPACK blocks use
//! literals without indexing, so no encoder state is involved.
//!
//! Each attack runs while a [`Prober`] sends normal requests on other
//! connections: they must all succeed within a bound. The attack connection
//! must be closed with GOAWAY `ENHANCE_YOUR_CALM` where h2 (0.4.20 in
//! Cargo.lock, with the fixes for all three CVEs) does so, and the upstream
//! must see a bounded number of requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{Prober, Site, WAIT, public_route};
use crate::common::upstream::Upstream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// One frame: type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    assert!(len < 1 << 24, "frame payload too long");
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 section 5.1).
fn hpack_int(out: &mut Vec<u8>, prefix: u8, flags: u8, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(flags | n as u8);
        return;
    }
    out.push(flags | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// A literal header field without indexing, new name, no Huffman.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, 0x00, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 7, 0x00, value.len());
    out.extend_from_slice(value);
}

/// The header block of a request: pseudo-headers, then `extra`.
fn request_block(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_literal(&mut b, ":method", method.as_bytes());
    hpack_literal(&mut b, ":scheme", b"http");
    hpack_literal(&mut b, ":path", path.as_bytes());
    hpack_literal(&mut b, ":authority", b"gw.test");
    for (k, v) in extra {
        hpack_literal(&mut b, k, v.as_bytes());
    }
    b
}

/// A whole GET on `stream` in one HEADERS frame.
fn get(stream: u32, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        stream,
        &request_block("GET", path, &[]),
    )
}

/// The `:status` of a response header block, when it is the first field and
/// encoded as a static-table index or a literal with name index 8 (what h2
/// sends); `None` otherwise.
fn decode_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    // Indexed: 8..=14 are :status 200 204 206 304 400 404 500.
    let indexed = [200, 204, 206, 304, 400, 404, 500];
    if first & 0x80 != 0 {
        let i = (first & 0x7f) as usize;
        return indexed.get(i.checked_sub(8)?).copied();
    }
    // Literal with incremental indexing (01xxxxxx), without indexing
    // (0000xxxx) or never indexed (0001xxxx), name index 8.
    let name_index = match first {
        f if f & 0xc0 == 0x40 => f & 0x3f,
        f if f & 0xf0 == 0x00 || f & 0xf0 == 0x10 => f & 0x0f,
        _ => return None,
    };
    if name_index != 8 {
        return None;
    }
    let len_byte = *block.get(1)?;
    let (huffman, len) = (len_byte & 0x80 != 0, (len_byte & 0x7f) as usize);
    let raw = block.get(2..2 + len)?;
    let digits = match huffman {
        false => String::from_utf8(raw.to_vec()).ok()?,
        true => huffman_digits(raw)?,
    };
    digits.parse().ok()
}

/// Decodes a Huffman string made only of digits (RFC 7541 appendix B: `0`-`2`
/// are 5-bit codes 0-2, `3`-`9` are 6-bit codes 25-31), padding of ones.
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    while i + 5 <= bits.len() {
        let five = bits[i..i + 5].iter().fold(0u8, |a, b| a << 1 | b);
        if five <= 2 {
            out.push((b'0' + five) as char);
            i += 5;
            continue;
        }
        if bits[i..].iter().all(|&b| b == 1) {
            break; // padding
        }
        let six = bits.get(i..i + 6)?.iter().fold(0u8, |a, b| a << 1 | b);
        if !(25..=31).contains(&six) {
            return None;
        }
        out.push((b'3' + six - 25) as char);
        i += 6;
    }
    Some(out)
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// What the server did on an attack connection.
#[derive(Default)]
struct Summary {
    /// GOAWAY: (last stream id, error code, debug data).
    goaway: Option<(u32, u32, String)>,
    /// RST_STREAM counts by error code.
    resets: BTreeMap<u32, usize>,
    /// Response statuses by stream (`None`: not decodable).
    statuses: BTreeMap<u32, Option<u16>>,
    /// Streams the server ended (END_STREAM).
    ended: usize,
    /// The server closed the connection.
    closed: bool,
    /// The server's SETTINGS.
    settings: BTreeMap<u16, u32>,
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut by_status: BTreeMap<Option<u16>, usize> = BTreeMap::new();
        for s in self.statuses.values() {
            *by_status.entry(*s).or_default() += 1;
        }
        f.debug_struct("Summary")
            .field("goaway", &self.goaway)
            .field("resets_by_code", &self.resets)
            .field("responses_by_status", &by_status)
            .field("ended", &self.ended)
            .field("closed", &self.closed)
            .field("settings", &self.settings)
            .finish()
    }
}

impl Summary {
    fn goaway_code(&self) -> Option<u32> {
        self.goaway.as_ref().map(|g| g.1)
    }

    fn status_count(&self, status: u16) -> usize {
        self.statuses
            .values()
            .filter(|s| **s == Some(status))
            .count()
    }
}

/// A raw HTTP/2 client connection.
struct H2 {
    rd: OwnedReadHalf,
    /// `None` once handed to a writer task ([`H2::send_in_background`]).
    wr: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
    summary: Summary,
}

impl H2 {
    /// Connects, sends the preface and SETTINGS (large windows, so responses
    /// are never held back by flow control) and acknowledges the server's.
    async fn open(addr: SocketAddr) -> H2 {
        let stream = TcpStream::connect(addr).await.expect("connect for h2");
        stream.set_nodelay(true).expect("nodelay");
        let (rd, wr) = stream.into_split();
        let mut h2 = H2 {
            rd,
            wr: Some(wr),
            buf: Vec::new(),
            summary: Summary::default(),
        };
        let mut hello = PREFACE.to_vec();
        let mut settings = Vec::new();
        settings.extend_from_slice(&SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes());
        settings.extend_from_slice(&(1u32 << 30).to_be_bytes());
        hello.extend(frame(SETTINGS, 0, 0, &settings));
        hello.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes()));
        h2.send(&hello).await.expect("send the preface");
        let deadline = Instant::now() + WAIT;
        while h2.summary.settings.is_empty() {
            match h2.next(deadline).await {
                Some(_) => {}
                None => panic!("no SETTINGS from the server: {:?}", h2.summary),
            }
        }
        h2.send(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("ack SETTINGS");
        h2
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let wr = self
            .wr
            .as_mut()
            .expect("the write half is with a writer task");
        wr.write_all(bytes).await
    }

    /// Writes `bytes` from a separate task, so the server's answers are read
    /// while it writes (write errors once the server closed are expected).
    fn send_in_background(&mut self, bytes: Vec<u8>) -> tokio::task::JoinHandle<()> {
        let mut wr = self.wr.take().expect("one writer task per connection");
        tokio::spawn(async move {
            for chunk in bytes.chunks(64 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
        })
    }

    /// The next frame (also recorded in the summary), or `None` once the
    /// server closed or `deadline` passed.
    async fn next(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    self.record(&f);
                    return Some(f);
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout_at(deadline.into(), self.rd.read(&mut chunk)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.summary.closed = true;
                    return None;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    fn record(&mut self, f: &Frame) {
        let s = &mut self.summary;
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => {
                for pair in f.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([pair[0], pair[1]]);
                    let v = u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                    s.settings.insert(id, v);
                }
            }
            GOAWAY if f.payload.len() >= 8 => {
                let last = u32::from_be_bytes(f.payload[0..4].try_into().expect("4 bytes"));
                let code = u32::from_be_bytes(f.payload[4..8].try_into().expect("4 bytes"));
                let debug = String::from_utf8_lossy(&f.payload[8..]).into_owned();
                s.goaway = Some((last & 0x7fff_ffff, code, debug));
            }
            RST_STREAM if f.payload.len() == 4 => {
                let code = u32::from_be_bytes(f.payload[..].try_into().expect("4 bytes"));
                *s.resets.entry(code).or_default() += 1;
            }
            HEADERS => {
                s.statuses
                    .entry(f.stream)
                    .or_insert_with(|| decode_status(&f.payload));
                if f.flags & END_STREAM != 0 {
                    s.ended += 1;
                }
            }
            DATA if f.flags & END_STREAM != 0 => s.ended += 1,
            _ => {}
        }
    }

    /// Reads frames until `done` holds, the server closes, or `limit` passes
    /// (once a GOAWAY came, waits at most a second more for the close).
    async fn drain(&mut self, limit: Duration, done: impl Fn(&Summary) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(&self.summary) {
            let deadline = match self.summary.goaway {
                Some(_) => deadline.min(Instant::now() + Duration::from_secs(1)),
                None => deadline,
            };
            if self.next(deadline).await.is_none() {
                return;
            }
        }
    }
}

/// Opens an HTTP/2 CONNECT to `authority` on a new h2c connection; returns
/// the response status, or `None` if the stream was reset or the connection
/// closed.
pub(super) async fn connect_over_h2c(addr: SocketAddr, authority: &str) -> Option<u16> {
    let mut h2 = H2::open(addr).await;
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", b"CONNECT");
    hpack_literal(&mut block, ":authority", authority.as_bytes());
    h2.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .expect("send CONNECT");
    h2.drain(WAIT, |s| {
        s.statuses.contains_key(&1) || !s.resets.is_empty()
    })
    .await;
    h2.summary.statuses.get(&1).copied().flatten()
}

/// A site with an extra public route `/attack/` on its own upstream, so the
/// upstream requests an attack caused can be counted apart from the probes.
async fn attack_site() -> (Site, Upstream) {
    let attack = Upstream::named("attack").await;
    let route = public_route("attack", "/attack/", &attack, ", timeout: 10s");
    let site = Site::with(|b| b.route(&route)).await;
    (site, attack)
}

/// The prober's bound on a normal request while an attack runs (debug build,
/// two shared cores).
const RESPONSIVE: Duration = Duration::from_secs(3);

/// CVE-2023-44487: streams opened and cancelled at once, thousands per
/// connection. h2 closes the connection with GOAWAY ENHANCE_YOUR_CALM once
/// more than `max_pending_accept_reset_streams` (20) are pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_and_others_are_served() {
    const STREAMS: u32 = 5_000;
    const ROUNDS: usize = 3;
    let (site, attack) = attack_site().await;
    let prober = Prober::start(site.kg.proxy, Duration::from_millis(100));
    for round in 0..ROUNDS {
        let mut h2 = H2::open(site.kg.proxy).await;
        let mut bytes = Vec::new();
        for i in 0..STREAMS {
            let id = 2 * i + 1;
            bytes.extend(get(id, "/attack/slow/500"));
            bytes.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        let writer = h2.send_in_background(bytes);
        h2.drain(WAIT, |s| s.closed).await;
        writer.abort();
        let s = &h2.summary;
        println!("rapid reset round {round}: {s:?}");
        assert_eq!(
            s.goaway_code(),
            Some(ENHANCE_YOUR_CALM),
            "round {round}: expected GOAWAY ENHANCE_YOUR_CALM: {s:?}"
        );
        assert!(
            s.closed,
            "round {round}: the connection must be closed: {s:?}"
        );
    }
    // Let cancelled upstream requests settle, then count them.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let hits = attack.hits();
    println!(
        "rapid reset: {} streams opened and cancelled, {hits} reached the upstream",
        STREAMS as usize * ROUNDS
    );
    assert!(
        hits <= 200 * ROUNDS as u64,
        "{hits} of {} cancelled streams reached the upstream",
        STREAMS as usize * ROUNDS
    );
    prober.finish("rapid reset", 3, RESPONSIVE).await;
}

/// CVE-2025-8671 (MadeYouReset): each stream is made invalid by the client
/// (a WINDOW_UPDATE overflowing its window) so that the *server* resets it
/// while the request may still be running. The attack works when such
/// streams stop counting against the concurrency limit while the upstream
/// keeps working for them. Here they keep counting (the 101st stream is
/// refused), and h2 sends GOAWAY ENHANCE_YOUR_CALM once the server-side
/// resets and refusals pass `max_local_error_reset_streams` (256).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_you_reset_is_cut_off_and_others_are_served() {
    const STREAMS: u32 = 2_000;
    let (site, attack) = attack_site().await;
    let prober = Prober::start(site.kg.proxy, Duration::from_millis(100));
    let mut h2 = H2::open(site.kg.proxy).await;
    let mut bytes = Vec::new();
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        bytes.extend(get(id, "/attack/slow/2000"));
        bytes.extend(frame(WINDOW_UPDATE, 0, id, &0x7fff_ffffu32.to_be_bytes()));
    }
    let writer = h2.send_in_background(bytes);
    h2.drain(WAIT, |s| s.closed).await;
    writer.abort();
    let s = &h2.summary;
    println!("MadeYouReset: {s:?}");
    assert_eq!(
        s.goaway,
        Some((
            199,
            ENHANCE_YOUR_CALM,
            "too_many_internal_resets".to_owned()
        )),
        "expected GOAWAY ENHANCE_YOUR_CALM after the first 100 streams: {s:?}"
    );
    assert!(s.closed, "the connection must be closed: {s:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = attack.hits();
    println!("MadeYouReset: {STREAMS} streams sent, {hits} reached the upstream");
    assert!(
        hits <= 100,
        "{hits} streams reached the upstream: server-reset streams must keep \
         counting against the 100 concurrent streams while their request runs"
    );
    prober.finish("MadeYouReset", 3, RESPONSIVE).await;
}

/// CONTINUATION flood: a header block that never ends, with growing or empty
/// CONTINUATION frames. h2 caps the frames per block and the block size and
/// closes the connection; keygate's memory does not grow with the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off_in_bounded_memory() {
    let (site, attack) = attack_site().await;
    let prober = Prober::start(site.kg.proxy, Duration::from_millis(100));
    let rss_before = site.kg.rss_kb();
    let mut filler = Vec::new();
    let value = vec![b'c'; 16 * 1024 - 64];
    hpack_literal(&mut filler, "x-flood", &value);
    for (what, payload) in [("16 KiB frames", filler), ("empty frames", Vec::new())] {
        let mut h2 = H2::open(site.kg.proxy).await;
        let mut bytes = frame(
            HEADERS,
            END_STREAM,
            1,
            &request_block("GET", "/attack/c", &[]),
        );
        for _ in 0..2_000 {
            bytes.extend(frame(CONTINUATION, 0, 1, &payload));
        }
        let writer = h2.send_in_background(bytes);
        h2.drain(WAIT, |s| s.closed).await;
        writer.abort();
        let s = &h2.summary;
        println!("CONTINUATION flood, {what}: {s:?}");
        assert!(
            matches!(s.goaway_code(), Some(ENHANCE_YOUR_CALM) | Some(0x9)),
            "{what}: expected GOAWAY ENHANCE_YOUR_CALM (or COMPRESSION_ERROR): {s:?}"
        );
        assert!(s.closed, "{what}: the connection must be closed: {s:?}");
    }
    let grown = site.kg.rss_kb().saturating_sub(rss_before);
    println!("CONTINUATION flood: keygate RSS grew by {grown} KiB");
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB during the flood"
    );
    assert_eq!(
        attack.hits(),
        0,
        "an unfinished header block reached the upstream"
    );
    prober.finish("CONTINUATION flood", 3, RESPONSIVE).await;
}

/// `limits.h2_max_concurrent_streams` (100) is advertised and enforced:
/// streams past it are refused (RST_STREAM REFUSED_STREAM) and never reach
/// the upstream; a connection that keeps opening refused streams is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_are_capped() {
    let (site, attack) = attack_site().await;
    let prober = Prober::start(site.kg.proxy, Duration::from_millis(100));

    let mut h2 = H2::open(site.kg.proxy).await;
    let settings = h2.summary.settings.clone();
    assert_eq!(
        settings.get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&100),
        "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(&(64 * 1024)),
        "SETTINGS_MAX_HEADER_LIST_SIZE: {settings:?}"
    );
    let mut bytes = Vec::new();
    for i in 0..150 {
        bytes.extend(get(2 * i + 1, "/attack/slow/1500"));
    }
    h2.send(&bytes).await.expect("send 150 streams");
    h2.drain(Duration::from_secs(10), |s| {
        s.ended + s.resets.values().sum::<usize>() >= 150
    })
    .await;
    let s = &h2.summary;
    println!("150 streams at once: {s:?}");
    assert_eq!(s.status_count(200), 100, "100 streams served: {s:?}");
    assert_eq!(
        s.resets.get(&REFUSED_STREAM),
        Some(&50),
        "50 streams refused: {s:?}"
    );
    assert_eq!(
        attack.hits(),
        100,
        "only the admitted streams reach the upstream"
    );
    assert_eq!(s.goaway, None, "{s:?}");

    // Opening refused streams without end: the connection is closed.
    let mut h2 = H2::open(site.kg.proxy).await;
    let mut bytes = Vec::new();
    for i in 0..1_000 {
        bytes.extend(get(2 * i + 1, "/attack/slow/1500"));
    }
    let writer = h2.send_in_background(bytes);
    h2.drain(WAIT, |s| s.closed).await;
    writer.abort();
    let s = &h2.summary;
    println!("1000 streams at once: {s:?}");
    assert_eq!(s.goaway_code(), Some(ENHANCE_YOUR_CALM), "{s:?}");
    prober.finish("too many streams", 3, RESPONSIVE).await;
}

/// Header lists over `limits.max_header_bytes` (64 KiB) or over
/// `limits.max_headers` (100 fields) are 431 on their stream, never
/// forwarded, and the connection goes on serving; a header block far over
/// the limit closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_lists_are_refused() {
    let (site, attack) = attack_site().await;
    let names: Vec<String> = (0..2_000).map(|i| format!("x-h-{i:04}")).collect();

    // Each on its own connection, so the 431 is the first response there
    // (this client decodes only static-table and literal statuses), followed
    // by a normal request on the same connection.
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let few: Vec<(&str, &str)> = names[..150].iter().map(|n| (n.as_str(), "v")).collect();
    let cases = [
        // 2,000 small fields: about 90 KB decoded, HEADERS plus CONTINUATION.
        (
            "90 KB of header fields",
            request_block("GET", "/attack/big", &many),
        ),
        // 150 fields of 16 bytes: small, but more than 100 fields.
        (
            "150 header fields",
            request_block("GET", "/attack/fields", &few),
        ),
    ];
    for (what, block) in cases {
        let mut h2 = H2::open(site.kg.proxy).await;
        let split = block.len().min(16 * 1024);
        let (head, rest) = block.split_at(split);
        let mut bytes = match rest.is_empty() {
            true => frame(HEADERS, END_STREAM | END_HEADERS, 1, head),
            false => {
                let mut b = frame(HEADERS, END_STREAM, 1, head);
                b.extend(frame(CONTINUATION, END_HEADERS, 1, rest));
                b
            }
        };
        bytes.extend(get(3, "/attack/ok"));
        h2.send(&bytes).await.expect("send");
        h2.drain(WAIT, |s| s.ended >= 2).await;
        let s = &h2.summary;
        println!("{what}: {s:?}");
        assert_eq!(s.statuses.get(&1), Some(&Some(431)), "{what}: {s:?}");
        assert_eq!(
            s.statuses.get(&3),
            Some(&Some(200)),
            "{what}: the connection goes on: {s:?}"
        );
        assert_eq!(s.goaway, None, "{what}: {s:?}");
    }
    let seen: Vec<String> = attack.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        seen,
        vec!["/attack/ok".to_owned(), "/attack/ok".to_owned()],
        "only the normal requests are forwarded"
    );

    // One 1 MiB header value spread over CONTINUATION frames: connection closed.
    let mut h2 = H2::open(site.kg.proxy).await;
    let mut block = request_block("GET", "/attack/huge", &[]);
    hpack_literal(&mut block, "x-huge", &vec![b'h'; 1 << 20]);
    let mut chunks = block.chunks(16 * 1024);
    let mut bytes = frame(HEADERS, END_STREAM, 1, chunks.next().expect("a chunk"));
    let rest: Vec<&[u8]> = chunks.collect();
    for (i, c) in rest.iter().enumerate() {
        let flags = if i + 1 == rest.len() { END_HEADERS } else { 0 };
        bytes.extend(frame(CONTINUATION, flags, 1, c));
    }
    let writer = h2.send_in_background(bytes);
    h2.drain(WAIT, |s| s.closed).await;
    writer.abort();
    let s = &h2.summary;
    println!("1 MiB header value: {s:?}");
    assert!(s.goaway.is_some() && s.closed, "{s:?}");
    assert!(
        !attack.seen().iter().any(|s| s.target == "/attack/huge"),
        "the huge header list was forwarded"
    );
}
