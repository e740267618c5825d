//! A deliberately dumb NBD client over a raw TCP socket, for the hostile tests: it sends exactly
//! the bytes a test asks for (malformed or not) and reports exactly what came back, with a read
//! timeout so a server that hangs fails the test instead of hanging it.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMDFLAG_FUA: u16 = 1;
pub const CMDFLAG_NO_HOLE: u16 = 2;
pub const CMDFLAG_DF: u16 = 4;
pub const CMDFLAG_REQ_ONE: u16 = 8;
pub const CMDFLAG_FAST_ZERO: u16 = 16;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// How long any single read may block before the server is declared hung.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the daemon may take to answer a FLUSH: its default `flush_timeout` (after which
/// it answers EIO) plus a margin for a loaded machine.
pub const FLUSH_REPLY_TIMEOUT: Duration = Duration::from_secs(60 + 30);

/// One option reply as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One simple reply; `data` is filled only when the caller said a payload follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
    pub data: Vec<u8>,
}

/// What `go` learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// A raw connection. Every read has `IO_TIMEOUT`; reads past EOF are errors.
pub struct Raw {
    pub s: TcpStream,
    pub server_flags: u16,
}

impl Raw {
    /// A TCP connection with the raw client's timeouts, nothing read or sent yet.
    pub fn tcp(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        s.set_nodelay(true).expect("TCP_NODELAY");
        Raw { s, server_flags: 0 }
    }

    /// Connects and reads the newstyle greeting, checking both magics; sends nothing.
    pub fn greet(addr: &str) -> Raw {
        let mut r = Raw::tcp(addr);
        assert_eq!(r.u64(), NBDMAGIC, "greeting NBDMAGIC");
        assert_eq!(r.u64(), IHAVEOPT, "greeting IHAVEOPT");
        r.server_flags = r.u16();
        assert_eq!(
            r.server_flags & 3,
            3,
            "server must advertise FIXED_NEWSTYLE|NO_ZEROES, got {:#x}",
            r.server_flags
        );
        r
    }

    /// Greeting plus client flags FIXED_NEWSTYLE|NO_ZEROES: ready for options.
    pub fn connect(addr: &str) -> Raw {
        let mut r = Raw::greet(addr);
        r.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        r
    }

    /// Full handshake with GO (simple replies): ready for requests.
    pub fn open(addr: &str, export: &str) -> (Raw, ExportInfo) {
        let mut r = Raw::connect(addr);
        let info = r
            .go(export)
            .unwrap_or_else(|e| panic!("GO {export:?} refused: {e:?}"));
        (r, info)
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s
            .write_all(b)
            .unwrap_or_else(|e| panic!("send {} bytes: {e}", b.len()));
    }

    /// Like `send` but tolerates the server having closed already.
    pub fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    pub fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.exact(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.exact(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.exact(8).try_into().unwrap())
    }

    /// Sends an option header with an arbitrary claimed `len` and the given bytes.
    pub fn send_opt_raw(&mut self, option: u32, len: u32, data: &[u8]) {
        self.send(&opt_bytes_claiming(option, len, data));
    }
    pub fn send_opt(&mut self, option: u32, data: &[u8]) {
        self.send(&opt_bytes(option, data));
    }

    /// Sends `option` with `data`; its reply must be of `kind` (`what` names the case).
    pub fn expect_opt(&mut self, option: u32, data: &[u8], kind: u32, what: &str) -> OptReply {
        self.send_opt(option, data);
        let rep = self.opt_reply();
        assert_eq!((rep.option, rep.kind), (option, kind), "{what}");
        rep
    }

