//! API keys: the token format, the stored record and the status rules.
//!
//! A token is `<prefix><32 base62 random chars><6 base62 chars of CRC32>`. The
//! checksum lets the gateway reject typos and guesses without touching the store,
//! and lets secret scanners recognise leaked keys. Only the SHA-256 of the whole
//! token is ever stored ([`TokenHash`]); the secret itself lives in a [`Token`],
//! whose `Debug` and `Display` never print it.
//!
//! This module does no I/O: everything here is pure and unit tested.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use rand::{Rng, TryRngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Number of random base62 characters in a token.
pub const RANDOM_LEN: usize = 32;
/// Number of base62 characters of the CRC32 checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Longest prefix accepted by the config (keeps tokens bounded).
pub const MAX_PREFIX_LEN: usize = 16;

/// A presented or generated API key. The secret never appears in `Debug` or
/// `Display` output; use [`Token::expose`] only to hand it to its owner once.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Generates a new token with `prefix` from the OS CSPRNG.
    pub fn generate(prefix: &str) -> Token {
        let mut rng = rand::rngs::OsRng.unwrap_err();
        let mut s = String::with_capacity(prefix.len() + RANDOM_LEN + CHECKSUM_LEN);
        s.push_str(prefix);
        for _ in 0..RANDOM_LEN {
            // `random_range` is unbiased (rejection sampling).
            s.push(BASE62[rng.random_range(0..62)] as char);
        }
        let crc = crc32fast::hash(s.as_bytes());
        // Every checksum byte comes from BASE62, so it is ASCII.
        s.extend(checksum_chars(crc).iter().map(|&b| b as char));
        Token(s)
    }

    /// Wraps a presented credential without checking it.
    pub fn from_presented(s: &str) -> Token {
        Token(s.to_owned())
    }

    /// The secret itself. Only for returning it to its owner at creation time.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the whole token: the only form in which it is stored.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }

    /// Display hint: the prefix and the last four characters.
    pub fn hint(&self, prefix: &str) -> String {
        let tail = &self.0[self.0.len().saturating_sub(4)..];
        format!("{prefix}…{tail}")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(…redacted)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("…(redacted)")
    }
}

/// Why a presented string is not a well-formed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the key does not start with the configured prefix")]
    WrongPrefix,
    #[error("the key has the wrong length or characters")]
    Malformed,
    #[error("the key's checksum does not match")]
    BadChecksum,
}

/// Checks a presented token's shape and checksum without any I/O.
pub fn check_format(prefix: &str, presented: &str) -> Result<(), FormatError> {
    let rest = presented
        .strip_prefix(prefix)
        .ok_or(FormatError::WrongPrefix)?;
    if rest.len() != RANDOM_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(FormatError::Malformed);
    }
    let body_len = prefix.len() + RANDOM_LEN;
    let expected = checksum_chars(crc32fast::hash(&presented.as_bytes()[..body_len]));
    if expected[..].ct_eq(&presented.as_bytes()[body_len..]).into() {
        Ok(())
    } else {
        Err(FormatError::BadChecksum)
    }
}

/// CRC32 written as 6 base62 digits, most significant first, zero-padded.
/// (No allocation: the data plane runs this on every presented key.)
fn checksum_chars(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

/// SHA-256 of a whole token: the lookup key in the cache and the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<TokenHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(TokenHash(out))
    }

    /// Constant-time equality, for comparing against a presented secret's hash.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not a secret, but a short form keeps logs readable.
        write!(f, "TokenHash({}…)", &self.to_hex()[..12])
    }
}

impl Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TokenHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid token hash"))
    }
}

/// ULIDs that increase within a millisecond: ids made one after the other
/// (keys, events) list in the order they were made, not in the order of
/// their random parts.
pub struct UlidSeq(std::sync::Mutex<ulid::Ulid>);

/// Key ids.
static KEY_IDS: UlidSeq = UlidSeq::new();
/// Event ids (see [`crate::store::Event::new`]).
pub static EVENT_IDS: UlidSeq = UlidSeq::new();

impl UlidSeq {
    pub const fn new() -> UlidSeq {
        UlidSeq(std::sync::Mutex::new(ulid::Ulid::nil()))
    }

