use super::*;

#[test]
fn greeting_bytes() {
    let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}

#[test]
fn option_replies() {
    let mut v = Vec::new();
    option_reply(&mut v, OPT_LIST, REP_ACK, b"");
    assert_eq!(v.len(), 20);
    assert_eq!(&v[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&v[12..16], &REP_ACK.to_be_bytes());
    v.clear();
    list_entry(&mut v, "vm1", Some("d"));
    assert_eq!(&v[16..20], &8u32.to_be_bytes());
    assert_eq!(&v[20..], b"\0\0\0\x03vm1d");
    v.clear();
    info_export(&mut v, OPT_GO, 1 << 30, 0x1234);
    assert_eq!(v.len(), 20 + 12);
    assert_eq!(&v[20..22], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&v[22..30], &(1u64 << 30).to_be_bytes());
    v.clear();
    info_block_size(&mut v, OPT_GO, 1, 4096, MAX_PAYLOAD);
    assert_eq!(v.len(), 34);
    v.clear();
    meta_context(&mut v, OPT_SET_META_CONTEXT, 1, META_BASE_ALLOCATION);
    assert_eq!(&v[16..20], &(4 + 15u32).to_be_bytes());
}

#[test]
fn export_name_reply_zeroes() {
    let mut v = Vec::new();
    export_name_reply(&mut v, 10, 1, false);
    assert_eq!(v.len(), 134);
    v.clear();
    export_name_reply(&mut v, 10, 1, true);
    assert_eq!(v.len(), 10);
}

#[test]
fn transmission_replies_fit_fixed_buffers() {
    let mut arr = [0u8; 64];
    let mut s = &mut arr[..];
    offset_hole(&mut s, REPLY_FLAG_DONE, 9, 4096, 512);
    assert_eq!(64 - s.len(), 32);
    assert_eq!(&arr[4..6], &REPLY_FLAG_DONE.to_be_bytes());
    assert_eq!(&arr[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
    assert_eq!(&arr[8..16], &9u64.to_be_bytes());
    let mut v = Vec::new();
    offset_data_header(&mut v, 0, 1, 0, 100);
    assert_eq!(&v[16..20], &108u32.to_be_bytes());
    v.clear();
    simple_reply(&mut v, EINVAL, 5);
    assert_eq!(v.len(), SIMPLE_HEADER_LEN);
    v.clear();
    block_status(&mut v, 3, 1, &[(4096, 3), (100, 0)]);
    assert_eq!(v.len(), CHUNK_HEADER_LEN + 4 + 16);
    v.clear();
    error_chunk(&mut v, 3, EIO, &"é".repeat(3000));
    let msg_len = u16::from_be_bytes([v[24], v[25]]) as usize;
    assert!(msg_len <= MAX_STRING && std::str::from_utf8(&v[26..]).is_ok());
    assert_eq!(v.len(), 26 + msg_len);
}
