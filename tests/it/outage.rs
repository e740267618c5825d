//! A 30 s S3 outage: the fault proxy resets every connection and request for 30 s.
//! While S3 is away, writes are taken into the cache up to the dirty limit, a writer past the
//! limit waits (it is still pending when the outage ends), and FLUSH fails with EIO after
//! `[cache] flush_timeout`. Once S3 is back the writer finishes and FLUSH succeeds; after
//! kill -9 + restart every flushed byte reads back (fio verify for the bytes fio wrote during
//! the outage, a reference image for the rest). The export keeps its default lease, which a
//! 30 s outage must not fence.

use crate::common::fault_bed::FaultBed;
use crate::common::store_bed::{
    apply, assert_bucket_matches, assert_image, flush_until_ok, nbd_read, nbd_write as write_ops,
    ops_code, KIB, MIB,
};
use crate::common::{self, nbdsh, poll_until, tool, ExportSpec};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(30);
const BS: u64 = 64 * KIB;
const DIRTY: u64 = 2 * MIB;
/// `[cache] flush_timeout` of the daemon under test.
const FLUSH_TIMEOUT: f64 = 5.0;
/// fio writes (and verifies) this region during the outage: 3/4 of the dirty limit.
const FIO_OFFSET: u64 = 8 * MIB;
const FIO_SIZE: u64 = 1536 * KIB;
/// The blocking writer's whole blocks: twice the dirty limit.
const WRITER_FIRST_BLOCK: u64 = 32;
const WRITER_BLOCKS: u64 = 2 * DIRTY / BS;

