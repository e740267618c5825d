//! Unit tests for the reload diff (pure) and its application to a registry (in-memory stores).

use super::*;
use crate::backend::memory::MemoryStore;
use crate::backend::{BackendError, DynObjectStore};
use crate::config::{CacheConfig, S3Config, ServerConfig};
use crate::store::CacheBudget;
use crate::test_support::wait_until;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn export(name: &str) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        size: 1 << 30,
        bucket: "nbd".into(),
        prefix: format!("{name}/"),
        block_size: 128 << 10,
        read_only: false,
        description: None,
        allow: None,
        lease: crate::config::LeaseMode::Off,
        codec: Default::default(),
        base: None,
        auto_snapshots: None,
        durability: crate::config::Durability::S3,
    }
}

/// `export(name)` with `compression = "zstd"`.
fn zstd_export(name: &str) -> ExportConfig {
    let mut e = export(name);
    e.codec.compression = crate::config::Compression::Zstd { level: 3 };
    e
}

fn config(exports: Vec<ExportConfig>) -> Config {
    Config {
        server: ServerConfig {
            listen: vec![ListenAddr::Tcp("127.0.0.1:0".into())],
            metrics: None,
            tls: None,
            control: None,
        },
        s3: S3Config {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: None,
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            adaptive_concurrency: true,
        },
        cache: CacheConfig {
            memory: 1 << 30,
            dirty: 256 << 20,
            flush_timeout: Duration::from_secs(60),
            journal: None,
        },
        exports,
    }
}

fn idle(_: &str) -> Option<RunningExport> {
    Some(RunningExport::default())
}

fn attached(_: &str) -> Option<RunningExport> {
    Some(RunningExport {
        attached: 1,
        refused: false,
    })
}

#[test]
fn added_removed_kept() {
    let old = config(vec![export("a"), export("b")]);
    let new = config(vec![export("b"), export("c")]);
    let p = plan_with(&old, &new, idle);
    assert_eq!(p.exports["a"], ExportAction::Remove);
    assert_eq!(p.exports["b"], ExportAction::Keep);
    assert_eq!(p.exports["c"], ExportAction::Add(export("c")));
    assert!(p.restart_needed.is_empty());
    assert_eq!(p.effective, new);
    assert!(!plan_with(&new, &new, idle).changes_exports());
}

#[test]
fn growth_and_description_update_in_place() {
    let old = config(vec![export("a")]);
    let mut grown = export("a");
    grown.size = 2 << 30;
    let p = plan_with(&old, &config(vec![grown.clone()]), attached);
    assert_eq!(
        p.exports["a"],
        ExportAction::Update {
            new: grown,
            grow: true
        }
    );
    let mut described = export("a");
    described.description = Some("root disk".into());
    described.read_only = true;
    let p = plan_with(&old, &config(vec![described.clone()]), attached);
    assert_eq!(
        p.exports["a"],
        ExportAction::Update {
            new: described,
            grow: false
        }
    );
}

#[test]
fn shrink_is_refused_and_old_definition_stays() {
    let old = config(vec![export("a")]);
    let mut small = export("a");
    small.size = 1 << 20;
    let p = plan_with(&old, &config(vec![small]), idle);
    assert!(
        matches!(&p.exports["a"], ExportAction::Refuse { reason } if reason.contains("shrinking"))
    );
    assert_eq!(p.effective.exports, old.exports);
}

#[test]
fn moving_an_attached_export_is_refused() {
    let old = config(vec![export("a")]);
    for change in [
        |e: &mut ExportConfig| e.bucket = "other".into(),
        |e: &mut ExportConfig| e.prefix = "elsewhere/".into(),
        |e: &mut ExportConfig| e.block_size = 1 << 20,
    ] {
        let mut moved = export("a");
        change(&mut moved);
        let new = config(vec![moved.clone()]);
        let p = plan_with(&old, &new, attached);
        assert!(
            matches!(&p.exports["a"], ExportAction::Refuse { reason } if reason.contains("attached"))
        );
        assert_eq!(p.effective.exports, old.exports);
        let p = plan_with(&old, &new, idle);
        assert!(matches!(&p.exports["a"], ExportAction::Reopen { new, .. } if *new == moved));
    }
}

