//! Transmission: every command, simple and structured replies, the errno table, pipelining
//! and the hostile cases.

use super::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn simple_client(f: &Fixture, export: &str) -> Client {
    let mut c = Client::connect(&f.addr).await;
    c.go_full(export, false, false).await;
    c
}

#[tokio::test]
async fn write_then_read_with_simple_replies() {
    let f = fixture().await;
    let mut c = simple_client(&f, "disk").await;
    let data = pattern(100_000, 1);
    assert_eq!(c.write_data(1, 1000, &data, 0).await, 0);
    c.request(CMD_READ, 0, 2, 0, 200_000).await;
    assert_eq!(c.simple().await, (0, 2));
    let back = c.read_n(200_000).await;
    assert!(back[..1000].iter().all(|&b| b == 0));
    assert_eq!(&back[1000..101_000], &data[..]);
    assert!(back[101_000..].iter().all(|&b| b == 0));
    // zero-length read: header only
    c.request(CMD_READ, 0, 3, 0, 0).await;
    assert_eq!(c.simple().await, (0, 3));
    c.request(CMD_FLUSH, 0, 4, 0, 0).await;
    assert_eq!(c.simple().await, (0, 4));
}

#[tokio::test]
async fn structured_read_has_data_and_hole_chunks() {
    let f = fixture().await;
    let mut c = f.structured().await;
    let data = pattern(BLOCK as usize, 7);
    assert_eq!(
        c.write_data(1, u64::from(BLOCK), &data, CMD_FLAG_FUA).await,
        0
    );
    let len = 3 * BLOCK;
    c.request(CMD_READ, 0, 2, 0, len).await;
    let chunks = c.chunks().await;
    assert!(
        chunks.iter().any(|ch| ch.kind == REPLY_TYPE_OFFSET_HOLE),
        "holes are sent as OFFSET_HOLE"
    );
    assert!(chunks.iter().any(|ch| ch.kind == REPLY_TYPE_OFFSET_DATA));
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|ch| ch.flags & REPLY_FLAG_DONE == 0));
    let back = c.read_structured(3, 0, len, 0).await;
    assert_eq!(&back[BLOCK as usize..2 * BLOCK as usize], &data[..]);
    assert!(back[..BLOCK as usize].iter().all(|&b| b == 0));
    // DF: a single data chunk
    c.request(CMD_READ, CMD_FLAG_DF, 4, 0, len).await;
    let df = c.chunks().await;
    assert_eq!(df.len(), 1);
    assert_eq!(df[0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&df[0].data[8..], &back[..]);
    // zero-length read: one NONE chunk
    c.request(CMD_READ, 0, 5, 10, 0).await;
    let none = c.chunks().await;
    assert_eq!((none.len(), none[0].kind), (1, REPLY_TYPE_NONE));
}

#[tokio::test]
async fn trim_zero_and_block_status() {
    let f = fixture().await;
    let mut c = f.structured().await;
    let b = u64::from(BLOCK);
    assert_eq!(
        c.write_data(1, 0, &pattern(2 * BLOCK as usize, 3), 0).await,
        0
    );
    c.request(CMD_TRIM, 0, 2, 100, BLOCK).await;
    assert_eq!(c.simple().await, (0, 2));
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        3,
        b + 50_000,
        100,
    )
    .await;
    assert_eq!(c.simple().await, (0, 3));
    let back = c.read_structured(4, 0, 2 * BLOCK, 0).await;
    assert!(back[100..100 + BLOCK as usize].iter().all(|&x| x == 0));
    assert!(back[50_000 + BLOCK as usize..50_100 + BLOCK as usize]
        .iter()
        .all(|&x| x == 0));
    assert_eq!(back[99], pattern(200, 3)[99]);

    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 4 * BLOCK).await;
    let st = c.chunks().await;
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].kind, REPLY_TYPE_BLOCK_STATUS);
    let d = &st[0].data;
    assert_eq!(&d[..4], &1u32.to_be_bytes());
    let descs: Vec<(u32, u32)> = d[4..]
        .chunks(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(descs.iter().map(|x| u64::from(x.0)).sum::<u64>(), 4 * b);
    assert_eq!(
        descs.last().unwrap().1,
        STATE_HOLE | STATE_ZERO,
        "{descs:?}"
    );
    assert_eq!(descs[0].1, 0, "{descs:?}");
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 6, 0, 100)
        .await;
    let one = c.chunks().await;
    assert_eq!(one[0].data.len(), 12);
    assert!(u32::from_be_bytes(one[0].data[4..8].try_into().unwrap()) <= 100);
    c.request(CMD_CACHE, 0, 7, 0, BLOCK).await;
    assert_eq!(c.simple().await, (0, 7));
}

