//! Credentials stay out of the logs even at trace level with S3 traffic flowing (the SDK's
//! own logging included), and `check-config` warns about configuration files other local
//! users can read or change, without printing the credential it warns about.

use crate::common::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[test]
fn secret_key_never_logged_at_trace_level_with_s3_traffic() {
    let s3 = S3Server::start();
    std::fs::create_dir_all(s3.root().join("secret-bucket")).unwrap();
    let d = NbdS3::builder(&s3)
        .args(&[
            "serve",
            "--export-name",
            "vault",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--size",
            "8MiB",
            "--s3-endpoint",
            &s3.endpoint(),
            "--s3-access-key",
            &s3.access_key,
            "--s3-secret-key",
            &s3.secret_key,
            "--s3-bucket",
            "secret-bucket",
            "--s3-region",
            &s3.region,
        ])
        .env("RUST_LOG", "trace")
        .start();
    // S3 PUTs (signed with the secret) and GETs on a fresh cache.
    nbdsh(
        &d.uri("vault"),
        &[
            "h.pwrite(b'\\x5a' * 262144, 0, nbd.CMD_FLAG_FUA)",
            "h.flush()",
        ],
    );
    wait_until("a block in S3", Duration::from_secs(30), || {
        !s3.list_keys("secret-bucket", "vault/").is_empty()
    });
    let logs = d.logs();
    assert!(logs.contains("TRACE"), "trace logging is off:\n{logs}");
    assert!(!logs.contains(&s3.secret_key), "secret key logged");
    assert!(
        logs.contains("--s3-secret-key on the command line is visible"),
        "no warning about the secret in ps:\n{logs}"
    );
}

#[test]
fn check_config_warns_about_exposed_configuration_files() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exports.toml");
    let mut cfg = DaemonConfig::for_s3(&s3);
    cfg.exports.push(ExportSpec::new("disk"));
    std::fs::write(&path, cfg.render()).unwrap();
    let check = |mode: u32| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = run(
            std::process::Command::new(env!("CARGO_BIN_EXE_nbd-s3")).args([
                "check-config",
                "--config",
                path.to_str().unwrap(),
            ]),
        );
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let quiet = check(0o640);
    assert!(!quiet.contains("warning"), "{quiet}");
    let readable = check(0o644);
    assert!(
        readable.contains("warning:") && readable.contains("access_key_id"),
        "{readable}"
    );
    let writable = check(0o666);
    assert!(
        writable.contains("every local user can change"),
        "{writable}"
    );
    assert!(!writable.contains(&s3.secret_key), "{writable}");
}
