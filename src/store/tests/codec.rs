//! Compressed and encrypted exports over the in-memory store: round trips, what the objects
//! hold, the manifest's record of the codec, refusals of a changed codec or a wrong key, and
//! EIO (never wrong data) for objects that were moved or damaged.

use super::*;
use crate::config::{CodecConfig, Compression, EncryptionKey};

fn codec(zstd: bool, key: Option<u8>) -> CodecConfig {
    CodecConfig {
        compression: if zstd {
            Compression::Zstd { level: 3 }
        } else {
            Compression::Off
        },
        encryption: key.map(|k| EncryptionKey::from_bytes("/etc/keys/t.key", [k; 32])),
    }
}

fn coded(c: CodecConfig) -> BlockStoreConfig {
    BlockStoreConfig {
        codec: c,
        ..config(BS, 8 * u64::from(BS))
    }
}

/// Compressible and recognisable: a phrase repeated over two blocks.
fn text(len: usize) -> Vec<u8> {
    b"attack at dawn! "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

async fn open_err(mem: &Arc<MemoryStore>, c: CodecConfig) -> StoreError {
    BlockStore::open(objects(mem), coded(c), big_budget())
        .await
        .expect_err("refused")
}

#[tokio::test]
async fn each_codec_round_trips_and_objects_hold_what_it_promises() {
    for (zstd, secret) in [(true, None), (false, Some(1)), (true, Some(1))] {
        let mem = Arc::new(MemoryStore::new());
        let store = open_with(&mem, coded(codec(zstd, secret)), big_budget()).await;
        let data = text(2 * BS as usize);
        store
            .write(0, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        store.flush().await.unwrap();
        let object = mem.peek(&key(0)).expect("stored");
        assert_eq!(&object[..4], b"NBS3");
        if zstd {
            assert!(object.len() < BS as usize / 4, "{} bytes", object.len());
        }
        if secret.is_some() {
            assert!(
                !object.windows(6).any(|w| w == b"attack"),
                "plaintext in {object:?}"
            );
        }
        let stats = store.stats();
        assert_eq!(stats.put_logical_bytes, 2 * u64::from(BS));
        assert_eq!(stats.compressed_blocks, if zstd { 2 } else { 0 });
        drop(store);
        let manifest = String::from_utf8(mem.peek("t/nbd-s3.json").unwrap().to_vec()).unwrap();
        assert!(manifest.contains("\"format\": 2"), "{manifest}");
        assert_eq!(manifest.contains("zstd:3"), zstd, "{manifest}");
        assert_eq!(
            manifest.contains("aes-256-gcm-siv"),
            secret.is_some(),
            "{manifest}"
        );
        let again = open_with(&mem, coded(codec(zstd, secret)), big_budget()).await;
        assert_eq!(read_bytes(&again, 0, 2 * BS).await, data);
    }
}

#[tokio::test]
async fn plain_exports_keep_format_1_and_raw_objects() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_with(&mem, coded(CodecConfig::default()), big_budget()).await;
    store
        .write(0, Bytes::from(text(BS as usize)), true)
        .await
        .unwrap();
    assert_eq!(mem.peek(&key(0)).unwrap().to_vec(), text(BS as usize));
    let manifest = String::from_utf8(mem.peek("t/nbd-s3.json").unwrap().to_vec()).unwrap();
    assert!(manifest.contains("\"format\": 1"), "{manifest}");
    assert!(!manifest.contains("compression") && !manifest.contains("encryption"));
    assert!(manifest.contains("\"id\""), "{manifest}");
}

#[tokio::test]
async fn a_changed_codec_or_a_wrong_key_refuses_the_export() {
    let mem = Arc::new(MemoryStore::new());
    drop(open_with(&mem, coded(codec(true, Some(1))), big_budget()).await);
    let e = open_err(&mem, codec(false, Some(1))).await;
    assert!(matches!(e, StoreError::CodecMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("\"zstd:3\"") && msg.contains("\"off\""),
        "{msg}"
    );
    let e = open_err(&mem, codec(true, None)).await;
    let msg = e.to_string();
    assert!(
        msg.contains("encryption") && msg.contains("aes-256-gcm-siv"),
        "{msg}"
    );
    let e = open_err(&mem, codec(true, Some(2))).await;
    let msg = e.to_string();
    assert!(
        msg.contains("wrong key") && msg.contains("/etc/keys/t.key"),
        "{msg}"
    );
    assert!(!msg.contains("0202"), "no key bytes in {msg}");
    // A plain export (format 1) asked to compress is a change too.
    let plain = Arc::new(MemoryStore::new());
    drop(open_with(&plain, coded(CodecConfig::default()), big_budget()).await);
    let e = open_err(&plain, codec(true, None)).await;
    assert!(e.to_string().contains("compression changed"), "{e}");
}

#[tokio::test]
async fn moved_damaged_or_planted_objects_read_as_eio_and_are_counted() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_with(&mem, coded(codec(true, Some(1))), big_budget()).await;
    let (a, b) = (text(BS as usize), pattern(BS as usize, 3));
    store.write(0, Bytes::from(a.clone()), false).await.unwrap();
    store
        .write(u64::from(BS), Bytes::from(b), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    drop(store);
    let (obj0, obj1) = (mem.peek(&key(0)).unwrap(), mem.peek(&key(1)).unwrap());
    // Swapped: each object is intact, but at the other's index.
    mem.insert(&key(0), obj1.clone());
    mem.insert(&key(1), obj0.clone());
    let truncated = obj0.slice(..obj0.len() - 1);
    mem.insert(&key(2), truncated);
    let mut flipped = obj0.to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    mem.insert(&key(3), Bytes::from(flipped));
    mem.insert(&key(4), Bytes::from(a)); // clear text planted in an encrypted export
    let store = open_with(&mem, coded(codec(true, Some(1))), big_budget()).await;
    for block in 0..5u64 {
        let err = store
            .read(block * u64::from(BS), 16)
            .await
            .expect_err("never wrong data");
        assert_eq!(err.kind(), ErrorKind::Io, "block {block}: {err}");
    }
    // Read-ahead fetches some blocks before their reader does; each GET fails once, none is
    // retried (the same bytes would come back).
    let stats = store.stats();
    assert!(
        stats.decrypt_errors >= 4 && stats.decode_errors >= 1,
        "{stats:?}"
    );
    assert_eq!(
        stats.gets,
        stats.decrypt_errors + stats.decode_errors,
        "{stats:?}"
    );
    assert_eq!(stats.get_retries, 0, "{stats:?}");
}

#[tokio::test]
async fn snapshots_of_a_coded_export_decode_with_its_codec() {
    let mem = Arc::new(MemoryStore::new());
    let cfg = || coded(codec(true, Some(3)));
    let store = open_with(&mem, cfg(), big_budget()).await;
    let (old, new) = (text(BS as usize), pattern(BS as usize, 9));
    store
        .write(0, Bytes::from(old.clone()), false)
        .await
        .unwrap();
    store.create_snapshot("s1").await.expect("snapshot");
    store
        .write(0, Bytes::from(new.clone()), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    let view = store.snapshot_view("s1").expect("view");
    assert_eq!(read_bytes(&view, 0, BS).await, old);
    drop((view, store));
    // After a restart every block is a GET through the codec, in both layers.
    let store = open_with(&mem, cfg(), big_budget()).await;
    assert_eq!(read_bytes(&store, 0, BS).await, new);
    let view = store.snapshot_view("s1").expect("view");
    assert_eq!(read_bytes(&view, 0, BS).await, old);
    for (key, object) in mem
        .keys()
        .iter()
        .filter_map(|k| Some((k.clone(), mem.peek(k)?)))
    {
        if !key.ends_with(".json") {
            assert_eq!(&object[..4], b"NBS3", "{key} is an encoded block");
        }
    }
}
