//! The Linux kernel's own NBD client (`nbd-client` + `nbd.ko`), the way hosts attach exports,
//! in a qemu guest (tests/common/guest.rs) against the real daemon on s3s-fs. One boot runs
//! every case in turn, each on its own export and `/dev/nbdN`, and after each the guest's
//! kernel log must hold no I/O error: a request the driver gave up on fails the case even
//! when the filesystem hides it.

use crate::common::guest::{enter_private_netns, Guest, GuestTools, HOST_FROM_GUEST};
use crate::common::*;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Deadline for one guest step; TCG runs mkfs, fsck and fio several times slower than the host.
const STEP: Duration = Duration::from_secs(300);

/// Block objects of `export`: keys of 16 hex digits after the prefix (not the export's
/// `nbd-s3.json` or its lease object).
fn blocks(s3: &S3Server, export: &str) -> usize {
    let prefix = format!("{export}/");
    s3.list_keys("nbd", &prefix)
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter(|b| b.len() == 16 && b.bytes().all(|c| c.is_ascii_hexdigit()))
        .count()
}

/// `nbd-client … -N EXPORT` in the guest, against the daemon's current port.
fn connect(nbd: &NbdS3, export: &str, dev: &str, extra: &str) -> String {
    format!(
        "nbd-client {HOST_FROM_GUEST} {port} {dev} -N {export} {extra}\n",
        port = nbd.port()
    )
}

/// Established TCP connections to the daemon's port, as the test's network namespace sees
/// them (the thread's own view: other tests' namespaces are not in it).
fn daemon_connections(nbd: &NbdS3) -> usize {
    let port = format!(":{:04X}", nbd.port());
    let tcp = std::fs::read_to_string("/proc/thread-self/net/tcp").expect("read net/tcp");
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&port) && f[3] == "01"
        })
        .count()
}

/// The manual procedure hosts follow: connect with `-N`, make a filesystem, mount, write a
/// file, unmount, disconnect, stop the daemon with SIGTERM, start it again, reconnect, mount,
/// read the file back, and the filesystem checker finds nothing to repair.
fn manual_procedure(guest: &mut Guest, s3: &S3Server, nbd: &mut NbdS3, fs: &str, dev: &str) {
    let (mkfs, check) = match fs {
        "ext4" => ("mkfs.ext4 -q", "e2fsck -fn"),
        _ => ("mkfs.xfs -q", "xfs_repair -n"),
    };
    let payload = guest.share_file(&format!("{fs}.bin"), &pattern(5 * MIB + 4321, 7));
    let mnt = format!("/tmp/mnt-{fs}");
    guest.run(
        &format!("{fs}: connect, mkfs, write a file"),
        &format!(
            "{connect}{mkfs} {dev}\nmkdir -p {mnt}\nmount {dev} {mnt}\n\
             cp {payload} {mnt}/file.bin\necho hello > {mnt}/hello.txt\n\
             umount {mnt}\nnbd-client -d {dev}\n",
            connect = connect(nbd, fs, dev, "")
        ),
        STEP,
    );
    nbd.restart();
    assert!(
        blocks(s3, fs) > 40,
        "{fs}: the file's blocks are not in S3 after SIGTERM: {} objects",
        blocks(s3, fs)
    );
    let out = guest.run(
        &format!("{fs}: reconnect after the restart, read the file, check"),
        &format!(
            "{connect}mount {dev} {mnt}\ncmp {payload} {mnt}/file.bin\ncat {mnt}/hello.txt\n\
             umount {mnt}\n{check} {dev}\nnbd-client -d {dev}\n",
            connect = connect(nbd, fs, dev, "")
        ),
        STEP,
    );
    assert!(out.contains("\nhello\n"), "{fs}: hello.txt lost:\n{out}");
}

/// Four connections (`-C 4`), four fio jobs writing their own regions with libaio and
/// O_DIRECT, every block read back and checked against its crc32c.
fn four_connections_fio_verify(guest: &mut Guest, nbd: &NbdS3, dev: &str) {
    guest.run("connect with -C 4", &connect(nbd, "fio", dev, "-C 4"), STEP);
    assert_eq!(
        daemon_connections(nbd),
        4,
        "nbd-client -C 4 should hold four connections to the daemon"
    );
    let out = guest.run(
        "fio libaio verify=crc32c over four connections",
        &format!(
            "fio --name=verify --filename={dev} --ioengine=libaio --direct=1 --rw=randwrite \
             --bsrange=4k-256k --iodepth=16 --numjobs=4 --size=16M --offset_increment=16M \
             --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting\n\
             nbd-client -d {dev}\n"
        ),
        STEP,
    );
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
}

