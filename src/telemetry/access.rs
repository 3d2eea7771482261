//! The access log: one line per proxied request on the target [`TARGET`],
//! a JSON object per line with `logging.format: json`, `key=value` pairs in
//! the compact text format otherwise.
//!
//! Fields: `request_id`, `client`, `method`, `path` (through
//! [`super::redact`]), `route`, `status`, `code` (the problem code, or
//! `upstream` when the upstream answered), `key_id` and `owner` (never the
//! key), `upstream_status`, `duration_ms` (request head to response head),
//! `upstream_ms`, `bytes_in` and `bytes_out` (declared sizes). A field that does
//! not apply (no route, no key, no upstream call, no declared size) is left out.
//!
//! Cost: the line is written by hand into a reused per-thread buffer (no
//! `tracing` field visitors, no `fmt` machinery). On a proxy worker thread
//! (which runs [`LocalBatching`]) it is appended to that thread's own chunk,
//! handed to the log writer when it reaches [`LOCAL_CHUNK`] bytes and by a
//! task on the worker every [`FLUSH_EVERY`]: no lock is shared between
//! threads, so a request never waits for another thread (a shared batch
//! behind a mutex did: when the thread holding it was preempted, every worker
//! stalled for a scheduler slice, which showed as p99 of 20-30 ms under load).
//! Lines of one worker stay in order; lines of different workers interleave
//! by chunk (each carries its timestamp). When stderr is a regular file, a
//! chunk is written to it by the thread that filled it, with one `write(2)`,
//! as nginx writes its buffered access log: a write to the page cache does
//! not wait on a reader, and handing the chunk to the writer thread instead
//! cost a copy, a wakeup and that thread's spinning and yielding, 3-7% of the
//! proxy's CPU under load (BENCHMARKS.md, eighth session). Chunks are
//! whole lines and a regular file's offset is locked for each write, so they
//! never tear the process's other log lines. A pipe or terminal, whose
//! reader can stall, always goes through the writer thread. Other threads
//! append to a shared batch that a flusher thread hands over every
//! [`FLUSH_EVERY`]; past [`MAX_BATCH`] bytes it drops further lines
//! (counted). The log writer's queue holds at most
//! [`super::QUEUED_MESSAGES`] chunks, and drops (and counts) what does not
//! fit, so a stalled stderr cannot grow memory without bound. It keeps the
//! shape of the process's other log lines (`timestamp`, `level`, `target`,
//! `message`). Without an installed sink (a library user with its own
//! subscriber) the line goes through `tracing` as an ordinary event.

use std::cell::RefCell;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::redact::Redactor;
use super::request::{Done, Head, UPSTREAM_CODE};

/// The `tracing` target of access lines.
pub const TARGET: &str = "keygate::access";

/// How often queued access lines are handed to the log writer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Most bytes of access lines waiting for the next flush.
pub const MAX_BATCH: usize = 1 << 20;
/// A worker hands its chunk of lines to the log writer at this size.
pub const LOCAL_CHUNK: usize = 16 << 10;

