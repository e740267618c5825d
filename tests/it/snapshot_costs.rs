//! Measurements for the README, not checks (ignored by default; run with
//! `cargo test --release --test it snapshot_costs -- --ignored --nocapture`): the time and S3
//! requests of `snapshot create` on a 1 TiB export holding 10,000 blocks, and read throughput
//! through a chain of 10 snapshots against a plain export holding the same data.

use crate::common::metrics::{total, Metrics, ANY_PORT};
use crate::common::store_bed::{nbd_write, Bed, BUCKET};
use crate::common::{nbdcopy, pattern, ExportSpec};
use std::time::Instant;

const BS: usize = 128 << 10;

fn requests(m: &Metrics) -> f64 {
    total(&m.scrape(), "nbd_s3_backend_requests_total")
}

#[test]
#[ignore = "measurement"]
fn snapshot_create_cost_on_a_1tib_export_with_10000_blocks() {
    let mut bed = Bed::start_with(vec![ExportSpec::new("big").size("1TiB")], |b| {
        b.config(|c| c.metrics = Some(ANY_PORT.into()))
    });
    // 10,000 blocks spread over the export, written behind the daemon's back; the restart
    // lists them.
    let block = pattern(BS, 7);
    for i in 0..10_000u64 {
        let index = i * 838_860; // spread over 8 Mi blocks (1 TiB / 128 KiB)
        bed.s3
            .write_object(BUCKET, &format!("big/{index:016x}"), &block);
    }
    bed.stop_and_restart();
    // Some writes still dirty when the snapshot is taken: the create stores them first.
    let dirty: Vec<(u64, Vec<u8>)> = (0..16)
        .map(|i| (i * BS as u64 * 3, vec![1; 4096]))
        .collect();
    nbd_write(&bed.uri("big"), &dirty, false);
    let m = Metrics::of(&bed.nbd);
    let before = requests(&m);
    let t = Instant::now();
    bed.nbd.admin_ok(&["snapshot", "create", "big", "s1"]);
    let took = t.elapsed();
    let during = requests(&m) - before;
    let t = Instant::now();
    bed.nbd.admin_ok(&["snapshot", "create", "big", "s2"]);
    let clean = t.elapsed();
    let clean_requests = requests(&m) - before - during;
    eprintln!(
        "snapshot create, 1 TiB export with 10,000 blocks: {took:?} and {during} S3 requests with 16 dirty blocks (16 PUTs + manifest GET + conditional PUT); {clean:?} and {clean_requests} requests with nothing dirty"
    );
}

#[test]
#[ignore = "measurement"]
fn read_throughput_through_ten_snapshots_against_a_plain_export() {
    let mut bed = Bed::start(vec![
        ExportSpec::new("plain").size("256MiB"),
        ExportSpec::new("layered").size("256MiB"),
    ]);
    let data = pattern(256 << 20, 3);
    for name in ["plain", "layered"] {
        let ops: Vec<(u64, Vec<u8>)> = data
            .chunks(32 << 20)
            .enumerate()
            .map(|(i, c)| ((i as u64) << 25, c.to_vec()))
            .collect();
        nbd_write(&bed.uri(name), &ops, true);
    }
    // 10 snapshots, each after rewriting a few blocks: reads resolve through 11 layers.
    for s in 0..10u64 {
        bed.nbd
            .admin_ok(&["snapshot", "create", "layered", &format!("s{s}")]);
        let ops: Vec<(u64, Vec<u8>)> = (0..8)
            .map(|i| ((s * 8 + i) * 4 * BS as u64, data[..BS].to_vec()))
            .collect();
        nbd_write(&bed.uri("layered"), &ops, true);
        nbd_write(&bed.uri("plain"), &ops, true);
    }
    bed.stop_and_restart(); // cold caches: every block is a GET
    for name in ["plain", "layered", "plain", "layered"] {
        let t = Instant::now();
        nbdcopy(&[&bed.uri(name), "null:"]);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "{name}: 256 MiB read in {secs:.2} s = {:.0} MiB/s",
            256.0 / secs
        );
        bed.stop_and_restart();
    }
}
