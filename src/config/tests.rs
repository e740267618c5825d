//! Unit tests: every error names `PATH:LINE` and the key; defaults are the documented ones (README, "Configuration").

use super::*;
use std::os::unix::fs::PermissionsExt;

const GOOD: &str = r#"[server]
listen = "127.0.0.1:10809"

[s3]
endpoint = "http://127.0.0.1:9000"
region = "us-east-1"

[[export]]
name = "vm1"
size = "20GiB"
bucket = "nbd"
prefix = "vm1/"
"#;

fn parse(src: &str) -> Result<Config, ConfigError> {
    Config::parse(src, "exports.toml", Path::new("."))
}

/// The single diagnostic of an invalid file, as printed.
fn error_line(src: &str) -> String {
    match parse(src) {
        Ok(cfg) => panic!("accepted invalid config: {cfg:?}"),
        Err(e) => {
            let lines = e.lines();
            assert_eq!(lines.len(), 1, "expected one error, got {lines:?}");
            lines[0].clone()
        }
    }
}

fn with_export(body: &str) -> String {
    format!("[[export]]\nname = \"vm1\"\nbucket = \"nbd\"\n{body}")
}

#[test]
fn good_file_and_defaults() {
    let cfg = parse(GOOD).unwrap();
    assert_eq!(
        cfg.server.listen,
        vec![ListenAddr::Tcp("127.0.0.1:10809".into())]
    );
    assert_eq!(cfg.server.metrics, None);
    assert!(cfg.s3.path_style, "path style defaults on with an endpoint");
    assert_eq!(cfg.cache.memory, 1 << 30);
    assert_eq!(cfg.cache.dirty, 256 << 20);
    assert_eq!(cfg.cache.flush_timeout, Duration::from_secs(60));
    let e = &cfg.exports[0];
    assert_eq!(
        (e.name.as_str(), e.size, e.bucket.as_str()),
        ("vm1", 20 << 30, "nbd")
    );
    assert_eq!(e.block_size, 128 << 10);
    assert!(!e.read_only);
    assert_eq!(e.description, None);
}

#[test]
fn defaults_without_sections() {
    let cfg = parse(&with_export("size = 1048576\n")).unwrap();
    assert_eq!(
        cfg.server.listen,
        vec![ListenAddr::Tcp("0.0.0.0:10809".into())]
    );
    assert_eq!(cfg.s3.endpoint, None);
    assert!(!cfg.s3.path_style, "path style defaults off for AWS");
    assert!(
        cfg.s3.adaptive_concurrency,
        "throttling lowers concurrency by default"
    );
    assert_eq!(cfg.exports[0].prefix, "vm1/");
    let no_exports = parse("[server]\n").unwrap();
    assert!(no_exports.exports.is_empty());
    assert_eq!(
        error_line(" \n\n"),
        "exports.toml:1: the file is empty (an empty configuration needs at least a [server] section)"
    );
}

#[test]
fn every_field_parsed() {
    let src = r#"
[server]
listen = ["127.0.0.1:0", "unix:/run/nbd.sock", "[::1]:10809"]
metrics = "127.0.0.1:9810"
[s3]
endpoint = "file:///var/lib/nbd-s3"
path_style = false
adaptive_concurrency = false
[cache]
memory = "2GiB"
dirty = "512MiB"
flush_timeout = "2m 30s"
[[export]]
name = "a"
size = "1.5GiB"
bucket = "b"
prefix = "x/"
block_size = "1MiB"
read_only = true
description = "root disk"
"#;
    let cfg = parse(src).unwrap();
    assert_eq!(cfg.server.listen.len(), 3);
    assert_eq!(
        cfg.server.listen[1],
        ListenAddr::Unix("/run/nbd.sock".into())
    );
    assert_eq!(cfg.server.metrics, Some("127.0.0.1:9810".parse().unwrap()));
    assert!(!cfg.s3.path_style);
    assert!(!cfg.s3.adaptive_concurrency);
    assert_eq!((cfg.cache.memory, cfg.cache.dirty), (2 << 30, 512 << 20));
    assert_eq!(cfg.cache.flush_timeout, Duration::from_secs(150));
    let e = &cfg.exports[0];
    assert_eq!(
        (e.size, e.block_size, e.read_only),
        (3 << 29, 1 << 20, true)
    );
    assert_eq!(e.description.as_deref(), Some("root disk"));
}

