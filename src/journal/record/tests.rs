use super::*;
use proptest::prelude::*;

fn entries() -> Vec<Entry> {
    vec![
        Entry::Write {
            offset: 4096,
            data: vec![7; 100],
        },
        Entry::Zero {
            offset: 1 << 40,
            len: 65536,
        },
        Entry::Flush,
        Entry::Write {
            offset: 0,
            data: vec![],
        },
    ]
}

fn encoded(list: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in list.iter().enumerate() {
        encode_entry(&mut out, i as u64 + 10, e);
    }
    out
}

fn read_all(bytes: &[u8]) -> (Vec<Record>, Stop) {
    let mut r = bytes;
    let mut out = Vec::new();
    loop {
        match read(&mut r).expect("reading a slice cannot fail") {
            Ok(rec) => out.push(rec),
            Err(stop) => return (out, stop),
        }
    }
}

#[test]
fn records_round_trip_in_order() {
    let list = entries();
    let bytes = encoded(&list);
    assert_eq!(
        bytes.len(),
        list.iter().map(Entry::encoded_len).sum::<usize>()
    );
    let (got, stop) = read_all(&bytes);
    assert_eq!(stop, Stop::End);
    let want: Vec<Record> = list
        .into_iter()
        .enumerate()
        .map(|(i, entry)| Record {
            number: i as u64 + 10,
            entry,
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_tail_cut_anywhere_replays_up_to_the_last_whole_record() {
    let list = entries();
    let bytes = encoded(&list);
    let mut ends = vec![0];
    for e in &list {
        ends.push(ends.last().copied().unwrap_or(0) + e.encoded_len());
    }
    for cut in 0..bytes.len() {
        let (got, stop) = read_all(&bytes[..cut]);
        let whole = ends.iter().filter(|&&end| end <= cut).count() - 1;
        assert_eq!(got.len(), whole, "cut at {cut}");
        let at_boundary = ends.contains(&cut);
        assert_eq!(stop == Stop::End, at_boundary, "cut at {cut}: {stop:?}");
    }
}

#[test]
fn a_flipped_bit_stops_replay_at_that_record() {
    let list = entries();
    let bytes = encoded(&list);
    let first = list[0].encoded_len();
    for byte in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[byte] ^= 0x10;
        let (got, stop) = read_all(&bad);
        assert!(matches!(stop, Stop::Torn(_)), "byte {byte}: {stop:?}");
        let expect = usize::from(byte >= first);
        // A flip in a later record keeps the records before it; never a changed record.
        assert!(got.len() >= expect, "byte {byte}");
        for (i, rec) in got.iter().enumerate() {
            assert_eq!(rec.entry, list[i], "byte {byte}");
        }
    }
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let mut bytes = Vec::new();
    encode_entry(&mut bytes, 1, &Entry::Zero { offset: 0, len: 1 });
    bytes[4] = 1; // turn it into a write claiming a huge payload
    bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    let (got, stop) = read_all(&bytes);
    assert!(got.is_empty());
    assert!(
        matches!(stop, Stop::Torn(ref m) if m.contains("too long")),
        "{stop:?}"
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_never_yield_unchecked_records(
        bytes in proptest::collection::vec(any::<u8>(), 0..300)
    ) {
        let (got, _) = read_all(&bytes);
        // Whatever decoded re-encodes to exactly the bytes it came from (checksum held).
        let mut again = Vec::new();
        for r in &got {
            encode_entry(&mut again, r.number, &r.entry);
        }
        prop_assert_eq!(&bytes[..again.len()], &again[..]);
    }

    #[test]
    fn valid_records_followed_by_garbage_keep_every_valid_record(
        writes in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let list: Vec<Entry> = writes
            .into_iter()
            .map(|(offset, data)| Entry::Write { offset, data })
            .collect();
        let mut bytes = encoded(&list);
        bytes.extend_from_slice(&garbage);
        let (got, _) = read_all(&bytes);
        prop_assert!(got.len() >= list.len());
        for (i, e) in list.iter().enumerate() {
            prop_assert_eq!(&got[i].entry, e);
        }
    }
}
