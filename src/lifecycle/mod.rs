//! Background work off the request path: usage counting and flushing
//! ([`usage`]), the expiry/purge jobs ([`jobs`]) and signed webhooks
//! ([`webhooks`]).
//!
//! [`Lifecycle::spawn`] runs one loop per instance. Every `tick` it makes sure
//! of the leader lock ([`KeyStore::try_lead`]: SET NX PX on Redis, a lease row
//! in the embedded file): a leader renews it every `renew_every`, an instance
//! that is not leader tries every tick, so when a leader dies another takes
//! over at most `lead_ttl + tick` later. Only the leader
//!
//! - runs a [`jobs`] pass every `pass_every` (at once when it becomes leader),
//!   and queues a webhook for each event the pass recorded; and
//! - tails the event log for the other event types (admin changes such as
//!   `key.revoked`, from any instance) and queues their webhooks.
//!
//! The tail starts at the newest event when the instance becomes leader and
//! keeps its position in memory. It re-reads a short window behind its
//! position (events are ordered by their time, and one committed a moment
//! after a later one must not be missed) and remembers the ids it has seen in
//! that window, so each event is queued once by a given leader. Events written
//! while no instance leads, or between a leader's last poll and its death, are
//! not delivered: webhooks are at most once per event cluster-wide, and the
//! lifecycle notices themselves are exactly once (see [`jobs`]).
//!
//! [`KeyStore::try_lead`]: crate::store::KeyStore::try_lead

pub mod jobs;
pub mod usage;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, StoreBackend};
use crate::keys::{Clock, KeyId};
use crate::store::{EventFilter, EventType, SharedStore, StoreError};
pub use jobs::PassReport;
pub use usage::{Outcome, UsageFlusher, UsageRecorder};
pub use webhooks::{Notice, WebhookOptions, Webhooks};

/// How far behind its newest event the tail re-reads.
const TAIL_WINDOW_MS: u64 = 10_000;
/// Events read per page when tailing.
const TAIL_PAGE: usize = 1000;

/// Timing of the lifecycle loop; [`Default`] is the production setting.
#[derive(Clone)]
pub struct LifecycleOptions {
    /// This instance's name in the leader lock.
    pub instance_id: String,
    /// How often the loop wakes: tails events, and (when not leader) tries to
    /// take the lock.
    pub tick: Duration,
    /// How often a leader renews the lock.
    pub renew_every: Duration,
    /// How long the lock lives without renewal.
    pub lead_ttl: Duration,
    /// How often the leader runs a jobs pass.
    pub pass_every: Duration,
    /// Longest a pass may run before it stops and resumes on the next one;
    /// keeps lock renewals on time.
    pub pass_budget: Duration,
    pub webhooks: WebhookOptions,
}

impl Default for LifecycleOptions {
    fn default() -> Self {
        LifecycleOptions {
            instance_id: format!("kg-{}", ulid::Ulid::new()),
            tick: Duration::from_secs(1),
            renew_every: Duration::from_secs(10),
            lead_ttl: Duration::from_secs(30),
            pass_every: Duration::from_secs(30),
            pass_budget: Duration::from_secs(10),
            webhooks: WebhookOptions::default(),
        }
    }
}

impl LifecycleOptions {
    /// The production setting for `cfg`. With the embedded store only one
    /// process can open the file, so the lock holder gets a fixed name: a
    /// restarted process then takes the lease at once instead of waiting for
    /// its previous life's lease to run out.
    pub fn for_config(cfg: &Config) -> LifecycleOptions {
        let mut options = LifecycleOptions::default();
        if matches!(cfg.store.backend, StoreBackend::Embedded { .. }) {
            options.instance_id = "embedded".to_owned();
        }
        options
    }
}

/// The lifecycle jobs, the event tail and the webhook queue of one instance.
pub struct Lifecycle {
    store: SharedStore,
    config: Arc<ArcSwap<Config>>,
    clock: Arc<dyn Clock>,
    options: LifecycleOptions,
    webhooks: Webhooks,
    leader: AtomicBool,
    /// Where the last pass stopped when it ran out of budget.
    resume: Mutex<Option<KeyId>>,
    tail: Mutex<Option<Tail>>,
}

