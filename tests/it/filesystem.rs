//! A real filesystem on an export without the kernel nbd module: ext4 made
//! through qemu-storage-daemon's FUSE export, loop-mounted, and checked across a restart.

use crate::common::fuse::FuseDisk;
use crate::common::*;

const MIB: u64 = 1 << 20;

/// A real filesystem: mkfs.ext4 through qemu's FUSE export, files written through a loop
/// mount, the daemon restarted (SIGTERM flushes), then fsck and the files read back.
#[test]
fn ext4_on_an_export_survives_a_daemon_restart() {
    let s3 = S3Server::start();
    let mut nbd = NbdS3::builder(&s3)
        .export(ExportSpec::new("fs").size("64MiB"))
        .start();
    let dir = tempfile::tempdir().unwrap();
    let mut disk = FuseDisk::start(nbd.port(), "fs", dir.path());
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
    let mut disk = FuseDisk::start(nbd.port(), "fs", dir.path());
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
