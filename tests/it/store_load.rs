//! The block store under load (issue 4): memory stays within `[cache] memory` plus a small
//! constant while clients write several times the budget, and a real ext4 filesystem, made and
//! used through qemu-storage-daemon's FUSE export and a loop mount, survives a daemon restart.

use crate::common::{fio, run, run_ok, show, tool, wait_until, ExportSpec};
use crate::store_bed::{proc_status_kib, Bed, MIB};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
    crate::store_bed::nbd_read(&uri, 0, 4096);
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

/// qemu-storage-daemon exporting an NBD export as a FUSE file; unmounts and stops on drop.
struct FuseExport {
    qsd: Option<Child>,
    file: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl FuseExport {
    fn start(port: u16, export: &str, file: &Path, mnt: &Path, size: u64) -> FuseExport {
        std::fs::write(file, b"").unwrap();
        let qsd = tool("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
            ))
            .arg("--export")
            .arg(format!("type=fuse,id=e0,node-name=n0,mountpoint={},writable=on", file.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut fe = FuseExport {
            qsd: Some(qsd),
            file: file.into(),
            mnt: mnt.into(),
            mounted: false,
        };
        // The FUSE mount replaces the empty file with one of the export's size.
        wait_until("the FUSE export to appear", Duration::from_secs(30), || {
            if let Some(st) = fe.qsd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("qemu-storage-daemon exited with {st}");
            }
            std::fs::metadata(&fe.file).is_ok_and(|m| m.len() == size)
        });
        fe
    }

    fn mount(&mut self) {
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&self.file)
                .arg(&self.mnt),
        );
        self.mounted = true;
    }

    fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt));
        self.mounted = false;
    }

    /// SIGTERM and wait: qsd flushes and disconnects from nbd-s3 cleanly.
    fn stop(&mut self) {
        if let Some(mut c) = self.qsd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let st = c.wait().unwrap();
            assert!(st.success(), "qemu-storage-daemon exited with {st}");
        }
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(mut c) = self.qsd.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.file)
                .status();
        }
    }
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
    let size = 64 * MIB;
    let mut bed = Bed::start(vec![ExportSpec::new("fs").size("64MiB")]);
    let dir = tempfile::tempdir().unwrap();
    let (file, mnt) = (dir.path().join("disk.img"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();

    let mut fe = FuseExport::start(bed.nbd.port(), "fs", &file, &mnt, size);
    run_ok(tool("mkfs.ext4").args(["-F", "-q"]).arg(&file));
    fe.mount();
    for i in 0..6u64 {
        let sub = mnt.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let data = crate::raw_nbd::pattern(500 + i, 0, (300 * 1024 * (i + 1) + 17 * i) as usize);
        std::fs::write(sub.join(format!("f{i}.bin")), data).unwrap();
    }
    std::fs::write(mnt.join("small.txt"), b"hello from nbd-s3\n").unwrap();
    let sums = checksums(&mnt);
    assert_eq!(sums.lines().count(), 7, "files written:\n{sums}");
    fe.umount();
    fe.stop();
    drop(fe);

    bed.stop_and_restart();
    assert!(bed.keys("fs/").len() > 2, "the filesystem is stored in S3");

    let mut fe = FuseExport::start(bed.nbd.port(), "fs", &file, &mnt, size);
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
