//! Accepting connections: TCP, optional TLS, HTTP/1.1 and HTTP/2 on one port.
//!
//! The hyper-util auto builder speaks HTTP/1.1 and HTTP/2 (h2c with prior
//! knowledge, h2 via ALPN over TLS). Every limit is set explicitly: header read
//! timeout (which also bounds the wait for a connection's first request),
//! header count and size (the count checked here for HTTP/2), h2 concurrent
//! streams and the rapid-reset defences, TLS handshake timeout, and a cap on
//! open connections (beyond it, new connections wait: one per worker accepted,
//! the rest in the kernel's accept queue).
//!
//! Shutdown: when `shutdown` fires the loop stops accepting, tells every
//! connection to finish its in-flight requests, and waits up to the grace.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::{self, ClientBody};
use super::framing::{FramingGuard, Verdicts};
use super::{ConnInfo, Gateway, h1};
use crate::config::{LimitsConfig, TlsConfig};
use crate::error::GatewayError;

/// Loads the certificate chain and key and builds a TLS acceptor offering h2
/// and http/1.1 by ALPN.
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, String> {
    let certs = load_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("{}: cannot read a private key: {e}", tls.key.display()))?;
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{}: certificate and key do not work together: {e}",
                tls.cert.display()
            )
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid certificate: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The HTTP server settings shared by every connection.
pub fn http_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(256))
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Serves the data plane on `listener` until `shutdown`, then drains. Each
/// connection holds one of `slots` (the `max_connections` cap, shared by the
/// workers) while it is open.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    limits: LimitsConfig,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(http_builder(&limits));
    let graceful = GracefulShutdown::new();
    let head_limits = h1::Limits {
        header_read_timeout: limits.header_read_timeout,
        max_headers: limits.max_headers,
        max_head_bytes: limits.max_header_bytes,
    };
    let fast = head_limits.enabled();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A slot is taken for an accepted connection, not ahead of one: with
        // several workers, a slot held by a worker waiting in `accept` could
        // not serve a connection queued on another worker's socket. Past the
        // cap, this worker holds the one connection and stops accepting.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let conn = Arc::new(ConnInfo {
            peer,
            peer_ip: super::headers::ip_header(peer.ip()),
            https: tls.is_some(),
            verdicts: Verdicts::default(),
        });
        let task = Connection {
            gateway: gateway.clone(),
            conn,
            builder: builder.clone(),
            watcher: graceful.watcher(),
            limits: head_limits,
            fast,
            shutdown: shutdown.clone(),
        };
        let tls = tls.clone();
        let handshake_timeout = limits.tls_handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => task.run(stream).await,
                Some(acceptor) => {
                    let Some(tls_stream) = handshake(&acceptor, stream, handshake_timeout).await
                    else {
                        return;
                    };
                    task.run(tls_stream).await;
                }
            }
        });
    }
    drop(listener);
    let grace = limits.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, "connections still open after the shutdown grace; closing them");
    }
}

/// One accepted connection and what serving it takes.
struct Connection {
    gateway: Arc<Gateway>,
    conn: Arc<ConnInfo>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Held until the connection ends, so the shutdown grace waits for it.
    watcher: Watcher,
    /// Header timeout, field count and head size (hyper has the same).
    limits: h1::Limits,
    /// Whether keygate's own HTTP/1 path ([`h1`]) serves plain requests.
    fast: bool,
    shutdown: CancellationToken,
}

/// A stream a connection is served on.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether TLS chose HTTP/2 by ALPN.
    fn alpn_h2(&self) -> bool {
        false
    }
}

impl Io for TcpStream {}

impl Io for tokio_rustls::server::TlsStream<TcpStream> {
    fn alpn_h2(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(b"h2")
    }
}

impl Connection {
    /// Serves plain HTTP/1.1 requests on keygate's own path, then (or,
    /// for HTTP/2 by ALPN, at once) everything else with hyper.
    async fn run<S: Io>(self, io: S) {
        if !self.fast || io.alpn_h2() {
            return self.hyper(io).await;
        }
        let ended = h1::serve(io, &self.gateway, &self.conn, self.limits, &self.shutdown).await;
        if let h1::Ended::HandOver(io) = ended {
            self.hyper(io).await;
        }
    }

    async fn hyper<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, io: S) {
        let started = Arc::new(AtomicBool::new(false));
        let seen = started.clone();
        let limits = self.limits;
        let verdicts = self.conn.verdicts.clone();
        let (gateway, conn, max_fields) = (self.gateway, self.conn, limits.max_headers);
        let service = service_fn(move |req: http::Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            let gateway = gateway.clone();
            let conn = conn.clone();
            async move {
                // HTTP/1 heads are counted by hyper; h2 caps only bytes.
                if req.headers().len() > max_fields {
                    let too_large = GatewayError::HeadersTooLarge {
                        max_fields,
                        max_bytes: limits.max_head_bytes,
                    };
                    return Ok(gateway.refuse(&too_large, &conn));
                }
                let req = req.map(ClientBody::Hyper);
                // hyper serves this request on a task of its own (HTTP/2)
                // or after keygate's path handed the connection over: a
                // timer of its own.
                let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
                let mut resp = gateway.handle(req, &conn, timer).await;
                body::raw_fields_into_map(&mut resp);
                Ok::<_, Infallible>(resp)
            }
        });
        let io = FramingGuard::new(io, limits.max_head_bytes, verdicts);
        let served = self.builder.serve_connection(TokioIo::new(io), service);
        let served = self.watcher.watch(served.into_owned());
        finish(until_first_request(served, &started, limits.header_read_timeout).await);
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

type ConnResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Serves `conn`, but drops it if no request has begun within `limit`:
/// hyper's header timeout starts only once the protocol is known, so a silent
/// connection, an HTTP/2 preface sent a byte at a time or an h2c connection
/// that never opens a stream would otherwise hold a connection slot forever.
async fn until_first_request(
    conn: impl Future<Output = ConnResult>,
    started: &AtomicBool,
    limit: Duration,
) -> ConnResult {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        done = &mut conn => return done,
        () = tokio::time::sleep(limit) => {}
    }
    if !started.load(Ordering::Relaxed) {
        tracing::debug!("no request within the header read timeout; closing");
        return Ok(());
    }
    conn.await
}

fn finish(result: ConnResult) {
    if let Err(e) = result {
        // Client resets, header timeouts and malformed requests land here;
        // they are the client's problem, not keygate's.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
