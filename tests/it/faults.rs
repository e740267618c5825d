//! S3 faults between the daemon and a real S3 server, injected by the fault proxy:
//! transient 5xx never reach an NBD client (the 30 s outage is in `outage.rs`); cut-short,
//! reset or corrupted replies never give wrong data; a corrupt object gives EIO and a log line
//! naming its key. Every check is against a reference image kept in the test, after a
//! kill -9 + restart so reads really come from S3.

use crate::common::fault_bed::{random_ops, seeded_rng, FaultBed};
use crate::common::fault_proxy::{Fault, Op, Rule};
use crate::common::store_bed::{
    apply, assert_bucket_matches, assert_image, block_key, nbd_read as read_range,
    nbd_write as write_ops, proc_status_kib, BUCKET, KIB, MIB,
};
use crate::common::{self, nbdsh, show, tool, ExportSpec};
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn transient_5xx_never_reach_the_client() {
    let (size, bs) = (8 * MIB, 64 * KIB);
    let (seed, mut rng) = seeded_rng();
    let mut bed = FaultBed::start(
        vec![ExportSpec::new("t").size("8MiB").block_size("64KiB")],
        seed,
        |b| b,
    );
    // About a quarter of all requests fail: 15% SlowDown, then 12% of the rest InternalError.
    bed.proxy.add(Rule::new(Fault::SlowDown).rate(0.15));
    bed.proxy.add(Rule::new(Fault::InternalError).rate(0.12));
    let mut image = vec![0u8; size as usize];
    for round in 0..3 {
        let ops = random_ops(&mut rng, size, 25);
        apply(&mut image, &ops);
        write_ops(&bed.nbd.uri("t"), &ops, round == 2);
    }
    assert_bucket_matches(&bed.s3, "t/", &image, bs);
    let after_writes = bed.proxy.summary();
    bed.crash_and_restart();
    let got = read_range(&bed.nbd.uri("t"), 0, size);
    assert_image("read back through 5xx faults", &got, &image, bs);
    let (slow, internal) = (
        bed.proxy.injected(Fault::SlowDown),
        bed.proxy.injected(Fault::InternalError),
    );
    eprintln!(
        "after writes: {after_writes}\nat end: {}\nobject-store retries (this run): {}",
        bed.proxy.summary(),
        bed.retries()
    );
    assert!(
        slow > 0 && internal > 0,
        "no faults injected: {}",
        bed.proxy.summary()
    );
    assert!(bed.proxy.requests(Op::Get) > 0 && bed.proxy.requests(Op::Put) > 0);
    assert!(bed.retries() > 0, "the daemon retried nothing");
}

/// Reads every block on its own request; prints `fail BLOCK ERRNO` for failed ones and writes
/// the successful ones at their place in `out`.
fn read_blocks_tolerant(uri: &str, size: u64, bs: u64, out: &Path) -> Vec<(u64, String)> {
    let code = format!(
        "f = open({:?}, 'wb')\nfor i in range({}):\n    try:\n        d = h.pread({bs}, i * {bs})\n    \
         except nbd.Error as e:\n        print('fail', i, e.errno)\n        d = bytes({bs})\n    f.write(d)\nf.close()",
        out.to_str().unwrap(),
        size / bs
    );
    let out = nbdsh(uri, &[&code]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"fail")).then(|| (f[1].parse().unwrap(), f[2].to_string()))
        })
        .collect()
}

