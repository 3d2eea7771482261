//! What `keygate keys` prints for people: a key as a labelled block, a list of
//! keys as a table whose columns fit their content, a secret on its own line.
//!
//! Answers are read into [`KeyDoc`], a lenient mirror of the admin API's
//! `KeyView`: only `id` is required, so a newer server with more fields, or an
//! older one with fewer, still prints. Text that came from the server is
//! stripped of control characters before it reaches a terminal.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A key as the admin API shows it (`KeyView`, DESIGN.md section 3).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct KeyDoc {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub hint: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub access: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitDoc>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub revoked_by: Option<String>,
    #[serde(default)]
    pub revocation_reason: Option<String>,
    #[serde(default)]
    pub suspended_at: Option<String>,
    #[serde(default)]
    pub suspended_by: Option<String>,
    #[serde(default)]
    pub last_used_at: Option<String>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

/// A key's own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RateLimitDoc {
    pub per_second: u64,
    pub burst: u64,
}

/// The answer to create and rotate. Not `Debug`: it holds a secret.
#[derive(Deserialize)]
pub struct KeyWithSecret {
    pub key: KeyDoc,
    pub secret: String,
}

/// One page of `GET /v1/keys`.
#[derive(Debug, Deserialize)]
pub struct KeyList<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// Width of the labels in a key block.
const LABEL_WIDTH: usize = 12;

/// A key as `label  value` lines.
pub fn key_block(k: &KeyDoc) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("id", clean(&k.id)),
        ("name", text(k.name.as_deref())),
        ("description", text(k.description.as_deref())),
        ("owner", text(k.owner.as_deref())),
        ("hint", text(k.hint.as_deref())),
        ("scopes", scopes(k.scopes.as_deref(), ", ", "none")),
        ("access", text(k.access.as_deref())),
        (
            "rate limit",
            match k.rate_limit {
                Some(r) => format!("{}/s, burst {}", r.per_second, r.burst),
                None => "gateway default".to_owned(),
            },
        ),
        ("status", text(k.status.as_deref())),
        ("expires", time(k.expires_at.as_deref(), "never", FULL_TIME)),
        (
            "created",
            by(
                time(k.created_at.as_deref(), "-", FULL_TIME),
                k.created_by.as_deref(),
            ),
        ),
        ("updated", time(k.updated_at.as_deref(), "-", FULL_TIME)),
        (
            "last used",
            time(k.last_used_at.as_deref(), "never", FULL_TIME),
        ),
    ];
    if k.revoked_at.is_some() {
        let mut v = by(
            time(k.revoked_at.as_deref(), "-", FULL_TIME),
            k.revoked_by.as_deref(),
        );
        if let Some(reason) = k.revocation_reason.as_deref().filter(|r| !r.is_empty()) {
            v.push_str(&format!(": {}", clean(reason)));
        }
        lines.push(("revoked", v));
    }
    if k.suspended_at.is_some() {
        lines.push((
            "suspended",
            by(
                time(k.suspended_at.as_deref(), "-", FULL_TIME),
                k.suspended_by.as_deref(),
            ),
        ));
    }
    let metadata = match &k.metadata {
        Some(m) if !m.is_empty() => Value::Object(m.clone()).to_string(),
        _ => "-".to_owned(),
    };
    lines.push(("metadata", metadata));
    let mut out = String::new();
    for (label, value) in lines {
        out.push_str(&format!("{label:<LABEL_WIDTH$} {value}\n"));
    }
    out
}

/// A key block followed by its secret, the only time the secret is shown.
pub fn key_with_secret(doc: &KeyWithSecret) -> String {
    format!(
        "{}\n{:<LABEL_WIDTH$} {}\n",
        key_block(&doc.key),
        "secret",
        clean(&doc.secret)
    )
}

/// A table column: its header and the widest a value may be before it is
/// cut with an ellipsis (`None`: never cut).
struct Column {
    header: &'static str,
    max: Option<usize>,
}

