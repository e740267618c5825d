use super::*;
use proptest::prelude::*;

fn header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..].copy_from_slice(&length.to_be_bytes());
    b
}

fn invalid(opt: u32, data: &[u8]) -> bool {
    matches!(parse_option(opt, data), Err(ParseOptionError::Reply(e)) if e.reply_type() == REP_ERR_INVALID)
}

#[test]
fn client_flags_known_and_unknown() {
    let f = parse_client_flags(3).unwrap();
    assert!(f.fixed_newstyle && f.no_zeroes);
    assert!(!parse_client_flags(0).unwrap().fixed_newstyle);
    assert_eq!(
        parse_client_flags(4),
        Err(HandshakeError::UnknownClientFlags(4))
    );
    assert!(parse_client_flags(0x8000_0001).is_err());
}

#[test]
fn option_header_magic_and_plan() {
    let h = parse_option_header(&header(OPT_GO, 20)).unwrap();
    assert_eq!(
        h,
        OptionHeader {
            option: OPT_GO,
            length: 20
        }
    );
    assert_eq!(h.payload_plan(), Ok(PayloadPlan::Read));
    let mut bad = header(OPT_GO, 0);
    bad[0] ^= 1;
    assert!(matches!(
        parse_option_header(&bad),
        Err(HandshakeError::BadOptionMagic(_))
    ));
    let huge = parse_option_header(&header(OPT_LIST, 0xFFFF_FFF0)).unwrap();
    assert!(huge.payload_plan().is_err());
    let big = parse_option_header(&header(OPT_LIST, 8000)).unwrap();
    assert_eq!(big.payload_plan(), Ok(PayloadPlan::SkipTooBig));
    let name = parse_option_header(&header(OPT_EXPORT_NAME, 5000)).unwrap();
    assert!(name.payload_plan().is_err());
}

#[test]
fn simple_options() {
    assert_eq!(parse_option(OPT_ABORT, b"x"), Ok(ClientOption::Abort));
    assert_eq!(parse_option(OPT_LIST, b""), Ok(ClientOption::List));
    assert!(invalid(OPT_LIST, b"x"));
    assert!(invalid(OPT_STRUCTURED_REPLY, b"x"));
    assert!(invalid(OPT_STARTTLS, b"x"));
    assert_eq!(parse_option(OPT_STARTTLS, b""), Ok(ClientOption::StartTls));
    assert_eq!(
        parse_option(OPT_PEEK_EXPORT, b"abc"),
        Ok(ClientOption::Unknown(OPT_PEEK_EXPORT))
    );
    assert_eq!(parse_option(999, b""), Ok(ClientOption::Unknown(999)));
}

#[test]
fn export_name_rules() {
    assert_eq!(
        parse_option(OPT_EXPORT_NAME, b"vm1"),
        Ok(ClientOption::ExportName("vm1".into()))
    );
    assert!(matches!(
        parse_option(OPT_EXPORT_NAME, b"a\0b"),
        Err(ParseOptionError::Fatal(_))
    ));
    assert!(matches!(
        parse_option(OPT_EXPORT_NAME, &[0xff, 0xfe]),
        Err(ParseOptionError::Fatal(_))
    ));
    assert!(matches!(
        parse_option(OPT_EXPORT_NAME, &[b'a'; 4097]),
        Err(ParseOptionError::Fatal(_))
    ));
}

#[test]
fn info_and_go() {
    let data = encode_info_request("vm1", &[INFO_NAME, INFO_BLOCK_SIZE]);
    let want = InfoRequest {
        name: "vm1".into(),
        info: vec![INFO_NAME, INFO_BLOCK_SIZE],
    };
    assert_eq!(
        parse_option(OPT_GO, &data),
        Ok(ClientOption::Go(want.clone()))
    );
    assert_eq!(parse_option(OPT_INFO, &data), Ok(ClientOption::Info(want)));
    // name length that lies (bigger than the option)
    let mut lie = data.clone();
    lie[..4].copy_from_slice(&1000u32.to_be_bytes());
    assert!(invalid(OPT_GO, &lie));
    // count disagrees with length
    let mut extra = data.clone();
    extra.push(0);
    assert!(invalid(OPT_GO, &extra));
    assert!(invalid(OPT_GO, &data[..data.len() - 1]));
    assert!(invalid(OPT_INFO, b"\0\0"));
}

#[test]
fn meta_context_parsing() {
    let data = encode_meta_request("vm1", &["base:allocation", "qemu:dirty-bitmap:x"]);
    let ClientOption::SetMetaContext(m) = parse_option(OPT_SET_META_CONTEXT, &data).unwrap() else {
        panic!("wrong option")
    };
    assert_eq!(m.export, "vm1");
    assert_eq!(m.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
    assert!(invalid(
        OPT_LIST_META_CONTEXT,
        &encode_meta_request("vm1", &["nocolon"])
    ));
    let mut count_lie = encode_meta_request("vm1", &[]);
    let n = count_lie.len();
    count_lie[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(invalid(OPT_LIST_META_CONTEXT, &count_lie));
    let mut trailing = data.clone();
    trailing.push(1);
    assert!(invalid(OPT_SET_META_CONTEXT, &trailing));
}

proptest! {
    #[test]
    fn info_round_trip(name in "[a-zA-Z0-9/_.-]{0,64}", info in proptest::collection::vec(any::<u16>(), 0..16)) {
        let data = encode_info_request(&name, &info);
        prop_assert_eq!(parse_option(OPT_INFO, &data), Ok(ClientOption::Info(InfoRequest { name, info })));
    }

    #[test]
    fn meta_round_trip(export in "[a-z0-9]{0,32}", qs in proptest::collection::vec("[a-z]{1,8}:[a-z:]{0,16}", 0..8)) {
        let refs: Vec<&str> = qs.iter().map(String::as_str).collect();
        let data = encode_meta_request(&export, &refs);
        let parsed = parse_option(OPT_LIST_META_CONTEXT, &data);
        prop_assert_eq!(parsed, Ok(ClientOption::ListMetaContext(MetaContextRequest { export, queries: qs })));
    }

    #[test]
    fn option_parse_never_panics(option in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_option(option, &data);
    }

    #[test]
    fn option_header_round_trip(option in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let enc = encode_option(option, &data);
        let h = parse_option_header(enc[..OPTION_HEADER_LEN].try_into().unwrap()).unwrap();
        prop_assert_eq!(h, OptionHeader { option, length: data.len() as u32 });
    }
}
