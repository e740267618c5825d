use super::*;
use crate::config::EncryptionKey;
use rand::RngCore;

const BS: usize = 16384;

fn codec(zstd: bool, key: Option<u8>) -> Codec {
    let cfg = CodecConfig {
        compression: if zstd {
            Compression::Zstd { level: 3 }
        } else {
            Compression::Off
        },
        encryption: key.map(|k| EncryptionKey::from_bytes("/keys/vm1.key", [k; 32])),
    };
    Codec::new(&cfg, BS).expect("not plain")
}

fn text_block() -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(BS)
        .collect()
}

fn random_block() -> Vec<u8> {
    let mut b = vec![0u8; BS];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

#[test]
fn plain_exports_have_no_codec() {
    assert!(Codec::new(&CodecConfig::default(), BS).is_none());
}

#[test]
fn every_combination_round_trips_both_kinds_of_data() {
    for (zstd, key) in [(true, None), (false, Some(1)), (true, Some(1))] {
        let c = codec(zstd, key);
        for data in [text_block(), random_block()] {
            let enc = c.encode("id", 7, &data).expect("encode");
            assert_eq!(c.decode("id", 7, &enc.object).expect("decode"), data);
        }
    }
}

#[test]
fn compressible_blocks_shrink_and_incompressible_ones_are_stored_raw() {
    let c = codec(true, None);
    let enc = c.encode("id", 0, &text_block()).expect("encode");
    assert!(
        enc.compressed && enc.object.len() < BS / 10,
        "{}",
        enc.object.len()
    );
    let enc = c.encode("id", 0, &random_block()).expect("encode");
    assert!(!enc.compressed);
    assert_eq!(enc.object.len(), HEADER_LEN + BS);
    assert_eq!(enc.object[5], 0, "codec byte says raw");
}

#[test]
fn whether_a_block_is_compressed_depends_on_its_bytes_alone() {
    // Write-back encodes a flush's blocks many at a time, in no fixed order: a text block
    // after any run of random ones must compress all the same.
    let blocks: Vec<(u64, Vec<u8>)> = (0..48u64)
        .map(|i| {
            (
                i,
                if i % 3 == 0 {
                    text_block()
                } else {
                    random_block()
                },
            )
        })
        .collect();
    let outcome = |order: &[usize]| {
        let c = codec(true, None);
        let mut compressed = vec![false; blocks.len()];
        for &i in order {
            let (block, data) = &blocks[i];
            compressed[i] = c.encode("id", *block, data).expect("encode").compressed;
        }
        compressed
    };
    let forward: Vec<usize> = (0..blocks.len()).collect();
    let want: Vec<bool> = (0..48).map(|i| i % 3 == 0).collect();
    assert_eq!(outcome(&forward), want, "in block order");
    let mut randoms_first = forward.clone();
    randoms_first.sort_by_key(|&i| i % 3 == 0);
    assert_eq!(outcome(&randoms_first), want, "every random block first");
    let mut shuffled = forward;
    rand::seq::SliceRandom::shuffle(&mut shuffled[..], &mut rand::thread_rng());
    assert_eq!(outcome(&shuffled), want, "in the order {shuffled:?}");
}

#[test]
fn encrypted_objects_hold_no_plaintext_and_are_bound_to_their_place() {
    let c = codec(false, Some(1));
    let data = text_block();
    let enc = c.encode("export-a", 3, &data).expect("encode");
    assert!(!enc.object.windows(9).any(|w| w == b"quick bro"));
    let wrong_place = [("export-a", 4), ("export-b", 3)];
    for (id, block) in wrong_place {
        let err = c.decode(id, block, &enc.object).expect_err("moved");
        assert!(err.to_string().contains("/keys/vm1.key"), "{err}");
    }
    let err = codec(false, Some(2))
        .decode("export-a", 3, &enc.object)
        .expect_err("other key");
    assert!(matches!(err, DecodeError::Decrypt { .. }), "{err}");
    let mut flipped = enc.object.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert!(c.decode("export-a", 3, &flipped).is_err());
    let mut header_changed = enc.object.clone();
    header_changed[5] = 1; // claims zstd: the header is authenticated too
    assert!(c.decode("export-a", 3, &header_changed).is_err());
}

#[test]
fn an_encrypted_export_refuses_clear_objects_and_vice_versa() {
    let clear = codec(true, None)
        .encode("id", 0, &text_block())
        .expect("encode");
    let err = codec(true, Some(1))
        .decode("id", 0, &clear.object)
        .expect_err("planted clear text");
    assert!(matches!(err, DecodeError::Decrypt { .. }));
    let sealed = codec(true, Some(1))
        .encode("id", 0, &text_block())
        .expect("encode");
    let err = codec(true, None)
        .decode("id", 0, &sealed.object)
        .expect_err("no key");
    assert!(err.to_string().contains("no encryption_key_file"), "{err}");
}

#[test]
fn truncated_foreign_and_wrong_sized_objects_are_malformed() {
    let c = codec(true, None);
    let enc = c.encode("id", 0, &text_block()).expect("encode");
    for bad in [
        &enc.object[..enc.object.len() - 1],
        &enc.object[..HEADER_LEN],
        &enc.object[..3],
        &text_block()[..],
    ] {
        assert!(matches!(
            c.decode("id", 0, bad),
            Err(DecodeError::Malformed(_))
        ));
    }
    let other_size = Codec::new(
        &CodecConfig {
            compression: Compression::Zstd { level: 3 },
            encryption: None,
        },
        BS * 2,
    )
    .expect("codec");
    let err = other_size.decode("id", 0, &enc.object).expect_err("size");
    assert!(err.to_string().contains("expected 32768"), "{err}");
}

/// What one 128 KiB block costs the thread that encodes or decodes it (run with
/// `cargo test --release --lib -- --ignored --nocapture codec_cost`): the figure behind
/// running codec work on the blocking pool rather than on the async threads.
#[test]
#[ignore]
fn codec_cost_per_block() {
    const BLOCK: usize = 128 * 1024;
    let mut random = vec![0u8; BLOCK];
    rand::thread_rng().fill_bytes(&mut random);
    let mut half = random.clone();
    for chunk in half.chunks_mut(4096) {
        chunk[2048..].fill(0);
    }
    let cfg = |zstd: bool, key: bool| CodecConfig {
        compression: if zstd {
            Compression::Zstd { level: 3 }
        } else {
            Compression::Off
        },
        encryption: key.then(|| EncryptionKey::from_bytes("/k", [7; 32])),
    };
    for (name, zstd, key) in [
        ("zstd", true, false),
        ("encrypted", false, true),
        ("both", true, true),
    ] {
        for (kind, data) in [("random", &random), ("half", &half)] {
            // Random data costs only the attempt on its sample.
            let c = Codec::new(&cfg(zstd, key), BLOCK).expect("codec");
            let n = 2000u32;
            let t = std::time::Instant::now();
            let mut last = None;
            for i in 0..n {
                last = Some(c.encode("id", u64::from(i), data).expect("encode"));
            }
            let enc = t.elapsed() / n;
            let obj = last.expect("encoded").object;
            let t = std::time::Instant::now();
            for _ in 0..n {
                c.decode("id", u64::from(n - 1), &obj).expect("decode");
            }
            let dec = t.elapsed() / n;
            eprintln!(
                "{name:<10}{kind:<7} encode {enc:>9.1?}  decode {dec:>9.1?}  stored {} bytes",
                obj.len()
            );
        }
    }
    for (kind, data) in [("random", &random), ("half", &half)] {
        let t = std::time::Instant::now();
        for _ in 0..2000 {
            let mut out = Vec::new();
            compress::compress_into(3, data, &mut out);
        }
        eprintln!("one zstd:3 attempt on {kind}: {:.1?}", t.elapsed() / 2000);
    }
}