#[test]
fn cut_reset_or_corrupted_replies_never_give_wrong_data() {
    let (size, bs) = (8 * MIB, 64 * KIB);
    let (seed, mut rng) = seeded_rng();
    let mut bed = FaultBed::start(
        vec![ExportSpec::new("c").size("8MiB").block_size("64KiB")],
        seed,
        |b| b,
    );
    let mut image = vec![0u8; size as usize];
    let ops = random_ops(&mut rng, size, 60);
    apply(&mut image, &ops);
    write_ops(&bed.nbd.uri("c"), &ops, true);
    bed.crash_and_restart();
    let get = [Op::Get];
    bed.proxy
        .add(Rule::new(Fault::CutBody).only(&get).rate(0.2));
    bed.proxy
        .add(Rule::new(Fault::CorruptBody).only(&get).rate(0.2));
    bed.proxy
        .add(Rule::new(Fault::ResetBefore).only(&get).rate(0.1));
    bed.proxy
        .add(Rule::new(Fault::ResetAfter).only(&get).rate(0.1));
    bed.proxy.add(
        Rule::new(Fault::Delay)
            .only(&get)
            .rate(0.1)
            .delay(Duration::from_millis(200)),
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let failed = read_blocks_tolerant(&bed.nbd.uri("c"), size, bs, &out);
    let got = std::fs::read(&out).unwrap();
    let mut want = image.clone();
    for (b, errno) in &failed {
        assert_eq!(errno, "EIO", "block {b} failed with errno {errno}, not EIO");
        want[(b * bs) as usize..((b + 1) * bs) as usize].fill(0);
    }
    assert_image("blocks read through faulty replies", &got, &want, bs);
    eprintln!(
        "{}; {} of {} block reads failed (EIO); object-store retries {}",
        bed.proxy.summary(),
        failed.len(),
        size / bs,
        bed.retries()
    );
    for f in [Fault::CutBody, Fault::CorruptBody] {
        assert!(bed.proxy.injected(f) > 0, "{f:?} never injected");
    }
    // Without faults every block reads back exactly (nothing wrong was cached).
    bed.proxy.clear();
    let got = read_range(&bed.nbd.uri("c"), 0, size);
    assert_image("after faults cleared", &got, &image, bs);
}

#[test]
fn corrupt_object_gives_eio_and_logs_its_key() {
    let (size, bs) = (MIB, 64 * KIB);
    let mut bed = FaultBed::start(
        vec![ExportSpec::new("d").size("1MiB").block_size("64KiB")],
        1,
        |b| b,
    );
    let mut image = vec![0u8; size as usize];
    let ops: Vec<_> = (0..8)
        .map(|i| (i * bs, common::pattern(bs as usize, 40 + i)))
        .collect();
    apply(&mut image, &ops);
    write_ops(&bed.nbd.uri("d"), &ops, true);
    bed.crash_and_restart();
    let key = block_key("d/", 3);
    let path = bed.s3.object_path(BUCKET, &key);
    let mut obj = std::fs::read(&path).unwrap();
    obj[1000] ^= 0x01;
    std::fs::write(&path, &obj).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let failed = read_blocks_tolerant(&bed.nbd.uri("d"), size, bs, &out);
    assert_eq!(
        failed,
        vec![(3, "EIO".to_string())],
        "only the corrupted block may fail, with EIO"
    );
    let mut want = image.clone();
    want[(3 * bs) as usize..(4 * bs) as usize].fill(0);
    assert_image("other blocks", &std::fs::read(&out).unwrap(), &want, bs);
    let line = bed
        .nbd
        .wait_for_log(&key, Duration::from_secs(10))
        .to_string();
    eprintln!("daemon logged: {line}");
    // Still EIO on a second try: a corrupt block is never cached or served.
    let r = common::run(tool("nbdsh").args([
        "-u",
        &bed.nbd.uri("d"),
        "-c",
        &format!("h.pread({bs}, {})", 3 * bs),
    ]));
    assert!(
        !r.status.success(),
        "second read of the corrupt block: {}",
        show(&r)
    );
}

/// Seconds from the environment variable `name`, or `default`.
fn env_secs(name: &str, default: u64) -> Duration {
    let v = std::env::var(name).ok().and_then(|v| v.parse().ok());
    Duration::from_secs(v.unwrap_or(default))
}

/// fio on one export: 4 jobs = 4 connections, each writing then verifying its own 8 MiB
/// (`verify_only` re-reads what the same job parameters wrote, e.g. after a restart). Output
/// goes to `dir/NAME.out` (a pipe could fill up and stall fio).
fn fio_soak(uri: &str, name: &str, verify_only: bool, dir: &Path) -> std::process::Child {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let mut cmd = tool("fio");
    cmd.current_dir(dir) // fio leaves verify state files in its working directory
        .stderr(out.try_clone().unwrap())
        .stdout(out);
    cmd.args(["--name=soak", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(["--rw=randwrite", "--bsrange=4k-64k", "--size=8m"])
        .args(["--offset_increment=8m", "--numjobs=4", "--iodepth=8"])
        .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"])
        .arg("--group_reporting");
    if verify_only {
        cmd.arg("--verify_only");
    }
    cmd.spawn().unwrap()
}

/// Waits for fio; `Some(its output)` when it failed.
fn fio_failure(mut child: std::process::Child, name: &str, dir: &Path) -> Option<String> {
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap_or_default();
    (!status.success()).then(|| format!("{name}: {status}\n{text}"))
}

/// The soak: `SOAK_SECONDS` (600) of fio verify on 3 exports × 4 connections with S3
/// faults injected and the config reloaded every `SOAK_RELOAD_SECONDS` (30); prints RSS
/// samples; zero verify errors and a flat RSS required. Run by `scripts/soak.sh`.
#[test]
#[ignore = "long; run by scripts/soak.sh"]
fn soak() {
    let duration = env_secs("SOAK_SECONDS", 600);
    let reload_every = env_secs("SOAK_RELOAD_SECONDS", 30);
    let names = ["s0", "s1", "s2"];
    let exports = names
        .iter()
        .map(|n| ExportSpec::new(n).size("32MiB"))
        .collect();
    let seed: u64 = rand::random();
    let mut bed = FaultBed::start(exports, seed, |b| {
        b.cache("48MiB", "16MiB").flush_timeout("60s")
    });
    let (any, get, put) = (&[][..], &[Op::Get][..], &[Op::Put, Op::Delete][..]);
    for (fault, ops, rate) in [
        (Fault::SlowDown, any, 0.03),
        (Fault::InternalError, any, 0.02),
        (Fault::Delay, any, 0.02),
        (Fault::ResetBefore, any, 0.01),
        (Fault::ResetAfter, put, 0.01),
        (Fault::CutBody, get, 0.02),
        (Fault::CorruptBody, get, 0.01),
    ] {
        let rule = Rule::new(fault).only(ops).rate(rate);
        bed.proxy.add(rule.delay(Duration::from_millis(300)));
    }
    eprintln!("soak: {duration:?}, reload every {reload_every:?}, proxy seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let (mut rss, mut failures, mut rounds, mut reloads) = (vec![], vec![], 0, 0);
    let (mut next_reload, mut next_sample) = (start + reload_every, start);
    while start.elapsed() < duration {
        rounds += 1;
        let mut fios: Vec<_> = (names.iter())
            .map(|n| fio_soak(&bed.nbd.uri(n), n, false, dir.path()))
            .collect();
        while fios.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
            let now = Instant::now();
            if now >= next_sample {
                let kib = proc_status_kib(bed.nbd.pid(), "VmRSS:");
                let t = start.elapsed().as_secs();
                let p = bed.proxy.summary();
                eprintln!("t={t:>4}s rss={kib} KiB round={rounds} reloads={reloads} {p}");
                rss.push(kib);
                next_sample = now + Duration::from_secs(10);
            }
            if now >= next_reload {
                reloads += 1;
                let (mark, name) = (bed.nbd.log_mark(), names[reloads % names.len()]);
                let text = format!("soak reload {reloads}");
                bed.nbd
                    .rewrite_config(|c| c.export_mut(name).description = Some(text));
                bed.nbd.sighup();
                let wait = Duration::from_secs(120);
                bed.nbd.wait_for_log_after(mark, "reload complete", wait);
                next_reload = Instant::now() + reload_every;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (n, c) in names.iter().zip(fios) {
            failures.extend(fio_failure(c, n, dir.path()).map(|f| format!("round {rounds} {f}")));
        }
    }
    let retries = bed.retries();
    // SIGTERM flushes everything; the last round's data must come back from S3 after restart.
    bed.nbd.restart();
    for n in names {
        let fio = fio_soak(&bed.nbd.uri(n), n, true, dir.path());
        failures.extend(fio_failure(fio, n, dir.path()).map(|f| format!("after restart {f}")));
    }
    let p = bed.proxy.summary();
    eprintln!("soak done: {rounds} rounds × 3 exports × 4 connections, {reloads} reloads, {retries} object-store retries, {p}");
    eprintln!("rss samples (KiB): {rss:?}");
    assert!(
        failures.is_empty(),
        "fio verify failures:\n{}",
        failures.join("\n")
    );
    let q = (rss.len() / 4).max(1);
    let early = rss[..q].iter().max().copied().unwrap_or(0);
    let late = rss[rss.len() - q..].iter().max().copied().unwrap_or(0);
    let limit = early + early / 4 + 16 * 1024;
    assert!(
        late <= limit,
        "RSS grew: early max {early} KiB, late max {late} KiB"
    );
}

/// Latency mode (what `benches/latency.sh` runs through): every response leaves the proxy
/// its latency after the request arrived, and none sooner; off again, answers come at once.
#[test]
fn latency_mode_holds_every_response_for_its_latency() {
    use std::io::{Read, Write};
    let s3 = common::S3Server::start();
    let proxy = common::fault_proxy::FaultProxy::start(s3.port(), 1);
    let round_trip = |proxy: &common::fault_proxy::FaultProxy| {
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).expect("proxy");
        let started = Instant::now();
        sock.write_all(
            b"GET /nbd?list-type=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .expect("request");
        let mut reply = Vec::new();
        sock.read_to_end(&mut reply).expect("reply");
        assert!(
            reply.starts_with(b"HTTP/1.1 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        started.elapsed()
    };
    proxy.set_latency(Duration::from_millis(150));
    for _ in 0..3 {
        let took = round_trip(&proxy);
        assert!(
            took >= Duration::from_millis(150),
            "answered after {took:?}"
        );
    }
    proxy.set_latency(Duration::ZERO);
    let took = round_trip(&proxy);
    assert!(
        took < Duration::from_millis(150),
        "latency mode still on: {took:?}"
    );
    assert_eq!(proxy.requests(Op::List), 4, "{}", proxy.summary());
}
