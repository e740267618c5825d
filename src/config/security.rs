//! The security- and ownership-related keys: `[server.tls]`, an export's `allow` list and its
//! `lease`. Kept apart from `validate` so the core schema stays readable. The TLS files are
//! checked for presence and permissions here, then parsed by `crate::tls` (the code the server
//! builds its TLS configuration with), so check-config, startup and reload all reject
//! certificates that would fail.

use super::raw::RawTls;
use super::validate::Checker;
use super::{AllowRule, LeaseMode, TlsConfig, TlsMode, DEFAULT_LEASE_TTL};
use std::path::{Path, PathBuf};
use toml::Spanned;

impl Checker<'_> {
    /// `[server.tls]`: both files must be readable now (a typo found at reload time is better
    /// than at the first client), and the key must not be readable by everyone.
    pub(super) fn tls(&mut self, raw: Spanned<RawTls>) -> Option<TlsConfig> {
        let raw = raw.into_inner();
        let label = "[server.tls]";
        let before = self.errors.len();
        let cert = self.tls_file(&raw.cert, label, "cert", false);
        let key = self.tls_file(&raw.key, label, "key", true);
        let client_ca = raw
            .client_ca
            .as_ref()
            .map(|ca| self.tls_file(ca, label, "client_ca", false));
        let mode = match raw.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "require")) => TlsMode::Require,
            Some((_, "allow")) => TlsMode::Allow,
            Some((m, other)) => {
                let msg = format!("mode: {other:?} is not \"require\" or \"allow\"");
                self.err(&m.span(), label, msg);
                TlsMode::Require
            }
        };
        if self.errors.len() != before {
            return None;
        }
        let cfg = TlsConfig {
            cert: cert?,
            key: key?,
            client_ca: client_ca.flatten(),
            mode,
        };
        let files = crate::tls::TlsFiles {
            cert: &cfg.cert,
            key: &cfg.key,
            client_ca: cfg.client_ca.as_deref(),
        };
        if let Err(e) = crate::tls::server_config(files) {
            self.err(&raw.cert.span(), label, e);
            return None;
        }
        Some(cfg)
    }

    fn tls_file(
        &mut self,
        value: &Spanned<String>,
        label: &str,
        key: &str,
        private: bool,
    ) -> Option<PathBuf> {
        let path = self.base_dir.join(value.get_ref());
        match check_readable(&path, private) {
            Ok(()) => Some(path),
            Err(msg) => {
                self.err(&value.span(), label, format!("{key}: {msg}"));
                None
            }
        }
    }

    /// An export's `allow` list: CIDR networks, bare addresses and `"unix"`.
    pub(super) fn allow(
        &mut self,
        raw: &Spanned<Vec<String>>,
        label: &str,
    ) -> Option<Vec<AllowRule>> {
        if raw.get_ref().is_empty() {
            let msg = "allow: an empty list admits nobody; remove the key to admit everyone";
            self.err(&raw.span(), label, msg);
            return None;
        }
        let mut rules = Vec::new();
        for text in raw.get_ref() {
            match parse_allow(text) {
                Ok(rule) => rules.push(rule),
                Err(msg) => self.err(&raw.span(), label, format!("allow: {msg}")),
            }
        }
        (rules.len() == raw.get_ref().len()).then_some(rules)
    }

    /// An export's `lease`: `"on"` (default), `"off"`, or a lease time such as `"30s"`.
    pub(super) fn lease(&mut self, raw: Option<&Spanned<String>>, label: &str) -> LeaseMode {
        let Some(raw) = raw else {
            return LeaseMode::On {
                ttl: DEFAULT_LEASE_TTL,
            };
        };
        match parse_lease(raw.get_ref()) {
            Ok(mode) => mode,
            Err(msg) => {
                self.err(&raw.span(), label, format!("lease: {msg}"));
                LeaseMode::Off
            }
        }
    }
}

/// Shortest lease time: renewals every third of it must survive an S3 round trip or two.
const MIN_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(3);

/// Parses a `lease` value.
pub fn parse_lease(text: &str) -> Result<LeaseMode, String> {
    match text {
        "off" => return Ok(LeaseMode::Off),
        "on" => {
            return Ok(LeaseMode::On {
                ttl: DEFAULT_LEASE_TTL,
            })
        }
        _ => {}
    }
    let ttl = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is not \"on\", \"off\" or a lease time like \"30s\""))?;
    if ttl < MIN_LEASE_TTL {
        return Err(format!("{text:?} is shorter than the minimum of 3s"));
    }
    Ok(LeaseMode::On { ttl })
}

/// Parses one `allow` entry.
pub fn parse_allow(text: &str) -> Result<AllowRule, String> {
    if text == "unix" {
        return Ok(AllowRule::Unix);
    }
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(AllowRule::Net(net.trunc()));
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| AllowRule::Net(ipnet::IpNet::from(ip)))
        .map_err(|_| {
            format!("{text:?} is not \"unix\", an IP address or a network like \"192.0.2.0/24\"")
        })
}

fn check_readable(path: &Path, private: bool) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if private && mode & 0o007 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}, readable by everyone; run chmod 600 {shown}"
        ));
    }
    std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_entries() {
        let net = parse_allow("192.0.2.7/24").unwrap();
        assert!(net.matches_ip(ip("192.0.2.200")));
        assert!(!net.matches_ip(ip("192.0.3.1")));
        assert!(
            net.matches_ip(ip("::ffff:192.0.2.1")),
            "v4-mapped matches v4"
        );
        let v6 = parse_allow("2001:db8::/32").unwrap();
        assert!(v6.matches_ip(ip("2001:db8:1::5")));
        assert!(!v6.matches_ip(ip("127.0.0.1")));
        let host = parse_allow("127.0.0.1").unwrap();
        assert!(host.matches_ip(ip("127.0.0.1")));
        assert!(!host.matches_ip(ip("127.0.0.2")));
        assert_eq!(parse_allow("unix").unwrap(), AllowRule::Unix);
        assert!(!AllowRule::Unix.matches_ip(ip("127.0.0.1")));
        for bad in ["", "10.0.0.0/33", "example.org", "unix:/x"] {
            assert!(parse_allow(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lease_values() {
        assert_eq!(parse_lease("off").unwrap(), LeaseMode::Off);
        assert_eq!(
            parse_lease("on").unwrap(),
            LeaseMode::On {
                ttl: DEFAULT_LEASE_TTL
            }
        );
        assert_eq!(
            parse_lease("1m").unwrap(),
            LeaseMode::On {
                ttl: std::time::Duration::from_secs(60)
            }
        );
        assert!(parse_lease("1s").unwrap_err().contains("minimum"));
        assert!(parse_lease("sometimes").is_err());
    }
}