/// One nbdsh run on its own connection: writes `ops`, then FLUSH; prints `flushed` or
/// `flush-errno N`, and the FLUSH's duration.
fn write_then_try_flush(uri: &str, ops: &[(u64, Vec<u8>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let code = format!(
        "{}import time\nfor o, b in ops:\n    h.pwrite(b, o)\nt = time.monotonic()\n\
         try:\n    h.flush()\n    print('flushed')\nexcept nbd.Error as e:\n    print('flush-errno', e.errno)  # libnbd gives the name, e.g. EIO\n\
         print('flush-seconds', time.monotonic() - t)\n",
        ops_code(dir.path(), ops)
    );
    let out = nbdsh(uri, &[&code]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The FLUSH duration `write_then_try_flush` printed.
fn flush_seconds(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("flush-seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no flush-seconds in {out:?}"))
}

/// fio on the fio region: random 4-64 KiB writes covering it once, each verified (crc32c)
/// right after; `verify_only` re-reads what the same job wrote (same seed), e.g. after a
/// restart. fio runs in `dir` (it leaves verify state files there).
fn fio(uri: &str, verify_only: bool, dir: &Path) -> std::process::Output {
    let mut cmd = tool("fio");
    cmd.current_dir(dir)
        .args(["--name=outage", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(["--rw=randwrite", "--bsrange=4k-64k", "--iodepth=4"])
        .arg(format!("--offset={FIO_OFFSET}"))
        .arg(format!("--size={FIO_SIZE}"))
        .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"]);
    if verify_only {
        cmd.arg("--verify_only");
    }
    common::run(&mut cmd)
}

/// Starts an nbdsh writing `ops` in order, printing a line after each completed write to the
/// file `progress` (the count of lines is how far it got).
fn spawn_writer(uri: &str, ops: &[(u64, Vec<u8>)], dir: &Path, progress: &Path) -> Child {
    let code = format!(
        "{}for i, (o, b) in enumerate(ops):\n    h.pwrite(b, o)\n    print('wrote', i + 1, flush=True)\n",
        ops_code(dir, ops)
    );
    let mut cmd: Command = tool("nbdsh");
    cmd.args(["-u", uri, "-c", &code])
        .stdout(std::fs::File::create(progress).unwrap())
        .stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// Writes completed so far by `spawn_writer`'s nbdsh.
fn progress(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().count() as u64
}

/// fio fills 3/4 of the dirty limit while S3 is away: every write and its read-back verify
/// must succeed, well before the outage ends.
fn fio_fills_cache_during_outage(uri: &str, dir: &Path, outage_ends: Instant) {
    let t = Instant::now();
    let out = fio(uri, false, dir);
    assert!(
        out.status.success(),
        "fio writing {FIO_SIZE} bytes (under the dirty limit) during the outage failed: {}",
        common::show(&out)
    );
    assert!(
        Instant::now() < outage_ends,
        "fio only finished after the outage; the test proves nothing about it"
    );
    eprintln!(
        "fio wrote+verified {FIO_SIZE} bytes during the outage in {:?}",
        t.elapsed()
    );
}

/// A FLUSH during the outage fails with EIO, and not before `flush_timeout`.
fn flush_fails_with_eio(uri: &str, outage_ends: Instant) {
    let out = write_then_try_flush(uri, &[]);
    assert!(
        out.contains("flush-errno EIO"),
        "FLUSH during the outage must fail with EIO: {out}"
    );
    let secs = flush_seconds(&out);
    assert!(
        (FLUSH_TIMEOUT - 0.1..FLUSH_TIMEOUT + 10.0).contains(&secs),
        "FLUSH failed after {secs:.2} s; flush_timeout is {FLUSH_TIMEOUT} s"
    );
    assert!(
        Instant::now() < outage_ends,
        "FLUSH returned after the outage"
    );
    eprintln!("FLUSH during the outage: EIO after {secs:.2} s");
}

/// Watches the writer until the outage ends: it must stay pending, short of its last write.
/// Returns how many writes it had completed in the outage's last observation.
fn writer_waits_for_the_outage(writer: &mut Child, path: &Path, outage_ends: Instant) -> u64 {
    let mut done = 0;
    // Only observations made entirely within the outage count (S3 is needed to get further):
    // on a loaded machine a read that started just before the end may finish after it.
    while Instant::now() + Duration::from_secs(1) < outage_ends {
        let seen = progress(path);
        let pending = writer.try_wait().unwrap().is_none();
        if Instant::now() >= outage_ends {
            break;
        }
        assert!(
            pending && seen < WRITER_BLOCKS,
            "a writer of twice the dirty limit finished during the S3 outage ({seen} writes)"
        );
        done = seen;
        std::thread::sleep(Duration::from_millis(100));
    }
    done
}

/// After the outage: the writer finishes (every write succeeded) within `timeout`.
fn writer_finishes(mut writer: Child, path: &Path, timeout: Duration) -> Duration {
    let t = Instant::now();
    let mut status = None;
    let finished = poll_until(timeout, || {
        status = writer.try_wait().expect("try_wait");
        status.is_some()
    });
    assert!(
        finished,
        "writer still blocked {timeout:?} after the outage ({} writes)",
        progress(path)
    );
    let status = status.expect("exited");
    let out = writer.wait_with_output().unwrap();
    assert!(
        status.success(),
        "writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(progress(path), WRITER_BLOCKS, "writes the writer completed");
    t.elapsed()
}

#[test]
fn s3_outage_of_30s_fills_cache_blocks_writer_flush_eio_then_nothing_lost() {
    // The default lease stays on: it must not fence the export during a 30 s outage.
    let spec = ExportSpec::new("o").size("16MiB").block_size("64KiB");
    let mut bed = FaultBed::start(vec![spec], 7, |b| {
        b.cache("32MiB", "2MiB").flush_timeout("5s")
    });
    let uri = bed.nbd.uri("o");
    let (fio_dir, tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut image = vec![0u8; FIO_OFFSET as usize];
    let block = |i: u64, seed: u64| (i * BS, common::pattern(BS as usize, seed));
    let before: Vec<_> = (0..8).map(|i| block(i, 100 + i)).collect();
    apply(&mut image, &before);
    write_ops(&uri, &before, true);

    // The proxy ends the outage by itself, even if a step below hangs waiting for S3.
    let outage_ends = bed.proxy.outage_for(OUTAGE);
    fio_fills_cache_during_outage(&uri, fio_dir.path(), outage_ends);
    let blocks = WRITER_FIRST_BLOCK..WRITER_FIRST_BLOCK + WRITER_BLOCKS;
    let more: Vec<_> = blocks.map(|i| block(i, 300 + i)).collect();
    apply(&mut image, &more);
    let path = tmp.path().join("progress");
    let mut writer = spawn_writer(&uri, &more, tmp.path(), &path);
    flush_fails_with_eio(&uri, outage_ends);
    // Cached data reads back exactly while S3 is away.
    let got = nbd_read(&uri, 0, 8 * BS);
    assert_image(
        "cached blocks during the outage",
        &got,
        &image[..got.len()],
        BS,
    );
    let stuck_at = writer_waits_for_the_outage(&mut writer, &path, outage_ends);
    let at_rest = FIO_SIZE + stuck_at * BS;
    eprintln!("writer pending at the outage's end after {stuck_at} of {WRITER_BLOCKS} writes; {at_rest} bytes dirty");
    assert!(
        at_rest + 2 * BS >= DIRTY,
        "writers waited with only {at_rest} of {DIRTY} dirty bytes in the cache"
    );
    assert!(
        at_rest <= DIRTY + BS,
        "{at_rest} bytes were taken into the cache during the outage; the dirty limit is {DIRTY}"
    );
    let refused = bed.proxy.refused();
    assert!(refused > 0, "the outage refused nothing");

    let took = writer_finishes(writer, &path, Duration::from_secs(90));
    let t = Instant::now();
    let attempts = flush_until_ok(&uri, 20);
    let flushed_in = t.elapsed();
    eprintln!("after S3 came back: writer done in {took:?}, then FLUSH ok at attempt {attempts} after {flushed_in:?}");
    assert_bucket_matches(&bed.s3, "o/", &image, BS);
    eprintln!(
        "{refused} connections/requests refused; {}",
        bed.proxy.summary()
    );
    bed.nbd.kill9();
    bed.nbd.restart();
    let uri = bed.nbd.uri("o");
    assert_image(
        "after kill -9 + restart",
        &nbd_read(&uri, 0, FIO_OFFSET),
        &image,
        BS,
    );
    let out = fio(&uri, true, fio_dir.path());
    assert!(
        out.status.success(),
        "fio verify after restart: {}",
        common::show(&out)
    );
}