impl Lifecycle {
    pub fn new(
        store: SharedStore,
        config: Arc<ArcSwap<Config>>,
        clock: Arc<dyn Clock>,
        options: LifecycleOptions,
    ) -> Arc<Lifecycle> {
        let webhooks = Webhooks::new(config.clone(), options.webhooks.clone());
        Arc::new(Lifecycle {
            store,
            config,
            clock,
            options,
            webhooks,
            leader: AtomicBool::new(false),
            resume: Mutex::new(None),
            tail: Mutex::new(None),
        })
    }

    /// The webhook queue (start it with [`Webhooks::spawn`] when not using
    /// [`Lifecycle::spawn`]).
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    pub fn instance_id(&self) -> &str {
        &self.options.instance_id
    }

    /// Whether this instance held the leader lock at its last check.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// Starts the webhook dispatcher and the leader loop; the handle finishes
    /// once both stopped after `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let dispatcher = self.webhooks.spawn(shutdown.clone());
        let this = self.clone();
        tokio::spawn(async move {
            this.run(shutdown).await;
            if let Err(e) = dispatcher.await {
                tracing::error!(error = %e, "the webhook dispatcher failed");
            }
        })
    }

    async fn run(&self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.options.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed: Option<Instant> = None;
        let mut last_pass: Option<Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let due_renewal = renewed.is_none_or(|t| t.elapsed() >= self.options.renew_every);
            if !self.is_leader() || due_renewal {
                let leading = self.check_lead().await;
                renewed = leading.then(Instant::now);
                if !leading {
                    last_pass = None;
                    continue;
                }
            }
            if let Err(e) = self.poll_events().await {
                tracing::warn!(error = %e, "lifecycle: reading the event log failed; retrying");
            }
            if last_pass.is_none_or(|t| t.elapsed() >= self.options.pass_every) {
                last_pass = Some(Instant::now());
                if let Err(e) = self.run_pass().await {
                    tracing::warn!(error = %e, "lifecycle pass failed; retrying on the next one");
                }
            }
        }
        self.set_leader(false);
    }

    /// Takes or renews the lock; steps down on any failure.
    async fn check_lead(&self) -> bool {
        let held = match self
            .store
            .try_lead(&self.options.instance_id, self.options.lead_ttl)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                if self.is_leader() {
                    tracing::warn!(error = %e, "lifecycle: cannot renew the leader lock; stepping down");
                }
                false
            }
        };
        self.set_leader(held);
        held
    }

    fn set_leader(&self, leading: bool) {
        let was = self.leader.swap(leading, Ordering::AcqRel);
        if was != leading {
            metrics::gauge!("keygate_lifecycle_leader").set(if leading { 1.0 } else { 0.0 });
            if leading {
                tracing::info!(instance = %self.options.instance_id, "lifecycle: this instance leads the background jobs");
            } else {
                tracing::info!(instance = %self.options.instance_id, "lifecycle: this instance no longer leads");
                // A new term starts the tail at the newest event again.
                *lock(&self.tail) = None;
            }
        }
    }

    /// Runs one jobs pass now (the loop calls it on the leader only; tests call
    /// it directly) and queues the webhooks of the events it recorded.
    pub async fn run_pass(&self) -> Result<PassReport, StoreError> {
        let cfg = self.config.load();
        let policy = jobs::Policy {
            expiry_notice: cfg.keys.expiry_notice,
            purge_expired_after: cfg.keys.purge_expired_after,
        };
        let resume = lock(&self.resume).take();
        let now = self.clock.now();
        let mut recorded = |event, key| {
            self.webhooks.enqueue(Notice {
                event,
                key: Some(key),
            })
        };
        let (report, next) = jobs::run(
            &self.store,
            policy,
            now,
            resume,
            self.options.pass_budget,
            &mut recorded,
        )
        .await?;
        *lock(&self.resume) = next;
        if report != PassReport::default() {
            tracing::debug!(?report, "lifecycle pass");
        }
        Ok(report)
    }

    /// Reads new events and queues webhooks for those the jobs do not deliver
    /// themselves. The first call of a term only notes where the log ends.
    pub async fn poll_events(&self) -> Result<usize, StoreError> {
        let now_ms = u64::try_from(self.clock.now().timestamp_millis()).unwrap_or(0);
        let mut tail = lock(&self.tail).take().unwrap_or_else(|| Tail::new(now_ms));
        let result = tail.poll(&self.store, now_ms).await;
        let mut queued = 0;
        if let Ok(events) = &result {
            for event in events {
                if !delivered_by_jobs(event.kind) {
                    self.webhooks.enqueue(Notice {
                        event: event.clone(),
                        key: None,
                    });
                    queued += 1;
                }
            }
        }
        *lock(&self.tail) = Some(tail);
        result.map(|_| queued)
    }
}

