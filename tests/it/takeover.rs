//! Restarts that clients do not notice, by both routes: `nbd-s3 serve --takeover` (a new
//! process takes listeners and live client connections over from the running daemon, which
//! flushes, releases its leases and exits 0), and `systemctl restart` with the service
//! manager's fd store (the stopping daemon leaves its sockets there, the next process gets
//! them back; `common::service_manager` stands in for systemd). Clients keep their
//! connection (a pause, not a reset), requests sent during the handover are answered by the
//! new process, and unflushed writes made before it are in S3 afterwards.

use crate::common::fault_bed::FaultBed;
use crate::common::fault_proxy::{Fault, Op, Rule};
use crate::common::metrics::{self, Metrics};
use crate::common::nbdsh_session::NbdshSession;
use crate::common::qemu_io_session::QemuIoSession;
use crate::common::raw_nbd::{assert_bytes, pattern, Raw, CMD_FLUSH, CMD_READ, CMD_WRITE};
use crate::common::{nbdsh, qemu_io, ExportSpec, NbdS3, S3Server, DAEMON_TIMEOUT};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// What the test units tell the daemon the fd store takes (`FDSTORE`).
const STORE_SIZE: usize = 64;

/// How the daemon is restarted under its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `nbd-s3 serve --takeover` while the old process runs.
    Takeover,
    /// SIGTERM, then the next process started with the fd store's descriptors.
    FdStore,
}

fn daemon(s3: &S3Server, route: Route) -> NbdS3 {
    let b = NbdS3::builder(s3)
        .export(ExportSpec::new("tk").size("16MiB"))
        .config(|c| c.metrics = Some(metrics::ANY_PORT.into()));
    match route {
        Route::Takeover => b.start(),
        Route::FdStore => b.service_manager(Some(STORE_SIZE)).start(),
    }
}

/// Restarts by `route` and checks both sides: the old process exits 0 after handing over,
/// the new one adopted `clients` connections and counts the handover in its metrics.
fn restart(d: &mut NbdS3, route: Route, clients: usize) {
    let old_pid = d.pid();
    let (mut old, received) = match route {
        Route::Takeover => (
            d.take_over(),
            format!("received 1 listener(s) and {clients} connection(s)"),
        ),
        Route::FdStore => (
            d.systemctl_restart().0,
            format!("fd store: received 1 listener(s) and {clients} connection(s)"),
        ),
    };
    let status = old.wait_exit(DAEMON_TIMEOUT).expect("old process exited");
    let old_log = old.logs.text();
    assert!(status.success(), "old process: {status}\n{old_log}");
    let said = match route {
        Route::Takeover => "handed over".to_owned(),
        Route::FdStore => format!("kept 1 listener(s) and {clients} client connection(s)"),
    };
    assert!(old_log.contains(&said), "old process log:\n{old_log}");
    assert_ne!(d.pid(), old_pid, "a new process serves");
    d.wait_for_log(&received, Duration::from_secs(10));
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
    if route == Route::FdStore {
        // Taken out of the store: a later plain stop must not bring them back.
        assert!(
            d.manager().stored().is_empty(),
            "left in the store: {:?}",
            d.manager().stored()
        );
    }
    let m = Metrics::of(d).scrape();
    assert!(
        metrics::get(&m, "nbd_s3_handovers_total", &[]) >= 1.0,
        "no handover counted"
    );
    let pause = metrics::get(&m, "nbd_s3_handover_pause_seconds", &[]);
    assert!(pause > 0.0, "no pause reported");
    eprintln!("{route:?}: client pause {:.0} ms", pause * 1000.0);
}

