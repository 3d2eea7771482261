//! Starts a real `redis-server` on a free port in a temp dir, for tests that need
//! Redis (no mocks, see STYLE.md). The server has no persistence, can be
//! stopped, frozen (SIGSTOP) and restarted on the same port, and is killed when
//! the handle is dropped. A missing `redis-server` fails the test loudly: CI
//! installs it, and a silently skipped test proves nothing.
//!
//! [`RedisCluster`] starts three such servers in cluster mode and joins them
//! into one Redis Cluster with `redis-cli --cluster create` (three primaries,
//! no replicas); [`RedisCluster::shared`] lets concurrent tests share one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new cluster may take to report `cluster_state:ok` everywhere.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) `redis-server` owned by one test.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port; panics with a clear message on failure.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("create a temp dir for redis-server");
        // Another process may grab the port between our probe and redis binding
        // it: retry with a fresh port a few times.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            match spawn_server(port, dir.path(), &[]) {
                Ok(child) => {
                    return RedisServer {
                        port,
                        dir,
                        child: Some(child),
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends one command (RESP) on a connection of its own and returns the
    /// raw answer (`+OK\r\n`, `:42\r\n`, ...).
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port()))
            .unwrap_or_else(|e| panic!("connect to redis on {}: {e}", self.port()));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(cmd.as_bytes()).expect("write to redis");
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).expect("read from redis");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGKILL, like a crash; it has no data to save) and
    /// waits for it to exit. Its port stays reserved for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                eprintln!("redis-server: kill failed: {e}");
            }
            if let Err(e) = child.wait() {
                eprintln!("redis-server: wait failed: {e}");
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Stops the server if running and starts a fresh, empty one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match spawn_server(self.port, self.dir.path(), &[]) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("could not restart redis-server on port {}: {e}", self.port)
                }
                // The old socket may linger for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("redis-server is not running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill {sig} {} failed: {status}",
            child.id()
        );
    }
}

