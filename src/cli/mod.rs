//! `keygate keys ...`: a command-line client of the admin API (DESIGN.md
//! sections 1 and 5).
//!
//! This module owns the arguments (clap derive) and their mapping to request
//! bodies and query strings; [`client`] owns the HTTP exchange and turns every
//! failure into one sentence; [`render`] owns what a person reads (a key as a
//! labelled block, a list as a table). With `--json` the API's own JSON is
//! printed instead, one document per call, so scripts see exactly what the
//! admin API answered.
//!
//! The admin token is held in [`AdminToken`], whose `Debug` never shows it, and
//! is sent only in the `Authorization` header (marked sensitive). A secret
//! returned by create or rotate is printed once, on stdout, with a warning on
//! stderr that it cannot be shown again.
//!
//! Exit codes follow DESIGN.md section 1: [`CliError::exit_code`] is 2 for
//! usage errors found before anything is sent, 1 for everything that went
//! wrong afterwards (connection, timeout, an error answer of the API).

pub mod client;
pub mod healthcheck;
pub mod render;

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::str::FromStr;

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Map, Value, json};

use self::client::{AdminClient, Answer};
use self::render::{KeyDoc, KeyList};
use crate::keys::KeyId;

/// The admin URL when neither `--admin-url` nor `KEYGATE_ADMIN_URL` is set
/// (or the variable is empty).
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:8081";

/// Exit code of a usage error (DESIGN.md section 1).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a runtime failure (DESIGN.md section 1).
pub const EXIT_RUNTIME: u8 = 1;

/// Why a `keygate keys` command failed. `Display` is one sentence without the
/// `keygate: ` prefix (the binary adds it), and never holds the admin token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// Bad arguments, found before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// The admin API answered with a problem+json error.
    #[error("{detail} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        detail: String,
    },
    /// Anything else that went wrong after the arguments were accepted.
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Api { .. } | CliError::Runtime(_) => EXIT_RUNTIME,
        }
    }

    fn usage(message: impl Into<String>) -> CliError {
        CliError::Usage(message.into())
    }
}

/// An admin token given on the command line or in `KEYGATE_ADMIN_TOKEN`.
/// `Debug` prints a placeholder, so a derived `Debug` of the arguments is safe.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(redacted)")
    }
}

impl FromStr for AdminToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<AdminToken, Self::Err> {
        Ok(AdminToken(s.to_owned()))
    }
}

/// `keygate keys`: manage API keys through the admin API.
#[derive(Debug, Args)]
pub struct KeysCommand {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub action: KeysAction,
}

/// Where the admin API is, how to authenticate, and how to print answers.
/// Accepted before or after the subcommand.
#[derive(Debug, Args)]
#[command(next_help_heading = "Admin API")]
pub struct Connection {
    /// Base URL of the admin API (http or https).
    #[arg(
        long,
        env = "KEYGATE_ADMIN_URL",
        default_value = DEFAULT_ADMIN_URL,
        global = true
    )]
    pub admin_url: String,
    /// Admin token; prefer the environment variable, since other local users
    /// can read command lines.
    #[arg(
        long,
        env = "KEYGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<AdminToken>,
    /// Print the admin API's JSON answer instead of a readable view.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The `keygate keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key; its secret is printed once and never again.
    Create(CreateArgs),
    /// List keys as a table (one page, or every page with --all).
    List(ListArgs),
    /// Show one key.
    Show(IdArg),
    /// Edit a key's name, description, scopes, rate limit or metadata.
    Update(UpdateArgs),
    /// Revoke a key for good.
    Revoke(RevokeArgs),
    /// Suspend a key until it is reinstated.
    Suspend(IdArg),
    /// Make a suspended key active again.
    Reinstate(IdArg),
    /// Give a key a new secret (printed once); the old one works until the grace ends.
    Rotate(RotateArgs),
    /// Delete a key; its secrets become unknown.
    Delete(IdArg),
}

/// A key id argument.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Key id (`key_` followed by a ULID).
    pub id: String,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessArg {
    /// GET, HEAD and OPTIONS only.
    #[value(name = "read_only", alias = "read-only")]
    ReadOnly,
    /// Every method.
    #[value(name = "full")]
    Full,
}

