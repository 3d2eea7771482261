//! Signed webhook delivery (`notifications.webhooks[]`, DESIGN.md section 6).
//!
//! [`Webhooks::enqueue`] hands an event to a bounded in-memory queue and returns
//! at once: it never blocks the request path or an admin answer, and when the
//! queue is full the event is dropped with an error log. A dispatcher task reads
//! the queue, picks the targets from the *live* config (so reloads apply to the
//! next event) whose `events` list the event's type, and starts one delivery
//! task per target, at most [`WebhookOptions::max_in_flight`] at a time.
//!
//! Each request is a `POST` with the JSON body `{id, at, type, key_id, actor,
//! details, key?}` (the [`Event`] plus, for key events, the key's
//! [`KeyView`] at that moment) and the headers:
//!
//! | header | value |
//! |---|---|
//! | `Content-Type` | `application/json` |
//! | `X-Keygate-Signature` | `sha256=<hex HMAC-SHA256 of the exact body>`, keyed with the value of the env var named by `secret_env` |
//! | `X-Keygate-Timestamp` | Unix seconds when this attempt was sent |
//! | `X-Keygate-Event` | the event type, e.g. `key.expiring` |
//! | `X-Keygate-Delivery` | `dlv_<ULID>`, the same on every retry of one delivery |
//!
//! As DESIGN.md says, the signature covers the body only; the timestamp header
//! is not signed. Receivers stop replays with the signed body fields: `id` is
//! unique per event (remember the ids seen) and `at` is the event time (refuse
//! events older than the window you keep ids for).
//!
//! Outcomes: any 2xx is delivered; 408, 429, 5xx, connection errors and
//! timeouts are retried with exponential backoff and full jitter (a random wait
//! up to 1 s, doubling, capped at 5 min) for at least an hour, then given up
//! with an error log; any other status is given up at once. A missing secret
//! env var is logged once and nothing is sent unsigned. The queue is in memory:
//! deliveries still retrying when keygate stops are abandoned (logged).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, WebhookConfig};
use crate::keys::KeyView;
use crate::store::{Event, EventType};

pub const SIGNATURE_HEADER: &str = "x-keygate-signature";
pub const TIMESTAMP_HEADER: &str = "x-keygate-timestamp";
pub const EVENT_HEADER: &str = "x-keygate-event";
pub const DELIVERY_HEADER: &str = "x-keygate-delivery";

/// Looks up a webhook secret by env var name; `None` when it is not set.
pub type SecretLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Tuning of webhook delivery; [`Default`] is the production setting.
#[derive(Clone)]
pub struct WebhookOptions {
    /// Events waiting for the dispatcher; more are dropped with an error log.
    pub queue: usize,
    /// Deliveries (including those waiting to retry) at a time.
    pub max_in_flight: usize,
    /// Ceiling of the first retry's random wait; doubles per attempt.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Retrying stops once this long has passed since the first attempt.
    pub retry_for: Duration,
    /// Bound on one attempt (connect, send, response head).
    pub attempt_timeout: Duration,
    /// Where secrets come from: the process environment by default.
    pub secrets: SecretLookup,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            queue: 1024,
            max_in_flight: 1000,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            retry_for: Duration::from_secs(3600),
            attempt_timeout: Duration::from_secs(10),
            secrets: Arc::new(|name| std::env::var(name).ok()),
        }
    }
}

/// An event to deliver, with the key it is about when there is one.
#[derive(Clone, Debug)]
pub struct Notice {
    pub event: Event,
    pub key: Option<KeyView>,
}

/// The webhook body: the event's fields, plus the key.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(flatten)]
    event: &'a Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a KeyView>,
}

type WebhookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The webhook queue and its dispatcher.
pub struct Webhooks {
    tx: mpsc::Sender<Notice>,
    rx: Mutex<Option<mpsc::Receiver<Notice>>>,
    deliverer: Arc<Deliverer>,
}

