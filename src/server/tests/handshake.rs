//! Negotiation: every option, every malformed case, and the limits.

use super::*;

fn names(replies: &[OptReply]) -> Vec<String> {
    replies
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect()
}

fn info_of(replies: &[OptReply], kind: u16) -> Option<&[u8]> {
    replies
        .iter()
        .find(|r| r.kind == REP_INFO && r.data[..2] == kind.to_be_bytes())
        .map(|r| &r.data[2..])
}

#[tokio::test]
async fn list_shows_servable_exports_and_rejects_data() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    let r = c.opt_all(OPT_LIST, b"").await;
    assert_eq!(names(&r), vec!["disk", "ro"]);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let r = c.opt_all(OPT_LIST, b"junk").await;
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    // still negotiating
    assert_eq!(c.go_full("disk", false, false).await.0, SIZE);
}

#[tokio::test]
async fn info_then_go_report_the_same() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    let req = encode_info_request("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77]);
    let info = c.opt_all(OPT_INFO, &req).await;
    assert_eq!(info.last().unwrap().kind, REP_ACK);
    assert_eq!(info_of(&info, INFO_NAME), Some(&b"disk"[..]));
    assert_eq!(
        info_of(&info, INFO_DESCRIPTION),
        Some(&b"disk description"[..])
    );
    let bs = info_of(&info, INFO_BLOCK_SIZE).unwrap();
    assert_eq!(
        bs,
        [1u32, BLOCK, MAX_PAYLOAD]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>()
    );
    let export = info_of(&info, INFO_EXPORT).unwrap().to_vec();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes([export[8], export[9]]);
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
        TFLAG_SEND_CACHE,
        TFLAG_SEND_FAST_ZERO,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(
        flags & (TFLAG_READ_ONLY | TFLAG_SEND_DF),
        0,
        "DF only with structured replies"
    );
    let go = c.opt_all(OPT_GO, &req).await;
    assert_eq!(info_of(&go, INFO_EXPORT).unwrap(), &export[..]);
    assert_eq!(go.last().unwrap().kind, REP_ACK);
    // in transmission now: a FLUSH is answered
    c.request(CMD_FLUSH, 0, 9, 0, 0).await;
    assert_eq!(c.simple().await, (0, 9));
}

#[tokio::test]
async fn read_only_and_structured_flags() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    let (_, flags) = c.go_full("ro", true, false).await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    assert_eq!(flags & TFLAG_SEND_TRIM, 0);
}

#[tokio::test]
async fn unknown_and_refused_exports() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    let r = c.opt_all(OPT_GO, &encode_info_request("nope", &[])).await;
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    let r = c.opt_all(OPT_INFO, &encode_info_request("bad", &[])).await;
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("block size mismatch"));
    // several exports: no default export
    let r = c.opt_all(OPT_GO, &encode_info_request("", &[])).await;
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    c.opt(OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    c.opt(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.u64().await, SIZE);
    assert_ne!(c.u16().await & TFLAG_HAS_FLAGS, 0);
    c.request(CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(c.simple().await, (0, 1));

    let mut c = Client::raw(&f.addr).await;
    c.write(&1u32.to_be_bytes()).await;
    c.opt(OPT_EXPORT_NAME, b"disk").await;
    let reply = c.read_n(134).await;
    assert!(reply[10..].iter().all(|&b| b == 0));
    c.request(CMD_FLUSH, 0, 2, 0, 0).await;
    assert_eq!(c.simple().await, (0, 2));
}

#[tokio::test]
async fn policy_unsupported_and_abort() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    assert_eq!(c.opt_all(OPT_STARTTLS, b"").await[0].kind, REP_ERR_POLICY);
    assert_eq!(
        c.opt_all(OPT_EXTENDED_HEADERS, b"").await[0].kind,
        REP_ERR_UNSUP
    );
    assert_eq!(c.opt_all(OPT_PEEK_EXPORT, b"").await[0].kind, REP_ERR_UNSUP);
    assert_eq!(c.opt_all(0x1234, &[7u8; 300]).await[0].kind, REP_ERR_UNSUP);
    // oversized but skippable: ERR_TOO_BIG and negotiation continues
    assert_eq!(
        c.opt_all(OPT_LIST, &[0u8; 8000]).await[0].kind,
        REP_ERR_TOO_BIG
    );
    assert_eq!(c.opt_all(OPT_ABORT, b"").await[0].kind, REP_ACK);
    c.expect_closed().await;
}

