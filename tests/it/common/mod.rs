//! Shared test harness: real keygate servers, real upstreams, real redis-server.
#![allow(dead_code)]

pub mod redis;