/// Events the jobs queue themselves (with the key) right after recording them.
fn delivered_by_jobs(kind: EventType) -> bool {
    matches!(
        kind,
        EventType::KeyExpiring | EventType::KeyExpired | EventType::KeyPurged
    )
}

/// A poisoned lock only means a panic elsewhere; the plain data is usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tail's position in the event log.
struct Tail {
    /// Time (ms) of the newest event seen, never ahead of the clock.
    newest_ms: u64,
    /// Ids seen within the window, with their time.
    seen: HashMap<String, u64>,
    /// False until the first poll, which only marks what exists as seen.
    primed: bool,
}

impl Tail {
    fn new(now_ms: u64) -> Tail {
        Tail {
            newest_ms: now_ms,
            seen: HashMap::new(),
            primed: false,
        }
    }

    /// Events new since the last poll, oldest first.
    async fn poll(
        &mut self,
        store: &SharedStore,
        now_ms: u64,
    ) -> Result<Vec<crate::store::Event>, StoreError> {
        let floor = self.newest_ms.min(now_ms).saturating_sub(TAIL_WINDOW_MS);
        let mut after = format!("evt_{}", ulid::Ulid::from_parts(floor, 0));
        let mut fresh = Vec::new();
        loop {
            let filter = EventFilter {
                after: Some(after.clone()),
                limit: TAIL_PAGE,
                ..EventFilter::default()
            };
            let page = store.list_events(&filter).await?;
            for ev in page.items {
                let ms = event_ms(&ev.id).unwrap_or(floor);
                self.newest_ms = self.newest_ms.max(ms);
                if self.seen.insert(ev.id.clone(), ms).is_none() && self.primed {
                    fresh.push(ev);
                }
            }
            match page.next {
                Some(next) => after = next,
                None => break,
            }
        }
        self.primed = true;
        let keep_from = self.newest_ms.min(now_ms).saturating_sub(TAIL_WINDOW_MS);
        self.seen.retain(|_, ms| *ms >= keep_from);
        Ok(fresh)
    }
}

/// The millisecond time encoded in an event id (`evt_` + ULID).
fn event_ms(id: &str) -> Option<u64> {
    let ulid = ulid::Ulid::from_string(id.strip_prefix("evt_")?).ok()?;
    Some(ulid.timestamp_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn event_ids_carry_their_time() {
        let at = Utc::now();
        let ev = crate::store::Event::new(
            EventType::KeyRevoked,
            None,
            "ops",
            at,
            serde_json::json!({}),
        );
        assert_eq!(event_ms(&ev.id), Some(at.timestamp_millis() as u64));
        assert_eq!(event_ms("nope"), None);
    }

    #[test]
    fn lifecycle_events_are_not_tailed() {
        assert!(delivered_by_jobs(EventType::KeyExpiring));
        assert!(delivered_by_jobs(EventType::KeyPurged));
        assert!(!delivered_by_jobs(EventType::KeyRevoked));
        assert!(!delivered_by_jobs(EventType::SettingsUpdated));
    }
}