impl Webhooks {
    /// A queue delivering to the targets of the live `config`. Nothing is sent
    /// until [`Webhooks::spawn`].
    pub fn new(config: Arc<ArcSwap<Config>>, options: WebhookOptions) -> Webhooks {
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        Webhooks {
            tx,
            rx: Mutex::new(Some(rx)),
            deliverer: Arc::new(Deliverer {
                config,
                client: build_client(),
                options,
                reported_missing: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Whether any configured webhook wants events of type `kind`.
    pub fn wants(&self, kind: EventType) -> bool {
        self.deliverer
            .config
            .load()
            .notifications
            .webhooks
            .iter()
            .any(|w| subscribed(w, kind))
    }

    /// Queues `notice` for delivery without waiting; drops it (with an error
    /// log) when the queue is full or the dispatcher has stopped.
    pub fn enqueue(&self, notice: Notice) {
        if !self.wants(notice.event.kind) {
            return;
        }
        let (id, kind) = (notice.event.id.clone(), notice.event.kind);
        if let Err(e) = self.tx.try_send(notice) {
            metrics::counter!("keygate_webhook_deliveries_total", "result" => "dropped")
                .increment(1);
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the webhook queue is full",
                mpsc::error::TrySendError::Closed(_) => "the webhook dispatcher has stopped",
            };
            tracing::error!(event_id = %id, event = kind.as_str(), "webhook not sent: {why}");
        }
    }

    /// Starts the dispatcher; it stops when `shutdown` fires, abandoning
    /// deliveries still waiting to retry. Only the first call starts one.
    pub fn spawn(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let deliverer = self.deliverer.clone();
        tokio::spawn(async move {
            match rx {
                Some(rx) => dispatch(rx, deliverer, shutdown).await,
                None => tracing::warn!("the webhook dispatcher was already started"),
            }
        })
    }
}

fn subscribed(w: &WebhookConfig, kind: EventType) -> bool {
    w.events.iter().any(|e| e == kind.as_str())
}

/// Reads the queue and starts one delivery task per matching target.
async fn dispatch(
    mut rx: mpsc::Receiver<Notice>,
    deliverer: Arc<Deliverer>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(deliverer.options.max_in_flight.max(1)));
    'queue: loop {
        let notice = tokio::select! {
            () = shutdown.cancelled() => break,
            n = rx.recv() => match n {
                Some(n) => n,
                None => break,
            },
        };
        let targets: Vec<WebhookConfig> = deliverer
            .config
            .load()
            .notifications
            .webhooks
            .iter()
            .filter(|w| subscribed(w, notice.event.kind))
            .cloned()
            .collect();
        if targets.is_empty() {
            continue;
        }
        let payload = Payload {
            event: &notice.event,
            key: notice.key.as_ref(),
        };
        let body = match serde_json::to_vec(&payload) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(event_id = %notice.event.id, error = %e, "cannot encode a webhook body");
                continue;
            }
        };
        for target in targets {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break 'queue,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    // The semaphore is never closed.
                    Err(_) => break 'queue,
                },
            };
            let job = Delivery {
                target,
                kind: notice.event.kind,
                event_id: notice.event.id.clone(),
                body: body.clone(),
                delivery_id: format!("dlv_{}", ulid::Ulid::new()),
            };
            let deliverer = deliverer.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                deliverer.deliver(job, shutdown).await;
                drop(permit);
            });
        }
    }
    tracker.close();
    if !tracker.is_empty() {
        tracing::warn!(
            deliveries = tracker.len(),
            "stopping: abandoning webhook deliveries still in flight or waiting to retry"
        );
    }
    tracker.wait().await;
}

/// One event to one target.
struct Delivery {
    target: WebhookConfig,
    kind: EventType,
    event_id: String,
    body: Bytes,
    delivery_id: String,
}

/// What one attempt came to.
enum Attempt {
    Delivered(StatusCode),
    Retry(String),
    GiveUp(String),
}

struct Deliverer {
    config: Arc<ArcSwap<Config>>,
    client: WebhookClient,
    options: WebhookOptions,
    /// Env var names already reported missing (logged once each).
    reported_missing: Mutex<HashSet<String>>,
}