impl AccessArg {
    fn as_str(self) -> &'static str {
        match self {
            AccessArg::ReadOnly => "read_only",
            AccessArg::Full => "full",
        }
    }
}

/// A key status to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Active,
    Suspended,
    Expired,
    Revoked,
}

impl StatusArg {
    fn as_str(self) -> &'static str {
        match self {
            StatusArg::Active => "active",
            StatusArg::Suspended => "suspended",
            StatusArg::Expired => "expired",
            StatusArg::Revoked => "revoked",
        }
    }
}

/// Scopes, as repeated `--scope` and/or a comma-separated `--scopes`.
#[derive(Debug, Default, Args)]
pub struct ScopeArgs {
    /// A scope the key holds (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scope: Vec<String>,
    /// Comma-separated scopes, e.g. `orders:read,billing`; an empty string
    /// means none.
    #[arg(long, value_name = "A,B,...")]
    pub scopes: Option<String>,
}

impl ScopeArgs {
    /// The scopes given, in order without duplicates; `None` when neither
    /// option was used.
    fn collect(&self) -> Option<Vec<String>> {
        if self.scope.is_empty() && self.scopes.is_none() {
            return None;
        }
        let listed = self.scopes.iter().flat_map(|s| s.split(','));
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for s in self.scope.iter().map(String::as_str).chain(listed) {
            let s = s.trim();
            if !s.is_empty() && seen.insert(s) {
                out.push(s.to_owned());
            }
        }
        Some(out)
    }
}

/// A key's own rate limit.
#[derive(Debug, Default, Args)]
pub struct RateArgs {
    /// Rate limit as PER_SECOND/BURST, e.g. `50/100`.
    #[arg(long, value_name = "PER_SECOND/BURST", conflicts_with_all = ["per_second", "burst"])]
    pub rate_limit: Option<String>,
    /// Sustained requests per second (with --burst).
    #[arg(long, requires = "burst")]
    pub per_second: Option<u32>,
    /// Bucket size (with --per-second).
    #[arg(long, requires = "per_second")]
    pub burst: Option<u32>,
}

impl RateArgs {
    /// The `rate_limit` object, or `None` when no option was used.
    fn to_json(&self) -> Result<Option<Value>, CliError> {
        let (per_second, burst) = match (&self.rate_limit, self.per_second, self.burst) {
            (Some(text), _, _) => parse_rate_limit(text)?,
            (None, Some(p), Some(b)) => (p, b),
            (None, None, None) => return Ok(None),
            // clap's `requires` makes these two unreachable; still answer clearly.
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(CliError::usage(
                    "--per-second and --burst must be given together",
                ));
            }
        };
        if per_second == 0 || burst == 0 {
            return Err(CliError::usage(
                "the rate limit's per-second rate and burst must both be at least 1",
            ));
        }
        Ok(Some(json!({"per_second": per_second, "burst": burst})))
    }
}

/// Parses `50/100` into `(per_second, burst)`.
fn parse_rate_limit(text: &str) -> Result<(u32, u32), CliError> {
    let bad = || {
        CliError::usage(format!(
            "--rate-limit must be PER_SECOND/BURST with whole numbers, e.g. 50/100, not {text:?}"
        ))
    };
    let (p, b) = text.split_once('/').ok_or_else(bad)?;
    let p = p.trim().parse::<u32>().map_err(|_| bad())?;
    let b = b.trim().parse::<u32>().map_err(|_| bad())?;
    Ok((p, b))
}

/// Metadata, as repeated `--metadata key=value` or one `--metadata-json`.
#[derive(Debug, Default, Args)]
pub struct MetadataArgs {
    /// A metadata entry KEY=VALUE with a string value (repeatable).
    #[arg(long, value_name = "KEY=VALUE", conflicts_with = "metadata_json")]
    pub metadata: Vec<String>,
    /// The whole metadata as a JSON object, e.g. '{"team": "billing"}'.
    #[arg(long, value_name = "JSON")]
    pub metadata_json: Option<String>,
}

