//! `keygate keys ...` end to end (DESIGN.md section 1, issue 6): the real
//! binary as an admin client of a real running keygate, and the proxy
//! refusing or admitting the keys it manages.
//!
//! Every run is checked for the admin token in its output: it must never
//! appear, neither in results nor in errors.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::client::Req;
use crate::common::keygate::Keygate;
use crate::common::upstream::Upstream;

/// Upper bound on one CLI run.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The warning the CLI prints on stderr next to a secret.
const WARNING: &str = "keygate: warning: store this secret now; it is shown only this once and cannot be retrieved again";

/// One finished `keygate keys ...` run.
struct Run {
    shown: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn explain(&self) -> String {
        format!(
            "--- command: {}\n--- exit: {:?}\n--- stdout:\n{}--- stderr:\n{}",
            self.shown, self.code, self.stdout, self.stderr
        )
    }

    /// Asserts exit 0 and nothing on stderr.
    #[track_caller]
    fn ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "expected success\n{}", self.explain());
        assert_eq!(self.stderr, "", "expected no stderr\n{}", self.explain());
        self
    }

    /// Asserts exit `code`, nothing on stdout and exactly one line on stderr
    /// starting `keygate: ` and containing `needle`; no panic, no Debug dump.
    #[track_caller]
    fn fails(&self, code: i32, needle: &str) -> &Run {
        let why = self.explain();
        assert_eq!(self.code, Some(code), "exit code\n{why}");
        assert_eq!(self.stdout, "", "expected no stdout\n{why}");
        assert_eq!(self.stderr.lines().count(), 1, "one line on stderr\n{why}");
        assert!(self.stderr.starts_with("keygate: "), "{why}");
        assert!(self.stderr.contains(needle), "expected {needle:?}\n{why}");
        assert!(!self.stderr.contains("panicked"), "{why}");
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e})\n{}", self.explain()))
    }

    /// The value of the `label  value` line of a key block.
    #[track_caller]
    fn field(&self, label: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(label)?;
                rest.starts_with("  ").then(|| rest.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no {label:?} line\n{}", self.explain()))
    }
}

