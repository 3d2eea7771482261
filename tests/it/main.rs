//! Integration tests: one binary (see STYLE.md), a module per area, the shared
//! harness in `common`.

mod admin;
mod cli_config;
mod common;
mod proxy;
mod store;
