//! Snapshots through the real binary, real NBD clients and s3s-fs: `snapshot create` holds
//! every write replied to before it (flushed or not) and nothing after; `EXPORT@SNAP` is
//! listed, read-only, reads byte-exact and maps exactly its blocks; a restart keeps it all;
//! `snapshot list` says what each snapshot alone holds and `snapshot delete` frees exactly
//! that; refusals exit 1, bad names 2; kill -9 at every step of create and delete leaves
//! every export and snapshot readable, and `gc` removes what a cut-short delete left.

use crate::common::metrics::{get, Metrics, ANY_PORT};
use crate::common::nbdsh_session::NbdshSession;
use crate::common::store_bed::{
    allocation_map, apply, assert_image, nbd_read, nbd_write, Bed, BUCKET, KIB, MIB,
};
use crate::common::{nbdinfo, pattern, poll_until, run_fails, tool, ExportSpec, DAEMON_TIMEOUT};

const BS: u64 = 64 * KIB;
const SIZE: u64 = 4 * MIB;

fn spec() -> ExportSpec {
    ExportSpec::new("vm1").size("4MiB").block_size("64KiB")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The data written before the snapshot: blocks 0-7 whole, part of block 20.
fn before_ops() -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, pattern(8 * BS as usize, 1)),
        (20 * BS + 1000, pattern(5000, 2)),
    ]
}

/// Python for the changes after the snapshot: block 1 rewritten, part of block 2, block 3
/// zeroed, block 4 trimmed, block 30 new. Returns the code and applies it to `image`.
fn after_changes(image: &mut [u8]) -> Vec<String> {
    let b1 = pattern(BS as usize, 3);
    let b2 = pattern(100, 4);
    apply(
        image,
        &[
            (BS, b1.clone()),
            (2 * BS + 7, b2.clone()),
            (30 * BS, b1.clone()),
        ],
    );
    image[3 * BS as usize..5 * BS as usize].fill(0);
    vec![
        format!("h.pwrite(bytes({b1:?}), {BS})"),
        format!("h.pwrite(bytes({b2:?}), {})", 2 * BS + 7),
        format!("h.zero({BS}, {})", 3 * BS),
        format!("h.trim({BS}, {})", 4 * BS),
        format!("h.pwrite(bytes({b1:?}), {})", 30 * BS),
    ]
}

