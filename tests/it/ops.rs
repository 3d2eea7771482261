//! Operations (issue 7): hot reload on SIGHUP and on file change, `/metrics`
//! parsed as Prometheus text and moving with the traffic, the access log, and
//! `/readyz` with the store down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::common::client::{self, Req};
use crate::common::keygate::{Keygate, KeygateBuilder};
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;

/// A reload must show in behaviour within this (issue 7).
const RELOAD_DEADLINE: Duration = Duration::from_secs(2);

fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!("{{name: {name}, match: {{path_prefix: '{prefix}'}}, upstream: '{upstream}'{extra}}}")
}

fn with_key(req: Req, secret: &str) -> Req {
    req.header("x-api-key", secret)
}

/// Writes `text` to `path` the way deploy tools do: a new file renamed over
/// the old one, so no reader ever sees half a file.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).expect("write the new config");
    std::fs::rename(&tmp, path).expect("rename the new config into place");
}

/// Which upstream answers `GET target` (the echo's name), or the status.
async fn answered_by(kg: &Keygate, target: &str) -> String {
    let resp = kg.send(Req::get(target)).await;
    match resp.status.as_u16() {
        200 => resp.json()["upstream"]
            .as_str()
            .unwrap_or("<no name>")
            .to_owned(),
        other => format!("status {other}"),
    }
}