impl MetadataArgs {
    /// The `metadata` object, or `None` when no option was used.
    fn to_json(&self) -> Result<Option<Value>, CliError> {
        if let Some(text) = &self.metadata_json {
            return match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(map)) => Ok(Some(Value::Object(map))),
                Ok(_) => Err(CliError::usage("--metadata-json must be a JSON object")),
                Err(e) => Err(CliError::usage(format!(
                    "--metadata-json is not valid JSON: {e}"
                ))),
            };
        }
        if self.metadata.is_empty() {
            return Ok(None);
        }
        let mut map = Map::new();
        for entry in &self.metadata {
            match entry.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    map.insert(k.trim().to_owned(), Value::String(v.to_owned()));
                }
                _ => {
                    return Err(CliError::usage(format!(
                        "--metadata must be KEY=VALUE with a non-empty key, not {entry:?}"
                    )));
                }
            }
        }
        Ok(Some(Value::Object(map)))
    }
}

/// `keygate keys create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name people recognise, e.g. `ci-deploy`.
    #[arg(long)]
    pub name: String,
    /// Owner (default: the admin token's name).
    #[arg(long)]
    pub owner: Option<String>,
    /// Free text for people, e.g. what the key is for.
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub scopes: ScopeArgs,
    /// read_only (GET, HEAD, OPTIONS) or full.
    #[arg(long, value_enum)]
    pub access: AccessArg,
    /// Lifetime from now, e.g. `30d` (default: the gateway's keys.default_ttl).
    #[arg(long, value_name = "DURATION", conflicts_with_all = ["expires_at", "no_expiry"])]
    pub expires_in: Option<String>,
    /// Expiry as an RFC 3339 date-time, e.g. `2030-01-01T00:00:00Z`.
    #[arg(long, value_name = "RFC3339", conflicts_with = "no_expiry")]
    pub expires_at: Option<String>,
    /// A key that never expires (only allowed when keys.max_ttl is null).
    #[arg(long)]
    pub no_expiry: bool,
    #[command(flatten)]
    pub rate: RateArgs,
    #[command(flatten)]
    pub metadata: MetadataArgs,
}

impl CreateArgs {
    /// The `POST /v1/keys` body.
    pub fn body(&self) -> Result<Value, CliError> {
        let mut b = Map::new();
        b.insert("name".into(), json!(self.name));
        if let Some(owner) = &self.owner {
            b.insert("owner".into(), json!(owner));
        }
        if let Some(d) = &self.description {
            b.insert("description".into(), json!(d));
        }
        b.insert(
            "scopes".into(),
            json!(self.scopes.collect().unwrap_or_default()),
        );
        b.insert("access".into(), json!(self.access.as_str()));
        if let Some(d) = &self.expires_in {
            b.insert("expires_in".into(), json!(d));
        }
        if let Some(at) = &self.expires_at {
            if chrono::DateTime::parse_from_rfc3339(at).is_err() {
                return Err(CliError::usage(format!(
                    "--expires-at must be an RFC 3339 date-time such as 2030-01-01T00:00:00Z, not {at:?}"
                )));
            }
            b.insert("expires_at".into(), json!(at));
        }
        if self.no_expiry {
            b.insert("expires_at".into(), Value::Null);
        }
        if let Some(r) = self.rate.to_json()? {
            b.insert("rate_limit".into(), r);
        }
        if let Some(m) = self.metadata.to_json()? {
            b.insert("metadata".into(), m);
        }
        Ok(Value::Object(b))
    }
}

/// `keygate keys list`.
#[derive(Debug, Clone, Default, Args)]
pub struct ListArgs {
    /// Search in name, id and owner.
    #[arg(long)]
    pub q: Option<String>,
    /// Keys in this status.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Keys of this owner.
    #[arg(long)]
    pub owner: Option<String>,
    /// Keys holding this scope.
    #[arg(long)]
    pub scope: Option<String>,
    /// Keys expiring within this duration, e.g. `30d`.
    #[arg(long, value_name = "DURATION")]
    pub expiring_within: Option<String>,
    /// Keys per page (1 to 1000; the API's default is 50).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Start after this cursor (from a previous page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow next_cursor until the last page.
    #[arg(long)]
    pub all: bool,
}

