//! In-process server tests: the real server on 127.0.0.1:0 (or a Unix socket) over a real
//! `BlockStore` on an in-memory object store, driven by a raw-bytes client so every byte of
//! the protocol is checked, including the hostile cases.

mod handshake;
mod shutdown;
mod transmission;

use super::{Listener, ListenerHandle, Server};
use crate::backend::memory::MemoryStore;
use crate::config::{ExportConfig, ListenAddr};
use crate::export::{Export, Registry};
use crate::proto::consts::*;
use crate::proto::handshake::{encode_info_request, encode_meta_request, encode_option};
use crate::proto::RequestHeader;
use crate::store::{BlockStore, BlockStoreConfig, CacheBudget};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(super) const SIZE: u64 = 4 << 20;
pub(super) const BLOCK: u32 = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Fixture {
    pub server: Server,
    pub addr: String,
    pub _handle: ListenerHandle,
}

fn export_config(name: &str, read_only: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        size: SIZE,
        bucket: "b".into(),
        prefix: format!("{name}/"),
        block_size: BLOCK,
        read_only,
        description: Some(format!("{name} description")),
        allow: None,
        lease: crate::config::LeaseMode::Off,
        codec: Default::default(),
        base: None,
        auto_snapshots: None,
        durability: crate::config::Durability::S3,
    }
}

async fn open(cfg: &ExportConfig, objects: Arc<MemoryStore>) -> Arc<Export> {
    let store = BlockStore::open(
        objects,
        BlockStoreConfig {
            prefix: cfg.prefix.clone(),
            size: cfg.size,
            block_size: cfg.block_size,
            read_only: false,
            flush_timeout: Duration::from_secs(10),
            codec: Default::default(),
            base: None,
            journal: None,
        },
        CacheBudget::new(64 << 20, 32 << 20),
    )
    .await
    .expect("open block store");
    Export::serving(cfg.clone(), store, None)
}

/// Exports `disk` (rw), `ro` (read-only) and `bad` (refused).
pub(super) async fn registry() -> Arc<Registry> {
    registry_with(Arc::new(MemoryStore::new())).await
}

/// Like `registry`, with `disk` stored in `objects` (tests pause it or pre-load blocks).
pub(super) async fn registry_with(objects: Arc<MemoryStore>) -> Arc<Registry> {
    let mut map = BTreeMap::new();
    map.insert(
        "disk".to_owned(),
        open(&export_config("disk", false), objects).await,
    );
    let ro_objects = Arc::new(MemoryStore::new());
    map.insert(
        "ro".to_owned(),
        open(&export_config("ro", true), ro_objects).await,
    );
    let bad = Export::refused(
        export_config("bad", false),
        crate::export::Refusal::Other("block size mismatch: 4096 vs 65536".into()),
    );
    map.insert("bad".to_owned(), bad);
    let reg = Registry::new();
    reg.replace(map);
    reg
}

pub(super) async fn fixture() -> Fixture {
    fixture_with(Arc::new(MemoryStore::new())).await
}

pub(super) async fn fixture_with(objects: Arc<MemoryStore>) -> Fixture {
    let server = Server::new(registry_with(objects).await);
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".into()))
        .await
        .expect("bind");
    let addr = listener.local_addr();
    let handle = server.spawn_listener(listener);
    Fixture {
        server,
        addr,
        _handle: handle,
    }
}

impl Fixture {
    /// Waits, with a deadline, until exactly `n` connections remain.
    pub async fn wait_connections(&self, n: usize) {
        let mut rx = self.server.inner.connections.subscribe();
        let waited = tokio::time::timeout(IO_TIMEOUT, async {
            let _ = rx.wait_for(|c| *c == n).await;
        })
        .await;
        assert!(
            waited.is_ok(),
            "connection count stuck at {}",
            self.server.connection_count()
        );
    }

    /// A client at the transmission phase on `disk` with structured replies and block status.
    pub async fn structured(&self) -> Client {
        let mut c = Client::connect(&self.addr).await;
        c.go_full("disk", true, true).await;
        c
    }
}

/// A raw NBD client; every read has a timeout so a broken server fails the test, not hangs it.
pub(super) struct Client {
    pub s: TcpStream,
}

#[derive(Debug)]
pub(super) struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub data: Vec<u8>,
}

