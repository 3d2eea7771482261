//! A [`KeyStore`] wrapper that measures every call: latency by operation
//! (`keygate_store_call_duration_seconds{op}`) and failures by operation and
//! kind (`keygate_store_call_errors_total{op, kind}`).
//!
//! Only failures of the store itself count as errors (`unavailable`,
//! `corrupt`); answers such as "not found" or "version conflict" are results.
//! Store calls are off the request path except on cache misses, so the
//! per-call label lookup costs nothing that matters next to the round trip.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use super::{
    Event, EventFilter, Invalidation, KeyStore, ListFilter, Page, Settings, SharedStore,
    StoreError, UsageDelta, UsageHour,
};
use crate::keys::{KeyId, KeyRecord, TokenHash};

/// `keygate_store_call_duration_seconds{op}`.
pub const CALL_DURATION: &str = "keygate_store_call_duration_seconds";
/// `keygate_store_call_errors_total{op, kind}`.
pub const CALL_ERRORS: &str = "keygate_store_call_errors_total";

/// The store, measured.
pub struct MeteredStore {
    inner: SharedStore,
}

impl MeteredStore {
    pub fn new(inner: SharedStore) -> MeteredStore {
        MeteredStore { inner }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        metrics::histogram!(CALL_DURATION, "op" => op).record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let kind = match e {
                StoreError::Unavailable(_) => Some("unavailable"),
                StoreError::Corrupt(_) => Some("corrupt"),
                StoreError::Conflict
                | StoreError::OwnerLimit { .. }
                | StoreError::Duplicate
                | StoreError::NotFound => None,
            };
            if let Some(kind) = kind {
                metrics::counter!(CALL_ERRORS, "op" => op, "kind" => kind).increment(1);
            }
        }
        result
    }
}

#[async_trait]
impl KeyStore for MeteredStore {
    async fn create_key(
        &self,
        rec: &KeyRecord,
        max_per_owner: u32,
        event: &Event,
    ) -> Result<(), StoreError> {
        self.timed(
            "create_key",
            self.inner.create_key(rec, max_per_owner, event),
        )
        .await
    }

    async fn get_by_hash(&self, hash: &TokenHash) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("get_by_hash", self.inner.get_by_hash(hash))
            .await
    }

    async fn get_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("get_by_id", self.inner.get_by_id(id)).await
    }

    async fn list_keys(
        &self,
        filter: &ListFilter,
        now: DateTime<Utc>,
    ) -> Result<Page<KeyRecord>, StoreError> {
        self.timed("list_keys", self.inner.list_keys(filter, now))
            .await
    }

    async fn update_key(
        &self,
        rec: &KeyRecord,
        event: Option<&Event>,
    ) -> Result<KeyRecord, StoreError> {
        self.timed("update_key", self.inner.update_key(rec, event))
            .await
    }

    async fn delete_key(&self, id: &KeyId, event: &Event) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("delete_key", self.inner.delete_key(id, event))
            .await
    }

    async fn count_owner(&self, owner: &str) -> Result<u64, StoreError> {
        self.timed("count_owner", self.inner.count_owner(owner))
            .await
    }

    async fn append_event(&self, event: &Event) -> Result<(), StoreError> {
        self.timed("append_event", self.inner.append_event(event))
            .await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Page<Event>, StoreError> {
        self.timed("list_events", self.inner.list_events(filter))
            .await
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.timed("prune_events", self.inner.prune_events(before))
            .await
    }

    async fn get_settings(&self) -> Result<Settings, StoreError> {
        self.timed("get_settings", self.inner.get_settings()).await
    }

    async fn put_settings(&self, settings: &Settings, event: &Event) -> Result<(), StoreError> {
        self.timed("put_settings", self.inner.put_settings(settings, event))
            .await
    }

    async fn flush_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        self.timed("flush_usage", self.inner.flush_usage(batch))
            .await
    }

    async fn usage(&self, id: &KeyId, since: DateTime<Utc>) -> Result<Vec<UsageHour>, StoreError> {
        self.timed("usage", self.inner.usage(id, since)).await
    }

    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.timed("try_lead", self.inner.try_lead(holder, ttl))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.inner.subscribe()
    }

    fn invalidations_sent(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        self.inner.invalidations_sent()
    }
}