    /// A ULID of `at`'s millisecond (now if `None`, read under the lock),
    /// greater than the last one made if that was of the same millisecond.
    /// For an earlier millisecond than the last (a time read before another
    /// caller's, or a clock set back) it is a fresh random ULID of that
    /// millisecond, and the sequence goes on from the later one.
    pub fn at(&self, at: Option<std::time::SystemTime>) -> ulid::Ulid {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = ulid::Ulid::from_datetime(at.unwrap_or_else(std::time::SystemTime::now));
        let id = next_ulid(*last, fresh);
        *last = id.max(*last);
        id
    }
}

impl Default for UlidSeq {
    fn default() -> UlidSeq {
        UlidSeq::new()
    }
}

/// `last` plus one if `fresh` is of the same millisecond, else `fresh`.
fn next_ulid(last: ulid::Ulid, fresh: ulid::Ulid) -> ulid::Ulid {
    match fresh.timestamp_ms() == last.timestamp_ms() {
        // 2^80 ids in one millisecond before this runs out.
        true => last.increment().unwrap_or(fresh),
        false => fresh,
    }
}

/// A key's public identifier: `key_` followed by a ULID.
///
/// Held as the ULID's 16 bytes (big-endian, so their order is the text's),
/// not as text: it is `Copy`, and costs a cached key 16 bytes instead of a
/// 48-byte allocation of its own (a million cached keys: 48 MB; BENCHMARKS.md,
/// memory). Bytes rather than a `u128`, whose 16-byte alignment would pad
/// every struct and map entry holding an id. Its text is made on the stack
/// when needed ([`KeyId::text`]). ULIDs are read in either case and written
/// in upper case, so `key_01arz...` names the same key as `key_01ARZ...`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 16]);

/// The length of a key id's text: `key_` and 26 ULID characters.
const KEY_ID_LEN: usize = 4 + ulid::ULID_LEN;

impl KeyId {
    pub fn generate() -> KeyId {
        KeyId(KEY_IDS.at(None).to_bytes())
    }

    /// Parses a key id as found in a URL; `None` if it is not `key_<ULID>`.
    /// Only the id's own text in either case is read: the ULID decoder also
    /// takes Crockford's aliases (`I`, `L`, `O`) and drops the bits past 128
    /// of a first character above `7`, which would give one key many names.
    pub fn parse(s: &str) -> Option<KeyId> {
        let ulid = s.strip_prefix("key_")?;
        let id = KeyId(ulid::Ulid::from_string(ulid).ok()?.to_bytes());
        id.text().eq_ignore_ascii_case(s).then_some(id)
    }

    /// The id's text, `key_<ULID>`.
    pub fn text(&self) -> KeyIdText {
        let mut ulid = [0u8; ulid::ULID_LEN];
        ulid::Ulid::from_bytes(self.0).array_to_str(&mut ulid);
        let mut text = [0u8; KEY_ID_LEN];
        text[..4].copy_from_slice(b"key_");
        text[4..].copy_from_slice(&ulid);
        KeyIdText(text)
    }
}

/// A key id's text on the stack (see [`KeyId::text`]); reads as a `str`.
#[derive(Clone, Copy)]
pub struct KeyIdText([u8; KEY_ID_LEN]);

impl KeyIdText {
    pub fn as_str(&self) -> &str {
        // `key_` and Crockford base32: ASCII by construction.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for KeyIdText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyId::parse(&s).ok_or_else(|| serde::de::Error::custom("invalid key id (not key_<ULID>)"))
    }
}

/// A permission string held by a key and required by a route.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(Arc<str>);

impl Scope {
    /// Scopes are 1 to 128 characters of `A-Za-z0-9` and `_ . : / -`.
    pub fn parse(s: &str) -> Result<Scope, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')
            });
        if ok {
            Ok(Scope(s.into()))
        } else {
            Err(format!(
                "invalid scope {s:?}: use 1 to 128 characters of letters, digits and _ . : / -"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Scope {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Scope::parse(&s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0.to_string()
    }
}

/// What a key may do: read-only keys may use GET, HEAD and OPTIONS only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    ReadOnly,
    Full,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadOnly => "read_only",
            Access::Full => "full",
        }
    }

    /// Whether this access level allows `method`.
    pub fn allows(self, method: &http::Method) -> bool {
        match self {
            Access::Full => true,
            Access::ReadOnly => matches!(
                *method,
                http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
            ),
        }
    }
}

/// A token-bucket limit: sustained `per_second` with room for `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub per_second: u32,
    pub burst: u32,
}