/// An nbdsh session writes (unflushed) before each of three restarts and reads everything
/// back after each, on the same connection; a cold start then finds it all in S3.
fn nbdsh_session_survives_three_restarts(route: Route) {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, route);
    let uri = d.uri("tk");
    let mut session = NbdshSession::open(&uri);
    for round in 0..3u64 {
        // Not flushed by the client: the handover must store it before passing on.
        let byte = round + 1;
        session.run(
            &format!("h.pwrite(bytes([{byte}]) * 65536, {})", round * MIB),
            &d,
        );
        restart(&mut d, route, 1);
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
        assert_eq!(d.uri("tk"), uri, "same address after the restart");
    }
    let m = Metrics::of(&d).scrape();
    assert_eq!(
        metrics::get(&m, "nbd_s3_handovers_total", &[]),
        3.0,
        "counted across the processes"
    );
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

#[test]
fn nbdsh_connection_survives_three_takeovers_with_data_verified() {
    nbdsh_session_survives_three_restarts(Route::Takeover);
}

#[test]
fn nbdsh_connection_survives_three_fd_store_restarts_with_data_verified() {
    nbdsh_session_survives_three_restarts(Route::FdStore);
}

/// qemu's NBD block driver (qemu-io, no reconnect configured: a reset would fail its next
/// command) writes a pattern before each of three restarts and verifies every pattern after
/// each, on the same connection; a cold start then finds them all in S3.
fn qemu_io_session_survives_three_restarts(route: Route) {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, route);
    let mut q = QemuIoSession::open(&d.uri("tk"));
    const LEN: u64 = 192 * 1024;
    let byte = |r: u64| 0x40 + r as u8;
    for round in 0..3u64 {
        // Unaligned to the block size, so each write is a read-modify-write of its blocks.
        q.write(byte(round), round * MIB + 4096, LEN);
        restart(&mut d, route, 1);
        for r in 0..=round {
            q.verify(byte(r), r * MIB + 4096, LEN);
        }
    }
    q.close();
    d.restart();
    let check: Vec<String> = (0..3u64)
        .map(|r| format!("read -P {} {} {LEN}", byte(r), r * MIB + 4096))
        .collect();
    let cmds: Vec<&str> = check.iter().map(String::as_str).collect();
    qemu_io(&d.uri("tk"), &cmds);
}

#[test]
fn qemu_io_session_survives_three_takeovers_with_patterns_verified() {
    qemu_io_session_survives_three_restarts(Route::Takeover);
}

#[test]
fn qemu_io_session_survives_three_fd_store_restarts_with_patterns_verified() {
    qemu_io_session_survives_three_restarts(Route::FdStore);
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

/// A raw client pipelines batches of writes and reads throughout three restarts: every
/// request is answered and every read returns what was written.
fn requests_sent_during_restarts_are_answered(route: Route) {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, route);
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
        restart(&mut d, route, 1);
        pauses.push(started.elapsed());
        // The new process answers the same connection.
        wait_rounds(before + 5);
    }
    stop.store(true, Ordering::SeqCst);
    let slowest = client.join().expect("client thread: no request failed");
    eprintln!(
        "{route:?}: slowest pipelined round {slowest:?}; whole restarts {pauses:?}; {} rounds",
        rounds.load(Ordering::SeqCst)
    );
}

#[test]
fn requests_sent_during_a_takeover_are_answered() {
    requests_sent_during_restarts_are_answered(Route::Takeover);
}

#[test]
fn requests_sent_during_a_fd_store_restart_are_answered() {
    requests_sent_during_restarts_are_answered(Route::FdStore);
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
    restart(&mut d, Route::Takeover, 0);
    // The old process held the port until it exited; the new one binds it then.
    d.wait_for_log(&format!("metrics on {metrics}"), Duration::from_secs(30));
    assert!(
        !d.logs().contains("continuing without metrics"),
        "{}",
        d.logs()
    );
}

