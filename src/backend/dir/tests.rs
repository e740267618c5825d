//! Unit tests of the `file://` store against a real temporary directory.

use super::*;

fn store() -> (tempfile::TempDir, DirStore) {
    let root = tempfile::tempdir().unwrap();
    let store = DirStore::new(root.path(), "bkt").unwrap();
    (root, store)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn objects_are_plain_files_under_bucket_dir() {
    let (root, s) = store();
    let data = Bytes::from(vec![7u8; 4096]);
    s.put("vm1/000000000000002a", data.clone()).await.unwrap();
    let file = root.path().join("bkt/vm1/000000000000002a");
    assert_eq!(fs::read(&file).unwrap(), data);
    assert_eq!(s.get("vm1/000000000000002a").await.unwrap(), Some(data));
    // No temp files left behind.
    let names: Vec<_> = fs::read_dir(root.path().join("bkt/vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["000000000000002a"]);
}

#[tokio::test]
async fn missing_objects_and_buckets_read_as_absent() {
    let (_root, s) = store();
    assert_eq!(s.get("vm1/0").await.unwrap(), None);
    assert_eq!(s.list("vm1/").await.unwrap(), Vec::<String>::new());
    s.delete("vm1/0").await.unwrap();
    s.put("vm1/0", Bytes::from_static(b"x")).await.unwrap();
    // A key that is a directory, or below a file, is simply absent.
    assert_eq!(s.get("vm1").await.unwrap(), None);
    assert_eq!(s.get("vm1/0/x").await.unwrap(), None);
}

#[tokio::test]
async fn overwrite_and_delete() {
    let (_root, s) = store();
    s.put("k", Bytes::from_static(b"one")).await.unwrap();
    s.put("k", Bytes::from_static(b"two!")).await.unwrap();
    assert_eq!(s.get("k").await.unwrap().unwrap(), &b"two!"[..]);
    s.delete("k").await.unwrap();
    assert_eq!(s.get("k").await.unwrap(), None);
    s.delete("k").await.unwrap();
}

#[tokio::test]
async fn list_matches_string_prefixes_across_directories() {
    let (root, s) = store();
    for k in [
        "a/1", "a/2", "a/sub/3", "ab/1", "b/1", "a0", "vm1/0000", "vm1/0001", "vm1/1000",
    ] {
        s.put(k, Bytes::from_static(b"x")).await.unwrap();
    }
    // A leftover temp file from a crash is never listed.
    fs::write(root.path().join("bkt/a/.nbd-s3-tmp.1.2.3"), b"junk").unwrap();
    assert_eq!(
        sorted(s.list("a/").await.unwrap()),
        ["a/1", "a/2", "a/sub/3"]
    );
    assert_eq!(
        sorted(s.list("a").await.unwrap()),
        ["a/1", "a/2", "a/sub/3", "a0", "ab/1"]
    );
    assert_eq!(
        sorted(s.list("vm1/0").await.unwrap()),
        ["vm1/0000", "vm1/0001"]
    );
    assert_eq!(s.list("").await.unwrap().len(), 9);
    assert!(s.list("../").await.unwrap().is_empty());
    assert!(s.list("a//").await.unwrap().is_empty());
    assert!(s.list("nothing/").await.unwrap().is_empty());
}

#[tokio::test]
async fn keys_escaping_the_bucket_are_refused() {
    let (root, s) = store();
    for k in [
        "",
        "../x",
        "/abs",
        "a/../b",
        "a//b",
        "a/",
        "./a",
        "a/.nbd-s3-tmp.x",
        "a\0b",
    ] {
        let err = s.put(k, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(err, BackendError::Permanent(_)), "{k:?}: {err}");
        assert!(s.get(k).await.is_err(), "{k:?}");
    }
    assert!(!root.path().join("x").exists());
    for b in ["", ".", "..", "a/b"] {
        assert!(DirStore::new(root.path(), b).is_err(), "{b:?}");
    }
}

#[tokio::test]
async fn bit_flip_is_detected() {
    let (root, s) = store();
    let data = Bytes::from((0..=255u8).cycle().take(8192).collect::<Vec<_>>());
    s.put("vm1/0", data).await.unwrap();
    let file = root.path().join("bkt/vm1/0");
    // Rewrite in place (keeping the xattr), flipping one bit.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    buf[1000] ^= 0x10;
    use std::os::unix::fs::FileExt;
    f.write_all_at(&buf, 0).unwrap();
    match s.get("vm1/0").await {
        Err(BackendError::Corrupt { key, .. }) => assert_eq!(key, "vm1/0"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn truncation_is_detected() {
    let (root, s) = store();
    s.put("vm1/0", Bytes::from(vec![1u8; 4096])).await.unwrap();
    let file = root.path().join("bkt/vm1/0");
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(2048)
        .unwrap();
    match s.get("vm1/0").await {
        Err(BackendError::Corrupt { reason, .. }) => assert!(reason.contains("length"), "{reason}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn files_without_checksum_are_trusted() {
    let (root, s) = store();
    fs::create_dir_all(root.path().join("bkt/p")).unwrap();
    fs::write(root.path().join("bkt/p/k"), b"by hand").unwrap();
    assert_eq!(s.get("p/k").await.unwrap().unwrap(), &b"by hand"[..]);
}

#[tokio::test]
async fn conditional_writes_compare_and_swap() {
    let (_root, s) = store();
    let e1 = s
        .put_if_absent("p/lock", Bytes::from_static(b"a"))
        .await
        .unwrap();
    let e1 = e1.expect("first create wins");
    assert_eq!(
        s.put_if_absent("p/lock", Bytes::from_static(b"b"))
            .await
            .unwrap(),
        None
    );
    let (data, tag) = s.get_with_etag("p/lock").await.unwrap().unwrap();
    assert_eq!((data.as_ref(), &tag), (&b"a"[..], &e1));
    let e2 = s
        .put_if_match("p/lock", Bytes::from_static(b"c"), &e1)
        .await
        .unwrap()
        .expect("matching tag replaces");
    assert_ne!(e1, e2);
    assert_eq!(
        s.put_if_match("p/lock", Bytes::from_static(b"d"), &e1)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.put_if_match("p/none", Bytes::from_static(b"d"), &e1)
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.get("p/lock").await.unwrap().unwrap(), &b"c"[..]);
    let probe = crate::backend::conditional::supports_conditional_writes(&s, "p/probe");
    assert!(probe.await.unwrap());
}

#[tokio::test]
async fn concurrent_creates_have_exactly_one_winner() {
    let (_root, s) = store();
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.put_if_absent("l", Bytes::from(vec![i])).await })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap().unwrap().is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn many_parallel_puts_then_list() {
    let (_root, s) = store();
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put(
                    &format!("vm/{i:016x}"),
                    Bytes::from(i.to_le_bytes().to_vec()),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let keys = sorted(s.list("vm/").await.unwrap());
    assert_eq!(keys.len(), 200);
    assert_eq!(keys[42], format!("vm/{:016x}", 42));
    let got = s.get(&keys[42]).await.unwrap().unwrap();
    assert_eq!(got, &42u32.to_le_bytes()[..]);
}

#[tokio::test]
async fn oversized_file_is_refused_before_reading() {
    let (root, s) = store();
    fs::create_dir_all(root.path().join("bkt/p")).unwrap();
    let f = File::create(root.path().join("bkt/p/huge")).unwrap();
    f.set_len(crate::backend::MAX_OBJECT_SIZE + 1).unwrap(); // sparse: no disk used
    let err = s.get("p/huge").await.unwrap_err();
    assert!(matches!(err, BackendError::Corrupt { .. }), "{err:?}");
}

/// PUT/GET rate of 128 KiB objects with 32 in flight, fsyncs included: what the `file://`
/// store can give the block store. A benchmark, not a test: run with
/// `cargo test --release --lib backend::dir::tests::rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; run explicitly"]
async fn rate_of_parallel_put_get() {
    let (_root, s) = store();
    let data = Bytes::from(vec![0x5au8; 128 * 1024]);
    let n = 2000usize;
    for op in ["PUT", "GET"] {
        let start = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let (s, data) = (s.clone(), data.clone());
            tasks.spawn(async move {
                let key = format!("b/{i:016x}");
                if op == "PUT" {
                    s.put(&key, data).await.unwrap();
                } else {
                    assert_eq!(s.get(&key).await.unwrap().unwrap().len(), data.len());
                }
            });
            while tasks.len() >= 32 {
                tasks.join_next().await.unwrap().unwrap();
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "dir {op}: {n} x 128 KiB, 32 in flight: {:.0} objects/s",
            n as f64 / secs
        );
    }
}