/// Blocks holding data in `image`, as (first block, count) runs.
fn data_blocks(image: &[u8]) -> Vec<u64> {
    image
        .chunks(BS as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

/// The blocks the allocation map of `uri` shows as data.
fn mapped_blocks(uri: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for (off, len, typ) in allocation_map(uri) {
        if typ & 1 == 0 {
            out.extend(off / BS..(off + len).div_ceil(BS));
        }
    }
    out
}

fn snapshot_list(bed: &Bed) -> serde_json::Value {
    json(&bed.nbd.admin_ok(&["snapshot", "list", "--json"]))
}

#[test]
fn snapshot_is_point_in_time_read_only_exact_and_delete_frees_what_only_it_held() {
    let mut bed = Bed::start(vec![spec()]);
    let mut image = vec![0u8; SIZE as usize];
    let before = before_ops();
    apply(&mut image, &before);
    // Written, replied to, never flushed: the snapshot must hold it anyway.
    nbd_write(&bed.uri("vm1"), &before, false);
    let snap_image = image.clone();

    let mut session = NbdshSession::open(&bed.uri("vm1"));
    let created = bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s1"]);
    assert!(
        created.contains("s1"),
        "create prints the snapshot: {created}"
    );
    for line in after_changes(&mut image) {
        session.run(&line, &bed.nbd);
    }
    session.run("h.flush()", &bed.nbd);
    session.close();

    let listed = nbdinfo(&["--list", "--json", &bed.uri("")]);
    assert!(listed.contains("\"vm1@s1\""), "nbdinfo --list: {listed}");
    bed.assert_reads("vm1@s1", &snap_image, BS, "snapshot");
    bed.assert_reads("vm1", &image, BS, "live export after the snapshot");
    assert_eq!(mapped_blocks(&bed.uri("vm1@s1")), data_blocks(&snap_image));
    assert_eq!(mapped_blocks(&bed.uri("vm1")), data_blocks(&image));
    let write = "h.pwrite(b'x', 0)";
    run_fails(tool("nbdsh").args(["-u", &bed.uri("vm1@s1"), "-c", write]));

    // Blocks 1-4 of the snapshot are no longer read by the live export: they are its own.
    let list = snapshot_list(&bed);
    let s1 = &list["snapshots"][0];
    assert_eq!(
        (s1["export"].as_str(), s1["snapshot"].as_str()),
        (Some("vm1"), Some("s1"))
    );
    assert_eq!(s1["bytes_held_only"], 4 * BS, "{list}");
    let table = bed.nbd.admin_ok(&["snapshot", "list", "vm1"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["EXPORT", "SNAPSHOT", "CREATED", "BYTES_HELD_ONLY", "CLONES"]
    );

    // Everything survives a restart (the manifest is format 2 now).
    bed.stop_and_restart();
    bed.assert_reads("vm1@s1", &snap_image, BS, "snapshot after restart");
    bed.assert_reads("vm1", &image, BS, "live export after restart");
    let manifest = bed
        .s3
        .read_object(BUCKET, "vm1/nbd-s3.json")
        .expect("manifest");
    assert_eq!(json(&String::from_utf8_lossy(&manifest))["format"], 2);

    let keys_before = bed.keys("vm1/").len();
    let deleted = bed.nbd.admin_ok(&["snapshot", "delete", "vm1", "s1"]);
    assert!(deleted.contains("4 objects"), "{deleted}");
    assert_eq!(
        bed.keys("vm1/").len(),
        keys_before - 4,
        "{:?}",
        bed.keys("vm1/")
    );
    assert_eq!(bed.nbd.admin_ok(&["gc", "vm1"]).trim(), "0");
    bed.assert_reads("vm1", &image, BS, "live export after the delete");
    assert_eq!(snapshot_list(&bed)["snapshots"], serde_json::json!([]));
    run_fails(tool("nbdinfo").arg(bed.uri("vm1@s1")));
    bed.stop_and_restart();
    bed.assert_reads("vm1", &image, BS, "live export after delete and restart");
}

#[test]
fn refusals_exit_1_naming_the_cause_and_bad_names_exit_2() {
    let bed = Bed::start(vec![spec(), ExportSpec::new("ro").read_only(true)]);
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "a.b_c-1"]);
    let code = |args: &[&str]| bed.nbd.admin(args);
    for (args, why) in [
        (
            &["snapshot", "create", "vm1", "a.b_c-1"][..],
            "already exists",
        ),
        (&["snapshot", "create", "nope", "x"][..], "nope"),
        (&["snapshot", "delete", "vm1", "zz"][..], "zz"),
        (&["snapshot", "create", "ro", "x"][..], "read-only"),
        (&["gc", "nope"][..], "nope"),
    ] {
        let out = code(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    let long = "x".repeat(65);
    for bad in ["a/b", "", "a@b", long.as_str()] {
        let out = code(&["snapshot", "create", "vm1", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    assert_eq!(code(&["snapshot", "create", "vm1"]).status.code(), Some(2));
}

/// Starts a bed whose daemon dies at `step`, with blocks 0-7 written (unflushed).
fn crash_bed(step: &str) -> (Bed, Vec<u8>) {
    let bed = Bed::start_with(vec![spec()], |b| b.env("NBD_S3_CRASH_AT", step));
    let mut image = vec![0u8; SIZE as usize];
    apply(&mut image, &before_ops());
    nbd_write(&bed.uri("vm1"), &before_ops(), false);
    (bed, image)
}

/// The daemon died at its crash point: start it again without one.
fn restart_after_crash(bed: &mut Bed) {
    let status = bed.nbd.wait_exit(DAEMON_TIMEOUT);
    assert!(!status.success(), "the crash hook aborts: {status}");
    bed.nbd.set_env("NBD_S3_CRASH_AT", None);
    bed.nbd.restart();
}

#[test]
fn kill_at_each_step_of_create_leaves_export_and_snapshot_readable() {
    for (step, taken) in [
        ("snapshot-create-flushed", false),
        ("snapshot-create-written", true),
    ] {
        let (mut bed, image) = crash_bed(step);
        let out = bed.nbd.admin(&["snapshot", "create", "vm1", "s1"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{step}: the daemon died: {out:?}"
        );
        restart_after_crash(&mut bed);
        let names: Vec<String> = snapshot_list(&bed)["snapshots"]
            .as_array()
            .expect("array")
            .iter()
            .map(|s| s["snapshot"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(names.len(), usize::from(taken), "{step}: {names:?}");
        // The flush before the manifest write stored the unflushed writes either way.
        bed.assert_reads("vm1", &image, BS, step);
        if taken {
            bed.assert_reads("vm1@s1", &image, BS, step);
        }
        assert_eq!(bed.nbd.admin_ok(&["gc", "vm1"]).trim(), "0", "{step}");
        // The export still takes snapshots and writes.
        bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s2"]);
        nbd_write(&bed.uri("vm1"), &[(0, vec![9; 10])], true);
        assert_image(step, &nbd_read(&bed.uri("vm1@s2"), 0, SIZE), &image, BS);
    }
}

#[test]
fn kill_at_each_step_of_delete_leaves_garbage_that_gc_removes() {
    // After the first delete returns, the others in flight may or may not have finished.
    for (step, left) in [
        ("snapshot-delete-written", 4..=4),
        ("collect-partial", 0..=3),
    ] {
        let (mut bed, mut image) = crash_bed(step);
        bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s1"]);
        let mut session = NbdshSession::open(&bed.uri("vm1"));
        for line in after_changes(&mut image) {
            session.run(&line, &bed.nbd);
        }
        session.run("h.flush()", &bed.nbd);
        session.close();
        bed.nbd.admin_ok(&["snapshot", "create", "vm1", "keep"]);
        let keys_before = bed.keys("vm1/").len();

        // Blocks 1-4 of s1 are read by nothing else: the delete frees 4 objects.
        let out = bed.nbd.admin(&["snapshot", "delete", "vm1", "s1"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{step}: the daemon died: {out:?}"
        );
        restart_after_crash(&mut bed);
        let list = snapshot_list(&bed);
        assert_eq!(
            list["snapshots"].as_array().map(Vec::len),
            Some(1),
            "{step}: {list}"
        );
        assert_eq!(list["snapshots"][0]["snapshot"], "keep");
        bed.assert_reads("vm1", &image, BS, step);
        bed.assert_reads("vm1@keep", &image, BS, step);
        let collected: u64 = bed
            .nbd
            .admin_ok(&["gc", "vm1"])
            .trim()
            .parse()
            .expect("count");
        assert!(left.contains(&collected), "{step}: gc deleted {collected}");
        assert_eq!(bed.keys("vm1/").len(), keys_before - 4, "{step}");
        assert_eq!(bed.nbd.admin_ok(&["gc", "vm1"]).trim(), "0", "{step}");
        bed.assert_reads("vm1", &image, BS, step);
        bed.assert_reads("vm1@keep", &image, BS, step);
    }
}

#[test]
fn rollback_restores_the_bytes_exactly_refused_while_clients_are_attached() {
    let mut bed = Bed::start(vec![spec()]);
    let mut image = vec![0u8; SIZE as usize];
    apply(&mut image, &before_ops());
    nbd_write(&bed.uri("vm1"), &before_ops(), true);
    let snap_image = image.clone();
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s1"]);

    let mut session = NbdshSession::open(&bed.uri("vm1"));
    for line in after_changes(&mut image) {
        session.run(&line, &bed.nbd);
    }
    session.run("h.flush()", &bed.nbd);
    // Blocks read before the rollback are cached: the rollback must not serve them.
    let _ = nbd_read(&bed.uri("vm1"), 0, SIZE);
    let out = bed.nbd.admin(&["snapshot", "rollback", "vm1", "s1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("attached"), "{stderr}");
    session.close();

    // Blocks 1, 2 and 30 (data) and 3, 4 (tombstones) of the head go.
    let out = bed.nbd.admin_ok(&["snapshot", "rollback", "vm1", "s1"]);
    assert!(out.contains("5 objects"), "{out}");
    bed.assert_reads("vm1", &snap_image, BS, "after the rollback");
    assert_eq!(mapped_blocks(&bed.uri("vm1")), data_blocks(&snap_image));
    bed.assert_reads("vm1@s1", &snap_image, BS, "the snapshot itself");
    // The export goes on: writes land on the rolled-back content.
    nbd_write(&bed.uri("vm1"), &[(0, vec![7; 100])], true);
    let mut later = snap_image.clone();
    later[..100].fill(7);
    bed.stop_and_restart();
    bed.assert_reads("vm1", &later, BS, "after rollback and restart");
    bed.assert_reads("vm1@s1", &snap_image, BS, "snapshot after restart");
}

#[test]
fn kill_during_rollback_leaves_the_rolled_back_export_and_garbage_for_gc() {
    let (mut bed, image) = crash_bed("rollback-written");
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s1"]);
    let mut changed = image.clone();
    let mut session = NbdshSession::open(&bed.uri("vm1"));
    for line in after_changes(&mut changed) {
        session.run(&line, &bed.nbd);
    }
    session.close();
    let out = bed.nbd.admin(&["snapshot", "rollback", "vm1", "s1"]);
    assert_eq!(out.status.code(), Some(3), "the daemon died: {out:?}");
    restart_after_crash(&mut bed);
    bed.assert_reads("vm1", &image, BS, "rolled back before the crash");
    bed.assert_reads("vm1@s1", &image, BS, "snapshot");
    assert_eq!(bed.nbd.admin_ok(&["gc", "vm1"]).trim(), "5");
    assert_eq!(bed.nbd.admin_ok(&["gc", "vm1"]).trim(), "0");
    bed.assert_reads("vm1", &image, BS, "after gc");
}

#[test]
fn a_read_only_daemon_refuses_snapshot_delete_and_gc_without_touching_the_manifest() {
    let bed = Bed::start(vec![spec()]);
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "keep"]);
    let manifest = || {
        bed.s3
            .read_object(BUCKET, "vm1/nbd-s3.json")
            .expect("manifest")
    };
    let before = manifest();
    // A second daemon serves the same prefix read-only: it holds no lease.
    let reader = crate::common::NbdS3::builder(&bed.s3)
        .export(spec().read_only(true))
        .start();
    for args in [
        &["snapshot", "delete", "vm1", "keep"][..],
        &["gc", "vm1"][..],
    ] {
        let out = reader.admin(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("read-only"), "{args:?}: {stderr}");
    }
    assert_eq!(
        manifest(),
        before,
        "the read-only daemon wrote the manifest"
    );
    let names = snapshot_list(&bed);
    assert!(names.to_string().contains("\"keep\""), "{names}");
}

fn auto_names(bed: &Bed) -> Vec<String> {
    snapshot_list(bed)["snapshots"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["snapshot"].as_str().map(str::to_owned))
        .filter(|n| n.starts_with("auto-"))
        .collect()
}

#[test]
fn automatic_snapshots_follow_changes_and_keep_only_the_newest() {
    let spec = spec()
        .line("snapshot_every = \"10s\"")
        .line("snapshot_keep = 1");
    let bed = Bed::start(vec![spec]);
    nbd_write(&bed.uri("vm1"), &[(0, vec![1; 4096])], false);
    let slow = std::time::Duration::from_secs(40);
    crate::common::wait_until("a first automatic snapshot", slow, || {
        auto_names(&bed).len() == 1
    });
    let first = auto_names(&bed);
    let name = &first[0];
    assert!(
        name.len() == 21 && name[5..].contains('T') && name.ends_with('Z'),
        "auto-YYYYMMDDTHHMMSSZ: {name}"
    );
    assert_eq!(
        nbd_read(&bed.uri(&format!("vm1@{name}")), 0, 4096),
        vec![1; 4096]
    );

    nbd_write(&bed.uri("vm1"), &[(0, vec![2; 4096])], false);
    crate::common::wait_until("the next automatic snapshot", slow, || {
        let now = auto_names(&bed);
        now.len() == 1 && now != first
    });
    let second = auto_names(&bed);
    assert_eq!(
        nbd_read(&bed.uri(&format!("vm1@{}", second[0])), 0, 4096),
        vec![2; 4096]
    );
    // Unchanged since: no new snapshot however long it waits.
    let quiet = crate::common::poll_until(std::time::Duration::from_secs(15), || {
        auto_names(&bed) != second
    });
    assert!(
        !quiet,
        "a snapshot of an unchanged export: {:?}",
        auto_names(&bed)
    );
}

/// Python for nbdsh: connects to `uri` again and again until `stop` exists (at most 60 s);
/// each attached client reads the first blocks 20 times and they must never change (a
/// rollback or a delete under an attached client would change them, or fail the read).
/// Refused connections are counted; prints `attached N refused M`. Writes `ready` beside
/// `stop` once a client was attached.
fn racer(uri: &str, stop: &std::path::Path) -> String {
    let ready = stop.with_file_name("ready");
    let code = r#"
import os, random, time
ok = refused = 0
deadline = time.time() + 60
while time.time() < deadline and not os.path.exists(STOP):
    c = nbd.NBD()
    try:
        c.connect_uri(URI)
    except nbd.Error as e:
        if refused == 0:
            print('first refusal:', e, flush=True)
        refused += 1
        continue
    first = c.pread(LEN, 0)
    for i in range(20):
        assert c.pread(LEN, 0) == first, 'the data changed under an attached client'
    c.shutdown()
    ok += 1
    open(READY, 'w').close()
    # Leave the admin command moments without clients (the test is about safety).
    time.sleep(random.random() * 0.05)
print('attached', ok, 'refused', refused)
"#;
    code.replace("STOP", &format!("{stop:?}"))
        .replace("URI", &format!("{uri:?}"))
        .replace("READY", &format!("{ready:?}"))
        .replace("LEN", &(4 * BS).to_string())
}

/// Runs `admin` until it succeeds (bounded) while `racer` clients keep attaching to `uri`;
/// returns the racer's report.
fn race(bed: &Bed, uri: &str, admin: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = dir.path().join("stop");
    let child = tool("nbdsh")
        .args(["-c", &racer(uri, &stop)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start nbdsh");
    let ready = dir.path().join("ready");
    let mut child = child;
    let attached = poll_until(DAEMON_TIMEOUT, || {
        ready.exists() || child.try_wait().is_ok_and(|s| s.is_some())
    });
    if !attached || !ready.exists() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("nbdsh racer");
        panic!("the racer never attached: {}", crate::common::show(&out));
    }
    let mut done = false;
    let mut refused = Vec::new();
    for _ in 0..300 {
        let out = bed.nbd.admin(admin);
        if out.status.success() {
            done = true;
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stderr.contains("attached"), "{admin:?}: {stderr}");
        refused.push(stderr);
    }
    std::fs::write(&stop, b"").expect("stop the racer");
    let out = child.wait_with_output().expect("nbdsh racer");
    let report = crate::common::show(&out);
    assert!(
        out.status.success(),
        "a client saw the data change: {report}"
    );
    assert!(
        done,
        "{admin:?} never found a moment without clients ({} refusals, the last: {:?})",
        refused.len(),
        refused.last()
    );
    eprintln!(
        "{admin:?} refused {} times while racing: {report}",
        refused.len()
    );
    report
}

#[test]
fn clients_racing_a_rollback_or_a_delete_never_see_the_data_change_under_them() {
    let bed = Bed::start(vec![spec()]);
    let a = pattern(4 * BS as usize, 21);
    let b = pattern(4 * BS as usize, 22);
    nbd_write(&bed.uri("vm1"), &[(0, a.clone())], true);
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "a"]);
    for round in 0..3 {
        nbd_write(&bed.uri("vm1"), &[(0, b.clone())], true);
        let report = race(&bed, &bed.uri("vm1"), &["snapshot", "rollback", "vm1", "a"]);
        assert!(report.contains("attached"), "{report}");
        let now = nbd_read(&bed.uri("vm1"), 0, 4 * BS);
        assert!(now == a, "round {round}: the rollback did not take effect");
    }
    for round in 0..3 {
        let name = format!("d{round}");
        nbd_write(&bed.uri("vm1"), &[(0, b.clone())], true);
        bed.nbd.admin_ok(&["snapshot", "create", "vm1", &name]);
        nbd_write(&bed.uri("vm1"), &[(0, a.clone())], true);
        let snap = bed.uri(&format!("vm1@{name}"));
        race(&bed, &snap, &["snapshot", "delete", "vm1", &name]);
        let list = snapshot_list(&bed);
        assert!(!list.to_string().contains(&name), "{list}");
    }
}

#[test]
fn metrics_count_snapshots_and_the_bytes_only_they_hold() {
    let bed = Bed::start_with(vec![spec()], |b| {
        b.config(|c| c.metrics = Some(ANY_PORT.into()))
    });
    let metrics = Metrics::of(&bed.nbd);
    let value = |name: &str| get(&metrics.scrape(), name, &[("export", "vm1")]) as u64;
    let held = || value("nbd_s3_snapshot_bytes_held");
    let uri = bed.uri("vm1");
    assert_eq!((value("nbd_s3_snapshots"), held()), (0, 0));
    nbd_write(&uri, &[(0, pattern(4 * BS as usize, 31))], true);
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s1"]);
    assert_eq!((value("nbd_s3_snapshots"), held()), (1, 0), "all shared");
    // Blocks 0 and 1 rewritten: their old copies are s1's alone.
    nbd_write(&uri, &[(0, pattern(2 * BS as usize, 32))], true);
    assert_eq!(held(), 2 * BS);
    bed.nbd.admin_ok(&["snapshot", "create", "vm1", "s2"]);
    // Block 2 rewritten: its old copy is held by s1 and s2 together (counted once); block 3
    // is still the live export's.
    nbd_write(&uri, &[(2 * BS, pattern(BS as usize, 33))], true);
    assert_eq!((value("nbd_s3_snapshots"), held()), (2, 3 * BS));
    bed.nbd.admin_ok(&["snapshot", "delete", "vm1", "s1"]);
    assert_eq!(
        (value("nbd_s3_snapshots"), held()),
        (1, BS),
        "s2 keeps block 2"
    );
    bed.nbd.admin_ok(&["snapshot", "delete", "vm1", "s2"]);
    assert_eq!((value("nbd_s3_snapshots"), held()), (0, 0));
}
