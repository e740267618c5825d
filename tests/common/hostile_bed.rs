//! The hostile-client bed: the real daemon with one export on a real S3 server, plus a
//! "bystander" connection opened before the hostile act, so every test can check afterwards
//! that the bystander and a fresh connection are still served correctly.

use super::raw_nbd::{assert_bytes, pattern, Raw, CMD_FLUSH};
use super::store_bed::proc_status_kib;
use super::{ExportSpec, NbdS3, S3Server};

pub const EXPORT: &str = "hostile";
pub const SIZE: u64 = 16 << 20;

/// A running daemon with one export, plus a bystander connection (fields drop in order).
pub struct HostileBed {
    bystander: Raw,
    pub nbd: NbdS3,
    _s3: S3Server,
    pub addr: String,
    rounds: u64,
}

impl HostileBed {
    pub fn new() -> HostileBed {
        HostileBed::with_export(ExportSpec::new(EXPORT).size("16MiB"))
    }

    /// Like `new`, with the export `spec` (name `EXPORT` and size `SIZE` expected).
    pub fn with_export(spec: ExportSpec) -> HostileBed {
        let s3 = S3Server::start();
        let nbd = NbdS3::builder(&s3).export(spec).start();
        let addr = format!("127.0.0.1:{}", nbd.port());
        let (bystander, info) = Raw::open(&addr, EXPORT);
        assert_eq!(info.size, SIZE, "advertised size");
        let mut bed = HostileBed {
            bystander,
            nbd,
            _s3: s3,
            addr,
            rounds: 0,
        };
        bed.check_bystander();
        bed
    }

    /// A fresh handshake + transmission on the export.
    pub fn open(&self) -> Raw {
        Raw::open(&self.addr, EXPORT).0
    }

    /// The bystander writes a new pattern in its own 64 KiB region and reads it back.
    pub fn check_bystander(&mut self) {
        self.rounds += 1;
        let off = SIZE - 64 * 1024;
        let data = pattern(self.rounds, off, 64 * 1024);
        let c = 1000 + self.rounds;
        assert_eq!(self.bystander.write_at(c, off, &data), 0, "bystander write");
        let back = self
            .bystander
            .read_at(c, off, 64 * 1024)
            .expect("bystander read");
        assert_bytes("bystander read back", &back, &data);
    }

    /// Peak resident set of the daemon, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.nbd.pid(), "VmHWM:")
    }

    /// After a hostile act: the bystander still works and a fresh connection sees its data.
    pub fn check_served(&mut self) {
        self.check_bystander();
        let mut fresh = self.open();
        let off = SIZE - 64 * 1024;
        let back = fresh.read_at(7, off, 64 * 1024).expect("fresh read");
        assert_bytes(
            "fresh connection reading the bystander's data",
            &back,
            &pattern(self.rounds, off, 64 * 1024),
        );
        let d = pattern(99, 4096, 4096);
        assert_eq!(fresh.write_at(8, 4096, &d), 0, "fresh write");
        assert_eq!(fresh.read_at(9, 4096, 4096).expect("fresh read back"), d);
        assert_eq!(fresh.cmd(0, CMD_FLUSH, 10, 0, 0), 0, "fresh flush");
    }
}
