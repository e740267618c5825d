//! Fewer requests for the same work: a TRIM or WRITE_ZEROES of many blocks, a snapshot
//! delete and `gc` delete their objects with multi-object deletes (`DeleteObjects`, 1,000
//! keys a request), counted per export and operation by the daemon and by the S3 side; a
//! store answering that it has no such request gets single deletes instead.

use crate::common::fault_proxy::{Fault, FaultProxy, Op, Rule};
use crate::common::metrics::{get, Metrics, ANY_PORT, S3_OPS};
use crate::common::{nbdsh, ExportSpec, NbdS3, S3Server};

const BS: u64 = 4096;

struct Bed {
    s3: S3Server,
    proxy: FaultProxy,
    nbd: NbdS3,
    metrics: Metrics,
}

impl Bed {
    /// An export of 4 KiB blocks, so thousands of blocks are a few MiB.
    fn start() -> Bed {
        Bed::start_with(&[])
    }

    /// [`Bed::start`] with environment variables for the daemon (a crash point).
    fn start_with(env: &[(&str, &str)]) -> Bed {
        let s3 = S3Server::start();
        let proxy = FaultProxy::start(s3.port(), 3);
        let mut builder = NbdS3::builder(&s3)
            .config(|c| {
                c.endpoint = proxy.endpoint();
                c.metrics = Some(ANY_PORT.into());
            })
            .export(ExportSpec::new("vm").size("16MiB").block_size("4KiB"));
        for (k, v) in env {
            builder = builder.env(k, v);
        }
        let nbd = builder.start();
        let metrics = Metrics::of(&nbd);
        Bed {
            s3,
            proxy,
            nbd,
            metrics,
        }
    }

    /// Block objects in the bucket (not the manifest or the lease).
    fn blocks(&self) -> usize {
        let keys = self.s3.list_keys("nbd", "vm/");
        keys.iter().filter(|k| !k.contains("nbd-s3")).count()
    }

    /// The daemon's count of `op` requests for the export.
    fn counted(&self, op: &str) -> u64 {
        let samples = self.metrics.scrape();
        get(
            &samples,
            "nbd_s3_export_s3_requests_total",
            &[("export", "vm"), ("op", op)],
        ) as u64
    }

    /// Every request the daemon counted for the export.
    fn counted_all(&self) -> u64 {
        S3_OPS.iter().map(|op| self.counted(op)).sum()
    }

    /// (multi-object deletes, single deletes), as the S3 side and the daemon counted them.
    fn deletes(&self) -> [u64; 4] {
        [
            self.proxy.requests(Op::DeleteObjects),
            self.proxy.requests(Op::Delete),
            self.counted("delete_objects"),
            self.counted("delete"),
        ]
    }

    /// Writes `n` blocks of `byte` from block 0 and flushes.
    fn write(&self, n: u64, byte: u8) {
        let len = n * BS;
        nbdsh(
            &self.nbd.uri("vm"),
            &[&format!("h.pwrite(b'\\x{byte:02x}' * {len}, 0)\nh.flush()")],
        );
    }

    /// Writes `n` blocks of data from block 0 and flushes; all are stored.
    fn fill(&self, n: u64) {
        self.write(n, 1);
        assert_eq!(self.blocks() as u64, n, "{}", self.proxy.summary());
    }

    /// Takes snapshot `s1` of `n` written blocks, then rewrites them all: `s1` alone reads
    /// its `n` objects.
    fn snapshot_holding(&self, n: u64) {
        self.write(n, 1);
        self.nbd.admin_ok(&["snapshot", "create", "vm", "s1"]);
        self.write(n, 2);
        assert_eq!(self.blocks() as u64, 2 * n, "{}", self.proxy.summary());
    }

    /// Runs an admin command that deletes objects; returns how many it says it deleted,
    /// having checked that it took one multi-object delete per 1,000 of them and no single
    /// delete, on both sides.
    fn batched(&self, args: &[&str]) -> u64 {
        let before = self.deletes();
        let out = self.nbd.admin_ok(args);
        let count: Option<u64> = out.split_whitespace().find_map(|w| w.parse().ok());
        let n = count.unwrap_or_else(|| panic!("{args:?}: no count in {out:?}"));
        let batches = n.div_ceil(1000);
        assert_eq!(
            delta(self.deletes(), before),
            [batches, 0, batches, 0],
            "{args:?} deleted {n}: {}",
            self.proxy.summary()
        );
        n
    }

    /// Runs `call` (an nbdsh handle method: trim or zero) over `n` blocks, then FLUSH; the
    /// blocks read back as zeros and no block object is left.
    fn clear(&self, call: &str, n: u64) {
        let len = n * BS;
        nbdsh(
            &self.nbd.uri("vm"),
            &[&format!(
                "h.{call}({len}, 0)\nh.flush()\nassert h.pread({len}, 0) == bytes({len})"
            )],
        );
        assert_eq!(self.blocks(), 0, "{}", self.proxy.summary());
    }
}

fn delta(after: [u64; 4], before: [u64; 4]) -> [u64; 4] {
    [0, 1, 2, 3].map(|i| after[i] - before[i])
}