#[test]
fn unknown_key_in_export_names_export_line_and_key() {
    let src = format!("{GOOD}sise = \"1GiB\"\n");
    assert_eq!(
        error_line(&src),
        "exports.toml:13: export \"vm1\": unknown key \"sise\""
    );
}

#[test]
fn unknown_keys_elsewhere() {
    assert_eq!(
        error_line("[server]\nlisen = \"x:1\"\n"),
        "exports.toml:2: [server]: unknown key \"lisen\""
    );
    assert_eq!(
        error_line("\n[serverx]\n"),
        "exports.toml:2: unknown key \"serverx\""
    );
    let inline = error_line("[s3]\nsecret_access_key = \"s3cr3t\"\n");
    assert!(
        inline.starts_with("exports.toml:2: [s3]: unknown key \"secret_access_key\": secrets")
            && inline.contains("secret_access_key_file")
            && !inline.contains("s3cr3t"),
        "{inline}"
    );
}

#[test]
fn missing_and_mistyped_keys() {
    let line = error_line("[[export]]\nname = \"vm1\"\nsize = 1024\n");
    assert_eq!(
        line,
        "exports.toml:1: export \"vm1\": missing key \"bucket\""
    );
    let line = error_line(&with_export("size = 1024\nread_only = \"yes\"\n"));
    assert!(
        line.starts_with("exports.toml:5: export \"vm1\": key \"read_only\": invalid type"),
        "{line}"
    );
    let line = error_line(&with_export("size = true\n"));
    assert!(
        line.starts_with("exports.toml:4: export \"vm1\": key \"size\":"),
        "{line}"
    );
    let line = error_line("[server]\nlisten = 5\n");
    assert!(
        line.starts_with("exports.toml:2: [server]: key \"listen\":"),
        "{line}"
    );
}

#[test]
fn duplicate_key_and_syntax_errors_have_lines() {
    let line = error_line(&with_export("size = 1024\nsize = 2048\n"));
    assert_eq!(
        line,
        "exports.toml:5: export \"vm1\": duplicate key \"size\""
    );
    let line = error_line("[server\n");
    assert!(line.starts_with("exports.toml:1: "), "{line}");
}

#[test]
fn duplicate_export_name() {
    let src = format!("{GOOD}\n[[export]]\nname = \"vm1\"\nsize = \"1GiB\"\nbucket = \"other\"\n");
    assert_eq!(
        error_line(&src),
        "exports.toml:15: export \"vm1\": duplicate export name (first defined on line 8)"
    );
}

#[test]
fn overlapping_prefixes() {
    let src = "[[export]]\nname = \"a\"\nsize = 1024\nbucket = \"b\"\nprefix = \"a\"\n\
               [[export]]\nname = \"ab\"\nsize = 1024\nbucket = \"b\"\nprefix = \"ab\"\n";
    let line = error_line(src);
    assert!(
        line.starts_with(
            "exports.toml:10: export \"ab\": prefix \"ab\" in bucket \"b\" overlaps export \"a\""
        ),
        "{line}"
    );
    // Same prefixes in different buckets are fine; so are siblings.
    let ok = src.replacen(
        "bucket = \"b\"\nprefix = \"ab\"",
        "bucket = \"c\"\nprefix = \"ab\"",
        1,
    );
    assert!(parse(&ok).is_ok());
    let ok = src
        .replacen("prefix = \"a\"", "prefix = \"a/\"", 1)
        .replacen("prefix = \"ab\"", "prefix = \"ab/\"", 1);
    assert!(parse(&ok).is_ok());
}

#[test]
fn bad_sizes() {
    for (size, needle) in [
        ("\"0\"", "not a positive multiple of 512"),
        ("1000", "not a positive multiple of 512"),
        ("\"20GB_\"", "size:"),
        ("\"1.0001KiB\"", "not a whole number of bytes"),
        ("\"12 parsecs\"", "unknown unit"),
        ("-512", "negative"),
        ("\"99999999TiB\"", "too large"),
    ] {
        let line = error_line(&with_export(&format!("size = {size}\n")));
        assert!(
            line.starts_with("exports.toml:4: export \"vm1\": size"),
            "{line}"
        );
        assert!(line.contains(needle), "{size}: {line}");
    }
}