#[tokio::test]
async fn errno_table_on_the_wire() {
    let f = fixture().await;
    let mut c = f.structured().await;
    // READ past the end: EINVAL as an error chunk
    c.request(CMD_READ, 0, 1, SIZE - 10, 20).await;
    let e = c.chunks().await;
    assert_eq!(e[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(&e[0].data[..4], &EINVAL.to_be_bytes());
    // WRITE past the end: ENOSPC, payload consumed
    assert_eq!(c.write_data(2, SIZE - 10, &[1u8; 20], 0).await, ENOSPC);
    c.request(CMD_WRITE_ZEROES, 0, 3, u64::MAX - 5, 10).await;
    assert_eq!(c.simple().await, (ENOSPC, 3));
    c.request(CMD_TRIM, 0, 4, SIZE, 1).await;
    assert_eq!(c.simple().await, (EINVAL, 4));
    c.request(42, 0, 5, 0, 0).await;
    assert_eq!(c.simple().await, (EINVAL, 5));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_DF, 6, 0, 1).await;
    assert_eq!(c.simple().await, (EINVAL, 6));
    c.request(CMD_FLUSH, 0x40, 7, 0, 0).await;
    assert_eq!(c.simple().await, (EINVAL, 7));
    c.request(CMD_READ, 0, 8, 0, 33 << 20).await;
    assert_eq!(c.chunks().await[0].kind, REPLY_TYPE_ERROR);
    // zero-length requests get replies
    assert_eq!(c.write_data(9, 0, &[], 0).await, 0);
    c.request(CMD_TRIM, 0, 10, 0, 0).await;
    assert_eq!(c.simple().await, (0, 10));
    // the connection still works
    assert_eq!(c.write_data(11, 0, b"ok", 0).await, 0);
    assert_eq!(c.read_structured(12, 0, 2, 0).await, b"ok");
}

#[tokio::test]
async fn read_only_refuses_writes_and_keeps_sync() {
    let f = fixture().await;
    let mut c = simple_client(&f, "ro").await;
    assert_eq!(c.write_data(1, 0, &[9u8; 4096], 0).await, EPERM);
    c.request(CMD_TRIM, 0, 2, 0, 4096).await;
    assert_eq!(c.simple().await, (EPERM, 2));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096).await;
    assert_eq!(c.simple().await, (EPERM, 3));
    // DF without structured replies, block status without a context
    c.request(CMD_READ, CMD_FLAG_DF, 4, 0, 1).await;
    assert_eq!(c.simple().await, (EINVAL, 4));
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 1).await;
    assert_eq!(c.simple().await, (EINVAL, 5));
    c.request(CMD_READ, 0, 6, 0, 4).await;
    assert_eq!(c.simple().await, (0, 6));
    assert_eq!(c.read_n(4).await, vec![0; 4]);
}

#[tokio::test]
async fn pipelined_requests_all_answered() {
    let f = fixture().await;
    let mut c = f.structured().await;
    let mut batch = Vec::new();
    for i in 0..64u64 {
        let h = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1000 + i,
            offset: i * 4096,
            length: 4096,
        };
        batch.extend_from_slice(&h.encode());
        batch.extend_from_slice(&pattern(4096, i as u8));
    }
    c.write(&batch).await;
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..64 {
        let (errno, cookie) = c.simple().await;
        assert_eq!(errno, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (1000..1064).collect::<Vec<_>>());
    for i in [0u64, 17, 63] {
        assert_eq!(
            c.read_structured(i, i * 4096, 4096, 0).await,
            pattern(4096, i as u8)
        );
    }
}

#[tokio::test]
async fn disc_waits_for_outstanding_requests() {
    let f = fixture().await;
    let mut c = simple_client(&f, "disk").await;
    let mut batch = Vec::new();
    for i in 0..8u64 {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: i,
            offset: i * 65536,
            length: 65536,
        };
        batch.extend_from_slice(&h.encode());
        batch.extend_from_slice(&pattern(65536, 1));
    }
    batch.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: CMD_DISC,
            cookie: 99,
            offset: 0,
            length: 0,
        }
        .encode(),
    );
    c.write(&batch).await;
    for _ in 0..8 {
        assert_eq!(c.simple().await.0, 0);
    }
    c.expect_closed().await;
    f.wait_connections(0).await;
}

#[tokio::test]
async fn hostile_transmission_closes_only_that_connection() {
    let f = fixture().await;
    let mut good = f.structured().await;

    let mut bad = f.structured().await;
    bad.write(&[0xAB; 28]).await;
    bad.expect_closed().await;

    let mut big = f.structured().await;
    big.request(CMD_WRITE, 0, 1, 0, (32 << 20) + 1).await;
    big.expect_closed().await;

    let mut dies = f.structured().await;
    dies.request(CMD_WRITE, 0, 1, 0, 65536).await;
    dies.write(&[1u8; 1000]).await;
    drop(dies);

    f.wait_connections(1).await;
    assert_eq!(good.write_data(1, 0, b"still fine", 0).await, 0);
    let mut fresh = f.structured().await;
    assert_eq!(fresh.read_structured(2, 0, 10, 0).await, b"still fine");
}

#[tokio::test]
async fn unix_socket_listener_replaces_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    // a stale socket file from a "crashed" server
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::new(registry().await);
    let listener = Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .expect("bind over stale socket");
    assert_eq!(listener.local_addr(), format!("unix:{}", path.display()));
    // a live one is refused
    assert!(Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .is_err());
    let handle = server.spawn_listener(listener);
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s.write_all(&encode_option(OPT_ABORT, b"")).await.unwrap();
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(&ack[12..16], &REP_ACK.to_be_bytes());
    handle.close();
}

#[tokio::test]
async fn violation_closes_even_when_the_client_never_reads() {
    let f = fixture().await;
    // simple replies: holes are sent as real zero bytes
    let mut c = simple_client(&f, "disk").await;
    let mut batch = Vec::new();
    for i in 0..64u64 {
        let h = RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie: i,
            offset: 0,
            length: 1 << 20,
        };
        batch.extend_from_slice(&h.encode());
    }
    // 64 MiB of replies nobody reads (more than any socket buffer), then garbage.
    batch.extend_from_slice(&[0xFF; 28]);
    c.write(&batch).await;
    f.wait_connections(0).await;
}
