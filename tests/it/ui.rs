//! The web console at `/ui/` (issue 8).
//!
//! [`console_assets_are_served_strictly`] checks over plain HTTP what the
//! server promises for every console response: the CSP, content types,
//! `nosniff`, revalidation, and 404 problem+json outside the embedded set.
//!
//! [`console_in_a_real_browser`] drives Debian's `chromium` headless through
//! `chromedriver` (WebDriver, via fantoccini) against a real keygate with a
//! keyed route to a real upstream: sign in, create a key and read its secret
//! from the page, call the proxy with it, revoke it in the page, bulk-suspend,
//! flip the kill switch, check that a hostile key name stays text, check the
//! layout at desktop and phone widths, and check what each role is offered.
//! Screenshots go to `target/ui-screenshots/`. Without chromium and
//! chromedriver the test fails and says how to install them (`.ci/run` does).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::common::client::{self, Req};
use crate::common::keygate::Keygate;
use crate::common::upstream::Upstream;

/// Longest wait for one browser step (an element to appear, a page to settle).
const STEP: Duration = Duration::from_secs(15);
/// Longest the whole browser test may take before it is failed.
const WHOLE_TEST: Duration = Duration::from_secs(240);
const XSS_NAME: &str = "<img src=x onerror=alert(1)>";
const AUDITOR_TOKEN: &str = "auditor-token-for-the-console-test";
const DEV_TOKEN: &str = "dev-token-for-the-console-test";

fn gateway(up: &Upstream) -> crate::common::keygate::KeygateBuilder {
    Keygate::builder()
        .route(&format!(
            "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}', scopes: [orders]}}",
            up.url()
        ))
        .section(
            "rate_limit:\n  default: {per_second: 100000, burst: 100000}\n  failed_auth_per_ip: {per_minute: 100000}",
        )
}

fn with_key(secret: &str) -> Req {
    Req::get("/api/orders").header("authorization", &format!("Bearer {secret}"))
}

// ---------------------------------------------------------------- plain HTTP

#[tokio::test]
async fn console_assets_are_served_strictly() {
    let kg = Keygate::builder().start().await;
    let get = |path: &str| client::h1(kg.admin, Req::get(path));

    let resp = get("/ui").await;
    resp.assert_status(308).assert_header("location", "/ui/");

    let page = get("/ui/").await;
    page.assert_status(200)
        .assert_header("content-type", "text/html; charset=utf-8")
        .assert_header(
            "content-security-policy",
            keygate::admin::ui::CONTENT_SECURITY_POLICY,
        )
        .assert_header("x-content-type-options", "nosniff")
        .assert_header("cache-control", "no-cache");
    let csp = page.header("content-security-policy").unwrap_or("");
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "CSP lacks {part}\n{page}");
    }
    assert!(!csp.contains("unsafe"), "CSP allows unsafe code\n{page}");
    let body = String::from_utf8_lossy(&page.body);
    assert!(
        body.contains(r#"<script type="module" src="app.js"></script>"#),
        "{page}"
    );

    // Unchanged assets revalidate to 304.
    let etag = page
        .header("etag")
        .unwrap_or_else(|| panic!("no ETag\n{page}"));
    let again = client::h1(kg.admin, Req::get("/ui/").header("if-none-match", etag)).await;
    again.assert_status(304);
    assert!(again.body.is_empty(), "{again}");

    for asset in keygate::admin::ui::ASSETS {
        let resp = get(&format!("/ui/{}", asset.name)).await;
        resp.assert_status(200)
            .assert_header("content-type", asset.content_type)
            .assert_header("x-content-type-options", "nosniff")
            .assert_header(
                "content-security-policy",
                keygate::admin::ui::CONTENT_SECURITY_POLICY,
            );
        assert_eq!(&resp.body[..], asset.body, "{}", asset.name);
    }

    for path in [
        "/ui/nope.js",
        "/ui/../Cargo.toml",
        "/ui/%2e%2e/Cargo.toml",
        "/ui/app.js/x",
        "/ui/APP.JS",
        "/ui/src/main.rs",
    ] {
        let resp = get(path).await;
        let problem = resp.assert_problem(404, "not_found");
        assert!(
            !String::from_utf8_lossy(&resp.body).contains("import "),
            "{path} served a file\n{resp}"
        );
        assert_eq!(problem["status"], 404);
    }

    let post = client::h1(kg.admin, Req::post("/ui/", "x")).await;
    post.assert_problem(405, "method_not_allowed");
}

