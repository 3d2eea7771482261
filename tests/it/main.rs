//! Integration tests: one binary (see STYLE.md), a module per area, the shared
//! harness in `common`.

mod admin;
mod auth;
mod cli_config;
mod cli_keys;
mod common;
mod lifecycle;
mod proxy;
mod ratelimit;
mod store;