/// Polls until `target` is answered by `want`; returns how long it took.
async fn wait_answer(kg: &Keygate, target: &str, want: &str, since: Instant) -> Duration {
    loop {
        let got = answered_by(kg, target).await;
        if got == want {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < RELOAD_DEADLINE,
            "{target} still answered by {got:?}, not {want:?}, {:?} after the change\n{}",
            since.elapsed(),
            kg.explain()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lines of keygate's output containing `needle`.
fn lines_with(kg: &Keygate, needle: &str) -> Vec<String> {
    kg.output()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

async fn wait_lines(kg: &Keygate, needle: &str, n: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = lines_with(kg, needle);
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} lines with {needle:?} within {timeout:?}, found {}\n{}",
            found.len(),
            kg.explain()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn two_upstream_gateway(one: &Upstream, two: &Upstream) -> (KeygateBuilder, String, String) {
    let before = route("r", "/r/", &one.url(), ", auth: none");
    let after = route("r", "/r/", &two.url(), ", auth: none");
    (Keygate::builder().route(&before), before, after)
}

// --- hot reload ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_change_the_file_watch_cannot_see() {
    let one = Upstream::named("one").await;
    let two = Upstream::named("two").await;
    let (builder, before, after) = two_upstream_gateway(&one, &two);
    let kg = builder.start().await;
    assert_eq!(answered_by(&kg, "/r/x").await, "one");

    // Write the new config through a hard link in another directory: the
    // watch on the config's directory does not see writes made through
    // another path, so only SIGHUP can apply this one.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let link = elsewhere.path().join("link.yaml");
    std::fs::hard_link(kg.config_path(), &link).expect("hard link to the config");
    std::fs::write(&link, kg.config().replace(&before, &after)).expect("write via the link");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        answered_by(&kg, "/r/x").await,
        "one",
        "the change was applied without SIGHUP; this test cannot tell the two paths apart\n{}",
        kg.explain()
    );

    let sent = Instant::now();
    kg.sighup();
    let took = wait_answer(&kg, "/r/x", "two", sent).await;
    println!("ops: SIGHUP reload took effect after {took:?}");
    wait_lines(&kg, "config reloaded", 1, RELOAD_DEADLINE).await;
    let m = Metrics::scrape(&kg).await;
    assert_eq!(
        m.sum(
            "keygate_config_reloads_total",
            &[("trigger", "sighup"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(m.sum("keygate_config_last_reload_success", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_the_file_reloads_it_in_place_or_by_rename() {
    let one = Upstream::named("one").await;
    let two = Upstream::named("two").await;
    let (builder, before, after) = two_upstream_gateway(&one, &two);
    let kg = builder.start().await;
    assert_eq!(answered_by(&kg, "/r/x").await, "one");

    // In place, as `echo > file` or an editor that truncates and writes.
    let written = Instant::now();
    std::fs::write(kg.config_path(), kg.config().replace(&before, &after)).expect("rewrite");
    let in_place = wait_answer(&kg, "/r/x", "two", written).await;

    // A new file renamed over the old, as most editors and deploy tools do.
    let written = Instant::now();
    replace_file(kg.config_path(), kg.config());
    let renamed = wait_answer(&kg, "/r/x", "one", written).await;
    println!("ops: file reload took effect after {in_place:?} (in place), {renamed:?} (rename)");

    let m = Metrics::scrape(&kg).await;
    let ok = m.sum(
        "keygate_config_reloads_total",
        &[("trigger", "file"), ("result", "ok")],
    );
    assert!(ok >= 2.0, "file reloads counted: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_with_its_location_and_the_old_config_stays() {
    let one = Upstream::named("one").await;
    let two = Upstream::named("two").await;
    let (builder, before, after) = two_upstream_gateway(&one, &two);
    let kg = builder.start().await;
    assert_eq!(answered_by(&kg, "/r/x").await, "one");

    // The new route plus a typo three lines from the end.
    let broken = format!(
        "{}limits:\n  max_conections: 5\n",
        kg.config().replace(&before, &after)
    );
    let typo_line = broken
        .lines()
        .position(|l| l.contains("max_conections"))
        .unwrap()
        + 1;
    let location = format!("{}:{typo_line}:3:", kg.config_path().display());

    replace_file(kg.config_path(), &broken);
    let rejected = wait_lines(&kg, "config reload rejected", 1, RELOAD_DEADLINE).await;
    assert_eq!(
        rejected.len(),
        1,
        "one line per rejected reload: {rejected:#?}"
    );
    assert!(
        rejected[0].contains(&location) && rejected[0].contains("limits.max_conections"),
        "the rejection names file:line:column ({location}) and the field: {}",
        rejected[0]
    );
    println!("ops: rejected reload logged as: {}", rejected[0].trim());
    assert_eq!(
        answered_by(&kg, "/r/x").await,
        "one",
        "old config must stay"
    );

    // SIGHUP with the same broken file: refused again, still the old config.
    kg.sighup();
    wait_lines(&kg, "config reload rejected", 2, RELOAD_DEADLINE).await;
    assert_eq!(answered_by(&kg, "/r/x").await, "one");
    let m = Metrics::scrape(&kg).await;
    assert_eq!(
        m.sum("keygate_config_reloads_total", &[("result", "failed")]),
        2.0
    );
    assert_eq!(m.sum("keygate_config_last_reload_success", &[]), 0.0);

    // Fixed: applied.
    let fixed = Instant::now();
    replace_file(kg.config_path(), &kg.config().replace(&before, &after));
    wait_answer(&kg, "/r/x", "two", fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_only_change_is_named_and_not_applied_while_the_rest_is() {
    let one = Upstream::named("one").await;
    let two = Upstream::named("two").await;
    let (builder, before, after) = two_upstream_gateway(&one, &two);
    let kg = builder.start().await;
    let changed = kg.config().replace(&before, &after).replacen(
        "listen: 127.0.0.1:0",
        "listen: 127.0.0.1:1",
        1,
    );
    assert_ne!(changed, kg.config().replace(&before, &after));
    let written = Instant::now();
    replace_file(kg.config_path(), &changed);
    wait_answer(&kg, "/r/x", "two", written).await;
    let warned = wait_lines(&kg, "need a restart", 1, RELOAD_DEADLINE).await;
    assert!(warned[0].contains("listen"), "{}", warned[0]);
    // Still on the port it was started on.
    assert_eq!(answered_by(&kg, "/r/x").await, "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_in_flight_through_ten_reloads_all_succeed() {
    const REQUESTS: usize = 1000;
    const CONCURRENCY: usize = 50;
    const RELOADS: usize = 10;
    let up = Upstream::start().await;
    let api = route("api", "/api/", &up.url(), "");
    let kg = Arc::new(
        Keygate::builder()
            .section("rate_limit:\n  default: {per_second: 100000, burst: 100000}")
            .route(&api)
            .start()
            .await,
    );
    let (_, secret) = kg
        .create_key(json!({"name": "load", "access": "full"}))
        .await;
    // Two valid configs that differ (the route's timeout), swapped back and forth.
    let a = kg.config().to_owned();
    let b = a.replace(&api, &route("api", "/api/", &up.url(), ", timeout: 29s"));
    assert_ne!(a, b);

    let failures = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(REQUESTS);
    // Reload k fires once k/11 of the requests are done, so every reload
    // lands while the run is in full flow (50 requests in flight).
    let reloader = {
        let kg = kg.clone();
        let completed = completed.clone();
        tokio::spawn(async move {
            for k in 1..=RELOADS {
                while completed.load(Ordering::SeqCst) < k * REQUESTS / (RELOADS + 1) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                replace_file(kg.config_path(), if k % 2 == 1 { &b } else { &a });
                kg.sighup();
            }
        })
    };
    for i in 0..REQUESTS {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let kg = kg.clone();
        let secret = secret.clone();
        let failures = failures.clone();
        let completed = completed.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            // The upstream holds each request 20 ms, so reloads land while
            // requests are in flight.
            let req = with_key(Req::get(&format!("/api/slow/20?i={i}")), &secret);
            let resp = kg.send(req).await;
            if resp.status != 200 {
                failures.fetch_add(1, Ordering::SeqCst);
                eprintln!("request {i} failed:\n{resp}");
            }
            completed.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let mut panicked = 0;
    for t in tasks {
        if t.await.is_err() {
            panicked += 1;
        }
    }
    reloader.await.expect("reloader");
    let took = started.elapsed();
    // Every SIGHUP is a reload; the file watch may add some of its own.
    let reloaded = wait_lines(&kg, "config reloaded", RELOADS, Duration::from_secs(5)).await;
    let failed = failures.load(Ordering::SeqCst) + panicked;
    println!(
        "ops: {REQUESTS} requests ({CONCURRENCY} at a time) in {took:?} through {} reloads: {failed} failures",
        reloaded.len()
    );
    assert_eq!(
        failed,
        0,
        "requests failed during reloads\n{}",
        kg.explain()
    );
    assert_eq!(up.hits(), REQUESTS as u64);
    let m = Metrics::scrape(&kg).await;
    assert_eq!(
        m.sum(
            "keygate_config_reloads_total",
            &[("trigger", "sighup"), ("result", "ok")]
        ),
        RELOADS as f64
    );
    assert!(
        lines_with(&kg, "config reload rejected").is_empty(),
        "{}",
        kg.explain()
    );
}

// --- metrics ---------------------------------------------------------------------------

/// A strict reader of the Prometheus text format (0.0.4): every line is a
/// comment, a `# HELP`/`# TYPE` line or a well-formed sample; a family's TYPE
/// comes before its samples and at most once; no series appears twice;
/// counters are not negative; every histogram's buckets are cumulative and
/// end in `+Inf` equal to its `_count`.
struct Metrics {
    types: HashMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Metrics {
    async fn scrape(kg: &Keygate) -> Metrics {
        let resp = client::h1(kg.admin, Req::get("/metrics")).await;
        resp.assert_status(200);
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = String::from_utf8(resp.body.to_vec()).expect("metrics are UTF-8");
        Metrics::parse(&text).unwrap_or_else(|e| panic!("invalid Prometheus text: {e}\n{text}"))
    }

    fn parse(text: &str) -> Result<Metrics, String> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut seen_family: HashSet<String> = HashSet::new();
        let mut series: HashSet<String> = HashSet::new();
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        check_name(name).map_err(at)?;
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                        {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        if seen_family.contains(name) {
                            return Err(at("TYPE after the family's samples".into()));
                        }
                        if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                            return Err(at("second TYPE".into()));
                        }
                    }
                    (Some("HELP"), Some(name), _) => {
                        check_name(name).map_err(at)?;
                        if !helps.insert(name.to_owned()) {
                            return Err(at("second HELP".into()));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, labels, value) = parse_sample(line).map_err(at)?;
            let family = family_of(&name, &types);
            seen_family.insert(family.clone());
            if types.get(&family).is_some_and(|t| t == "counter") && value < 0.0 {
                return Err(at("negative counter".into()));
            }
            let key = format!("{name}{labels:?}");
            if !series.insert(key) {
                return Err(at("duplicate series".into()));
            }
            samples.push((name, labels, value));
        }
        let m = Metrics {
            types,
            samples,
            text: text.to_owned(),
        };
        m.check_histograms()?;
        Ok(m)
    }

    fn check_histograms(&self) -> Result<(), String> {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            let mut counts: BTreeMap<String, f64> = BTreeMap::new();
            for (name, labels, value) in &self.samples {
                let mut rest = labels.clone();
                if *name == format!("{family}_bucket") {
                    let le = rest
                        .remove("le")
                        .ok_or_else(|| format!("{family}_bucket without le"))?;
                    let le = parse_value(&le)?;
                    buckets
                        .entry(format!("{rest:?}"))
                        .or_default()
                        .push((le, *value));
                } else if *name == format!("{family}_count") {
                    counts.insert(format!("{rest:?}"), *value);
                }
            }
            for (series, mut bs) in buckets {
                bs.sort_by(|a, b| a.0.total_cmp(&b.0));
                if bs.windows(2).any(|w| w[1].1 < w[0].1) {
                    return Err(format!("{family}{series}: buckets not cumulative: {bs:?}"));
                }
                let last = bs.last().expect("at least one bucket");
                if last.0 != f64::INFINITY {
                    return Err(format!("{family}{series}: no +Inf bucket"));
                }
                if counts.get(&series) != Some(&last.1) {
                    return Err(format!("{family}{series}: +Inf bucket != _count"));
                }
            }
        }
        Ok(())
    }

    /// The sum of every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

type Sample = (String, BTreeMap<String, String>, f64);

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = inner.find('=').ok_or("label without =")?;
            let label = &inner[..eq];
            let valid = label
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("bad label name {label:?}"));
            }
            let mut chars = inner[eq + 1..].char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    '"' => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    '\n' => return Err("newline in label value".into()),
                    c => value.push(c),
                }
            }
            let end = end.ok_or("unterminated label value")?;
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            inner = &inner[end..];
            inner = inner.strip_prefix(',').unwrap_or(inner);
        }
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok((name.to_owned(), labels, value))
}

/// The family a sample belongs to: its own name, or a histogram/summary
/// family for `_bucket`, `_sum` and `_count`.
fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
        {
            return base.to_owned();
        }
    }
    name.to_owned()
}

#[test]
fn the_metrics_reader_is_strict() {
    let good = "# HELP a_total A thing.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let m = Metrics::parse(good).expect("valid");
    assert_eq!(m.sum("a_total", &[("y", "q\"")]), 3.0);
    for bad in [
        "a b c\n",
        "a{x=1} 2\n",
        "a{x=\"1\"} two\n",
        "a 1\n# TYPE a counter\n",
        "# TYPE a counter\n# TYPE a counter\n",
        "a{x=\"1\"} 1\na{x=\"1\"} 2\n",
        "# TYPE a_total counter\na_total -1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
        "1a 1\n",
    ] {
        assert!(Metrics::parse(bad).is_err(), "accepted: {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_allowed_denied_and_limited_requests() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .section("rate_limit:\n  default: {per_second: 1, burst: 3}")
        .route(&route("api", "/api/", &up.url(), ", scopes: [orders]"))
        .route(&route("gone", "/gone/", &Upstream::refused_url(), ""))
        .start()
        .await;
    let (_, full) = kg
        .create_key(json!({"name": "full", "scopes": ["orders"], "access": "full", "rate_limit": {"per_second": 1000, "burst": 1000}}))
        .await;
    let (_, read_only) = kg
        .create_key(json!({"name": "ro", "scopes": ["orders"], "access": "read_only", "rate_limit": {"per_second": 1000, "burst": 1000}}))
        .await;
    let (_, no_scope) = kg
        .create_key(json!({"name": "none", "access": "full", "rate_limit": {"per_second": 1000, "burst": 1000}}))
        .await;
    let (_, limited) = kg
        .create_key(json!({"name": "limited", "scopes": ["orders"], "access": "full"}))
        .await;
    let before = Metrics::scrape(&kg).await;

    for _ in 0..5 {
        kg.send(with_key(Req::get("/api/a"), &full))
            .await
            .assert_status(200);
    }
    for _ in 0..2 {
        kg.send(Req::get("/api/a"))
            .await
            .assert_problem(401, "missing_key");
    }
    kg.send(with_key(
        Req::get("/api/a"),
        "kg_notarealkeyatall0000000000000000000000",
    ))
    .await
    .assert_problem(401, "invalid_key");
    kg.send(with_key(Req::post("/api/a", "{}"), &read_only))
        .await
        .assert_problem(403, "read_only_key");
    kg.send(with_key(Req::get("/api/a"), &no_scope))
        .await
        .assert_problem(403, "insufficient_scope");
    let mut limited_ok = 0;
    let mut limited_429 = 0;
    for _ in 0..6 {
        let r = kg.send(with_key(Req::get("/api/a"), &limited)).await;
        match r.status.as_u16() {
            200 => limited_ok += 1,
            429 => {
                r.assert_problem(429, "rate_limited");
                limited_429 += 1;
            }
            _ => panic!("unexpected\n{r}"),
        }
    }
    assert!(
        limited_429 >= 2,
        "burst 3 of 6: {limited_ok} ok, {limited_429} limited"
    );
    kg.send(with_key(Req::get("/gone/a"), &full))
        .await
        .assert_problem(502, "upstream_unavailable");
    kg.send(Req::get("/nowhere"))
        .await
        .assert_problem(404, "no_route");

    let after = Metrics::scrape(&kg).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let ok = (5 + limited_ok) as f64;
    let api_req = |status: &'static str, code: &'static str| {
        delta(
            "keygate_requests_total",
            &[("route", "api"), ("status", status), ("code", code)],
        )
    };
    assert_eq!(api_req("200", "upstream"), ok);
    assert_eq!(api_req("401", "missing_key"), 2.0);
    assert_eq!(api_req("401", "invalid_key"), 1.0);
    assert_eq!(api_req("403", "read_only_key"), 1.0);
    assert_eq!(api_req("403", "insufficient_scope"), 1.0);
    assert_eq!(api_req("429", "rate_limited"), limited_429 as f64);
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[
                ("route", "gone"),
                ("status", "502"),
                ("code", "upstream_unavailable")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[("route", ""), ("status", "404"), ("code", "no_route")]
        ),
        1.0
    );
    assert_eq!(
        delta("keygate_auth_failures_total", &[("code", "missing_key")]),
        2.0
    );
    assert_eq!(
        delta("keygate_auth_failures_total", &[("code", "invalid_key")]),
        1.0
    );
    assert_eq!(delta("keygate_rate_limited_total", &[]), limited_429 as f64);
    assert_eq!(
        delta("keygate_upstream_errors_total", &[("kind", "unavailable")]),
        1.0
    );
    // Histograms: every api request is timed, upstream time only when called.
    let api_total = ok + 2.0 + 1.0 + 1.0 + 1.0 + limited_429 as f64;
    assert_eq!(
        delta(
            "keygate_request_duration_seconds_count",
            &[("route", "api")]
        ),
        api_total
    );
    assert_eq!(
        delta(
            "keygate_upstream_duration_seconds_count",
            &[("route", "api")]
        ),
        ok
    );
    assert!(delta("keygate_request_duration_seconds_sum", &[("route", "api")]) > 0.0);
    // The key cache and the store it reads through.
    // 13 lookups of 4 valid keys (the bad checksum never reaches the cache).
    let (hits, misses) = (
        delta("keygate_cache_hits_total", &[]),
        delta("keygate_cache_misses_total", &[]),
    );
    assert!(
        hits >= 9.0 && misses >= 1.0 && hits + misses >= 13.0,
        "{hits} hits, {misses} misses"
    );
    assert!(delta("keygate_cache_negative_hits_total", &[]) >= 0.0);
    assert!(
        delta(
            "keygate_store_call_duration_seconds_count",
            &[("op", "get_by_hash")]
        ) >= 1.0
    );
    for name in [
        "keygate_open_connections",
        "keygate_cache_entries",
        "keygate_store_call_duration_seconds_bucket",
    ] {
        assert!(after.has(name), "{name} missing\n{}", after.text);
    }
    assert_eq!(after.types["keygate_requests_total"], "counter");
    assert_eq!(after.types["keygate_request_duration_seconds"], "histogram");
    // No key or admin token anywhere, and no key ids without the opt-in.
    for secret in [&full, &read_only, &no_scope, &limited] {
        assert!(!after.text.contains(secret.as_str()));
    }
    assert!(!after.text.contains(kg.admin_token()));
    assert!(!after.has("keygate_key_requests_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_id_labels_are_opt_in_and_metrics_can_be_switched_off() {
    let up = Upstream::start().await;
    let api = route("api", "/api/", &up.url(), "");
    let kg = Keygate::builder()
        .section("metrics:\n  key_id_labels: true")
        .route(&api)
        .start()
        .await;
    let (id, secret) = kg.create_key(json!({"name": "k", "access": "full"})).await;
    kg.send(with_key(Req::get("/api/a"), &secret))
        .await
        .assert_status(200);
    let m = Metrics::scrape(&kg).await;
    assert_eq!(
        m.sum(
            "keygate_key_requests_total",
            &[("key_id", id.as_str()), ("code", "upstream")]
        ),
        1.0
    );
    assert!(!m.text.contains(&secret));

    // Switched off by a reload: the request path stops counting.
    let off = kg.config().replace(
        "metrics:\n  key_id_labels: true",
        "metrics:\n  enabled: false",
    );
    let counted = m.sum("keygate_requests_total", &[("route", "api")]);
    replace_file(kg.config_path(), &off);
    wait_lines(&kg, "config reloaded", 1, RELOAD_DEADLINE).await;
    for _ in 0..3 {
        kg.send(with_key(Req::get("/api/a"), &secret))
            .await
            .assert_status(200);
    }
    let m = Metrics::scrape(&kg).await;
    assert_eq!(
        m.sum("keygate_requests_total", &[("route", "api")]),
        counted
    );
}

// --- access log ------------------------------------------------------------------------

/// The access lines of `output`, by request id.
fn access_lines(output: &str) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for line in output.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["target"] != "keygate::access" {
            continue;
        }
        let id = v["request_id"].as_str().unwrap_or("").to_owned();
        by_id.entry(id).or_default().push(v);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_access_line_without_any_key() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .section("logging:\n  format: json\n  access_log: true")
        .route(&route("api", "/api/", &up.url(), ", scopes: [orders]"))
        .route(&route("open", "/open/", &up.url(), ", auth: none"))
        .route(&route("gone", "/gone/", &Upstream::refused_url(), ""))
        .start()
        .await;
    let (full_id, full) = kg
        .create_key(json!({"name": "full", "owner": "team-a", "scopes": ["orders"], "access": "full", "rate_limit": {"per_second": 1, "burst": 2}}))
        .await;
    let (ro_id, read_only) = kg
        .create_key(
            json!({"name": "ro", "owner": "team-b", "scopes": ["orders"], "access": "read_only"}),
        )
        .await;
    let unknown = keygate::keys::Token::generate("kg_").expose().to_owned();
    let secrets = [full.clone(), read_only.clone(), unknown.clone()];

    // (request id, request, status, code, key id, owner, route, upstream status)
    type Case = (
        &'static str,
        Req,
        u16,
        &'static str,
        Option<String>,
        Option<&'static str>,
        Option<&'static str>,
        Option<u16>,
    );
    let cases: Vec<Case> = vec![
        (
            "al-ok",
            with_key(Req::get("/api/orders?page=2"), &full),
            200,
            "upstream",
            Some(full_id.clone()),
            Some("team-a"),
            Some("api"),
            Some(200),
        ),
        (
            "al-post",
            with_key(Req::post("/api/orders", "0123456789"), &full),
            200,
            "upstream",
            Some(full_id.clone()),
            Some("team-a"),
            Some("api"),
            Some(200),
        ),
        (
            "al-limited",
            with_key(Req::get("/api/orders"), &full),
            429,
            "rate_limited",
            Some(full_id.clone()),
            Some("team-a"),
            Some("api"),
            None,
        ),
        (
            "al-query-keys",
            with_key(
                Req::get(&format!(
                    "/api/{}/x?api_key={}&q={}&{}&page=1",
                    read_only, full, unknown, read_only
                )),
                &read_only,
            ),
            200,
            "upstream",
            Some(ro_id.clone()),
            Some("team-b"),
            Some("api"),
            Some(200),
        ),
        (
            "al-readonly",
            with_key(Req::post("/api/orders", "{}"), &read_only),
            403,
            "read_only_key",
            Some(ro_id.clone()),
            Some("team-b"),
            Some("api"),
            None,
        ),
        (
            "al-missing",
            Req::get("/api/orders"),
            401,
            "missing_key",
            None,
            None,
            Some("api"),
            None,
        ),
        (
            "al-unknown",
            with_key(Req::get("/api/orders"), &unknown),
            401,
            "invalid_key",
            None,
            None,
            Some("api"),
            None,
        ),
        (
            "al-open",
            Req::get("/open/x"),
            200,
            "upstream",
            None,
            None,
            Some("open"),
            Some(200),
        ),
        (
            "al-gone",
            with_key(Req::get("/gone/x"), &read_only),
            502,
            "upstream_unavailable",
            Some(ro_id.clone()),
            Some("team-b"),
            Some("gone"),
            None,
        ),
        (
            "al-noroute",
            Req::get("/nowhere"),
            404,
            "no_route",
            None,
            None,
            None,
            None,
        ),
    ];
    for (id, req, status, ..) in &cases {
        let r = kg.send(req.clone().header("x-request-id", id)).await;
        r.assert_status(*status);
    }

    // Switched off by a reload: no more lines.
    let off = kg.config().replace("access_log: true", "access_log: false");
    replace_file(kg.config_path(), &off);
    wait_lines(&kg, "config reloaded", 1, RELOAD_DEADLINE).await;
    kg.send(Req::get("/open/after").header("x-request-id", "al-after-off"))
        .await
        .assert_status(200);

    let mut kg = kg;
    kg.sigterm();
    kg.wait_exit(Duration::from_secs(20)).await;
    let output = kg.output();
    let lines = access_lines(&output);
    for (id, req, status, code, key_id, owner, route, upstream_status) in &cases {
        let found = lines.get(*id).map_or(&[][..], |v| v.as_slice());
        assert_eq!(
            found.len(),
            1,
            "{id}: one access line, got {found:#?}\n{output}"
        );
        let l = &found[0];
        assert_eq!(l["level"], "INFO", "{l}");
        assert!(l["timestamp"].is_string(), "{l}");
        assert_eq!(l["method"], req.method.as_str(), "{id}: {l}");
        assert_eq!(l["status"], *status, "{id}: {l}");
        assert_eq!(l["code"], *code, "{id}: {l}");
        assert_eq!(l["client"], "127.0.0.1", "{id}: {l}");
        assert_eq!(l["key_id"].as_str(), key_id.as_deref(), "{id}: {l}");
        assert_eq!(l["owner"].as_str(), *owner, "{id}: {l}");
        assert_eq!(l["route"].as_str(), *route, "{id}: {l}");
        assert_eq!(
            l["upstream_status"].as_u64(),
            upstream_status.map(u64::from),
            "{id}: {l}"
        );
        assert!(
            l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
            "{id}: {l}"
        );
        if upstream_status.is_some() || *id == "al-gone" {
            assert!(l["upstream_ms"].as_f64().is_some(), "{id}: {l}");
        } else {
            assert!(l.get("upstream_ms").is_none(), "{id}: {l}");
        }
        if *status == 200 {
            assert!(l["bytes_out"].as_u64().is_some_and(|b| b > 0), "{id}: {l}");
        }
        let path = l["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{id}: no path: {l}"));
        assert!(path.starts_with('/'), "{id}: {l}");
    }
    assert_eq!(lines["al-post"][0]["bytes_in"], 10);
    assert_eq!(lines["al-ok"][0]["path"], "/api/orders?page=2");
    assert_eq!(
        lines["al-query-keys"][0]["path"],
        "/api/[redacted]/x?api_key=[redacted]&q=[redacted]&[redacted]&page=1"
    );
    assert!(
        !lines.contains_key("al-after-off"),
        "access_log: false still logs"
    );
    let total: usize = lines.values().map(Vec::len).sum();
    assert_eq!(
        total,
        cases.len(),
        "one line per request, nothing else\n{output}"
    );

    // No key, in full or without its prefix, anywhere in what keygate printed.
    let mut hits = Vec::new();
    for s in secrets.iter().map(String::as_str).chain([kg.admin_token()]) {
        for needle in [s, &s[3..]] {
            hits.extend(
                output
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(str::to_owned),
            );
        }
    }
    println!(
        "ops: access log: {total} lines for {} requests, {} bytes of output searched for {} secrets: {} hits",
        cases.len() + 1,
        output.len(),
        secrets.len() + 1,
        hits.len()
    );
    assert!(
        hits.is_empty(),
        "secrets in the output:\n{}",
        hits.join("\n")
    );
}

/// With stderr a regular file (`2> file`), proxy workers write their chunks of
/// access lines to it themselves, beside the log writer thread's own lines:
/// under concurrent load every line stays whole and every request keeps its
/// one line, through shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_written_to_a_file_stay_whole_beside_other_log_lines() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 250;
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .stderr_to_file()
        // Two workers, so two threads write chunks; debug, so every request
        // to the refused upstream also logs through the writer thread.
        .env("KEYGATE_WORKERS", "2")
        .env("KEYGATE_LOG", "debug")
        .section("logging:\n  format: json\n  access_log: true")
        .route(&route("open", "/open/", &up.url(), ", auth: none"))
        .route(&route(
            "gone",
            "/gone/",
            &Upstream::refused_url(),
            ", auth: none",
        ))
        .start()
        .await;
    let sends = (0..TASKS).map(|t| {
        let kg = &kg;
        async move {
            for i in 0..PER_TASK {
                let (path, status) = match i % 4 {
                    0 => (format!("/gone/{t}/{i}"), 502),
                    _ => (format!("/open/{t}/{i}?pad={}", "x".repeat(i % 97)), 200),
                };
                kg.send(Req::get(&path).header("x-request-id", &format!("file-{t}-{i}")))
                    .await
                    .assert_status(status);
            }
        }
    });
    futures_util::future::join_all(sends).await;

    let mut kg = kg;
    kg.sigterm();
    kg.wait_exit(Duration::from_secs(20)).await;
    let stderr = kg.stderr();
    let torn: Vec<&str> = stderr
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_err())
        .collect();
    assert!(
        torn.is_empty(),
        "{} of {} stderr lines are not whole JSON lines, e.g. {:?}",
        torn.len(),
        stderr.lines().count(),
        &torn[..torn.len().min(3)]
    );
    let lines = access_lines(&stderr);
    let others = stderr.lines().count() - lines.values().map(Vec::len).sum::<usize>();
    for t in 0..TASKS {
        for i in 0..PER_TASK {
            let id = format!("file-{t}-{i}");
            let found = lines.get(&id).map_or(0, Vec::len);
            assert_eq!(found, 1, "{id}: {found} access lines");
        }
    }
    assert!(
        others >= TASKS * PER_TASK / 4,
        "expected a debug line per refused upstream call, got {others} other lines"
    );
    println!(
        "ops: access log to a file: {} requests, {} access lines, {others} other lines, {} bytes",
        TASKS * PER_TASK,
        lines.len(),
        stderr.len()
    );
}

// --- health ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_store_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let kg = Keygate::builder()
        .store(&format!("backend: redis\nredis:\n  url: {}", redis.url()))
        .start()
        .await;
    let ready = client::h1(kg.admin, Req::get("/readyz")).await;
    ready.assert_status(200);
    assert_eq!(
        ready.json(),
        json!({"ready": true, "checks": {"store": "ok", "config": "ok", "listeners": "ok"}})
    );

    redis.stop();
    let started = Instant::now();
    let down = loop {
        let r = client::h1(kg.admin, Req::get("/readyz")).await;
        if r.status == 503 {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still ready\n{r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let body = down.json();
    assert_eq!(body["ready"], false, "{down}");
    assert_eq!(body["not_ready"], json!(["store"]), "{down}");
    let store = body["checks"]["store"].as_str().unwrap_or("");
    assert!(["unavailable", "timeout"].contains(&store), "{down}");
    assert_eq!(body["checks"]["config"], "ok");
    assert_eq!(body["checks"]["listeners"], "ok");
    let raw = String::from_utf8_lossy(&down.body);
    assert!(
        !raw.contains("127.0.0.1") && !raw.contains("redis://"),
        "no address in {raw}"
    );
    // Alive all the same.
    client::h1(kg.admin, Req::get("/healthz"))
        .await
        .assert_status(200);

    redis.restart();
    let started = Instant::now();
    loop {
        let r = client::h1(kg.admin, Req::get("/readyz")).await;
        if r.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not ready again\n{r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