    /// Reads one option reply, checking its magic; the length is capped so a broken server
    /// cannot make the test allocate gigabytes.
    pub fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC, "option reply magic");
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32();
        assert!(len <= 1 << 20, "option reply length {len} is absurd");
        let data = self.exact(len as usize);
        OptReply { option, kind, data }
    }

    /// Like `opt_reply` but `None` when the server closed instead of answering.
    pub fn try_opt_reply(&mut self) -> Option<OptReply> {
        let mut b = [0u8; 8];
        match read_full(&mut self.s, &mut b) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) if is_reset(&e) => return None,
            Err(e) => panic!("waiting for an option reply: {e}"),
        }
        assert_eq!(u64::from_be_bytes(b), OPT_REPLY_MAGIC, "option reply magic");
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32();
        assert!(len <= 1 << 20, "option reply length {len} is absurd");
        Some(OptReply {
            option,
            kind,
            data: self.exact(len as usize),
        })
    }

    /// NBD_OPT_GO with no info requests: INFO replies until ACK, or the error reply.
    pub fn go(&mut self, export: &str) -> Result<ExportInfo, OptReply> {
        self.send_opt(OPT_GO, &go_data(export, &[]));
        let mut info = None;
        loop {
            let rep = self.opt_reply();
            assert_eq!(rep.option, OPT_GO, "reply for the wrong option: {rep:?}");
            match rep.kind {
                REP_INFO => {
                    assert!(rep.data.len() >= 2, "short INFO reply {rep:?}");
                    if rep.data[..2] == [0, 0] {
                        assert_eq!(rep.data.len(), 12, "INFO_EXPORT length");
                        info = Some(ExportInfo {
                            size: u64::from_be_bytes(rep.data[2..10].try_into().unwrap()),
                            flags: u16::from_be_bytes(rep.data[10..12].try_into().unwrap()),
                        });
                    }
                }
                REP_ACK => return Ok(info.expect("GO acknowledged without INFO_EXPORT")),
                k if k & 0x8000_0000 != 0 => return Err(rep),
                k => panic!("unexpected GO reply type {k:#x}"),
            }
        }
    }

    /// Sends one request header (and `payload`, which may differ from `len` on purpose).
    pub fn send_req(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        self.send(&req_bytes(flags, typ, cookie, offset, len, payload));
    }

    /// Reads a simple reply header and, when `payload` says so for this cookie, its data.
    pub fn reply(&mut self, payload: impl Fn(u64, u32) -> usize) -> SimpleReply {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = self.u32();
        let cookie = self.u64();
        let n = payload(cookie, error);
        let data = self.exact(n);
        SimpleReply {
            error,
            cookie,
            data,
        }
    }

    /// A reply that carries no data (writes, flushes, errors).
    pub fn reply_nodata(&mut self) -> SimpleReply {
        self.reply(|_, _| 0)
    }

    /// READ through simple replies; `Err(errno)` on an error reply.
    pub fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_req(0, CMD_READ, cookie, offset, len, &[]);
        let r = self.reply(|_, err| if err == 0 { len as usize } else { 0 });
        assert_eq!(r.cookie, cookie, "cookie echoed");
        if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        }
    }

    /// WRITE; returns the errno (0 = success).
    pub fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send_req(0, CMD_WRITE, cookie, offset, data.len() as u32, data);
        let r = self.reply_nodata();
        assert_eq!(r.cookie, cookie, "cookie echoed");
        r.error
    }

    /// Any data-less command (FLUSH, TRIM, WRITE_ZEROES, CACHE, unknown types); returns errno.
    pub fn cmd(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> u32 {
        self.send_req(flags, typ, cookie, offset, len, &[]);
        let r = self.reply_nodata();
        assert_eq!(r.cookie, cookie, "cookie echoed");
        r.error
    }

    /// FLUSH until it succeeds, waiting for each reply as long as the daemon may take
    /// (`FLUSH_REPLY_TIMEOUT`, not `IO_TIMEOUT`); an EIO (write-back still behind when
    /// `flush_timeout` ran out) is retried, at most `attempts` times in all. For storing setup
    /// data whose write-back is not what the test checks: thousands of small PUTs can take
    /// longer than `IO_TIMEOUT` on a loaded machine. Returns how long it took.
    pub fn flush_patiently(&mut self, cookie: u64, attempts: u32) -> Duration {
        let t = Instant::now();
        self.s
            .set_read_timeout(Some(FLUSH_REPLY_TIMEOUT))
            .expect("read timeout");
        for n in 1..=attempts {
            match self.cmd(0, CMD_FLUSH, cookie, 0, 0) {
                0 => break,
                EIO if n < attempts => continue,
                e => panic!("FLUSH attempt {n} of {attempts} failed with errno {e}"),
            }
        }
        self.s
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        t.elapsed()
    }

    /// Asserts the server closes the connection within the deadline, discarding whatever it
    /// still sends first; returns those bytes so callers can inspect them.
    pub fn expect_closed(&mut self, what: &str) -> Vec<u8> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "{what}: server did not close the connection"
            );
            match self.s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    assert!(
                        got.len() < 1 << 20,
                        "{what}: server keeps sending instead of closing"
                    );
                }
                Err(e) if is_reset(&e) => return got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("{what}: expected the server to close, got {e}"),
            }
        }
    }
}

