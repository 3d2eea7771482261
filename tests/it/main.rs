//! Integration tests: one binary (see STYLE.md), a module per area, the shared
//! harness in `common`.

mod common;
mod store;
