//! End-to-end tests, one module an area. Most start the appliance in this process
//! (`crate::common::Appliance::start`); `binary`, `crash_points`, `saga` and `distributed` start the
//! `shopverse` binary, because they need a process: its output, signals, `kill -9`, a crash
//! point, replicas. Run with `cargo nextest` (one process per test; see `.config/nextest.toml`).

// A failed step of a test panics, which fails the test: unwrap is the assertion here.
#![allow(clippy::unwrap_used)]

mod common;

mod auth;
mod binary;
mod cache;
mod crash_points;
mod distributed;
mod faults;
mod live;
pub(crate) mod observability;
mod ops;
mod passthrough;
mod rest;
mod retention;
mod saga;
mod web;
