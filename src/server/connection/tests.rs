//! In-process STARTTLS: a rustls client through the whole connection (options before and
//! after TLS, a READ over TLS), and the handshake timeout covering a stalled TLS handshake.

use super::serve_connection;
use crate::config::{TlsConfig, TlsMode};
use crate::proto::consts::*;
use crate::proto::handshake::{encode_info_request, encode_option};
use crate::server::listener::{Accepted, Peer};
use crate::server::Server;
use crate::tls::test_pki::{write_server, ServerFiles, TestCa};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

async fn tls_server(mode: TlsMode) -> (Server, ServerFiles, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    let server = Server::new(crate::server::tests::registry().await);
    let cfg = TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
        client_ca: None,
        mode,
    };
    server.set_tls(Some(&cfg)).unwrap();
    (server, files, dir)
}

/// Starts `serve_connection` on one end of a pipe; returns the client end.
fn connect(server: &Server) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, srv) = tokio::io::duplex(1 << 20);
    let conn = Accepted {
        stream: Box::new(srv),
        peer: Peer::Unix("unix:test".into()),
    };
    let inner = Arc::clone(&server.inner);
    let task = tokio::spawn(async move { serve_connection(&inner, conn).await });
    (client, task)
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut b))
        .await
        .expect("server stalled")
        .expect("read");
    b
}

/// Reads one option reply: (option, type, data).
async fn opt_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let h = read_n(s, 20).await;
    let be = |r: std::ops::Range<usize>| u32::from_be_bytes(h[r].try_into().unwrap());
    let len = be(16..20) as usize;
    (be(8..12), be(12..16), read_n(s, len).await)
}

/// Greeting read, flags sent: ready for options.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    read_n(s, 18).await;
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
}

async fn starttls(s: &mut DuplexStream) {
    s.write_all(&encode_option(OPT_STARTTLS, b""))
        .await
        .unwrap();
    assert_eq!(opt_reply(s).await.1, REP_ACK);
}

fn connector(files: &ServerFiles) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&files.ca).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn starttls_then_options_and_reads_over_tls() {
    let (server, files, _dir) = tls_server(TlsMode::Require).await;
    let (mut c, task) = connect(&server);
    start(&mut c).await;
    // Before TLS: refused; what was asked is forgotten after STARTTLS.
    c.write_all(&encode_option(OPT_STRUCTURED_REPLY, b""))
        .await
        .unwrap();
    assert_eq!(opt_reply(&mut c).await.1, REP_ERR_TLS_REQD);
    starttls(&mut c).await;
    let name = ServerName::try_from("localhost").unwrap();
    let mut t = connector(&files).connect(name, c).await.expect("TLS");
    t.write_all(&encode_option(OPT_STARTTLS, b""))
        .await
        .unwrap();
    assert_eq!(opt_reply(&mut t).await.1, REP_ERR_INVALID, "STARTTLS twice");
    let go = encode_option(OPT_GO, &encode_info_request("disk", &[]));
    t.write_all(&go).await.unwrap();
    loop {
        let (_, kind, _) = opt_reply(&mut t).await;
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
    }
    // A simple-reply READ of 4 KiB (structured replies were not negotiated over TLS).
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    t.write_all(&req).await.unwrap();
    let reply = read_n(&mut t, 16 + 4096).await;
    assert_eq!(&reply[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "error field");
    assert!(reply[16..].iter().all(|&b| b == 0));
    drop(t);
    tokio::time::timeout(IO_TIMEOUT, task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn allow_mode_serves_plain_text() {
    let (server, _files, _dir) = tls_server(TlsMode::Allow).await;
    let (mut c, _task) = connect(&server);
    start(&mut c).await;
    c.write_all(&encode_option(OPT_LIST, b"")).await.unwrap();
    assert_eq!(opt_reply(&mut c).await.1, REP_SERVER);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_tls_handshake_hits_the_handshake_timeout() {
    let (server, _files, _dir) = tls_server(TlsMode::Require).await;
    let (mut c, task) = connect(&server);
    start(&mut c).await;
    starttls(&mut c).await;
    // The client never sends its ClientHello.
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("TLS handshake never timed out")
        .unwrap();
    assert!(started.elapsed() >= crate::server::HANDSHAKE_TIMEOUT);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}
