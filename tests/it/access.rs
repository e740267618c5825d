//! Per-export `allow` lists against the real daemon: a TCP client on 127.0.0.1 and a client of
//! a Unix-socket listener each see (NBD_OPT_LIST) and open only the exports that admit them;
//! the others are refused with ERR_POLICY and the refusal is logged.

use crate::common::access_bed::AccessBed;
use crate::common::raw_nbd::{Raw, OPT_GO, OPT_INFO, OPT_LIST, REP_ERR_POLICY, REP_SERVER};
use crate::common::*;
use std::time::Duration;

/// Whether nbdinfo can open `uri`, and what it printed.
fn opens(uri: &str) -> (bool, String) {
    let out = run(tool("nbdinfo").arg(uri));
    (out.status.success(), show(&out))
}

/// The export names NBD_OPT_LIST returns through `uri` (libnbd in option mode).
fn listed(uri: &str) -> Vec<String> {
    let out = nbdsh_script(&[
        "names = []",
        "h.set_opt_mode(True)",
        &format!("h.connect_uri({uri:?})"),
        "h.opt_list(lambda name, desc: names.append(name))",
        "h.opt_abort()",
        "print('\\n'.join(sorted(names)))",
    ]);
    stdout(&out).lines().map(str::to_owned).collect()
}

#[test]
fn tcp_client_sees_and_opens_only_exports_that_admit_it() {
    let bed = AccessBed::start();
    let tcp = bed.tcp();
    for name in ["open", "loopback"] {
        let (ok, text) = opens(&NbdS3::uri_via(&tcp, name));
        assert!(ok, "{name} refused over TCP: {text}");
    }
    for name in ["v6only", "unixonly"] {
        let (ok, text) = opens(&NbdS3::uri_via(&tcp, name));
        assert!(!ok, "{name} opened over TCP from 127.0.0.1: {text}");
    }
    assert_eq!(listed(&NbdS3::uri_via(&tcp, "")), ["loopback", "open"]);
    let line = bed.nbd.wait_for_log(
        "refused export unixonly to 127.0.0.1:",
        Duration::from_secs(10),
    );
    assert!(line.contains("not in its allow list"), "{line}");
}

#[test]
fn unix_client_sees_and_opens_only_exports_that_admit_it() {
    let bed = AccessBed::start();
    for name in ["open", "unixonly"] {
        let (ok, text) = opens(&NbdS3::uri_via(&bed.sock, name));
        assert!(ok, "{name} refused over the Unix socket: {text}");
    }
    for name in ["loopback", "v6only"] {
        let (ok, text) = opens(&NbdS3::uri_via(&bed.sock, name));
        assert!(!ok, "{name} opened over the Unix socket: {text}");
    }
    assert_eq!(listed(&NbdS3::uri_via(&bed.sock, "")), ["open", "unixonly"]);
    let line = bed.nbd.wait_for_log(
        &format!("refused export loopback to {}", bed.sock),
        Duration::from_secs(10),
    );
    assert!(line.contains("not in its allow list"), "{line}");
}

#[test]
fn refusals_are_err_policy_on_the_wire() {
    let bed = AccessBed::start();
    let mut raw = Raw::connect(&bed.tcp());
    for option in [OPT_INFO, OPT_GO] {
        let mut data = Vec::new();
        data.extend_from_slice(&8u32.to_be_bytes());
        data.extend_from_slice(b"unixonly");
        data.extend_from_slice(&0u16.to_be_bytes());
        raw.send_opt(option, &data);
        let r = raw.opt_reply();
        assert_eq!(r.kind, REP_ERR_POLICY, "option {option}: {r:?}");
    }
    // The connection is still usable: LIST works and leaves the refused exports out.
    raw.send_opt(OPT_LIST, b"");
    let mut names = Vec::new();
    loop {
        let r = raw.opt_reply();
        if r.kind != REP_SERVER {
            break;
        }
        let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + len].to_vec()).unwrap());
    }
    names.sort();
    assert_eq!(names, ["loopback", "open"]);
    // EXPORT_NAME cannot carry an error: the server closes.
    let mut raw = Raw::connect(&bed.tcp());
    raw.send_opt(1, b"v6only");
    assert!(
        raw.try_opt_reply().is_none(),
        "EXPORT_NAME of a refused export answered"
    );
}

#[test]
fn ipv6_loopback_and_ipv4_loopback_are_told_apart() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let s3 = S3Server::start();
    let nbd = NbdS3::builder(&s3)
        .listen(&["127.0.0.1:0", "[::1]:0"])
        .export(
            ExportSpec::new("v6only")
                .size("4MiB")
                .line(r#"allow = ["::1"]"#),
        )
        .export(
            ExportSpec::new("v4only")
                .size("4MiB")
                .line(r#"allow = ["127.0.0.1/32"]"#),
        )
        .start();
    let v6 = nbd
        .addrs()
        .iter()
        .find(|a| a.starts_with("[::1]:"))
        .unwrap_or_else(|| panic!("no [::1] listener in {:?}", nbd.addrs()))
        .clone();
    let v4 = format!("127.0.0.1:{}", nbd.port());
    assert!(opens(&NbdS3::uri_via(&v6, "v6only")).0);
    assert!(opens(&NbdS3::uri_via(&v4, "v4only")).0);
    let (ok, text) = opens(&NbdS3::uri_via(&v4, "v6only"));
    assert!(!ok, "v6only opened from 127.0.0.1: {text}");
    let (ok, text) = opens(&NbdS3::uri_via(&v6, "v4only"));
    assert!(!ok, "v4only opened from ::1: {text}");
    assert_eq!(listed(&NbdS3::uri_via(&v6, "")), ["v6only"]);
    nbd.wait_for_log("refused export v4only to [::1]:", Duration::from_secs(10));
}

#[test]
fn a_reload_changes_who_is_admitted() {
    let s3 = S3Server::start();
    let mut nbd = NbdS3::builder(&s3)
        .export(
            ExportSpec::new("disk")
                .size("4MiB")
                .line(r#"allow = ["unix"]"#),
        )
        .start();
    let uri = nbd.uri("disk");
    assert!(!opens(&uri).0, "admitted before the reload");
    let mark = nbd.log_mark();
    nbd.rewrite_config(|c| c.export_mut("disk").extra = vec![r#"allow = ["127.0.0.1"]"#.into()]);
    nbd.sighup();
    nbd.wait_for_log_after(mark, "reload complete", Duration::from_secs(30));
    let (ok, text) = opens(&uri);
    assert!(ok, "refused after the reload: {text}");
}
