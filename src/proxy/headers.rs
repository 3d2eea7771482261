//! Header rewriting between the client and the upstream.
//!
//! Order matters and is fixed: first the client's hop-by-hop headers go
//! (including every header the client listed in `Connection`), then any
//! `X-Keygate-*` header the client sent, then the credential header; only then
//! does keygate add `X-Forwarded-*`, `X-Request-Id` and the identity headers.
//! So a client cannot use `Connection: X-Keygate-Key-Id` to strip or forge
//! keygate's own headers.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers of RFC 9110 section 7.6.1, plus the legacy ones proxies
/// also strip.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub static X_KEYGATE_KEY_NAME: HeaderName = HeaderName::from_static("x-keygate-key-name");
pub static X_KEYGATE_OWNER: HeaderName = HeaderName::from_static("x-keygate-owner");
pub static X_KEYGATE_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
pub static X_KEYGATE_ACCESS: HeaderName = HeaderName::from_static("x-keygate-access");

/// Removes hop-by-hop headers, and every header named in `Connection`.
/// `Transfer-Encoding` is framing: hyper owns it on both sides.
///
/// One scan of the (few) present names first: most messages carry no
/// hop-by-hop header, and a scan is much cheaper than a hashed `remove` per
/// candidate name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found = false;
    let mut listed_by_connection = false;
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            found = true;
            listed_by_connection |= name == header::CONNECTION;
        }
    }
    if !found {
        return;
    }
    if listed_by_connection {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TRANSFER_ENCODING || HOP_BY_HOP.iter().any(|h| h == name)
}

/// Removes every `X-Keygate-*` header (clients must not forge identity).
pub fn strip_keygate_headers(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-keygate-"))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// Appends the client address to `X-Forwarded-For`, as nginx's
/// `$proxy_add_x_forwarded_for` does, and sets `X-Forwarded-Proto`/`-Host`.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    https: bool,
    host: Option<&HeaderValue>,
) {
    let mut ip_buf = [0u8; 64];
    let ip = format_ip(client, &mut ip_buf);
    let xff = match join_existing(headers, &X_FORWARDED_FOR) {
        Some(prev) => HeaderValue::from_maybe_shared(bytes::Bytes::from(format!("{prev}, {ip}"))),
        None => HeaderValue::from_str(ip),
    };
    if let Ok(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// All values of a header joined with ", " (`None` if absent or not text).
fn join_existing(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = v.to_str().ok()?;
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(s);
            }
            None => out = Some(s.to_owned()),
        }
    }
    out
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &str {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IP address is at most 45 characters; the buffer is 64.
    if write!(cursor, "{ip}").is_err() {
        return "unknown";
    }
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len]).unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_are_removed() {
        let mut h = map(&[
            ("connection", "close, x-custom"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-custom", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
            ("transfer-encoding", "chunked"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "3");
    }

    #[test]
    fn client_keygate_headers_are_dropped() {
        let mut h = map(&[
            ("x-keygate-key-id", "forged"),
            ("X-Keygate-Owner", "me"),
            ("x-keep", "1"),
        ]);
        strip_keygate_headers(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn forwarded_headers_append_and_set() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
        ]);
        add_forwarded(
            &mut h,
            "192.0.2.7".parse().unwrap(),
            false,
            Some(&HeaderValue::from_static("api.example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::1".parse().unwrap(), true, None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
