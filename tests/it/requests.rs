//! Fewer requests for the same work: a TRIM or WRITE_ZEROES of many blocks deletes their
//! objects with multi-object deletes (`DeleteObjects`, 1,000 keys a request), counted per
//! export and operation by the daemon and by the S3 side; a store answering that it has no
//! such request gets single deletes instead.

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
        let s3 = S3Server::start();
        let proxy = FaultProxy::start(s3.port(), 3);
        let nbd = NbdS3::builder(&s3)
            .config(|c| {
                c.endpoint = proxy.endpoint();
                c.metrics = Some(ANY_PORT.into());
            })
            .export(ExportSpec::new("vm").size("16MiB").block_size("4KiB"))
            .start();
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

    /// Writes `n` blocks of data from block 0 and flushes; all are stored.
    fn fill(&self, n: u64) {
        let len = n * BS;
        nbdsh(
            &self.nbd.uri("vm"),
            &[&format!("h.pwrite(b'\\x01' * {len}, 0)\nh.flush()")],
        );
        assert_eq!(self.blocks() as u64, n, "{}", self.proxy.summary());
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
    let table = bed.nbd.admin_ok(&["status"]);
    let per_gib = requests * (1 << 30) / ((2500 + 1200) * BS);
    assert!(
        table.contains("REQ/GIB") && table.contains(&format!(" {per_gib}")),
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