#[test]
fn read_only_off_needs_no_clients() {
    let mut ro = export("a");
    ro.read_only = true;
    let old = config(vec![ro]);
    let new = config(vec![export("a")]);
    assert!(matches!(
        plan_with(&old, &new, attached).exports["a"],
        ExportAction::Refuse { .. }
    ));
    assert!(matches!(
        plan_with(&old, &new, idle).exports["a"],
        ExportAction::Reopen { .. }
    ));
}

#[test]
fn refused_exports_are_retried() {
    let old = config(vec![export("a")]);
    let p = plan_with(&old, &old, |_| {
        Some(RunningExport {
            attached: 0,
            refused: true,
        })
    });
    assert!(matches!(p.exports["a"], ExportAction::Reopen { .. }));
}

#[test]
fn restart_only_sections_are_reported_and_kept() {
    let old = config(vec![export("a")]);
    let mut new = old.clone();
    new.s3.region = Some("eu-west-1".into());
    new.cache.memory = 2 << 30;
    new.server.metrics = Some("127.0.0.1:9810".parse().unwrap());
    new.server.listen = vec![
        ListenAddr::Tcp("127.0.0.1:1".into()),
        ListenAddr::Unix("/run/x".into()),
    ];
    let p = plan_with(&old, &new, idle);
    assert_eq!(
        p.restart_needed,
        vec!["[s3]", "[cache]", "[server] metrics"]
    );
    assert_eq!(
        (p.effective.s3.clone(), p.effective.cache.clone()),
        (old.s3.clone(), old.cache.clone())
    );
    assert_eq!(p.effective.server.metrics, None);
    assert_eq!(p.effective.server.listen, new.server.listen);
    assert_eq!(p.listen_added, new.server.listen);
    assert_eq!(p.listen_removed, old.server.listen);
}

/// In-memory buckets; `fail` makes every bucket unavailable.
#[derive(Default)]
struct Buckets {
    fail: AtomicBool,
}

impl BucketSource for Buckets {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError::Permanent(format!(
                "bucket {bucket} is unavailable"
            )));
        }
        Ok(Arc::new(MemoryStore::new()))
    }
}

fn ctx(budget: &Arc<crate::store::CacheBudget>, flush_timeout: Duration) -> OpenContext {
    OpenContext {
        budget: Arc::clone(budget),
        flush_timeout,
        leases: crate::lease::LeaseManager::new(),
        manifest_turn: Default::default(),
        journal: None,
    }
}

async fn apply(old: &Config, new: &Config, registry: &Registry, buckets: &Buckets) -> Applied {
    let budget = CacheBudget::new(1 << 30, 256 << 20);
    let p = plan(old, new, registry);
    apply_exports(p, registry, buckets, &ctx(&budget, Duration::from_secs(5))).await
}

#[tokio::test]
async fn apply_keeps_unchanged_and_swaps_once() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let empty = config(vec![]);
    let one = config(vec![export("a")]);
    let applied = apply(&empty, &one, &registry, &buckets).await;
    assert_eq!(applied.added.len(), 1);
    let a = registry.get("a").unwrap();
    let two = config(vec![export("a"), export("b")]);
    apply(&one, &two, &registry, &buckets).await;
    assert!(
        Arc::ptr_eq(&a, &registry.get("a").unwrap()),
        "unchanged export was reopened"
    );
    assert_eq!(registry.list().len(), 2);
    let mut grown = export("a");
    grown.size = 4 << 30;
    let grown_cfg = config(vec![grown, export("b")]);
    apply(&two, &grown_cfg, &registry, &buckets).await;
    let a2 = registry.get("a").unwrap();
    assert_eq!(a2.size(), 4 << 30);
    assert!(a2.same_instance(&a), "growth must keep the store");
    assert_eq!(
        a.size(),
        1 << 30,
        "attached clients keep the size they negotiated"
    );
}

