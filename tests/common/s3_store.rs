//! The S3 backend as its own tests drive it, without the daemon: an `S3Store` on the real
//! test server, or on a loopback server answering every request with one canned response, so
//! error classification can be checked against the exact replies S3 servers send.

use super::fault_proxy::http::{read_body, read_head};
use super::S3Server;
use nbd_s3::backend::s3::{build_client, S3Store};
use nbd_s3::config::S3Config;
use tokio::io::{AsyncWriteExt, BufReader};

/// The bucket every store here uses.
pub const BUCKET: &str = "nbd";

/// The `[s3]` settings that reach `s3`.
pub fn s3_config(s3: &S3Server) -> S3Config {
    S3Config {
        endpoint: Some(s3.endpoint()),
        region: Some(s3.region.clone()),
        path_style: true,
        access_key_id: Some(s3.access_key.clone()),
        secret_access_key: Some(s3.secret_key.clone()),
        adaptive_concurrency: true,
    }
}

/// A started server with the test bucket, and a store on it without retries (so error
/// classes are seen as the S3 backend reports them).
pub async fn setup() -> (S3Server, S3Store) {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let client = build_client(&s3_config(&s3)).await.expect("S3 client");
    (s3, S3Store::new(client, BUCKET))
}

/// A store on whatever listens at `127.0.0.1:port` (a canned server, or nothing), with
/// made-up credentials.
pub async fn store_at(port: u16) -> S3Store {
    let cfg = S3Config {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: None,
        path_style: true,
        access_key_id: Some("a".into()),
        secret_access_key: Some("b".into()),
        adaptive_concurrency: true,
    };
    S3Store::new(build_client(&cfg).await.expect("S3 client"), BUCKET)
}

/// A loopback HTTP server answering every request with one canned response: status line,
/// body, and optionally a Content-Length larger than the body to cut it short.
/// It runs as a task of the current runtime on a free loopback port; returns the port.
pub async fn canned_server(
    status: &'static str,
    body: &'static str,
    claimed_len: Option<usize>,
) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the canned server");
    let port = listener.local_addr().expect("local address").port();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Read the whole request so the client sees a clean exchange.
                let mut conn = BufReader::new(conn);
                let Ok(Some(req)) = read_head(&mut conn, true).await else {
                    return;
                };
                if read_body(&mut conn, &req, false).await.is_err() {
                    return;
                }
                let len = claimed_len.unwrap_or(body.len());
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n\
                     Content-Length: {len}\r\nConnection: close\r\n\r\n{body}"
                );
                let conn = conn.get_mut();
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    port
}

/// An S3 error document with `code`.
pub fn error_xml(code: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>canned</Message></Error>"
    )
}