const COLUMNS: [Column; 9] = [
    Column {
        header: "ID",
        max: None,
    },
    Column {
        header: "NAME",
        max: Some(28),
    },
    Column {
        header: "OWNER",
        max: Some(20),
    },
    Column {
        header: "HINT",
        max: Some(16),
    },
    Column {
        header: "SCOPES",
        max: Some(32),
    },
    Column {
        header: "ACCESS",
        max: Some(9),
    },
    Column {
        header: "STATUS",
        max: Some(9),
    },
    Column {
        header: "EXPIRES",
        max: None,
    },
    Column {
        header: "LAST USED",
        max: None,
    },
];

/// Keys as a table: a header row, one row per key, columns separated by two
/// spaces and as wide as their widest cell (after truncation).
pub fn key_table(keys: &[KeyDoc]) -> String {
    if keys.is_empty() {
        return "No keys.\n".to_owned();
    }
    let rows: Vec<[String; 9]> = keys
        .iter()
        .map(|k| {
            let cells = [
                clean(&k.id),
                text(k.name.as_deref()),
                text(k.owner.as_deref()),
                text(k.hint.as_deref()),
                scopes(k.scopes.as_deref(), ",", "-"),
                text(k.access.as_deref()),
                text(k.status.as_deref()),
                time(k.expires_at.as_deref(), "never", SHORT_TIME),
                time(k.last_used_at.as_deref(), "never", SHORT_TIME),
            ];
            let mut row = cells;
            for (cell, column) in row.iter_mut().zip(&COLUMNS) {
                if let Some(max) = column.max {
                    *cell = truncate(cell, max);
                }
            }
            row
        })
        .collect();
    let mut widths = COLUMNS.map(|c| c.header.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headers = COLUMNS.map(|c| c.header.to_owned());
    for row in std::iter::once(&headers).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Cuts `s` to at most `max` characters, the last being `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Server text made safe for a terminal: control characters become `?`.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A text field, `-` when absent or empty.
fn text(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => clean(s),
        _ => "-".to_owned(),
    }
}

fn scopes(s: Option<&[String]>, sep: &str, none: &str) -> String {
    match s {
        Some(s) if !s.is_empty() => clean(&s.join(sep)),
        _ => none.to_owned(),
    }
}

const FULL_TIME: &str = "%Y-%m-%d %H:%M:%S UTC";
const SHORT_TIME: &str = "%Y-%m-%d %H:%M";

/// An RFC 3339 time in UTC with `format`; `none` when absent; as sent when it
/// does not parse.
fn time(s: Option<&str>, none: &str, format: &str) -> String {
    match s {
        None => none.to_owned(),
        Some(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.with_timezone(&Utc).format(format).to_string(),
            Err(_) => clean(s),
        },
    }
}

/// `value by actor`, or `value` without an actor.
fn by(value: String, actor: Option<&str>) -> String {
    match actor {
        Some(a) if !a.is_empty() => format!("{value} by {}", clean(a)),
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: Value) -> KeyDoc {
        serde_json::from_value(v).unwrap()
    }

    fn sample() -> Value {
        json!({
            "id": "key_01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "name": "ci-deploy",
            "description": "",
            "owner": "ops",
            "hint": "kg_…Zk9a",
            "scopes": ["orders:read", "billing"],
            "access": "full",
            "rate_limit": {"per_second": 50, "burst": 100},
            "status": "active",
            "created_at": "2025-03-01T10:00:00Z",
            "created_by": "ops",
            "updated_at": "2025-03-01T10:00:00.123+00:00",
            "expires_at": "2026-03-01T12:30:00+02:00",
            "revoked_at": null,
            "revoked_by": null,
            "revocation_reason": null,
            "suspended_at": null,
            "suspended_by": null,
            "last_used_at": null,
            "metadata": {"team": "billing"},
            "a_future_field": 1
        })
    }

    #[test]
    fn key_block_shows_every_field_readably() {
        let out = key_block(&doc(sample()));
        let expected = "\
id           key_01ARZ3NDEKTSV4RRFFQ69G5FAV
name         ci-deploy
description  -
owner        ops
hint         kg_…Zk9a
scopes       orders:read, billing
access       full
rate limit   50/s, burst 100
status       active
expires      2026-03-01 10:30:00 UTC
created      2025-03-01 10:00:00 UTC by ops
updated      2025-03-01 10:00:00 UTC
last used    never
metadata     {\"team\":\"billing\"}
";
        assert_eq!(out, expected, "got:\n{out}");
    }

    #[test]
    fn key_block_shows_revocation_and_suspension() {
        let mut v = sample();
        v["status"] = json!("revoked");
        v["revoked_at"] = json!("2025-04-01T00:00:00Z");
        v["revoked_by"] = json!("alice");
        v["revocation_reason"] = json!("leaked\nin logs");
        v["suspended_at"] = json!("2025-03-15T00:00:00Z");
        v["suspended_by"] = json!("bob");
        v["rate_limit"] = Value::Null;
        v["metadata"] = json!({});
        v["expires_at"] = Value::Null;
        let out = key_block(&doc(v));
        for line in [
            "status       revoked\n",
            "revoked      2025-04-01 00:00:00 UTC by alice: leaked?in logs\n",
            "suspended    2025-03-15 00:00:00 UTC by bob\n",
            "rate limit   gateway default\n",
            "expires      never\n",
            "metadata     -\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in:\n{out}");
        }
    }

    #[test]
    fn key_with_secret_prints_the_secret_once_at_the_end() {
        let d: KeyWithSecret =
            serde_json::from_value(json!({"key": sample(), "secret": "kg_SECRET123"})).unwrap();
        let out = key_with_secret(&d);
        assert_eq!(out.matches("kg_SECRET123").count(), 1, "{out}");
        assert!(out.ends_with("\nsecret       kg_SECRET123\n"), "{out}");
    }

    #[test]
    fn a_minimal_document_still_renders() {
        let out = key_block(&doc(json!({"id": "key_x", "description": null})));
        assert!(
            out.starts_with("id           key_x\nname         -\n"),
            "{out}"
        );
        assert!(serde_json::from_value::<KeyDoc>(json!({"name": "no id"})).is_err());
    }

    #[test]
    fn table_fits_columns_to_content_and_truncates_long_values() {
        let a = doc(sample());
        let mut v = sample();
        v["id"] = json!("key_01ARZ3NDEKTSV4RRFFQ69G5FAW");
        v["name"] = json!("a very long key name that does not fit at all");
        v["owner"] = json!("o");
        v["scopes"] = json!([]);
        v["access"] = json!("read_only");
        v["status"] = json!("suspended");
        v["expires_at"] = Value::Null;
        v["last_used_at"] = json!("2025-05-06T07:08:09Z");
        let b = doc(v);
        let out = key_table(&[a, b]);
        let expected = "\
ID                              NAME                          OWNER  HINT      SCOPES               ACCESS     STATUS     EXPIRES           LAST USED
key_01ARZ3NDEKTSV4RRFFQ69G5FAV  ci-deploy                     ops    kg_…Zk9a  orders:read,billing  full       active     2026-03-01 10:30  never
key_01ARZ3NDEKTSV4RRFFQ69G5FAW  a very long key name that d…  o      kg_…Zk9a  -                    read_only  suspended  never             2025-05-06 07:08
";
        assert_eq!(out, expected, "got:\n{out}");
        for line in out.lines() {
            assert_eq!(line, line.trim_end());
        }
    }

    #[test]
    fn table_columns_are_as_narrow_as_their_headers_allow() {
        let out = key_table(&[doc(json!({"id": "key_x"}))]);
        assert_eq!(
            out,
            "ID     NAME  OWNER  HINT  SCOPES  ACCESS  STATUS  EXPIRES  LAST USED\n\
             key_x  -     -      -     -       -       -       never    never\n"
        );
        assert_eq!(key_table(&[]), "No keys.\n");
    }

    #[test]
    fn truncate_counts_characters_not_bytes() {
        assert_eq!(truncate("ééééé", 5), "ééééé");
        assert_eq!(truncate("éééééé", 5), "éééé…");
        assert_eq!(truncate("abc", 1), "…");
        assert_eq!(clean("a\u{1b}[31mb"), "a?[31mb");
    }
}