#[tokio::test]
async fn removed_export_serves_attached_clients_until_they_leave() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let one = config(vec![export("a")]);
    apply(&config(vec![]), &one, &registry, &buckets).await;
    let client = registry.get("a").unwrap().attach();
    apply(&one, &config(vec![]), &registry, &buckets).await;
    assert!(
        registry.get("a").is_none(),
        "new connections must not find a removed export"
    );
    assert!(client.export().is_removed());
    assert!(
        client.export().is_serving(),
        "attached client keeps its store"
    );
    assert_eq!(registry.draining().len(), 1);
    drop(client);
    wait_until("the removed export to be released", || {
        registry.draining().is_empty()
    })
    .await;
}

#[tokio::test]
async fn re_adding_reuses_the_store_still_in_use() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let one = config(vec![export("a")]);
    apply(&config(vec![]), &one, &registry, &buckets).await;
    let client = registry.get("a").unwrap().attach();
    apply(&one, &config(vec![]), &registry, &buckets).await;
    let applied = apply(&config(vec![]), &one, &registry, &buckets).await;
    assert!(
        applied.added.is_empty(),
        "a second store on the same objects was opened"
    );
    let again = registry.get("a").unwrap();
    assert!(again.same_instance(client.export()));
    assert!(!again.is_removed());
    assert_eq!(again.attached(), 1);
    // An export overlapping the draining one (but not identical) is refused meanwhile.
    apply(&one, &config(vec![]), &registry, &buckets).await;
    let mut overlap = export("b");
    overlap.prefix = "a/sub/".into();
    apply(&config(vec![]), &config(vec![overlap]), &registry, &buckets).await;
    let b = registry.get("b").unwrap();
    assert!(
        matches!(b.refusal(), Some(r @ Refusal::OverlapsAttached { .. }) if r.to_string().contains("still has 1 client")),
        "{:?}",
        b.state()
    );
    drop(client);
}

#[tokio::test]
async fn re_adding_with_another_codec_never_reuses_the_store_still_in_use() {
    // SIGHUP and the file watcher can both reload one edit: the first retires the running
    // export (a client still attached) and refuses the new codec, the second retries the
    // refused export while the old store still drains. The old store must not come back
    // under the new definition: it would serve the blocks with the old codec.
    let registry = Registry::new();
    let buckets = Buckets::default();
    let zstd = zstd_export("a");
    let before = config(vec![zstd]);
    apply(&config(vec![]), &before, &registry, &buckets).await;
    let client = registry.get("a").unwrap().attach();
    apply(&before, &config(vec![]), &registry, &buckets).await;
    let after = config(vec![export("a")]);
    let applied = apply(&config(vec![]), &after, &registry, &buckets).await;
    assert!(
        applied.added.is_empty(),
        "a second store on the same objects was opened"
    );
    let again = registry.get("a").unwrap();
    assert!(
        !again.same_instance(client.export()),
        "the store of the old codec was reused for the new one"
    );
    assert!(
        matches!(again.refusal(), Some(Refusal::OverlapsAttached { .. })),
        "{:?}",
        again.state()
    );
    assert!(client.export().is_removed(), "the old version was revived");
    drop(client);
}

#[tokio::test]
async fn retrying_a_refused_export_keeps_its_reason_while_its_old_version_has_clients() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let zstd = zstd_export("a");
    apply(&config(vec![]), &config(vec![zstd]), &registry, &buckets).await;
    let old = registry.get("a").unwrap();
    let client = old.attach();
    // What a reload leaves when a client attached while it opened the new definition: the
    // new one refused, the old one draining with that client.
    let refused = Export::refused(export("a"), Refusal::Other("compression changed".into()));
    registry.replace([("a".to_string(), Arc::clone(&refused))].into());
    registry.retire(old);
    // The same file read again (the file watcher after SIGHUP): nothing to retry yet.
    let after = config(vec![export("a")]);
    let applied = apply(&after, &after, &registry, &buckets).await;
    assert!(applied.added.is_empty());
    let now = registry.get("a").unwrap();
    assert!(Arc::ptr_eq(&now, &refused), "{:?}", now.state());
    assert!(client.export().is_removed());
    drop(client);
}

