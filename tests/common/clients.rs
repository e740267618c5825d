//! Real NBD clients (libnbd's nbdsh/nbdinfo/nbdcopy, qemu-io/qemu-img, fio, nbd-client) run
//! as commands. A missing tool is a test failure with the install command, never a skip:
//! CI installs them all (scripts/deps.sh).

use std::path::PathBuf;
use std::process::{Command, Output};

/// `PATH` for clients: Debian's /usr/bin first so nbdsh finds the python3 that has libnbd.
pub fn client_path() -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("/usr/bin:/usr/sbin:/bin:/sbin:{rest}")
}

/// Looks `name` up in `client_path()`.
pub fn which(name: &str) -> Option<PathBuf> {
    client_path()
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

/// The Debian package providing each tool, for the failure message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "nbdsh" => "python3-libnbd",
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "qemu-io" | "qemu-img" | "qemu-nbd" | "qemu-storage-daemon" => "qemu-utils",
        "nbd-client" => "nbd-client",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "mkfs.ext4" | "e2fsck" => "e2fsprogs",
        "mount" | "umount" | "losetup" => "mount",
        _ => "?",
    }
}

/// Whether `name` is installed. Not a reason to skip a test: use `tool()` which fails loudly.
pub fn tool_available(name: &str) -> bool {
    which(name).is_some()
}

/// A `Command` for tool `name` with the client `PATH`; panics with the install hint if the
/// tool is missing.
pub fn tool(name: &str) -> Command {
    let path = which(name).unwrap_or_else(|| {
        panic!(
            "required tool `{name}` is not installed: apt-get install {} \
             (or run scripts/deps.sh)",
            package_of(name)
        )
    });
    let mut cmd = Command::new(path);
    cmd.env("PATH", client_path());
    cmd.env("LIBNBD_DEBUG", "0");
    cmd
}

/// Runs `cmd` and returns its output, whatever the exit status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// Runs `cmd` and panics, showing the command, stdout and stderr, unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{} failed: {}",
        describe(cmd),
        show(&out)
    );
    out
}

/// Runs `cmd` and panics unless it exits non-zero; returns the output for checking messages.
pub fn run_fails(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{} unexpectedly succeeded: {}",
        describe(cmd),
        show(&out)
    );
    out
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Status, stdout and stderr, for messages.
pub fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stdout as a `String`.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdsh -u URI -c CODE` where CODE is `lines` joined; asserts success. The handle is `h`.
pub fn nbdsh(uri: &str, lines: &[&str]) -> Output {
    run_ok(tool("nbdsh").args(["-u", uri, "-c", &lines.join("\n")]))
}

/// `nbdsh -c CODE` without connecting, for code that configures `h` first and calls
/// `h.connect_uri(...)` itself (e.g. `h.set_request_structured_replies(False)`).
pub fn nbdsh_script(lines: &[&str]) -> Output {
    run_ok(tool("nbdsh").args(["-c", &lines.join("\n")]))
}

/// `qemu-io -f raw URI -c CMD...`; asserts success and that no command reported a failure
/// (qemu-io prints pattern mismatches and I/O errors but may still exit 0).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    for bad in ["failed", "Pattern verification", "error", "Error"] {
        assert!(
            !text.contains(bad),
            "{} reported `{bad}`: {}",
            describe(&cmd),
            show(&out)
        );
    }
    out
}

/// `nbdinfo ARGS...`; asserts success and returns stdout.
pub fn nbdinfo(args: &[&str]) -> String {
    stdout(&run_ok(tool("nbdinfo").args(args)))
}

/// `qemu-img ARGS...`; asserts success and returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    stdout(&run_ok(tool("qemu-img").args(args)))
}

/// `nbdcopy ARGS...`; asserts success.
pub fn nbdcopy(args: &[&str]) -> Output {
    run_ok(tool("nbdcopy").args(args))
}

/// `nbd-client ARGS...`; asserts success and returns stdout.
pub fn nbd_client(args: &[&str]) -> String {
    stdout(&run_ok(tool("nbd-client").args(args)))
}

/// `fio ARGS...`; asserts success (fio exits non-zero on verify failures) and returns stdout.
/// Runs in a throwaway directory: fio drops `*-verify.state` files in its working directory.
pub fn fio(args: &[&str]) -> String {
    let dir = tempfile::Builder::new()
        .prefix("fio.")
        .tempdir()
        .expect("tempdir");
    stdout(&run_ok(tool("fio").current_dir(dir.path()).args(args)))
}
