//! `nbd-s3 serve --takeover`: a new process takes listeners and live client connections over
//! from the running daemon, which flushes, releases its leases and exits 0. Clients keep their
//! connection (a pause, not a reset), requests sent during the handover are answered by the
//! new process, and unflushed writes made before it are in S3 afterwards.

use crate::common::nbdsh_session::NbdshSession;
use crate::common::raw_nbd::{assert_bytes, pattern, Raw, CMD_FLUSH, CMD_READ, CMD_WRITE};
use crate::common::{nbdsh, ExportSpec, NbdS3, S3Server, DAEMON_TIMEOUT};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

fn daemon(s3: &S3Server) -> NbdS3 {
    NbdS3::builder(s3)
        .export(ExportSpec::new("tk").size("16MiB"))
        .start()
}

/// Takes over and checks both sides: the old process exits 0 after handing over, the new one
/// adopted `clients` connections.
fn take_over(d: &mut NbdS3, clients: usize) {
    let old_pid = d.pid();
    let mut old = d.take_over();
    let status = old.wait_exit(DAEMON_TIMEOUT).expect("old process exited");
    let old_log = old.logs.text();
    assert!(status.success(), "old process: {status}\n{old_log}");
    assert!(
        old_log.contains("handed over"),
        "old process log:\n{old_log}"
    );
    assert_ne!(d.pid(), old_pid, "a new process serves");
    let want = format!("received 1 listener(s) and {clients} connection(s)");
    d.wait_for_log(&want, Duration::from_secs(10));
    // Adoption is logged per connection once its export is found, just after the receipt.
    let adopted = crate::common::poll_until(Duration::from_secs(10), || {
        d.log_lines("connection taken over").len() >= clients
    });
    assert!(
        adopted,
        "connections not taken over; new process log:\n{}\nold process log:\n{old_log}",
        d.logs()
    );
    assert_eq!(
        d.log_lines("connection taken over").len(),
        clients,
        "new process log:\n{}",
        d.logs()
    );
}

#[test]
fn nbdsh_connection_survives_three_takeovers_with_data_verified() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3);
    let uri = d.uri("tk");
    let mut session = NbdshSession::open(&uri);
    for round in 0..3u64 {
        // Not flushed by the client: the handover must store it before passing on.
        let byte = round + 1;
        session.run(
            &format!("h.pwrite(bytes([{byte}]) * 65536, {})", round * MIB),
            &d,
        );
        take_over(&mut d, 1);
        for r in 0..=round {
            session.run(
                &format!(
                    "assert h.pread(65536, {}) == bytes([{}]) * 65536",
                    r * MIB,
                    r + 1
                ),
                &d,
            );
        }
        assert_eq!(d.uri("tk"), uri, "same address after the takeover");
    }
    session.run("h.flush()", &d);
    session.close();
    // Everything reached S3: a fresh start (cold cache) reads it back.
    d.restart();
    let check: Vec<String> = (0..3u64)
        .map(|r| {
            format!(
                "assert h.pread(65536, {}) == bytes([{}]) * 65536",
                r * MIB,
                r + 1
            )
        })
        .collect();
    let lines: Vec<&str> = check.iter().map(String::as_str).collect();
    nbdsh(&d.uri("tk"), &lines);
}

/// One pipelined round of the raw client: `n` writes, then `n` reads of what they wrote
/// (NBD orders nothing among requests in flight, so the reads wait for the write replies);
/// each batch is sent whole before any reply is read, so some requests are in flight, or
/// not yet read by the server, whenever the handover starts.
fn round(raw: &mut Raw, seed: u64, n: u64) {
    const LEN: u32 = 4096;
    let off = |i: u64| (seed % 64) * 64 * 4096 + i * 4096;
    for i in 0..n {
        let data = pattern(seed, off(i), LEN as usize);
        raw.send_req(0, CMD_WRITE, i, off(i), LEN, &data);
    }
    for _ in 0..n {
        let r = raw.reply_nodata();
        assert_eq!(r.error, 0, "write {} failed", r.cookie);
    }
    for i in 0..n {
        raw.send_req(0, CMD_READ, n + i, off(i), LEN, &[]);
    }
    for _ in 0..n {
        let r = raw.reply(|_, err| if err == 0 { LEN as usize } else { 0 });
        assert_eq!(r.error, 0, "read {} failed", r.cookie);
        let i = r.cookie - n;
        assert_bytes(
            "read after write",
            &r.data,
            &pattern(seed, off(i), LEN as usize),
        );
    }
}

#[test]
fn requests_sent_during_a_takeover_are_answered() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3);
    let addr = format!("127.0.0.1:{}", d.port());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let client = {
        let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
        std::thread::spawn(move || {
            let (mut raw, _) = Raw::open(&addr, "tk");
            let mut slowest = Duration::ZERO;
            let mut seed = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                round(&mut raw, seed, 16);
                slowest = slowest.max(started.elapsed());
                seed += 1;
                rounds.fetch_add(1, Ordering::SeqCst);
            }
            assert_eq!(raw.cmd(0, CMD_FLUSH, 999, 0, 0), 0, "final flush");
            slowest
        })
    };
    let wait_rounds = |at_least: usize| {
        crate::common::wait_until("client rounds", Duration::from_secs(30), || {
            rounds.load(Ordering::SeqCst) >= at_least
        })
    };
    wait_rounds(5);
    let mut pauses = Vec::new();
    for _ in 0..3 {
        let before = rounds.load(Ordering::SeqCst);
        let started = Instant::now();
        take_over(&mut d, 1);
        pauses.push(started.elapsed());
        // The new process answers the same connection.
        wait_rounds(before + 5);
    }
    stop.store(true, Ordering::SeqCst);
    let slowest = client.join().expect("client thread: no request failed");
    eprintln!(
        "takeover: slowest pipelined round {slowest:?}; whole takeovers {pauses:?}; {} rounds",
        rounds.load(Ordering::SeqCst)
    );
}

#[test]
fn without_a_running_daemon_takeover_starts_afresh() {
    let s3 = S3Server::start();
    let mut d = NbdS3::builder(&s3)
        .export(ExportSpec::new("tk").size("16MiB"))
        .start();
    d.sigterm();
    assert!(d.wait_exit(DAEMON_TIMEOUT).success());
    let old = d.take_over();
    drop(old);
    d.wait_for_log(
        "no daemon answers on the control socket",
        Duration::from_secs(5),
    );
    nbdsh(&d.uri("tk"), &["assert h.get_size() == 16 * 1024 * 1024"]);
}

#[test]
fn a_fixed_metrics_port_moves_to_the_new_process() {
    let s3 = S3Server::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let mut d = NbdS3::builder(&s3)
        .export(ExportSpec::new("tk").size("16MiB"))
        .config(|c| c.metrics = Some(metrics.clone()))
        .start();
    d.wait_for_log(&format!("metrics on {metrics}"), Duration::from_secs(10));
    take_over(&mut d, 0);
    // The old process held the port until it exited; the new one binds it then.
    d.wait_for_log(&format!("metrics on {metrics}"), Duration::from_secs(30));
    assert!(
        !d.logs().contains("continuing without metrics"),
        "{}",
        d.logs()
    );
}
