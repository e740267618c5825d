//! `durability = "local"`: a FLUSH is fsynced in the local journal and uploaded behind it in
//! flush order. kill -9 during a commit-style workload loses nothing flushed (replay at
//! start); losing the journal instead leaves S3 as of some FLUSH plus some of the writes
//! after it; a torn journal tail replays up to its last whole record; a full journal makes
//! writers wait without failing anything. S3 answers through the fault proxy with latency so
//! uploads lag behind the FLUSHes, which is what lets these tests fail.

use crate::common::config::quote;
use crate::common::daemon::NbdS3Builder;
use crate::common::fault_bed::FaultBed;
use crate::common::fault_proxy::{Fault, Op as S3Op, Rule};
use crate::common::{nbdsh, tool, wait_until, ExportSpec};
use crate::crash::{logged, reap, start_writer, verify_log, SLOTS_PER_ROUND};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn journaled(name: &str) -> ExportSpec {
    ExportSpec::new(name).line("durability = \"local\"")
}

/// `[cache] journal` in `dir` with `journal_size = size`.
fn with_journal(dir: &Path, size: &str) -> impl FnOnce(NbdS3Builder) -> NbdS3Builder {
    let lines = [
        format!("journal = {}", quote(&dir.to_string_lossy())),
        format!("journal_size = {}", quote(size)),
    ];
    move |b| b.config(|c| c.extra_cache.extend(lines))
}

/// Every PUT of a block object under `prefix` fails (the lease and manifest still work).
fn refuse_block_puts(prefix: &str) -> Rule {
    Rule::new(Fault::InternalError)
        .only(&[S3Op::Put])
        .key_contains(&format!("{prefix}0000"))
}

