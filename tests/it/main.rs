//! Integration tests: one test binary (linking the S3 SDK once), one module per concern.
//! Every test talks to a real S3 server over HTTP on loopback and to the real `nbd-s3`
//! binary or server, through real NBD clients where the concern is client-visible.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod architecture;
mod backend_s3;
mod cli_config;
mod clients;
mod clones;
mod codec;
mod control;
mod crash;
mod faults;
mod filesystem;
mod hostile;
mod hostile_limits;
mod hostile_requests;
mod idle;
mod journal;
mod kernel;
mod lease;
mod metrics;
mod outage;
mod reload;
mod requests;
mod secrets;
mod service;
mod snapshot_costs;
mod snapshots;
mod store;
mod store_layout;
mod store_load;
mod takeover;
mod throttle;
mod tls;
