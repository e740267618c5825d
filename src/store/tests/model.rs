//! Random operation sequences against a plain `Vec<u8>` model: whatever the mix of unaligned
//! writes, zeroing and flushes, reads match the model, a reopened store matches it, and no
//! stored object is a zero block or has the wrong size.

use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Zero { off: u64, len: u32 },
    Trim { off: u64, len: u32 },
    Read { off: u64, len: u32 },
    Flush,
}

const BLOCK: u32 = 512;
const SIZE: u64 = 16 * BLOCK as u64 - 100;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 0..=(SIZE - off).min(3 * 512 + 7)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len: len as u32 }),
        1 => range.clone().prop_map(|(off, len)| Op::Trim { off, len: len as u32 }),
        2 => range.prop_map(|(off, len)| Op::Read { off, len: len as u32 }),
        1 => Just(Op::Flush),
    ]
}

async fn run(ops: Vec<Op>) {
    let mem = Arc::new(MemoryStore::new());
    let budget = CacheBudget::new(6 * u64::from(BLOCK), 3 * u64::from(BLOCK));
    let store = open_with(&mem, config(BLOCK, SIZE), Arc::clone(&budget)).await;
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match op {
            Op::Write { off, len, seed } => {
                let mut data = pattern(len, seed);
                if seed % 4 == 0 {
                    data.fill(0); // zero data must behave like WRITE_ZEROES
                }
                store
                    .write(off, Bytes::from(data.clone()), seed % 3 == 0)
                    .await
                    .unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Zero { off, len } => {
                store.write_zeroes(off, len, false).await.unwrap();
                model[off as usize..off as usize + len as usize].fill(0);
            }
            Op::Trim { off, len } => {
                store.trim(off, len, true).await.unwrap();
                model[off as usize..off as usize + len as usize].fill(0);
            }
            Op::Read { off, len } => {
                let got = read_bytes(&store, off, len).await;
                assert_eq!(got, model[off as usize..off as usize + len as usize]);
            }
            Op::Flush => store.flush().await.unwrap(),
        }
        assert!(budget.used_bytes() <= budget.memory_limit());
    }
    store.flush().await.unwrap();
    for k in mem.keys().iter().filter(|k| *k != "t/nbd-s3.json") {
        let v = mem.peek(k).unwrap();
        assert_eq!(v.len(), BLOCK as usize, "{k}");
        assert!(v.iter().any(|b| *b != 0), "{k} stored as zeros");
    }
    drop(store);
    let again = open_with(&mem, config(BLOCK, SIZE), big_budget()).await;
    assert_eq!(read_bytes(&again, 0, SIZE as u32).await, model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_a_reference_vec(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}
