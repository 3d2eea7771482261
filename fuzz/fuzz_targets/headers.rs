//! The proxy's header rewriting on arbitrary header maps: credential
//! extraction (`auth::extract`), then `proxy::headers::rewrite_for_upstream`
//! (hop-by-hop and Connection-listed removal, forged `X-Keygate-*` removal,
//! credential stripping once a key was found, `X-Forwarded-*`), exactly as
//! `proxy::rewrite_request` runs them.
//!
//! After the rewrite: no hop-by-hop header, no header named in any
//! `Connection` value and no `X-Keygate-*` header is left; when a credential
//! was found, no credential header carries one any more; `X-Forwarded-*` are
//! what the client sent plus the client address; every other header is
//! forwarded untouched, values and order.
//!
//! Input: one flags byte (bit 0: https; bits 1-2: which credential headers
//! are configured; bit 3: IPv6 client), then `name: value` lines. The name
//! and value bytes are taken as they are (a line that is not a valid header
//! is skipped), so values may hold obs-text (bytes >= 0x80).

#![no_main]

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use keygate::auth;
use keygate::config::CredentialHeader;
use keygate::proxy::headers::{self as rw, ip_header};
use libfuzzer_sys::fuzz_target;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
];
/// Set by keygate after stripping, whatever the client listed in Connection.
const SET_BY_KEYGATE: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];

fn sources(flags: u8) -> Vec<CredentialHeader> {
    let raw = |n: &'static str| CredentialHeader::Raw(HeaderName::from_static(n));
    match (flags >> 1) & 3 {
        0 => vec![CredentialHeader::Authorization, raw("x-api-key")],
        1 => vec![raw("x-api-key")],
        2 => vec![CredentialHeader::Authorization],
        _ => vec![
            raw("x-api-key"),
            CredentialHeader::Authorization,
            raw("x-token"),
        ],
    }
}

fn parse(lines: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in lines.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    h
}

/// Every token any `Connection` value names, read byte-wise as RFC 9110
/// section 7.6.1 lists them (comma-separated, optional whitespace).
fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect()
}

/// Whether `v` is an `Authorization: Bearer ...` value (the credential form).
fn is_bearer(v: &HeaderValue) -> bool {
    let b = v.as_bytes().trim_ascii();
    b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ")
}

fn joined(h: &HeaderMap, name: &str) -> Option<String> {
    let vals: Option<Vec<&str>> = h.get_all(name).iter().map(|v| v.to_str().ok()).collect();
    vals.filter(|v| !v.is_empty()).map(|v| v.join(", "))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let original = parse(rest);
    let sources = sources(flags);
    let https = flags & 1 != 0;
    let ip: IpAddr = if flags & 8 != 0 {
        "2001:db8::7".parse().unwrap()
    } else {
        "192.0.2.7".parse().unwrap()
    };
    let client = ip_header(ip);
    let host = original.get(header::HOST).cloned();

    // The proxy strips credentials only once a key was verified; verifying
    // needs a store, but stripping only depends on extraction succeeding.
    let found = auth::extract(&original, &sources).map(|c| c.token.to_owned());
    let mut h = original.clone();
    rw::rewrite_for_upstream(
        &mut h,
        found.as_ref().ok().map(|_| &sources[..]),
        &client,
        https,
        host.as_ref(),
    );

    // Hop-by-hop, Connection-listed and forged identity headers are gone.
    for name in HOP_BY_HOP {
        assert!(!h.contains_key(name), "{name} survived: {h:?}");
    }
    let listed = connection_listed(&original);
    for name in &listed {
        if !SET_BY_KEYGATE.contains(&name.as_str()) {
            assert!(
                !h.contains_key(name),
                "{name} is listed in Connection: {h:?}"
            );
        }
    }
    assert!(
        h.keys().all(|k| !k.as_str().starts_with("x-keygate-")),
        "{h:?}"
    );

    // The credential never reaches the upstream.
    if found.is_ok() {
        for s in &sources {
            match s {
                CredentialHeader::Authorization => {
                    let left = h.get_all(header::AUTHORIZATION);
                    assert!(
                        !left.iter().any(is_bearer),
                        "a bearer token survived: {h:?}"
                    );
                }
                CredentialHeader::Raw(n) => assert!(!h.contains_key(n), "{n} survived"),
            }
        }
    }

    // X-Forwarded-*: what the client sent (unless it listed it in
    // Connection), then the client address.
    let ip_text = ip.to_string();
    let xff = h.get_all("x-forwarded-for").iter().collect::<Vec<_>>();
    assert_eq!(xff.len(), 1, "{h:?}");
    let xff = xff[0].to_str().expect("built from text");
    let kept_xff = !listed.iter().any(|n| n == "x-forwarded-for");
    match joined(&original, "x-forwarded-for").filter(|_| kept_xff) {
        Some(prev) => assert_eq!(xff, format!("{prev}, {ip_text}")),
        None => assert_eq!(xff, ip_text),
    }
    let proto = if https { "https" } else { "http" };
    assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
    assert_eq!(h["x-forwarded-proto"], proto);
    match &host {
        Some(v) => {
            assert_eq!(h.get_all("x-forwarded-host").iter().count(), 1);
            assert_eq!(&h["x-forwarded-host"], v);
        }
        None => assert!(!h.contains_key("x-forwarded-host")),
    }

    // Everything else is forwarded as it came, values in order.
    for name in original.keys() {
        let n = name.as_str();
        let dropped = HOP_BY_HOP.contains(&n)
            || SET_BY_KEYGATE.contains(&n)
            || n.starts_with("x-keygate-")
            || listed.contains(name)
            || (found.is_ok()
                && sources.iter().any(|s| match s {
                    CredentialHeader::Authorization => name == header::AUTHORIZATION,
                    CredentialHeader::Raw(r) => r == name,
                }));
        if !dropped {
            let before: Vec<_> = original.get_all(name).iter().collect();
            let after: Vec<_> = h.get_all(name).iter().collect();
            assert_eq!(before, after, "{n} was changed");
        }
    }
});
