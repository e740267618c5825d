//! The command line and configuration file as documented in the README, through the real
//! binary: `check-config` accepts the shipped example and prints its exports; every invalid
//! file exits 1 with `PATH:LINE: message naming the key` on stderr; `--help`/`--version`;
//! the ad-hoc single-export mode serves through a real S3 server.

use crate::common::{nbdinfo, NbdS3, S3Server};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nbd-s3");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nbd-s3/exports.toml")
}

/// `nbd-s3 ARGS` in `dir` with a clean configuration environment.
fn nbd_s3(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("NBD_S3_CONFIG")
        .env_remove("NBD_EXPORT_NAME")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run nbd-s3")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `exports.toml` into a fresh directory and runs check-config on it by relative path.
/// Returns stderr, asserting exit status 1 and nothing on stdout.
fn check_invalid(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exports.toml"), toml).unwrap();
    let out = nbd_s3(dir.path(), &["check-config", "--config", "exports.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.is_empty(),
        "an invalid file printed a summary: {stdout}"
    );
    stderr
}

/// The example with one line replaced (the replaced line must exist).
fn example_with(from: &str, to: &str) -> String {
    let src = std::fs::read_to_string(example()).unwrap();
    assert!(src.contains(from), "example lacks {from:?}");
    src.replacen(from, to, 1)
}

/// The 1-based line of the first occurrence of `needle` in `src`.
fn line_of(src: &str, needle: &str) -> usize {
    let at = src
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the file"));
    src[..at].matches('\n').count() + 1
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let dir = tempfile::tempdir().unwrap();
    let out = nbd_s3(
        dir.path(),
        &["check-config", "--config", example().to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "check-config failed:\n{stderr}");
    let row = stderr
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("no row for export demo:\n{stderr}"));
    for cell in ["1GiB", "nbd", "demo/", "128KiB", "no"] {
        assert!(
            row.split_whitespace().any(|c| c == cell),
            "{cell} missing in {row:?}"
        );
    }
    assert!(
        stderr.contains("NAME") && stderr.contains("BUCKET"),
        "no table header:\n{stderr}"
    );
    assert!(
        stdout.contains("demo"),
        "redirected stdout gets the table too:\n{stdout}"
    );
}

#[test]
fn config_path_from_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .current_dir(dir.path())
        .env("NBD_S3_CONFIG", example())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).1.contains("demo"));
    let out = Command::new(BIN)
        .arg("check-config")
        .env("NBD_S3_CONFIG", dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("absent.toml"), "{}", text(&out).1);
}

#[test]
fn misspelt_key_names_file_line_and_key() {
    let src = example_with("size = \"1GiB\"", "sise = \"1GiB\"");
    let line = line_of(&src, "sise =");
    let stderr = check_invalid(&src);
    assert_eq!(
        stderr.trim_end(),
        format!("exports.toml:{line}: export \"demo\": unknown key \"sise\"")
    );
}

#[test]
fn duplicate_export_is_refused() {
    let src = format!(
        "{}\n[[export]]\nname = \"demo\"\nsize = \"1GiB\"\nbucket = \"other\"\nprefix = \"demo/\"\n",
        std::fs::read_to_string(example()).unwrap()
    );
    let line = src.lines().count() - 3;
    let stderr = check_invalid(&src);
    assert!(
        stderr.starts_with(&format!(
            "exports.toml:{line}: export \"demo\": duplicate export name"
        )),
        "{stderr}"
    );
}

#[test]
fn bad_size_is_refused() {
    for bad in ["\"1GiBB\"", "\"1000\"", "\"0\"", "\"1.3KiB\"", "-1"] {
        let src = example_with("size = \"1GiB\"", &format!("size = {bad}"));
        let line = line_of(&src, &format!("size = {bad}"));
        let stderr = check_invalid(&src);
        assert!(
            stderr.starts_with(&format!("exports.toml:{line}: export \"demo\": size")),
            "{bad}: {stderr}"
        );
    }
}

#[test]
fn non_power_of_two_block_size_is_refused() {
    for bad in ["\"100KiB\"", "\"2KiB\"", "\"16MiB\""] {
        let src = example_with("# block_size = \"128KiB\"", &format!("block_size = {bad}"));
        let line = line_of(&src, "block_size = ");
        let stderr = check_invalid(&src);
        assert!(
            stderr.starts_with(&format!("exports.toml:{line}: export \"demo\": block_size")),
            "{bad}: {stderr}"
        );
        assert!(stderr.contains("power of two"), "{stderr}");
    }
}

