//! Runs the real `keygate serve` binary (STYLE.md: ripgrep-style integration
//! tests) with a config written to a temp dir: both listeners on
//! `127.0.0.1:0`, an embedded store in the temp dir, and an admin token `ops`
//! whose secret the harness knows.
//!
//! stdout and stderr are captured for the whole life of the process, so a test
//! can search everything keygate printed (no key may ever appear there). When a
//! test panics, dropping the [`Keygate`] prints its config and all its output,
//! so a failure shows the config next to the request and response.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::client::{self, Req, TestCerts};

/// How long the binary may take to print its `keygate listening:` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Configures a keygate before it starts: routes, extra sections, TLS, store,
/// admin tokens and environment.
pub struct KeygateBuilder {
    routes: Vec<String>,
    sections: Vec<String>,
    env: Vec<(String, String)>,
    tls: Option<(String, String)>,
    store: Option<String>,
    admin_tokens: Vec<(String, String, String)>,
    stderr_file: bool,
}

impl KeygateBuilder {
    /// Sends the process's stderr to a regular file in its temp dir instead
    /// of a pipe (as `2> file` does); [`Keygate::output`] reads the file.
    pub fn stderr_to_file(mut self) -> KeygateBuilder {
        self.stderr_file = true;
        self
    }

    /// Replaces the default embedded store with this `store:` body, e.g.
    /// `backend: redis\nredis:\n  url: redis://127.0.0.1:6379/`.
    pub fn store(mut self, yaml: &str) -> KeygateBuilder {
        self.store = Some(yaml.to_owned());
        self
    }

    /// Adds an admin token `name` with `role` (admin, developer, auditor)
    /// whose secret is `raw` (the `ops` admin token is always there).
    pub fn admin_token(mut self, name: &str, role: &str, raw: &str) -> KeygateBuilder {
        self.admin_tokens
            .push((name.to_owned(), role.to_owned(), raw.to_owned()));
        self
    }

    /// Adds one route: a YAML flow mapping such as
    /// `{name: r, match: {path_prefix: /r/}, upstream: 'http://…'}`, or a block
    /// mapping (its common indentation is removed; no leading `- `).
    pub fn route(mut self, yaml: &str) -> KeygateBuilder {
        self.routes.push(yaml.to_owned());
        self
    }

    /// Adds a top-level YAML section (e.g. `limits:\n  shutdown_grace: 5s`).
    /// Must not repeat `listen`, `admin`, `store`, `tls` or `routes`.
    pub fn section(mut self, yaml: &str) -> KeygateBuilder {
        self.sections.push(yaml.trim_end().to_owned());
        self
    }