/// A key's lifecycle status, in order of precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Revoked,
    Suspended,
    Expired,
    Active,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Revoked => "revoked",
            KeyStatus::Suspended => "suspended",
            KeyStatus::Expired => "expired",
            KeyStatus::Active => "active",
        }
    }

    /// The status rule of DESIGN.md section 3, first that applies: revoked,
    /// suspended, expired (`expires_at` has passed), active.
    pub fn at(
        revoked: bool,
        suspended: bool,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> KeyStatus {
        if revoked {
            KeyStatus::Revoked
        } else if suspended {
            KeyStatus::Suspended
        } else if expires_at.is_some_and(|e| e <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    pub fn parse(s: &str) -> Option<KeyStatus> {
        match s {
            "revoked" => Some(KeyStatus::Revoked),
            "suspended" => Some(KeyStatus::Suspended),
            "expired" => Some(KeyStatus::Expired),
            "active" => Some(KeyStatus::Active),
            _ => None,
        }
    }
}

/// A secret replaced by a rotation; it keeps working until `valid_until`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetiredSecret {
    pub hash: TokenHash,
    pub valid_until: DateTime<Utc>,
}

/// The stored key record. Holds hashes, never secrets; see [`KeyView`] for the
/// public JSON form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: KeyId,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub owner: String,
    pub hint: String,
    pub scopes: Vec<Scope>,
    pub access: Access,
    pub rate_limit: Option<RateLimitSpec>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub revocation_reason: Option<String>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspended_by: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// SHA-256 of the current secret.
    pub token_hash: TokenHash,
    /// Secrets replaced by rotations, still indexed so that they answer
    /// `key_revoked` (rotated) once their grace has ended.
    #[serde(default)]
    pub retired: Vec<RetiredSecret>,
    /// Set once the `key.expiring` notice has been sent, so it is sent once.
    #[serde(default)]
    pub expiry_notified_at: Option<DateTime<Utc>>,
    /// Set once the `key.expired` event has been recorded.
    #[serde(default)]
    pub expired_recorded_at: Option<DateTime<Utc>>,
    /// Optimistic-concurrency version, incremented by the store on each write.
    #[serde(default)]
    pub version: u64,
}

/// Why a found key may not be used, as seen by the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Revoked,
    /// The presented secret was replaced by a rotation whose grace has ended.
    Rotated,
    Suspended,
    Expired,
}

impl KeyRecord {
    /// A new active record for the secret `token`: full access, no scopes,
    /// no expiry, nothing revoked or suspended. Callers set what differs.
    pub fn issue(
        token: &Token,
        prefix: &str,
        name: &str,
        owner: &str,
        created_by: &str,
        now: DateTime<Utc>,
    ) -> KeyRecord {
        KeyRecord {
            id: KeyId::generate(),
            name: name.to_owned(),
            description: String::new(),
            owner: owner.to_owned(),
            hint: token.hint(prefix),
            scopes: Vec::new(),
            access: Access::Full,
            rate_limit: None,
            created_at: now,
            created_by: created_by.to_owned(),
            updated_at: now,
            expires_at: None,
            revoked_at: None,
            revoked_by: None,
            revocation_reason: None,
            suspended_at: None,
            suspended_by: None,
            last_used_at: None,
            metadata: Default::default(),
            token_hash: token.hash(),
            retired: Vec::new(),
            expiry_notified_at: None,
            expired_recorded_at: None,
            version: 0,
        }
    }