#[test]
fn block_size_power_of_two_in_range() {
    for bs in ["\"100KiB\"", "\"2KiB\"", "\"16MiB\"", "3"] {
        let line = error_line(&with_export(&format!(
            "size = 1048576\nblock_size = {bs}\n"
        )));
        assert!(
            line.starts_with("exports.toml:5: export \"vm1\": block_size"),
            "{line}"
        );
        assert!(line.contains("power of two"), "{line}");
    }
    for bs in ["\"4KiB\"", "\"8MiB\"", "65536"] {
        assert!(parse(&with_export(&format!(
            "size = 1048576\nblock_size = {bs}\n"
        )))
        .is_ok());
    }
}

#[test]
fn bad_names_buckets_and_prefixes() {
    let src = "[[export]]\nname = \"\"\nsize = 1024\nbucket = \"b\"\nprefix = \"p/\"\n";
    assert_eq!(
        error_line(src),
        "exports.toml:2: export \"\": name: must not be empty"
    );
    let long = "x".repeat(4097);
    let src =
        format!("[[export]]\nname = \"{long}\"\nsize = 1024\nbucket = \"b\"\nprefix = \"p/\"\n");
    assert!(error_line(&src).contains("at most 4096"));
    let src = "[[export]]\nname = \"a\\u0000b\"\nsize = 1024\nbucket = \"b\"\nprefix = \"p/\"\n";
    assert!(error_line(src).contains("NUL"));
    let src = "[[export]]\nname = \"a\"\nsize = 1024\nbucket = \"..\"\n";
    assert!(error_line(src).starts_with("exports.toml:4: export \"a\": bucket"));
    let src = "[[export]]\nname = \"a\"\nsize = 1024\nbucket = \"b\"\nprefix = \"../etc/\"\n";
    assert!(error_line(src).starts_with("exports.toml:5: export \"a\": prefix"));
}

#[test]
fn listen_and_metrics_errors() {
    assert!(error_line("[server]\nlisten = \"nohost\"\n")
        .starts_with("exports.toml:2: [server]: listen:"));
    assert!(error_line("[server]\nlisten = []\n").contains("at least one"));
    assert!(error_line("[server]\nlisten = [\"a:1\", \"a:1\"]\n").contains("twice"));
    assert!(error_line("[server]\nlisten = \"unix:\"\n").contains("socket path"));
    assert!(error_line("[server]\nlisten = \"::1:80\"\n").contains("brackets"));
    assert!(error_line("[server]\nmetrics = \"localhost\"\n")
        .starts_with("exports.toml:2: [server]: metrics:"));
}

#[test]
fn cache_errors() {
    let line = error_line("[cache]\nmemory = \"1GiB\"\ndirty = \"2GiB\"\n");
    assert_eq!(
        line,
        "exports.toml:3: [cache]: dirty (2GiB) must not exceed memory (1GiB)"
    );
    let line = error_line("[cache]\nflush_timeout = \"soon\"\n");
    assert!(
        line.starts_with("exports.toml:2: [cache]: flush_timeout:"),
        "{line}"
    );
    let line = error_line("[cache]\nflush_timeout = \"0s\"\n");
    assert!(line.contains("greater than zero"), "{line}");
    let cfg = parse("[cache]\nmemory = \"512MiB\"\n").unwrap();
    assert_eq!(
        cfg.cache.dirty,
        128 << 20,
        "dirty defaults to a quarter of a small memory"
    );
}

#[test]
fn endpoint_errors() {
    assert!(
        error_line("[s3]\nendpoint = \"ftp://x\"\n").starts_with("exports.toml:2: [s3]: endpoint:")
    );
    assert!(error_line("[s3]\nendpoint = \"file://relative\"\n").contains("absolute"));
}

fn secret_file(mode: u32, contents: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, path)
}

#[test]
fn secret_file_read_and_newline_stripped() {
    let (dir, _path) = secret_file(0o600, "s3cr3t\n");
    let src = "[s3]\naccess_key_id = \"AK\"\nsecret_access_key_file = \"secret\"\n";
    let cfg = Config::parse(src, "exports.toml", dir.path()).unwrap();
    assert_eq!(cfg.s3.secret_access_key.as_deref(), Some("s3cr3t"));
    assert_eq!(cfg.s3.access_key_id.as_deref(), Some("AK"));
    let shown = format!("{cfg:?} {}", summary_table(&cfg));
    assert!(!shown.contains("s3cr3t"), "secret leaked: {shown}");
}