/// Segment files under the journal root (every export's directory).
fn segments(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "nbj") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn flushed_writes_survive_kill9_with_the_journal_while_s3_lags() {
    let seed: u64 = rand::random();
    eprintln!("journal crash seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let jdir = tempfile::tempdir().unwrap();
    let export = journaled("k").size("32MiB").block_size("64KiB");
    let mut bed = FaultBed::start(vec![export], seed, with_journal(jdir.path(), "256MiB"));
    bed.proxy.set_latency(Duration::from_millis(40));
    let nbd = &mut bed.nbd;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("flushed.log");
    let mut replayed = 0;
    for round in 0..3 {
        let target = logged(&log) + rng.gen_range(5..=30);
        let mut writer = start_writer(&nbd.uri("k"), &log, round * SLOTS_PER_ROUND, rng.gen());
        wait_until("the writer to progress", Duration::from_secs(120), || {
            logged(&log) >= target || writer.try_wait().expect("try_wait").is_some()
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
        let durable = logged(&log);
        nbd.kill9();
        reap(&mut writer);
        nbd.restart();
        let (w, _) = verify_log(&nbd.uri("k"), &log);
        assert!(w as usize >= durable);
        replayed += nbd.log_lines("journal replayed").len();
        eprintln!("round {round}: {w} flushed writes read back after kill -9");
    }
    assert!(
        replayed > 0,
        "no restart had anything to replay: S3 never lagged, the test proves nothing"
    );
}

/// One write of the lost-journal workload: which block, and the content's tag (0 = zeroes).
#[derive(Debug, Clone, Copy)]
struct Op {
    block: u64,
    tag: u64,
}

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 32;

/// The lost-journal writer: whole 4 KiB blocks tagged with a unique number (or zeroed), a
/// FLUSH every 1..=4 writes. Each write is logged before it is sent (`W block tag`) and each
/// FLUSH once it returned (`F`), so the log holds everything that may have reached the daemon.
fn lost_journal_writer(uri: &str, log: &Path, first_tag: u64, seed: u64) -> std::process::Child {
    let code = format!(
        r#"
import random, struct
rng = random.Random({seed})
log = open({log:?}, 'w')
tag, every, n = {first_tag}, rng.randint(1, 4), 0
for i in range(400):
    b = rng.randrange({BLOCKS})
    tag += 1
    zero = rng.random() < 0.15
    log.write('W %d %d\n' % (b, 0 if zero else tag)); log.flush()
    if zero:
        h.zero({BLOCK}, b * {BLOCK})
    else:
        h.pwrite(struct.pack('<QQ', tag, b) * ({BLOCK} // 16), b * {BLOCK})
    n += 1
    if n >= every:
        h.flush()
        log.write('F\n'); log.flush()
        n, every = 0, rng.randint(1, 4)
"#,
        log = log.to_str().unwrap(),
    );
    tool("nbdsh")
        .args(["-u", uri, "-c", &code])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer")
}

/// Epochs of the log: the writes between FLUSH replies (the last one possibly unfinished).
fn epochs(log: &Path) -> Vec<Vec<Op>> {
    let mut out = vec![Vec::new()];
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["F"] => out.push(Vec::new()),
            ["W", b, t] => out.last_mut().unwrap().push(Op {
                block: b.parse().unwrap(),
                tag: t.parse().unwrap(),
            }),
            _ => {} // a line cut short by the kill is never complete: the write was not sent
        }
    }
    out
}

/// Each block's tag as S3 holds it now (0: no object or zeroes); panics on a torn block.
fn s3_tags(bed: &FaultBed) -> Vec<u64> {
    (0..BLOCKS)
        .map(|b| {
            let key = format!("j/{b:016x}");
            let Some(data) = bed.s3.read_object("nbd", &key) else {
                return 0;
            };
            assert_eq!(data.len() as u64, BLOCK, "{key}");
            let head: [u8; 16] = data[..16].try_into().unwrap();
            if head == [0; 16] {
                assert!(data.iter().all(|&x| x == 0), "{key} is torn");
                return 0;
            }
            assert!(
                data.chunks(16).all(|c| c == head),
                "{key} is torn or from a mixed write"
            );
            let tag = u64::from_le_bytes(head[..8].try_into().unwrap());
            assert_eq!(u64::from_le_bytes(head[8..].try_into().unwrap()), b);
            tag
        })
        .collect()
}

/// Whether `s3` is the state after FLUSH k plus any subset of epoch k+1's writes, for some k.
fn flush_consistent(base: &[u64], epochs: &[Vec<Op>], s3: &[u64]) -> Option<usize> {
    let mut state = base.to_vec();
    for k in 0..epochs.len() {
        if k > 0 {
            for op in &epochs[k - 1] {
                state[op.block as usize] = op.tag;
            }
        }
        // State after the FLUSH ending epoch k-1 (k = 0: the base); epoch k may be partly in.
        let mut next: HashMap<u64, Vec<u64>> = HashMap::new();
        for op in &epochs[k] {
            next.entry(op.block).or_default().push(op.tag);
        }
        let ok = (0..BLOCKS as usize).all(|b| {
            s3[b] == state[b] || next.get(&(b as u64)).is_some_and(|t| t.contains(&s3[b]))
        });
        if ok {
            return Some(k);
        }
    }
    None
}

#[test]
fn s3_stays_flush_consistent_when_the_journal_is_lost_at_random_kills() {
    let seed: u64 = rand::random();
    eprintln!("lost-journal seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let jdir = tempfile::tempdir().unwrap();
    let export = journaled("j").size("128KiB").block_size("4KiB");
    let mut bed = FaultBed::start(vec![export], seed, with_journal(jdir.path(), "64MiB"));
    // Uploads lag behind FLUSHes (which only wait for the local fsync), and some take much
    // longer than others: without epoch order, later writes would often land first.
    bed.proxy.set_latency(Duration::from_millis(10));
    bed.proxy.add(
        Rule::new(Fault::Delay)
            .only(&[S3Op::Put, S3Op::Delete])
            .rate(0.3)
            .delay(Duration::from_millis(80)),
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ops.log");
    let mut base = vec![0u64; BLOCKS as usize];
    let (mut behind, mut kills) = (0, 0);
    for round in 0..50u64 {
        let mut writer = lost_journal_writer(&bed.nbd.uri("j"), &log, round * 1000, rng.gen());
        let target = rng.gen_range(5..150);
        wait_until("the writer to progress", Duration::from_secs(60), || {
            epochs(&log).iter().map(Vec::len).sum::<usize>() >= target
                || writer.try_wait().expect("try_wait").is_some()
        });
        bed.nbd.kill9();
        kills += 1;
        reap(&mut writer);
        let ep = epochs(&log);
        let s3 = s3_tags(&bed);
        let Some(k) = flush_consistent(&base, &ep, &s3) else {
            panic!(
                "round {round}: S3 is not as of any FLUSH plus later writes\n\
                 base {base:?}\nS3   {s3:?}\nepochs {ep:?}"
            );
        };
        if k + 1 < ep.len() {
            behind += 1;
        }
        // The local disk is lost: no replay; the next daemon starts from S3 alone.
        std::fs::remove_dir_all(jdir.path()).unwrap();
        base = s3;
        bed.nbd.restart();
    }
    eprintln!("{kills} kills, S3 lagged behind the last FLUSH in {behind}");
    assert!(
        behind >= 10,
        "uploads rarely lagged ({behind} of {kills}): the test proves little"
    );
}

#[test]
fn a_torn_journal_tail_replays_up_to_the_last_whole_record() {
    let jdir = tempfile::tempdir().unwrap();
    let export = journaled("t").size("4MiB").block_size("64KiB");
    let mut bed = FaultBed::start(vec![export], 1, with_journal(jdir.path(), "64MiB"));
    let uri = bed.nbd.uri("t");
    // S3 takes no block: everything flushed lives in the journal only.
    bed.proxy.add(refuse_block_puts("t/"));
    nbdsh(
        &uri,
        &[r#"
h.pwrite(b'A' * 5000, 1000)
h.flush()
h.pwrite(b'B' * 8000, 200000)
h.flush()
"#],
    );
    bed.nbd.kill9();
    let seg = segments(jdir.path()).pop().expect("a journal segment");
    let len = std::fs::metadata(&seg).unwrap().len();
    // The records end: ... write B (32 + 8000 bytes), flush (32). Cut into B's payload.
    let cut = len - 32 - 4000;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut)
        .unwrap();
    bed.proxy.clear();
    bed.nbd.restart();
    bed.nbd
        .wait_for_log("torn or damaged record", Duration::from_secs(30));
    bed.nbd
        .wait_for_log("journal replayed", Duration::from_secs(30));
    let out = nbdsh(
        &bed.nbd.uri("t"),
        &[r#"
assert h.pread(5000, 1000) == b'A' * 5000, 'flushed write lost'
assert h.pread(8000, 200000) == bytes(8000), 'a torn record was applied'
print('ok')
"#],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    assert!(
        bed.s3.read_object("nbd", "t/0000000000000000").is_some(),
        "replayed data is stored in S3 before the export is served"
    );
}

#[test]
fn a_full_journal_makes_writers_wait_and_nothing_fails() {
    let jdir = tempfile::tempdir().unwrap();
    let export = journaled("f").size("16MiB").block_size("64KiB");
    let mut bed = FaultBed::start(vec![export], 2, with_journal(jdir.path(), "1MiB"));
    bed.proxy.set_latency(Duration::from_millis(20));
    let uri = bed.nbd.uri("f");
    let out = nbdsh(
        &uri,
        &[r#"
import hashlib
data = bytes(range(256)) * (8 * 1024 * 1024 // 256)
for off in range(0, len(data), 256 * 1024):
    h.pwrite(data[off:off + 256 * 1024], off)
    if off % (1024 * 1024) == 0:
        h.flush()
h.flush()
assert h.pread(len(data), 0) == data
print('ok', hashlib.sha256(data).hexdigest())
"#],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    let held: u64 = segments(jdir.path())
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(
        held <= 1 << 20,
        "the journal holds {held} bytes, above its 1MiB size"
    );
    let status = bed.nbd.admin_ok(&["status"]);
    assert!(
        status.lines().next().unwrap_or("").contains("JOURNAL"),
        "{status}"
    );
    let samples = crate::common::metrics::Metrics::of(&bed.nbd).scrape();
    assert!(
        samples
            .iter()
            .any(|s| s.metric == "nbd_s3_export_journal_bytes"),
        "no journal gauge in /metrics"
    );
    // SIGTERM drains everything to S3 and leaves the journal empty.
    bed.nbd.sigterm();
    let status = bed.nbd.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    assert!(bed.s3.read_object("nbd", "f/000000000000007f").is_some());
    let left: u64 = segments(jdir.path())
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert_eq!(left, 0, "a clean stop leaves no journal to replay");
}

#[test]
fn a_crash_during_replay_replays_again() {
    let jdir = tempfile::tempdir().unwrap();
    let export = journaled("r").size("4MiB").block_size("64KiB");
    let mut bed = FaultBed::start(vec![export], 3, with_journal(jdir.path(), "64MiB"));
    let uri = bed.nbd.uri("r");
    bed.proxy.add(refuse_block_puts("r/"));
    nbdsh(&uri, &["h.pwrite(b'R' * 70000, 12345)\nh.flush()\n"]);
    bed.nbd.kill9();
    bed.proxy.clear();
    for step in ["journal-replay-applied", "journal-replay-stored"] {
        bed.nbd.set_env("NBD_S3_CRASH_AT", Some(step));
        // Exports open before READY: the process dies before it, or right after.
        if bed.nbd.try_restart().is_ok() {
            let status = bed.nbd.wait_exit(Duration::from_secs(60));
            assert!(!status.success(), "the daemon did not die at {step}");
        }
    }
    bed.nbd.set_env("NBD_S3_CRASH_AT", None);
    bed.nbd.restart();
    let out = nbdsh(
        &bed.nbd.uri("r"),
        &["assert h.pread(70000, 12345) == b'R' * 70000\nprint('ok')\n"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}