/// Where access lines go: a batch for the log writer, and in which format.
pub(super) struct Sink {
    writer: tracing_appender::non_blocking::NonBlocking,
    /// stderr, when it is a regular file: chunks are written to it directly.
    file: Option<std::fs::File>,
    json: bool,
    batch: std::sync::Mutex<Vec<u8>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Sink {
    /// A sink writing through `writer`, flushed by a thread started here.
    pub(super) fn start(
        writer: tracing_appender::non_blocking::NonBlocking,
        json: bool,
    ) -> &'static Sink {
        let sink: &'static Sink = Box::leak(Box::new(Sink {
            writer,
            file: stderr_if_regular_file(),
            json,
            batch: std::sync::Mutex::new(Vec::with_capacity(64 * 1024)),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }));
        let started = std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    sink.flush();
                }
            });
        if let Err(e) = started {
            eprintln!(
                "keygate: cannot start the access-log thread ({e}); access lines are written at shutdown only"
            );
        }
        sink
    }

    fn append(&self, line: &[u8]) {
        let mut batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.len() + line.len() > MAX_BATCH {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        batch.extend_from_slice(line);
    }

    /// Hands the queued lines to the log writer (one message per batch).
    pub(super) fn flush(&self) {
        let full = {
            let mut batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            if batch.is_empty() {
                return;
            }
            std::mem::replace(&mut *batch, Vec::with_capacity(64 * 1024))
        };
        self.emit(&full);
    }

    /// Writes whole lines to stderr: itself when stderr is a regular file,
    /// through the log writer's queue otherwise.
    fn emit(&self, lines: &[u8]) {
        match &self.file {
            Some(file) => {
                let mut file: &std::fs::File = file;
                if file.write_all(lines).is_err() {
                    let lost = lines.iter().filter(|&&b| b == b'\n').count();
                    self.dropped
                        .fetch_add(lost as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            None => {
                let _ = self.writer.clone().write_all(lines);
            }
        }
    }

    /// Access lines dropped because a batch was full.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hands a worker's chunk to the log writer and empties it.
    fn hand_off(&self, chunk: &mut Vec<u8>) {
        if !chunk.is_empty() {
            self.emit(chunk);
            chunk.clear();
        }
    }
}

/// A second handle on stderr when it is a regular file (`2> file`), which
/// shares its offset, so writes through either land one after the other.
fn stderr_if_regular_file() -> Option<std::fs::File> {
    use std::os::fd::AsFd as _;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let file = std::fs::File::from(fd);
    file.metadata()
        .is_ok_and(|m| m.file_type().is_file())
        .then_some(file)
}

thread_local! {
    /// This thread's chunk of access lines, when it runs [`LocalBatching`].
    static LOCAL: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Appends `line` to this thread's chunk; false when the thread has none.
fn append_local(sink: &Sink, line: &[u8]) -> bool {
    LOCAL.with(|local| {
        let Ok(mut local) = local.try_borrow_mut() else {
            return false;
        };
        let Some(chunk) = local.as_mut() else {
            return false;
        };
        chunk.extend_from_slice(line);
        if chunk.len() >= LOCAL_CHUNK {
            sink.hand_off(chunk);
        }
        true
    })
}

/// Hands this thread's chunk to the log writer.
fn flush_local() {
    let Some(sink) = super::access_sink() else {
        return;
    };
    LOCAL.with(|local| {
        if let Ok(mut local) = local.try_borrow_mut()
            && let Some(chunk) = local.as_mut()
        {
            sink.hand_off(chunk);
        }
    });
}

/// Gives the current thread its own chunk of access lines while it lives,
/// flushed every [`FLUSH_EVERY`] by a task on the current (single-threaded)
/// runtime and once more when dropped. Made by each proxy worker at start;
/// inert when no access sink is installed.
#[must_use = "dropping it ends the thread's batching"]
pub struct LocalBatching {
    flusher: Option<tokio::task::JoinHandle<()>>,
}

impl LocalBatching {
    /// Starts batching on this thread. Call inside a `current_thread`
    /// runtime: the flush task must run on this very thread.
    pub fn start() -> LocalBatching {
        let single_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if super::access_sink().is_none() || !single_threaded {
            return LocalBatching { flusher: None };
        }
        LOCAL.with(|local| *local.borrow_mut() = Some(Vec::with_capacity(LOCAL_CHUNK * 2)));
        let flusher = tokio::spawn(async {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                flush_local();
            }
        });
        LocalBatching {
            flusher: Some(flusher),
        }
    }
}

impl Drop for LocalBatching {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            flusher.abort();
            flush_local();
            LOCAL.with(|local| {
                if let Ok(mut local) = local.try_borrow_mut() {
                    *local = None;
                }
            });
        }
    }
}

/// The fields of one line, borrowed from the request.
struct Line<'a> {
    request_id: Option<&'a str>,
    client: std::net::IpAddr,
    method: &'a str,
    path: &'a str,
    route: Option<&'a str>,
    status: u16,
    code: &'a str,
    key_id: Option<&'a str>,
    owner: Option<&'a str>,
    upstream_status: Option<u16>,
    duration: Duration,
    upstream: Option<Duration>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
}

