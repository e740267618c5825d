//! Every kind of change passes the read-only and lease checks of `BlockStore::change`.

use super::*;

/// One change of every kind, each touching block 0 (whole-block and partial).
fn every_change() -> Vec<Change> {
    let bs = BS as usize;
    vec![
        Change::Write {
            offset: 10,
            data: Bytes::from(pattern(100, 1)),
            fua: false,
        },
        Change::Write {
            offset: 0,
            data: Bytes::from(pattern(bs, 2)),
            fua: true,
        },
        Change::WriteBlocks {
            offset: 0,
            blocks: vec![pattern(bs, 3).into_boxed_slice()],
            fua: false,
        },
        Change::Trim {
            offset: 0,
            len: BS,
            fua: false,
        },
        Change::Zero {
            offset: 5,
            len: 10,
            fua: true,
        },
    ]
}

#[derive(Debug)]
struct Closed;
impl WriteGate for Closed {
    fn check(&self) -> Result<(), String> {
        Err("lease lost".into())
    }
}

#[tokio::test]
async fn a_closed_write_gate_refuses_every_change_and_flush() {
    let mem = Arc::new(MemoryStore::new());
    let data = pattern(BS as usize, 9);
    mem.insert(&key(0), Bytes::from(data.clone()));
    let store = open(&mem, 4).await;
    store.set_write_gate(Arc::new(Closed));
    for change in every_change().into_iter().chain([Change::Flush]) {
        let what = format!("{change:?}").chars().take(40).collect::<String>();
        let err = store.change(change).await.expect_err(&what);
        assert_eq!(err.kind(), ErrorKind::Fenced, "{what}: {err}");
    }
    assert_eq!(store.dirty_bytes(), 0, "a refused change reached the cache");
    assert_eq!(read_bytes(&store, 0, BS).await, data);
    assert_eq!(mem.puts() + mem.deletes(), 0);
}

#[tokio::test]
async fn a_read_only_export_refuses_every_change_but_flushes() {
    let mem = Arc::new(MemoryStore::new());
    let data = pattern(BS as usize, 9);
    mem.insert(&key(0), Bytes::from(data.clone()));
    let mut cfg = config(BS, 4 * u64::from(BS));
    cfg.read_only = true;
    let store = open_with(&mem, cfg, big_budget()).await;
    for change in every_change() {
        let what = format!("{change:?}").chars().take(40).collect::<String>();
        let err = store.change(change).await.expect_err(&what);
        assert_eq!(err.kind(), ErrorKind::ReadOnly, "{what}: {err}");
    }
    store
        .change(Change::Flush)
        .await
        .expect("flush of a read-only export");
    assert_eq!(store.dirty_bytes(), 0);
    assert_eq!(read_bytes(&store, 0, BS).await, data);
}
