//! A real filesystem on an export without the kernel nbd module: qemu-storage-daemon exposes
//! the export as a file through FUSE, which a test formats and loop-mounts. Everything is
//! unmounted and stopped on drop, so a failing test leaves nothing mounted.

use super::proc::Process;
use super::{run_ok, tool, wait_until, DAEMON_TIMEOUT};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;

/// qemu-storage-daemon exposing an NBD export as the file `file`, mountable on `mnt`.
pub struct FuseDisk {
    qsd: Option<Process>,
    /// The export as a file (the FUSE mount point).
    pub file: PathBuf,
    /// Where `mount` loop-mounts the filesystem in `file`.
    pub mnt: PathBuf,
    mounted: bool,
}

impl FuseDisk {
    /// Exposes `export` of the daemon on `127.0.0.1:port` as `dir/disk.raw`, waiting until
    /// the FUSE mount is in place; `dir/mnt` is created for `mount`.
    pub fn start(port: u16, export: &str, dir: &Path) -> FuseDisk {
        let file = dir.join("disk.raw");
        let mnt = dir.join("mnt");
        std::fs::write(&file, b"").expect("create the FUSE mount point");
        std::fs::create_dir_all(&mnt).expect("create the mount point");
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
        let mut qsd = Process::spawn(&mut cmd, "qemu-storage-daemon");
        let needle = format!(" {} ", file.display());
        wait_until("the FUSE export to be mounted", DAEMON_TIMEOUT, || {
            assert!(
                qsd.try_wait().is_none(),
                "qemu-storage-daemon exited: {}",
                qsd.logs.text()
            );
            std::fs::read_to_string("/proc/self/mountinfo")
                .expect("/proc/self/mountinfo")
                .contains(&needle)
        });
        FuseDisk {
            qsd: Some(qsd),
            file,
            mnt,
            mounted: false,
        }
    }

    /// Loop-mounts the filesystem in `file` on `mnt`.
    pub fn mount(&mut self) {
        run_ok(
            tool("mount")
                .arg("-o")
                .arg("loop")
                .arg(&self.file)
                .arg(&self.mnt),
        );
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        run_ok(tool("umount").arg(&self.mnt));
        self.mounted = false;
    }

    /// SIGTERM and wait: qemu-storage-daemon flushes and disconnects from nbd-s3 cleanly.
    pub fn stop(mut self) {
        let Some(mut qsd) = self.qsd.take() else {
            return;
        };
        qsd.signal(Signal::SIGTERM);
        let status = qsd
            .wait_exit(DAEMON_TIMEOUT)
            .expect("qemu-storage-daemon exits");
        assert!(
            status.success(),
            "qemu-storage-daemon: {status}\n{}",
            qsd.logs.text()
        );
    }
}

impl Drop for FuseDisk {
    // Plain `Command`s, errors ignored: a panic here, while a failed test unwinds, would abort.
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(qsd) = self.qsd.take() {
            // Killed, qemu-storage-daemon leaves its FUSE mount behind.
            drop(qsd);
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.file)
                .status();
        }
    }
}
