//! keygate: a reverse-proxy authentication gateway for HTTP APIs.
//!
//! The request path is a sequence of stages, each in its own module:
//!
//! ```text
//! accept (tls) -> route -> extract credential -> verify (checksum, cache, store)
//!   -> authorize (status, scopes, access) -> rate limit -> rewrite headers
//!   -> forward (pooled client) -> stream back (+ rate-limit headers) -> record
//! ```
//!
//! Dependencies between modules go one way: `proxy` -> `auth` -> `cache` ->
//! `store` -> `keys`; `config` and `error` are leaves.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod keys;
pub mod lifecycle;
pub mod proxy;
pub mod quickstart;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod signals;
pub mod store;
pub mod telemetry;
