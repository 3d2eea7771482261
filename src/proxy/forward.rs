//! The pooled upstream client and the forwarding stage.
//!
//! One hyper-util client per process (per runtime when several run), http and
//! https upstreams (rustls with the webpki roots, h2 by ALPN), keep-alive pool
//! with an idle timeout, connect timeout and `TCP_NODELAY`.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::LimitedBody;
use crate::config::LimitsConfig;
use crate::error::GatewayError;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, LimitedBody>;

/// Builds the upstream client.
pub fn build_client(limits: &LimitsConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(limits.upstream_connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(limits.upstream_pool_idle_timeout)
        .pool_max_idle_per_host(limits.upstream_pool_max_idle_per_host)
        .build(https)
}

/// Sends `req` upstream and waits up to `timeout` for the response head.
pub async fn forward(
    client: &HttpClient,
    req: Request<LimitedBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, connect = e.is_connect(), "upstream request failed");
            Err(GatewayError::UpstreamUnavailable)
        }
    }
}