    /// Sets an environment variable for the process (e.g. `KEYGATE_LOG=debug`).
    pub fn env(mut self, name: &str, value: &str) -> KeygateBuilder {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Serves the proxy over TLS with `certs`' server certificate (written
    /// into the temp dir and named in `tls: {cert, key}`).
    pub fn tls(mut self, certs: &TestCerts) -> KeygateBuilder {
        self.tls = Some((certs.server_cert_pem.clone(), certs.server_key_pem.clone()));
        self
    }

    /// Writes the config and starts the binary; returns once it announced its
    /// addresses, or panics with the config and output.
    pub async fn start(self) -> Keygate {
        let dir = tempfile::tempdir().expect("temp dir for keygate");
        let admin_token = keygate::keys::Token::generate("kgadm_").expose().to_owned();
        let config = self.config_text(dir.path(), &admin_token);
        let config_path = dir.path().join("keygate.yaml");
        std::fs::write(&config_path, &config).expect("write keygate.yaml");

        let bin = env!("CARGO_BIN_EXE_keygate");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--config").arg(&config_path);
        cmd.current_dir(dir.path());
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("KEYGATE_") || n == "RUST_LOG" {
                cmd.env_remove(name);
            }
        }
        // Plain log lines, so tests can search them.
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let stderr_path = self.stderr_file.then(|| dir.path().join("stderr.log"));
        let stderr_to = match &stderr_path {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create stderr.log")),
            None => Stdio::piped(),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_to);
        let command = format!("{bin} serve --config {}", config_path.display());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));

        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (lines_tx, mut lines) = mpsc::unbounded_channel();
        capture(
            child.stdout.take().expect("piped stdout"),
            stdout.clone(),
            Some(lines_tx),
        );
        if let Some(piped) = child.stderr.take() {
            capture(piped, stderr.clone(), None);
        }

        let mut kg = Keygate {
            child,
            proxy: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            https: false,
            admin_token,
            command,
            config,
            config_path,
            stdout,
            stderr,
            stderr_path,
            dir,
        };
        let announced = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.recv().await {
                if let Some(addrs) = parse_announce(&line) {
                    return Some(addrs);
                }
            }
            None
        })
        .await;
        match announced {
            Ok(Some((https, proxy, admin))) => {
                kg.https = https;
                kg.proxy = proxy;
                kg.admin = admin;
                kg
            }
            Ok(None) => {
                let status = kg
                    .child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                panic!(
                    "keygate exited ({status}) before announcing its addresses\n{}",
                    kg.explain()
                );
            }
            Err(_) => panic!(
                "keygate did not announce its addresses within {START_TIMEOUT:?}\n{}",
                kg.explain()
            ),
        }
    }

    fn config_text(&self, dir: &Path, admin_token: &str) -> String {
        let mut s = String::from("listen: 127.0.0.1:0\n");
        if let Some((cert, key)) = &self.tls {
            let cert_path = dir.join("server.pem");
            let key_path = dir.join("server.key");
            std::fs::write(&cert_path, cert).expect("write server.pem");
            std::fs::write(&key_path, key).expect("write server.key");
            s.push_str(&format!(
                "tls:\n  cert: {:?}\n  key: {:?}\n",
                cert_path.display().to_string(),
                key_path.display().to_string()
            ));
        }
        s.push_str("admin:\n  listen: 127.0.0.1:0\n  tokens:\n");
        let ops = ("ops", "admin", admin_token);
        let extra = self
            .admin_tokens
            .iter()
            .map(|(n, r, t)| (n.as_str(), r.as_str(), t.as_str()));
        for (name, role, raw) in std::iter::once(ops).chain(extra) {
            let sha = keygate::keys::TokenHash::of(raw).to_hex();
            s.push_str(&format!(
                "    - {{name: {name}, role: {role}, sha256: \"{sha}\"}}\n"
            ));
        }
        s.push_str("store:\n");
        match &self.store {
            Some(body) => {
                for line in dedent(body).lines() {
                    s.push_str(&format!("  {line}\n"));
                }
            }
            None => {
                let path = dir.join("data").join("keygate.redb");
                s.push_str(&format!(
                    "  backend: embedded\n  path: {:?}\n",
                    path.display().to_string()
                ));
            }
        }
        for section in &self.sections {
            s.push_str(section);
            s.push('\n');
        }
        if self.routes.is_empty() {
            s.push_str("routes: []\n");
        } else {
            s.push_str("routes:\n");
            for r in &self.routes {
                for (i, line) in dedent(r).lines().enumerate() {
                    let lead = if i == 0 { "  - " } else { "    " };
                    s.push_str(&format!("{lead}{line}\n"));
                }
            }
        }
        s
    }
}

/// Removes leading and trailing blank lines and the common indentation.
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.trim_matches('\n').lines().collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `keygate listening: proxy http(s)://ADDR admin http://ADDR`.
fn parse_announce(line: &str) -> Option<(bool, SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("keygate listening: proxy ")?;
    let (proxy, admin) = rest.split_once(" admin ")?;
    let (https, proxy) = match proxy.strip_prefix("https://") {
        Some(p) => (true, p),
        None => (false, proxy.strip_prefix("http://")?),
    };
    Some((
        https,
        proxy.parse().ok()?,
        admin.strip_prefix("http://")?.parse().ok()?,
    ))
}

