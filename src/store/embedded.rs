//! Embedded backend: one redb file, the default store for a single instance.
//!
//! Every write is one redb write transaction committed with
//! [`Durability::Immediate`] before the call returns, so a `kill -9` loses nothing
//! that was acknowledged. redb is blocking, so every transaction runs on the
//! blocking pool (`spawn_blocking`) with a clone of the shared `Arc<Database>`.
//! redb allows one writer at a time, which is what makes the owner-cap check in
//! [`KeyStore::create_key`] atomic.
//!
//! Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `records` | key id | JSON of [`KeyRecord`] |
//! | `hash_index` | token hash (32 bytes; current and retired) | key id |
//! | `owner_index` | (owner, key id) | () |
//! | `owner_counts` | owner | number of keys |
//! | `events` | event id (`evt_` + ULID, so time order) | JSON of [`Event`] |
//! | `settings` | `"settings"` | JSON of [`Settings`] |
//! | `usage` | (key id, hour as Unix seconds) | (allowed, denied, rate_limited) |
//! | `last_used` | key id | Unix milliseconds |
//! | `leader` | `"leader"` | JSON `{holder, until_ms}` |
//!
//! `last_used_at` lives in its own table (to the millisecond) and is merged into
//! records on read, so a usage flush never bumps a record's `version` or
//! conflicts with an admin update.
//!
//! Invalidations only need to reach this process: they go out on a local
//! `tokio::sync::broadcast` channel after each committed write.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    Collector, Event, EventFilter, Invalidation, InvalidationBus, KeyStore, ListFilter, ListProbe,
    Page, Settings, StoreError, UsageCounts, UsageDelta, UsageHour, event_prune_bounds, hour_start,
};
use crate::keys::{KeyId, KeyRecord, TokenHash};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const HASHES: TableDefinition<&[u8], &str> = TableDefinition::new("hash_index");
const OWNERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("owner_index");
const OWNER_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("owner_counts");
const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
const USAGE: TableDefinition<(&str, i64), (u64, u64, u64)> = TableDefinition::new("usage");
const LAST_USED: TableDefinition<&str, i64> = TableDefinition::new("last_used");
const LEADER: TableDefinition<&str, &[u8]> = TableDefinition::new("leader");

const SETTINGS_KEY: &str = "settings";
const LEADER_KEY: &str = "leader";

/// The leader lock row.
#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
    until_ms: i64,
}

/// A redb-backed [`KeyStore`] in one file.
pub struct EmbeddedStore {
    db: Arc<Database>,
    invalidations: InvalidationBus,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// redb's own page cache. Its default (1 GiB) would hold a million-key file
/// whole, doubling the process's memory for pages the key cache in front of
/// the store already answers from; reads that miss it go to the operating
/// system's file cache, which is not this process's memory. 16 MiB rather
/// than 64: 50 MB less with a million keys, for cold reads ~12% slower (a
/// key-cache miss reading from a warm file, `cargo bench --bench memory`).
const PAGE_CACHE_BYTES: usize = 16 << 20;

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, creating parent directories.
    ///
    /// Fails with [`StoreError::Unavailable`] naming the file when another
    /// process (or another open handle in this one) holds it: redb locks the file.
    /// Blocking (after a crash redb may repair the file first): call it at
    /// startup or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let db = Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                    "{} is in use by another keygate process",
                    path.display()
                )),
                other => {
                    StoreError::Unavailable(format!("cannot open {}: {other}", path.display()))
                }
            })?;
        // Create every table up front so read transactions never meet a missing one.
        let txn = db.begin_write()?;
        {
            txn.open_table(RECORDS)?;
            txn.open_table(HASHES)?;
            txn.open_table(OWNERS)?;
            txn.open_table(OWNER_COUNTS)?;
            txn.open_table(EVENTS)?;
            txn.open_table(SETTINGS)?;
            txn.open_table(USAGE)?;
            txn.open_table(LAST_USED)?;
            txn.open_table(LEADER)?;
        }
        txn.commit()?;
        let invalidations = InvalidationBus::default();
        Ok(EmbeddedStore {
            db: Arc::new(db),
            invalidations,
            path: path.to_owned(),
        })
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            f(&txn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }

    /// Runs `f` in a write transaction on the blocking pool and commits it
    /// durably; an error from `f` aborts the transaction.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let mut txn = db.begin_write()?;
            // Immediate is redb's default; set it anyway because "acknowledged means
            // on disk" is the promise this store makes (DESIGN.md section 7).
            txn.set_durability(Durability::Immediate)?;
            match f(&txn) {
                Ok(out) => {
                    txn.commit()?;
                    Ok(out)
                }
                Err(e) => {
                    if let Err(abort) = txn.abort() {
                        tracing::warn!(error = %abort, "aborting an embedded store transaction failed");
                    }
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }

    fn notify(&self, inv: Invalidation) {
        self.invalidations.send(inv);
    }
}