#[test]
fn without_a_fd_store_sigterm_closes_clients_and_exits_0() {
    let s3 = S3Server::start();
    // A service manager, but no FDSTORE: the unit has no store.
    let mut d = NbdS3::builder(&s3)
        .export(ExportSpec::new("tk").size("16MiB"))
        .service_manager(None)
        .start();
    let (mut raw, _) = Raw::open(&format!("127.0.0.1:{}", d.port()), "tk");
    assert_eq!(raw.write_at(1, 0, &[7u8; 4096]), 0);
    d.sigterm();
    assert!(d.wait_exit(DAEMON_TIMEOUT).success(), "{}", d.logs());
    raw.expect_closed("a stop without a fd store");
    assert!(d.logs().contains("all exports flushed; exiting"));
    assert!(!d.logs().contains("fd store"), "{}", d.logs());
    assert!(d.manager().stored().is_empty());
    assert!(
        !d.notify_messages().contains("FDSTORE=1"),
        "{}",
        d.notify_messages()
    );
    // The write reached S3 all the same.
    d.restart();
    nbdsh(
        &d.uri("tk"),
        &["assert h.pread(4096, 0) == bytes([7]) * 4096"],
    );
}

/// Block PUTs of export `tk` fail (every one) from now on; lease and manifest writes pass.
fn fail_block_puts(bed: &FaultBed) {
    bed.proxy.add(
        Rule::new(Fault::InternalError)
            .only(&[Op::Put])
            .key_contains("tk/0000"),
    );
}

fn fault_bed(route: Route) -> FaultBed {
    FaultBed::start(vec![ExportSpec::new("tk").size("16MiB")], 1, |b| {
        let b = b.flush_timeout("2s");
        match route {
            Route::Takeover => b,
            Route::FdStore => b.service_manager(Some(STORE_SIZE)),
        }
    })
}

#[test]
fn a_flush_failure_at_a_fd_store_stop_closes_the_clients_and_exits_1() {
    let mut bed = fault_bed(Route::FdStore);
    let addr = format!("127.0.0.1:{}", bed.nbd.port());
    let (mut raw, _) = Raw::open(&addr, "tk");
    fail_block_puts(&bed);
    assert_eq!(raw.write_at(1, 0, &[9u8; 4096]), 0);
    let (mut old, _) = bed.nbd.systemctl_restart();
    let status = old.wait_exit(DAEMON_TIMEOUT).expect("exited");
    let log = old.logs.text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("NOT flushed"), "{log}");
    assert!(
        log.contains("closing 1 connection(s) to exports not flushed (tk)"),
        "{log}"
    );
    assert!(
        log.contains("kept 1 listener(s) and 0 client connection(s)"),
        "{log}"
    );
    // The client learns that something went wrong: its connection is gone, not paused.
    raw.expect_closed("a client whose writes were lost");
    // The listener was kept: the same port serves the next process.
    bed.nbd.wait_for_log(
        "fd store: received 1 listener(s) and 0 connection(s)",
        DAEMON_TIMEOUT,
    );
    bed.proxy.clear();
    let (mut again, _) = Raw::open(&addr, "tk");
    assert_eq!(again.cmd(0, CMD_FLUSH, 2, 0, 0), 0);
}

#[test]
fn a_takeover_is_refused_while_a_flush_fails_and_the_old_process_serves_on() {
    let mut bed = fault_bed(Route::Takeover);
    let addr = format!("127.0.0.1:{}", bed.nbd.port());
    let (mut raw, _) = Raw::open(&addr, "tk");
    fail_block_puts(&bed);
    let data = pattern(3, 0, 4096);
    assert_eq!(raw.write_at(1, 0, &data), 0);
    let old_pid = bed.nbd.pid();
    let failed = match bed.nbd.try_take_over() {
        Ok(_) => panic!("the takeover happened although the flush failed"),
        Err(f) => f,
    };
    assert_eq!(
        failed.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        failed.logs
    );
    assert!(
        failed
            .logs
            .contains("the running daemon refused the takeover: not flushed: tk; serving on"),
        "{}",
        failed.logs
    );
    assert_eq!(bed.nbd.pid(), old_pid);
    assert!(bed.nbd.try_wait().is_none(), "the old process serves on");
    bed.nbd
        .wait_for_log("takeover refused", Duration::from_secs(10));
    // Same connection, same process: the data is still there, and stored once S3 heals.
    assert_eq!(raw.read_at(2, 0, 4096).expect("read"), data);
    bed.proxy.clear();
    assert_eq!(raw.cmd(0, CMD_FLUSH, 3, 0, 0), 0);
    // New connections are accepted again too.
    let (mut other, _) = Raw::open(&addr, "tk");
    assert_eq!(other.read_at(4, 0, 4096).expect("read"), data);
}