/// Discards reach S3: `blkdiscard` of a written device and `fstrim` of a mounted ext4 after
/// a file is removed both delete the block objects (a FLUSH — `sync DEVICE` — makes them
/// durable, deletions included).
fn discard_deletes_objects(guest: &mut Guest, s3: &S3Server, nbd: &NbdS3, dev: &str) {
    let payload = guest.share_file("trim.bin", &pattern(8 * MIB, 11));
    guest.run(
        "write 8 MiB raw",
        &format!(
            "{connect}dd if={payload} of={dev} bs=1M oflag=direct\nsync {dev}\n",
            connect = connect(nbd, "trim", dev, "")
        ),
        STEP,
    );
    assert_eq!(
        blocks(s3, "trim"),
        64,
        "8 MiB written = 64 blocks of 128 KiB"
    );
    guest.run(
        "blkdiscard",
        &format!("blkdiscard {dev}\nsync {dev}\n"),
        STEP,
    );
    assert_eq!(blocks(s3, "trim"), 0, "blkdiscard left block objects");

    let mnt = "/tmp/mnt-trim";
    guest.run(
        "ext4 with a file",
        &format!(
            "mkfs.ext4 -q -E nodiscard {dev}\nmkdir -p {mnt}\nmount {dev} {mnt}\n\
             cp {payload} {mnt}/file.bin\nsync\nsync {dev}\n"
        ),
        STEP,
    );
    let with_file = blocks(s3, "trim");
    assert!(
        with_file >= 64,
        "the file's blocks are not stored: {with_file}"
    );
    let out = guest.run(
        "rm + fstrim",
        &format!("rm {mnt}/file.bin\nsync\nfstrim -v {mnt}\nsync {dev}\n"),
        STEP,
    );
    let after = blocks(s3, "trim");
    assert!(
        with_file.saturating_sub(after) >= 60,
        "fstrim after removing an 8 MiB file deleted {} of {with_file} objects:\n{out}",
        with_file.saturating_sub(after)
    );
    guest.run(
        "unmount, disconnect",
        &format!("umount {mnt}\ne2fsck -fn {dev}\nnbd-client -d {dev}\n"),
        STEP,
    );
}

/// 32 MiB requests, the largest the driver makes once `max_sectors_kb` is raised: O_DIRECT
/// writes and reads of that size go through as single requests and round-trip intact.
fn large_requests(guest: &mut Guest, nbd: &NbdS3, dev: &str) {
    let name = dev.trim_start_matches("/dev/");
    let out = guest.run(
        "32 MiB O_DIRECT round trip",
        &format!(
            "{connect}q=/sys/block/{name}/queue\n\
             test $(cat $q/max_hw_sectors_kb) -ge 32768\n\
             echo 32768 > $q/max_sectors_kb\n\
             head -c 64M /dev/urandom > /tmp/big.bin\n\
             blockdev --getsize64 {dev}\n\
             before=$(cat /sys/block/{name}/stat)\n\
             dd if=/tmp/big.bin of={dev} bs=32M count=2 oflag=direct\n\
             dd if={dev} of=/tmp/back.bin bs=32M count=2 iflag=direct\n\
             after=$(cat /sys/block/{name}/stat)\n\
             cmp /tmp/big.bin /tmp/back.bin\n\
             echo \"stat-before $before\"\necho \"stat-after $after\"\n\
             nbd-client -d {dev}\n",
            connect = connect(nbd, "big", dev, "")
        ),
        STEP,
    );
    // The first open after connecting scans for partitions (reads); `blockdev` opened the
    // device before the counters were taken, so only the dd requests count.
    // /sys/block/X/stat: reads, merged, sectors read, ms, writes, merged, sectors written, …
    let stat = |tag: &str| -> Vec<u64> {
        out.lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag} line:\n{out}"))
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect()
    };
    let (b, a) = (stat("stat-before"), stat("stat-after"));
    let (reads, read_sectors) = (a[0] - b[0], a[2] - b[2]);
    let (writes, write_sectors) = (a[4] - b[4], a[6] - b[6]);
    assert_eq!(
        (read_sectors, write_sectors),
        (131072, 131072),
        "64 MiB each way"
    );
    assert!(
        reads <= 2 && writes <= 2,
        "64 MiB took {reads} reads and {writes} writes: requests were not 32 MiB"
    );
}

