//! nbd-s3's NBD server and block cache over an in-process memory object store: what
//! `benches/protocol.sh` (STORE=memory) runs to measure protocol and cache overhead alone,
//! with no S3 server competing for the CPU. Not a product: the data is gone at exit.
//!
//!   cargo build --release --example memory_server
//!   target/release/examples/memory_server PORT SIZE_BYTES

use nbd_s3::backend::memory::MemoryStore;
use nbd_s3::config::{ExportConfig, LeaseMode, ListenAddr};
use nbd_s3::export::{Export, Registry};
use nbd_s3::server::{Listener, Server};
use nbd_s3::store::{BlockStore, BlockStoreConfig, CacheBudget};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .ok_or("usage: memory_server PORT SIZE_BYTES")?
        .parse()?;
    let size: u64 = args
        .next()
        .ok_or("usage: memory_server PORT SIZE_BYTES")?
        .parse()?;
    // The same allocator setting and runtime as `nbd-s3 serve`, so only the store differs.
    nbd_s3::service::allocator::tune();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(port, size))
}

async fn serve(port: u16, size: u64) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = ExportConfig {
        name: "bench".into(),
        size,
        bucket: "nbd".into(),
        prefix: "bench/".into(),
        block_size: nbd_s3::config::DEFAULT_BLOCK_SIZE,
        read_only: false,
        description: None,
        allow: None,
        lease: LeaseMode::Off,
        codec: Default::default(),
        base: None,
        auto_snapshots: None,
        durability: Default::default(),
    };
    let store = BlockStore::open(
        Arc::new(MemoryStore::new()),
        BlockStoreConfig {
            prefix: cfg.prefix.clone(),
            size,
            block_size: cfg.block_size,
            read_only: false,
            flush_timeout: Duration::from_secs(60),
            codec: Default::default(),
            base: None,
            journal: None,
        },
        // protocol.sh's [cache] for the other stores: memory 1GiB, dirty 512MiB.
        CacheBudget::new(1 << 30, 512 << 20),
    )
    .await?;
    let registry = Registry::new();
    registry.replace(BTreeMap::from([(
        "bench".to_owned(),
        Export::serving(cfg, store, None),
    )]));
    let server = Server::new(registry);
    let listener = Listener::bind(&ListenAddr::Tcp(format!("127.0.0.1:{port}"))).await?;
    println!("listening on {}", listener.local_addr());
    let _handle = server.spawn_listener(listener);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
