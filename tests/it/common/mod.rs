//! Shared test harness: real keygate servers, real upstreams, real redis-server.
#![allow(dead_code)]

pub mod client;
pub mod keygate;
pub mod load;
pub mod redis;
pub mod upstream;
