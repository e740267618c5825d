//! Clones through the real binary and s3s-fs: `base = "EXPORT@SNAP"` added by hot reload
//! starts with exactly the snapshot's content, writable at once; 20 clones store the golden
//! blocks once (objects counted); the snapshot cannot be deleted under its clones; flatten
//! copies server-side and frees the clone from its base; a clone keeps working when its base
//! leaves the file; kill -9 at each step of creating and flattening a clone.

use crate::common::metrics::{get, Metrics, ANY_PORT};
use crate::common::store_bed::{apply, assert_image, nbd_read, nbd_write, Bed, BUCKET, KIB, MIB};
use crate::common::{pattern, wait_until, ExportSpec, DAEMON_TIMEOUT};
use std::time::Duration;

const BS: u64 = 64 * KIB;
const SIZE: u64 = 4 * MIB;
const GOLDEN_BLOCKS: u64 = 10;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn spec(name: &str) -> ExportSpec {
    ExportSpec::new(name).size("4MiB").block_size("64KiB")
}

fn clone_spec(name: &str) -> ExportSpec {
    ExportSpec::new(name)
        .size("8MiB")
        .line("base = \"golden@v1\"")
}

/// A bed with export `golden` holding 10 blocks and snapshot `golden@v1`; returns the image.
fn golden_bed(
    f: impl FnOnce(crate::common::daemon::NbdS3Builder) -> crate::common::daemon::NbdS3Builder,
) -> (Bed, Vec<u8>) {
    let bed = Bed::start_with(vec![spec("golden")], f);
    let mut image = vec![0u8; SIZE as usize];
    let ops = vec![(0, pattern((GOLDEN_BLOCKS * BS) as usize, 11))];
    apply(&mut image, &ops);
    nbd_write(&bed.uri("golden"), &ops, true);
    bed.nbd.admin_ok(&["snapshot", "create", "golden", "v1"]);
    (bed, image)
}

/// Adds exports by reload and waits until the daemon serves them (or reports them refused).
fn add_by_reload(bed: &mut Bed, specs: Vec<ExportSpec>) {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    bed.nbd.rewrite_config(|c| c.exports.extend(specs));
    bed.nbd.sighup();
    wait_until("the reload to open every export", DAEMON_TIMEOUT, || {
        let status = json(&bed.nbd.admin_ok(&["status", "--json"]));
        names.iter().all(|n| {
            status["exports"]
                .as_array()
                .is_some_and(|all| all.iter().any(|e| e["name"] == n.as_str()))
        })
    });
}

fn state(bed: &Bed, name: &str) -> serde_json::Value {
    try_state(bed, name).unwrap_or_else(|| panic!("no export {name}"))
}

/// The export's `status` entry, `None` while the daemon does not know it (yet).
fn try_state(bed: &Bed, name: &str) -> Option<serde_json::Value> {
    let out = bed.nbd.admin(&["status", "--json"]);
    let status = json(&String::from_utf8_lossy(&out.stdout));
    status["exports"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["name"] == name).cloned())
}

fn serving(bed: &Bed, name: &str) -> bool {
    try_state(bed, name).is_some_and(|s| s["state"] == "serving")
}

/// Data objects (not manifests, not leases) under `prefix`.
fn data_objects(bed: &Bed, prefix: &str) -> usize {
    bed.keys(prefix)
        .iter()
        .filter(|k| !k.ends_with("nbd-s3.json"))
        .count()
}

#[test]
fn twenty_clones_share_the_golden_blocks_and_keep_their_own_writes() {
    let (mut bed, golden) = golden_bed(|b| b);
    let names: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    add_by_reload(&mut bed, names.iter().map(|n| clone_spec(n)).collect());

    let mut big = golden.clone();
    big.resize(2 * SIZE as usize, 0);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(state(&bed, name)["state"], "serving", "{name}");
        // Boot-style: read the image's first blocks, then write this clone's own data.
        let head = nbd_read(&bed.uri(name), 0, GOLDEN_BLOCKS * BS);
        assert_image(name, &head, &golden[..(GOLDEN_BLOCKS * BS) as usize], BS);
        let own = vec![
            (100, pattern(300, i as u64)),
            (5 * MIB, pattern(BS as usize, 50 + i as u64)),
        ];
        nbd_write(&bed.uri(name), &own, true);
    }
    for (i, name) in names.iter().enumerate() {
        let mut want = big.clone();
        apply(
            &mut want,
            &[
                (100, pattern(300, i as u64)),
                (5 * MIB, pattern(BS as usize, 50 + i as u64)),
            ],
        );
        assert_image(name, &nbd_read(&bed.uri(name), 0, 2 * SIZE), &want, BS);
    }
    // The golden blocks are stored once; each clone holds only its own two blocks.
    assert_eq!(data_objects(&bed, "golden/"), GOLDEN_BLOCKS as usize);
    let clone_objects: usize = names
        .iter()
        .map(|n| data_objects(&bed, &format!("{n}/")))
        .sum();
    assert_eq!(clone_objects, 2 * names.len());
    eprintln!(
        "20 clones: {} data objects in the bucket (golden {GOLDEN_BLOCKS} + clones {clone_objects}); 20 full copies would be {}",
        GOLDEN_BLOCKS as usize + clone_objects,
        GOLDEN_BLOCKS as usize * 20 + clone_objects
    );

    let list = json(&bed.nbd.admin_ok(&["snapshot", "list", "golden", "--json"]));
    let clones = list["snapshots"][0]["clones"].as_array().map(Vec::len);
    assert_eq!(clones, Some(20), "{list}");
    let out = bed.nbd.admin(&["snapshot", "delete", "golden", "v1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("c00") && stderr.contains("c19"),
        "names the clones: {stderr}"
    );
}

