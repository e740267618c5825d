//! Crash safety ("a crash may lose writes not yet flushed, never flushed ones, and never
//! tears a block"): a writer keeps writing patterned data and flushing every
//! few writes, logging each write (offset, length, CRC32) only after its FLUSH (or its own FUA)
//! returned. The daemon is killed with SIGKILL at a random moment, restarted, and every
//! logged write of every round so far must read back exactly.
//!
//! Each write gets its own 96 KiB slot, so no later (possibly lost) write overlaps a logged
//! one; slots straddle 64 KiB blocks, so unflushed neighbours share blocks with flushed data
//! and a torn or stale read-modify-write shows up. S3 throttles some requests and loses some
//! PUT replies (fault proxy), so retries are in flight when the kill comes. The seed is printed; set
//! `NBD_S3_CRASH_SEED` to replay a run's choices.

use crate::common::fault_bed::FaultBed;
use crate::common::fault_proxy::{Fault, Op, Rule};
use crate::common::store_bed::KIB;
use crate::common::{nbdsh, poll_until, tool, wait_until, ExportSpec};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

const SLOT: u64 = 96 * KIB;
/// Slots each round may use (5 rounds × 64 slots × 96 KiB < 32 MiB).
pub(crate) const SLOTS_PER_ROUND: u64 = 64;
const ROUNDS: u64 = 5;

/// The writer: one connection, `slots` fresh slots from `first`, FLUSH every 1..=6 writes, an
/// occasional FUA write; logs `offset length crc32` of each write once it is durable.
pub(crate) fn start_writer(uri: &str, log: &Path, first: u64, seed: u64) -> Child {
    let errors = log.with_extension("stderr");
    let code = format!(
        r#"
import random, zlib
rng = random.Random({seed})
log = open({log:?}, 'a')
pending, every = [], rng.randint(1, 6)
for slot in range({first}, {last}):
    base = slot * {SLOT}
    off = base + rng.randrange(0, {SLOT} - 1)
    n = rng.randrange(1, base + {SLOT} - off + 1)
    data = rng.randbytes(n)
    fua = rng.random() < 0.1
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
    if fua:
        log.write('%d %d %d\n' % (off, n, zlib.crc32(data))); log.flush()
        continue
    pending.append((off, n, zlib.crc32(data)))
    if len(pending) >= every:
        h.flush()
        for p in pending:
            log.write('%d %d %d\n' % p)
        log.flush()
        pending, every = [], rng.randint(1, 6)
print('writer done')
"#,
        log = log.to_str().unwrap(),
        last = first + SLOTS_PER_ROUND,
    );
    tool("nbdsh")
        .args(["-u", uri, "-c", &code])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(errors).unwrap())
        .spawn()
        .expect("spawn writer")
}

pub(crate) fn logged(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

/// Reads back every logged write; returns (writes, bytes) verified, panics on any mismatch.
pub(crate) fn verify_log(uri: &str, log: &Path) -> (u64, u64) {
    let code = format!(
        r#"
import zlib
bad, n, total = [], 0, 0
for line in open({log:?}):
    off, ln, crc = map(int, line.split())
    if zlib.crc32(h.pread(ln, off)) != crc:
        bad.append((off, ln))
    n += 1; total += ln
print('verified', n, total)
for b in bad:
    print('LOST', *b)
"#,
        log = log.to_str().unwrap()
    );
    let out = nbdsh(uri, &[&code]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("LOST"),
        "flushed writes did not survive kill -9 (offset length):\n{text}"
    );
    let f: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("verified "))
        .unwrap_or_else(|| panic!("no summary: {text}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0], f[1])
}

pub(crate) fn reap(writer: &mut Child) {
    if !poll_until(Duration::from_secs(30), || {
        writer.try_wait().expect("try_wait").is_some()
    }) {
        let _ = writer.kill();
        let _ = writer.wait();
    }
}

#[test]
fn flushed_writes_survive_kill9_at_random_moments() {
    let seed: u64 = std::env::var("NBD_S3_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test seed {seed} (NBD_S3_CRASH_SEED={seed} replays the choices)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let export = ExportSpec::new("k").size("32MiB").block_size("64KiB");
    let mut bed = FaultBed::start(vec![export], seed, |b| b);
    // Some PUTs are being retried when the kill comes: throttled, or stored with the reply lost.
    bed.proxy.add(Rule::new(Fault::SlowDown).rate(0.1));
    bed.proxy
        .add(Rule::new(Fault::ResetAfter).only(&[Op::Put]).rate(0.05));
    let nbd = &mut bed.nbd;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("flushed.log");
    let (mut writes, mut bytes) = (0, 0);
    for round in 0..ROUNDS {
        let target = logged(&log) + rng.gen_range(3..=30);
        let mut writer = start_writer(&nbd.uri("k"), &log, round * SLOTS_PER_ROUND, rng.gen());
        wait_until("the writer to progress", Duration::from_secs(120), || {
            logged(&log) >= target || writer.try_wait().expect("try_wait").is_some()
        });
        if let Some(st) = writer.try_wait().unwrap() {
            let err = std::fs::read_to_string(log.with_extension("stderr")).unwrap_or_default();
            assert!(st.success(), "writer failed before the kill: {st}\n{err}");
        }
        // The random moment: somewhere in the next writes, flushes and write-backs.
        let delay = Duration::from_millis(rng.gen_range(0..300));
        std::thread::sleep(delay);
        let durable = logged(&log);
        nbd.kill9();
        reap(&mut writer);
        nbd.restart();
        let (w, b) = verify_log(&nbd.uri("k"), &log);
        assert!(w as usize >= durable, "log shrank");
        eprintln!(
            "round {round}: killed {delay:?} after {durable} logged writes; {w} writes ({b} bytes) read back exactly"
        );
        (writes, bytes) = (writes + w, bytes + b);
    }
    eprintln!(
        "{ROUNDS} crashes survived; {writes} write checks, {bytes} bytes verified in total; {}",
        bed.proxy.summary()
    );
}
