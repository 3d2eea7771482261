//! A paced load driver: open loop at a fixed rate over N keep-alive HTTP/1.1
//! connections, recording every request's answer and timing.
//!
//! Request `i` is due at `start + i / rate` whether or not the earlier ones
//! have been answered (open loop: a slow server builds a queue instead of
//! slowing the client down, and latency is measured from the due time, so the
//! queueing shows). N workers, each holding one keep-alive connection
//! (reopened when the server closes it or an exchange fails), take the due
//! requests in order. The caller builds request `i` when it falls due, so a
//! test can change the mix while the load runs (after a fault, a revoke).
//!
//! Everything is bounded: `rate * duration` requests at most, each with a
//! timeout, and requests still queued [`Load::drain`] after the last one was
//! due are recorded as [`Answer::Dropped`] instead of being sent.
//!
//! Each request is recorded as a [`Shot`]: when it was due, sent and done
//! (offsets from the run's start, so a test can compare them with the time of
//! a signal or a revoke) and its [`Answer`]: a status with the problem `code`,
//! or how it failed, telling "never written, the server cannot have seen it"
//! ([`Answer::Unsent`]) from "written, then no complete answer"
//! ([`Answer::Failed`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::{Req, ReqBody, full};

/// The settings of one run; [`Load::start`] starts it.
#[derive(Clone, Debug)]
pub struct Load {
    rate: f64,
    duration: Duration,
    connections: usize,
    timeout: Duration,
    drain: Duration,
    keep_shots: bool,
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Answer {
    /// A complete response: the status and, for `application/problem+json`,
    /// its `code`.
    Status(u16, Option<String>),
    /// Never written to a connection: the connect failed, or the connection
    /// was closed before the request went out. The server never saw it.
    Unsent(String),
    /// Written (at least in part), then no complete response: the
    /// connection broke, or the timeout passed.
    Failed(String),
    /// Still queued when the run's drain deadline passed, or after
    /// [`Running::stop`]: never sent.
    Dropped,
}

impl Answer {
    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Status(s, _) => Some(*s),
            _ => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status() == Some(200)
    }

    /// The problem `code`, if the answer was a problem document.
    pub fn code(&self) -> Option<&str> {
        match self {
            Answer::Status(_, c) => c.as_deref(),
            _ => None,
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(s, Some(c)) => write!(f, "{s} {c}"),
            Answer::Status(s, None) => write!(f, "{s}"),
            Answer::Unsent(why) => write!(f, "unsent ({why})"),
            Answer::Failed(why) => write!(f, "failed ({why})"),
            Answer::Dropped => f.write_str("dropped"),
        }
    }
}

/// One request of a run. Times are offsets from [`Running::epoch`].
#[derive(Clone, Debug)]
pub struct Shot {
    pub i: u64,
    /// What the caller said this request is (a key's index, a kind).
    pub tag: u32,
    /// When it was due (`i / rate`).
    pub due: Duration,
    /// When a worker handed it to its connection.
    pub sent: Duration,
    /// When the answer was complete, or the failure known.
    pub done: Duration,
    pub answer: Answer,
}

impl Shot {
    /// From due to done: the latency a client at this rate saw.
    pub fn latency(&self) -> Duration {
        self.done.saturating_sub(self.due)
    }
}

impl fmt::Display for Shot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} tag {}: due {:.1} ms, sent {:.1} ms, done {:.1} ms: {}",
            self.i,
            self.tag,
            ms(self.due),
            ms(self.sent),
            ms(self.done),
            self.answer
        )
    }
}

/// What a run did.
pub struct Report {
    /// Requests the run was to send (`rate * duration`).
    pub planned: u64,
    /// Every request, in order of `i` (empty without [`Load::keep_shots`]).
    pub shots: Vec<Shot>,
    /// How many requests of each tag got each answer.
    pub tally: BTreeMap<(u32, Answer), u64>,
    /// Due-to-done latency of every answered request, sorted.
    pub latencies: Vec<Duration>,
    /// From the start to the last answer.
    pub elapsed: Duration,
    pub rate: f64,
    pub connections: usize,
}

