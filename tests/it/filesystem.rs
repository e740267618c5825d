//! A real filesystem on an export without the kernel nbd module (design.md §3): ext4 made
//! through qemu-storage-daemon's FUSE export, loop-mounted, and checked across a restart.

use crate::common::*;

const MIB: u64 = 1 << 20;

/// qemu-storage-daemon exposing an NBD export as a file through FUSE; unmounts and stops
/// on drop, so a failing test leaves nothing mounted.
struct FuseDisk {
    qsd: crate::common::proc::Process,
    file: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

impl FuseDisk {
    fn start(port: u16, export: &str, dir: &std::path::Path) -> FuseDisk {
        let file = dir.join("disk.raw");
        let mnt = dir.join("mnt");
        std::fs::write(&file, b"").unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cmd = tool("qemu-storage-daemon");
        cmd.args([
            "--blockdev",
            &format!(
                "driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,\
                 server.port={port},export={export}"
            ),
            "--export",
            &format!(
                "type=fuse,id=e0,node-name=n0,mountpoint={},writable=on",
                file.display()
            ),
        ]);
        let mut qsd = crate::common::proc::Process::spawn(&mut cmd, "qemu-storage-daemon");
        let needle = format!(" {} ", file.display());
        wait_until("the FUSE export to be mounted", DAEMON_TIMEOUT, || {
            assert!(
                qsd.try_wait().is_none(),
                "qemu-storage-daemon exited: {}",
                qsd.logs.text()
            );
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&needle)
        });
        FuseDisk { qsd, file, mnt }
    }

    fn mount(&self) {
        run_ok(
            tool("mount")
                .arg("-o")
                .arg("loop")
                .arg(&self.file)
                .arg(&self.mnt),
        );
    }

    fn umount(&self) {
        run_ok(tool("umount").arg(&self.mnt));
    }

    fn stop(mut self) {
        self.qsd.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self
            .qsd
            .wait_exit(DAEMON_TIMEOUT)
            .expect("qemu-storage-daemon exits");
        assert!(
            status.success(),
            "qemu-storage-daemon: {status}\n{}",
            self.qsd.logs.text()
        );
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        let _ = run(tool("umount").arg("-l").arg(&self.mnt));
    }
}

/// A real filesystem: mkfs.ext4 through qemu's FUSE export, files written through a loop
/// mount, the daemon restarted (SIGTERM flushes), then fsck and the files read back.
#[test]
fn ext4_on_an_export_survives_a_daemon_restart() {
    let s3 = S3Server::start();
    let mut nbd = NbdS3::builder(&s3)
        .export(ExportSpec::new("fs").size("64MiB"))
        .start();
    let dir = tempfile::tempdir().unwrap();
    let disk = FuseDisk::start(nbd.port(), "fs", dir.path());
    run_ok(tool("mkfs.ext4").args(["-q", "-F"]).arg(&disk.file));
    disk.mount();
    let content = pattern(3 * MIB as usize + 123, 42);
    std::fs::write(disk.mnt.join("data.bin"), &content).unwrap();
    std::fs::write(disk.mnt.join("hello.txt"), b"hello from nbd-s3\n").unwrap();
    disk.umount();
    disk.stop();

    nbd.restart();
    assert!(
        s3.list_keys("nbd", "fs/").len() > 10,
        "filesystem blocks not in S3"
    );
    let disk = FuseDisk::start(nbd.port(), "fs", dir.path());
    run_ok(tool("e2fsck").args(["-f", "-n"]).arg(&disk.file));
    disk.mount();
    assert_eq!(std::fs::read(disk.mnt.join("data.bin")).unwrap(), content);
    assert_eq!(
        std::fs::read(disk.mnt.join("hello.txt")).unwrap(),
        b"hello from nbd-s3\n"
    );
    disk.umount();
    disk.stop();
}