impl ListArgs {
    /// The query string of `GET /v1/keys` for the page after `cursor`.
    pub fn query(&self, cursor: Option<&str>) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("q", self.q.as_deref()),
            ("status", self.status.map(StatusArg::as_str)),
            ("owner", self.owner.as_deref()),
            ("scope", self.scope.as_deref()),
            ("expiring_within", self.expiring_within.as_deref()),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if let Some(limit) = self.limit {
            q.append_pair("limit", &limit.to_string());
        }
        if let Some(c) = cursor {
            q.append_pair("cursor", c);
        }
        q.finish()
    }
}

/// `keygate keys update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Key id (`key_` followed by a ULID).
    pub id: String,
    /// New name.
    #[arg(long)]
    pub name: Option<String>,
    /// New description; an empty string clears it.
    #[arg(long)]
    pub description: Option<String>,
    /// Scopes replace the key's scopes; `--scopes ''` removes them all.
    #[command(flatten)]
    pub scopes: ScopeArgs,
    #[command(flatten)]
    pub rate: RateArgs,
    /// Remove the key's own rate limit (the gateway default applies).
    #[arg(long, conflicts_with_all = ["rate_limit", "per_second", "burst"])]
    pub no_rate_limit: bool,
    /// Metadata replaces the key's whole metadata.
    #[command(flatten)]
    pub metadata: MetadataArgs,
}

impl UpdateArgs {
    /// The `PATCH /v1/keys/{id}` body: only the fields that were given.
    pub fn body(&self) -> Result<Value, CliError> {
        let mut b = Map::new();
        if let Some(n) = &self.name {
            b.insert("name".into(), json!(n));
        }
        if let Some(d) = &self.description {
            b.insert("description".into(), json!(d));
        }
        if let Some(s) = self.scopes.collect() {
            b.insert("scopes".into(), json!(s));
        }
        if self.no_rate_limit {
            b.insert("rate_limit".into(), Value::Null);
        } else if let Some(r) = self.rate.to_json()? {
            b.insert("rate_limit".into(), r);
        }
        if let Some(m) = self.metadata.to_json()? {
            b.insert("metadata".into(), m);
        }
        if b.is_empty() {
            return Err(CliError::usage(
                "nothing to update: give at least one of --name, --description, --scope/--scopes, --rate-limit/--no-rate-limit or --metadata/--metadata-json",
            ));
        }
        Ok(Value::Object(b))
    }
}

/// `keygate keys revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Key id (`key_` followed by a ULID).
    pub id: String,
    /// Why the key is revoked (kept on the key and in the audit event).
    #[arg(long)]
    pub reason: Option<String>,
}

impl RevokeArgs {
    pub fn body(&self) -> Value {
        match &self.reason {
            Some(r) => json!({"reason": r}),
            None => json!({}),
        }
    }
}

/// `keygate keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Key id (`key_` followed by a ULID).
    pub id: String,
    /// How long the old secret keeps working, e.g. `1h` (default 0: it stops now).
    #[arg(long, value_name = "DURATION")]
    pub grace: Option<String>,
}

impl RotateArgs {
    pub fn body(&self) -> Value {
        match &self.grace {
            Some(g) => json!({"grace": g}),
            None => json!({}),
        }
    }
}

/// Checks a key id before it goes into a URL path.
fn key_path(id: &str, suffix: &str) -> Result<String, CliError> {
    match KeyId::parse(id) {
        Some(id) => Ok(format!("/v1/keys/{id}{suffix}")),
        None => Err(CliError::usage(format!(
            "{id:?} is not a key id: expected key_ followed by a 26-character ULID"
        ))),
    }
}

/// The warning printed on stderr next to a secret.
pub const SECRET_WARNING: &str = "keygate: warning: store this secret now; it is shown only this once and cannot be retrieved again";

/// Pages followed by `list --all` at most, against a server that never ends.
const MAX_PAGES: usize = 100_000;

