//! A Linux guest for testing with the kernel's own NBD client (`nbd.ko`), which the machine
//! running the tests usually cannot load. qemu boots Debian's kernel (unpacked by
//! scripts/deps.sh) with a busybox initramfs that loads the nbd, ext4, xfs and virtio modules
//! and mounts the host's root read-only over virtio-9p: every step runs the host's own
//! `nbd-client`, `mkfs.*`, `fio` and `e2fsck` chrooted into it, so the guest needs no image.
//! qemu's user-mode network lets the guest reach the host's loopback as `10.0.2.2`; run the
//! daemon, s3s-fs and the guest inside `enter_private_netns()` so those ports are the test's.
//!
//! Steps are shell scripts: the host writes `N.sh` into a shared work directory and names it
//! on the guest's console; the guest runs it (`bash -eux -o pipefail`) and answers
//! `@@END N STATUS` on the console, the step's output being in `N.out` beside the script.

use super::clients::which;
use super::proc::LogBuffer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The host as the guest sees it (qemu user-mode network), where the daemon's port is.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// Boot deadline. Under TCG on a busy two-core machine a boot takes 10-20 s; the margin is for
/// parallel test load, not for a normal boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Modules the guest loads (with their dependencies from modules.dep, loaded first): virtio
/// for the network and the 9p shares, the NBD driver, and the filesystems under test.
const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "nbd",
    "crc32c_generic",
    "ext4",
    "xfs",
];

/// Kernel log lines that mean a request failed or a filesystem saw damage. The driver's
/// normal messages (connect, capacity change, disconnect) match none of them.
const KERNEL_ERROR_PATTERNS: &[&str] = &[
    "I/O error",
    "blk_update_request",
    "critical medium error",
    "EXT4-fs error",
    "EXT4-fs warning",
    "Corruption",
    "metadata I/O error",
    "xfs_do_force_shutdown",
    "Dead connection",
    "timed out",
    "Other side returned error",
    "Receive control failed",
    "Send control failed",
    "Receive data failed",
    "Send data failed",
    "Attempted send on invalid socket",
    "Unexpected reply",
    "Double reply",
    "Suspicious reply",
    "Call Trace",
    "BUG:",
];

/// What booting a guest needs: qemu, the unpacked kernel and modules, a static busybox.
#[derive(Debug, Clone)]
pub struct GuestTools {
    qemu: PathBuf,
    kernel: PathBuf,
    modules: PathBuf,
    busybox: PathBuf,
}

/// Where scripts/deps.sh unpacks the guest kernel (`$NBD_S3_GUEST_DIR` overrides).
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NBD_S3_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/nbd-s3/guest")
}

impl GuestTools {
    /// Finds everything, or says what is missing and how to get it.
    pub fn find() -> Result<GuestTools, String> {
        let hint = "run scripts/deps.sh (installs qemu-system-x86, busybox-static, xfsprogs, \
                    iproute2 and unpacks Debian's linux-image-amd64)";
        let qemu = which("qemu-system-x86_64")
            .ok_or_else(|| format!("qemu-system-x86_64 is not installed: {hint}"))?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| format!("busybox (busybox-static) is not installed: {hint}"))?;
        for t in [
            "ip",
            "mkfs.xfs",
            "xfs_repair",
            "nbd-client",
            "mkfs.ext4",
            "fio",
        ] {
            if which(t).is_none() {
                return Err(format!("`{t}` is not installed: {hint}"));
            }
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(
                "not root: the guest runs in a private network namespace, and \
                        creating one needs root"
                    .into(),
            );
        }
        let dir = guest_dir();
        let kernel = std::fs::read_dir(dir.join("boot"))
            .ok()
            .and_then(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .find(|p| file_name(p).starts_with("vmlinuz-"))
            })
            .ok_or_else(|| format!("no guest kernel under {}/boot: {hint}", dir.display()))?;
        let version = file_name(&kernel)["vmlinuz-".len()..].to_string();
        let modules = dir.join("lib/modules").join(&version);
        if !modules.join("modules.dep").is_file() {
            return Err(format!("no modules.dep in {}: {hint}", modules.display()));
        }
        Ok(GuestTools {
            qemu,
            kernel,
            modules,
            busybox,
        })
    }

    /// The tools, or `None` after saying loudly why the test does not run. Missing tooling
    /// is a failure under `CI=true`: CI installs it, so its absence there is a broken setup,
    /// not a reason to pass quietly.
    pub fn or_skip(test: &str) -> Option<GuestTools> {
        match GuestTools::find() {
            Ok(t) => Some(t),
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("{test}: kernel-client guest unavailable under CI=true: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED {test}: kernel-client guest unavailable: {why}");
                None
            }
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Moves the calling thread (and every process and thread it starts from now on) into a new,
/// empty network namespace with loopback up. The guest reaches "the host" through qemu's
/// user-mode network, i.e. the loopback of qemu's namespace: a private one means the guest
/// sees only this test's daemon and S3 server, and parallel tests cannot collide on ports.
/// Needs CAP_SYS_ADMIN (CI runs as root).
pub fn enter_private_netns() {
    // Only this thread's namespace changes: the children it starts inherit it.
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        panic!("unshare(CLONE_NEWNET) failed (needs root): {e}");
    }
    let ip = which("ip").expect("`ip` (iproute2) is installed");
    super::clients::run_ok(Command::new(ip).args(["link", "set", "lo", "up"]));
}

