//! Hot reload, through the real binary, a real S3 server and real NBD clients:
//! rename-save, in-place edits and SIGHUP add exports without a restart; an invalid file keeps
//! everything served; a removed export refuses new clients while an attached nbdsh session
//! keeps reading and writing and its data reaches S3; re-adding serves the same data; 50
//! exports load; a burst of edits ends in exactly the final file's state.

use crate::common::nbdsh_session::NbdshSession;
use crate::common::{
    nbd_client, poll_until, run, tool, wait_until, DaemonConfig, ExportSpec, NbdS3, S3Server,
};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// How fast an edit must be noticed (a reload starts): the target the reload watcher is
/// built for. Opening what the edit adds costs S3 round trips on top, which on a loaded
/// machine alone take longer; the result must be listed within `SLOW`.
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);
/// Generous bound for things with no stated target (S3 flushes, process exits).
const SLOW: Duration = Duration::from_secs(30);

/// Export names `nbdinfo --list` shows, or `None` if listing failed.
fn listed(d: &NbdS3) -> Option<BTreeSet<String>> {
    let out =
        run(tool("nbdinfo").args(["--list", "--json", &format!("nbd://127.0.0.1:{}", d.port())]));
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let names = json["exports"]
        .as_array()?
        .iter()
        .filter_map(|e| e["export-name"].as_str().map(String::from))
        .collect();
    Some(names)
}

/// Export names via `nbd-client -l` (NBD_OPT_LIST only; `nbdinfo --list` also opens every
/// export, ~200 ms each).
fn listed_names_only(d: &NbdS3) -> BTreeSet<String> {
    let out = nbd_client(&["-l", "127.0.0.1", &d.port().to_string()]);
    out.lines()
        .filter(|l| !l.starts_with("Negotiation") && !l.trim().is_empty())
        .map(|l| {
            l.split_once(':')
                .map_or(l, |(name, _)| name)
                .trim()
                .to_string()
        })
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// An edit made after log mark `mark` starts a reload within `VISIBLE_WITHIN`, and its result
/// is listed within `SLOW`; returns how long until it was listed.
fn wait_applied(d: &NbdS3, mark: usize, want: &[&str]) -> Duration {
    let start = Instant::now();
    d.wait_for_log_after(mark, "reloading", VISIBLE_WITHIN);
    wait_listed(d, want, SLOW);
    start.elapsed()
}

/// Polls `nbdinfo --list` until it shows exactly `want`; returns how long that took.
fn wait_listed(d: &NbdS3, want: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    let want = names(want);
    let mut last = None;
    let shown = poll_until(within, || {
        last = listed(d);
        last.as_ref() == Some(&want)
    });
    assert!(
        shown,
        "nbdinfo --list shows {last:?}, not {want:?}, after {within:?}; daemon log:\n{}",
        d.logs()
    );
    start.elapsed()
}

/// Whether a new connection to `export` succeeds (nbdinfo prints its size).
fn connects(d: &NbdS3, export: &str) -> bool {
    run(tool("nbdinfo").args(["--size", &d.uri(export)]))
        .status
        .success()
}

fn daemon(s3: &S3Server, exports: &[&str]) -> NbdS3 {
    let mut b = NbdS3::builder(s3);
    for e in exports {
        b = b.export(ExportSpec::new(e).size("16MiB"));
    }
    b.start()
}

#[test]
fn rename_save_adds_an_export_without_restart() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, &["a"]);
    let pid = d.pid();
    wait_listed(&d, &["a"], SLOW);
    let mark = d.log_mark();
    d.rewrite_config(|c| c.exports.push(ExportSpec::new("b").size("16MiB")));
    let took = wait_applied(&d, mark, &["a", "b"]);
    assert!(
        connects(&d, "b"),
        "added export does not serve:\n{}",
        d.logs()
    );
    assert_eq!(d.pid(), pid);
    assert!(d.try_wait().is_none(), "daemon exited:\n{}", d.logs());
    eprintln!("rename-save visible after {took:?}");
}

#[test]
fn in_place_edit_is_noticed() {
    let s3 = S3Server::start();
    let d = daemon(&s3, &["a"]);
    let mut cfg = d.config().clone();
    cfg.exports.push(ExportSpec::new("c").size("16MiB"));
    s3.create_bucket("nbd");
    // Truncate and rewrite the same inode, like editors that save in place.
    let mark = d.log_mark();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.config_path())
        .unwrap();
    f.write_all(cfg.render().as_bytes()).unwrap();
    f.sync_all().unwrap();
    drop(f);
    wait_applied(&d, mark, &["a", "c"]);
    assert!(connects(&d, "c"));
}

