//! The admin API's request input through the code its handlers run: the
//! `JsonBody` extractor (content type, empty body, JSON object), then the
//! validation of each call (create, update, revoke, rotate, suspend/reinstate,
//! bulk, settings), the query strings of the two listings, and path
//! normalization. Never a panic; a refusal is a 4xx problem+json whose `code`
//! matches; what is accepted obeys the documented limits, and applying it to
//! a key record behaves (an edit applied twice changes nothing the second
//! time, a rotation keeps the old secret exactly for the grace).
//!
//! Input: one byte choosing the call (low 4 bits, modulo 10), one flags byte
//! (bits 0-1: caller role admin/developer/auditor/admin; bit 2: no
//! `keys.max_ttl`; bits 3-4: Content-Type application/json, a `+json` type
//! with parameters, none, text/plain), then the body, query string or path.

#![no_main]

use std::sync::OnceLock;

use axum::extract::{FromRequest, FromRequestParts};
use chrono::{DateTime, TimeZone, Utc};
use http::header::{CONTENT_TYPE, HeaderValue};
use keygate::admin::auth::Caller;
use keygate::admin::extract::{Fields, JsonBody, QueryParams};
use keygate::admin::input::{
    KeyEdit, MAX_DESCRIPTION_CHARS, MAX_METADATA_BYTES, MAX_NAME_CHARS, MAX_SCOPES, NewKey,
};
use keygate::admin::keys::MAX_REASON_CHARS;
use keygate::admin::ops::{self, MAX_GRACE};
use keygate::admin::{bulk, events, keys, settings};
use keygate::config::{self, AdminRole, KeysConfig};
use keygate::error::AdminError;
use keygate::keys::{KeyId, KeyRecord, KeyStatus, Token, TokenHash};
use keygate::proxy::route::normalize_path;
use keygate::store::MAX_PAGE;
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "kg_";

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// The key policy of a default config, or one with `max_ttl: null`.
fn policy(unbounded: bool) -> &'static KeysConfig {
    static POLICIES: OnceLock<[KeysConfig; 2]> = OnceLock::new();
    let p = POLICIES.get_or_init(|| {
        let load = |yaml: &str| config::parse(yaml, "policy.yaml", &[]).expect(yaml).keys;
        [load(""), load("keys:\n  max_ttl: null\n")]
    });
    &p[usize::from(unbounded)]
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn record() -> KeyRecord {
    let token = Token::generate(PREFIX);
    KeyRecord::issue(&token, PREFIX, "base", "dev", "ops", now())
}

