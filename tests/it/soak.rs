//! Soak (issue 10): keygate (this build's binary, embedded store, default
//! logging with the access log on) under a fixed-rate mix of valid and
//! invalid keys for minutes, its resident memory and open file descriptors
//! sampled from `/proc` throughout. Not part of the suite: `benches/soak.sh`
//! runs it with its settings in `SOAK_*` variables.
//!
//! keygate is started here rather than through the harness's builder so its
//! log goes to a file, not into this process's memory (ten minutes of access
//! lines are hundreds of megabytes).
//!
//! Checks: RSS after the warm-up never exceeds its value at the end of the
//! warm-up by more than 10%; the fd count after the warm-up never exceeds
//! its value then by more than [`FD_SLACK`]; every request got exactly the
//! answer its kind calls for (no failure, no drop, no other status).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::keys::{Token, TokenHash};
use serde_json::json;

use crate::common::client::{self, Req};
use crate::common::load::{Answer, Load, ms};
use crate::common::upstream::Upstream;

/// Open fds may vary this much around the warm-up value: each worker's
/// upstream pool opens and closes connections as the number of requests in
/// flight moves (+16 seen in a 10-minute run). A leak of one fd per 10,000
/// requests would add 120.
const FD_SLACK: usize = 32;
/// RSS may grow this much past its value at the end of the warm-up.
const RSS_GROWTH: f64 = 0.10;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// The kinds of the mix, with the answer each must get.
const KINDS: [(&str, u16, Option<&str>); 8] = [
    ("valid", 200, None),
    ("valid-bearer", 200, None),
    ("bad-checksum", 401, Some("invalid_key")),
    ("unknown", 401, Some("invalid_key")),
    ("revoked", 401, Some("key_revoked")),
    ("no-key", 401, Some("missing_key")),
    ("wrong-scope", 403, Some("insufficient_scope")),
    ("public", 200, None),
];

fn bad_checksum_key() -> String {
    let mut b = Token::generate("kg_").expose().as_bytes().to_vec();
    let last = b.len() - 1;
    b[last] = if b[last] == b'0' { b'1' } else { b'0' };
    String::from_utf8(b).expect("ASCII token")
}

struct Sample {
    at: Duration,
    rss_kb: u64,
    fds: usize,
    done: u64,
}

fn sample(pid: u32, at: Duration, done: u64) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("keygate ({pid}) is gone: {e}"));
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count();
    Sample {
        at,
        rss_kb,
        fds,
        done,
    }
}

/// A keygate process with its log in a file, killed when dropped.
struct Process {
    child: std::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("soak: kill keygate: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("soak: wait for keygate: {e}");
        }
    }
}