    /// Status, first that applies: revoked, suspended, expired, active.
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        KeyStatus::at(
            self.revoked_at.is_some(),
            self.suspended_at.is_some(),
            self.expires_at,
            now,
        )
    }

    /// Whether the secret with `hash` may be used at `now`.
    pub fn check(&self, hash: &TokenHash, now: DateTime<Utc>) -> Result<(), Refusal> {
        match self.status(now) {
            KeyStatus::Revoked => return Err(Refusal::Revoked),
            KeyStatus::Suspended => return Err(Refusal::Suspended),
            KeyStatus::Expired => return Err(Refusal::Expired),
            KeyStatus::Active => {}
        }
        if self.token_hash.ct_eq(hash) {
            return Ok(());
        }
        match self.retired.iter().find(|r| r.hash.ct_eq(hash)) {
            Some(r) if r.valid_until > now => Ok(()),
            _ => Err(Refusal::Rotated),
        }
    }

    /// Every hash that indexes this record: the current one and retired ones.
    pub fn all_hashes(&self) -> impl Iterator<Item = &TokenHash> {
        std::iter::once(&self.token_hash).chain(self.retired.iter().map(|r| &r.hash))
    }

    pub fn has_scope(&self, scope: &Scope) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The public JSON form of this record at `now`.
    pub fn view(&self, now: DateTime<Utc>) -> KeyView {
        KeyView {
            id: self.id,
            name: self.name.clone(),
            description: self.description.clone(),
            owner: self.owner.clone(),
            hint: self.hint.clone(),
            scopes: self.scopes.clone(),
            access: self.access,
            rate_limit: self.rate_limit,
            status: self.status(now),
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            revoked_by: self.revoked_by.clone(),
            revocation_reason: self.revocation_reason.clone(),
            suspended_at: self.suspended_at,
            suspended_by: self.suspended_by.clone(),
            last_used_at: self.last_used_at,
            metadata: self.metadata.clone(),
        }
    }
}

/// The `KeyView` JSON of the admin API (DESIGN.md section 3): never the secret or
/// the hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyView {
    pub id: KeyId,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub hint: String,
    pub scopes: Vec<Scope>,
    pub access: Access,
    pub rate_limit: Option<RateLimitSpec>,
    pub status: KeyStatus,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub revocation_reason: Option<String>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspended_by: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// The time source for every time-dependent rule, so tests can move it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// The same instant as [`unix_nanos`] gives it: what the request path
    /// compares and counts with. The system clock answers without building
    /// a calendar date (`Utc::now` costs ~350 instructions, twice per keyed
    /// request).
    fn now_nanos(&self) -> i64 {
        unix_nanos(self.now())
    }
}