/// `read_exact` that distinguishes a clean EOF before the first byte (`Ok(false)`).
fn read_full(s: &mut TcpStream, b: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < b.len() {
        match s.read(&mut b[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A peer reset counts as "closed" (the server may close with unread data in its buffer).
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// GO/INFO option data: name length, name, info request count and types.
pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// SET/LIST_META_CONTEXT data: export name, query count, queries.
pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// One option on the wire: IHAVEOPT, option, length, data.
pub fn opt_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    opt_bytes_claiming(option, data.len() as u32, data)
}

/// Like `opt_bytes` with a length field of `len`, which may lie about `data`.
pub fn opt_bytes_claiming(option: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// One request on the wire.
pub fn req_bytes(
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Deterministic, position- and seed-dependent bytes, so misplaced data is detected.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (x >> 29) as u8 | 1
        })
        .collect()
}

/// Asserts equal byte strings, describing the first difference instead of dumping both.
pub fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let zeros = got.iter().all(|&b| b == 0);
        panic!(
            "{what}: first difference at byte {i} of {}: got {:02x?}…, want {:02x?}…{}",
            got.len(),
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())],
            if zeros { " (got all zeros)" } else { "" }
        );
    }
}

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_ERROR: u16 = 32769;
pub const CHUNK_ERROR_OFFSET: u16 = 32770;
pub const CHUNK_FLAG_DONE: u16 = 1;

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Reads one structured chunk; panics on a simple reply (READ must never get one once
    /// structured replies are negotiated).
    pub fn chunk(&mut self) -> Chunk {
        let magic = self.u32();
        assert_eq!(
            magic, STRUCTURED_REPLY_MAGIC,
            "expected a structured reply chunk, got magic {magic:#x}"
        );
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32();
        assert!(len <= (32 << 20) + 64, "chunk length {len} is absurd");
        Chunk {
            flags,
            kind,
            cookie,
            payload: self.exact(len as usize),
        }
    }

    /// READ through structured replies: the reassembled bytes (holes as zeros) or the errno
    /// of an error chunk. Checks the chunks cover `[offset, offset+len)` exactly once.
    pub fn read_structured(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_req(0, CMD_READ, cookie, offset, len, &[]);
        let mut buf = vec![0u8; len as usize];
        let mut covered = vec![false; len as usize];
        let mut error = None;
        loop {
            let c = self.chunk();
            assert_eq!(c.cookie, cookie, "chunk cookie");
            let p = &c.payload;
            let at = |p: &[u8]| u64::from_be_bytes(p[..8].try_into().unwrap());
            let mark = |o: u64, n: usize, covered: &mut [bool]| {
                assert!(
                    o >= offset && o + n as u64 <= offset + len as u64,
                    "chunk {o}+{n} outside the request"
                );
                let s = (o - offset) as usize;
                for c in &mut covered[s..s + n] {
                    assert!(!*c, "byte {} covered twice", o);
                    *c = true;
                }
                s
            };
            match c.kind {
                CHUNK_OFFSET_DATA => {
                    let s = mark(at(p), p.len() - 8, &mut covered);
                    buf[s..s + p.len() - 8].copy_from_slice(&p[8..]);
                }
                CHUNK_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    mark(at(p), n, &mut covered);
                }
                CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
                    error = Some(u32::from_be_bytes(p[..4].try_into().unwrap()));
                }
                CHUNK_NONE => assert!(p.is_empty(), "NONE chunk with payload"),
                k => panic!("unexpected chunk type {k} in a READ reply"),
            }
            if c.flags & CHUNK_FLAG_DONE != 0 {
                break;
            }
        }
        match error {
            Some(e) => Err(e),
            None => {
                assert!(
                    covered.iter().all(|&c| c),
                    "READ chunks do not cover the whole range"
                );
                Ok(buf)
            }
        }
    }
}