// ---------------------------------------------------------------- browser

#[tokio::test]
async fn console_in_a_real_browser() {
    let (chromium, chromedriver) = browser_binaries();
    let up = Upstream::start().await;
    let kg = gateway(&up)
        .admin_token("audit", "auditor", AUDITOR_TOKEN)
        .admin_token("dev", "developer", DEV_TOKEN)
        .start()
        .await;
    let driver = ChromeDriver::start(&chromedriver);
    let shots = screenshot_dir();

    let outcome = tokio::time::timeout(WHOLE_TEST, async {
        let browser = Browser::open(&driver, &chromium, shots.clone()).await;
        let result = drive(&browser, &kg).await;
        browser.close().await;
        result
    })
    .await;
    match outcome {
        Ok(()) => {}
        Err(_) => panic!(
            "the browser test did not finish within {WHOLE_TEST:?}\n--- chromedriver log:\n{}",
            driver.log()
        ),
    }
}

/// Every step of the browser test, in order.
async fn drive(b: &Browser, kg: &Keygate) {
    let base = format!("http://{}", kg.admin);
    // Keys made through the API first: a hostile name, two to bulk-suspend,
    // one to probe the kill switch with, one owned by the developer.
    let (xss_id, _) = kg
        .create_key(json!({"name": XSS_NAME, "access": "read_only", "owner": "mallory"}))
        .await;
    let (bulk_a, _) = kg
        .create_key(json!({"name": "bulk-a", "access": "full", "scopes": ["orders"]}))
        .await;
    let (bulk_b, _) = kg
        .create_key(json!({"name": "bulk-b", "access": "full", "scopes": ["orders"]}))
        .await;
    let (_, probe) = kg
        .create_key(json!({"name": "probe", "access": "read_only", "scopes": ["orders"]}))
        .await;
    kg.create_key(json!({"name": "dev-key", "access": "full", "owner": "dev"}))
        .await;
    kg.send(with_key(&probe)).await.assert_status(200);

    // /ui redirects to the sign-in page, which loads without a token.
    b.goto(&format!("{base}/ui")).await;
    let url = b.js("return location.pathname", "read the path").await;
    assert_eq!(url, "/ui/", "/ui must redirect to /ui/");
    b.find("#token").await;
    b.shot("sign-in").await;

    // A wrong token is refused with the problem's words.
    b.fill("#token", "not-a-real-token").await;
    b.click("#sign-in button[type=submit]").await;
    b.wait_js(
        "the sign-in error",
        "const e = document.getElementById('sign-in-error'); \
         return !e.hidden && e.textContent.includes('invalid_admin_token');",
    )
    .await;
    assert_eq!(b.js("return sessionStorage.length", "").await, json!(0));

    sign_in(b, kg.admin_token()).await;
    assert_eq!(
        b.js("return sessionStorage.getItem('keygate.admin_token')", "")
            .await,
        json!(kg.admin_token()),
        "the token is kept in sessionStorage"
    );
    assert_eq!(b.text("#who-role").await, "admin");
    b.shot("keys-admin").await;

    // A hostile key name is shown as text: no <img>, no alert.
    let names = b
        .js(
            "return [...document.querySelectorAll('#keys-table td.name a')].map(a => a.textContent)",
            "read the key names",
        )
        .await;
    assert!(
        names
            .as_array()
            .is_some_and(|n| n.contains(&json!(XSS_NAME))),
        "the hostile name is not shown as text: {names}"
    );
    assert_no_markup_injected(b).await;

    // Create a key; a server-side refusal is shown as a readable message.
    b.click("#new-key").await;
    b.fill("#dialog input[name=name]", "ui-made").await;
    b.fill("#dialog input[name=scopes]", "orders").await;
    b.find("#dialog select[name=access]")
        .await
        .select_by_value("full")
        .await
        .expect("choose full access");
    b.fill("#dialog textarea[name=metadata]", r#"{"team": "web"}"#)
        .await;
    b.fill("#dialog input[name=expires_in]", "5000d").await;
    b.click("#dialog-confirm").await;
    b.wait_js(
        "the expiry refusal in the dialog",
        "const e = document.querySelector('#dialog .dialog-error'); \
         return e && !e.hidden && e.textContent.includes('expiry_too_long');",
    )
    .await;
    b.shot("create-refused").await;
    b.fill("#dialog input[name=expires_in]", "30d").await;
    b.click("#dialog-confirm").await;
    let secret = b.text("#secret").await;
    assert!(
        secret.starts_with("kg_") && secret.len() == 41,
        "the page shows no secret: {secret:?}"
    );
    let warning = b.text("#dialog .warning").await;
    assert!(warning.contains("will not be shown again"), "{warning}");
    b.click("#copy-secret").await;
    b.wait_js(
        "the copy button's answer",
        "return document.querySelector('#dialog .copy-status').textContent !== ''",
    )
    .await;
    b.shot("create-secret").await;
    b.click("#secret-done").await;
    b.wait_js(
        "the dialog to close",
        "return !document.getElementById('dialog').open",
    )
    .await;

    // The secret read from the page works at the proxy.
    let echo = kg.send(with_key(&secret)).await.echo();
    echo.assert_header("x-keygate-key-name", "ui-made");

    // Search narrows the list; sorting orders the shown page both ways.
    b.fill("#search", "bulk").await;
    b.wait_js(
        "the search to narrow the list",
        "return document.querySelectorAll('#keys-table tbody tr').length === 2",
    )
    .await;
    // Erased key by key, as a person would (a WebDriver clear fires no input).
    let erase = fantoccini::key::Key::Backspace.to_string().repeat(4);
    let search = b.find("#search").await;
    step("erase the search", search.send_keys(&erase))
        .await
        .expect("erase the search");
    b.wait_js(
        "the search to be cleared",
        "return document.querySelectorAll('#keys-table tbody tr').length === 6",
    )
    .await;
    let names_js =
        "return [...document.querySelectorAll('#keys-table td.name a')].map(a => a.textContent)";
    let mut sorted: Vec<String> = [
        "<img src=x onerror=alert(1)>",
        "bulk-a",
        "bulk-b",
        "dev-key",
        "probe",
        "ui-made",
    ]
    .map(String::from)
    .to_vec();
    b.click("button.sort[data-sort='name']").await;
    assert_eq!(b.js(names_js, "sorted names").await, json!(sorted));
    b.click("button.sort[data-sort='name']").await;
    sorted.reverse();
    assert_eq!(b.js(names_js, "sorted names").await, json!(sorted));

    // Open it, edit it, rotate it with a grace period.
    let id = b
        .js(
            "const a = [...document.querySelectorAll('#keys-table td.name a')] \
                 .find(a => a.textContent === 'ui-made'); \
             return a ? a.closest('tr').dataset.id : null;",
            "find the new key's row",
        )
        .await;
    let id = id
        .as_str()
        .unwrap_or_else(|| panic!("no row for ui-made"))
        .to_owned();
    b.click(&format!("tr[data-id='{id}'] td.name a")).await;
    b.wait_text("#key-status", "active").await;
    b.find("#usage svg").await;
    b.find("#key-events table").await;
    b.click("#action-edit").await;
    b.fill(
        "#dialog textarea[name=description]",
        "edited in the browser",
    )
    .await;
    b.fill("#dialog input[name=per_second]", "5").await;
    b.fill("#dialog input[name=burst]", "10").await;
    b.click("#dialog-confirm").await;
    b.wait_js(
        "the edited fields",
        "return document.querySelector('dl.fields').textContent.includes('5/s, burst 10')",
    )
    .await;
    let key = kg.admin(Req::get(&format!("/v1/keys/{id}"))).await.json();
    assert_eq!(key["description"], "edited in the browser", "{key}");
    assert_eq!(key["rate_limit"], json!({"per_second": 5, "burst": 10}));
    assert_eq!(key["metadata"], json!({"team": "web"}), "metadata kept");

    b.click("#action-rotate").await;
    b.find("#rotate-grace")
        .await
        .select_by_value("1h")
        .await
        .expect("choose a grace of 1h");
    b.click("#dialog-confirm").await;
    let rotated = b.text("#secret").await;
    assert!(
        rotated.starts_with("kg_") && rotated != secret,
        "{rotated:?}"
    );
    b.click("#secret-done").await;
    kg.send(with_key(&rotated)).await.assert_status(200);
    kg.send(with_key(&secret)).await.assert_status(200);
    let old_secret = secret;
    let secret = rotated;

    // Revoke it, with a reason, through the confirm dialog.
    b.click("#action-revoke").await;
    b.fill("#revoke-reason", "leaked in a test").await;
    b.shot("revoke-confirm").await;
    b.click("#dialog-confirm").await;
    b.wait_text("#key-status", "revoked").await;
    let page = b.text("main").await;
    assert!(page.contains("leaked in a test"), "{page}");
    assert!(
        b.absent("#action-revoke").await && b.absent("#action-suspend").await,
        "a revoked key still offers revoke or suspend"
    );
    for s in [&secret, &old_secret] {
        kg.send(with_key(s))
            .await
            .assert_problem(401, "key_revoked");
    }

    // Bulk-suspend two keys from the list.
    b.goto_hash("#/keys", "#keys-table").await;
    for id in [&bulk_a, &bulk_b] {
        b.click(&format!("input.select[data-id='{id}']")).await;
    }
    b.wait_text("#selected-count", "2 selected").await;
    b.click("#bulk-suspend").await;
    for id in [&bulk_a, &bulk_b] {
        b.wait_text(&format!("tr[data-id='{id}'] .badge"), "suspended")
            .await;
        let key = kg.admin(Req::get(&format!("/v1/keys/{id}"))).await;
        assert_eq!(key.json()["status"], "suspended", "{key}");
    }
    b.shot("bulk-suspended").await;

    // The kill switch, off and back on, with a confirm dialog each way.
    b.goto_hash("#/settings", "#kill-switch").await;
    assert_eq!(b.text("#api-keys-state").await, "on");
    b.click("#kill-switch").await;
    b.find("#dialog-confirm").await;
    b.shot("kill-switch-confirm").await;
    b.click("#dialog-confirm").await;
    b.wait_text("#api-keys-state", "off").await;
    proxy_answers(kg, &probe, 403, Some("api_keys_disabled")).await;
    b.shot("kill-switch-off").await;
    b.click("#kill-switch").await;
    b.click("#dialog-confirm").await;
    b.wait_text("#api-keys-state", "on").await;
    proxy_answers(kg, &probe, 200, None).await;

    // The events page shows what was done.
    b.goto_hash("#/events", "table.events").await;
    for kind in ["key.revoked", "key.suspended", "settings.updated"] {
        b.find(&format!("table.events tr[data-type='{kind}']"))
            .await;
    }

    // The hostile name on its own page is text too.
    b.goto_hash(&format!("#/keys/{xss_id}"), "#key-status")
        .await;
    assert_eq!(b.text_content("#key-name").await, XSS_NAME);
    assert_no_markup_injected(b).await;

    // The usage chart shows the allowed calls once usage is flushed (every 5 s).
    wait_for_usage(b, &id).await;
    b.shot_of("#usage", "usage-chart").await;
    b.shot_of("#key-events", "key-events").await;

    // No horizontal scrolling of the page at desktop and phone sizes.
    let pages = [
        ("keys", "#/keys".to_owned(), "#keys-table"),
        ("key", format!("#/keys/{id}"), "#usage svg"),
        ("events", "#/events".to_owned(), "table.events"),
        ("settings", "#/settings".to_owned(), "#kill-switch"),
    ];
    for (label, width, height) in [("desktop", 1280, 800), ("phone", 390, 844)] {
        b.viewport(width, height).await;
        for (name, hash, ready) in &pages {
            b.goto_hash(hash, ready).await;
            b.assert_no_page_scroll(&format!("{label} {name}")).await;
            b.shot(&format!("{label}-{name}")).await;
        }
        b.goto_hash("#/keys", "#keys-table").await;
        b.click("#new-key").await;
        b.find("#dialog input[name=name]").await;
        b.assert_no_page_scroll(&format!("{label} create dialog"))
            .await;
        b.shot(&format!("{label}-create-dialog")).await;
        b.click("#dialog-cancel").await;
        b.wait_js(
            "the dialog to close",
            "return !document.getElementById('dialog').open",
        )
        .await;
    }
    b.viewport(1280, 800).await;

    // "Delete all revoked" removes the revoked key, after a confirmation.
    b.goto_hash("#/keys", "#keys-table").await;
    b.click("#delete-revoked").await;
    b.click("#dialog-confirm").await;
    b.wait_js(
        "the revoked key to leave the list",
        &format!("return document.querySelector(\"tr[data-id='{id}']\") === null"),
    )
    .await;
    kg.admin(Req::get(&format!("/v1/keys/{id}")))
        .await
        .assert_problem(404, "key_not_found");

    // Sign out clears the token.
    b.click("#sign-out").await;
    b.find("#token").await;
    assert_eq!(b.js("return sessionStorage.length", "").await, json!(0));

    // An auditor is offered no write action.
    sign_in(b, AUDITOR_TOKEN).await;
    assert_eq!(b.text("#who-role").await, "auditor");
    for absent in ["#new-key", "input.select", "#bulk-bar", "#delete-revoked"] {
        assert!(b.absent(absent).await, "an auditor sees {absent}");
    }
    b.goto_hash(&format!("#/keys/{bulk_a}"), "#key-status")
        .await;
    for absent in ["#action-suspend", "#action-reinstate", "#action-delete"] {
        assert!(b.absent(absent).await, "an auditor sees {absent}");
    }
    b.goto_hash("#/settings", "#api-keys-state").await;
    assert!(b.absent("#kill-switch").await, "an auditor sees the switch");
    b.shot("auditor-settings").await;
    b.click("#sign-out").await;

    // A developer sees only its own keys, and no kill switch.
    sign_in(b, DEV_TOKEN).await;
    assert_eq!(b.text("#who-role").await, "developer");
    let names = b
        .js(
            "return [...document.querySelectorAll('#keys-table td.name a')].map(a => a.textContent)",
            "read the key names",
        )
        .await;
    assert_eq!(names, json!(["dev-key"]), "a developer sees only its keys");
    b.find("#new-key").await;
    b.shot("keys-developer").await;
    b.goto_hash("#/settings", "#api-keys-state").await;
    assert!(
        b.absent("#kill-switch").await,
        "a developer sees the switch"
    );
}

async fn sign_in(b: &Browser, token: &str) {
    b.fill("#token", token).await;
    b.click("#sign-in button[type=submit]").await;
    b.find("#keys-table").await;
}

/// No element was made from a key name: no <img>, no open alert.
async fn assert_no_markup_injected(b: &Browser) {
    let imgs = b
        .js("return document.querySelectorAll('img').length", "")
        .await;
    assert_eq!(imgs, json!(0), "a key name was parsed as HTML");
    if let Ok(text) = b.c.get_alert_text().await {
        panic!("a key name opened an alert: {text:?}");
    }
}

/// Polls the proxy (the switch reaches the data plane through the store's
/// invalidations) until it answers `status` and `code`.
async fn proxy_answers(kg: &Keygate, secret: &str, status: u16, code: Option<&str>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = kg.send(with_key(secret)).await;
        if resp.status.as_u16() == status {
            if let Some(code) = code {
                resp.assert_problem(status, code);
            }
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("the proxy did not answer {status} within 5 s\n{resp}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reopens the key's page until its chart counts the three allowed calls
/// (the first secret once, then both secrets during the rotation's grace).
async fn wait_for_usage(b: &Browser, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        b.goto_hash(&format!("#/keys/{id}"), "#usage svg").await;
        let usage = b.text("#usage").await;
        let bars = b
            .js(
                "return document.querySelectorAll('#usage rect.bar-allowed').length",
                "",
            )
            .await;
        // Three calls in a few seconds: one hour, or two across an hour's end.
        if usage.contains("Allowed: 3") && (bars == json!(1) || bars == json!(2)) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("the usage chart never showed the 3 allowed calls: {usage:?}, {bars} bars");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------- harness

/// `/usr/bin/chromium` and `/usr/bin/chromedriver` (or the ones on PATH).
fn browser_binaries() -> (PathBuf, PathBuf) {
    let find = |name: &str| {
        let usr = Path::new("/usr/bin").join(name);
        if usr.is_file() {
            return Some(usr);
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    match (find("chromium"), find("chromedriver")) {
        (Some(c), Some(d)) => (c, d),
        (c, d) => panic!(
            "the console test needs Debian's chromium and chromedriver \
             (found chromium: {c:?}, chromedriver: {d:?}); install them with \
             `apt-get install -y chromium chromium-driver` (.ci/run does this)"
        ),
    }
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A `chromedriver` on a free 127.0.0.1 port, in its own process group so
/// that dropping it kills it and every browser it started.
struct ChromeDriver {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChromeDriver {
    fn start(bin: &Path) -> ChromeDriver {
        use std::os::unix::process::CommandExt as _;
        let dir = tempfile::tempdir().expect("temp dir for chromedriver");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.path().join("chromedriver.log");
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let driver = ChromeDriver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + STEP;
        while std::net::TcpStream::connect_timeout(&driver.addr, Duration::from_millis(200))
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "chromedriver did not listen on {} within {STEP:?}\n{}",
                driver.addr,
                driver.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn profile_dir(&self) -> PathBuf {
        self._dir.path().join("profile")
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(8000);
        text.get(start..).unwrap_or(&text).to_owned()
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("=== chromedriver log (tail) ===\n{}", self.log());
        }
        // The group holds chromedriver and the browsers it started.
        let group = format!("-{}", self.child.id());
        match Command::new("kill").args(["-KILL", "--", &group]).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("chromedriver: kill {group} failed: {other:?}"),
        }
        if let Err(e) = self.child.wait() {
            eprintln!("chromedriver: wait failed: {e}");
        }
    }
}

/// A headless chromium session with small, bounded helpers.
struct Browser {
    c: Client,
    shots: PathBuf,
}

impl Browser {
    async fn open(driver: &ChromeDriver, chromium: &Path, shots: PathBuf) -> Browser {
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--window-size=1280,800",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-default-apps",
                    "--metrics-recording-only",
                    "--force-color-profile=srgb",
                    format!("--user-data-dir={}", driver.profile_dir().display()),
                ],
            },
            "timeouts": {"pageLoad": 20000, "script": 10000, "implicit": 0},
            "unhandledPromptBehavior": "ignore",
        });
        let Value::Object(caps) = caps else {
            unreachable!("a JSON object")
        };
        let connect = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url())
            .await;
        let c = match connect {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start a chromium session through chromedriver: {e}\n{}",
                driver.log()
            ),
        };
        let b = Browser { c, shots };
        b.viewport(1280, 800).await;
        b
    }

    async fn close(self) {
        if let Err(e) = step("close the browser", self.c.close()).await {
            eprintln!("closing the browser session failed: {e}");
        }
    }

    async fn goto(&self, url: &str) {
        step(url, self.c.goto(url))
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Switches the console to `hash` and waits for `ready` to appear.
    async fn goto_hash(&self, hash: &str, ready: &str) {
        // Setting the hash it already has fires no hashchange: fire one.
        let script = format!(
            "const same = location.hash === {0}; \
             document.getElementById('main').replaceChildren(); \
             location.hash = {0}; \
             if (same) window.dispatchEvent(new HashChangeEvent('hashchange'));",
            json!(hash)
        );
        self.js(&script, hash).await;
        self.find(ready).await;
    }

    async fn find(&self, css: &str) -> Element {
        let found = self
            .c
            .wait()
            .at_most(STEP)
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(el) => el,
            Err(e) => panic!(
                "{css} did not appear within {STEP:?}: {e}\n{}",
                self.main_text().await
            ),
        }
    }

    async fn absent(&self, css: &str) -> bool {
        let n = self
            .js(
                &format!("return document.querySelectorAll({}).length", json!(css)),
                css,
            )
            .await;
        n == json!(0)
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        step(css, el.click())
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn fill(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        step(css, el.clear())
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        step(css, el.send_keys(text))
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// The rendered text of the first element matching `css`.
    async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        step(css, el.text())
            .await
            .unwrap_or_else(|e| panic!("read {css}: {e}"))
    }

    async fn text_content(&self, css: &str) -> String {
        let v = self
            .js(
                &format!("return document.querySelector({}).textContent", json!(css)),
                css,
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    async fn wait_text(&self, css: &str, want: &str) {
        let script = format!(
            "const e = document.querySelector({}); return e !== null && e.textContent.trim() === {};",
            json!(css),
            json!(want)
        );
        self.wait_js(&format!("{css} to read {want:?}"), &script)
            .await;
    }

    async fn js(&self, script: &str, what: &str) -> Value {
        step(what, self.c.execute(script, Vec::new()))
            .await
            .unwrap_or_else(|e| panic!("run script ({what}): {e}\n{script}"))
    }

    /// Polls `script` until it returns true.
    async fn wait_js(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if self.js(script, what).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "waited {STEP:?} for {what}\n--- page text:\n{}",
                    self.main_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn main_text(&self) -> String {
        let script = "return document.body.innerText";
        match step("read the page", self.c.execute(script, Vec::new())).await {
            Ok(Value::String(s)) => s,
            other => format!("{other:?}"),
        }
    }

    /// Sizes the window so the page's viewport is `width` x `height`.
    async fn viewport(&self, width: u32, height: u32) {
        let (mut w, mut h) = (width, height);
        for _ in 0..3 {
            step("resize", self.c.set_window_size(w, h))
                .await
                .unwrap_or_else(|e| panic!("resize to {w}x{h}: {e}"));
            let inner = self
                .js("return [window.innerWidth, window.innerHeight]", "")
                .await;
            let (iw, ih) = (
                inner[0].as_u64().unwrap_or(0),
                inner[1].as_u64().unwrap_or(0),
            );
            if (iw, ih) == (u64::from(width), u64::from(height)) {
                return;
            }
            w = (i64::from(w) + i64::from(width) - iw as i64).max(1) as u32;
            h = (i64::from(h) + i64::from(height) - ih as i64).max(1) as u32;
        }
        panic!("could not size the viewport to {width}x{height}");
    }

    async fn assert_no_page_scroll(&self, what: &str) {
        let v = self
            .js(
                "return [document.documentElement.scrollWidth, window.innerWidth]",
                what,
            )
            .await;
        let (scroll, inner) = (v[0].as_u64().unwrap_or(0), v[1].as_u64().unwrap_or(0));
        assert!(
            scroll <= inner,
            "{what}: the page scrolls sideways (scrollWidth {scroll} > innerWidth {inner})"
        );
    }

    /// A screenshot of just the element `css`.
    async fn shot_of(&self, css: &str, name: &str) {
        let el = self.find(css).await;
        self.js(
            &format!("document.querySelector({}).scrollIntoView()", json!(css)),
            css,
        )
        .await;
        let png = step("screenshot", el.screenshot())
            .await
            .unwrap_or_else(|e| panic!("screenshot {css}: {e}"));
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    async fn shot(&self, name: &str) {
        let png = step("screenshot", self.c.screenshot())
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Runs one WebDriver command with the [`STEP`] deadline.
async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("the browser did not answer within {STEP:?}: {what}"),
    }
}