/// A restart the filesystem does not notice: fio writes and verifies (crc32c, checked while it
/// writes) a file on a mounted ext4 while the daemon is replaced four times, by both routes in
/// turn: `serve --takeover`, then `systemctl restart` through the (fake) service manager's fd
/// store; fio sees no error, the kernel logs none, and `e2fsck -fn` is clean.
fn takeovers_under_fio(guest: &mut Guest, nbd: &mut NbdS3, dev: &str) {
    let mnt = "/tmp/mnt-takeover";
    let fio = format!(
        "fio --name=takeover --filename={mnt}/fio.dat --size=24M --ioengine=libaio \
         --direct=1 --rw=randwrite --bsrange=4k-64k --iodepth=8 --fsync=32 \
         --verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime=40"
    );
    let log = "/tmp/work/fio-takeover.out";
    guest.run(
        "takeover: connect, mkfs, mount, start fio",
        &format!(
            "{connect}mkfs.ext4 -q {dev}\nmkdir -p {mnt}\nmount {dev} {mnt}\n\
             ({fio} > {log} 2>&1; echo \"fio exit $?\" >> {log}) </dev/null >/dev/null 2>&1 &\n",
            connect = connect(nbd, "takeover", dev, "")
        ),
        STEP,
    );
    let fio_log = guest.share_path("fio-takeover.out");
    let started = Instant::now();
    wait_until("fio writing", Duration::from_secs(60), || {
        std::fs::read_to_string(&fio_log).is_ok_and(|s| s.contains("Starting"))
    });
    let mut pauses = Vec::new();
    for round in 0..4 {
        // Let fio write (and leave dirty data) between takeovers.
        let until = started + Duration::from_secs(8 * (round + 1));
        wait_until("fio's next stretch", Duration::from_secs(60), || {
            Instant::now() >= until
        });
        let t = Instant::now();
        let mut old = match round % 2 {
            0 => nbd.take_over(),
            _ => nbd.systemctl_restart().0,
        };
        pauses.push(t.elapsed());
        let status = old.wait_exit(DAEMON_TIMEOUT).expect("old daemon exited");
        assert!(
            status.success(),
            "old daemon: {status}\n{}",
            old.logs.text()
        );
        nbd.wait_for_log("connection taken over", Duration::from_secs(10));
    }
    eprintln!(
        "restarts under fio, takeover and fd store in turn (whole restart, incl. flush and \
         start): {pauses:.1?}"
    );
    let out = guest.run(
        "takeover: wait for fio, unmount, check",
        &format!(
            "for i in $(seq 120); do grep -q 'fio exit' {log} && break; sleep 1; done\n\
             cat {log}\numount {mnt}\ne2fsck -fn {dev}\nnbd-client -d {dev}\n"
        ),
        STEP,
    );
    // The slowest completion fio saw is the pause a takeover cost this client.
    let latency: Vec<&str> = out.lines().filter(|l| l.contains("lat (")).collect();
    eprintln!("fio across takeovers:\n{}", latency.join("\n"));
    assert!(out.contains("fio exit 0"), "fio failed:\n{out}");
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
}

