//! Starts a real `redis-server` on a free port in a temp dir, for tests that need
//! Redis (no mocks, see STYLE.md). The server has no persistence, can be
//! stopped, frozen (SIGSTOP) and restarted on the same port, and is killed when
//! the handle is dropped. A missing `redis-server` fails the test loudly: CI
//! installs it, and a silently skipped test proves nothing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

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
            match spawn_server(port, dir.path()) {
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
            match spawn_server(self.port, self.dir.path()) {
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

/// Starts redis-server on `port` with its files in `dir` and waits until it
/// answers PING.
fn spawn_server(port: u16, dir: &Path) -> Result<Child, String> {
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
