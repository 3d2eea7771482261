//! `keygate quickstart`: the five-minute tour with nothing to set up.
//!
//! Starts a built-in echo upstream, an embedded store under `./data`, the
//! gateway on :8080 and the admin API on 127.0.0.1:8081, then creates an admin
//! token and two keys (read-only and full) and prints curl lines to try.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use chrono::Utc;

use crate::admin::input::NewKey;
use crate::config::Config;
use crate::keys::{Access, Scope, SystemClock, Token, TokenHash};
use crate::server::Server;
use crate::store::SharedStore;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Event, EventType};

/// Why the quickstart could not run.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error("{0}")]
    Start(#[from] crate::server::StartError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open the demo store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot start the demo upstream: {0}")]
    Echo(std::io::Error),
    #[error("cannot create the demo keys: {0}")]
    Keys(String),
}

/// Runs the quickstart until Ctrl-C.
pub async fn run(data_dir: PathBuf) -> Result<(), QuickstartError> {
    let shutdown = CancellationToken::new();
    let echo = spawn_echo(shutdown.clone())
        .await
        .map_err(QuickstartError::Echo)?;
    let admin_token = Token::generate("kgadmin_");
    let yaml = format!(
        r#"
listen: 0.0.0.0:8080
admin:
  listen: 127.0.0.1:8081
  tokens:
    - name: quickstart
      role: admin
      sha256: "{admin_hash}"
store:
  backend: embedded
  path: {store_path:?}
routes:
  - name: demo-api
    match: {{ path_prefix: /api/ }}
    upstream: http://{echo}
    scopes: [demo]
  - name: public
    match: {{ path_prefix: /public/ }}
    upstream: http://{echo}
    auth: none
"#,
        admin_hash = TokenHash::of(admin_token.expose()).to_hex(),
        store_path = data_dir.join("keygate.redb").display().to_string(),
    );
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("KEYGATE_"))
        .collect();
    let cfg = crate::config::parse(&yaml, "quickstart", &env)?;
    let store: SharedStore = Arc::new(EmbeddedStore::open(&data_dir.join("keygate.redb"))?);
    let server =
        Server::start_with_store(cfg, store.clone(), Arc::new(SystemClock), shutdown.clone())
            .await?;
    let config = server.gateway.config();
    let read_only = demo_key(&store, &config, "quickstart read-only", Access::ReadOnly).await?;
    let full = demo_key(&store, &config, "quickstart full", Access::Full).await?;
    crate::signals::spawn(shutdown.clone(), || {
        tracing::info!("quickstart has no config file to reload");
    });
    print_tour(&server, &admin_token, &read_only, &full);
    shutdown.cancelled().await;
    server.wait().await;
    Ok(())
}

/// Creates a demo key with scope `demo`, valid 90 days (past the default 30-day expiry notice), owned by `quickstart`.
async fn demo_key(
    store: &SharedStore,
    cfg: &Config,
    name: &str,
    access: Access,
) -> Result<Token, QuickstartError> {
    let now = Utc::now();
    let scope = Scope::parse("demo").map_err(QuickstartError::Keys)?;
    let new = NewKey {
        name: name.to_owned(),
        owner: "quickstart".to_owned(),
        description: "created by keygate quickstart".to_owned(),
        scopes: vec![scope],
        access,
        expires_at: Some(now + chrono::Duration::days(90)),
        rate_limit: None,
        metadata: Default::default(),
    };
    let token = Token::generate(&cfg.keys.prefix);
    let rec = new.into_record(&token, &cfg.keys.prefix, "quickstart", now);
    let details = serde_json::json!({ "name": name });
    let event = Event::new(
        EventType::KeyCreated,
        Some(rec.id),
        "quickstart",
        now,
        details,
    );
    store
        .create_key(&rec, cfg.keys.max_per_owner, &event)
        .await?;
    Ok(token)
}

fn print_tour(server: &Server, admin: &Token, read_only: &Token, full: &Token) {
    let proxy = format!("http://127.0.0.1:{}", server.proxy_addr.port());
    let admin_url = format!("http://{}", server.admin_addr);
    println!(
        r#"
keygate quickstart is running.
  gateway  {proxy}   (routes: /api/ needs a key with scope "demo"; /public/ is open)
  admin    {admin_url}
  console  {admin_url}/ui/
  metrics  {admin_url}/metrics
  store    embedded (data/keygate.redb)

Secrets below are shown once; they are not stored anywhere in plain text.
  admin token     {admin}
  read-only key   {ro}
  full key        {full}

Try:
  curl -i {proxy}/public/hello
  curl -i {proxy}/api/orders                                   # 401 missing_key
  curl -i -H "Authorization: Bearer {ro}" {proxy}/api/orders
  curl -i -X POST -H "Authorization: Bearer {ro}" {proxy}/api/orders   # 403 read_only_key
  curl -i -X POST -H "x-api-key: {full}" {proxy}/api/orders
  curl -s -H "Authorization: Bearer {admin}" {admin_url}/v1/keys
  curl -s -X POST -H "Authorization: Bearer {admin}" -H "content-type: application/json" \
       -d '{{"name":"my key","scopes":["demo"],"access":"full"}}' {admin_url}/v1/keys

Press Ctrl-C to stop."#,
        admin = admin.expose(),
        ro = read_only.expose(),
        full = full.expose(),
    );
}

/// Starts the demo upstream on 127.0.0.1 (a free port): it answers every
/// request with JSON describing it (method, path, query, headers, body size).
pub async fn spawn_echo(shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "echo upstream: accept failed");
                        continue;
                    }
                },
            };
            tokio::spawn(async move {
                let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(echo))
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "echo upstream: connection error");
                }
            });
        }
    });
    Ok(addr)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut body_bytes = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