impl Client {
    /// Connects and reads the greeting, without sending client flags.
    pub async fn raw(addr: &str) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        let mut c = Client { s };
        let g = c.read_n(18).await;
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c
    }

    /// Connects and answers the greeting with FIXED_NEWSTYLE | NO_ZEROES.
    pub async fn connect(addr: &str) -> Client {
        let mut c = Client::raw(addr).await;
        c.write(&3u32.to_be_bytes()).await;
        c
    }

    pub async fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).await.expect("write");
    }

    pub async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        tokio::time::timeout(IO_TIMEOUT, self.s.read_exact(&mut v))
            .await
            .expect("server reply timed out")
            .expect("read");
        v
    }

    pub async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).await.try_into().unwrap())
    }
    pub async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).await.try_into().unwrap())
    }
    pub async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).await.try_into().unwrap())
    }

    /// Asserts the server closes the connection (EOF or reset) without sending more bytes.
    pub async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(IO_TIMEOUT, self.s.read(&mut b))
            .await
            .expect("server did not close");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "expected close, got data {r:?} {b:?}"
        );
    }

    pub async fn opt(&mut self, option: u32, data: &[u8]) {
        self.write(&encode_option(option, data)).await;
    }

    pub async fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64().await, OPTION_REPLY_MAGIC);
        let option = self.u32().await;
        let kind = self.u32().await;
        let len = self.u32().await as usize;
        let data = self.read_n(len).await;
        OptReply { option, kind, data }
    }

    /// Sends an option and returns replies up to and including the final (ACK or error) one.
    pub async fn opt_all(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.opt(option, data).await;
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await;
            assert_eq!(r.option, option);
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Negotiates and enters transmission; returns (size, transmission flags).
    pub async fn go_full(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        if structured {
            assert_eq!(
                self.opt_all(OPT_STRUCTURED_REPLY, b"").await[0].kind,
                REP_ACK
            );
        }
        if meta {
            let r = self
                .opt_all(
                    OPT_SET_META_CONTEXT,
                    &encode_meta_request(name, &[META_BASE_ALLOCATION]),
                )
                .await;
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let replies = self.opt_all(OPT_GO, &encode_info_request(name, &[])).await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "{replies:?}");
        let info = replies
            .iter()
            .find(|r| r.data[..2] == INFO_EXPORT.to_be_bytes())
            .expect("INFO_EXPORT");
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        (size, u16::from_be_bytes([info.data[10], info.data[11]]))
    }

    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.write(&h.encode()).await;
    }

    /// Reads a simple reply header: (errno, cookie).
    pub async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC);
        (self.u32().await, self.u64().await)
    }

    pub async fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32().await, STRUCTURED_REPLY_MAGIC);
        let flags = self.u16().await;
        let kind = self.u16().await;
        let cookie = self.u64().await;
        let len = self.u32().await as usize;
        let data = self.read_n(len).await;
        Chunk {
            flags,
            kind,
            cookie,
            data,
        }
    }

    /// Reads every chunk of one structured reply (until DONE).
    pub async fn chunks(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk().await;
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    pub async fn write_data(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.request(CMD_WRITE, flags, cookie, offset, data.len() as u32)
            .await;
        self.write(data).await;
        let (errno, c) = self.simple().await;
        assert_eq!(c, cookie);
        errno
    }

    /// Structured READ reassembled into bytes (holes as zeros), checking chunk geometry.
    pub async fn read_structured(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Vec<u8> {
        self.request(CMD_READ, flags, cookie, offset, len).await;
        let mut out = vec![0xEEu8; len as usize];
        let mut covered = 0u64;
        for c in self.chunks().await {
            assert_eq!(c.cookie, cookie);
            let at = u64::from_be_bytes(c.data[..8].try_into().unwrap()) - offset;
            match c.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    out[at as usize..at as usize + c.data.len() - 8].copy_from_slice(&c.data[8..]);
                    covered += c.data.len() as u64 - 8;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(c.data[8..12].try_into().unwrap()) as usize;
                    out[at as usize..at as usize + n].fill(0);
                    covered += n as u64;
                }
                k => panic!("unexpected chunk type {k}"),
            }
        }
        assert_eq!(covered, u64::from(len));
        out
    }
}