/// Writes the access line of one request.
pub(super) fn write(redactor: &Redactor, head: &Head, done: &Done<'_>, elapsed: Duration) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let target = head
        .uri
        .path_and_query()
        .map_or(head.uri.path(), |pq| pq.as_str());
    let path = redactor.target(target);
    let key = done.exchange.key.as_deref();
    let key_id = key.map(|k| k.id().text());
    let line = Line {
        request_id: done.request_id.and_then(|v| v.to_str().ok()),
        client: done.client,
        method: head.method.as_str(),
        path: &path,
        route: done.exchange.route.map(|r| &**r),
        status: done.status.as_u16(),
        code: done.error.map_or(UPSTREAM_CODE, |e| e.code()),
        key_id: key_id.as_deref(),
        owner: key.map(|k| k.owner()),
        upstream_status: done.exchange.upstream_status.map(|s| s.as_u16()),
        duration: elapsed,
        upstream: done.exchange.upstream_elapsed,
        bytes_in: head.bytes_in,
        bytes_out: done.bytes_out,
    };
    match super::access_sink() {
        Some(sink) => line.write_to(sink),
        None => line.trace(),
    }
}

thread_local! {
    static BUFFER: RefCell<Buffer> = RefCell::new(Buffer::default());
}

/// A line being written, plus the formatted current second (timestamps of
/// consecutive lines share it).
#[derive(Default)]
struct Buffer {
    text: String,
    second: u64,
    second_text: String,
}

impl Line<'_> {
    fn write_to(&self, sink: &Sink) {
        BUFFER.with(|b| {
            let Ok(mut b) = b.try_borrow_mut() else {
                return self.trace();
            };
            let b = &mut *b;
            b.text.clear();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            if b.second != now.as_secs() || b.second_text.is_empty() {
                b.second = now.as_secs();
                b.second_text = chrono::DateTime::from_timestamp(now.as_secs() as i64, 0)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string())
                    .unwrap_or_default();
            }
            let mut w = Writer {
                out: &mut b.text,
                json: sink.json,
            };
            w.timestamp(&b.second_text, now.subsec_micros());
            self.fields(&mut w);
            w.end();
            if !append_local(sink, b.text.as_bytes()) {
                sink.append(b.text.as_bytes());
            }
        });
    }

    fn fields(&self, w: &mut Writer<'_>) {
        if let Some(id) = self.request_id {
            w.str("request_id", id);
        }
        w.ip("client", self.client);
        w.str("method", self.method);
        w.str("path", self.path);
        if let Some(r) = self.route {
            w.str("route", r);
        }
        w.uint("status", u64::from(self.status));
        w.str("code", self.code);
        if let Some(k) = self.key_id {
            w.str("key_id", k);
        }
        if let Some(o) = self.owner {
            w.str("owner", o);
        }
        if let Some(s) = self.upstream_status {
            w.uint("upstream_status", u64::from(s));
        }
        w.millis("duration_ms", self.duration);
        if let Some(u) = self.upstream {
            w.millis("upstream_ms", u);
        }
        if let Some(n) = self.bytes_in {
            w.uint("bytes_in", n);
        }
        if let Some(n) = self.bytes_out {
            w.uint("bytes_out", n);
        }
    }

    /// The line as a `tracing` event, for subscribers keygate did not install.
    fn trace(&self) {
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            client = %self.client,
            method = self.method,
            path = self.path,
            route = self.route,
            status = self.status,
            code = self.code,
            key_id = self.key_id,
            owner = self.owner,
            upstream_status = self.upstream_status,
            duration_ms = millis(self.duration),
            upstream_ms = self.upstream.map(millis),
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            "request"
        );
    }
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// Appends fields in JSON (`"name":value,`) or text (` name=value`) form.
struct Writer<'a> {
    out: &'a mut String,
    json: bool,
}

