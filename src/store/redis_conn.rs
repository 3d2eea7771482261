//! One Redis connection type for a single server and for a Redis Cluster.
//!
//! The store ([`super::redis`]) and the shared rate limiter
//! (`ratelimit::redis`) send every command, pipeline and script through
//! [`RedisConn`], which implements [`redis::aio::ConnectionLike`], so the
//! same code runs unchanged on both topologies:
//!
//! - **single** (`store.redis.cluster: false`): a [`ConnectionManager`] on the
//!   URL, reconnecting by itself.
//! - **cluster** (`cluster: true`): the URL is one seed node; a
//!   [`ClusterConnection`] discovers the others (`CLUSTER SLOTS`), follows
//!   `MOVED`/`ASK` redirects and reconnects after a failover.
//!
//! Every name keygate writes carries the hash tag [`HASH_TAG`], so all of them
//! live in one cluster slot, the **home slot**. On a cluster, [`RedisConn`]
//! therefore routes *every* request to the primary that owns that slot, not
//! only keyed ones: multi-key scripts and `MULTI` blocks are single-slot by
//! construction, and keyless commands (`PING`, `SCRIPT LOAD`, `TIME`, ...)
//! reach that same node instead of being fanned out to every primary or sent
//! to a random one. So `PING` (readiness) asks exactly the node keygate
//! depends on, and a script loaded after a `NOSCRIPT` is loaded where it runs.
//!
//! Pub/sub: classic `PUBLISH` is broadcast over the cluster bus to every node,
//! so a subscriber may listen on any node. [`RedisEndpoint::pubsub_client`]
//! picks the home slot's primary (asked with `CLUSTER NODES`, answered by that
//! node itself), where the writes and their `PUBLISH`es run, so invalidations
//! need no cluster-bus hop; if it cannot be asked, the seed node. When that
//! node fails the subscription drops, the store's subscriber reconnects (to
//! the new home primary after a failover, or to the seed) and flushes every
//! cache, since messages sent meanwhile are lost (see [`super::redis`]).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    Value,
};

/// The hash tag in every Redis name keygate uses (`<prefix>{kg}:...`).
pub const HASH_TAG: &str = "{kg}";
/// Upper bound on one round trip to Redis.
pub const OP_TIMEOUT: Duration = Duration::from_millis(1500);
/// Bound on establishing a connection (command or pub/sub).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Attempts of a cluster request after a redirect or a lost node (all within
/// [`OP_TIMEOUT`]): enough to follow a `MOVED` after a failover.
const CLUSTER_RETRIES: u32 = 3;
const CLUSTER_RETRY_MIN_MS: u64 = 10;
const CLUSTER_RETRY_MAX_MS: u64 = 200;

/// Where Redis is: a parsed URL and whether it names a cluster seed node.
/// Its `Debug` never shows the URL (it may hold a password).
#[derive(Clone)]
pub struct RedisEndpoint {
    info: ConnectionInfo,
    cluster: bool,
}

impl std::fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl RedisEndpoint {
    /// Parses `url` (`redis://[user:password@]host:port[/db]`). With `cluster`,
    /// it is a seed node and must name database 0 (the only one a cluster has).
    /// Errors never echo the URL.
    pub fn new(url: &str, cluster: bool) -> Result<RedisEndpoint, String> {
        let info = url.into_connection_info().map_err(|_| {
            "invalid redis URL (expected redis://[user:password@]host:port[/db])".to_owned()
        })?;
        if cluster && info.redis_settings().db() != 0 {
            return Err("a Redis Cluster has only database 0: drop the /db from the URL".into());
        }
        Ok(RedisEndpoint { info, cluster })
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Connects now; fails if Redis (the seed node, on a cluster) does not
    /// answer. Later outages are survived: the connection reconnects by itself.
    pub async fn connect(&self) -> Result<RedisConn, RedisError> {
        if self.cluster {
            let conn = self.cluster_client()?.get_async_connection().await?;
            Ok(RedisConn(Inner::Cluster(conn)))
        } else {
            let client = redis::Client::open(self.info.clone())?;
            let conn = ConnectionManager::new_with_config(client, manager_config()).await?;
            Ok(RedisConn(Inner::Single(conn)))
        }
    }

    /// Connects in the background: the first request finds out whether Redis
    /// is there.
    pub fn connect_lazy(&self) -> Result<RedisConn, RedisError> {
        if self.cluster {
            let config = ClusterConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(OP_TIMEOUT);
            let conn = self
                .cluster_client()?
                .get_pending_async_connection_with_config(config);
            Ok(RedisConn(Inner::Cluster(conn)))
        } else {
            let client = redis::Client::open(self.info.clone())?;
            let conn = ConnectionManager::new_lazy_with_config(client, manager_config())?;
            Ok(RedisConn(Inner::Single(conn)))
        }
    }

    /// A client for a dedicated pub/sub connection: the server itself, or on a
    /// cluster the primary of the home slot as `conn` reaches it now (the seed
    /// node if that cannot be found out). See the module docs.
    pub async fn pubsub_client(&self, conn: &RedisConn) -> Result<redis::Client, RedisError> {
        if !self.cluster {
            return redis::Client::open(self.info.clone());
        }
        let info = match home_address(conn).await {
            Some((host, port)) => match self.info.addr() {
                ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => self.info.clone().set_addr(ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                }),
                _ => self.info.clone().set_addr(ConnectionAddr::Tcp(host, port)),
            },
            None => self.info.clone(),
        };
        redis::Client::open(info)
    }