/// What a command prints: stdout text, then stderr text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

/// Runs one `keygate keys` command and prints its result.
pub async fn run(cmd: KeysCommand) -> Result<(), CliError> {
    let printed = execute(cmd).await?;
    emit(&printed)
}

/// Runs one command and returns what it would print.
pub async fn execute(cmd: KeysCommand) -> Result<Printed, CliError> {
    let KeysCommand { connection, action } = cmd;
    let token = match &connection.token {
        Some(t) if !t.expose().trim().is_empty() => t,
        _ => {
            return Err(CliError::usage(
                "no admin token: pass --token or set KEYGATE_ADMIN_TOKEN",
            ));
        }
    };
    // Check every argument before connecting, so usage errors are exit 2.
    let request = Request::from_action(&action)?;
    let admin_url = match connection.admin_url.trim() {
        "" => DEFAULT_ADMIN_URL,
        url => url,
    };
    let client = AdminClient::new(admin_url, token)?;
    request.perform(&client, connection.json).await
}

/// A checked request, ready to send.
enum Request {
    Create(Value),
    List(ListArgs),
    /// Show, update, revoke, suspend, reinstate: the answer is a key.
    Key {
        method: Method,
        path: String,
        body: Option<Value>,
    },
    Rotate {
        path: String,
        body: Value,
    },
    Delete {
        path: String,
        id: String,
    },
}

impl Request {
    fn from_action(action: &KeysAction) -> Result<Request, CliError> {
        let key = |method, path, body| Request::Key { method, path, body };
        Ok(match action {
            KeysAction::Create(a) => Request::Create(a.body()?),
            KeysAction::List(a) => Request::List(a.clone()),
            KeysAction::Show(a) => key(Method::GET, key_path(&a.id, "")?, None),
            KeysAction::Update(a) => key(Method::PATCH, key_path(&a.id, "")?, Some(a.body()?)),
            KeysAction::Revoke(a) => key(Method::POST, key_path(&a.id, "/revoke")?, Some(a.body())),
            KeysAction::Suspend(a) => {
                key(Method::POST, key_path(&a.id, "/suspend")?, Some(json!({})))
            }
            KeysAction::Reinstate(a) => key(
                Method::POST,
                key_path(&a.id, "/reinstate")?,
                Some(json!({})),
            ),
            KeysAction::Rotate(a) => Request::Rotate {
                path: key_path(&a.id, "/rotate")?,
                body: a.body(),
            },
            KeysAction::Delete(a) => Request::Delete {
                path: key_path(&a.id, "")?,
                id: a.id.clone(),
            },
        })
    }

    async fn perform(self, client: &AdminClient, json_out: bool) -> Result<Printed, CliError> {
        match self {
            Request::Create(body) => {
                let answer = client
                    .send(Method::POST, "/v1/keys", None, Some(&body))
                    .await?;
                with_secret(&answer, json_out)
            }
            Request::Rotate { path, body } => {
                let answer = client.send(Method::POST, &path, None, Some(&body)).await?;
                with_secret(&answer, json_out)
            }
            Request::Key { method, path, body } => {
                let answer = client.send(method, &path, None, body.as_ref()).await?;
                if json_out {
                    return Ok(stdout(answer.text()?));
                }
                let key: KeyDoc = answer.parse()?;
                Ok(stdout(render::key_block(&key)))
            }
            Request::Delete { path, id } => {
                client.send(Method::DELETE, &path, None, None).await?;
                Ok(stdout(if json_out {
                    format!("{}\n", json!({"id": id, "deleted": true}))
                } else {
                    format!("deleted {id}\n")
                }))
            }
            Request::List(args) => list(client, &args, json_out).await,
        }
    }
}

