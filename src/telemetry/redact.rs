//! Redaction of request targets before they reach a log line.
//!
//! A key in the query string is not a credential (DESIGN.md section 4), but a
//! client may still put one there, or in a path segment, and an access log
//! must not keep it. [`Redactor::target`] replaces:
//!
//! - the value of every query parameter whose name says it holds a secret
//!   (`key`, `api_key`, `token`, ..., and every configured credential header
//!   name such as `x-api-key`), and
//! - every path segment, query value or bare query word that looks like an
//!   API key: the configured `keys.prefix` followed by at least
//!   [`MIN_SECRET_RUN`] letters or digits, as written or percent-decoded.
//!
//! The common case (no query, no prefix in the path) borrows the input.

use std::borrow::Cow;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// Letters or digits after the prefix that make a string look like a key.
/// A real key has 38; eight keep words like `kg_docs` readable while still
/// catching a truncated or mangled key.
pub const MIN_SECRET_RUN: usize = 8;

/// Query parameter names whose values are always hidden.
const SECRET_PARAMS: [&str; 13] = [
    "key",
    "api_key",
    "apikey",
    "api-key",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "authorization",
    "secret",
    "client_secret",
    "password",
];

/// Redacts request targets for one config (its key prefix and headers).
pub struct Redactor {
    prefix: String,
    /// Lower-case parameter names whose values are hidden.
    names: Vec<String>,
}

impl Redactor {
    pub fn new<'a>(prefix: &str, header_names: impl Iterator<Item = &'a str>) -> Redactor {
        let mut names: Vec<String> = SECRET_PARAMS.iter().map(|s| (*s).to_owned()).collect();
        for h in header_names {
            let h = h.to_ascii_lowercase();
            if !names.contains(&h) {
                names.push(h);
            }
        }
        Redactor {
            prefix: prefix.to_owned(),
            names,
        }
    }

    /// The path and query of `target` with secrets replaced by [`REDACTED`].
    pub fn target<'a>(&self, target: &'a str) -> Cow<'a, str> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let path_out = self.path(path);
        let query_out = query.map(|q| self.query(q));
        let unchanged = matches!(path_out, Cow::Borrowed(_))
            && query_out
                .as_ref()
                .is_none_or(|q| matches!(q, Cow::Borrowed(_)));
        if unchanged {
            return Cow::Borrowed(target);
        }
        let mut out = path_out.into_owned();
        if let Some(q) = query_out {
            out.push('?');
            out.push_str(&q);
        }
        Cow::Owned(out)
    }

    fn path<'a>(&self, path: &'a str) -> Cow<'a, str> {
        if !self.might_hold_secret(path) {
            return Cow::Borrowed(path);
        }
        if !path.split('/').any(|seg| self.looks_secret(seg)) {
            return Cow::Borrowed(path);
        }
        let segments: Vec<&str> = path
            .split('/')
            .map(|seg| match self.looks_secret(seg) {
                true => REDACTED,
                false => seg,
            })
            .collect();
        Cow::Owned(segments.join("/"))
    }

    fn query<'a>(&self, query: &'a str) -> Cow<'a, str> {
        let mut changed = false;
        let pairs: Vec<Cow<'a, str>> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !value.is_empty() => {
                    if self.secret_name(name) || self.looks_secret(value) {
                        changed = true;
                        Cow::Owned(format!("{name}={REDACTED}"))
                    } else {
                        Cow::Borrowed(pair)
                    }
                }
                Some(_) => Cow::Borrowed(pair),
                None if self.looks_secret(pair) => {
                    changed = true;
                    Cow::Borrowed(REDACTED)
                }
                None => Cow::Borrowed(pair),
            })
            .collect();
        match changed {
            false => Cow::Borrowed(query),
            true => Cow::Owned(pairs.join("&")),
        }
    }

    fn secret_name(&self, name: &str) -> bool {
        let name = percent_decode(name).to_ascii_lowercase();
        self.names.contains(&name)
    }

    /// A quick test before splitting: a secret needs the prefix, perhaps
    /// percent-encoded.
    fn might_hold_secret(&self, s: &str) -> bool {
        s.contains(&self.prefix) || s.contains('%')
    }

    fn looks_secret(&self, s: &str) -> bool {
        if !self.might_hold_secret(s) {
            return false;
        }
        has_key_run(s, &self.prefix)
            || (s.contains('%') && has_key_run(&percent_decode(s), &self.prefix))
    }
}

/// Whether `s` holds `prefix` followed by [`MIN_SECRET_RUN`] letters or digits.
fn has_key_run(s: &str, prefix: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    s.match_indices(prefix).any(|(i, _)| {
        s[i + prefix.len()..]
            .bytes()
            .take_while(u8::is_ascii_alphanumeric)
            .count()
            >= MIN_SECRET_RUN
    })
}

/// `%XX` decoded (and `+` as a space, as in query strings); invalid escapes
/// are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |c: u8| (c as char).to_digit(16);
        if b == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|c| hex(*c)),
                bytes.get(i + 2).and_then(|c| hex(*c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "kg_3xRabcdefghijklmnopqrstuvwxyz0123Q1f9Zk";

    fn r() -> Redactor {
        Redactor::new("kg_", ["x-api-key", "X-Custom-Key"].into_iter())
    }

    #[test]
    fn plain_targets_are_borrowed() {
        for t in [
            "/api/orders",
            "/api/orders?page=2&sort=asc",
            "/kg_docs/x",
            "/",
        ] {
            assert!(matches!(r().target(t), Cow::Borrowed(_)), "{t}");
        }
    }

    #[test]
    fn secret_parameters_are_hidden_whatever_they_hold() {
        assert_eq!(
            r().target("/a?api_key=abc&page=2&TOKEN=xyz&x-api-key=1&x-custom-key=2"),
            "/a?api_key=[redacted]&page=2&TOKEN=[redacted]&x-api-key=[redacted]&x-custom-key=[redacted]"
        );
        assert_eq!(r().target("/a?key="), "/a?key=");
    }

    #[test]
    fn key_like_values_and_segments_are_hidden_anywhere() {
        let t = format!("/api/{KEY}/x?q={KEY}&{KEY}&note=hi");
        let out = r().target(&t);
        assert_eq!(out, "/api/[redacted]/x?q=[redacted]&[redacted]&note=hi");
        let encoded = KEY.replace('_', "%5F");
        let t = format!("/a/{encoded}?q=%6bg_{}", &KEY[3..]);
        let out = r().target(&t);
        assert!(!out.contains(&KEY[3..]), "{out}");
        let t = format!("/a?q=Bearer+{KEY}");
        let out = r().target(&t);
        assert_eq!(out, "/a?q=[redacted]");
    }

    #[test]
    fn short_runs_after_the_prefix_stay() {
        assert_eq!(
            r().target("/kg_docs?topic=kg_intro"),
            "/kg_docs?topic=kg_intro"
        );
    }
}
