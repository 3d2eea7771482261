//! Builds keygate from a config and runs it: the store, the cache, the data
//! plane listener, the admin listener, background tasks and signal handling.
//!
//! [`Server::start`] binds everything and returns once both listeners accept
//! connections, with their bound addresses (tests use port 0). [`Server::wait`]
//! runs until the shutdown token fires, then drains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::health::ReadyFlags;
use crate::admin::{self, AdminState};
use crate::auth::Authenticator;
use crate::cache::KeyCache;
use crate::config::{Config, StoreBackend};
use crate::keys::{Clock, SystemClock};
use crate::lifecycle::usage::FLUSH_INTERVAL;
use crate::lifecycle::{Lifecycle, LifecycleOptions, UsageFlusher, UsageRecorder};
use crate::proxy::{Gateway, listener};
use crate::ratelimit::RateLimits;
use crate::store::embedded::EmbeddedStore;
use crate::store::metered::MeteredStore;
use crate::store::redis::RedisStore;
use crate::store::{SharedStore, StoreError};

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the key store: {0}")]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(String),
}

/// A running keygate.
pub struct Server {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub store: SharedStore,
    pub cache: Arc<KeyCache>,
    /// Usage counters and their flusher (flushed once more in [`Server::wait`]).
    pub usage: Arc<UsageFlusher>,
    pub lifecycle: Arc<Lifecycle>,
    admin_config: Arc<ArcSwap<Config>>,
    shutdown: CancellationToken,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Opens the store the config names.
pub async fn open_store(cfg: &Config) -> Result<SharedStore, StoreError> {
    Ok(match &cfg.store.backend {
        StoreBackend::Embedded { path } => Arc::new(EmbeddedStore::open(path)?),
        StoreBackend::Redis {
            url,
            prefix,
            cluster: false,
        } => Arc::new(RedisStore::connect(url, prefix).await?),
        StoreBackend::Redis {
            url,
            prefix,
            cluster: true,
        } => Arc::new(RedisStore::connect_cluster(url, prefix).await?),
    })
}

impl Server {
    /// Opens the store, binds both listeners and starts serving.
    pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<Server, StartError> {
        let store = open_store(&cfg).await?;
        Server::start_with_store(cfg, store, Arc::new(SystemClock), shutdown).await
    }

    /// Like [`Server::start`] with a given store and clock (tests, quickstart).
    pub async fn start_with_store(
        cfg: Config,
        store: SharedStore,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<Server, StartError> {
        let store: SharedStore = Arc::new(MeteredStore::new(store));
        let ready = Arc::new(ReadyFlags::new(shutdown.clone()));
        let cfg = Arc::new(cfg);
        let tls = match &cfg.tls {
            Some(t) => Some(listener::tls_acceptor(t).map_err(StartError::Tls)?),
            None => None,
        };
        let admin_listener = bind(cfg.admin.listen).await?;
        let admin_addr = local_addr(&admin_listener, cfg.admin.listen)?;

        let cache = Arc::new(KeyCache::new(store.clone(), &cfg.cache));
        cache.refresh_settings().await;
        let auth = Authenticator {
            cache: cache.clone(),
            clock: clock.clone(),
        };
        let usage = Arc::new(UsageRecorder::new(clock.clone()));
        let limits = Arc::new(RateLimits::from_config(&cfg));
        let gateway = Arc::new(Gateway::new(
            cfg.clone(),
            auth,
            usage.clone(),
            limits.clone(),
        ));
        let admin_config = Arc::new(ArcSwap::new(cfg.clone()));
        let admin_state = Arc::new(AdminState {
            store: store.clone(),
            config: admin_config.clone(),
            clock: clock.clone(),
        });

        let mut tasks = vec![
            cache.clone().spawn_maintenance(shutdown.clone()),
            limits.spawn_maintenance(shutdown.clone()),
        ];
        // One cap on open connections, whichever worker accepted them.
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_connections));
        let scrape = crate::telemetry::ScrapeSources {
            cache: cache.clone(),
            connection_slots: slots.clone(),
            max_connections: cfg.limits.max_connections,
        };
        let (proxy_addr, threads) = match proxy_workers() {
            0 => {
                let proxy_listener = bind(cfg.listen).await?;
                let addr = local_addr(&proxy_listener, cfg.listen)?;
                let serve = listener::serve(
                    proxy_listener,
                    gateway.clone(),
                    tls,
                    cfg.limits.clone(),
                    slots,
                    shutdown.clone(),
                );
                tasks.push(tokio::spawn(serve));
                (addr, Vec::new())
            }
            n => spawn_workers(n, &cfg, &gateway, tls, &slots, &shutdown)?,
        };
        // Started once both listeners are bound, so a failed start leaves no
        // background job holding the leader lock.
        let usage = Arc::new(UsageFlusher::new(usage, store.clone()));
        tasks.push(usage.clone().spawn(FLUSH_INTERVAL, shutdown.clone()));
        let lifecycle = Lifecycle::new(
            store.clone(),
            admin_config.clone(),
            clock,
            LifecycleOptions::for_config(&cfg),
        );
        tasks.push(lifecycle.spawn(shutdown.clone()));
        let admin_shutdown = shutdown.clone();
        let router = admin::layered(
            admin::api_routes(admin_state)
                .merge(crate::telemetry::metrics_routes(scrape))
                .merge(admin::ui::routes()),
        );
        let router = router.layer(axum::Extension(ready.clone()));
        tasks.push(crate::telemetry::spawn_metrics_upkeep(shutdown.clone()));
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(admin_listener, router)
                .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin listener failed");
            }
        }));
        ready
            .config_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        ready
            .listeners_bound
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(Server {
            proxy_addr,
            admin_addr,
            gateway,
            store,
            cache,
            usage,
            lifecycle,
            admin_config,
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
            threads: std::sync::Mutex::new(threads),
        })
    }

    /// Applies a new config at once: routes, scopes, rate limits, cache
    /// durations, admin tokens, key policy, webhooks, access log and metrics
    /// switches. Settings that only take effect at start (listeners, TLS, the
    /// store, the rate-limit backend, `limits`, `cache.max_keys`, log level
    /// and format) keep their running values, and the log says which changed
    /// and need a restart; nothing is half-applied.
    pub fn reload(&self, mut new: Config) {
        let old = self.gateway.config();
        let kept = new.keep_restart_only(&old);
        if !kept.is_empty() {
            tracing::warn!(
                "config changes that need a restart were not applied: {}; the running values stay until keygate restarts",
                kept.join(", ")
            );
        }
        let new = Arc::new(new);
        self.cache.reconfigure(&new.cache);
        self.gateway.reload(new.clone());
        self.admin_config.store(new.clone());
        tracing::info!(routes = new.routes.len(), "config reloaded");
    }

    /// The token that stops this server.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until shutdown has been requested and every task has drained.
    pub async fn wait(&self) {
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a server task failed");
            }
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a proxy worker thread panicked");
                }
            }
        });
        if let Err(e) = joined.await {
            tracing::error!(error = %e, "could not join the proxy workers");
        }
        // Requests have drained: write the last usage counts.
        if let Err(e) = self.usage.flush().await {
            tracing::error!(error = %e, "final usage flush failed; the last counts are lost");
        }
    }
}

