//! Shutdown: new work is refused, in-flight work finishes, connections go away.

use super::*;
use crate::test_support::wait_until;

#[tokio::test]
async fn shutdown_refuses_new_options_and_closes_idle_connections() {
    let f = fixture().await;
    let mut negotiating = Client::connect(&f.addr).await;
    assert_eq!(
        negotiating
            .opt_all(OPT_LIST, b"")
            .await
            .last()
            .unwrap()
            .kind,
        REP_ACK
    );
    let mut idle = f.structured().await;
    assert_eq!(idle.write_data(1, 0, b"x", 0).await, 0);
    f.wait_connections(2).await;

    let server = f.server.clone();
    let stop = tokio::spawn(async move { server.shutdown(Duration::from_secs(5)).await });
    // idle connections close; the listener stops accepting
    negotiating.expect_closed().await;
    idle.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("shutdown returned")
        .unwrap();
    assert_eq!(f.server.connection_count(), 0);
    assert!(
        TcpStream::connect(&f.addr).await.is_err(),
        "listener still accepting"
    );
}

#[tokio::test]
async fn options_during_shutdown_get_err_shutdown() {
    let server = Server::new(registry().await);
    server
        .inner
        .state
        .send_replace(crate::server::State::Draining);
    let (client, srv) = tokio::io::duplex(64 * 1024);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(srv);
    // The client's flags and option are already queued when negotiation starts.
    cw.write_all(&3u32.to_be_bytes()).await.unwrap();
    cw.write_all(&encode_option(OPT_LIST, b"")).await.unwrap();
    let result = crate::server::handshake::negotiate(&server.inner, &mut sr, &mut sw).await;
    assert!(matches!(
        result,
        Err(crate::server::handshake::NegotiateError::ShuttingDown)
    ));
    drop((sr, sw));
    let mut out = Vec::new();
    cr.read_to_end(&mut out).await.unwrap();
    assert_eq!(out.len(), 18 + 20 + "server is shutting down".len());
    assert_eq!(&out[18 + 12..18 + 16], &REP_ERR_SHUTDOWN.to_be_bytes());
}

/// A store with block 0 present (so a READ must GET it) and paused: the GET hangs.
async fn paused_store() -> Arc<MemoryStore> {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(
        "disk/0000000000000000",
        bytes::Bytes::from(vec![7u8; BLOCK as usize]),
    );
    mem
}

async fn wait_held(mem: &MemoryStore) {
    wait_until("the request to reach the store", || mem.waiting() > 0).await;
}

#[tokio::test]
async fn in_flight_requests_finish_within_the_grace_time() {
    let mem = paused_store().await;
    let f = fixture_with(Arc::clone(&mem)).await;
    let mut c = f.structured().await;
    mem.pause();
    c.request(CMD_READ, 0, 1, 0, 4096).await;
    wait_held(&mem).await;
    let server = f.server.clone();
    let stop = tokio::spawn(async move { server.shutdown(Duration::from_secs(30)).await });
    // a new request during the drain is refused
    c.request(CMD_FLUSH, 0, 2, 0, 0).await;
    assert_eq!(c.simple().await, (ESHUTDOWN, 2));
    mem.resume();
    let data = c.chunks().await;
    assert_eq!(data[0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&data[0].data[8..], &[7u8; 4096][..]);
    c.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("shutdown returned")
        .unwrap();
}

#[tokio::test]
async fn requests_past_the_grace_time_get_eshutdown() {
    let mem = paused_store().await;
    let f = fixture_with(Arc::clone(&mem)).await;
    let mut c = f.structured().await;
    mem.pause();
    c.request(CMD_READ, 0, 1, 0, 4096).await;
    wait_held(&mem).await;
    f.server.shutdown(Duration::from_millis(50)).await;
    let e = c.chunks().await;
    assert_eq!(e[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(&e[0].data[..4], &ESHUTDOWN.to_be_bytes());
    c.expect_closed().await;
    assert_eq!(f.server.connection_count(), 0);
    mem.resume();
}

#[tokio::test]
async fn a_client_stalled_mid_payload_does_not_outlive_the_grace_time() {
    let f = fixture().await;
    let mut c = f.structured().await;
    c.request(CMD_WRITE, 0, 1, 0, 65536).await;
    c.write(&[1u8; 100]).await;
    // the connection exists and is past the handshake; the payload never completes
    f.wait_connections(1).await;
    f.server.shutdown(Duration::from_millis(50)).await;
    assert_eq!(f.server.connection_count(), 0);
    c.expect_closed().await;
}