/// Copies `from` into `into` line by line on a thread, forwarding each line
/// to `lines` while someone listens.
fn capture(
    from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    mut lines: Option<mpsc::UnboundedSender<String>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    into.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&line);
                    // The receiver goes away once the address is known;
                    // later lines are still kept in `into`.
                    if let Some(tx) = &lines
                        && tx.send(line).is_err()
                    {
                        lines = None;
                    }
                }
                Err(e) => {
                    into.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&format!("[capture failed: {e}]\n"));
                    return;
                }
            }
        }
    });
}

/// A running `keygate serve`; killed (SIGKILL) when dropped.
pub struct Keygate {
    child: Child,
    /// The proxy listener's address.
    pub proxy: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
    /// Whether the proxy listener speaks TLS.
    pub https: bool,
    admin_token: String,
    command: String,
    config: String,
    config_path: PathBuf,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    /// Where stderr goes when it is a file rather than captured.
    stderr_path: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl Drop for Keygate {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("=== keygate under test ===\n{}", self.explain());
        }
        if let Err(e) = self.child.kill() {
            eprintln!("keygate: kill failed: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("keygate: wait failed: {e}");
        }
    }
}

impl Keygate {
    pub fn builder() -> KeygateBuilder {
        KeygateBuilder {
            routes: Vec::new(),
            sections: Vec::new(),
            env: Vec::new(),
            tls: None,
            store: None,
            admin_tokens: Vec::new(),
            stderr_file: false,
        }
    }

    /// The raw admin token of the `ops` token (role admin).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The config text the process was started with.
    pub fn config(&self) -> &str {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temp dir holding the config and the store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far: stdout, then stderr.
    pub fn output(&self) -> String {
        let out = self
            .stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        format!("--- stdout:\n{out}--- stderr:\n{}", self.stderr())
    }

    /// What the process wrote to stderr so far (read from the file when
    /// stderr is one).
    pub fn stderr(&self) -> String {
        match &self.stderr_path {
            Some(path) => std::fs::read(path)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|e| format!("(cannot read {}: {e})\n", path.display())),
            None => self
                .stderr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// The command, config and output, for failure messages.
    pub fn explain(&self) -> String {
        format!(
            "--- command: {}\n--- config:\n{}{}",
            self.command,
            self.config,
            self.output()
        )
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill {sig} {} failed: {status}",
            self.pid()
        );
    }

    /// Asks for a graceful shutdown.
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Asks for a config reload.
    pub fn sighup(&self) {
        self.signal("-HUP");
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Err(e) = self.child.kill() {
            eprintln!("keygate: kill failed: {e}");
        }
        self.child.wait().expect("wait for keygate")
    }

    /// Waits for the process to exit, polling without blocking the runtime;
    /// panics with the output after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("cannot wait for keygate: {e}\n{}", self.explain()),
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "keygate did not exit within {timeout:?}\n{}",
                    self.explain()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn proc_status_kb(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {path}:\n{text}"))
    }

    /// Resident memory now, in KiB (VmRSS).
    pub fn rss_kb(&self) -> u64 {
        self.proc_status_kb("VmRSS:")
    }

    /// Peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kb(&self) -> u64 {
        self.proc_status_kb("VmHWM:")
    }

    /// Sends `req` to the proxy over a new plain HTTP/1.1 connection (for
    /// h2c, TLS and raw TCP see [`client`]).
    pub async fn send(&self, req: Req) -> client::Resp {
        client::h1(self.proxy, req).await
    }

    /// Calls the admin API with the `ops` admin token.
    pub async fn admin(&self, req: Req) -> client::Resp {
        let req = req.header("authorization", &format!("Bearer {}", self.admin_token));
        client::h1(self.admin, req).await
    }

    /// Creates an API key through `POST /v1/keys` and returns `(id, secret)`.
    pub async fn create_key(&self, body: serde_json::Value) -> (String, String) {
        let req =
            Req::post("/v1/keys", body.to_string()).header("content-type", "application/json");
        let resp = self.admin(req).await;
        resp.assert_status(201);
        let json = resp.json();
        let id = json["key"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no key.id\n{resp}"));
        let secret = json["secret"]
            .as_str()
            .unwrap_or_else(|| panic!("no secret\n{resp}"));
        (id.to_owned(), secret.to_owned())
    }
}