/// Runs `keygate keys <args>` with `env` and no other `KEYGATE_*` variables.
async fn run_cli(env: &[(&str, &str)], args: &[&str]) -> Run {
    let bin = env!("CARGO_BIN_EXE_keygate");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("keys").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYGATE_") {
            cmd.env_remove(name);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let env_shown: Vec<String> = env
        .iter()
        .map(|(k, v)| match *k {
            "KEYGATE_ADMIN_TOKEN" => format!("{k}=<token>"),
            _ => format!("{k}={v}"),
        })
        .collect();
    let shown = format!("{} {bin} keys {}", env_shown.join(" "), args.join(" "));
    let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish within {RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    Run {
        shown,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `keygate keys <args>` against `kg` with its admin token (from the
/// environment), and checks that the token is not in the output.
async fn keys(kg: &Keygate, args: &[&str]) -> Run {
    let url = format!("http://{}", kg.admin);
    let run = run_cli(
        &[
            ("KEYGATE_ADMIN_URL", &url),
            ("KEYGATE_ADMIN_TOKEN", kg.admin_token()),
        ],
        args,
    )
    .await;
    assert_no_token(&run, kg.admin_token());
    run
}

#[track_caller]
fn assert_no_token(run: &Run, token: &str) {
    assert!(
        !run.stdout.contains(token) && !run.stderr.contains(token),
        "the admin token appeared in the output\n{}",
        run.explain()
    );
}

/// A keygate with a keyed route `/api/` to an echo upstream.
async fn gateway(up: &Upstream) -> Keygate {
    Keygate::builder()
        .route(&format!(
            "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}'}}",
            up.url()
        ))
        .start()
        .await
}

/// `GET /api/orders` through the proxy with `secret`.
async fn call(kg: &Keygate, secret: &str) -> crate::common::client::Resp {
    kg.send(Req::get("/api/orders").header("authorization", &format!("Bearer {secret}")))
        .await
}

/// The secret of a create or rotate run: on stdout exactly once, warned
/// about on stderr, not on stderr itself.
#[track_caller]
fn secret_of(run: &Run) -> String {
    let why = run.explain();
    assert_eq!(run.code, Some(0), "{why}");
    assert_eq!(run.stderr, format!("{WARNING}\n"), "the warning\n{why}");
    let secret = run.field("secret");
    assert!(secret.starts_with("kg_"), "{why}");
    assert_eq!(run.stdout.matches(&secret).count(), 1, "secret once\n{why}");
    assert!(!run.stderr.contains(&secret), "{why}");
    secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_lifecycle_end_to_end() {
    let up = Upstream::start().await;
    let kg = gateway(&up).await;

    // create: a readable block, the secret once, the warning on stderr.
    let created = keys(
        &kg,
        &[
            "create",
            "--name",
            "cli-e2e",
            "--scope",
            "orders:read",
            "--access",
            "full",
            "--rate-limit",
            "50/100",
            "--metadata",
            "team=billing",
            "--expires-in",
            "30d",
        ],
    )
    .await;
    let secret = secret_of(&created);
    let id = created.field("id");
    assert!(id.starts_with("key_"), "{}", created.explain());
    assert_eq!(created.field("name"), "cli-e2e");
    assert_eq!(created.field("scopes"), "orders:read");
    assert_eq!(created.field("access"), "full");
    assert_eq!(created.field("rate limit"), "50/s, burst 100");
    assert_eq!(created.field("status"), "active");
    assert_eq!(created.field("metadata"), r#"{"team":"billing"}"#);
    call(&kg, &secret).await.assert_status(200);

    // list --json: the API's page, holding the key; never the secret.
    let listed = keys(&kg, &["list", "--json"]).await;
    listed.ok();
    let page = listed.json();
    let items = page["items"].as_array().expect("items");
    assert!(
        items.iter().any(|k| k["id"] == id.as_str()),
        "{}",
        listed.explain()
    );
    assert!(page.get("next_cursor").is_some(), "{}", listed.explain());
    assert!(!listed.stdout.contains(&secret), "{}", listed.explain());

    // list: a table with the header and a row for the key.
    let table = keys(&kg, &["list", "--owner", "ops"]).await;
    table.ok();
    let header = table.stdout.lines().next().unwrap_or_default();
    for col in [
        "ID",
        "NAME",
        "OWNER",
        "HINT",
        "SCOPES",
        "ACCESS",
        "STATUS",
        "EXPIRES",
        "LAST USED",
    ] {
        assert!(header.contains(col), "{col}\n{}", table.explain());
    }
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}\n{}", table.explain()));
    for cell in ["cli-e2e", "ops", "orders:read", "full", "active"] {
        assert!(row.contains(cell), "{cell}\n{}", table.explain());
    }

    // show, human and JSON.
    let shown = keys(&kg, &["show", &id]).await;
    shown.ok();
    assert_eq!(shown.field("id"), id);
    assert_eq!(shown.field("last used"), "never");
    let shown = keys(&kg, &["show", &id, "--json"]).await;
    shown.ok();
    let doc = shown.json();
    assert_eq!(doc["id"], id.as_str());
    assert_eq!(doc["metadata"], json!({"team": "billing"}));

    // update: only the fields given change.
    let updated = keys(
        &kg,
        &[
            "update",
            &id,
            "--name",
            "cli-renamed",
            "--scopes",
            "orders:read,billing",
            "--no-rate-limit",
            "--json",
        ],
    )
    .await;
    updated.ok();
    let doc = updated.json();
    assert_eq!(doc["name"], "cli-renamed", "{}", updated.explain());
    assert_eq!(doc["scopes"], json!(["orders:read", "billing"]));
    assert_eq!(doc["rate_limit"], Value::Null);
    assert_eq!(doc["metadata"], json!({"team": "billing"}));

    // suspend / reinstate, as the proxy sees them.
    let suspended = keys(&kg, &["suspend", &id]).await;
    suspended.ok();
    assert_eq!(suspended.field("status"), "suspended");
    assert!(suspended.field("suspended").ends_with(" by ops"));
    call(&kg, &secret)
        .await
        .assert_problem(401, "key_suspended");
    let reinstated = keys(&kg, &["reinstate", &id]).await;
    reinstated.ok();
    assert_eq!(reinstated.field("status"), "active");
    call(&kg, &secret).await.assert_status(200);

    // rotate with no grace: the new secret works, the old one is refused.
    let rotated = keys(&kg, &["rotate", &id, "--grace", "0s"]).await;
    let new_secret = secret_of(&rotated);
    assert_ne!(new_secret, secret);
    assert_eq!(rotated.field("id"), id);
    call(&kg, &new_secret).await.assert_status(200);
    call(&kg, &secret).await.assert_problem(401, "key_revoked");

    // revoke: the key is refused through the proxy.
    let revoked = keys(&kg, &["revoke", &id, "--reason", "cli test"]).await;
    revoked.ok();
    assert_eq!(revoked.field("status"), "revoked");
    assert!(
        revoked.field("revoked").ends_with("by ops: cli test"),
        "{}",
        revoked.explain()
    );
    call(&kg, &new_secret)
        .await
        .assert_problem(401, "key_revoked");

    // An API error is one sentence with the code and status, exit 1.
    keys(&kg, &["revoke", &id])
        .await
        .fails(1, "(already_revoked, HTTP 409)");
    keys(&kg, &["suspend", &id])
        .await
        .fails(1, "(key_revoked, HTTP 409)");

    // delete, then the key is unknown.
    let deleted = keys(&kg, &["delete", &id]).await;
    deleted.ok();
    assert_eq!(deleted.stdout, format!("deleted {id}\n"));
    keys(&kg, &["show", &id])
        .await
        .fails(1, "(key_not_found, HTTP 404)");
    call(&kg, &new_secret)
        .await
        .assert_problem(401, "invalid_key");

    // The server never logged the admin token or a secret either.
    let logs = kg.output();
    for s in [kg.admin_token(), secret.as_str(), new_secret.as_str()] {
        assert!(!logs.contains(s), "a secret in the server output\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_the_api_answer() {
    let up = Upstream::start().await;
    let kg = gateway(&up).await;

    let created = keys(
        &kg,
        &[
            "--json",
            "create",
            "--name",
            "json",
            "--scopes",
            "a,b",
            "--access",
            "read_only",
            "--metadata-json",
            r#"{"n": 1}"#,
        ],
    )
    .await;
    assert_eq!(created.code, Some(0), "{}", created.explain());
    assert_eq!(
        created.stderr,
        format!("{WARNING}\n"),
        "{}",
        created.explain()
    );
    let doc = created.json();
    let secret = doc["secret"].as_str().expect("secret").to_owned();
    let id = doc["key"]["id"].as_str().expect("key.id").to_owned();
    assert_eq!(doc["key"]["access"], "read_only");
    assert_eq!(doc["key"]["scopes"], json!(["a", "b"]));
    assert_eq!(doc["key"]["metadata"], json!({"n": 1}));
    assert_eq!(created.stdout.matches(&secret).count(), 1);
    call(&kg, &secret).await.assert_status(200);

    let rotated = keys(&kg, &["rotate", &id, "--json"]).await;
    assert_eq!(rotated.code, Some(0), "{}", rotated.explain());
    assert_eq!(rotated.stderr, format!("{WARNING}\n"));
    let new_secret = rotated.json()["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    call(&kg, &new_secret).await.assert_status(200);

    let deleted = keys(&kg, &["delete", &id, "--json"]).await;
    deleted.ok();
    assert_eq!(deleted.json(), json!({"id": id, "deleted": true}));

    // An error answer with --json is still one sentence on stderr.
    keys(&kg, &["show", &id, "--json"])
        .await
        .fails(1, "(key_not_found, HTTP 404)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_follows_cursors() {
    let up = Upstream::start().await;
    let kg = gateway(&up).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (id, _) = kg
            .create_key(json!({"name": format!("page-{i}"), "scopes": [], "access": "full"}))
            .await;
        ids.push(id);
    }

    // One page of one: the cursor hint.
    let first = keys(&kg, &["list", "--limit", "1"]).await;
    first.ok();
    assert_eq!(
        first
            .stdout
            .lines()
            .filter(|l| l.starts_with("key_"))
            .count(),
        1
    );
    let hint = first
        .stdout
        .lines()
        .find(|l| l.contains("--cursor"))
        .unwrap_or_else(|| panic!("no cursor hint\n{}", first.explain()));
    let cursor = hint
        .split("--cursor ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a cursor in the hint");
    let second = keys(&kg, &["list", "--limit", "1", "--cursor", cursor, "--json"]).await;
    second.ok();
    let page = second.json();
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(1),
        "{}",
        second.explain()
    );
    assert_ne!(
        page["items"][0]["id"].as_str(),
        first
            .stdout
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
    );

    // --all: every page, as one table and as one JSON document.
    let all = keys(&kg, &["list", "--limit", "1", "--all"]).await;
    all.ok();
    let rows: Vec<&str> = all
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("key_"))
        .collect();
    assert_eq!(rows, ids, "{}", all.explain());
    assert!(!all.stdout.contains("--cursor"), "{}", all.explain());
    let all = keys(&kg, &["list", "--limit", "2", "--all", "--json"]).await;
    all.ok();
    let doc = all.json();
    let got: Vec<&str> = doc["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(got, ids, "{}", all.explain());
    assert_eq!(doc["next_cursor"], Value::Null);

    // Filters reach the API.
    let none = keys(&kg, &["list", "--status", "revoked"]).await;
    none.ok();
    assert_eq!(none.stdout, "No keys.\n");
    let one = keys(&kg, &["list", "--q", "page-1", "--json"]).await;
    one.ok();
    assert_eq!(one.json()["items"][0]["id"], ids[1].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_connection_errors_are_one_sentence() {
    let up = Upstream::start().await;
    let kg = gateway(&up).await;
    let url = format!("http://{}", kg.admin);

    // No token at all: a usage error, before anything is sent.
    run_cli(&[("KEYGATE_ADMIN_URL", &url)], &["list"])
        .await
        .fails(2, "no admin token: pass --token or set KEYGATE_ADMIN_TOKEN");

    // A wrong token, in the environment or as an option: the API refuses it.
    let wrong = keygate::keys::Token::generate("kgadm_").expose().to_owned();
    for run in [
        run_cli(
            &[("KEYGATE_ADMIN_URL", &url), ("KEYGATE_ADMIN_TOKEN", &wrong)],
            &["list"],
        )
        .await,
        run_cli(
            &[],
            &[
                "--admin-url",
                &url,
                "--token",
                &wrong,
                "show",
                "key_01ARZ3NDEKTSV4RRFFQ69G5FAV",
            ],
        )
        .await,
    ] {
        run.fails(1, "(invalid_admin_token, HTTP 401)");
        assert_no_token(&run, &wrong);
        assert_no_token(&run, kg.admin_token());
    }

    // An API key is not an admin token.
    let (_, secret) = kg
        .create_key(json!({"name": "not-admin", "scopes": [], "access": "full"}))
        .await;
    let run = run_cli(
        &[
            ("KEYGATE_ADMIN_URL", &url),
            ("KEYGATE_ADMIN_TOKEN", &secret),
        ],
        &["list"],
    )
    .await;
    run.fails(1, "(invalid_admin_token, HTTP 401)");
    assert_no_token(&run, &secret);

    // Nothing listening: a sentence naming the admin URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let closed_url = format!("http://{closed}");
    let run = run_cli(
        &[("KEYGATE_ADMIN_TOKEN", kg.admin_token())],
        &["--admin-url", &closed_url, "list"],
    )
    .await;
    run.fails(
        1,
        &format!("cannot connect to the admin API at {closed_url}"),
    );
    assert_no_token(&run, kg.admin_token());

    // Usage errors are exit 2 with one line, and send nothing.
    let run = keys(&kg, &["update", "key_01ARZ3NDEKTSV4RRFFQ69G5FAV"]).await;
    run.fails(2, "nothing to update");
    let run = keys(&kg, &["show", "not-a-key"]).await;
    run.fails(2, "is not a key id");
    let run = keys(
        &kg,
        &[
            "create",
            "--name",
            "x",
            "--access",
            "full",
            "--rate-limit",
            "fast",
        ],
    )
    .await;
    run.fails(2, "--rate-limit must be PER_SECOND/BURST");
    let run = keys(&kg, &["--admin-url", "ftp://x", "list"]).await;
    run.fails(2, "--admin-url must be an http:// or https:// URL");

    // An argument error from clap is exit 2 too.
    let run = keys(&kg, &["create", "--name", "x"]).await;
    assert_eq!(run.code, Some(2), "{}", run.explain());
    assert!(run.stderr.contains("--access"), "{}", run.explain());
}