#[tokio::test]
async fn unopenable_export_is_refused_then_retried() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    buckets.fail.store(true, Ordering::SeqCst);
    let one = config(vec![export("a"), export("b")]);
    let budget = CacheBudget::new(1 << 30, 1 << 28);
    let e = open_export(
        &export("a"),
        &buckets,
        &ctx(&budget, Duration::from_secs(1)),
    )
    .await;
    let reason = e.refusal().map(ToString::to_string).unwrap_or_default();
    assert!(reason.contains("bucket nbd is unavailable"), "{reason:?}");
    apply(&config(vec![]), &one, &registry, &buckets).await;
    assert!(registry.list().iter().all(|e| !e.is_serving()));
    buckets.fail.store(false, Ordering::SeqCst);
    apply(&one, &one, &registry, &buckets).await;
    assert!(
        registry.list().iter().all(|e| e.is_serving()),
        "refused exports were not retried"
    );
}

#[tokio::test]
async fn client_attaching_during_reload_blocks_a_reopen() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let budget = CacheBudget::new(1 << 30, 256 << 20);
    let one = config(vec![export("a")]);
    apply(&config(vec![]), &one, &registry, &buckets).await;
    let mut moved = export("a");
    moved.prefix = "elsewhere/".into();
    let moved_cfg = config(vec![moved]);
    let p = plan(&one, &moved_cfg, &registry);
    assert!(matches!(p.exports["a"], ExportAction::Reopen { .. }));
    let before = registry.get("a").unwrap();
    let client = before.attach();
    let applied = apply_exports(
        p,
        &registry,
        &buckets,
        &ctx(&budget, Duration::from_secs(5)),
    )
    .await;
    assert!(
        Arc::ptr_eq(&registry.get("a").unwrap(), &before),
        "store replaced under a client"
    );
    assert_eq!(
        applied.effective.exports, one.exports,
        "effective config must keep the old definition"
    );
    drop(client);
}

#[tokio::test]
async fn a_reopen_closes_the_old_store_to_new_clients_before_it_opens_the_new_one() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let budget = CacheBudget::new(1 << 30, 256 << 20);
    let one = config(vec![export("a")]);
    apply(&config(vec![]), &one, &registry, &buckets).await;
    let old = registry.get("a").unwrap();
    let old_store = Arc::clone(old.store().unwrap());
    let mut moved = export("a");
    moved.prefix = "elsewhere/".into();
    let moved_cfg = config(vec![moved]);
    let ctx = ctx(&budget, Duration::from_secs(5));
    let plan_reopen = |registry: &Registry| {
        let p = plan(&one, &moved_cfg, registry);
        assert!(matches!(p.exports["a"], ExportAction::Reopen { .. }));
        p
    };
    // A GO the store counted after the plan was made (its attach still under way): the old
    // store stays, never two stores on one export.
    let go = old_store.attach_client().expect("open gate");
    let applied = apply_exports(plan_reopen(&registry), &registry, &buckets, &ctx).await;
    assert!(Arc::ptr_eq(&registry.get("a").unwrap(), &old));
    assert_eq!(applied.effective.exports, one.exports);
    assert!(
        old_store.admits_clients(),
        "a refused reopen leaves the gate open"
    );
    drop(go);
    // Without clients the store is replaced; a GO that found the old one just before is
    // refused, then and for good, so the old store is never revived either.
    apply_exports(plan_reopen(&registry), &registry, &buckets, &ctx).await;
    assert!(!Arc::ptr_eq(&registry.get("a").unwrap(), &old));
    let why = old_store
        .attach_client()
        .expect_err("the replaced store admits nobody");
    assert!(why.contains("reload"), "{why}");
}

/// Every bucket is one shared in-memory store.
struct Shared(Arc<MemoryStore>);

impl BucketSource for Shared {
    fn bucket(&self, _bucket: &str) -> Result<DynObjectStore, BackendError> {
        Ok(Arc::clone(&self.0) as DynObjectStore)
    }
}

