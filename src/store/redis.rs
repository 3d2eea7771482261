//! Redis backend: one store shared by several keygate instances.
//!
//! Every name lives under the configured prefix and shares the hash tag `{kg}`,
//! so all keys land in one Redis Cluster slot and every Lua script (each write is
//! one script or one `MULTI`) is cluster-safe. With `P` = `<prefix>{kg}:`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P rec:<id>` | string | JSON of [`KeyRecord`] |
//! | `P hash:<hex>` | string | key id, for the current and every retired hash |
//! | `P ids` | sorted set, score 0 | every key id (paged with `ZRANGEBYLEX`) |
//! | `P owner:<owner>` | set | the owner's key ids (its size is the owner cap) |
//! | `P events` | sorted set, score 0 | event ids (`evt_` + ULID, so time order) |
//! | `P events:data` | hash | event id -> JSON of [`Event`] |
//! | `P settings` | string | JSON of [`Settings`] |
//! | `P usage:<id>` | hash | `<hour unix secs>:a`/`:d`/`:r` -> allowed/denied/rate-limited |
//! | `P lastused` | hash | key id -> last use, Unix milliseconds |
//! | `P leader` | string with TTL | holder of the background-job lock |
//!
//! and the pub/sub channel `P invalidate`, carrying a JSON [`Invalidation`].
//!
//! Updates compare the stored JSON (compare-and-swap) inside the script, so a
//! concurrent write always turns into [`StoreError::Conflict`] rather than a lost
//! update. `last_used_at` lives in its own hash (to the millisecond) and is
//! merged on read, so usage flushes never bump a record's version.
//!
//! The prefix may not contain `{` or `}`: that would move the hash tag.
//!
//! Invalidations: update, delete and settings scripts `PUBLISH` inside the same
//! script as the write, and the instance that wrote also sends the invalidation
//! on its local channel at once. A background task holds a dedicated pub/sub
//! connection, forwards what it receives, pings it every second to notice a dead
//! or frozen server, tries to resubscribe every 100 ms while it is away, and after
//! a reconnect sends [`Invalidation::All`], since messages may have been missed,
//! as soon as the command connection answers again (flushed before that, every
//! cached key would be re-read from a store this instance cannot reach yet and
//! refused with 503). It stops when the store is dropped.
//!
//! Every round trip is bounded by [`OP_TIMEOUT`]: a dead or stopped server yields
//! [`StoreError::Unavailable`] quickly instead of a hang, and the connection
//! reconnects by itself once the server is back.
//!
//! Redis Cluster (`store.redis.cluster: true`): the commands, pipelines and
//! scripts here are the same; [`RedisConn`] sends all of them to the primary
//! of the `{kg}` slot, and the subscriber listens on that node (see
//! [`super::redis_conn`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{FromRedisValue, RedisError, Script};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use super::redis_conn::OP_TIMEOUT;
use super::redis_conn::{CONNECT_TIMEOUT, HASH_TAG, RedisConn, RedisEndpoint};
use super::{
    Collector, Event, EventFilter, Invalidation, InvalidationBus, KeyStore, ListFilter, ListProbe,
    Page, Settings, StoreError, UsageCounts, UsageDelta, UsageHour, event_prune_bounds, hour_start,
};
use crate::keys::{KeyId, KeyRecord, TokenHash};

/// How often the pub/sub connection is pinged to detect a dead server.
const PUBSUB_PING_EVERY: Duration = Duration::from_secs(1);
/// How long the subscriber waits between attempts to resubscribe: short and
/// constant, not a growing backoff. While it is away this instance hears none
/// of the other instances' revokes, and once Redis answers again they write at
/// once; the subscription must follow within about the 100 ms revocations
/// promise (DESIGN.md section 7; the fault tests in `tests/it/faults.rs` measured
/// 675 ms with a backoff doubling to 5 s). An attempt on a dead server fails at once
/// (refused) or within the connect timeout, so retrying this often is cheap.
const RESUBSCRIBE_EVERY: Duration = Duration::from_millis(100);
/// Of consecutive failed attempts to resubscribe, the first and then every
/// this many are logged as warnings (about every 5 s), the others at debug.
const RESUBSCRIBE_WARN_EVERY: u32 = 50;
/// After resubscribing, how often the command connection is tried until it
/// answers, and how long at most before the caches are flushed regardless.
const COMMANDS_POLL_EVERY: Duration = Duration::from_millis(25);
const FLUSH_WAIT_MAX: Duration = Duration::from_secs(5);
/// Ids fetched per round trip when scanning keys or events.
const SCAN_BATCH: usize = 250;
/// Usage deltas per script call.
const FLUSH_BATCH: usize = 200;
/// Events dropped per prune script call (keeps each call short).
const PRUNE_BATCH: usize = 1000;
/// Attempts of a delete whose compare-and-swap lost to a concurrent write.
const DELETE_ATTEMPTS: usize = 5;