impl Deliverer {
    /// Attempts `job` until it is delivered, refused, out of time or shut down.
    async fn deliver(&self, job: Delivery, shutdown: CancellationToken) {
        let started = Instant::now();
        let target = target_name(&job.target);
        let Some(secret) = self.secret(&job.target.secret_env) else {
            metrics::counter!("keygate_webhook_deliveries_total", "result" => "no_secret")
                .increment(1);
            return;
        };
        for attempt in 1u32.. {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                o = self.attempt(&job, &secret) => o,
            };
            let why = match outcome {
                Attempt::Delivered(status) => {
                    metrics::counter!("keygate_webhook_deliveries_total", "result" => "delivered")
                        .increment(1);
                    tracing::debug!(%target, event = job.kind.as_str(), event_id = %job.event_id,
                        delivery = %job.delivery_id, attempt, status = status.as_u16(), "webhook delivered");
                    return;
                }
                Attempt::GiveUp(why) => {
                    metrics::counter!("keygate_webhook_deliveries_total", "result" => "failed")
                        .increment(1);
                    tracing::error!(%target, event = job.kind.as_str(), event_id = %job.event_id,
                        delivery = %job.delivery_id, attempt, "webhook refused, not retrying: {why}");
                    return;
                }
                Attempt::Retry(why) => why,
            };
            if started.elapsed() >= self.options.retry_for {
                metrics::counter!("keygate_webhook_deliveries_total", "result" => "failed")
                    .increment(1);
                tracing::error!(%target, event = job.kind.as_str(), event_id = %job.event_id,
                    delivery = %job.delivery_id, attempt, "webhook failed for {:?}, giving up: {why}",
                    self.options.retry_for);
                return;
            }
            metrics::counter!("keygate_webhook_deliveries_total", "result" => "retry").increment(1);
            let wait = backoff(
                attempt,
                self.options.first_backoff,
                self.options.max_backoff,
            );
            tracing::warn!(%target, event = job.kind.as_str(), delivery = %job.delivery_id, attempt,
                retry_in_ms = wait.as_millis() as u64, "webhook attempt failed: {why}");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The secret named `env`, or `None` after logging (once per name) that it
    /// is missing.
    fn secret(&self, env: &str) -> Option<String> {
        match (self.options.secrets)(env) {
            Some(s) if !s.is_empty() => Some(s),
            _ => {
                let first = self
                    .reported_missing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(env.to_owned());
                if first {
                    tracing::error!(
                        secret_env = env,
                        "webhook secret env var is not set; webhooks using it are not sent (never unsigned)"
                    );
                }
                None
            }
        }
    }

    async fn attempt(&self, job: &Delivery, secret: &str) -> Attempt {
        let uri: Uri = match job.target.url.as_str().parse() {
            Ok(u) => u,
            Err(e) => return Attempt::GiveUp(format!("unusable URL: {e}")),
        };
        let req = match build_request(uri, job, secret) {
            Ok(r) => r,
            Err(e) => return Attempt::GiveUp(format!("cannot build the request: {e}")),
        };
        match tokio::time::timeout(self.options.attempt_timeout, self.client.request(req)).await {
            Err(_) => Attempt::Retry(format!(
                "no answer within {:?}",
                self.options.attempt_timeout
            )),
            Ok(Err(e)) => Attempt::Retry(format!("request failed: {e}")),
            Ok(Ok(resp)) => classify(resp.status()),
        }
    }
}

fn build_request(uri: Uri, job: &Delivery, secret: &str) -> Result<Request<Full<Bytes>>, String> {
    let signature = format!("sha256={}", sign(secret.as_bytes(), &job.body));
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let value = |s: &str| HeaderValue::from_str(s).map_err(|e| e.to_string());
    let mut req = Request::new(Full::new(job.body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(SIGNATURE_HEADER, value(&signature)?);
    h.insert(TIMESTAMP_HEADER, value(&timestamp)?);
    h.insert(EVENT_HEADER, HeaderValue::from_static(job.kind.as_str()));
    h.insert(DELIVERY_HEADER, value(&job.delivery_id)?);
    h.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("keygate/", env!("CARGO_PKG_VERSION"))),
    );
    Ok(req)
}

/// Hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// 2xx delivered; 408, 429 and 5xx retried; anything else given up.
fn classify(status: StatusCode) -> Attempt {
    if status.is_success() {
        Attempt::Delivered(status)
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Attempt::Retry(format!("answered {status}"))
    } else {
        Attempt::GiveUp(format!("answered {status}"))
    }
}

/// Full jitter: a random wait up to `first * 2^(attempt-1)`, capped at `max`.
fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let ceiling = first.saturating_mul(factor).min(max);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=ms))
}

/// Where a webhook goes, for logs: scheme, host and port only, because the
/// path or query of a webhook URL often carries a token.
fn target_name(w: &WebhookConfig) -> String {
    let url = &w.url;
    match url.port_or_known_default() {
        Some(port) => format!("{}://{}:{port}", url.scheme(), url.host_str().unwrap_or("")),
        None => format!("{}://{}", url.scheme(), url.host_str().unwrap_or("")),
    }
}

fn build_client() -> WebhookClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4)
        .build(https)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(classify(StatusCode::OK), Attempt::Delivered(_)));
        assert!(matches!(
            classify(StatusCode::NO_CONTENT),
            Attempt::Delivered(_)
        ));
        for s in [500, 502, 503, 408, 429] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(matches!(classify(s), Attempt::Retry(_)), "{s}");
        }
        for s in [400, 401, 404, 410, 301] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(matches!(classify(s), Attempt::GiveUp(_)), "{s}");
        }
    }

    #[test]
    fn backoff_doubles_with_full_jitter_and_a_cap() {
        let first = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        for attempt in 1..40 {
            let ceiling = (first * 2u32.saturating_pow(attempt - 1)).min(max);
            for _ in 0..20 {
                assert!(backoff(attempt, first, max) <= ceiling);
            }
        }
        // Late attempts are capped but still spread out.
        let waits: HashSet<Duration> = (0..50).map(|_| backoff(30, first, max)).collect();
        assert!(waits.len() > 10);
    }

    #[test]
    fn log_target_hides_path_and_query() {
        let w = WebhookConfig {
            url: "https://hooks.example.com/services/T0/B0/secret?token=x"
                .parse()
                .unwrap(),
            secret_env: "X".into(),
            events: vec![],
        };
        assert_eq!(target_name(&w), "https://hooks.example.com:443");
    }
}