#[test]
fn secret_file_mode_and_absence() {
    let (dir, path) = secret_file(0o644, "s3cr3t\n");
    let src = format!(
        "[s3]\naccess_key_id = \"AK\"\nsecret_access_key_file = {:?}\n",
        path.display().to_string()
    );
    let line = error_line(&src);
    assert!(
        line.starts_with("exports.toml:3: [s3]: secret_access_key_file:"),
        "{line}"
    );
    assert!(
        line.contains(&path.display().to_string()) && line.contains("0644"),
        "{line}"
    );
    let missing = src.replace("secret\"", "nope\"");
    assert!(error_line(&missing).contains("cannot read"));
    let half = "[s3]\naccess_key_id = \"AK\"\n";
    assert!(error_line(half).contains("secret_access_key_file is not"));
    drop(dir);
}

#[test]
fn all_validation_errors_reported() {
    let src = "[[export]]\nname = \"a\"\nsize = 1000\nbucket = \"b\"\nblock_size = 3\n";
    let err = parse(src).unwrap_err();
    assert_eq!(err.lines().len(), 2, "{err}");
}

#[test]
fn ad_hoc_mode() {
    let adhoc = AdHoc {
        export_name: "disk".into(),
        host: "0.0.0.0".into(),
        port: 10809,
        size: "1GB".into(),
        s3_endpoint: Some("http://minio:9000".into()),
        s3_access_key: Some("AK".into()),
        s3_secret_key: Some("SK-secret".into()),
        s3_bucket: "nbd-storage".into(),
        s3_region: None,
    };
    assert!(!format!("{adhoc:?}").contains("SK-secret"));
    let cfg = adhoc.clone().into_config().unwrap();
    assert_eq!(cfg.exports[0].prefix, "disk/");
    assert_eq!(cfg.exports[0].size, 1_000_000_000);
    assert_eq!(
        cfg.server.listen,
        vec![ListenAddr::Tcp("0.0.0.0:10809".into())]
    );
    assert!(cfg.s3.path_style);
    assert!(!format!("{cfg:?}").contains("SK-secret"));
    let bad = AdHoc {
        size: "1000".into(),
        ..adhoc.clone()
    };
    assert!(bad
        .into_config()
        .unwrap_err()
        .to_string()
        .starts_with("--size:"));
    let v6 = AdHoc {
        host: "::".into(),
        ..adhoc
    };
    assert_eq!(
        v6.into_config().unwrap().server.listen,
        vec![ListenAddr::Tcp("[::]:10809".into())]
    );
}

#[test]
fn summary_lists_exports() {
    let table = summary_table(&parse(GOOD).unwrap());
    assert!(table.contains("NAME"), "{table}");
    let row = table.lines().find(|l| l.starts_with("vm1")).unwrap();
    for cell in ["20GiB", "nbd", "vm1/", "128KiB", "no"] {
        assert!(row.contains(cell), "{row}");
    }
}

#[test]
fn syntax_errors_carry_no_invented_section() {
    let line = error_line("[server\nlisten = \"x:1\"\n");
    assert!(line.starts_with("exports.toml:1: unclosed table"), "{line}");
    let line = error_line("[[export]]\nname = \"a\nsize = 1\n");
    assert!(line.starts_with("exports.toml:2: "), "{line}");
    assert!(!line.contains("export \"a"), "{line}");
}

#[test]
fn mistyped_top_level_value_names_its_key() {
    let line = error_line("\nexport = 3\n");
    assert!(
        line.starts_with("exports.toml:2: key \"export\": invalid type"),
        "{line}"
    );
}

#[test]
fn allow_and_lease_keys() {
    let cfg = parse(&with_export(
        "size = \"1GiB\"\nallow = [\"10.0.0.0/8\", \"::1\", \"unix\"]\nlease = \"45s\"\n",
    ))
    .unwrap();
    let e = &cfg.exports[0];
    assert_eq!(e.allow.as_ref().map(Vec::len), Some(3));
    assert_eq!(
        e.lease,
        LeaseMode::On {
            ttl: Duration::from_secs(45)
        }
    );
    let defaults = parse(GOOD).unwrap();
    assert_eq!(defaults.exports[0].allow, None);
    assert_eq!(
        defaults.exports[0].lease,
        LeaseMode::On {
            ttl: DEFAULT_LEASE_TTL
        }
    );
    let bad = error_line(&with_export("size = \"1GiB\"\nallow = [\"10.0.0.0/40\"]\n"));
    assert!(
        bad.starts_with("exports.toml:5: export \"vm1\": allow:"),
        "{bad}"
    );
    let empty = error_line(&with_export("size = \"1GiB\"\nallow = []\n"));
    assert!(empty.contains("admits nobody"), "{empty}");
    let lease = error_line(&with_export("size = \"1GiB\"\nlease = \"maybe\"\n"));
    assert!(
        lease.starts_with("exports.toml:5: export \"vm1\": lease:"),
        "{lease}"
    );
}