fn start_keygate(dir: &std::path::Path, config: &str) -> Process {
    let path = dir.join("keygate.yaml");
    std::fs::write(&path, config).expect("write the config");
    let log = std::fs::File::create(dir.join("keygate.log")).expect("create the log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .current_dir(dir)
        .env_remove("KEYGATE_LOG")
        .env_remove("KEYGATE_WORKERS")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start keygate");
    let stdout = child.stdout.take().expect("piped stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("keygate listening: "))
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.join("keygate.log")).unwrap_or_default();
            panic!("keygate did not announce its addresses; its log:\n{log}")
        });
    // `keygate listening: proxy http://ADDR admin http://ADDR`
    let rest = line
        .trim()
        .trim_start_matches("keygate listening: proxy http://");
    let (proxy, admin) = rest.split_once(" admin http://").expect("announce line");
    Process {
        proxy: proxy.parse().expect("proxy address"),
        admin: admin.parse().expect("admin address"),
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run benches/soak.sh"]
async fn soak_mixed_keys_at_a_fixed_rate() {
    let duration = Duration::from_secs(env_u64("SOAK_DURATION_S", 600));
    let rate = env_u64("SOAK_RATE", 2000) as u32;
    let connections = env_u64("SOAK_CONNECTIONS", 64) as usize;
    let every = Duration::from_secs(env_u64("SOAK_SAMPLE_S", 5).max(1));
    let warmup = Duration::from_secs(env_u64("SOAK_WARMUP_S", (duration.as_secs() / 5).min(60)));
    assert!(
        warmup < duration,
        "the warm-up must end before the run does"
    );

    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let admin_token = Token::generate("kgadm_").expose().to_owned();
    let config = format!(
        "listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  tokens:
    - {{name: ops, role: admin, sha256: \"{sha}\"}}
store:
  backend: embedded
  path: {db:?}
rate_limit:
  default: {{per_second: 1000000, burst: 1000000}}
  failed_auth_per_ip: {{per_minute: 100000000}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: '{up}', scopes: [orders]}}
  - {{name: public, match: {{path_prefix: /public/}}, upstream: '{up}', auth: none}}
",
        sha = TokenHash::of(&admin_token).to_hex(),
        db = dir.path().join("data/keygate.redb").display().to_string(),
        up = up.url(),
    );
    let kg = start_keygate(dir.path(), &config);
    let pid = kg.child.id();
    let create = |body: serde_json::Value| {
        let req = Req::post("/v1/keys", body.to_string())
            .header("content-type", "application/json")
            .header("authorization", &format!("Bearer {admin_token}"));
        client::h1(kg.admin, req)
    };
    let mut valid = Vec::new();
    for k in 0..50 {
        let resp =
            create(json!({"name": format!("soak-{k}"), "scopes": ["orders"], "access": "full"}))
                .await;
        resp.assert_status(201);
        valid.push(resp.json()["secret"].as_str().expect("secret").to_owned());
    }
    let resp = create(json!({"name": "no-scope", "access": "full"})).await;
    resp.assert_status(201);
    let unscoped = resp.json()["secret"].as_str().expect("secret").to_owned();
    let mut revoked = Vec::new();
    for k in 0..10 {
        let body = json!({"name": format!("revoked-{k}"), "scopes": ["orders"], "access": "full"});
        let resp = create(body).await;
        resp.assert_status(201);
        let id = resp.json()["key"]["id"].as_str().expect("id").to_owned();
        revoked.push(resp.json()["secret"].as_str().expect("secret").to_owned());
        let req = Req::post(&format!("/v1/keys/{id}/revoke"), "{}")
            .header("content-type", "application/json")
            .header("authorization", &format!("Bearer {admin_token}"));
        client::h1(kg.admin, req).await.assert_status(200);
    }

    let keys = Arc::new((valid, unscoped, revoked));
    let run = Load::new(rate, duration)
        .connections(connections)
        .keep_shots(false)
        .start(kg.proxy, move |i| {
            let (valid, unscoped, revoked) = &*keys;
            let kind = (i % KINDS.len() as u64) as u32;
            let n = (i / KINDS.len() as u64) as usize;
            let target = format!("/api/orders/{n}?page={}", i % 7);
            let req = match kind {
                0 => Req::get(&target).header("x-api-key", &valid[n % valid.len()]),
                1 => Req::get(&target).header(
                    "authorization",
                    &format!("Bearer {}", valid[(n + 7) % valid.len()]),
                ),
                2 => Req::get(&target).header("x-api-key", &bad_checksum_key()),
                3 => Req::get(&target).header("x-api-key", Token::generate("kg_").expose()),
                4 => Req::get(&target).header("x-api-key", &revoked[n % revoked.len()]),
                5 => Req::get(&target),
                6 => Req::get(&target).header("x-api-key", unscoped),
                _ => Req::get(&format!("/public/health?n={n}")),
            };
            (kind, req)
        });

    println!(
        "soak: keygate pid {pid}, {rate} req/s over {connections} connections for {} s, \
         warm-up {} s, a sample every {} s",
        duration.as_secs(),
        warmup.as_secs(),
        every.as_secs()
    );
    println!(
        "soak: {:>7} {:>10} {:>6} {:>10}",
        "t (s)", "RSS (MiB)", "fds", "requests"
    );
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut next = every.min(warmup);
    while next <= duration {
        tokio::time::sleep_until((started + next).into()).await;
        let s = sample(pid, started.elapsed(), run.done());
        println!(
            "soak: {:>7.0} {:>10.1} {:>6} {:>10}{}",
            s.at.as_secs_f64(),
            s.rss_kb as f64 / 1024.0,
            s.fds,
            s.done,
            if s.at < warmup { "  (warm-up)" } else { "" }
        );
        samples.push(s);
        // One sample exactly at the end of the warm-up: the baseline.
        next = if next < warmup {
            (next + every).min(warmup)
        } else {
            next + every
        };
    }
    let report = run.finish().await;
    let last = sample(pid, started.elapsed(), report.answered());
    samples.push(last);

    let names = |k: u32| KINDS[k as usize].0.to_owned();
    println!("soak: {}", report.summary(names));
    let unexpected = report.count(|k, a| {
        let (_, status, code) = KINDS[k as usize];
        *a != Answer::Status(status, code.map(str::to_owned))
    });
    let baseline = samples
        .iter()
        .find(|s| s.at >= warmup)
        .expect("a sample at the end of the warm-up");
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= warmup).collect();
    let rss_max = after.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    let fds_max = after.iter().map(|s| s.fds).max().unwrap_or(0);
    let end = samples.last().expect("samples");
    let growth = rss_max as f64 / baseline.rss_kb as f64 - 1.0;
    let log_bytes = std::fs::metadata(dir.path().join("keygate.log")).map_or(0, |m| m.len());
    let metrics = client::h1(kg.admin, Req::get("/metrics")).await;
    let dropped_lines = String::from_utf8_lossy(&metrics.body)
        .lines()
        .find(|l| l.starts_with("keygate_log_lines_dropped_total"))
        .and_then(|l| l.rsplit(' ').next().map(str::to_owned))
        .unwrap_or_else(|| "0".into());
    println!(
        "soak: RSS at the end of the warm-up {:.1} MiB, max after it {:.1} MiB ({:+.1}%, limit \
         {:+.0}%), at the end {:.1} MiB; fds at the end of the warm-up {}, max after it {} \
         (slack {FD_SLACK}), at the end {}; unexpected answers {unexpected}; achieved {:.0} \
         answers/s of {rate} planned; latency p50 {:.2} ms, p99 {:.2} ms; log file {:.1} MiB, \
         access lines dropped {dropped_lines}",
        baseline.rss_kb as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        growth * 100.0,
        RSS_GROWTH * 100.0,
        end.rss_kb as f64 / 1024.0,
        baseline.fds,
        fds_max,
        end.fds,
        report.answered() as f64 / duration.as_secs_f64(),
        ms(report.latency(0.5)),
        ms(report.latency(0.99)),
        log_bytes as f64 / (1024.0 * 1024.0),
    );
    let mut failed = Vec::new();
    if growth > RSS_GROWTH {
        failed.push(format!("RSS grew {:.1}% after the warm-up", growth * 100.0));
    }
    if fds_max > baseline.fds + FD_SLACK {
        failed.push(format!(
            "open fds grew from {} to {fds_max} after the warm-up",
            baseline.fds
        ));
    }
    if unexpected > 0 {
        failed.push(format!(
            "{unexpected} unexpected answers (see the tally above)"
        ));
    }
    assert!(failed.is_empty(), "soak failed: {}", failed.join("; "));
    println!("soak: PASS");
}