/// Atomic create: duplicate and owner-cap checks, record, indexes, event.
/// KEYS: rec, ids, owner, events, events:data, hash keys...
/// ARGV: record JSON, id, max per owner, event id, event JSON.
const CREATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'DUP' end
for i = 6, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 'DUP' end
end
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return 'LIMIT' end
redis.call('SET', KEYS[1], ARGV[1])
for i = 6, #KEYS do redis.call('SET', KEYS[i], ARGV[2]) end
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], 0, ARGV[4])
redis.call('HSET', KEYS[5], ARGV[4], ARGV[5])
return 'OK'
";

/// Compare-and-swap update with re-indexing, event and publish.
/// KEYS: rec, old owner, new owner, events, events:data, removed hash keys...,
/// added hash keys... ARGV: expected JSON, new JSON, id, event id or '', event
/// JSON, number of removed hash keys, channel, invalidation JSON.
const UPDATE_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'CONFLICT' end
local first_added = 6 + tonumber(ARGV[6])
for i = first_added, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur and cur ~= ARGV[3] then return 'DUP' end
end
for i = 6, first_added - 1 do
  if redis.call('GET', KEYS[i]) == ARGV[3] then redis.call('DEL', KEYS[i]) end
end
for i = first_added, #KEYS do redis.call('SET', KEYS[i], ARGV[3]) end
redis.call('SET', KEYS[1], ARGV[2])
if KEYS[2] ~= KEYS[3] then
  redis.call('SREM', KEYS[2], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[4], 0, ARGV[4])
  redis.call('HSET', KEYS[5], ARGV[4], ARGV[5])
end
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 'OK'
";