#[test]
fn tls_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let files =
        crate::tls::test_pki::write_server(dir.path(), &crate::tls::test_pki::TestCa::new("ca"));
    let (cert, key) = (files.cert, files.key);
    let src = "[server.tls]\ncert = \"server-cert.pem\"\nkey = \"server-key.pem\"\n";
    let cfg = Config::parse(src, "exports.toml", dir.path()).unwrap();
    let tls = cfg.server.tls.unwrap();
    assert_eq!((tls.cert, tls.mode), (cert, TlsMode::Require));
    assert_eq!(tls.client_ca, None);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Config::parse(src, "exports.toml", dir.path()).unwrap_err();
    let line = &e.lines()[0];
    assert!(
        line.starts_with("exports.toml:3: [server.tls]: key:") && line.contains("0644"),
        "{line}"
    );
    let missing =
        "[server.tls]\ncert = \"nope.pem\"\nkey = \"server-key.pem\"\nmode = \"sometimes\"\n";
    let e = Config::parse(missing, "exports.toml", dir.path()).unwrap_err();
    let all = e.lines().join("\n");
    assert!(
        all.contains("exports.toml:2: [server.tls]: cert: cannot read"),
        "{all}"
    );
    assert!(all.contains("exports.toml:4: [server.tls]: mode:"), "{all}");
}

#[test]
fn tls_files_must_parse_and_match() {
    use crate::tls::test_pki::{write_file, write_server, TestCa};
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    let src = "[server.tls]\ncert = \"server-cert.pem\"\nkey = \"server-key.pem\"\n";
    let error_line = |src: &str| {
        let e = Config::parse(src, "exports.toml", dir.path()).unwrap_err();
        e.lines()[0].clone()
    };
    write_file(&files.cert, "cert", 0o644);
    let line = error_line(src);
    assert!(
        line.starts_with("exports.toml:2: [server.tls]:") && line.contains("no PEM certificate"),
        "{line}"
    );
    let other = TestCa::new("other").issue_server();
    write_file(&files.cert, &other.cert_pem, 0o644);
    let line = error_line(src);
    assert!(
        line.contains("does not belong to the certificate"),
        "{line}"
    );
}

#[test]
fn compression_and_encryption_key_file_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("vm1.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let src = format!(
        "{}compression = \"zstd:5\"\nencryption_key_file = \"vm1.key\"\n",
        with_export("size = \"1GiB\"\n")
    );
    let cfg = Config::parse(&src, "exports.toml", dir.path()).unwrap();
    let codec = &cfg.exports[0].codec;
    assert_eq!(codec.compression, Compression::Zstd { level: 5 });
    let k = codec.encryption.as_ref().expect("key");
    assert_eq!((k.path(), k.expose()[0]), (key.as_path(), 0xab));
    let summary = summary_table(&cfg);
    assert!(
        summary.contains("vm1 blocks: compression zstd:5, encrypted with the key in"),
        "{summary}"
    );
    assert!(!summary.contains("abab"), "{summary}");
    assert!(
        parse(GOOD).unwrap().exports[0].codec.is_plain(),
        "off by default"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let lines = Config::parse(&src, "exports.toml", dir.path())
        .unwrap_err()
        .lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("exports.toml:6: export \"vm1\": encryption_key_file:")
            && lines[0].contains("0644"),
        "{lines:?}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key, "abcd\n").unwrap();
    let lines = Config::parse(&src, "exports.toml", dir.path())
        .unwrap_err()
        .lines();
    assert!(lines[0].contains("32 raw bytes or 64 hex"), "{lines:?}");
    std::fs::remove_file(&key).unwrap();
    let lines = Config::parse(&src, "exports.toml", dir.path())
        .unwrap_err()
        .lines();
    assert!(lines[0].contains("cannot read"), "{lines:?}");

    let bad = error_line(&with_export("size = \"1GiB\"\ncompression = \"lz4\"\n"));
    assert!(
        bad.starts_with("exports.toml:5: export \"vm1\": compression:")
            && bad.contains("zstd:LEVEL"),
        "{bad}"
    );
}