#[test]
fn a_connection_negotiating_at_a_takeover_finishes_and_moves_and_a_silent_one_is_cut() {
    let s3 = S3Server::start();
    let mut d = daemon(&s3, Route::Takeover);
    let addr = format!("127.0.0.1:{}", d.port());
    // Greeted, flags sent, no option yet: both are in the handshake when the takeover starts.
    let mut late = Raw::connect(&addr);
    let mut silent = Raw::connect(&addr);
    let old_log = d.log_buffer();
    let client = std::thread::spawn(move || {
        old_log
            .wait_for("handover: reading stopped", DAEMON_TIMEOUT)
            .expect("the handover starts");
        let info = late.go("tk").expect("GO answered during the takeover");
        assert_eq!(info.size, 16 * MIB);
        let data = pattern(9, 0, 4096);
        assert_eq!(late.write_at(1, 8192, &data), 0);
        assert_eq!(late.read_at(2, 8192, 4096).expect("read"), data);
        late
    });
    let started = Instant::now();
    let mut old = d.take_over();
    assert!(old.wait_exit(DAEMON_TIMEOUT).is_some_and(|s| s.success()));
    let mut late = client.join().expect("the negotiating client carried on");
    d.wait_for_log(
        "received 1 listener(s) and 1 connection(s)",
        Duration::from_secs(10),
    );
    // The silent one was given its grace, then cut; its client would reconnect.
    assert!(started.elapsed() >= Duration::from_secs(2));
    silent.expect_closed("a client silent in the handshake through a takeover");
    // The moved connection is served by the new process.
    assert_eq!(late.cmd(0, CMD_FLUSH, 3, 0, 0), 0);
    assert_eq!(
        late.read_at(4, 8192, 4096).expect("read"),
        pattern(9, 0, 4096)
    );
}

/// The packaged unit enables the fd store and tells the daemon so with the same number (older
/// systemd does not set `$FDSTORE` itself), and systemd accepts the unit.
#[test]
fn the_packaged_unit_enables_the_fd_store_and_says_so() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/nbd-s3.service"
    ))
    .expect("read the unit");
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .map(str::to_owned)
            .collect()
    };
    let max = value("FileDescriptorStoreMax=");
    let told = value("Environment=FDSTORE=");
    assert_eq!(max.len(), 1, "one FileDescriptorStoreMax=: {max:?}");
    assert_eq!(
        told, max,
        "Environment=FDSTORE= must equal FileDescriptorStoreMax="
    );
    let n: usize = max[0].parse().expect("a number");
    assert!(n > 2, "room for a listener, the state and clients: {n}");
    assert!(
        unit.lines().any(|l| l.trim() == "NotifyAccess=main"),
        "the main process sends the descriptors"
    );
    if crate::common::tool_available("systemd-analyze") {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd-s3.service");
        // `verify` wants the binary to exist: point it at the one just built.
        std::fs::write(
            &path,
            unit.replace("/usr/bin/nbd-s3", env!("CARGO_BIN_EXE_nbd-s3")),
        )
        .expect("write the unit");
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        // Warnings about other units of the machine are not ours to fix.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("nbd-s3.service"),
            "systemd-analyze verify: {stderr}"
        );
    }
}