#[tokio::test]
async fn meta_contexts() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    let set = encode_meta_request("disk", &[META_BASE_ALLOCATION]);
    assert_eq!(
        c.opt_all(OPT_SET_META_CONTEXT, &set).await[0].kind,
        REP_ERR_INVALID
    );
    assert_eq!(c.opt_all(OPT_STRUCTURED_REPLY, b"").await[0].kind, REP_ACK);
    assert_eq!(
        c.opt_all(OPT_STRUCTURED_REPLY, b"x").await[0].kind,
        REP_ERR_INVALID
    );
    let list = c
        .opt_all(OPT_LIST_META_CONTEXT, &encode_meta_request("disk", &[]))
        .await;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].kind, REP_META_CONTEXT);
    assert_eq!(&list[0].data[4..], META_BASE_ALLOCATION.as_bytes());
    let list = c
        .opt_all(
            OPT_LIST_META_CONTEXT,
            &encode_meta_request("disk", &["base:"]),
        )
        .await;
    assert_eq!(list[0].kind, REP_META_CONTEXT);
    let other = c
        .opt_all(
            OPT_SET_META_CONTEXT,
            &encode_meta_request("disk", &["qemu:dirty-bitmap:a"]),
        )
        .await;
    assert_eq!(other.len(), 1, "unknown namespaces are ignored");
    let bad = c
        .opt_all(
            OPT_SET_META_CONTEXT,
            &encode_meta_request("disk", &["nocolon"]),
        )
        .await;
    assert_eq!(bad[0].kind, REP_ERR_INVALID);
    let unknown = c
        .opt_all(
            OPT_SET_META_CONTEXT,
            &encode_meta_request("nope", &[META_BASE_ALLOCATION]),
        )
        .await;
    assert_eq!(unknown[0].kind, REP_ERR_UNKNOWN);
    let set = c
        .opt_all(
            OPT_SET_META_CONTEXT,
            &encode_meta_request("disk", &["qemu:x", META_BASE_ALLOCATION]),
        )
        .await;
    assert_eq!(set.len(), 2);
    assert_eq!(&set[0].data[..4], &1u32.to_be_bytes());
    c.go_full("disk", false, false).await;
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 4096).await;
    assert_eq!(c.chunks().await[0].kind, REPLY_TYPE_BLOCK_STATUS);
}

#[tokio::test]
async fn lying_lengths_get_err_invalid() {
    let f = fixture().await;
    let mut c = Client::connect(&f.addr).await;
    let mut lie = encode_info_request("disk", &[]);
    lie[..4].copy_from_slice(&100u32.to_be_bytes());
    assert_eq!(c.opt_all(OPT_GO, &lie).await[0].kind, REP_ERR_INVALID);
    let mut count = encode_info_request("disk", &[1]);
    count.pop();
    assert_eq!(c.opt_all(OPT_INFO, &count).await[0].kind, REP_ERR_INVALID);
    assert_eq!(c.go_full("disk", false, false).await.0, SIZE);
}

#[tokio::test]
async fn hostile_handshakes_close_only_themselves() {
    let f = fixture().await;
    let mut good = Client::connect(&f.addr).await;

    let mut c = Client::raw(&f.addr).await;
    c.write(&0x80u32.to_be_bytes()).await;
    c.expect_closed().await;

    let mut c = Client::connect(&f.addr).await;
    let mut h = encode_option(OPT_LIST, b"");
    h[12..16].copy_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    c.write(&h).await;
    c.expect_closed().await;

    let mut c = Client::connect(&f.addr).await;
    c.write(b"NOTMAGIC\0\0\0\x03\0\0\0\0").await;
    c.expect_closed().await;

    let mut c = Client::connect(&f.addr).await;
    let many: Vec<u8> = (0..300).flat_map(|_| encode_option(0x99, b"")).collect();
    c.write(&many).await;
    for _ in 0..super::super::handshake::MAX_OPTIONS {
        assert_eq!(c.opt_reply().await.kind, REP_ERR_UNSUP);
    }
    c.expect_closed().await;

    assert_eq!(good.go_full("disk", true, true).await.0, SIZE);
    f.wait_connections(1).await;
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let server = Server::new(registry().await);
    let (client, srv) = tokio::io::duplex(4096);
    let (mut cr, _cw) = tokio::io::split(client);
    let conn = crate::server::listener::Accepted {
        stream: Box::new(srv),
        peer: crate::server::listener::Peer::Unix("unix:test".into()),
    };
    let inner = Arc::clone(&server.inner);
    let started = tokio::time::Instant::now();
    let task =
        tokio::spawn(
            async move { crate::server::connection::serve_connection(&inner, conn).await },
        );
    let mut greeting = [0u8; 18];
    cr.read_exact(&mut greeting).await.unwrap();
    // the client never answers; the (virtual) clock runs to the timeout
    tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("handshake never timed out")
        .unwrap();
    assert!(started.elapsed() >= crate::server::HANDSHAKE_TIMEOUT);
    let mut rest = Vec::new();
    cr.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}