impl Writer<'_> {
    fn timestamp(&mut self, second: &str, micros: u32) {
        let mut frac = itoa::Buffer::new();
        let digits = frac.format(micros);
        let pad = &"000000"[..6 - digits.len().min(6)];
        if self.json {
            self.out.push_str("{\"timestamp\":\"");
            self.out.push_str(second);
            self.out.push('.');
            self.out.push_str(pad);
            self.out.push_str(digits);
            self.out
                .push_str("Z\",\"level\":\"INFO\",\"message\":\"request\"");
        } else {
            self.out.push_str(second);
            self.out.push('.');
            self.out.push_str(pad);
            self.out.push_str(digits);
            self.out.push_str("Z  INFO ");
            self.out.push_str(TARGET);
            self.out.push_str(": request");
        }
    }

    #[inline(always)]
    fn name(&mut self, name: &str) {
        if self.json {
            self.out.push_str(",\"");
            self.out.push_str(name);
            self.out.push_str("\":");
        } else {
            self.out.push(' ');
            self.out.push_str(name);
            self.out.push('=');
        }
    }

    #[inline(always)]
    fn str(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            self.out.push('"');
        }
        escape_into(self.out, value);
        if self.json {
            self.out.push('"');
        }
    }

    #[inline(always)]
    fn ip(&mut self, name: &str, ip: std::net::IpAddr) {
        use std::fmt::Write as _;
        self.name(name);
        if self.json {
            self.out.push('"');
        }
        match ip {
            // By hand: `Display` for an address costs ~1k instructions, a
            // few percent of a whole request.
            std::net::IpAddr::V4(v4) => {
                let mut digits = itoa::Buffer::new();
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.out.push('.');
                    }
                    self.out.push_str(digits.format(octet));
                }
            }
            std::net::IpAddr::V6(v6) => {
                let _ = write!(self.out, "{v6}");
            }
        }
        if self.json {
            self.out.push('"');
        }
    }

    #[inline(always)]
    fn uint(&mut self, name: &str, n: u64) {
        self.name(name);
        self.out.push_str(itoa::Buffer::new().format(n));
    }

    /// Milliseconds with three decimals (microseconds), as a JSON number.
    #[inline(always)]
    fn millis(&mut self, name: &str, d: Duration) {
        self.name(name);
        let micros = d.as_micros();
        self.out.push_str(itoa::Buffer::new().format(micros / 1000));
        self.out.push('.');
        let frac = (micros % 1000) as u32;
        let mut b = itoa::Buffer::new();
        let digits = b.format(frac);
        self.out.push_str(&"000"[..3 - digits.len()]);
        self.out.push_str(digits);
    }

    fn end(&mut self) {
        if self.json {
            self.out.push_str(",\"target\":\"");
            self.out.push_str(TARGET);
            self.out.push_str("\"}");
        }
        self.out.push('\n');
    }
}