/// Compare-and-swap delete of a record with all its indexes and usage.
/// KEYS: rec, ids, owner, usage, lastused, events, events:data, hash keys...
/// ARGV: expected JSON, id, event id, event JSON, channel, invalidation JSON.
/// Returns {status, last used ms or ''}.
const DELETE_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'CONFLICT', ''} end
local last = redis.call('HGET', KEYS[5], ARGV[2])
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
for i = 8, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2] then redis.call('DEL', KEYS[i]) end
end
redis.call('ZADD', KEYS[6], 0, ARGV[3])
redis.call('HSET', KEYS[7], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {'OK', last or ''}
";

/// Adds usage counts of existing keys and advances last-used times.
/// KEYS: lastused, then (rec, usage) per delta. ARGV per delta: id, hour,
/// allowed, denied, rate limited, last used ms or ''.
const FLUSH_LUA: &str = r"
local n = (#KEYS - 1) / 2
for i = 0, n - 1 do
  local rec, usage, b = KEYS[2 + 2 * i], KEYS[3 + 2 * i], 6 * i
  local id, hour = ARGV[b + 1], ARGV[b + 2]
  if redis.call('EXISTS', rec) == 1 then
    if ARGV[b + 3] ~= '0' then redis.call('HINCRBY', usage, hour .. ':a', ARGV[b + 3]) end
    if ARGV[b + 4] ~= '0' then redis.call('HINCRBY', usage, hour .. ':d', ARGV[b + 4]) end
    if ARGV[b + 5] ~= '0' then redis.call('HINCRBY', usage, hour .. ':r', ARGV[b + 5]) end
    local last = ARGV[b + 6]
    if last ~= '' then
      local cur = redis.call('HGET', KEYS[1], id)
      if not cur or tonumber(cur) < tonumber(last) then redis.call('HSET', KEYS[1], id, last) end
    end
  end
end
return n
";

/// Takes the lock if free, renews it if `holder` has it.
/// KEYS: leader. ARGV: holder, ttl ms.
const LEAD_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Drops up to ARGV[2] events with ids below the exclusive lex bound ARGV[1].
/// KEYS: events, events:data.
const PRUNE_LUA: &str = r"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], '-', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
end
return #ids
";

/// Key names under the configured prefix.
#[derive(Clone, Debug)]
struct Layout {
    /// `<prefix>{kg}:`
    base: String,
}

impl Layout {
    fn new(prefix: &str) -> Layout {
        Layout {
            base: format!("{prefix}{HASH_TAG}:"),
        }
    }
    fn rec(&self, id: &str) -> String {
        format!("{}rec:{id}", self.base)
    }
    fn hash(&self, h: &TokenHash) -> String {
        format!("{}hash:{}", self.base, h.to_hex())
    }
    fn ids(&self) -> String {
        format!("{}ids", self.base)
    }
    fn owner(&self, owner: &str) -> String {
        format!("{}owner:{owner}", self.base)
    }
    fn events(&self) -> String {
        format!("{}events", self.base)
    }
    fn events_data(&self) -> String {
        format!("{}events:data", self.base)
    }
    fn settings(&self) -> String {
        format!("{}settings", self.base)
    }
    fn usage(&self, id: &str) -> String {
        format!("{}usage:{id}", self.base)
    }
    fn last_used(&self) -> String {
        format!("{}lastused", self.base)
    }
    fn leader(&self) -> String {
        format!("{}leader", self.base)
    }
    fn channel(&self) -> String {
        format!("{}invalidate", self.base)
    }
}

struct Scripts {
    create: Script,
    update: Script,
    delete: Script,
    flush: Script,
    lead: Script,
    prune: Script,
}

/// A Redis-backed [`KeyStore`], shared by every instance using the same prefix.
pub struct RedisStore {
    conn: RedisConn,
    keys: Layout,
    scripts: Scripts,
    invalidations: InvalidationBus,
    /// Stops the pub/sub task when the store is dropped.
    stop: CancellationToken,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("base", &self.keys.base)
            .finish()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisStore {
    /// Connects to the single Redis at `url`, keeping every name under
    /// `prefix`, and starts the invalidation subscriber. Fails if Redis does not
    /// answer now; later outages are survived (calls fail with
    /// [`StoreError::Unavailable`] until it is back).
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        RedisStore::open(url, false, prefix).await
    }

    /// Like [`RedisStore::connect`] on a Redis Cluster, with `url` naming one
    /// seed node (the others are discovered).
    pub async fn connect_cluster(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        RedisStore::open(url, true, prefix).await
    }

    async fn open(url: &str, cluster: bool, prefix: &str) -> Result<RedisStore, StoreError> {
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Unavailable(format!(
                "redis prefix {prefix:?} must not contain '{{' or '}}' (keygate adds its own hash tag)"
            )));
        }
        // The URL may hold a password: never echo it.
        let endpoint = RedisEndpoint::new(url, cluster).map_err(StoreError::Unavailable)?;
        let conn = bounded(CONNECT_TIMEOUT * 3, endpoint.connect()).await?;
        let keys = Layout::new(prefix);
        let channel = keys.channel();
        let first = bounded(
            CONNECT_TIMEOUT * 2,
            open_subscription(&endpoint, &conn, &channel),
        )
        .await?;
        let invalidations = InvalidationBus::default();
        let stop = CancellationToken::new();
        tokio::spawn(run_subscriber(
            Subscriber {
                endpoint,
                channel,
                commands: conn.clone(),
                local: invalidations.clone(),
                stop: stop.clone(),
            },
            first,
        ));
        Ok(RedisStore {
            conn,
            keys,
            scripts: Scripts {
                create: Script::new(CREATE_LUA),
                update: Script::new(UPDATE_LUA),
                delete: Script::new(DELETE_LUA),
                flush: Script::new(FLUSH_LUA),
                lead: Script::new(LEAD_LUA),
                prune: Script::new(PRUNE_LUA),
            },
            invalidations,
            stop,
        })
    }

    /// Sends a read (retried once on a lost connection).
    async fn read<T: FromRedisValue>(&self, req: Req<'_>) -> Result<T, StoreError> {
        send(&self.conn, req, true).await
    }

    /// Sends a write (never retried: it may have been applied).
    async fn write<T: FromRedisValue>(&self, req: Req<'_>) -> Result<T, StoreError> {
        send(&self.conn, req, false).await
    }

    fn notify(&self, inv: Invalidation) {
        self.invalidations.send(inv);
    }

    /// Reads a record's stored JSON and its last-used time in one round trip.
    async fn load_raw(&self, id: &str) -> Result<Option<(String, KeyRecord)>, StoreError> {
        let (json, last): (Option<String>, Option<i64>) = self
            .read(Req::Pipe(
                redis::pipe()
                    .cmd("GET")
                    .arg(self.keys.rec(id))
                    .cmd("HGET")
                    .arg(self.keys.last_used())
                    .arg(id),
            ))
            .await?;
        let Some(json) = json else {
            return Ok(None);
        };
        let mut rec = decode_record(&json)?;
        merge_last_used(&mut rec, last);
        Ok(Some((json, rec)))
    }

    /// Offers the records of `ids` (one round trip; ids deleted meanwhile are
    /// skipped) that match `filter` to `out`, each counted against its scan
    /// budget and decoded whole only when it matches; whether the scan goes on.
    async fn offer_many(
        &self,
        ids: &[String],
        filter: &ListFilter,
        now: DateTime<Utc>,
        out: &mut Collector<KeyRecord>,
    ) -> Result<bool, StoreError> {
        if ids.is_empty() {
            return Ok(true);
        }
        let rec_keys: Vec<String> = ids.iter().map(|id| self.keys.rec(id)).collect();
        let (jsons, lasts): (Vec<Option<String>>, Vec<Option<i64>>) = self
            .read(Req::Pipe(
                redis::pipe()
                    .cmd("MGET")
                    .arg(&rec_keys)
                    .cmd("HMGET")
                    .arg(self.keys.last_used())
                    .arg(ids),
            ))
            .await?;
        for ((id, json), last) in ids.iter().zip(jsons).zip(lasts) {
            let Some(json) = json else { continue };
            if !out.examine(id) {
                return Ok(false);
            }
            if !filter.matches_probe(&ListProbe::of(json.as_bytes())?, now) {
                continue;
            }
            let mut rec = decode_record(&json)?;
            merge_last_used(&mut rec, last);
            if !out.offer(rec) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One page of ids from a score-0 sorted set, strictly after `after`.
    async fn ids_after(
        &self,
        zset: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        let min = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        self.read(Req::Cmd(
            redis::cmd("ZRANGEBYLEX")
                .arg(zset)
                .arg(min)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(count),
        ))
        .await
    }

    async fn load_events(&self, ids: &[String]) -> Result<Vec<(String, Event)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let jsons: Vec<Option<String>> = self
            .read(Req::Cmd(
                redis::cmd("HMGET").arg(self.keys.events_data()).arg(ids),
            ))
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, json) in ids.iter().zip(jsons) {
            if let Some(json) = json {
                let ev = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
                out.push((id.clone(), ev));
            }
        }
        Ok(out)
    }
}

