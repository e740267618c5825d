//! The block store under load: memory stays within `[cache] memory` plus a small
//! constant while clients write several times the budget, and a real ext4 filesystem, made and
//! used through qemu-storage-daemon's FUSE export and a loop mount, survives a daemon restart.

use crate::common::fuse::FuseDisk;
use crate::common::store_bed::{proc_status_kib, Bed};
use crate::common::{fio, run, run_ok, show, tool, ExportSpec};
use std::path::Path;
use std::process::Command;

/// Memory the daemon may use beyond the cache budget: runtime, S3 client, buffers of requests
/// in flight (fio below keeps at most 8 × 1 MiB outstanding).
const SLACK_MIB: u64 = 32;

#[test]
fn memory_stays_within_budget_under_a_write_storm() {
    let budget_kib = 32 * 1024;
    let bed = Bed::start_with(vec![ExportSpec::new("storm").size("160MiB")], |b| {
        b.cache("32MiB", "16MiB")
    });
    let uri = bed.uri("storm");
    let pid = bed.nbd.pid();
    // Baseline after one connection has been served (threads, pools, HTTP client).
    crate::common::store_bed::nbd_read(&uri, 0, 4096);
    let idle_kib = proc_status_kib(pid, "VmRSS:");
    let limit_kib = idle_kib + budget_kib + SLACK_MIB * 1024;
    // 128 MiB of non-zero data (4× the budget), flushed at the end ...
    let job = [
        "--name=storm",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
    ];
    let uri_arg = format!("--uri={uri}");
    let common = [
        &job[..],
        &[
            &uri_arg,
            "--size=128M",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    ]
    .concat();
    fio(&[&common[..], &["--end_fsync=1", "--do_verify=0"]].concat());
    let write_hwm = proc_status_kib(pid, "VmHWM:");
    // ... then read back and verified cold: eviction, refetch and read-ahead under the budget.
    fio(&[&common[..], &["--verify_only=1"]].concat());
    let hwm = proc_status_kib(pid, "VmHWM:");
    eprintln!(
        "memory storm (cache memory 32 MiB, dirty 16 MiB, 128 MiB written then verified): \
         idle RSS {} MiB, peak after writing {} MiB, peak after verifying {} MiB, limit {} MiB",
        idle_kib / 1024,
        write_hwm / 1024,
        hwm / 1024,
        limit_kib / 1024
    );
    assert!(
        write_hwm <= limit_kib,
        "write phase: nbd-s3 peak RSS {} MiB > idle {} MiB + cache memory 32 MiB + {SLACK_MIB} MiB",
        write_hwm / 1024,
        idle_kib / 1024
    );
    assert!(
        hwm <= limit_kib,
        "read phase: nbd-s3 peak RSS {} MiB > idle {} MiB + cache memory 32 MiB + {SLACK_MIB} MiB",
        hwm / 1024,
        idle_kib / 1024
    );
    // The data really went to S3: every 128 KiB block of the 128 MiB, plus the manifest.
    assert_eq!(bed.keys("storm/").len(), 1024 + 1, "stored objects");
}

/// `sha256sum` of every file under `dir`, sorted by path.
fn checksums(dir: &Path) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("find . -type f | sort | xargs -r sha256sum")
            .current_dir(dir),
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ext4_on_a_fuse_export_survives_restart() {
    let mut bed = Bed::start(vec![ExportSpec::new("fs").size("64MiB")]);
    let dir = tempfile::tempdir().unwrap();
    let mut fe = FuseDisk::start(bed.nbd.port(), "fs", dir.path());
    let (file, mnt) = (fe.file.clone(), fe.mnt.clone());
    run_ok(tool("mkfs.ext4").args(["-F", "-q"]).arg(&file));
    fe.mount();
    for i in 0..6u64 {
        let sub = mnt.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let data =
            crate::common::raw_nbd::pattern(500 + i, 0, (300 * 1024 * (i + 1) + 17 * i) as usize);
        std::fs::write(sub.join(format!("f{i}.bin")), data).unwrap();
    }
    std::fs::write(mnt.join("small.txt"), b"hello from nbd-s3\n").unwrap();
    let sums = checksums(&mnt);
    assert_eq!(sums.lines().count(), 7, "files written:\n{sums}");
    fe.umount();
    fe.stop();

    bed.stop_and_restart();
    assert!(bed.keys("fs/").len() > 2, "the filesystem is stored in S3");

    let mut fe = FuseDisk::start(bed.nbd.port(), "fs", dir.path());
    fe.mount();
    assert_eq!(checksums(&mnt), sums, "file checksums after restart");
    fe.umount();
    let fsck = run(tool("e2fsck").arg("-fn").arg(&file));
    assert!(
        fsck.status.success(),
        "e2fsck -fn is not clean: {}",
        show(&fsck)
    );
    fe.stop();
}