/// Appends `s` with JSON string escaping (also used for the text form, so a
/// value can never start a new line or forge a field).
fn escape_into(out: &mut String, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Whether `s` has a byte JSON escapes here: a control (below 0x20 or
/// 0x7f), `"` or `\\`. Eight bytes at a time (the values are short, and
/// this runs for every field of every line).
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit set in each byte of `x` that is zero (no false positives
    // once bytes above 0x80 are masked by `!x`).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let x = u64::from_le_bytes(b);
        // Bytes below 0x20: x - 0x20 borrows into the high bit, unless the
        // byte was 0x80 or above.
        let control = x.wrapping_sub(0x20 * ONES) & !x & HIGH;
        let hits = control
            | zero(x ^ (b'"' as u64 * ONES))
            | zero(x ^ (b'\\' as u64 * ONES))
            | zero(x ^ (0x7f * ONES));
        if hits != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
}

#[cfg(test)]
mod tests {

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.12.3",
            "::1",
            "2001:db8::7",
            "::ffff:1.2.3.4",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            for json in [false, true] {
                let mut out = String::new();
                Writer {
                    out: &mut out,
                    json,
                }
                .ip("client", ip);
                let want = match json {
                    true => format!(",\"client\":\"{ip}\""),
                    false => format!(" client={ip}"),
                };
                assert_eq!(out, want);
            }
        }
    }
    use super::*;

    fn line() -> Line<'static> {
        Line {
            request_id: Some("r-1"),
            client: "192.0.2.1".parse().unwrap(),
            method: "GET",
            path: "/a\"b\n?x=1",
            route: Some("orders"),
            status: 200,
            code: UPSTREAM_CODE,
            key_id: Some("key_1"),
            owner: None,
            upstream_status: Some(200),
            duration: Duration::from_micros(1_234_567),
            upstream: Some(Duration::from_micros(5)),
            bytes_in: None,
            bytes_out: Some(100),
        }
    }

    fn render(json: bool) -> String {
        let mut out = String::new();
        let mut w = Writer {
            out: &mut out,
            json,
        };
        w.timestamp("2026-11-23T19:20:00", 42);
        line().fields(&mut w);
        w.end();
        out
    }

    #[test]
    fn json_lines_parse_with_every_field() {
        let out = render(true);
        assert!(out.ends_with('\n') && out.lines().count() == 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["timestamp"], "2026-11-23T19:20:00.000042Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], TARGET);
        assert_eq!(v["message"], "request");
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["client"], "192.0.2.1");
        assert_eq!(v["path"], "/a\"b\n?x=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["code"], "upstream");
        assert_eq!(v["key_id"], "key_1");
        assert!(v.get("owner").is_none());
        assert_eq!(v["duration_ms"].as_f64(), Some(1234.567));
        assert_eq!(v["upstream_ms"].as_f64(), Some(0.005));
        assert_eq!(v["bytes_out"], 100);
        assert!(v.get("bytes_in").is_none());
    }

    #[test]
    fn text_lines_stay_on_one_line() {
        let out = render(false);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.starts_with("2026-11-23T19:20:00.000042Z  INFO keygate::access: request request_id=r-1 client=192.0.2.1 method=GET path=/a\\\"b\\n?x=1 route=orders status=200"), "{out}");
        assert!(out.contains(" duration_ms=1234.567"), "{out}");
    }

    #[test]
    fn escaping_covers_controls() {
        let mut s = String::new();
        escape_into(&mut s, "a\u{1}b\u{7f}é");
        assert_eq!(s, "a\\u0001b\\u007fé");
    }

    #[test]
    fn the_word_at_a_time_check_finds_what_the_byte_check_finds() {
        let slow = |s: &[u8]| {
            s.iter()
                .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
        };
        // Every byte value at every position of a 17-byte value (two words
        // and a tail), among bytes next to the edges of each class.
        let filler = [b'a', 0x20, 0x21, 0x7e, 0x80, 0xff, b'!', b'#', b'[', b']'];
        for at in 0..17 {
            for byte in 0..=255u8 {
                let mut v: Vec<u8> = (0..17).map(|i| filler[i % filler.len()]).collect();
                v[at] = byte;
                assert_eq!(needs_escape(&v), slow(&v), "byte {byte:#x} at {at}");
                assert!(!needs_escape(&v[..at]) || slow(&v[..at]));
            }
        }
        assert!(!needs_escape(b"0123456789abcdef0123456789abcdef"));
        assert!(needs_escape(b"0123456789abcdef0123456789abcde\""));
    }
}