impl Report {
    /// Requests that got a complete response.
    pub fn answered(&self) -> u64 {
        self.latencies.len() as u64
    }

    /// The `p` quantile (0.0 to 1.0) of due-to-done latency.
    pub fn latency(&self, p: f64) -> Duration {
        quantile(&self.latencies, p)
    }

    /// How many requests of any tag got an answer matching `pred`.
    pub fn count(&self, pred: impl Fn(u32, &Answer) -> bool) -> u64 {
        self.tally
            .iter()
            .filter(|((tag, a), _)| pred(*tag, a))
            .map(|(_, n)| n)
            .sum()
    }

    /// One paragraph: rate, latency, and the answers by tag, tags with the
    /// same `name` counted together.
    pub fn summary(&self, name: impl Fn(u32) -> String) -> String {
        let mut s = format!(
            "{} of {} requests answered at {:.0} req/s planned over {} connections in {:.2} s \
             (achieved {:.0} answers/s); latency from due time p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.answered(),
            self.planned,
            self.rate,
            self.connections,
            self.elapsed.as_secs_f64(),
            self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9),
            ms(self.latency(0.5)),
            ms(self.latency(0.99)),
            ms(self.latency(1.0)),
        );
        let mut by_name: BTreeMap<(String, &Answer), u64> = BTreeMap::new();
        for ((tag, answer), n) in &self.tally {
            *by_name.entry((name(*tag), answer)).or_insert(0) += n;
        }
        for ((name, answer), n) in by_name {
            s.push_str(&format!("\n  {name:>16}: {answer}: {n}"));
        }
        s
    }
}

/// The `p` quantile of sorted `samples` (zero if empty).
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Load {
    /// `rate` requests per second for `duration`, over 16 connections, each
    /// request bounded by 5 s, drained for 10 s, every shot kept.
    pub fn new(rate: u32, duration: Duration) -> Load {
        assert!(rate > 0, "a load needs a rate");
        Load {
            rate: f64::from(rate),
            duration,
            connections: 16,
            timeout: Duration::from_secs(5),
            drain: Duration::from_secs(10),
            keep_shots: true,
        }
    }

    /// How many keep-alive connections (and so requests in flight at most).
    pub fn connections(mut self, n: usize) -> Load {
        assert!(n > 0, "a load needs connections");
        self.connections = n;
        self
    }

    /// The bound on one exchange (connect, send, whole response).
    pub fn timeout(mut self, t: Duration) -> Load {
        self.timeout = t;
        self
    }

    /// How long after the last due time queued requests may still be sent.
    pub fn drain(mut self, d: Duration) -> Load {
        self.drain = d;
        self
    }

    /// Keep every [`Shot`] (default), or only the tally and latencies (for
    /// long runs, where a million shots would weigh on the test process).
    pub fn keep_shots(mut self, keep: bool) -> Load {
        self.keep_shots = keep;
        self
    }

    /// Starts the run against `addr`. `make(i)` builds request `i` when it
    /// falls due and says what it is (its tag); requests without a `Host`
    /// header get `Host: <addr>`.
    pub fn start<F>(self, addr: SocketAddr, make: F) -> Running
    where
        F: Fn(u64) -> (u32, Req) + Send + Sync + 'static,
    {
        let epoch = Instant::now();
        let planned = (self.rate * self.duration.as_secs_f64()).round() as u64;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let last_due = Duration::from_secs_f64(planned.saturating_sub(1) as f64 / self.rate);
        let deadline = last_due + self.drain;
        let workers: Vec<JoinHandle<Collected>> = (0..self.connections)
            .map(|_| {
                let w = Worker {
                    addr,
                    timeout: self.timeout,
                    epoch,
                    deadline,
                    keep_shots: self.keep_shots,
                    stop: stop.clone(),
                    done: done.clone(),
                };
                tokio::spawn(w.run(rx.clone()))
            })
            .collect();
        let dispatch = {
            let stop = stop.clone();
            let rate = self.rate;
            tokio::spawn(async move {
                for i in 0..planned {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let due = Duration::from_secs_f64(i as f64 / rate);
                    if due > epoch.elapsed() {
                        tokio::time::sleep_until((epoch + due).into()).await;
                    }
                    let (tag, req) = make(i);
                    if tx.send(Job { i, tag, due, req }).is_err() {
                        break;
                    }
                }
            })
        };
        let (rate, connections) = (self.rate, self.connections);
        let task = tokio::spawn(async move {
            if let Err(e) = dispatch.await {
                panic!("the load dispatcher failed: {e}");
            }
            let mut shots = Vec::new();
            let mut tally = BTreeMap::new();
            let mut latencies = Vec::new();
            for w in workers {
                let c = w.await.expect("a load worker panicked");
                shots.extend(c.shots);
                latencies.extend(c.latencies);
                for (k, n) in c.tally {
                    *tally.entry(k).or_insert(0) += n;
                }
            }
            shots.sort_by_key(|s| s.i);
            latencies.sort();
            Report {
                planned,
                shots,
                tally,
                latencies,
                elapsed: epoch.elapsed(),
                rate,
                connections,
            }
        });
        Running {
            epoch,
            stop,
            done,
            task,
        }
    }
}

