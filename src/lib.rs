//! nbd-s3: a Network Block Device server whose blocks live in S3-compatible object storage.
//!
//! Data flows one way: `server` (NBD wire, via the pure `proto` module) → `export` (the live
//! registry of exports) → `store` (per-export block cache and write-back) → `backend`
//! (object stores: S3, a local directory, memory for unit tests). `config`, `reload` and
//! `service` sit around that pipeline and never touch block data. `histogram` and `tls` are
//! leaves any layer may use. `metrics` observes everything and nothing but `service` depends
//! on it: each layer keeps its own counters and the scrape reads them.

pub mod backend;
pub mod config;
pub mod control;
pub mod daemon;
pub mod export;
pub mod histogram;
pub mod journal;
pub mod lease;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod retry;
pub mod server;
pub mod service;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod tls;