/// A snapshot of a mounted filesystem in use, taken the way a host backs up a running disk:
/// files are written and their sha256 recorded while a writer keeps creating files (each
/// written under a temporary name, then renamed), `fsfreeze -f`, `nbd-s3 snapshot create`
/// over the control socket, `fsfreeze -u`, then files are removed, rewritten and added while
/// the writer goes on. The snapshot, attached beside the live device, must check clean,
/// mount, hold every recorded checksum and exactly the files the writer had finished at the
/// freeze, and none of the later changes; the live filesystem keeps them and checks clean.
///
/// ext4 is checked on `EXPORT@SNAP` itself, attached read-only: a frozen ext4 has a clean
/// journal. A frozen xfs leaves its log for the next mount to replay (lazy superblock
/// counters), which a read-only device cannot do, so xfs is checked the way such a snapshot
/// is used: through a writable clone (`base = "EXPORT@SNAP"`, added by reload), mounted
/// (replaying the log), unmounted and then checked.
fn snapshot_of_a_mounted_fs(
    guest: &mut Guest,
    nbd: &mut NbdS3,
    fs: &str,
    export: &str,
    devs: (&str, &str),
) {
    let (dev, snap_dev) = devs;
    let (mkfs, check) = match fs {
        "ext4" => ("mkfs.ext4 -q", "e2fsck -fn"),
        _ => ("mkfs.xfs -q", "xfs_repair -n"),
    };
    let mnt = format!("/tmp/mnt-{export}");
    let ro_mnt = format!("/tmp/mnt-{export}-snap");
    let sums = format!("/tmp/work/{export}.sha256");
    let stop = format!("/tmp/work/{export}.stop");
    let log = format!("/tmp/work/{export}.writer");
    // File K holds `seq K K+3000`, written under a temporary name and renamed: a file with a
    // number for a name is complete in every consistent image of the filesystem.
    let writer = format!(
        "mkdir -p {mnt}/w
         (for k in $(seq 1 100000); do test -e {stop} && break;          seq $k $((k + 3000)) > {mnt}/w/tmp; mv {mnt}/w/tmp {mnt}/w/$k; done;          echo \"writer exit $?\" > {log}) </dev/null >/dev/null 2>&1 &\n"
    );
    let finished = |dir: &str| format!("$(ls {dir}/w | grep -c '^[0-9]')");
    // Waits (bounded) until the writer has finished `at_least` files.
    let wait_writer = |at_least: &str| {
        let n = finished(&mnt);
        format!(
            "want={at_least}\nfor i in $(seq 600); do test {n} -ge $want && break; \
             sleep 0.2; done\ntest {n} -ge $want\n"
        )
    };
    let out = guest.run(
        &format!("{fs} snapshot: mkfs, files, writer running, fsfreeze"),
        &format!(
            "{connect}{mkfs} {dev}\nmkdir -p {mnt}\nmount {dev} {mnt}\n\
             head -c 3M /dev/urandom > {mnt}/kept.bin\n\
             head -c 2M /dev/urandom > {mnt}/rewritten.bin\n\
             head -c 1M /dev/urandom > {mnt}/removed.bin\n\
             mkdir {mnt}/small\n\
             for i in $(seq 50); do echo \"small $i\" > {mnt}/small/$i; done\n\
             (cd {mnt} && sha256sum kept.bin rewritten.bin removed.bin small/*) > {sums}\n\
             {writer}{wait}fsfreeze -f {mnt}\necho \"frozen {n}\"\n",
            connect = connect(nbd, export, dev, ""),
            wait = wait_writer("5"),
            n = finished(&mnt),
        ),
        STEP,
    );
    // Counted after the freeze: the writer waits in its next write or rename.
    let frozen = tagged(&out, "frozen");
    let snap = format!("{export}@S");
    nbd.admin_ok(&["snapshot", "create", export, "S"]);
    let clone = format!("{export}-clone");
    if fs == "xfs" {
        let size = (nbd.config().exports.iter())
            .find(|e| e.name == export)
            .map(|e| e.size.clone())
            .expect("the export is configured");
        let spec = ExportSpec::new(&clone)
            .size(&size)
            .line(&format!("base = \"{snap}\""));
        nbd.rewrite_config(|c| c.exports.push(spec));
        nbd.sighup();
        wait_until("the clone served after the reload", DAEMON_TIMEOUT, || {
            nbd.admin(&["status", "--json"])
                .stdout
                .windows(clone.len() + 2)
                .any(|w| w == format!("\"{clone}\"").as_bytes())
        });
    }
    let out = guest.run(
        &format!("{fs} snapshot: thaw, change files, stop the writer"),
        &format!(
            "fsfreeze -u {mnt}\nrm {mnt}/removed.bin\n\
             head -c 2M /dev/urandom > {mnt}/rewritten.bin\necho later > {mnt}/added.txt\n\
             rm -r {mnt}/small\n{wait}touch {stop}\n\
             for i in $(seq 600); do test -e {log} && break; sleep 0.2; done\ncat {log}\n\
             sync\necho \"live {n}\"\n",
            wait = wait_writer(&format!("$(( {} + 5 ))", finished(&mnt))),
            n = finished(&mnt),
        ),
        STEP,
    );
    assert!(out.contains("writer exit 0"), "the writer failed:\n{out}");
    let live = tagged(&out, "live");
    // Both copies carry the same filesystem UUID; xfs refuses a second mount of one
    // without `nouuid`.
    let (attach, mount, checked) = match fs {
        "ext4" => (
            connect(nbd, &snap, snap_dev, "-R"),
            format!(
                "echo \"read-only $(blockdev --getro {snap_dev})\"\n{check} {snap_dev}\n\
                 mount -o ro {snap_dev} {ro_mnt}\n"
            ),
            String::new(),
        ),
        _ => (
            connect(nbd, &clone, snap_dev, ""),
            format!("mount -o nouuid {snap_dev} {ro_mnt}\n"),
            format!("{check} {snap_dev}\n"),
        ),
    };
    let out = guest.run(
        &format!("{fs} snapshot: attach {snap}, check, mount, compare"),
        &format!(
            "{attach}mkdir -p {ro_mnt}\n{mount}\
             (cd {ro_mnt} && sha256sum -c {sums})\ntest ! -e {ro_mnt}/added.txt\n\
             for f in {ro_mnt}/w/[0-9]*; do k=${{f##*/}}; seq $k $((k + 3000)) | cmp - $f; done\n\
             echo \"snapshot {n}\"\numount {ro_mnt}\n{checked}nbd-client -d {snap_dev}\n\
             umount {mnt}\n{check} {dev}\nnbd-client -d {dev}\n",
            n = finished(&ro_mnt),
        ),
        STEP,
    );
    if fs == "ext4" {
        assert_eq!(tagged(&out, "read-only"), 1, "{snap} is not read-only");
    }
    let in_snapshot = tagged(&out, "snapshot");
    assert_eq!(
        in_snapshot, frozen,
        "{snap} should hold exactly the writer's files finished at the freeze"
    );
    assert!(
        live >= frozen + 5,
        "the writer went on after the thaw: {live} files live, {frozen} at the freeze"
    );
}

/// The number a step printed on a line `TAG N`.
fn tagged(out: &str, tag: &str) -> usize {
    let prefix = format!("{tag} ");
    out.lines()
        .filter(|l| !l.starts_with('+'))
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{tag} N` line in the step's output:\n{out}"))
}

/// Every kernel-client case in one guest boot; prints the boot time and each case's time.
#[test]
fn kernel_client_in_a_guest() {
    let Some(tools) = GuestTools::or_skip("kernel::kernel_client_in_a_guest") else {
        return;
    };
    enter_private_netns();
    let s3 = S3Server::start();
    let mut nbd = NbdS3::builder(&s3)
        .export(ExportSpec::new("ext4").size("128MiB"))
        .export(ExportSpec::new("xfs").size("320MiB"))
        .export(ExportSpec::new("fio").size("64MiB"))
        .export(ExportSpec::new("trim").size("64MiB"))
        .export(ExportSpec::new("big").size("128MiB"))
        .export(ExportSpec::new("takeover").size("128MiB"))
        .export(ExportSpec::new("snap4").size("128MiB"))
        .export(ExportSpec::new("snapxfs").size("320MiB"))
        .service_manager(Some(64))
        .start();
    let mut guest = Guest::boot(&tools);
    eprintln!("guest boot: {:.1?}", guest.boot_time());
    let mut times = vec![("boot".to_string(), guest.boot_time())];
    guest.assert_no_kernel_errors("boot");

    let mut case = |name: &str, guest: &mut Guest, f: &mut dyn FnMut(&mut Guest)| {
        let t = Instant::now();
        f(guest);
        guest.assert_no_kernel_errors(name);
        times.push((name.to_string(), t.elapsed()));
        eprintln!("kernel case `{name}`: {:.1?}", t.elapsed());
    };
    case("manual procedure, ext4", &mut guest, &mut |g| {
        manual_procedure(g, &s3, &mut nbd, "ext4", "/dev/nbd0")
    });
    case("manual procedure, xfs", &mut guest, &mut |g| {
        manual_procedure(g, &s3, &mut nbd, "xfs", "/dev/nbd1")
    });
    case("-C 4 + fio verify", &mut guest, &mut |g| {
        four_connections_fio_verify(g, &nbd, "/dev/nbd2")
    });
    case("blkdiscard + fstrim", &mut guest, &mut |g| {
        discard_deletes_objects(g, &s3, &nbd, "/dev/nbd3")
    });
    case("32 MiB requests", &mut guest, &mut |g| {
        large_requests(g, &nbd, "/dev/nbd4")
    });
    case("fio on ext4 across four restarts", &mut guest, &mut |g| {
        takeovers_under_fio(g, &mut nbd, "/dev/nbd5")
    });
    case("snapshot of a mounted ext4", &mut guest, &mut |g| {
        snapshot_of_a_mounted_fs(g, &mut nbd, "ext4", "snap4", ("/dev/nbd6", "/dev/nbd7"))
    });
    case("snapshot of a mounted xfs", &mut guest, &mut |g| {
        snapshot_of_a_mounted_fs(g, &mut nbd, "xfs", "snapxfs", ("/dev/nbd8", "/dev/nbd9"))
    });
    eprintln!("kernel client guest timings: {times:.1?}");
}