/// A run in progress.
pub struct Running {
    epoch: Instant,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: JoinHandle<Report>,
}

impl Running {
    /// The run's time zero: [`Shot`] times are offsets from it.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// `t` as an offset from [`Running::epoch`].
    pub fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.epoch)
    }

    /// Now, as an offset from [`Running::epoch`].
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Requests finished so far (answered or failed).
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Dispatches nothing more; queued requests are recorded as dropped.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Waits for the run to end (bounded by its duration, drain and
    /// timeouts) and returns what it did.
    pub async fn finish(self) -> Report {
        self.task.await.expect("the load run failed")
    }
}

struct Job {
    i: u64,
    tag: u32,
    due: Duration,
    req: Req,
}

#[derive(Default)]
struct Collected {
    shots: Vec<Shot>,
    tally: BTreeMap<(u32, Answer), u64>,
    latencies: Vec<Duration>,
}

struct Worker {
    addr: SocketAddr,
    timeout: Duration,
    epoch: Instant,
    deadline: Duration,
    keep_shots: bool,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
}

impl Worker {
    async fn run(self, jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>) -> Collected {
        let mut out = Collected::default();
        let mut conn = Conn::new(self.addr, self.timeout);
        loop {
            let job = { jobs.lock().await.recv().await };
            let Some(job) = job else { break };
            let late = self.epoch.elapsed() > self.deadline || self.stop.load(Ordering::Acquire);
            let sent = self.epoch.elapsed();
            let answer = match late {
                true => Answer::Dropped,
                false => conn.send(&job.req).await,
            };
            let done = self.epoch.elapsed();
            self.done.fetch_add(1, Ordering::Relaxed);
            let shot = Shot {
                i: job.i,
                tag: job.tag,
                due: job.due,
                sent,
                done,
                answer,
            };
            if matches!(shot.answer, Answer::Status(..)) {
                out.latencies.push(shot.latency());
            }
            *out.tally
                .entry((shot.tag, shot.answer.clone()))
                .or_insert(0) += 1;
            if self.keep_shots {
                out.shots.push(shot);
            }
        }
        out
    }
}

/// One keep-alive HTTP/1.1 connection that reopens itself when the server
/// closes it or an exchange fails: what each load worker holds, and what a
/// test polls with when it needs answers a millisecond apart.
pub struct Conn {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    sender: Option<SendRequest<ReqBody>>,
}

