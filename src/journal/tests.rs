use super::*;
use std::sync::Arc;
use std::time::Duration;

fn write(offset: u64, byte: u8, len: usize) -> Entry {
    Entry::Write {
        offset,
        data: vec![byte; len],
    }
}

async fn append_all(j: &Journal, entries: &[Entry], seq: u64) {
    for e in entries {
        if matches!(e, Entry::Flush) {
            let pos = j.mark_flush(seq);
            j.sync(pos).await.expect("sync");
        } else {
            let room = j.reserve(e.as_kind().encoded_len() as u64, || {}).await;
            j.append(e.as_kind(), room, seq);
        }
    }
}

fn entries_of(s: &Scanned) -> Vec<Entry> {
    s.records.iter().map(|r| r.entry.clone()).collect()
}

#[tokio::test]
async fn synced_records_are_read_back_in_order_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let space = Space::new(8 << 20); // 1 MiB segments
    let j = Journal::create(dir.path(), 7, Arc::clone(&space)).expect("create");
    let mut list = Vec::new();
    for i in 0..40u64 {
        list.push(write(i * 65536, i as u8, 65536));
        if i % 10 == 9 {
            list.push(Entry::Flush);
        }
    }
    list.push(Entry::Zero {
        offset: 0,
        len: 4096,
    });
    list.push(Entry::Flush);
    append_all(&j, &list, 1).await;
    let stats = j.stats();
    assert!(stats.bytes >= 40 * 65536, "{stats:?}");
    drop(j);
    let scanned = scan(dir.path()).expect("scan");
    assert!(scanned.torn.is_none(), "{:?}", scanned.torn);
    assert!(scanned.files.len() > 2, "rolled: {:?}", scanned.files);
    assert_eq!(entries_of(&scanned), list);
    assert_eq!(scanned.records[0].number, 7);
    assert_eq!(scanned.next_number, 7 + list.len() as u64);
}

#[tokio::test]
async fn a_torn_tail_replays_up_to_the_last_whole_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::create(dir.path(), 0, Space::new(1 << 30)).expect("create");
    let list = vec![write(0, 1, 1000), write(4096, 2, 1000), Entry::Flush];
    append_all(&j, &list, 1).await;
    drop(j);
    let scanned = scan(dir.path()).expect("scan");
    let file = scanned.files.last().expect("a segment").clone();
    let len = std::fs::metadata(&file).expect("stat").len();
    // Cut into the middle of the second write's payload.
    let cut = len - record::HEADER as u64 - 500;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(cut))
        .expect("truncate");
    let scanned = scan(dir.path()).expect("scan");
    assert_eq!(entries_of(&scanned), list[..1].to_vec());
    assert!(scanned.torn.is_some());
}

#[tokio::test]
async fn segments_whose_changes_are_stored_are_deleted_and_their_space_returned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let space = Space::new(2 << 20);
    let j = Journal::create(dir.path(), 0, Arc::clone(&space)).expect("create");
    for i in 0..20u64 {
        // change numbers grow with the records
        let e = write(i * 65536, 1, 65536);
        let room = j.reserve(e.as_kind().encoded_len() as u64, || {}).await;
        j.append(e.as_kind(), room, i + 1);
    }
    let pos = j.mark_flush(21);
    j.sync(pos).await.expect("sync");
    let before = space.used();
    j.release(5, 21, false);
    tokio::time::timeout(Duration::from_secs(10), async {
        while space.used() == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("an early segment is freed");
    j.release(21, 21, true);
    tokio::time::timeout(Duration::from_secs(10), async {
        while space.used() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("everything stored: every segment goes");
    drop(j);
    // The writer thread deletes the files after the space is returned.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !scan(dir.path()).expect("scan").records.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no record is left");
}

#[test]
fn export_dirs_differ_for_every_bucket_and_prefix() {
    let root = std::path::Path::new("/j");
    let a = export_dir(root, "b", "vm1/");
    assert_eq!(a, export_dir(root, "b", "vm1/"));
    assert_ne!(a, export_dir(root, "b", "vm1_"));
    assert_ne!(a, export_dir(root, "bv", "m1/"));
    assert!(a.starts_with(root));
}