#[test]
fn flatten_frees_a_clone_from_its_base_and_clones_survive_the_base_leaving_the_file() {
    let (mut bed, golden) = golden_bed(|b| b.config(|c| c.metrics = Some(ANY_PORT.into())));
    add_by_reload(&mut bed, vec![clone_spec("c1"), clone_spec("c2")]);
    nbd_write(&bed.uri("c1"), &[(0, vec![1; 10])], true);
    let metrics = Metrics::of(&bed.nbd);
    let requests = |op: &str| {
        get(
            &metrics.scrape(),
            "nbd_s3_backend_requests_total",
            &[("bucket", BUCKET), ("op", op), ("outcome", "ok")],
        ) as u64
    };
    let puts = requests("put");
    let mut c1 = golden.clone();
    c1.resize(2 * SIZE as usize, 0);
    let mut c2 = c1.clone();
    c1[..10].fill(1);

    let out = bed.nbd.admin_ok(&["flatten", "c1"]);
    assert!(out.contains(&format!("{GOLDEN_BLOCKS} blocks")), "{out}");
    // Server-side copies are counted as such, not as PUTs (only manifest writes are).
    assert_eq!(requests("copy"), GOLDEN_BLOCKS);
    assert!(
        requests("put") - puts < GOLDEN_BLOCKS,
        "copies counted as PUTs"
    );
    assert_image(
        "c1 after flatten",
        &nbd_read(&bed.uri("c1"), 0, 2 * SIZE),
        &c1,
        BS,
    );
    assert_eq!(
        data_objects(&bed, "c1/"),
        GOLDEN_BLOCKS as usize + 1,
        "{:?}",
        bed.keys("c1/")
    );
    let again = bed.nbd.admin(&["flatten", "c1"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let list = json(&bed.nbd.admin_ok(&["snapshot", "list", "golden", "--json"]));
    assert_eq!(
        list["snapshots"][0]["clones"],
        serde_json::json!(["c2"]),
        "{list}"
    );

    // The base leaves the file and the daemon restarts: the clone still reads through it.
    bed.nbd
        .rewrite_config(|c| c.exports.retain(|e| e.name != "golden"));
    bed.stop_and_restart();
    nbd_write(&bed.uri("c2"), &[(SIZE, vec![2; 10])], true);
    c2[SIZE as usize..SIZE as usize + 10].fill(2);
    assert_image(
        "c2, base gone from the file",
        &nbd_read(&bed.uri("c2"), 0, 2 * SIZE),
        &c2,
        BS,
    );
    assert_image(
        "c1 flattened",
        &nbd_read(&bed.uri("c1"), 0, 2 * SIZE),
        &c1,
        BS,
    );
}

#[test]
fn a_clone_of_a_missing_snapshot_is_refused_naming_it() {
    let (mut bed, _) = golden_bed(|b| b);
    add_by_reload(
        &mut bed,
        vec![ExportSpec::new("bad")
            .size("8MiB")
            .line("base = \"golden@nope\"")],
    );
    let bad = state(&bed, "bad");
    assert_eq!(bad["state"], "refused", "{bad}");
    assert!(
        bad["reason"].as_str().is_some_and(|r| r.contains("nope")),
        "{bad}"
    );
    assert!(
        bed.keys("bad/").is_empty(),
        "nothing written: {:?}",
        bed.keys("bad/")
    );
}

#[test]
fn kill_at_each_step_of_clone_and_flatten_leaves_everything_readable() {
    for step in [
        "clone-registered",
        "clone-written",
        "flatten-partial",
        "flatten-written",
    ] {
        let (mut bed, golden) = golden_bed(|b| b.env("NBD_S3_CRASH_AT", step));
        let mut want = golden.clone();
        want.resize(2 * SIZE as usize, 0);
        bed.nbd.rewrite_config(|c| c.exports.push(clone_spec("c1")));
        bed.nbd.sighup();
        if step.starts_with("flatten") {
            wait_until("the clone", DAEMON_TIMEOUT, || serving(&bed, "c1"));
            let out = bed.nbd.admin(&["flatten", "c1"]);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{step}: the daemon died: {out:?}"
            );
        }
        let status = bed.nbd.wait_exit(DAEMON_TIMEOUT);
        assert!(!status.success(), "{step}: the crash hook aborts");
        bed.nbd.set_env("NBD_S3_CRASH_AT", None);
        bed.nbd.restart();
        wait_until("the clone after the crash", Duration::from_secs(30), || {
            serving(&bed, "c1")
        });
        assert_image(step, &nbd_read(&bed.uri("c1"), 0, 2 * SIZE), &want, BS);
        bed.nbd.admin_ok(&["gc", "c1"]);
        // Flattened before the crash already (flatten-written): "not a clone" is right.
        let flat = bed.nbd.admin(&["flatten", "c1"]);
        let done_before = step == "flatten-written";
        assert_eq!(
            flat.status.code(),
            Some(if done_before { 1 } else { 0 }),
            "{step}: {flat:?}"
        );
        assert_image(step, &nbd_read(&bed.uri("c1"), 0, 2 * SIZE), &want, BS);
        assert_eq!(
            data_objects(&bed, "c1/"),
            GOLDEN_BLOCKS as usize,
            "{step}: {:?}",
            bed.keys("c1/")
        );
        assert_eq!(bed.nbd.admin_ok(&["gc", "c1"]).trim(), "0", "{step}");
        // Flattened: the base's snapshot may go now.
        bed.nbd.admin_ok(&["snapshot", "delete", "golden", "v1"]);
        assert_image(step, &nbd_read(&bed.uri("c1"), 0, 2 * SIZE), &want, BS);
    }
}