impl Conn {
    /// A connection to `addr` (opened on first use); each exchange is
    /// bounded by `timeout`.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Conn {
        Conn {
            addr,
            host: addr.to_string(),
            timeout,
            sender: None,
        }
    }

    /// Sends `req` (with `Host: <addr>` unless it has one) and returns how
    /// it ended; never panics.
    pub async fn send(&mut self, req: &Req) -> Answer {
        self.fetch(req).await.0
    }

    /// Like [`Conn::send`], also returning the response body (empty when
    /// there was no complete response).
    pub async fn fetch(&mut self, req: &Req) -> (Answer, Bytes) {
        match tokio::time::timeout(self.timeout, self.exchange(req)).await {
            Ok(a) => a,
            Err(_) => {
                // The connection's state is unknown: start afresh.
                self.sender = None;
                let why = format!("no answer within {:?}", self.timeout);
                (Answer::Failed(why), Bytes::new())
            }
        }
    }

    /// One request, reconnecting as needed. A request the old connection
    /// never took is sent once more on a new one (it was never written, so
    /// this is safe for any method).
    async fn exchange(&mut self, req: &Req) -> (Answer, Bytes) {
        let mut request = self.to_http(req);
        for attempt in 0..2 {
            let mut sender = match self.sender.take() {
                Some(s) if !s.is_closed() => s,
                _ => match self.connect().await {
                    Ok(s) => s,
                    Err(why) => return (Answer::Unsent(why), Bytes::new()),
                },
            };
            if sender.ready().await.is_err() {
                if attempt == 0 {
                    continue;
                }
                let why = "connection closed before the request".into();
                return (Answer::Unsent(why), Bytes::new());
            }
            let resp = match sender.try_send_request(request).await {
                Ok(r) => r,
                Err(mut e) => match e.take_message() {
                    Some(back) if attempt == 0 => {
                        request = back;
                        continue;
                    }
                    Some(_) => return (Answer::Unsent(short(e.error())), Bytes::new()),
                    None => return (Answer::Failed(short(e.error())), Bytes::new()),
                },
            };
            let problem = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
            let close = resp
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let status = resp.status().as_u16();
            let body = match resp.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return (Answer::Failed(format!("body: {}", short(&e))), Bytes::new()),
            };
            let code = problem
                .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .flatten()
                .and_then(|v| v["code"].as_str().map(str::to_owned));
            if !close {
                self.sender = Some(sender);
            }
            return (Answer::Status(status, code), body);
        }
        unreachable!("the second attempt always returns")
    }

    async fn connect(&self) -> Result<SendRequest<ReqBody>, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        tcp.set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {}", short(&e)))?;
        tokio::spawn(async move {
            // Ends when the server closes or the sender is dropped; how it
            // ended is recorded by the exchange that saw it.
            let _ended = conn.await;
        });
        Ok(sender)
    }

    fn to_http(&self, req: &Req) -> Request<ReqBody> {
        let mut b = Request::builder()
            .method(req.method.clone())
            .uri(&req.target);
        if !req.headers.iter().any(|(k, _)| k == http::header::HOST) {
            b = b.header(http::header::HOST, &self.host);
        }
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        b.body(full(req.body.clone()))
            .unwrap_or_else(|e| panic!("cannot build request {}: {e}", req.target))
    }
}

/// A failure in a few words, without the chain (the tally groups by it).
fn short(e: &hyper::Error) -> String {
    let kind = if e.is_canceled() {
        "canceled"
    } else if e.is_incomplete_message() {
        "connection closed before the response"
    } else if e.is_closed() {
        "connection closed"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_parse() {
        "bad response"
    } else {
        "connection error"
    };
    kind.to_owned()
}

/// Sends `req` (a request with a key just revoked) on `conn` every ~1 ms
/// until the answer is 401 `key_revoked`; returns the time from `since` (the
/// revoke's answer) and the number of polls. Panics on any answer that is not
/// a success or that refusal, and once `give_up` has passed.
pub async fn until_refused(
    conn: &mut Conn,
    req: &Req,
    since: Instant,
    give_up: Duration,
) -> (Duration, u32) {
    let mut polls = 0;
    loop {
        let a = conn.send(req).await;
        polls += 1;
        if a == Answer::Status(401, Some("key_revoked".into())) {
            return (since.elapsed(), polls);
        }
        assert!(
            a.is_ok(),
            "while waiting for a revoke to reach {}: {a}",
            conn.addr
        );
        assert!(
            since.elapsed() < give_up,
            "{} still admits a key {:?} after its revoke was answered ({polls} polls)",
            conn.addr,
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Panics listing the first 30 of `bad` (the violations a run found), if any.
pub fn fail_with(bad: &[String]) {
    if !bad.is_empty() {
        panic!(
            "{} violations (the first 30):\n{}",
            bad.len(),
            bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}