/// One request, kept by reference so that it can be sent a second time.
enum Req<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
    Script(&'a redis::ScriptInvocation<'a>),
}

impl Req<'_> {
    async fn send<T: FromRedisValue>(&self, mut conn: RedisConn) -> Result<T, RedisError> {
        match self {
            Req::Cmd(c) => c.query_async(&mut conn).await,
            Req::Pipe(p) => p.query_async(&mut conn).await,
            Req::Script(s) => s.invoke_async(&mut conn).await,
        }
    }
}

/// Sends `req`, bounded by [`OP_TIMEOUT`]. With `retry`, a request that failed
/// on a lost connection is sent once more: after a Redis restart the first use
/// of the old connection fails, and the connection has already started a
/// fresh one. Only reads are retried, since a write may have been applied.
async fn send<T: FromRedisValue>(
    conn: &RedisConn,
    req: Req<'_>,
    retry: bool,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OP_TIMEOUT, req.send(conn.clone())).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if retry && e.is_io_error() && !e.is_timeout() => {
            tracing::debug!(error = %e, "redis connection lost; retrying a read once");
            bounded(OP_TIMEOUT, req.send(conn.clone())).await
        }
        Ok(Err(e)) => Err(unavailable(&e)),
        Err(_) => Err(timed_out(OP_TIMEOUT)),
    }
}

fn timed_out(limit: Duration) -> StoreError {
    StoreError::Unavailable(format!(
        "redis did not answer within {} ms",
        limit.as_millis()
    ))
}

/// Runs one Redis round trip with a deadline, mapping failures to
/// [`StoreError::Unavailable`].
async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(&e)),
        Err(_) => Err(timed_out(limit)),
    }
}

/// A short, secret-free description of a Redis failure.
fn unavailable(e: &RedisError) -> StoreError {
    let what = if e.is_timeout() {
        "redis timed out".to_owned()
    } else if e.is_connection_refusal() {
        "redis refused the connection".to_owned()
    } else if e.is_connection_dropped() {
        "redis connection lost".to_owned()
    } else {
        // Commands carry only ids and hashes; cap the length anyway.
        let mut s = format!("redis: {e}");
        if s.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(0);
            s.truncate(cut);
        }
        s
    };
    StoreError::Unavailable(what)
}