/// `list`: one page, or every page with `--all`.
async fn list(client: &AdminClient, args: &ListArgs, json_out: bool) -> Result<Printed, CliError> {
    let mut cursor = args.cursor.clone();
    let mut items: Vec<Value> = Vec::new();
    let mut seen_cursors = BTreeSet::new();
    for _ in 0..MAX_PAGES {
        let query = args.query(cursor.as_deref());
        let answer = client
            .send(Method::GET, "/v1/keys", Some(&query), None)
            .await?;
        if json_out && !args.all {
            return Ok(stdout(answer.text()?));
        }
        let page: KeyList<Value> = answer.parse()?;
        items.extend(page.items);
        cursor = page.next_cursor;
        match &cursor {
            Some(c) if args.all => {
                if !seen_cursors.insert(c.clone()) {
                    return Err(CliError::Runtime(format!(
                        "the admin API returned the cursor {c:?} twice; stopping to avoid a loop"
                    )));
                }
            }
            _ => break,
        }
    }
    if json_out {
        let doc = json!({"items": items, "next_cursor": cursor});
        return Ok(stdout(format!("{doc:#}\n")));
    }
    let keys = items
        .into_iter()
        .map(serde_json::from_value::<KeyDoc>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            CliError::Runtime(format!(
                "the admin API answered a key list this client does not understand: {e}"
            ))
        })?;
    let mut out = render::key_table(&keys);
    if let Some(c) = &cursor {
        out.push_str(&format!(
            "\nMore keys: run again with --cursor {c} (or use --all).\n"
        ));
    }
    Ok(stdout(out))
}

/// Create and rotate: the key and its secret, with the warning on stderr.
fn with_secret(answer: &Answer, json_out: bool) -> Result<Printed, CliError> {
    let stdout = if json_out {
        answer.text()?
    } else {
        let doc: render::KeyWithSecret = answer.parse()?;
        render::key_with_secret(&doc)
    };
    Ok(Printed {
        stdout,
        stderr: format!("{SECRET_WARNING}\n"),
    })
}

fn stdout(text: String) -> Printed {
    Printed {
        stdout: text,
        stderr: String::new(),
    }
}