#[test]
fn overlapping_prefixes_are_refused() {
    let src = format!(
        "{}\n[[export]]\nname = \"demo2\"\nsize = \"1GiB\"\nbucket = \"nbd\"\nprefix = \"demo/sub/\"\n",
        std::fs::read_to_string(example()).unwrap()
    );
    let line = src.lines().count();
    let stderr = check_invalid(&src);
    assert!(
        stderr.starts_with(&format!(
            "exports.toml:{line}: export \"demo2\": prefix \"demo/sub/\""
        )),
        "{stderr}"
    );
    assert!(stderr.contains("overlaps export \"demo\""), "{stderr}");
}

#[test]
fn group_readable_secret_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cr3t\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let src = example_with(
        "endpoint = \"file:///var/lib/nbd-s3\"",
        &format!(
            "endpoint = \"http://127.0.0.1:9000\"\naccess_key_id = \"AK\"\nsecret_access_key_file = \"{}\"",
            secret.display()
        ),
    );
    let line = line_of(&src, "secret_access_key_file =");
    let stderr = check_invalid(&src);
    assert!(
        stderr.starts_with(&format!(
            "exports.toml:{line}: [s3]: secret_access_key_file:"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&secret.display().to_string()) && stderr.contains("0644"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cr3t"), "secret leaked: {stderr}");
    // chmod 600 fixes it, and the secret never appears in the summary.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = dir.path().join("ok.toml");
    std::fs::write(&file, &src).unwrap();
    let out = nbd_s3(
        dir.path(),
        &["check-config", "--config", file.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"));
}

#[test]
fn serve_refuses_an_invalid_file_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = example_with("size = \"1GiB\"", "sise = \"1GiB\"");
    std::fs::write(dir.path().join("exports.toml"), &src).unwrap();
    let out = nbd_s3(dir.path(), &["serve", "--config", "exports.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let line = line_of(&src, "sise =");
    assert!(text(&out).1.contains(&format!(
        "exports.toml:{line}: export \"demo\": unknown key \"sise\""
    )));
    let out = nbd_s3(
        dir.path(),
        &["serve", "--export-name", "x", "--size", "1000"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--size"), "{}", text(&out).1);
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = nbd_s3(dir.path(), &["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out).0.trim(),
        format!("nbd-s3 {}", env!("CARGO_PKG_VERSION"))
    );
    let out = nbd_s3(dir.path(), &["--help"]);
    assert!(out.status.success());
    let help = text(&out).0;
    assert!(
        help.contains("serve") && help.contains("check-config"),
        "{help}"
    );
    let out = nbd_s3(dir.path(), &["serve", "--help"]);
    let help = text(&out).0;
    for flag in [
        "--config",
        "--export-name",
        "--host",
        "--port",
        "--size",
        "--s3-endpoint",
        "--s3-access-key",
        "--s3-secret-key",
        "--s3-bucket",
        "--s3-region",
        "--log-level",
        "NBD_S3_CONFIG",
        "NBD_EXPORT_NAME",
        "NBD_SIZE",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}:\n{help}");
    }
    let out = nbd_s3(dir.path(), &["frobnicate"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "unknown subcommand must be a usage error"
    );
}

#[test]
fn ad_hoc_export_from_environment_flags_win() {
    let s3 = S3Server::start();
    std::fs::create_dir_all(s3.root().join("adhoc-bucket")).unwrap();
    let d = NbdS3::builder(&s3)
        .args(&[
            "serve",
            "--port",
            "0",
            "--size",
            "16MiB",
            "--log-level",
            "debug",
        ])
        .env("NBD_EXPORT_NAME", "scratch")
        .env("NBD_HOST", "127.0.0.1")
        .env("NBD_PORT", "1") // the --port flag wins
        .env("NBD_SIZE", "1GB") // the --size flag wins
        .env("NBD_S3_ENDPOINT", &s3.endpoint())
        .env("NBD_S3_ACCESS_KEY", &s3.access_key)
        .env("NBD_S3_SECRET_KEY", &s3.secret_key)
        .env("NBD_S3_BUCKET", "adhoc-bucket")
        .env("NBD_S3_REGION", &s3.region)
        .env("NBD_LOG_LEVEL", "error") // --log-level wins (else no `listening on` line at all)
        .start();
    let list = nbdinfo(&["--list", &format!("nbd://127.0.0.1:{}", d.port())]);
    assert!(list.contains("scratch"), "{list}");
    let info = nbdinfo(&["--size", &d.uri("scratch")]);
    assert_eq!(info.trim(), (16u64 << 20).to_string());
    assert!(!d.logs().contains(&s3.secret_key), "secret key logged");
    assert!(
        d.logs().contains("DEBUG"),
        "--log-level debug ignored:\n{}",
        d.logs()
    );
}