fn decode_record(json: &str) -> Result<KeyRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("key record: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn merge_last_used(rec: &mut KeyRecord, ms: Option<i64>) {
    if let Some(at) = ms.and_then(DateTime::<Utc>::from_timestamp_millis)
        && rec.last_used_at.is_none_or(|old| old < at)
    {
        rec.last_used_at = Some(at);
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn create_key(
        &self,
        rec: &KeyRecord,
        max_per_owner: u32,
        event: &Event,
    ) -> Result<(), StoreError> {
        let k = &self.keys;
        let id = rec.id.text();
        let mut inv = self.scripts.create.prepare_invoke();
        inv.key(k.rec(id.as_str()))
            .key(k.ids())
            .key(k.owner(&rec.owner))
            .key(k.events())
            .key(k.events_data());
        for h in rec.all_hashes() {
            inv.key(k.hash(h));
        }
        inv.arg(encode(rec)?)
            .arg(id.as_str())
            .arg(max_per_owner)
            .arg(&event.id)
            .arg(encode(event)?);
        let status: String = self.write(Req::Script(&inv)).await?;
        match status.as_str() {
            "OK" => Ok(()),
            "DUP" => Err(StoreError::Duplicate),
            "LIMIT" => Err(StoreError::OwnerLimit {
                owner: rec.owner.clone(),
                limit: max_per_owner,
            }),
            other => Err(StoreError::Unavailable(format!(
                "unexpected create answer {other:?}"
            ))),
        }
    }

    async fn get_by_hash(&self, hash: &TokenHash) -> Result<Option<KeyRecord>, StoreError> {
        let id: Option<String> = self
            .read(Req::Cmd(redis::cmd("GET").arg(self.keys.hash(hash))))
            .await?;
        match id {
            Some(id) => Ok(self.load_raw(&id).await?.map(|(_, rec)| rec)),
            None => Ok(None),
        }
    }

    async fn get_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.load_raw(id.text().as_str()).await?.map(|(_, rec)| rec))
    }

    async fn list_keys(
        &self,
        filter: &ListFilter,
        now: DateTime<Utc>,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let mut out = Collector::new(filter.limit);
        let after = filter.after.as_ref().map(KeyId::text);
        let after = after.as_deref();
        if let Some(owner) = &filter.owner {
            // At most `max_per_owner` (<= 1000) ids: fetch the set and sort it.
            let mut ids: Vec<String> = self
                .read(Req::Cmd(redis::cmd("SMEMBERS").arg(self.keys.owner(owner))))
                .await?;
            ids.retain(|id| after.is_none_or(|a| id.as_str() > a));
            ids.sort_unstable();
            for chunk in ids.chunks(SCAN_BATCH) {
                if !self.offer_many(chunk, filter, now, &mut out).await? {
                    break;
                }
            }
        } else {
            let zset = self.keys.ids();
            let mut cursor = after.map(str::to_owned);
            loop {
                let ids = self.ids_after(&zset, cursor.as_deref(), SCAN_BATCH).await?;
                let Some(last) = ids.last().cloned() else {
                    break;
                };
                if !self.offer_many(&ids, filter, now, &mut out).await? {
                    break;
                }
                if ids.len() < SCAN_BATCH {
                    break;
                }
                cursor = Some(last);
            }
        }
        Ok(out.page(|r| r.id.to_string()))
    }

    async fn update_key(
        &self,
        rec: &KeyRecord,
        event: Option<&Event>,
    ) -> Result<KeyRecord, StoreError> {
        let id = rec.id.text();
        let Some((stored_json, old)) = self.load_raw(id.as_str()).await? else {
            return Err(StoreError::NotFound);
        };
        if old.version != rec.version {
            return Err(StoreError::Conflict);
        }
        let mut new = rec.clone();
        new.version = old.version + 1;
        let old_hashes: BTreeSet<TokenHash> = old.all_hashes().copied().collect();
        let new_hashes: BTreeSet<TokenHash> = new.all_hashes().copied().collect();
        let removed: Vec<&TokenHash> = old_hashes.difference(&new_hashes).collect();
        let affected: Vec<TokenHash> = old_hashes.union(&new_hashes).copied().collect();
        let invalidation = Invalidation::Keys(affected);

        let k = &self.keys;
        let mut inv = self.scripts.update.prepare_invoke();
        inv.key(k.rec(id.as_str()))
            .key(k.owner(&old.owner))
            .key(k.owner(&new.owner))
            .key(k.events())
            .key(k.events_data());
        for h in &removed {
            inv.key(k.hash(h));
        }
        for h in new_hashes.difference(&old_hashes) {
            inv.key(k.hash(h));
        }
        let (event_id, event_json) = match event {
            Some(e) => (e.id.clone(), encode(e)?),
            None => (String::new(), String::new()),
        };
        inv.arg(&stored_json)
            .arg(encode(&new)?)
            .arg(id.as_str())
            .arg(event_id)
            .arg(event_json)
            .arg(removed.len())
            .arg(k.channel())
            .arg(encode(&invalidation)?);
        let status: String = self.write(Req::Script(&inv)).await?;
        match status.as_str() {
            "OK" => {
                self.notify(invalidation);
                // Keep the merged last-used time the caller read.
                new.last_used_at = new.last_used_at.max(old.last_used_at);
                Ok(new)
            }
            // The stored JSON moved between our read and the script: either a
            // concurrent update (Conflict) or a delete (NotFound).
            "CONFLICT" => match self.load_raw(id.as_str()).await? {
                Some(_) => Err(StoreError::Conflict),
                None => Err(StoreError::NotFound),
            },
            "DUP" => Err(StoreError::Duplicate),
            other => Err(StoreError::Unavailable(format!(
                "unexpected update answer {other:?}"
            ))),
        }
    }

    async fn delete_key(&self, id: &KeyId, event: &Event) -> Result<Option<KeyRecord>, StoreError> {
        let k = &self.keys;
        let id = id.text();
        for _ in 0..DELETE_ATTEMPTS {
            let Some((stored_json, mut rec)) = self.load_raw(id.as_str()).await? else {
                return Ok(None);
            };
            let invalidation = Invalidation::Keys(rec.all_hashes().copied().collect());
            let mut inv = self.scripts.delete.prepare_invoke();
            inv.key(k.rec(id.as_str()))
                .key(k.ids())
                .key(k.owner(&rec.owner))
                .key(k.usage(id.as_str()))
                .key(k.last_used())
                .key(k.events())
                .key(k.events_data());
            for h in rec.all_hashes() {
                inv.key(k.hash(h));
            }
            inv.arg(&stored_json)
                .arg(id.as_str())
                .arg(&event.id)
                .arg(encode(event)?)
                .arg(k.channel())
                .arg(encode(&invalidation)?);
            let (status, last): (String, String) = self.write(Req::Script(&inv)).await?;
            match status.as_str() {
                "OK" => {
                    self.notify(invalidation);
                    merge_last_used(&mut rec, last.parse().ok());
                    return Ok(Some(rec));
                }
                "CONFLICT" => continue,
                other => {
                    return Err(StoreError::Unavailable(format!(
                        "unexpected delete answer {other:?}"
                    )));
                }
            }
        }
        Err(StoreError::Conflict)
    }

    async fn count_owner(&self, owner: &str) -> Result<u64, StoreError> {
        self.read(Req::Cmd(redis::cmd("SCARD").arg(self.keys.owner(owner))))
            .await
    }

    async fn append_event(&self, event: &Event) -> Result<(), StoreError> {
        self.write(Req::Pipe(
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(self.keys.events())
                .arg(0)
                .arg(&event.id)
                .ignore()
                .cmd("HSET")
                .arg(self.keys.events_data())
                .arg(&event.id)
                .arg(encode(event)?)
                .ignore(),
        ))
        .await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Page<Event>, StoreError> {
        let zset = self.keys.events();
        let mut out = Collector::new(filter.limit);
        let mut cursor = filter.after.clone();
        'scan: loop {
            let ids = self.ids_after(&zset, cursor.as_deref(), SCAN_BATCH).await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            for (_, ev) in self.load_events(&ids).await? {
                if filter.matches(&ev) && !out.offer(ev) {
                    break 'scan;
                }
            }
            if ids.len() < SCAN_BATCH {
                break;
            }
            cursor = Some(last);
        }
        Ok(out.page(|e| e.id.clone()))
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let Some((lo, hi)) = event_prune_bounds(before) else {
            return Ok(0);
        };
        let (events, data) = (self.keys.events(), self.keys.events_data());
        let mut dropped = 0u64;
        // Earlier milliseconds: whole batches, each one short script.
        loop {
            let n: u64 = self
                .write(Req::Script(
                    self.scripts
                        .prune
                        .key(&events)
                        .key(&data)
                        .arg(format!("({lo}"))
                        .arg(PRUNE_BATCH),
                ))
                .await?;
            dropped += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        // `before`'s own millisecond: compare exact times.
        let ids: Vec<String> = self
            .read(Req::Cmd(
                redis::cmd("ZRANGEBYLEX")
                    .arg(&events)
                    .arg(format!("[{lo}"))
                    .arg(format!("({hi}")),
            ))
            .await?;
        let old: Vec<String> = self
            .load_events(&ids)
            .await?
            .into_iter()
            .filter(|(_, ev)| ev.at < before)
            .map(|(id, _)| id)
            .collect();
        if !old.is_empty() {
            self.write::<()>(Req::Pipe(
                redis::pipe()
                    .atomic()
                    .cmd("ZREM")
                    .arg(&events)
                    .arg(&old)
                    .ignore()
                    .cmd("HDEL")
                    .arg(&data)
                    .arg(&old)
                    .ignore(),
            ))
            .await?;
            dropped += old.len() as u64;
        }
        Ok(dropped)
    }

    async fn get_settings(&self) -> Result<Settings, StoreError> {
        let json: Option<String> = self
            .read(Req::Cmd(redis::cmd("GET").arg(self.keys.settings())))
            .await?;
        match json {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("settings: {e}"))),
            None => Ok(Settings::default()),
        }
    }

    async fn put_settings(&self, settings: &Settings, event: &Event) -> Result<(), StoreError> {
        let invalidation = Invalidation::Settings;
        self.write::<()>(Req::Pipe(
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(self.keys.settings())
                .arg(encode(settings)?)
                .ignore()
                .cmd("ZADD")
                .arg(self.keys.events())
                .arg(0)
                .arg(&event.id)
                .ignore()
                .cmd("HSET")
                .arg(self.keys.events_data())
                .arg(&event.id)
                .arg(encode(event)?)
                .ignore()
                .cmd("PUBLISH")
                .arg(self.keys.channel())
                .arg(encode(&invalidation)?)
                .ignore(),
        ))
        .await?;
        self.notify(invalidation);
        Ok(())
    }

    async fn flush_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        for chunk in batch.chunks(FLUSH_BATCH) {
            let mut inv = self.scripts.flush.prepare_invoke();
            inv.key(self.keys.last_used());
            for d in chunk {
                let id = d.key_id.text();
                let id = id.as_str();
                inv.key(self.keys.rec(id)).key(self.keys.usage(id));
                inv.arg(id)
                    .arg(hour_start(d.hour))
                    .arg(d.counts.allowed)
                    .arg(d.counts.denied)
                    .arg(d.counts.rate_limited)
                    .arg(
                        d.last_used_at
                            .map_or_else(String::new, |t| t.timestamp_millis().to_string()),
                    );
            }
            self.write::<u64>(Req::Script(&inv)).await?;
        }
        Ok(())
    }

    async fn usage(&self, id: &KeyId, since: DateTime<Utc>) -> Result<Vec<UsageHour>, StoreError> {
        let fields: HashMap<String, u64> = self
            .read(Req::Cmd(
                redis::cmd("HGETALL").arg(self.keys.usage(id.text().as_str())),
            ))
            .await?;
        let from = hour_start(since);
        let mut hours: BTreeMap<i64, UsageCounts> = BTreeMap::new();
        for (field, n) in fields {
            let Some((hour, kind)) = field.split_once(':') else {
                continue;
            };
            let Ok(hour) = hour.parse::<i64>() else {
                continue;
            };
            if hour < from {
                continue;
            }
            let c = hours.entry(hour).or_default();
            match kind {
                "a" => c.allowed = n,
                "d" => c.denied = n,
                "r" => c.rate_limited = n,
                _ => {}
            }
        }
        Ok(hours
            .into_iter()
            .filter_map(|(hour, counts)| {
                DateTime::<Utc>::from_timestamp(hour, 0).map(|hour| UsageHour { hour, counts })
            })
            .collect())
    }

    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let held: i64 = self
            .write(Req::Script(
                self.scripts
                    .lead
                    .key(self.keys.leader())
                    .arg(holder)
                    .arg(ttl_ms),
            ))
            .await?;
        Ok(held == 1)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read::<String>(Req::Cmd(&redis::cmd("PING")))
            .await
            .map(|_| ())
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.invalidations.subscribe()
    }

    fn invalidations_sent(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        Some(self.invalidations.sent())
    }
}

