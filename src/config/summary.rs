//! The `check-config` summary: what the daemon would serve, in a table an admin can eyeball.

use super::size::format_size;
use super::{AllowRule, Config, ListenAddr, TlsConfig, TlsMode};

fn listen_text(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(s) => s.clone(),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    }
}

fn tls_text(tls: Option<&TlsConfig>) -> String {
    let Some(tls) = tls else {
        return "tls: off (plain text)\n".to_string();
    };
    let mode = match tls.mode {
        TlsMode::Require => "required",
        TlsMode::Allow => "offered, plain text allowed",
    };
    let clients = match &tls.client_ca {
        Some(ca) => format!("client certificates from {}", ca.display()),
        None => "no client certificates".to_string(),
    };
    format!("tls: {mode} (cert {}, {clients})\n", tls.cert.display())
}

fn allow_text(rules: &[AllowRule]) -> String {
    let shown: Vec<String> = rules
        .iter()
        .map(|r| match r {
            AllowRule::Net(net) => net.to_string(),
            AllowRule::Unix => "unix".to_string(),
        })
        .collect();
    shown.join(", ")
}

/// Rows as left-aligned columns two spaces apart, each line trimmed; the first row is the
/// header. Every row has the header's number of cells.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Renders the server settings and one row per export (name, size, bucket, prefix, block
/// size, read-only, description). Never includes secrets.
pub fn summary_table(cfg: &Config) -> String {
    let mut out = String::new();
    let listen: Vec<String> = cfg.server.listen.iter().map(listen_text).collect();
    out.push_str(&format!("listen: {}\n", listen.join(", ")));
    if let Some(m) = cfg.server.metrics {
        out.push_str(&format!("metrics: {m}\n"));
    }
    out.push_str(&tls_text(cfg.server.tls.as_ref()));
    match &cfg.server.control {
        Some(p) => out.push_str(&format!("control: {}\n", p.display())),
        None => out.push_str("control: off\n"),
    }
    match cfg.s3.endpoint.as_deref() {
        Some(e) if e.starts_with("file://") => {
            out.push_str(&format!("s3: {e} (local directory store)\n"));
        }
        endpoint => {
            let creds = match &cfg.s3.access_key_id {
                Some(id) => format!("access key {id}"),
                None => "AWS credential chain".to_string(),
            };
            out.push_str(&format!(
                "s3: {} (region {}, path style {}, {creds})\n",
                endpoint.unwrap_or("AWS (default endpoint)"),
                cfg.s3.region.as_deref().unwrap_or("default"),
                if cfg.s3.path_style { "on" } else { "off" },
            ));
        }
    }
    out.push_str(&format!(
        "cache: memory {}, dirty {}, flush timeout {}\n",
        format_size(cfg.cache.memory),
        format_size(cfg.cache.dirty),
        humantime::format_duration(cfg.cache.flush_timeout)
    ));
    let header = [
        "NAME",
        "SIZE",
        "BUCKET",
        "PREFIX",
        "BLOCK",
        "RO",
        "DESCRIPTION",
    ]
    .map(String::from);
    let mut rows = vec![header.to_vec()];
    for e in &cfg.exports {
        rows.push(vec![
            e.name.clone(),
            format_size(e.size),
            e.bucket.clone(),
            e.prefix.clone(),
            format_size(u64::from(e.block_size)),
            if e.read_only { "yes" } else { "no" }.to_string(),
            e.description.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&table(&rows));
    for e in &cfg.exports {
        if let Some(rules) = &e.allow {
            out.push_str(&format!("{} allows only: {}\n", e.name, allow_text(rules)));
        }
        if !e.codec.is_plain() {
            let encryption = match &e.codec.encryption {
                Some(k) => format!("encrypted with the key in {}", k.path().display()),
                None => "not encrypted".to_string(),
            };
            out.push_str(&format!(
                "{} blocks: compression {}, {encryption}\n",
                e.name, e.codec.compression
            ));
        }
    }
    let n = cfg.exports.len();
    out.push_str(&format!("{n} export{}\n", if n == 1 { "" } else { "s" }));
    out
}
