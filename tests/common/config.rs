//! The exports.toml the test daemon runs with, built from small values and rendered as TOML.
//! Tests mutate a `DaemonConfig` (`NbdS3::rewrite_config`) to exercise reloads.

use super::s3::S3Server;
use std::path::PathBuf;

/// One `[[export]]`. Defaults: 64MiB, bucket "nbd", prefix "NAME/", default block size.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSpec {
    pub name: String,
    /// As written in TOML (`"64MiB"`), so tests can use any unit.
    pub size: String,
    pub bucket: String,
    pub prefix: String,
    pub block_size: Option<String>,
    pub read_only: bool,
    pub description: Option<String>,
    /// Lines appended verbatim to the `[[export]]` table (keys without a helper, e.g. `allow`).
    pub extra: Vec<String>,
}

impl ExportSpec {
    /// An export named `name` with the defaults above.
    pub fn new(name: &str) -> ExportSpec {
        ExportSpec {
            name: name.into(),
            size: "64MiB".into(),
            bucket: "nbd".into(),
            prefix: format!("{name}/"),
            block_size: None,
            read_only: false,
            description: None,
            extra: vec![],
        }
    }
    /// Sets the size (`"16MiB"`, `"1000000B"`, …).
    pub fn size(mut self, size: &str) -> Self {
        self.size = size.into();
        self
    }
    /// Sets the bucket (created in the S3 fixture when the config is written).
    pub fn bucket(mut self, bucket: &str) -> Self {
        self.bucket = bucket.into();
        self
    }
    /// Sets the key prefix.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// Sets `block_size` (`"64KiB"`).
    pub fn block_size(mut self, bs: &str) -> Self {
        self.block_size = Some(bs.into());
        self
    }
    /// Marks the export read-only.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }
    /// Sets the description clients see with `nbdinfo --list`.
    pub fn description(mut self, d: &str) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Appends `line` (TOML, e.g. `allow = ["unix"]`) to the export's table.
    pub fn line(mut self, line: &str) -> Self {
        self.extra.push(line.into());
        self
    }

    fn render(&self, out: &mut String) {
        out.push_str("\n[[export]]\n");
        kv(out, "name", &self.name);
        kv(out, "size", &self.size);
        kv(out, "bucket", &self.bucket);
        kv(out, "prefix", &self.prefix);
        if let Some(bs) = &self.block_size {
            kv(out, "block_size", bs);
        }
        if self.read_only {
            out.push_str("read_only = true\n");
        }
        if let Some(d) = &self.description {
            kv(out, "description", d);
        }
        lines(out, &self.extra);
    }
}

/// The whole file. `listen` defaults to `["127.0.0.1:0"]`; `[cache]` keys are written only
/// when set; `extra_*` lines are appended verbatim to their section (for new keys like TLS).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub listen: Vec<String>,
    pub metrics: Option<String>,
    /// `[server] control`; the daemon fixture sets a socket in its scratch directory.
    pub control: Option<String>,
    pub endpoint: String,
    pub region: String,
    pub access_key: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub cache_memory: Option<String>,
    pub cache_dirty: Option<String>,
    /// `[cache] flush_timeout`, e.g. `"5s"`.
    pub flush_timeout: Option<String>,
    pub extra_server: Vec<String>,
    pub extra_s3: Vec<String>,
    pub extra_cache: Vec<String>,
    pub exports: Vec<ExportSpec>,
}

impl DaemonConfig {
    /// A config using `s3` with static credentials and no exports.
    pub fn for_s3(s3: &S3Server) -> DaemonConfig {
        DaemonConfig {
            listen: vec!["127.0.0.1:0".into()],
            metrics: None,
            control: None,
            endpoint: s3.endpoint(),
            region: s3.region.clone(),
            access_key: Some(s3.access_key.clone()),
            secret_file: Some(s3.secret_file()),
            cache_memory: None,
            cache_dirty: None,
            flush_timeout: None,
            extra_server: vec![],
            extra_s3: vec![],
            extra_cache: vec![],
            exports: vec![],
        }
    }

    /// The export named `name`, for editing in `rewrite_config`.
    pub fn export_mut(&mut self, name: &str) -> &mut ExportSpec {
        self.exports
            .iter_mut()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no export {name:?} in the test config"))
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::from("[server]\nlisten = [");
        let listen: Vec<String> = self.listen.iter().map(|l| quote(l)).collect();
        out.push_str(&listen.join(", "));
        out.push_str("]\n");
        if let Some(m) = &self.metrics {
            kv(&mut out, "metrics", m);
        }
        if let Some(c) = &self.control {
            kv(&mut out, "control", c);
        }
        lines(&mut out, &self.extra_server);
        out.push_str("\n[s3]\n");
        kv(&mut out, "endpoint", &self.endpoint);
        kv(&mut out, "region", &self.region);
        out.push_str("path_style = true\n");
        if let Some(k) = &self.access_key {
            kv(&mut out, "access_key_id", k);
        }
        if let Some(f) = &self.secret_file {
            kv(&mut out, "secret_access_key_file", &f.to_string_lossy());
        }
        lines(&mut out, &self.extra_s3);
        self.render_cache(&mut out);
        for e in &self.exports {
            e.render(&mut out);
        }
        out
    }

    fn render_cache(&self, out: &mut String) {
        let keys = [
            ("memory", &self.cache_memory),
            ("dirty", &self.cache_dirty),
            ("flush_timeout", &self.flush_timeout),
        ];
        if keys.iter().all(|(_, v)| v.is_none()) && self.extra_cache.is_empty() {
            return;
        }
        out.push_str("\n[cache]\n");
        for (k, v) in keys {
            if let Some(v) = v {
                kv(out, k, v);
            }
        }
        lines(out, &self.extra_cache);
    }
}

/// A TOML basic string.
pub fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn kv(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str(" = ");
    out.push_str(&quote(value));
    out.push('\n');
}

fn lines(out: &mut String, extra: &[String]) {
    for l in extra {
        out.push_str(l);
        out.push('\n');
    }
}
