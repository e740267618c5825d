//! Shutdown: new work is refused, in-flight work finishes, connections go away.

use super::*;

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