/// A booted guest; qemu is killed on drop.
pub struct Guest {
    child: Child,
    stdin: ChildStdin,
    console: LogBuffer,
    work: tempfile::TempDir,
    steps: u32,
    boot_time: Duration,
}

/// What a step printed and how it ended.
pub struct StepOutput {
    /// Exit status of the step's shell.
    pub status: i32,
    /// stdout and stderr (with bash's `-x` trace of every command).
    pub output: String,
}

impl Guest {
    /// Boots a guest and waits until it takes steps; panics with the console on failure.
    pub fn boot(tools: &GuestTools) -> Guest {
        let work = tempfile::Builder::new()
            .prefix("nbd-s3-guest.")
            .tempdir()
            .expect("tempdir");
        let initramfs = work.path().join("initramfs.cpio");
        std::fs::write(&initramfs, build_initramfs(tools)).expect("write initramfs");
        let share = work.path().join("share");
        std::fs::create_dir(&share).expect("mkdir share");

        let started = Instant::now();
        let mut cmd = Command::new(&tools.qemu);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024"])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(&tools.kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-virtfs")
            .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=work,security_model=none,multidevs=remap",
                share.display()
            ))
            .args([
                "-netdev",
                "user,id=net0",
                "-device",
                "virtio-net-pci,netdev=net0",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tools.qemu.display()));
        let console = LogBuffer::default();
        console.follow(child.stdout.take().expect("piped stdout"));
        console.follow(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut guest = Guest {
            child,
            stdin,
            console,
            work,
            steps: 0,
            boot_time: Duration::ZERO,
        };
        // The first "@@" line is @@READY or @@GUEST-FAILED; `None` when qemu exits or hangs.
        match guest.console.wait_for("@@", BOOT_TIMEOUT) {
            Some(l) if l.contains("@@READY") => {}
            other => panic!(
                "guest did not boot ({other:?}) within {BOOT_TIMEOUT:?}:\n{}",
                guest.console.text()
            ),
        }
        guest.boot_time = started.elapsed();
        guest
    }

    /// How long the boot took, qemu start to the first step accepted.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Runs `script` in the guest as one step (bash -eux -o pipefail, host root as `/`,
    /// `/tmp` a private tmpfs) and returns how it ended; panics if it does not end within
    /// `timeout`.
    pub fn try_run(&mut self, script: &str, timeout: Duration) -> StepOutput {
        self.steps += 1;
        let n = self.steps;
        let share = self.work.path().join("share");
        std::fs::write(share.join(format!("{n}.sh")), script).expect("write step");
        writeln!(self.stdin, "{n}")
            .and_then(|_| self.stdin.flush())
            .unwrap_or_else(|e| panic!("guest console closed: {e}\n{}", self.console.text()));
        let end = format!("@@END {n} ");
        let line = self.console.wait_for(&end, timeout).unwrap_or_else(|| {
            panic!(
                "guest step {n} did not finish within {timeout:?}:\n{script}\n\
                     --- output so far ---\n{}\n--- console ---\n{}",
                std::fs::read_to_string(share.join(format!("{n}.out"))).unwrap_or_default(),
                self.console.text()
            )
        });
        let status = line
            .split(&end)
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("unreadable step end {line:?}"));
        let output = std::fs::read_to_string(share.join(format!("{n}.out"))).unwrap_or_default();
        StepOutput { status, output }
    }

    /// Runs `script` as one step and panics, showing what it printed and the guest's kernel
    /// log, unless it exits 0. Returns the step's output.
    pub fn run(&mut self, what: &str, script: &str, timeout: Duration) -> String {
        let started = Instant::now();
        let out = self.try_run(script, timeout);
        eprintln!("guest step `{what}`: {:.1?}", started.elapsed());
        if out.status != 0 {
            let dmesg = self.try_run("dmesg", Duration::from_secs(60)).output;
            panic!(
                "guest step `{what}` failed (exit {}):\n{}\n--- guest kernel log ---\n{dmesg}",
                out.status, out.output
            );
        }
        out.output
    }

    /// Kernel log lines that report I/O errors or filesystem damage since the last call
    /// (the log is cleared each time, so each case answers for its own steps).
    pub fn kernel_errors(&mut self) -> Vec<String> {
        let log = self.run(
            "read kernel log",
            "dmesg; dmesg -C",
            Duration::from_secs(60),
        );
        log.lines()
            .filter(|l| !l.starts_with('+'))
            .filter(|l| KERNEL_ERROR_PATTERNS.iter().any(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    /// Panics listing the guest's kernel errors since the last check, if there are any.
    pub fn assert_no_kernel_errors(&mut self, case: &str) {
        let errors = self.kernel_errors();
        assert!(
            errors.is_empty(),
            "{case}: the guest kernel logged errors:\n{}",
            errors.join("\n")
        );
    }

    /// Puts `data` into the directory shared with the guest; returns its path in the guest.
    pub fn share_file(&self, name: &str, data: &[u8]) -> String {
        std::fs::write(self.work.path().join("share").join(name), data).expect("write share");
        format!("/tmp/work/{name}")
    }

    /// Where the host sees a file the guest writes to `/tmp/work/NAME`.
    pub fn share_path(&self, name: &str) -> PathBuf {
        self.work.path().join("share").join(name)
    }

    /// Everything the guest printed on its console.
    pub fn console(&self) -> String {
        self.console.text()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The initramfs (newc cpio): busybox, the init script, and the modules it loads, in load
/// order in `/modules`. Built per boot from the unpacked kernel, so a kernel update needs no
/// other step.
fn build_initramfs(tools: &GuestTools) -> Vec<u8> {
    let mut cpio = Cpio::default();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "host", "tmp",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init's output before anything is mounted.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &read(&tools.busybox));
    cpio.file("init", 0o755, include_str!("guest/init").as_bytes());

    let version = file_name(&tools.modules);
    let deps = read_modules_dep(&tools.modules);
    let mut order = Vec::new();
    for m in GUEST_MODULES {
        let path = deps
            .keys()
            .find(|p| module_name(p) == *m)
            .unwrap_or_else(|| panic!("module {m} not in {}/modules.dep", tools.modules.display()))
            .clone();
        load_order(&path, &deps, &mut order);
    }
    let mut list = String::new();
    let mut made = std::collections::BTreeSet::new();
    for rel in &order {
        let inside = format!("lib/modules/{version}/{rel}");
        let mut dir = String::new();
        for part in Path::new(&inside)
            .parent()
            .expect("module path has a parent")
            .components()
        {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(&part.as_os_str().to_string_lossy());
            if made.insert(dir.clone()) {
                cpio.dir(&dir);
            }
        }
        cpio.file(&inside, 0o644, &read(&tools.modules.join(rel)));
        list.push_str(&format!("/{inside}\n"));
    }
    cpio.file("modules", 0o644, list.as_bytes());
    cpio.finish()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// modules.dep: module path → the paths it depends on.
fn read_modules_dep(dir: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let text = String::from_utf8_lossy(&read(&dir.join("modules.dep"))).into_owned();
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                m.to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// `kernel/fs/9p/9p.ko` → `9p`; modprobe treats `-` and `_` alike.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.trim_end_matches(".ko").replace('-', "_")
}

/// Appends `path` after everything it needs (each once).
fn load_order(
    path: &str,
    deps: &std::collections::BTreeMap<String, Vec<String>>,
    order: &mut Vec<String>,
) {
    if order.iter().any(|p| p == path) {
        return;
    }
    for d in deps.get(path).into_iter().flatten().rev() {
        load_order(d, deps, order);
    }
    order.push(path.to_string());
}

/// A minimal newc ("070701") cpio writer: directories, regular files, one device node.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}