/// Opens a dedicated pub/sub connection subscribed to `channel`, on the node
/// [`RedisEndpoint::pubsub_client`] picks (asked through `commands`).
async fn open_subscription(
    endpoint: &RedisEndpoint,
    commands: &RedisConn,
    channel: &str,
) -> Result<(PubSubSink, PubSubStream), RedisError> {
    let client = endpoint.pubsub_client(commands).await?;
    let (mut sink, stream) = client.get_async_pubsub().await?.split();
    sink.subscribe(channel).await?;
    Ok((sink, stream))
}

/// What the pub/sub task needs.
struct Subscriber {
    endpoint: RedisEndpoint,
    channel: String,
    /// The store's command connection, warmed up after a reconnect (and, on a
    /// cluster, asked which node to subscribe on).
    commands: RedisConn,
    local: InvalidationBus,
    stop: CancellationToken,
}

/// Forwards invalidations from Redis to the local channel until `stop`, keeping
/// the subscription alive across disconnects (see the module docs).
async fn run_subscriber(sub: Subscriber, first: (PubSubSink, PubSubStream)) {
    let Subscriber {
        endpoint,
        channel,
        commands,
        local,
        stop,
    } = sub;
    let mut next = Some(first);
    let mut failures: u32 = 0;
    loop {
        let conn = match next.take() {
            Some(conn) => Some(conn),
            None => {
                let attempt = bounded(
                    CONNECT_TIMEOUT * 2,
                    open_subscription(&endpoint, &commands, &channel),
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    res = attempt => match res {
                        Ok(conn) => {
                            tracing::info!("redis pub/sub reconnected; flushing caches");
                            // Messages sent while we were away are lost, so the caches
                            // are flushed, but not before this instance can read the
                            // store again: the reloads that follow the flush would fail
                            // and refuse every cached key. Messages that arrive meanwhile
                            // wait on the new subscription.
                            if !commands_answer(&commands, &stop).await {
                                return;
                            }
                            local.send(Invalidation::All);
                            Some(conn)
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            if failures % RESUBSCRIBE_WARN_EVERY == 1 {
                                tracing::warn!(error = %e, failures, "redis pub/sub reconnect failed");
                            } else {
                                tracing::debug!(error = %e, failures, "redis pub/sub reconnect failed");
                            }
                            None
                        }
                    }
                }
            }
        };
        if let Some((sink, stream)) = conn {
            failures = 0;
            match pump(sink, stream, &local, &stop).await {
                Pumped::Stopped => return,
                Pumped::Lost(why) => tracing::warn!(reason = why, "redis pub/sub connection lost"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RESUBSCRIBE_EVERY) => {}
        }
    }
}

/// Waits until the command connection answers a PING, trying every
/// [`COMMANDS_POLL_EVERY`] for at most [`FLUSH_WAIT_MAX`]; false if `stop`
/// fired first.
async fn commands_answer(commands: &RedisConn, stop: &CancellationToken) -> bool {
    let started = tokio::time::Instant::now();
    loop {
        let ping = Req::Cmd(&redis::cmd("PING"));
        match send::<String>(commands, ping, true).await {
            Ok(_) => return true,
            Err(e) if started.elapsed() >= FLUSH_WAIT_MAX => {
                tracing::warn!(error = %e, "redis commands still failing; flushing caches anyway");
                return true;
            }
            Err(e) => tracing::debug!(error = %e, "redis commands not back yet"),
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(COMMANDS_POLL_EVERY) => {}
        }
    }
}

enum Pumped {
    Stopped,
    Lost(&'static str),
}

/// Forwards messages from one subscription until it fails or `stop`.
async fn pump(
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    local: &InvalidationBus,
    stop: &CancellationToken,
) -> Pumped {
    let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Pumped::Stopped,
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return Pumped::Lost("stream closed");
                };
                match serde_json::from_slice::<Invalidation>(msg.get_payload_bytes()) {
                    Ok(inv) => local.send(inv),
                    Err(e) => tracing::warn!(error = %e, "ignoring an undecodable invalidation"),
                }
            }
            _ = ping.tick() => {
                let alive = tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return Pumped::Lost("ping failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes (CLUSTER KEYSLOT rules).
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{')
            && let Some(len) = key[open + 1..].find('}')
            && len > 0
        {
            return &key[open + 1..open + 1 + len];
        }
        key
    }

    #[test]
    fn every_name_shares_one_hash_tag() {
        let k = Layout::new("keygate:");
        let h = TokenHash::of("kg_x");
        let names = [
            k.rec("key_01"),
            k.hash(&h),
            k.ids(),
            k.owner("team {a}"),
            k.events(),
            k.events_data(),
            k.settings(),
            k.usage("key_01"),
            k.last_used(),
            k.leader(),
            k.channel(),
        ];
        for name in &names {
            assert!(name.starts_with("keygate:{kg}:"), "{name}");
            assert_eq!(hash_tag(name), "kg", "{name}");
        }
    }

    #[test]
    fn hours_and_prune_bounds() {
        let t = DateTime::<Utc>::from_timestamp(7200 + 59 * 60 + 59, 999).unwrap();
        assert_eq!(hour_start(t), 7200);
        let before = DateTime::<Utc>::from_timestamp_millis(1_700_000_000_123).unwrap();
        let (lo, hi) = event_prune_bounds(before).unwrap();
        let at_ms = |ms| {
            Event::new(
                super::super::EventType::KeyUpdated,
                None,
                "t",
                DateTime::<Utc>::from_timestamp_millis(ms).unwrap(),
                serde_json::Value::Null,
            )
            .id
        };
        assert!(at_ms(1_700_000_000_122) < lo);
        assert!(lo <= at_ms(1_700_000_000_123) && at_ms(1_700_000_000_123) < hi);
        assert!(hi <= at_ms(1_700_000_000_124));
        let ancient = DateTime::<Utc>::from_timestamp(-1, 0).unwrap();
        assert_eq!(event_prune_bounds(ancient), None);
    }

    #[test]
    fn errors_never_echo_the_url() {
        let e = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            unavailable(&e).to_string(),
            "store unavailable: redis refused the connection"
        );
    }
}