/// Writes `printed` to stdout, then stderr. A closed stdout (`| head`) is not
/// an error worth reporting.
fn emit(printed: &Printed) -> Result<(), CliError> {
    let write = |mut w: Box<dyn Write>, text: &str| -> Result<(), CliError> {
        match w.write_all(text.as_bytes()).and_then(|()| w.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(CliError::Runtime(format!("cannot write the output: {e}"))),
        }
    };
    write(Box::new(std::io::stdout().lock()), &printed.stdout)?;
    write(Box::new(std::io::stderr().lock()), &printed.stderr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        keys: KeysCommand,
    }

    fn parse(args: &[&str]) -> KeysCommand {
        let argv = std::iter::once("keys").chain(args.iter().copied());
        TestCli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
            .keys
    }

    fn parse_err(args: &[&str]) -> clap::Error {
        let argv = std::iter::once("keys").chain(args.iter().copied());
        match TestCli::try_parse_from(argv) {
            Ok(c) => panic!("{args:?} should not parse, got {c:?}"),
            Err(e) => e,
        }
    }

    fn create_body(args: &[&str]) -> Result<Value, CliError> {
        match parse(args).action {
            KeysAction::Create(a) => a.body(),
            other => panic!("not create: {other:?}"),
        }
    }

    fn update_body(args: &[&str]) -> Result<Value, CliError> {
        match parse(args).action {
            KeysAction::Update(a) => a.body(),
            other => panic!("not update: {other:?}"),
        }
    }

    const ID: &str = "key_01ARZ3NDEKTSV4RRFFQ69G5FAV";

    #[test]
    fn the_argument_definitions_are_consistent() {
        use clap::CommandFactory;
        TestCli::command().debug_assert();
    }

    #[test]
    fn create_minimal_body() {
        let b = create_body(&["create", "--name", "ci", "--access", "read_only"]).unwrap();
        assert_eq!(
            b,
            json!({"name": "ci", "scopes": [], "access": "read_only"})
        );
    }

    #[test]
    fn create_full_body() {
        let b = create_body(&[
            "create",
            "--name",
            "ci deploy",
            "--owner",
            "team-a",
            "--description",
            "deploys",
            "--scope",
            "orders:read",
            "--scopes",
            "billing, orders:read,,x",
            "--access",
            "full",
            "--expires-in",
            "30d",
            "--rate-limit",
            "50/100",
            "--metadata",
            "team=billing",
            "--metadata",
            "url=https://x/?a=b",
        ])
        .unwrap();
        assert_eq!(
            b,
            json!({
                "name": "ci deploy",
                "owner": "team-a",
                "description": "deploys",
                "scopes": ["orders:read", "billing", "x"],
                "access": "full",
                "expires_in": "30d",
                "rate_limit": {"per_second": 50, "burst": 100},
                "metadata": {"team": "billing", "url": "https://x/?a=b"},
            })
        );
    }

    #[test]
    fn create_expiry_and_rate_variants() {
        let b = create_body(&[
            "create",
            "--name",
            "n",
            "--access",
            "read-only",
            "--expires-at",
            "2030-01-02T03:04:05Z",
            "--per-second",
            "5",
            "--burst",
            "9",
            "--metadata-json",
            r#"{"n": 1, "nested": {"a": [true]}}"#,
        ])
        .unwrap();
        assert_eq!(b["access"], "read_only");
        assert_eq!(b["expires_at"], "2030-01-02T03:04:05Z");
        assert_eq!(b["rate_limit"], json!({"per_second": 5, "burst": 9}));
        assert_eq!(b["metadata"], json!({"n": 1, "nested": {"a": [true]}}));

        let b = create_body(&["create", "--name", "n", "--access", "full", "--no-expiry"]).unwrap();
        assert_eq!(b["expires_at"], Value::Null);
        assert!(b.as_object().unwrap().contains_key("expires_at"));
    }

    #[test]
    fn create_usage_errors() {
        let base = ["create", "--name", "n", "--access", "full"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            create_body(&v).unwrap_err()
        };
        for (extra, needle) in [
            (&["--rate-limit", "50"][..], "PER_SECOND/BURST"),
            (&["--rate-limit", "a/1"][..], "PER_SECOND/BURST"),
            (&["--rate-limit", "0/1"][..], "at least 1"),
            (&["--metadata", "novalue"][..], "KEY=VALUE"),
            (&["--metadata", "=v"][..], "KEY=VALUE"),
            (&["--metadata-json", "[1]"][..], "JSON object"),
            (&["--metadata-json", "{"][..], "not valid JSON"),
            (&["--expires-at", "tomorrow"][..], "RFC 3339"),
        ] {
            let e = with(extra);
            assert_eq!(e.exit_code(), EXIT_USAGE, "{extra:?}");
            assert!(e.to_string().contains(needle), "{extra:?}: {e}");
            assert!(!e.to_string().contains('\n'), "{extra:?}: {e}");
        }
    }

    #[test]
    fn conflicting_and_missing_options_are_clap_errors() {
        for args in [
            &["create", "--name", "n"][..],
            &["create", "--access", "full"],
            &["create", "--name", "n", "--access", "admin"],
            &[
                "create",
                "--name",
                "n",
                "--access",
                "full",
                "--expires-in",
                "1d",
                "--expires-at",
                "2030-01-01T00:00:00Z",
            ],
            &[
                "create",
                "--name",
                "n",
                "--access",
                "full",
                "--rate-limit",
                "1/2",
                "--burst",
                "3",
            ],
            &[
                "create",
                "--name",
                "n",
                "--access",
                "full",
                "--per-second",
                "3",
            ],
            &[
                "create",
                "--name",
                "n",
                "--access",
                "full",
                "--metadata",
                "a=b",
                "--metadata-json",
                "{}",
            ],
            &["update", ID, "--no-rate-limit", "--rate-limit", "1/1"],
            &["list", "--limit", "0"],
            &["list", "--limit", "1001"],
            &["list", "--status", "gone"],
        ] {
            let e = parse_err(args);
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn update_body_has_only_given_fields() {
        let b = update_body(&["update", ID, "--name", "new"]).unwrap();
        assert_eq!(b, json!({"name": "new"}));
        let b = update_body(&[
            "update",
            ID,
            "--scopes",
            "",
            "--no-rate-limit",
            "--description",
            "",
        ])
        .unwrap();
        assert_eq!(
            b,
            json!({"scopes": [], "rate_limit": null, "description": ""})
        );
        let b = update_body(&[
            "update",
            ID,
            "--scope",
            "a",
            "--rate-limit",
            "1/2",
            "--metadata-json",
            "{}",
        ])
        .unwrap();
        assert_eq!(
            b,
            json!({"scopes": ["a"], "rate_limit": {"per_second": 1, "burst": 2}, "metadata": {}})
        );
        let e = update_body(&["update", ID]).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_USAGE);
        assert!(e.to_string().starts_with("nothing to update"), "{e}");
    }

    #[test]
    fn revoke_rotate_bodies() {
        let KeysAction::Revoke(r) = parse(&["revoke", ID, "--reason", "leaked"]).action else {
            panic!("not revoke");
        };
        assert_eq!(r.body(), json!({"reason": "leaked"}));
        let KeysAction::Revoke(r) = parse(&["revoke", ID]).action else {
            panic!("not revoke");
        };
        assert_eq!(r.body(), json!({}));
        let KeysAction::Rotate(r) = parse(&["rotate", ID, "--grace", "1h"]).action else {
            panic!("not rotate");
        };
        assert_eq!(r.body(), json!({"grace": "1h"}));
        let KeysAction::Rotate(r) = parse(&["rotate", ID]).action else {
            panic!("not rotate");
        };
        assert_eq!(r.body(), json!({}));
    }

    #[test]
    fn list_query_encodes_filters() {
        let KeysAction::List(l) = parse(&[
            "list",
            "--q",
            "a b&c",
            "--status",
            "suspended",
            "--owner",
            "ops",
            "--scope",
            "orders:read",
            "--expiring-within",
            "30d",
            "--limit",
            "1000",
        ])
        .action
        else {
            panic!("not list");
        };
        assert_eq!(
            l.query(Some("abc=")),
            "q=a+b%26c&status=suspended&owner=ops&scope=orders%3Aread&expiring_within=30d&limit=1000&cursor=abc%3D"
        );
        assert_eq!(ListArgs::default().query(None), "");
    }

    #[test]
    fn key_ids_are_checked_before_sending() {
        assert_eq!(
            key_path(ID, "/rotate").unwrap(),
            format!("/v1/keys/{ID}/rotate")
        );
        for bad in [
            "",
            "key_",
            "../settings",
            "key_01ARZ3NDEKTSV4RRFFQ69G5FAV/../x",
            "abc",
        ] {
            let e = key_path(bad, "").unwrap_err();
            assert_eq!(e.exit_code(), EXIT_USAGE, "{bad:?}");
        }
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        let c = parse(&["--json", "--admin-url", "https://gw:1", "show", ID]);
        assert!(c.connection.json);
        assert_eq!(c.connection.admin_url, "https://gw:1");
        let c = parse(&["show", ID, "--json", "--token", "t0k"]);
        assert!(c.connection.json);
        assert_eq!(
            c.connection.token.as_ref().map(AdminToken::expose),
            Some("t0k")
        );
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let c = parse(&["--token", "s3cr3t-admin-token", "list"]);
        let shown = format!("{c:?} {:#?}", c);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[tokio::test]
    async fn a_missing_or_blank_token_is_a_usage_error() {
        for args in [&["list"][..], &["--token", " ", "list"]] {
            let mut c = parse(args);
            if args.len() == 1 {
                c.connection.token = None;
            }
            let e = execute(c).await.unwrap_err();
            assert_eq!(e.exit_code(), EXIT_USAGE);
            assert_eq!(
                e.to_string(),
                "no admin token: pass --token or set KEYGATE_ADMIN_TOKEN"
            );
        }
    }

    #[test]
    fn api_errors_read_as_one_sentence() {
        let e = CliError::Api {
            status: 404,
            code: "key_not_found".into(),
            detail: "no key with id \"key_x\"".into(),
        };
        assert_eq!(
            e.to_string(),
            "no key with id \"key_x\" (key_not_found, HTTP 404)"
        );
        assert_eq!(e.exit_code(), EXIT_RUNTIME);
    }
}