#[tokio::test]
async fn reopen_waits_for_the_old_data_to_reach_s3() {
    let mem = Arc::new(MemoryStore::new());
    let buckets = Shared(Arc::clone(&mem));
    let registry = Registry::new();
    let budget = CacheBudget::new(1 << 30, 256 << 20);
    let mut a = export("a");
    a.block_size = 4096;
    let one = config(vec![a.clone()]);
    let p = plan(&config(vec![]), &one, &registry);
    apply_exports(
        p,
        &registry,
        &buckets,
        &ctx(&budget, Duration::from_millis(50)),
    )
    .await;
    let running = registry.get("a").unwrap();
    mem.fail_next_permanent(u64::MAX);
    let store = Arc::clone(running.store().unwrap());
    store
        .write(0, bytes::Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    let mut moved = a.clone();
    moved.prefix = "moved/".into();
    let moved_cfg = config(vec![moved]);
    let p = plan(&one, &moved_cfg, &registry);
    assert!(matches!(p.exports["a"], ExportAction::Reopen { .. }));
    let applied = apply_exports(
        p,
        &registry,
        &buckets,
        &ctx(&budget, Duration::from_millis(50)),
    )
    .await;
    assert!(
        Arc::ptr_eq(&registry.get("a").unwrap(), &running),
        "moved away from unflushed data"
    );
    assert_eq!(applied.effective.exports, one.exports);
    // Once S3 takes the data, a later reload (as the admin's next save or SIGHUP) moves it.
    mem.fail_next_permanent(0);
    let mut effective = applied.effective;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while registry.get("a").unwrap().config.prefix != "moved/" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the move never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let p = plan(&effective, &moved_cfg, &registry);
        effective = apply_exports(
            p,
            &registry,
            &buckets,
            &ctx(&budget, Duration::from_secs(5)),
        )
        .await
        .effective;
    }
    assert!(
        mem.peek("a/0000000000000000").is_some(),
        "old data not flushed before the move"
    );
}

#[test]
fn lease_change_reopens_idle_exports_and_is_refused_under_clients() {
    let old = config(vec![export("a")]);
    let mut leased = export("a");
    leased.lease = crate::config::LeaseMode::On {
        ttl: Duration::from_secs(30),
    };
    let new = config(vec![leased]);
    let idle_plan = plan_with(&old, &new, idle);
    assert!(matches!(
        idle_plan.exports["a"],
        ExportAction::Reopen { .. }
    ));
    let busy_plan = plan_with(&old, &new, attached);
    assert!(matches!(
        busy_plan.exports["a"],
        ExportAction::Refuse { .. }
    ));
}

#[tokio::test]
async fn reopened_export_keeps_counting_its_requests() {
    let registry = Registry::new();
    let buckets = Buckets::default();
    let one = config(vec![export("a")]);
    apply(&config(vec![]), &one, &registry, &buckets).await;
    let a = registry.get("a").unwrap();
    drop(a.requests().start(crate::proto::Command::Read, 4096));
    let mut moved = export("a");
    moved.prefix = "elsewhere/".into();
    let moved_cfg = config(vec![moved]);
    apply(&one, &moved_cfg, &registry, &buckets).await;
    let a2 = registry.get("a").unwrap();
    assert!(!a2.same_instance(&a), "a new prefix must open a new store");
    let reads = a2.requests().snapshot(crate::proto::Command::Read);
    assert_eq!(
        reads.requests, 1,
        "request counter went back to zero on reopen"
    );
    assert_eq!(reads.bytes, 4096);
}

#[test]
fn a_durability_change_reopens_an_idle_export_and_is_refused_while_attached() {
    let old = config(vec![export("a")]);
    let mut local = export("a");
    local.durability = crate::config::Durability::Local;
    let new = config(vec![local.clone()]);
    let p = plan_with(&old, &new, idle);
    assert!(
        matches!(&p.exports["a"], ExportAction::Reopen { new, .. } if *new == local),
        "{:?}",
        p.exports["a"]
    );
    let p = plan_with(&old, &new, attached);
    assert!(
        matches!(&p.exports["a"], ExportAction::Refuse { reason } if reason.contains("durability"))
    );
}