#[test]
fn a_large_trim_or_zero_deletes_a_thousand_objects_per_request() {
    let bed = Bed::start();
    bed.fill(2500);
    let before = bed.deletes();
    bed.clear("trim", 2500);
    // ⌈2500 / 1000⌉ = 3 on both sides, and not one single delete.
    assert_eq!(
        delta(bed.deletes(), before),
        [3, 0, 3, 0],
        "{}",
        bed.proxy.summary()
    );

    bed.fill(1200);
    let before = bed.deletes();
    bed.clear("zero", 1200);
    assert_eq!(
        delta(bed.deletes(), before),
        [2, 0, 2, 0],
        "{}",
        bed.proxy.summary()
    );

    // `status` says what the writes cost: the export's requests per GiB written.
    // (The idle lease release may fall in between: the count is bracketed.)
    let counted_before = bed.counted_all();
    let status: serde_json::Value =
        serde_json::from_str(&bed.nbd.admin_ok(&["status", "--json"])).expect("status JSON");
    let vm = &status["exports"][0];
    assert_eq!(vm["bytes_written"], (2500 + 1200) * BS, "{status}");
    let requests = vm["s3_requests"].as_u64().expect("s3_requests");
    assert!(
        (counted_before..=bed.counted_all()).contains(&requests),
        "{status}"
    );
    // The table is a second look: the idle lease release may fall in between again.
    let per_gib = |requests: u64| requests * (1 << 30) / ((2500 + 1200) * BS);
    let table = bed.nbd.admin_ok(&["status"]);
    let counted_after = bed.counted_all();
    assert!(table.contains("REQ/GIB"), "{table}");
    let shown: Option<u64> = table
        .lines()
        .find(|l| l.starts_with("vm "))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok());
    assert!(
        shown.is_some_and(|v| (per_gib(requests)..=per_gib(counted_after)).contains(&v)),
        "{table}"
    );
}

/// The S3 side saw `batches` multi-object deletes and `n` single deletes; the daemon counted
/// the same (a single delete retried after a dropped connection counts twice there).
fn singles(d: [u64; 4], batches: u64, n: u64, bed: &Bed) {
    let [s3_batches, s3_singles, batches_counted, singles_counted] = d;
    assert_eq!(
        (s3_batches, s3_singles, batches_counted),
        (batches, n, batches),
        "{}",
        bed.proxy.summary()
    );
    assert!(
        (n..=n + n / 10).contains(&singles_counted),
        "{singles_counted} single deletes counted for {n}: {}",
        bed.proxy.summary()
    );
}

#[test]
fn a_store_without_multi_object_delete_gets_single_deletes() {
    let bed = Bed::start();
    bed.proxy
        .add(Rule::new(Fault::NotImplemented).only(&[Op::DeleteObjects]));
    bed.fill(300);
    let before = bed.deletes();
    bed.clear("trim", 300);
    // One refused multi-object delete (remembered), then one request per object.
    singles(delta(bed.deletes(), before), 1, 300, &bed);
    bed.fill(10);
    let before = bed.deletes();
    bed.clear("trim", 10);
    singles(delta(bed.deletes(), before), 0, 10, &bed);
}

#[test]
fn a_snapshot_delete_and_gc_delete_a_thousand_objects_per_request() {
    let bed = Bed::start();
    bed.snapshot_holding(2500);
    // ⌈2500 / 1000⌉ = 3 requests, and the head's 2500 objects are left.
    assert_eq!(bed.batched(&["snapshot", "delete", "vm", "s1"]), 2500);
    assert_eq!(bed.blocks(), 2500, "{}", bed.proxy.summary());

    // Objects of a layer the manifest does not list (what a crashed creation leaves).
    for block in 0..1500u64 {
        let key = format!("vm/layers/{:016x}/{block:016x}", 0xff);
        bed.s3.write_object("nbd", &key, b"left over");
    }
    assert_eq!(bed.batched(&["gc", "vm"]), 1500);
    assert_eq!(bed.blocks(), 2500, "{}", bed.proxy.summary());
    assert_eq!(bed.batched(&["gc", "vm"]), 0);
}

#[test]
fn a_snapshot_delete_cut_by_a_crash_leaves_objects_gc_deletes_in_batches() {
    // Before the first delete, and after the first batch returned (the others in flight
    // may or may not have finished, wholly or partly).
    for (step, left) in [
        ("snapshot-delete-written", 1200..=1200),
        ("collect-partial", 0..=200),
    ] {
        let mut bed = Bed::start_with(&[("NBD_S3_CRASH_AT", step)]);
        bed.snapshot_holding(1200);
        let out = bed.nbd.admin(&["snapshot", "delete", "vm", "s1"]);
        assert_eq!(out.status.code(), Some(3), "{step}: {out:?}");
        let status = bed.nbd.wait_exit(std::time::Duration::from_secs(60));
        assert!(!status.success(), "{step}: the crash hook aborts: {status}");
        bed.nbd.set_env("NBD_S3_CRASH_AT", None);
        bed.nbd.restart();
        bed.metrics = Metrics::of(&bed.nbd);

        let collected = bed.batched(&["gc", "vm"]);
        assert!(left.contains(&collected), "{step}: gc deleted {collected}");
        assert_eq!(bed.blocks(), 1200, "{step}: {}", bed.proxy.summary());
        nbdsh(
            &bed.nbd.uri("vm"),
            &[&format!(
                "assert h.pread({len}, 0) == b'\\x02' * {len}",
                len = 1200 * BS
            )],
        );
    }
}