/// Starts redis-server on `port` with its files in `dir` (and `extra`
/// arguments) and waits until it answers PING.
fn spawn_server(port: u16, dir: &Path, extra: &[&str]) -> Result<Child, String> {
    let log_path = dir.join("redis.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "redis-server is not on PATH; install it (e.g. apt-get install redis-server) \
                 to run the Redis store tests"
                    .to_owned()
            } else {
                format!("spawning redis-server failed: {e}")
            }
        })?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!(
                "redis-server exited with {status}; its log:\n{log}"
            ));
        }
        if answers_ping(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            if let Err(e) = child.kill() {
                eprintln!("redis-server: kill failed: {e}");
            }
            if let Err(e) = child.wait() {
                eprintln!("redis-server: wait failed: {e}");
            }
            return Err(format!(
                "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three `redis-server --cluster-enabled yes` nodes on free ports, each in
/// its own temp dir, joined into one cluster (all 16384 slots, no replicas).
/// Every node is killed when the handle is dropped.
pub struct RedisCluster {
    nodes: Vec<RedisNode>,
}

struct RedisNode {
    port: u16,
    child: Child,
    /// Holds `nodes.conf` and the log.
    dir: tempfile::TempDir,
}

/// The cluster tests currently share, if any (see [`RedisCluster::shared`]).
static SHARED_CLUSTER: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());

impl RedisCluster {
    /// Starts and joins a fresh cluster (about 2 s: `redis-cli` waits for the
    /// join in whole seconds); panics with the nodes' logs on failure.
    pub fn start() -> RedisCluster {
        let started = Instant::now();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(start_cluster_node());
        }
        let cluster = RedisCluster { nodes };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (install redis-tools): {e}"));
        if !out.status.success() {
            panic!(
                "redis-cli --cluster create {} failed ({}):\n{}{}\n{}",
                addrs.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                cluster.logs()
            );
        }
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        for node in &cluster.nodes {
            loop {
                let info = command(node.port, &["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "node {} never reported cluster_state:ok; CLUSTER INFO:\n{info}\n{}",
                        node.port,
                        cluster.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        eprintln!(
            "redis cluster on ports {:?} ready in {:?}",
            cluster.ports(),
            started.elapsed()
        );
        cluster
    }

    /// The cluster that running tests share, started on first use and stopped
    /// when the last test holding it drops it. Tests sharing it must keep
    /// apart by using distinct key prefixes.
    pub fn shared() -> Arc<RedisCluster> {
        let mut slot = SHARED_CLUSTER
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(cluster) = slot.upgrade() {
            return cluster;
        }
        let cluster = Arc::new(RedisCluster::start());
        *slot = Arc::downgrade(&cluster);
        cluster
    }

    /// `redis://127.0.0.1:<port>/` of node `i % 3`: any node is a valid seed.
    /// Node 0 owns the slots 0-5460, so it holds keygate's `{kg}` slot (2961);
    /// seeding with node 1 or 2 makes the client discover it.
    pub fn url(&self, i: usize) -> String {
        format!(
            "redis://127.0.0.1:{}/",
            self.nodes[i % self.nodes.len()].port
        )
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Sends a one-key command to the node that owns the key (the others
    /// answer `-MOVED`) and returns that node's port and its answer in RESP
    /// (`:1`, a bulk string's text, `-ERR ...`).
    pub fn command(&self, args: &[&str]) -> (u16, String) {
        let mut answers = Vec::new();
        for node in &self.nodes {
            match command(node.port, args) {
                Ok(a) if a.starts_with("-MOVED") => answers.push(a),
                Ok(a) => return (node.port, a),
                Err(e) => answers.push(e),
            }
        }
        panic!("no node answered {args:?}: {answers:?}");
    }

    /// How many clients each node has subscribed to `channel` (`PUBSUB
    /// NUMSUB` counts a node's own clients only), by port.
    pub fn subscribers(&self, channel: &str) -> Vec<(u16, u64)> {
        self.nodes
            .iter()
            .map(|n| {
                let url = format!("redis://127.0.0.1:{}/", n.port);
                let mut conn = redis::Client::open(url)
                    .and_then(|c| c.get_connection())
                    .unwrap_or_else(|e| panic!("connect to node {}: {e}", n.port));
                let (_, count): (String, u64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(channel)
                    .query(&mut conn)
                    .unwrap_or_else(|e| panic!("PUBSUB NUMSUB on node {}: {e}", n.port));
                (n.port, count)
            })
            .collect()
    }

    /// Every node's log, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for n in &self.nodes {
            let log = std::fs::read_to_string(n.dir.path().join("redis.log")).unwrap_or_default();
            all.push_str(&format!("--- redis-server {} log:\n{log}\n", n.port));
        }
        all
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Err(e) = node.child.kill() {
                eprintln!("redis-server {}: kill failed: {e}", node.port);
            }
            if let Err(e) = node.child.wait() {
                eprintln!("redis-server {}: wait failed: {e}", node.port);
            }
        }
    }
}

/// One cluster-mode node on a free port, with its cluster bus on another free
/// port (the default, port + 10000, may be taken or beyond 65535).
fn start_cluster_node() -> RedisNode {
    let dir = tempfile::tempdir().expect("create a temp dir for redis-server");
    let conf = dir.path().join("nodes.conf");
    let mut last_error = String::new();
    for _ in 0..3 {
        let (port, bus) = (free_port(), free_port());
        if port == bus {
            continue;
        }
        let bus = bus.to_string();
        let extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus,
            "--cluster-config-file",
            conf.to_str().expect("UTF-8 temp dir"),
        ];
        match spawn_server(port, dir.path(), &extra) {
            Ok(child) => return RedisNode { port, child, dir },
            Err(e) => last_error = e,
        }
    }
    panic!("could not start a cluster-mode redis-server: {last_error}");
}

/// Sends one command (RESP) and returns its bulk or simple string answer.
fn command(port: u16, args: &[&str]) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        let Some((head, rest)) = text.split_once("\r\n") else {
            continue;
        };
        match head.as_bytes().first() {
            Some(b'$') => {
                let len: usize = head[1..].parse().map_err(|_| format!("bad reply {head}"))?;
                if rest.len() >= len {
                    return Ok(rest[..len].to_owned());
                }
            }
            _ => return Ok(head.to_owned()),
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn answers_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if s.set_read_timeout(timeout).is_err() || s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