/// A body through the real extractor.
fn body(bytes: &[u8], content_type: Option<&'static str>) -> Result<Fields, AdminError> {
    let mut req = axum::extract::Request::new(axum::body::Body::from(bytes.to_vec()));
    if let Some(ct) = content_type {
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    rt().block_on(JsonBody::from_request(req, &()))
        .map(|JsonBody(f)| f)
}

/// A query string through the real extractor; `None` if it is not valid in
/// a request target at all (hyper would have refused the request).
fn query(path: &str, q: &[u8]) -> Option<QueryParams> {
    let q = std::str::from_utf8(q).ok()?;
    let req = http::Request::builder()
        .uri(format!("{path}?{q}"))
        .body(())
        .ok()?;
    let (mut parts, ()) = req.into_parts();
    let params = rt().block_on(QueryParams::from_request_parts(&mut parts, &()));
    Some(params.expect("the query extractor never refuses"))
}

/// A refusal is a client error rendered as problem+json with its code.
fn refused(e: AdminError) {
    let resp = e.to_problem("fuzz");
    assert!(
        resp.status().is_client_error(),
        "{e:?} -> {}",
        resp.status()
    );
    let v: serde_json::Value = serde_json::from_slice(resp.body()).expect("problem+json");
    assert_eq!(v["code"], e.code());
    assert_eq!(v["status"], resp.status().as_u16());
    if let AdminError::InvalidField { field, .. } = &e {
        let detail = v["detail"].as_str().expect("detail");
        assert!(detail.starts_with(&format!("{field}: ")), "{detail}");
    }
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn create(f: Fields, caller: &Caller, policy: &KeysConfig) {
    let k = match NewKey::parse(f, caller, policy, now()) {
        Ok(k) => k,
        Err(e) => return refused(e),
    };
    for label in [&k.name, &k.owner] {
        assert!((1..=MAX_NAME_CHARS).contains(&chars(label)), "{label:?}");
        assert!(!label.trim().is_empty() && !label.chars().any(char::is_control));
    }
    if caller.role == AdminRole::Developer {
        assert_eq!(k.owner, caller.name);
    }
    assert!(chars(&k.description) <= MAX_DESCRIPTION_CHARS);
    assert!(k.scopes.len() <= MAX_SCOPES);
    for (i, s) in k.scopes.iter().enumerate() {
        assert!(!k.scopes[..i].contains(s), "duplicate scope {s:?}");
    }
    assert!(serde_json::to_vec(&k.metadata).unwrap().len() <= MAX_METADATA_BYTES);
    if let Some(r) = k.rate_limit {
        assert!(r.per_second >= 1 && r.burst >= 1);
    }
    match (k.expires_at, policy.max_ttl) {
        (None, max) => assert!(max.is_none(), "a key that never expires despite max_ttl"),
        (Some(at), max) => {
            assert!(at > now());
            if let Some(max) = max {
                assert!(at <= now() + chrono::Duration::from_std(max).unwrap());
            }
        }
    }
    let token = Token::generate(PREFIX);
    let rec = k.clone().into_record(&token, PREFIX, &caller.name, now());
    assert_eq!(rec.status(now()), KeyStatus::Active);
    assert_eq!(rec.check(&token.hash(), now()), Ok(()));
    let view = serde_json::to_string(&rec.view(now())).expect("a view serializes");
    assert!(!view.contains(token.expose()) && !view.contains(&rec.token_hash.to_hex()));
    let back: keygate::keys::KeyView = serde_json::from_str(&view).expect("and reads back");
    assert_eq!((back.name, back.scopes), (k.name, k.scopes));
}

fn update(f: Fields) {
    let edit = match KeyEdit::parse(f) {
        Ok(e) => e,
        Err(e) => return refused(e),
    };
    let mut rec = record();
    edit.clone().apply(&mut rec);
    let again = edit.apply(&mut rec);
    assert!(again.is_empty(), "the same edit changed {again:?} twice");
}

fn revoke(f: Fields) {
    let reason = match keys::parse_revoke(f) {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    assert!(
        reason
            .as_deref()
            .is_none_or(|r| chars(r) <= MAX_REASON_CHARS)
    );
    let mut rec = record();
    ops::revoke(&mut rec, "ops", reason.as_deref(), now()).expect("a live key revokes");
    assert_eq!(rec.status(now()), KeyStatus::Revoked);
    assert_eq!(
        ops::revoke(&mut rec, "ops", None, now()),
        Err(AdminError::AlreadyRevoked)
    );
}

fn rotate(f: Fields) {
    let grace = match keys::parse_rotate(f) {
        Ok(g) => g,
        Err(e) => return refused(e),
    };
    assert!(grace <= MAX_GRACE);
    let mut rec = record();
    let old: TokenHash = rec.token_hash;
    let new = Token::generate(PREFIX);
    ops::rotate(&mut rec, &new, PREFIX, grace, now()).expect("a live key rotates");
    assert_eq!(rec.check(&new.hash(), now()), Ok(()));
    assert_eq!(rec.check(&old, now()).is_ok(), !grace.is_zero());
    let after = now() + chrono::Duration::from_std(grace).unwrap();
    assert!(
        rec.check(&old, after).is_err(),
        "the old secret outlives its grace"
    );
}

fn bulk(f: Fields) {
    let call = match bulk::parse(f) {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    if call.reason.is_some() {
        assert_eq!(call.action, bulk::Action::Revoke);
    }
    if let bulk::Selection::Ids(ids) = &call.selection {
        assert!(ids.len() <= bulk::MAX_BULK);
    }
}

fn settings(f: Fields) {
    if let Err(e) = settings::parse_update(f) {
        refused(e);
    }
}

fn list_keys(mut q: QueryParams) {
    match keys::list_filter(&mut q).and_then(|f| q.finish().map(|()| f)) {
        Ok(f) => assert!((1..=MAX_PAGE).contains(&f.limit)),
        Err(e) => refused(e),
    }
}

fn list_events(mut q: QueryParams) {
    match events::event_filter(&mut q).and_then(|f| q.finish().map(|()| f)) {
        Ok(f) => assert!((1..=MAX_PAGE).contains(&f.limit)),
        Err(e) => refused(e),
    }
}

/// Path normalization: a normalized path is absolute, has no empty, `.` or
/// `..` segment (plain or percent-encoded), and normalizes to itself.
fn path(data: &[u8]) {
    let Ok(p) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(id) = KeyId::parse(p) {
        assert_eq!(id.as_str(), p);
    }
    let Ok(normal) = normalize_path(p) else {
        return;
    };
    let out = normal.as_deref().unwrap_or(p);
    assert!(out.starts_with('/'), "{p:?} -> {out:?}");
    if let Some(out) = &normal {
        let inner = out[1..].strip_suffix('/').unwrap_or(&out[1..]);
        for seg in inner.split('/').filter(|_| !inner.is_empty()) {
            let decoded = seg.replace("%2e", ".").replace("%2E", ".");
            assert!(
                !matches!(decoded.as_str(), "" | "." | ".."),
                "{p:?} -> {out:?}"
            );
        }
        let again = normalize_path(out).expect("a normalized path is accepted");
        assert!(
            again.is_none() || again.as_deref() == Some(out.as_str()),
            "{p:?} -> {out:?} -> {again:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let [call, flags, rest @ ..] = data else {
        return;
    };
    let caller = match flags & 3 {
        1 => Caller {
            name: "dev".into(),
            role: AdminRole::Developer,
        },
        2 => Caller {
            name: "audit".into(),
            role: AdminRole::Auditor,
        },
        _ => Caller {
            name: "ops".into(),
            role: AdminRole::Admin,
        },
    };
    let policy = policy(flags & 4 != 0);
    let content_type = match (flags >> 3) & 3 {
        0 => Some("application/json"),
        1 => Some("application/merge-patch+json; charset=utf-8"),
        2 => None,
        _ => Some("text/plain"),
    };
    let call = (call & 15) % 10;
    if call >= 7 {
        match call {
            7 => query("/v1/keys", rest).map(list_keys),
            8 => query("/v1/events", rest).map(list_events),
            _ => Some(path(rest)),
        };
        return;
    }
    let f = match body(rest, content_type) {
        Ok(f) => f,
        Err(e) => return refused(e),
    };
    match call {
        0 => create(f, &caller, policy),
        1 => update(f),
        2 => revoke(f),
        3 => rotate(f),
        4 => {
            // suspend and reinstate take no fields.
            if let Err(e) = f.reject_unknown("", &[]) {
                refused(e);
            }
        }
        5 => bulk(f),
        _ => settings(f),
    }
});
