//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable-Rust property tests:
//! they drive the parsers exactly as the server does, on arbitrary bytes, and check the
//! invariants the server relies on. Any panic here is a bug.

use super::consts::*;
use super::handshake::{parse_option, parse_option_header, ClientOption, PayloadPlan};
use super::request::{parse_header, validate, Command, Limits};

/// Feeds a byte stream through the option loop: header, payload plan, payload parse.
pub fn options(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= OPTION_HEADER_LEN {
        let (head, tail) = rest.split_at(OPTION_HEADER_LEN);
        let mut hb = [0u8; OPTION_HEADER_LEN];
        hb.copy_from_slice(head);
        // Let the fuzzer hit the magic check as well as everything behind it.
        if hb[0] & 1 == 1 {
            hb[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        }
        // ... and steer most options towards the numbers that have payload parsers.
        if hb[0] & 2 == 2 {
            hb[8..11].fill(0);
            hb[11] %= 16;
            hb[12..14].fill(0);
        }
        let Ok(h) = parse_option_header(&hb) else {
            return;
        };
        let Ok(plan) = h.payload_plan() else { return };
        let take = (h.length as usize).min(tail.len());
        let (payload, next) = tail.split_at(take);
        rest = next;
        if plan == PayloadPlan::SkipTooBig {
            continue;
        }
        if let Ok(opt) = parse_option(h.option, payload) {
            check_option(&opt, payload.len());
        }
    }
}

fn check_option(opt: &ClientOption, len: usize) {
    match opt {
        ClientOption::Info(r) | ClientOption::Go(r) => {
            assert!(r.name.len() <= MAX_STRING && r.name.len() + 6 + 2 * r.info.len() == len);
        }
        ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
            assert!(m
                .queries
                .iter()
                .all(|q| q.contains(':') && q.len() <= MAX_STRING));
        }
        ClientOption::ExportName(n) => assert!(n.len() <= MAX_STRING && !n.contains('\0')),
        _ => {}
    }
}

/// Feeds bytes through request parsing and validation; the first byte picks the limits.
pub fn request(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        export_size: if sel & 8 == 0 {
            1 << 30
        } else {
            u64::MAX - u64::from(sel)
        },
        read_only: sel & 1 != 0,
        structured: sel & 2 != 0,
        block_status: sel & 4 != 0,
    };
    for chunk in rest.chunks_exact(REQUEST_HEADER_LEN) {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b.copy_from_slice(chunk);
        if sel & 16 != 0 {
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let Ok(h) = parse_header(&b) else { return };
        assert_eq!(parse_header(&h.encode()), Ok(h));
        let payload = h.payload_len();
        if let Ok(req) = validate(&h, &limits) {
            let end = req.offset.checked_add(u64::from(req.length));
            if !matches!(req.command, Command::Flush | Command::Disconnect) {
                assert!(end.is_some_and(|e| e <= limits.export_size));
            }
            if matches!(req.command, Command::Read | Command::Write) {
                assert!(req.length <= MAX_PAYLOAD);
            }
            assert!(!(limits.read_only && req.command.is_write()));
            assert!(payload.is_ok());
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// The seed corpora of the cargo-fuzz targets run through the same entry points.
    #[test]
    fn fuzz_seed_corpora_run_clean() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus");
        let mut seen = 0;
        for (target, entry) in [
            ("fuzz_options", super::options as fn(&[u8])),
            ("fuzz_request", super::request),
        ] {
            for file in std::fs::read_dir(format!("{root}/{target}")).unwrap() {
                entry(&std::fs::read(file.unwrap().path()).unwrap());
                seen += 1;
            }
        }
        assert!(seen >= 10, "seed corpora missing ({seen} files)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn options_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            super::options(&data);
        }

        #[test]
        fn requests_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            super::request(&data);
        }
    }
}
