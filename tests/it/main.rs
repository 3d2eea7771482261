//! Integration tests: one binary (see STYLE.md), a module per area, the shared
//! harness in `common`.

mod admin;
mod attacks;
mod auth;
mod cli_config;
mod cli_keys;
mod common;
mod faults;
mod kill_switch;
mod lifecycle;
mod ops;
mod proxy;
mod ratelimit;
mod soak;
mod store;
mod ui;
mod under_load;
