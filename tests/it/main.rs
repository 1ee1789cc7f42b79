//! The integration tests: one binary (one link of the crate), a module per area. Each starts
//! the real engine (in process on 127.0.0.1:0, or the real binary) and delivers to real local
//! HTTPS receivers; `common` holds the shared helpers, `tools` finds or installs the outside
//! programs some tests run (python3, node, promtool, Chromium, PostgreSQL, pinned PyPI and npm
//! packages), and `pg_cluster` starts the throw-away PostgreSQL the `postgres` tests share.
#![allow(dead_code)]

mod api;
mod common;
mod crash;
mod delivery;
mod edge;
mod flow;
mod hardening;
mod held;
mod layers;
mod lifecycle;
mod limits;
mod maintenance;
mod metrics;
mod openapi;
mod operator;
mod ordering;
mod pg;
mod pg_cluster;
mod pg_divide;
mod pg_failover;
mod pg_ownership;
mod pg_store;
mod postgres;
mod priority;
mod pushback;
mod receiver_signals;
mod recover;
mod retry;
mod security;
mod semantics;
#[cfg(unix)]
mod service;
mod stats;
mod storage;
mod tenancy;
mod tools;
mod ui;
mod ui_browser;
