//! The web console (DESIGN.md section 5, `GET /ui/`): a small framework-free
//! HTML, CSS and JavaScript client of the `/v1` admin API, embedded in the
//! binary so it works offline and cannot drift from the server it ships with.
//!
//! The assets live in `ui/` at the crate root and are compiled in with
//! `include_bytes!`; only the names in [`ASSETS`] are served, so no path can
//! reach anything else (an unknown name is a 404 problem). Every answer carries
//! a strict Content-Security-Policy (scripts, styles and API calls from this
//! origin only, no inline code, no framing), `X-Content-Type-Options: nosniff`
//! and an ETag, and is revalidated on each load (`Cache-Control: no-cache`), so
//! an upgraded binary is picked up at once while unchanged assets answer 304.
//!
//! The page itself holds no secret: it loads without a token, asks for an admin
//! token, keeps it in the tab's `sessionStorage` and sends it as a Bearer token
//! to `/v1` like any other client. The server enforces every role rule; the
//! console only hides what the role cannot do.

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::error::AdminError;

/// The policy of every console response: nothing but same-origin scripts,
/// styles, images and API calls; no inline code, plugins, forms or framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file, served at `/ui/<name>`.
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const SVG: &str = "image/svg+xml";

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $name)),
        }
    };
}

/// Everything the console is made of; `index.html` is served at `/ui/`.
pub const ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("app.css", CSS),
    asset!("favicon.svg", SVG),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("keys.js", JS),
    asset!("detail.js", JS),
    asset!("pages.js", JS),
];

/// The console's routes, to merge into the admin router (see [`super`]).
pub fn routes() -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/{*name}", get(named))
}

async fn index(headers: HeaderMap) -> Response {
    serve(find("index.html"), &headers)
}

async fn named(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match find(&name) {
        Some(asset) => serve(Some(asset), &headers),
        None => AdminError::NotFound(format!("the console has no file {name:?}")).into_response(),
    }
}

/// The embedded asset called exactly `name`.
pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

fn serve(asset: Option<&'static Asset>, request: &HeaderMap) -> Response {
    let Some(asset) = asset else {
        // `index.html` is in ASSETS, and a unit test checks it.
        return AdminError::Internal.into_response();
    };
    let etag = etag(asset.body);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Body::from(asset.body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// A strong validator: the first 16 bytes of the body's SHA-256, quoted.
fn etag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("\"{}\"", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(name: &str) -> &'static str {
        std::str::from_utf8(find(name).expect(name).body).expect("assets are UTF-8")
    }

    /// Every `src`/`href` of the page and every `import` of a module names an
    /// embedded asset, so the console never asks for a file the binary lacks.
    #[test]
    fn every_reference_is_embedded() {
        let html = text("index.html");
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let target = part.split('"').next().unwrap_or("");
                if target.starts_with('#') {
                    continue;
                }
                assert!(find(target).is_some(), "index.html refers to {target}");
            }
        }
        for asset in ASSETS.iter().filter(|a| a.content_type == JS) {
            let js = text(asset.name);
            for line in js.lines().filter(|l| l.starts_with("import ")) {
                let target = line
                    .split("from '")
                    .nth(1)
                    .and_then(|s| s.split('\'').next())
                    .and_then(|s| s.strip_prefix("./"))
                    .unwrap_or_else(|| panic!("{}: unexpected import: {line}", asset.name));
                assert!(find(target).is_some(), "{} imports {target}", asset.name);
            }
        }
    }

    /// The CSP forbids inline code, so the page must not contain any; and API
    /// strings are inserted as text, never parsed as HTML.
    #[test]
    fn no_inline_code_and_no_html_parsing() {
        let html = text("index.html");
        for part in html.split("<script").skip(1) {
            let tag = part.split('>').next().unwrap_or("");
            assert!(tag.contains("src="), "inline <script> in index.html");
        }
        for banned in ["<style", "style=\"", " onclick=", " onload="] {
            assert!(!html.contains(banned), "index.html contains {banned}");
        }
        for asset in ASSETS.iter().filter(|a| a.content_type == JS) {
            let js = text(asset.name);
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
            ] {
                assert!(!js.contains(banned), "{} uses {banned}", asset.name);
            }
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }

    #[test]
    fn names_outside_the_set_are_unknown() {
        assert!(find("index.html").is_some());
        for name in [
            "",
            "../Cargo.toml",
            "ui/app.js",
            "APP.JS",
            "app.js/",
            "src/main.rs",
        ] {
            assert!(find(name).is_none(), "{name}");
        }
    }

    #[test]
    fn etags_follow_the_content() {
        assert_eq!(etag(b"a"), etag(b"a"));
        assert_ne!(etag(b"a"), etag(b"b"));
        assert_eq!(etag(b"a").len(), 34);
    }
}