/// A time as nanoseconds since the Unix epoch: exact from 1677 to 2262,
/// saturated outside (`i64::MIN`, `i64::MAX - 1`; `i64::MAX` stays free to
/// mean "never").
pub fn unix_nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(match t.timestamp() < 0 {
        true => i64::MIN,
        false => i64::MAX - 1,
    })
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn now_nanos(&self) -> i64 {
        let nanos = |d: std::time::Duration| i64::try_from(d.as_nanos());
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => nanos(after).unwrap_or(i64::MAX - 1),
            Err(before) => nanos(before.duration()).map_or(i64::MIN, |n| -n),
        }
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock(AtomicI64::new(start.timestamp_millis()))
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    pub fn set(&self, to: DateTime<Utc>) {
        self.0.store(to.timestamp_millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0.load(Ordering::SeqCst))
            .single()
            .unwrap_or_else(Utc::now)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clocks_in_nanoseconds_are_their_calendar_time() {
        use super::{Clock, ManualClock, SystemClock, unix_nanos};
        use chrono::{DateTime, Utc};
        let before = unix_nanos(Utc::now());
        let now = SystemClock.now_nanos();
        let after = unix_nanos(Utc::now());
        assert!(before <= now && now <= after, "{before} {now} {after}");
        let manual = ManualClock::new(Utc::now());
        assert_eq!(manual.now_nanos(), unix_nanos(manual.now()));
        assert_eq!(unix_nanos(DateTime::<Utc>::MAX_UTC), i64::MAX - 1);
        assert_eq!(unix_nanos(DateTime::<Utc>::MIN_UTC), i64::MIN);
        assert_eq!(unix_nanos(DateTime::UNIX_EPOCH), 0);
    }

    #[test]
    fn ulids_of_one_millisecond_increase() {
        let at = std::time::SystemTime::now();
        let mut ids = vec![ulid::Ulid::from_datetime(at)];
        for _ in 0..1000 {
            let fresh = ulid::Ulid::from_datetime(at);
            ids.push(super::next_ulid(*ids.last().unwrap(), fresh));
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(
            ids.iter()
                .all(|u| u.timestamp_ms() == ids[0].timestamp_ms())
        );
        // Another millisecond, later or earlier: a fresh id of that one.
        for ms in [60_000i64, -60_000] {
            let other = ulid::Ulid::from_parts((ids[0].timestamp_ms() as i64 + ms) as u64, 7);
            assert_eq!(super::next_ulid(ids[1000], other), other);
        }
        // At the top of one millisecond's range: a fresh random id.
        let top = ulid::Ulid::from_parts(ids[0].timestamp_ms(), (1 << 80) - 1);
        assert_eq!(super::next_ulid(top, ids[0]), ids[0]);

        // A sequence goes on from its latest millisecond.
        let seq = super::UlidSeq::new();
        let a = seq.at(Some(at));
        let early = seq.at(Some(at - std::time::Duration::from_secs(1)));
        assert_eq!(early.timestamp_ms() + 1000, a.timestamp_ms());
        let b = seq.at(Some(at));
        assert_eq!(a.increment(), Some(b));
    }

    use super::*;
    use chrono::Duration;

    #[test]
    fn generated_tokens_pass_their_own_check() {
        for _ in 0..1000 {
            let t = Token::generate("kg_");
            assert_eq!(t.expose().len(), 3 + RANDOM_LEN + CHECKSUM_LEN);
            assert_eq!(check_format("kg_", t.expose()), Ok(()));
        }
    }

    #[test]
    fn checksum_matches_the_documented_algorithm() {
        // CRC32 (IEEE) of prefix + random part, 6 base62 digits, MSB first.
        let body = format!("kg_{}", "a".repeat(32));
        let crc = crc32fast::hash(body.as_bytes());
        let mut digits = Vec::new();
        let mut n = crc;
        for _ in 0..6 {
            digits.push(BASE62[(n % 62) as usize] as char);
            n /= 62;
        }
        digits.reverse();
        let token = format!("{body}{}", digits.iter().collect::<String>());
        assert_eq!(check_format("kg_", &token), Ok(()));
    }

    #[test]
    fn typos_and_foreign_prefixes_are_rejected_without_io() {
        let t = Token::generate("kg_");
        let s = t.expose();
        let mut typo = s.as_bytes().to_vec();
        typo[10] = if typo[10] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(check_format("kg_", &typo), Err(FormatError::BadChecksum));
        assert_eq!(check_format("sk_", s), Err(FormatError::WrongPrefix));
        assert_eq!(
            check_format("kg_", &s[..s.len() - 1]),
            Err(FormatError::Malformed)
        );
        assert_eq!(
            check_format("kg_", &format!("{s}x")),
            Err(FormatError::Malformed)
        );
        let mut bad_char = s.to_owned();
        bad_char.replace_range(5..6, "-");
        assert_eq!(check_format("kg_", &bad_char), Err(FormatError::Malformed));
        assert_eq!(check_format("kg_", ""), Err(FormatError::WrongPrefix));
        assert_eq!(check_format("kg_", "kg_é"), Err(FormatError::Malformed));
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let t = Token::generate("kg_");
        let secret_part = &t.expose()[3..20];
        assert!(!format!("{t:?}").contains(secret_part));
        assert!(!format!("{t}").contains(secret_part));
        assert!(!format!("{:?}", t.hash()).contains(secret_part));
    }

    #[test]
    fn hint_is_prefix_and_last_four() {
        let t = Token::from_presented("kg_abcdefghijklmnopqrstuvwxyz0123456789WXYZ");
        assert_eq!(t.hint("kg_"), "kg_…WXYZ");
    }

    #[test]
    fn hash_round_trips_through_hex() {
        let h = TokenHash::of("kg_x");
        assert_eq!(TokenHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(TokenHash::from_hex("zz"), None);
    }

    #[test]
    fn key_ids_parse_only_their_own_shape() {
        let id = KeyId::generate();
        assert_eq!(KeyId::parse(id.text().as_str()), Some(id));
        assert_eq!(KeyId::parse("key_nope"), None);
        assert_eq!(KeyId::parse("01ARZ3NDEKTSV4RRFFQ69G5FAV"), None);
        // Past the largest ULID.
        assert_eq!(KeyId::parse("key_8ZZZZZZZZZZZZZZZZZZZZZZZZZ"), None);
        // Crockford's aliases of 1 and 0.
        assert_eq!(KeyId::parse("key_0IARZ3NDEKTSV4RRFFQ69G5FAV"), None);
        assert_eq!(KeyId::parse("key_01ARZ3NDEKTSV4RRFFQ69G5FAO"), None);
    }

    #[test]
    fn key_ids_read_either_case_and_write_upper_case() {
        let id = KeyId::parse("key_01arz3ndektsv4rrffq69g5fav").unwrap();
        assert_eq!(id.text().as_str(), "key_01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert_eq!(id.to_string(), "key_01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert_eq!(format!("{id:?}"), "key_01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert_eq!(Some(id), KeyId::parse("key_01ARZ3NDEKTSV4RRFFQ69G5FAV"));
    }

    #[test]
    fn key_ids_are_strings_in_json_and_order_as_their_text() {
        let a = KeyId::parse("key_01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let b = KeyId::parse("key_01BX5ZZKBKACTAV9WEVGEMMVRZ").unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"key_01ARZ3NDEKTSV4RRFFQ69G5FAV\"");
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), a);
        let bad = serde_json::from_str::<KeyId>("\"key_nope\"").unwrap_err();
        assert!(bad.to_string().contains("invalid key id"), "{bad}");
        assert!(a < b && a.text().as_str() < b.text().as_str());
        // No padding in what holds an id (a `u128` would align to 16).
        assert_eq!(std::mem::size_of::<KeyId>(), 16);
        assert_eq!(std::mem::align_of::<KeyId>(), 1);
    }

    #[test]
    fn scopes_are_validated() {
        assert!(Scope::parse("public_api").is_ok());
        assert!(Scope::parse("orders:read").is_ok());
        assert!(Scope::parse("").is_err());
        assert!(Scope::parse("has space").is_err());
        assert!(Scope::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn read_only_allows_only_safe_methods() {
        use http::Method;
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(Access::ReadOnly.allows(&m));
        }
        let purge = Method::from_bytes(b"PURGE").unwrap();
        for m in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            purge,
        ] {
            assert!(!Access::ReadOnly.allows(&m));
            assert!(Access::Full.allows(&m));
        }
    }

    pub(crate) fn record(now: DateTime<Utc>) -> KeyRecord {
        let mut r = KeyRecord::issue(&Token::generate("kg_"), "kg_", "test", "ops", "ops", now);
        r.expires_at = Some(now + Duration::days(1));
        r
    }

    #[test]
    fn status_precedence_is_revoked_suspended_expired_active() {
        let now = Utc::now();
        let mut r = record(now);
        assert_eq!(r.status(now), KeyStatus::Active);
        r.expires_at = Some(now - Duration::seconds(1));
        assert_eq!(r.status(now), KeyStatus::Expired);
        r.suspended_at = Some(now);
        assert_eq!(r.status(now), KeyStatus::Suspended);
        r.revoked_at = Some(now);
        assert_eq!(r.status(now), KeyStatus::Revoked);
        r.expires_at = None;
        r.suspended_at = None;
        assert_eq!(r.status(now), KeyStatus::Revoked);
    }

    #[test]
    fn expiry_is_exact_at_the_boundary() {
        let now = Utc::now();
        let mut r = record(now);
        r.expires_at = Some(now);
        assert_eq!(r.status(now), KeyStatus::Expired);
        assert_eq!(r.status(now - Duration::milliseconds(1)), KeyStatus::Active);
    }

    #[test]
    fn rotated_secret_works_until_grace_then_is_refused_as_rotated() {
        let now = Utc::now();
        let mut r = record(now);
        let old = r.token_hash;
        let new = TokenHash::of("new");
        r.token_hash = new;
        r.retired.push(RetiredSecret {
            hash: old,
            valid_until: now + Duration::hours(1),
        });
        assert_eq!(r.check(&new, now), Ok(()));
        assert_eq!(r.check(&old, now), Ok(()));
        assert_eq!(
            r.check(&old, now + Duration::hours(1)),
            Err(Refusal::Rotated)
        );
        assert_eq!(r.check(&TokenHash::of("other"), now), Err(Refusal::Rotated));
        assert_eq!(r.all_hashes().count(), 2);
    }

    #[test]
    fn key_view_has_no_secret_or_hash() {
        let now = Utc::now();
        let r = record(now);
        let json = serde_json::to_string(&r.view(now)).unwrap();
        assert!(!json.contains(&r.token_hash.to_hex()));
        assert!(!json.contains("token_hash"));
        assert!(json.contains("\"status\":\"active\""));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Utc::now();
        let c = ManualClock::new(start);
        assert_eq!(c.now().timestamp_millis(), start.timestamp_millis());
        c.advance(std::time::Duration::from_secs(60));
        assert_eq!(
            c.now().timestamp_millis(),
            start.timestamp_millis() + 60_000
        );
    }
}