#[test]
fn sighup_reloads_a_file_the_watcher_cannot_see() {
    // The daemon reads a symlink whose target lives in another directory: edits of the target
    // are invisible to the directory watch, so only SIGHUP can pick them up.
    let s3 = S3Server::start();
    s3.create_bucket("nbd");
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.toml");
    let watched = dir.path().join("etc");
    std::fs::create_dir(&watched).unwrap();
    let link = watched.join("exports.toml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut cfg = DaemonConfig::for_s3(&s3);
    cfg.exports.push(ExportSpec::new("a").size("16MiB"));
    std::fs::write(&real, cfg.render()).unwrap();
    let d = NbdS3::builder(&s3)
        .args(&["serve", "--config", link.to_str().unwrap()])
        .start();
    wait_listed(&d, &["a"], SLOW);
    cfg.exports.push(ExportSpec::new("h").size("16MiB"));
    let mark = d.log_mark();
    write_atomically(&real, &cfg.render());
    d.sighup();
    wait_applied(&d, mark, &["a", "h"]);
    assert!(connects(&d, "h"));
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn invalid_file_keeps_everything_served() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, &["a", "b"]);
    wait_listed(&d, &["a", "b"], SLOW);
    let good = d.config().render();
    let bad = good.replacen("size = \"16MiB\"", "sise = \"16MiB\"", 1);
    let line = bad[..bad.find("sise").unwrap()].matches('\n').count() + 1;
    let mark = d.log_mark();
    d.write_config_raw(&bad);
    let logged = d.wait_for_log_after(mark, "unknown key \"sise\"", SLOW);
    assert!(
        logged.contains(&format!(
            "exports.toml:{line}: export \"a\": unknown key \"sise\""
        )),
        "{logged}"
    );
    assert_eq!(
        listed(&d),
        Some(names(&["a", "b"])),
        "an invalid file changed the exports"
    );
    assert!(connects(&d, "a") && connects(&d, "b"));
    // Fixing the file applies the next valid version.
    let mark = d.log_mark();
    d.rewrite_config(|c| c.exports.retain(|e| e.name != "b"));
    wait_applied(&d, mark, &["a"]);
}

fn check_read(uri: &str, offset: u64, len: usize, byte: u8) {
    let code = format!("assert h.pread({len}, {offset}) == bytes([{byte}]) * {len}");
    crate::common::nbdsh(uri, &[&code]);
}

#[test]
fn removed_export_keeps_attached_client_and_readding_serves_same_data() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, &["a", "keep"]);
    wait_listed(&d, &["a", "keep"], SLOW);
    let mut session = NbdshSession::open(&d.uri("a"));
    // Block 0 (default block size 128KiB) written but not flushed: the removal must flush it.
    session.run("h.pwrite(b'\\x41' * 131072, 0)", &d);
    let mark = d.log_mark();
    d.rewrite_config(|c| c.exports.retain(|e| e.name != "a"));
    wait_applied(&d, mark, &["keep"]);
    assert!(
        !connects(&d, "a"),
        "a removed export accepted a new connection"
    );
    assert!(connects(&d, "keep"), "an unrelated export stopped serving");
    // The attached session still reads and writes, and its data reaches S3.
    session.run(
        "d = h.pread(131072, 0); assert d == b'\\x41' * 131072, (bytes(d[:8]), d.count(0))",
        &d,
    );
    session.run("h.pwrite(b'\\x42' * 4096, 1048576)", &d);
    session.run("h.flush()", &d);
    let block0 = "a/0000000000000000";
    wait_until("block 0 of the removed export in S3", SLOW, || {
        s3.read_object("nbd", block0)
            .is_some_and(|b| b.len() == 131072 && b.iter().all(|&x| x == 0x41))
    });
    let block8 = s3
        .read_object("nbd", "a/0000000000000008")
        .expect("flushed block 8 in S3");
    assert!(block8[..4096].iter().all(|&x| x == 0x42) && block8[4096..].iter().all(|&x| x == 0));
    let mark = d.log_mark();
    session.close();
    d.wait_for_log_after(mark, "removed export released", SLOW);
    // Re-adding it serves the same data.
    let mark = d.log_mark();
    d.rewrite_config(|c| c.exports.push(ExportSpec::new("a").size("16MiB")));
    wait_applied(&d, mark, &["a", "keep"]);
    check_read(&d.uri("a"), 0, 131072, 0x41);
    check_read(&d.uri("a"), 1048576, 4096, 0x42);
}

#[test]
fn fifty_exports_load_and_are_listed() {
    let s3 = S3Server::start();
    let all: Vec<String> = (0..50).map(|i| format!("disk{i:02}")).collect();
    let mut b = NbdS3::builder(&s3);
    for name in &all {
        b = b.export(
            ExportSpec::new(name)
                .size("1MiB")
                .bucket(if name.ends_with('7') { "other" } else { "nbd" }),
        );
    }
    let mut d = b.start();
    let want: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_listed(&d, &want, SLOW);
    check_read(&d.uri("disk49"), 0, 4096, 0);
    // And 50 more by one reload.
    d.rewrite_config(|c| {
        for i in 50..100 {
            c.exports
                .push(ExportSpec::new(&format!("disk{i:02}")).size("1MiB"));
        }
    });
    let want: BTreeSet<String> = (0..100).map(|i| format!("disk{i:02}")).collect();
    wait_until("100 exports listed", SLOW, || listed_names_only(&d) == want);
    check_read(&d.uri("disk99"), 0, 4096, 0);
}

#[test]
fn burst_of_edits_ends_in_the_final_state() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, &["base"]);
    wait_listed(&d, &["base"], SLOW);
    let pid = d.pid();
    // 20 edits within a second, alternating rename-saves and in-place writes; each names a
    // different export set, the last one wins.
    let mark = d.log_mark();
    for i in 0..20 {
        let mut cfg = d.config().clone();
        cfg.exports = vec![
            ExportSpec::new("base").size("16MiB"),
            ExportSpec::new(&format!("burst{i}")).size("16MiB"),
        ];
        if i % 2 == 0 {
            d.rewrite_config(|c| *c = cfg);
        } else {
            std::fs::write(d.config_path(), cfg.render()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(45)); // pacing the burst, not waiting for anything
    }
    wait_applied(&d, mark, &["base", "burst19"]);
    assert!(connects(&d, "burst19") && connects(&d, "base"));
    assert_eq!(d.pid(), pid);
    assert!(d.try_wait().is_none(), "daemon exited:\n{}", d.logs());
}