/// How many proxy worker threads to run, each with its own single-threaded
/// runtime and SO_REUSEPORT listener: one per CPU, or `KEYGATE_WORKERS=N`;
/// `KEYGATE_WORKERS=0` serves the proxy on the shared multi-threaded runtime
/// instead. One runtime per core keeps a request, its upstream connection
/// and its wakeups on one thread (measured in BENCHMARKS.md).
fn proxy_workers() -> usize {
    match std::env::var("KEYGATE_WORKERS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => n.min(256),
            Err(_) => {
                tracing::warn!(value = %v, "KEYGATE_WORKERS is not a number; using one worker per CPU");
                default_workers()
            }
        },
        Err(_) => default_workers(),
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `n` proxy worker threads on one address (SO_REUSEPORT).
fn spawn_workers(
    n: usize,
    cfg: &Config,
    gateway: &Arc<Gateway>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: &Arc<tokio::sync::Semaphore>,
    shutdown: &CancellationToken,
) -> Result<(SocketAddr, Vec<std::thread::JoinHandle<()>>), StartError> {
    let first = reuseport_listener(cfg.listen)?;
    let addr = first.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(reuseport_listener(addr)?);
    }
    let mut threads = Vec::with_capacity(n);
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let gateway = Arc::new(gateway.worker());
        let tls = tls.clone();
        let limits = cfg.limits.clone();
        let slots = slots.clone();
        let shutdown = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StartError::Bind { addr, source })?;
        let thread = std::thread::Builder::new()
            .name(format!("keygate-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // Access lines of this worker go to its own chunk.
                    let _batching = crate::telemetry::access::LocalBatching::start();
                    match TcpListener::from_std(std_listener) {
                        Ok(l) => listener::serve(l, gateway, tls, limits, slots, shutdown).await,
                        Err(e) => {
                            tracing::error!(error = %e, "proxy worker cannot use its listener")
                        }
                    }
                });
            })
            .map_err(|source| StartError::Bind { addr, source })?;
        threads.push(thread);
    }
    Ok((addr, threads))
}

fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    use socket2::{Domain, Socket, Type};
    let bind_err = |source| StartError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.set_reuse_port(true).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    Ok(socket.into())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

/// Runs `keygate serve`: starts, handles signals, reloads, drains on exit.
pub async fn serve(config_path: PathBuf, cfg: Config) -> Result<(), StartError> {
    let shutdown = CancellationToken::new();
    let server = Arc::new(Server::start(cfg, shutdown.clone()).await?);
    crate::reload::Reloader::new(config_path, server.clone()).spawn(shutdown.clone());
    announce(&server);
    shutdown.cancelled().await;
    tracing::info!("shutting down: finishing requests in flight");
    server.wait().await;
    Ok(())
}

/// Prints where keygate listens (on stdout: tests and scripts read it).
pub fn announce(server: &Server) {
    println!(
        "keygate listening: proxy http{}://{} admin http://{}",
        if server.gateway.config().tls.is_some() {
            "s"
        } else {
            ""
        },
        server.proxy_addr,
        server.admin_addr
    );
    tracing::info!(proxy = %server.proxy_addr, admin = %server.admin_addr, "keygate ready");
}