    fn cluster_client(&self) -> Result<ClusterClient, RedisError> {
        ClusterClientBuilder::new([self.info.clone()])
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(OP_TIMEOUT)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_RETRY_MIN_MS)
            .max_retry_wait(CLUSTER_RETRY_MAX_MS)
            .build()
    }
}

/// The single-server connection's bounds: one quick retry per reconnect, so
/// callers get an answer fast while Redis is down, and the next call starts a
/// fresh reconnect.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_millis(500))
}

/// The route of the home slot's primary.
fn home() -> Route {
    Route::with_key(HASH_TAG, SlotAddr::Master)
}

/// Asks the home slot's primary for its own address (`CLUSTER NODES`, the
/// line flagged `myself`).
async fn home_address(conn: &RedisConn) -> Option<(String, u16)> {
    let mut conn = conn.clone();
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("NODES");
    let ask = cmd.query_async::<String>(&mut conn);
    // Short of the subscriber's whole connect budget, so that the seed node
    // can still be tried when the home node does not answer.
    let nodes = match tokio::time::timeout(CONNECT_TIMEOUT, ask).await {
        Ok(Ok(nodes)) => nodes,
        Ok(Err(e)) => {
            tracing::debug!(error = %e.category(), "cannot ask the cluster for the home node");
            return None;
        }
        Err(_) => return None,
    };
    myself_address(&nodes)
}

/// The `host:port` of the line flagged `myself` in a `CLUSTER NODES` answer
/// (`<id> <ip>:<port>@<cport>[,<hostname>] <flags> ...`).
fn myself_address(nodes: &str) -> Option<(String, u16)> {
    let line = nodes.lines().find(|line| {
        line.split(' ')
            .nth(2)
            .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
    })?;
    let addr = line.split(' ').nth(1)?;
    let addr = addr.split([',', '@']).next()?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
}

/// A connection to a single Redis or to a Redis Cluster (cheap to clone:
/// clones share the underlying connections).
#[derive(Clone)]
pub struct RedisConn(Inner);

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Cluster(conn) => Box::pin(conn.route_command(
                cmd.clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(home())),
            )),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(conn) => Box::pin(conn.route_pipeline(
                pipeline.clone(),
                offset,
                count,
                SingleNodeRoutingInfo::SpecificNode(home()),
            )),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_answering_node_in_cluster_nodes() {
        let nodes = "\
1df3 127.0.0.1:17002@27002 master - 0 1700000000000 2 connected 5461-10922
acb7 127.0.0.1:17001@27001,node-a myself,master - 0 1700000000000 1 connected 0-5460
7559 [::1]:17003@27003 master - 0 1700000000000 3 connected 10923-16383
";
        assert_eq!(myself_address(nodes), Some(("127.0.0.1".into(), 17001)));
        let v6 = "7559 [::1]:17003@27003 myself,master - 0 0 3 connected 10923-16383\n";
        assert_eq!(myself_address(v6), Some(("::1".into(), 17003)));
        // A node that does not know its own address yet.
        assert_eq!(
            myself_address("ab :0@0 myself,master - 0 0 0 connected\n"),
            None
        );
        assert_eq!(myself_address(""), None);
    }

    #[test]
    fn cluster_urls_must_name_database_0() {
        assert!(RedisEndpoint::new("redis://127.0.0.1:7000/", true).is_ok());
        assert!(RedisEndpoint::new("redis://127.0.0.1:7000/2", false).is_ok());
        let e = RedisEndpoint::new("redis://u:hunter2@127.0.0.1:7000/2", true).unwrap_err();
        assert!(e.contains("database 0") && !e.contains("hunter2"), "{e}");
        let e = RedisEndpoint::new("not a url", true).unwrap_err();
        assert!(e.starts_with("invalid redis URL"), "{e}");
        let ep = RedisEndpoint::new("redis://u:hunter2@h:1/", true).unwrap();
        assert!(!format!("{ep:?}").contains("hunter2"));
    }

    #[test]
    fn the_home_route_is_the_slot_of_the_hash_tag() {
        // CLUSTER KEYSLOT {kg} = 2961, whatever the prefix.
        assert_eq!(home(), Route::new(2961, SlotAddr::Master));
        assert_eq!(
            Route::with_key("keygate:{kg}:rec:key_01", SlotAddr::Master),
            home()
        );
    }
}