fn decode_record(bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("key record: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn load_record(
    records: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<KeyRecord>, StoreError> {
    match records.get(id)? {
        Some(guard) => decode_record(guard.value()).map(Some),
        None => Ok(None),
    }
}

/// Sets `rec.last_used_at` to the later of the record's own and the usage table's.
fn merge_last_used(
    rec: &mut KeyRecord,
    last_used: &impl ReadableTable<&'static str, i64>,
) -> Result<(), StoreError> {
    if let Some(ms) = last_used.get(rec.id.text().as_str())?.map(|g| g.value())
        && let Some(at) = DateTime::<Utc>::from_timestamp_millis(ms)
        && rec.last_used_at.is_none_or(|old| old < at)
    {
        rec.last_used_at = Some(at);
    }
    Ok(())
}

fn load_merged(txn: &ReadTransaction, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let records = txn.open_table(RECORDS)?;
    let Some(mut rec) = load_record(&records, id)? else {
        return Ok(None);
    };
    merge_last_used(&mut rec, &txn.open_table(LAST_USED)?)?;
    Ok(Some(rec))
}

fn insert_event(txn: &WriteTransaction, event: &Event) -> Result<(), StoreError> {
    txn.open_table(EVENTS)?
        .insert(event.id.as_str(), encode(event)?.as_slice())?;
    Ok(())
}

fn add_owner_count(txn: &WriteTransaction, owner: &str, delta: i64) -> Result<u64, StoreError> {
    let mut counts = txn.open_table(OWNER_COUNTS)?;
    let old = counts.get(owner)?.map(|g| g.value()).unwrap_or(0);
    let new = old.saturating_add_signed(delta);
    if new == 0 {
        counts.remove(owner)?;
    } else {
        counts.insert(owner, new)?;
    }
    Ok(new)
}

#[async_trait]
impl KeyStore for EmbeddedStore {
    async fn create_key(
        &self,
        rec: &KeyRecord,
        max_per_owner: u32,
        event: &Event,
    ) -> Result<(), StoreError> {
        let rec = rec.clone();
        let event = event.clone();
        self.write(move |txn| {
            let id = rec.id.text();
            let id = id.as_str();
            let mut records = txn.open_table(RECORDS)?;
            let mut hashes = txn.open_table(HASHES)?;
            if records.get(id)?.is_some() {
                return Err(StoreError::Duplicate);
            }
            for h in rec.all_hashes() {
                if hashes.get(h.0.as_slice())?.is_some() {
                    return Err(StoreError::Duplicate);
                }
            }
            let held = txn
                .open_table(OWNER_COUNTS)?
                .get(rec.owner.as_str())?
                .map(|g| g.value());
            if held.unwrap_or(0) >= u64::from(max_per_owner) {
                return Err(StoreError::OwnerLimit {
                    owner: rec.owner.clone(),
                    limit: max_per_owner,
                });
            }
            records.insert(id, encode(&rec)?.as_slice())?;
            for h in rec.all_hashes() {
                hashes.insert(h.0.as_slice(), id)?;
            }
            txn.open_table(OWNERS)?
                .insert((rec.owner.as_str(), id), ())?;
            add_owner_count(txn, &rec.owner, 1)?;
            insert_event(txn, &event)
        })
        .await
    }

    async fn get_by_hash(&self, hash: &TokenHash) -> Result<Option<KeyRecord>, StoreError> {
        let hash = *hash;
        self.read(move |txn| {
            let id = txn
                .open_table(HASHES)?
                .get(hash.0.as_slice())?
                .map(|g| g.value().to_owned());
            match id {
                Some(id) => load_merged(txn, &id),
                None => Ok(None),
            }
        })
        .await
    }

    async fn get_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = *id;
        self.read(move |txn| load_merged(txn, id.text().as_str()))
            .await
    }

    async fn list_keys(
        &self,
        filter: &ListFilter,
        now: DateTime<Utc>,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let filter = filter.clone();
        self.read(move |txn| {
            let records = txn.open_table(RECORDS)?;
            let last_used = txn.open_table(LAST_USED)?;
            let mut out = Collector::new(filter.limit);
            let after = filter.after.as_ref().map(KeyId::text);
            let after = after.as_deref();
            // Offers the stored record `json` (read within the budget), decoding
            // it whole only when it matches; whether the scan goes on.
            let offer = |out: &mut Collector<KeyRecord>, json: &[u8]| -> Result<bool, StoreError> {
                if !filter.matches_probe(&ListProbe::of(json)?, now) {
                    return Ok(true);
                }
                let mut rec = decode_record(json)?;
                merge_last_used(&mut rec, &last_used)?;
                Ok(out.offer(rec))
            };
            if let Some(owner) = filter.owner.as_deref() {
                // The owner index holds (owner, id) in id order: scan only this owner.
                let owners = txn.open_table(OWNERS)?;
                let start = match after {
                    Some(a) => Bound::Excluded((owner, a)),
                    None => Bound::Included((owner, "")),
                };
                for entry in owners.range::<(&str, &str)>((start, Bound::Unbounded))? {
                    let (key, _) = entry?;
                    let (o, id) = key.value();
                    if o != owner || !out.examine(id) {
                        break;
                    }
                    if let Some(json) = records.get(id)?
                        && !offer(&mut out, json.value())?
                    {
                        break;
                    }
                }
            } else {
                let start = after.map_or(Bound::Unbounded, Bound::Excluded);
                for entry in records.range::<&str>((start, Bound::Unbounded))? {
                    let (id, value) = entry?;
                    if !out.examine(id.value()) || !offer(&mut out, value.value())? {
                        break;
                    }
                }
            }
            Ok(out.page(|r| r.id.to_string()))
        })
        .await
    }

    async fn update_key(
        &self,
        rec: &KeyRecord,
        event: Option<&Event>,
    ) -> Result<KeyRecord, StoreError> {
        let mut new = rec.clone();
        let event = event.cloned();
        let (stored, affected) = self
            .write(move |txn| {
                let id = new.id.text();
                let id = id.as_str();
                let mut records = txn.open_table(RECORDS)?;
                let Some(old) = load_record(&records, id)? else {
                    return Err(StoreError::NotFound);
                };
                if old.version != new.version {
                    return Err(StoreError::Conflict);
                }
                new.version = old.version + 1;
                let old_hashes: BTreeSet<TokenHash> = old.all_hashes().copied().collect();
                let new_hashes: BTreeSet<TokenHash> = new.all_hashes().copied().collect();
                let mut hashes = txn.open_table(HASHES)?;
                for h in new_hashes.difference(&old_hashes) {
                    if hashes.get(h.0.as_slice())?.is_some() {
                        return Err(StoreError::Duplicate);
                    }
                    hashes.insert(h.0.as_slice(), id)?;
                }
                for h in old_hashes.difference(&new_hashes) {
                    hashes.remove(h.0.as_slice())?;
                }
                if old.owner != new.owner {
                    // The owner is not editable through the API; keep the index
                    // right anyway if a caller changes it.
                    let mut owners = txn.open_table(OWNERS)?;
                    owners.remove((old.owner.as_str(), id))?;
                    owners.insert((new.owner.as_str(), id), ())?;
                    add_owner_count(txn, &old.owner, -1)?;
                    add_owner_count(txn, &new.owner, 1)?;
                }
                records.insert(id, encode(&new)?.as_slice())?;
                if let Some(event) = &event {
                    insert_event(txn, event)?;
                }
                merge_last_used(&mut new, &txn.open_table(LAST_USED)?)?;
                let affected: Vec<TokenHash> = old_hashes.union(&new_hashes).copied().collect();
                Ok((new, affected))
            })
            .await?;
        self.notify(Invalidation::Keys(affected));
        Ok(stored)
    }

    async fn delete_key(&self, id: &KeyId, event: &Event) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.text();
        let event = event.clone();
        let deleted = self
            .write(move |txn| {
                let mut records = txn.open_table(RECORDS)?;
                let Some(mut rec) = load_record(&records, id.as_str())? else {
                    return Ok(None);
                };
                records.remove(id.as_str())?;
                let mut hashes = txn.open_table(HASHES)?;
                for h in rec.all_hashes() {
                    let ours = hashes
                        .get(h.0.as_slice())?
                        .is_some_and(|g| g.value() == id.as_str());
                    if ours {
                        hashes.remove(h.0.as_slice())?;
                    }
                }
                txn.open_table(OWNERS)?
                    .remove((rec.owner.as_str(), id.as_str()))?;
                add_owner_count(txn, &rec.owner, -1)?;
                txn.open_table(USAGE)?
                    .retain_in((id.as_str(), i64::MIN)..=(id.as_str(), i64::MAX), |_, _| {
                        false
                    })?;
                let mut last_used = txn.open_table(LAST_USED)?;
                merge_last_used(&mut rec, &last_used)?;
                last_used.remove(id.as_str())?;
                insert_event(txn, &event)?;
                Ok(Some(rec))
            })
            .await?;
        if let Some(rec) = &deleted {
            self.notify(Invalidation::Keys(rec.all_hashes().copied().collect()));
        }
        Ok(deleted)
    }

    async fn count_owner(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        self.read(move |txn| {
            Ok(txn
                .open_table(OWNER_COUNTS)?
                .get(owner.as_str())?
                .map_or(0, |g| g.value()))
        })
        .await
    }

    async fn append_event(&self, event: &Event) -> Result<(), StoreError> {
        let event = event.clone();
        self.write(move |txn| insert_event(txn, &event)).await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Page<Event>, StoreError> {
        let filter = filter.clone();
        self.read(move |txn| {
            let events = txn.open_table(EVENTS)?;
            let start = filter
                .after
                .as_deref()
                .map_or(Bound::Unbounded, Bound::Excluded);
            let mut out = Collector::new(filter.limit);
            for entry in events.range::<&str>((start, Bound::Unbounded))? {
                let (_, value) = entry?;
                let ev: Event = serde_json::from_slice(value.value())
                    .map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
                if filter.matches(&ev) && !out.offer(ev) {
                    break;
                }
            }
            Ok(out.page(|e| e.id.clone()))
        })
        .await
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let Some((lo, hi)) = event_prune_bounds(before) else {
            return Ok(0);
        };
        self.write(move |txn| {
            let mut events = txn.open_table(EVENTS)?;
            let mut dropped = 0u64;
            // Ids below `lo` belong to earlier milliseconds: all go.
            events.retain_in::<&str, _>(..lo.as_str(), |_, _| {
                dropped += 1;
                false
            })?;
            // Ids in `before`'s own millisecond: compare the exact time.
            events.retain_in::<&str, _>(lo.as_str()..hi.as_str(), |_, v| {
                match serde_json::from_slice::<Event>(v) {
                    Ok(ev) if ev.at < before => {
                        dropped += 1;
                        false
                    }
                    _ => true,
                }
            })?;
            Ok(dropped)
        })
        .await
    }

    async fn get_settings(&self) -> Result<Settings, StoreError> {
        self.read(|txn| match txn.open_table(SETTINGS)?.get(SETTINGS_KEY)? {
            Some(g) => serde_json::from_slice(g.value())
                .map_err(|e| StoreError::Corrupt(format!("settings: {e}"))),
            None => Ok(Settings::default()),
        })
        .await
    }

    async fn put_settings(&self, settings: &Settings, event: &Event) -> Result<(), StoreError> {
        let bytes = encode(settings)?;
        let event = event.clone();
        self.write(move |txn| {
            txn.open_table(SETTINGS)?
                .insert(SETTINGS_KEY, bytes.as_slice())?;
            insert_event(txn, &event)
        })
        .await?;
        self.notify(Invalidation::Settings);
        Ok(())
    }

    async fn flush_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = batch.to_vec();
        self.write(move |txn| {
            let records = txn.open_table(RECORDS)?;
            let mut usage = txn.open_table(USAGE)?;
            let mut last_used = txn.open_table(LAST_USED)?;
            for d in &batch {
                let id = d.key_id.text();
                let id = id.as_str();
                // A key deleted since the requests were counted: drop its usage
                // rather than leave orphan rows behind.
                if records.get(id)?.is_none() {
                    continue;
                }
                let c = &d.counts;
                if c.allowed + c.denied + c.rate_limited > 0 {
                    let key = (id, hour_start(d.hour));
                    let (a, b, r) = usage.get(key)?.map_or((0, 0, 0), |g| g.value());
                    let sum = (
                        a.saturating_add(c.allowed),
                        b.saturating_add(c.denied),
                        r.saturating_add(c.rate_limited),
                    );
                    usage.insert(key, sum)?;
                }
                if let Some(at) = d.last_used_at {
                    let ms = at.timestamp_millis();
                    let old = last_used.get(id)?.map(|g| g.value());
                    if old.is_none_or(|old| old < ms) {
                        last_used.insert(id, ms)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn usage(&self, id: &KeyId, since: DateTime<Utc>) -> Result<Vec<UsageHour>, StoreError> {
        let id = id.text();
        self.read(move |txn| {
            let usage = txn.open_table(USAGE)?;
            let from = (id.as_str(), hour_start(since));
            let to = (id.as_str(), i64::MAX);
            let mut out = Vec::new();
            for entry in usage.range(from..=to)? {
                let (key, value) = entry?;
                let (_, hour) = key.value();
                let (allowed, denied, rate_limited) = value.value();
                let Some(hour) = DateTime::<Utc>::from_timestamp(hour, 0) else {
                    continue;
                };
                out.push(UsageHour {
                    hour,
                    counts: UsageCounts {
                        allowed,
                        denied,
                        rate_limited,
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let holder = holder.to_owned();
        self.write(move |txn| {
            let mut table = txn.open_table(LEADER)?;
            let now = Utc::now().timestamp_millis();
            let current: Option<Lease> = match table.get(LEADER_KEY)? {
                // An unreadable lease is treated as absent: it can only block leadership.
                Some(g) => serde_json::from_slice(g.value()).ok(),
                None => None,
            };
            let free = current.is_none_or(|l| l.until_ms <= now || l.holder == holder);
            if free {
                let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
                let lease = Lease {
                    holder,
                    until_ms: now.saturating_add(ttl_ms),
                };
                table.insert(LEADER_KEY, encode(&lease)?.as_slice())?;
            }
            Ok(free)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(SETTINGS)?;
            Ok(())
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.invalidations.subscribe()
    }

    fn invalidations_sent(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        Some(self.invalidations.sent())
    }
}

/// Maps every redb error to a store error: corruption is reported as such,
/// everything else (I/O, a closed database) means the store is unavailable.
fn from_redb(e: redb::Error) -> StoreError {
    match e {
        redb::Error::Corrupted(msg) => StoreError::Corrupt(msg),
        other => StoreError::Unavailable(format!("embedded store: {other}")),
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                from_redb(e.into())
            }
        }
    )*};
}

redb_errors!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError,
    redb::DatabaseError
);
