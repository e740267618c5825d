//! From the file as written (`raw`) to a `Config` nothing downstream needs to re-check. Every
//! problem is collected (not just the first) so one `check-config` run shows them all, each
//! with the line of the offending value.

use super::error::{line_of, Diagnostic};
use super::raw::{RawCache, RawConfig, RawExport, RawS3, RawServer, RawSize};
use super::size::{format_size, parse_size};
use super::{CacheConfig, Config, ExportConfig, ListenAddr, S3Config, ServerConfig};
use super::{CodecConfig, Compression, EncryptionKey};
use super::{Durability, JournalConfig, DEFAULT_JOURNAL_SIZE};
use super::{DEFAULT_BLOCK_SIZE, DEFAULT_CONTROL, DEFAULT_FLUSH_TIMEOUT, DEFAULT_LISTEN};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use toml::Spanned;

/// Smallest and largest accepted object size.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest accepted object size (bigger objects make every partial write expensive).
pub const MAX_BLOCK_SIZE: u64 = 8 << 20;
/// Longest export name (NBD limits names to 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;
/// Default `[cache] memory`.
pub const DEFAULT_MEMORY: u64 = 1 << 30;
/// Default `[cache] dirty` (when memory is also defaulted).
pub const DEFAULT_DIRTY: u64 = 256 << 20;

/// Collects diagnostics for one file.
pub struct Checker<'a> {
    path: &'a str,
    src: &'a str,
    /// Directory relative secret-file paths are resolved against.
    pub(super) base_dir: &'a Path,
    pub errors: Vec<Diagnostic>,
    /// Whether `[cache] journal` is set (`durability = "local"` needs it).
    journal: bool,
}

impl<'a> Checker<'a> {
    /// A checker for the file `path` (as the admin named it) with contents `src`.
    pub fn new(path: &'a str, src: &'a str, base_dir: &'a Path) -> Self {
        Self {
            path,
            src,
            base_dir,
            errors: Vec::new(),
            journal: false,
        }
    }

    pub(super) fn err(
        &mut self,
        span: &Range<usize>,
        label: &str,
        message: impl std::fmt::Display,
    ) {
        self.errors.push(Diagnostic {
            path: self.path.to_string(),
            line: line_of(self.src, span.start),
            message: format!("{label}: {message}"),
        });
    }

    /// Validates the whole file; `None` when any diagnostic was recorded.
    pub fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let server = self.server(raw.server);
        let s3 = self.s3(raw.s3);
        self.journal = raw.cache.as_ref().is_some_and(|c| c.journal.is_some());
        let exports = self.exports(raw.export);
        let max_block = exports
            .iter()
            .map(|e| u64::from(e.block_size))
            .max()
            .unwrap_or(0);
        let cache = self.cache(raw.cache, max_block);
        if !self.errors.is_empty() {
            return None;
        }
        Some(Config {
            server,
            s3,
            cache,
            exports,
        })
    }

    fn server(&mut self, raw: Option<RawServer>) -> ServerConfig {
        let mut cfg = ServerConfig {
            listen: Vec::new(),
            metrics: None,
            tls: None,
            control: Some(DEFAULT_CONTROL.into()),
        };
        let Some(raw) = raw else {
            cfg.listen.push(ListenAddr::Tcp(DEFAULT_LISTEN.to_string()));
            return cfg;
        };
        if let Some(c) = &raw.control {
            match c.get_ref().as_str() {
                "off" => cfg.control = None,
                p if p.is_empty() || p.contains('\0') => {
                    self.err(&c.span(), "[server]", "control: a socket path, or \"off\"")
                }
                p => cfg.control = Some(self.base_dir.join(p)),
            }
        }
        match raw.listen {
            None => cfg.listen.push(ListenAddr::Tcp(DEFAULT_LISTEN.to_string())),
            Some(l) if l.get_ref().0.is_empty() => self.err(
                &l.span(),
                "[server]",
                "listen: at least one address is needed",
            ),
            Some(l) => {
                for text in &l.get_ref().0 {
                    match parse_listen(text) {
                        Ok(addr) if cfg.listen.contains(&addr) => self.err(
                            &l.span(),
                            "[server]",
                            format!("listen: {text:?} appears twice"),
                        ),
                        Ok(addr) => cfg.listen.push(addr),
                        Err(e) => self.err(&l.span(), "[server]", format!("listen: {e}")),
                    }
                }
            }
        }
        if let Some(m) = raw.metrics {
            match m.get_ref().parse() {
                Ok(addr) => cfg.metrics = Some(addr),
                Err(_) => self.err(
                    &m.span(),
                    "[server]",
                    format!("metrics: {:?} is not an \"IP:port\" address", m.get_ref()),
                ),
            }
        }
        cfg.tls = raw.tls.and_then(|t| self.tls(t));
        cfg
    }

    fn s3(&mut self, raw: Option<RawS3>) -> S3Config {
        let mut cfg = S3Config {
            endpoint: None,
            region: None,
            path_style: false,
            access_key_id: None,
            secret_access_key: None,
            adaptive_concurrency: true,
        };
        let Some(raw) = raw else { return cfg };
        cfg.adaptive_concurrency = raw.adaptive_concurrency.unwrap_or(true);
        if let Some(e) = &raw.endpoint {
            match check_endpoint(e.get_ref()) {
                Ok(()) => cfg.endpoint = Some(e.get_ref().clone()),
                Err(msg) => self.err(&e.span(), "[s3]", format!("endpoint: {msg}")),
            }
        }
        if let Some(r) = &raw.region {
            if r.get_ref().trim().is_empty() {
                self.err(&r.span(), "[s3]", "region: must not be empty");
            }
            cfg.region = Some(r.get_ref().clone());
        }
        cfg.path_style = raw.path_style.unwrap_or(raw.endpoint.is_some());
        match (&raw.access_key_id, &raw.secret_access_key_file) {
            (Some(id), Some(file)) => {
                if id.get_ref().trim().is_empty() {
                    self.err(&id.span(), "[s3]", "access_key_id: must not be empty");
                }
                cfg.access_key_id = Some(id.get_ref().clone());
                match read_secret(&self.base_dir.join(file.get_ref())) {
                    Ok(secret) => cfg.secret_access_key = Some(secret),
                    Err(msg) => self.err(&file.span(), "[s3]", format!("secret_access_key_file: {msg}")),
                }
            }
            (Some(id), None) => self.err(
                &id.span(),
                "[s3]",
                "access_key_id is set but secret_access_key_file is not (set both, or neither to use the AWS credential chain)",
            ),
            (None, Some(file)) => self.err(
                &file.span(),
                "[s3]",
                "secret_access_key_file is set but access_key_id is not (set both, or neither to use the AWS credential chain)",
            ),
            (None, None) => {}
        }
        cfg
    }

    fn cache(&mut self, raw: Option<RawCache>, max_block: u64) -> CacheConfig {
        let mut cfg = CacheConfig {
            memory: DEFAULT_MEMORY,
            dirty: DEFAULT_DIRTY,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            journal: None,
        };
        let Some(raw) = raw else { return cfg };
        cfg.journal = self.journal_config(&raw, max_block);
        if let Some(m) = &raw.memory {
            if let Some(v) = self.size(m, "[cache]", "memory") {
                cfg.memory = v;
                cfg.dirty = DEFAULT_DIRTY.min(v / 4);
            }
        }
        if let Some(d) = &raw.dirty {
            if let Some(v) = self.size(d, "[cache]", "dirty") {
                cfg.dirty = v;
            }
        }
        let span = raw.dirty.as_ref().or(raw.memory.as_ref()).map(|s| s.span());
        if let Some(span) = span {
            if cfg.dirty > cfg.memory {
                let msg = format!(
                    "dirty ({}) must not exceed memory ({})",
                    format_size(cfg.dirty),
                    format_size(cfg.memory)
                );
                self.err(&span, "[cache]", msg);
            } else if cfg.dirty < max_block.max(1) {
                let msg = format!(
                    "dirty ({}) must hold at least one block of the largest block_size ({})",
                    format_size(cfg.dirty),
                    format_size(max_block)
                );
                self.err(&span, "[cache]", msg);
            }
        }
        if let Some(t) = &raw.flush_timeout {
            match humantime::parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => cfg.flush_timeout = d,
                Ok(_) => self.err(
                    &t.span(),
                    "[cache]",
                    "flush_timeout: must be greater than zero",
                ),
                Err(e) => self.err(
                    &t.span(),
                    "[cache]",
                    format!(
                        "flush_timeout: {:?} is not a duration like \"60s\" ({e})",
                        t.get_ref()
                    ),
                ),
            }
        }
        cfg
    }

    /// `journal` and `journal_size`: the directory must be a usable path, and the size must
    /// hold a few of the largest blocks (a writer waits for room for a whole block).
    fn journal_config(&mut self, raw: &RawCache, max_block: u64) -> Option<JournalConfig> {
        let size = match &raw.journal_size {
            Some(s) => {
                let v = self.size(s, "[cache]", "journal_size")?;
                let least = (4 * max_block).max(1 << 20);
                if v < least {
                    let msg = format!(
                        "journal_size ({}) must be at least {} (four of the largest blocks, and 1MiB)",
                        format_size(v),
                        format_size(least)
                    );
                    self.err(&s.span(), "[cache]", msg);
                    return None;
                }
                if raw.journal.is_none() {
                    self.err(
                        &s.span(),
                        "[cache]",
                        "journal_size: needs journal (a directory)",
                    );
                    return None;
                }
                v
            }
            None => DEFAULT_JOURNAL_SIZE,
        };
        let dir = raw.journal.as_ref()?;
        let text = dir.get_ref();
        if text.is_empty() || text.contains('\0') {
            self.err(&dir.span(), "[cache]", "journal: a directory path");
            return None;
        }
        Some(JournalConfig {
            dir: self.base_dir.join(text),
            size,
        })
    }

    /// `durability`: "s3" (default) or "local" (needs `[cache] journal`).
    fn durability(&mut self, raw: &RawExport, label: &str) -> Durability {
        let Some(d) = &raw.durability else {
            return Durability::S3;
        };
        match d.get_ref().as_str() {
            "s3" => Durability::S3,
            "local" if self.journal => Durability::Local,
            "local" => {
                let msg = "durability: \"local\" needs a journal directory ([cache] journal)";
                self.err(&d.span(), label, msg);
                Durability::S3
            }
            other => {
                let msg = format!("durability: {other:?} is neither \"s3\" nor \"local\"");
                self.err(&d.span(), label, msg);
                Durability::S3
            }
        }
    }

    /// A size value; records a diagnostic naming `key` and returns `None` when invalid.
    fn size(&mut self, v: &Spanned<RawSize>, label: &str, key: &str) -> Option<u64> {
        let result = match v.get_ref() {
            RawSize::Text(t) => parse_size(t).map_err(|e| e.to_string()),
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
        };
        match result {
            Ok(n) => Some(n),
            Err(msg) => {
                self.err(&v.span(), label, format!("{key}: {msg}"));
                None
            }
        }
    }

    fn exports(&mut self, raw: Vec<Spanned<RawExport>>) -> Vec<ExportConfig> {
        let mut out = Vec::with_capacity(raw.len());
        let mut first_line: HashMap<String, usize> = HashMap::new();
        // (bucket, prefix, name, line of prefix) of every accepted export, for overlap checks.
        let mut placed: Vec<(String, String, String, usize)> = Vec::new();
        // Per accepted export: the span of its `base` and whether it names a block size.
        let mut spans = Vec::new();
        for item in raw {
            let header_line = line_of(self.src, item.span().start);
            let raw = item.into_inner();
            let Some(export) = self.export(&raw) else {
                continue;
            };
            let label = format!("export {:?}", export.name);
            let name_span = raw.name.span();
            if let Some(line) = first_line.get(&export.name) {
                self.err(
                    &name_span,
                    &label,
                    format!("duplicate export name (first defined on line {line})"),
                );
                continue;
            }
            first_line.insert(export.name.clone(), header_line);
            let prefix_span = raw.prefix.as_ref().map(|p| p.span()).unwrap_or(name_span);
            for (bucket, prefix, other, line) in &placed {
                if *bucket == export.bucket
                    && (prefix.starts_with(&export.prefix)
                        || export.prefix.starts_with(prefix.as_str()))
                {
                    let msg = format!(
                        "prefix {:?} in bucket {bucket:?} overlaps export {other:?} (prefix {prefix:?}, line {line}); prefixes in one bucket must not be prefixes of each other",
                        export.prefix
                    );
                    self.err(&prefix_span, &label, msg);
                }
            }
            placed.push((
                export.bucket.clone(),
                export.prefix.clone(),
                export.name.clone(),
                line_of(self.src, prefix_span.start),
            ));
            out.push(export);
            spans.push((
                raw.base.as_ref().map(|b| b.span()),
                raw.block_size.is_some(),
            ));
        }
        self.bases(&mut out, &spans);
        out
    }

    /// Clones: where their base export's objects are, and its block size (inherited when
    /// the clone names none; a different one is an error: blocks would not line up).
    fn bases(&mut self, exports: &mut [ExportConfig], spans: &[(Option<Range<usize>>, bool)]) {
        let by_name: HashMap<String, (String, String, u32)> = exports
            .iter()
            .map(|e| {
                (
                    e.name.clone(),
                    (e.bucket.clone(), e.prefix.clone(), e.block_size),
                )
            })
            .collect();
        for (export, (span, explicit_bs)) in exports.iter_mut().zip(spans) {
            let Some(base) = &mut export.base else {
                continue;
            };
            let Some((bucket, prefix, bs)) = by_name.get(&base.export) else {
                continue; // created already, or refused when it is first opened
            };
            if *explicit_bs && *bs != export.block_size {
                let msg = format!(
                    "block_size {} differs from the block_size {} of its base export {:?}",
                    export.block_size, bs, base.export
                );
                let label = format!("export {:?}", export.name);
                self.err(span.as_ref().unwrap_or(&(0..0)), &label, msg);
            }
            export.block_size = *bs;
            base.location = Some((bucket.clone(), prefix.clone()));
        }
    }

    fn export(&mut self, raw: &RawExport) -> Option<ExportConfig> {
        let name = raw.name.get_ref().clone();
        let label = format!("export {name:?}");
        let before = self.errors.len();
        if let Err(msg) = check_name(&name) {
            self.err(&raw.name.span(), &label, format!("name: {msg}"));
        }
        if let Err(msg) = check_bucket(raw.bucket.get_ref()) {
            self.err(&raw.bucket.span(), &label, format!("bucket: {msg}"));
        }
        let (prefix, prefix_span) = match &raw.prefix {
            Some(p) => (p.get_ref().clone(), p.span()),
            None => (format!("{name}/"), raw.name.span()),
        };
        if let Err(msg) = check_prefix(&prefix) {
            self.err(&prefix_span, &label, format!("prefix {prefix:?}: {msg}"));
        }
        let size = self.size(&raw.size, &label, "size");
        if let Some(size) = size {
            if size == 0 || size % 512 != 0 || size > i64::MAX as u64 {
                let msg = format!("size: {size} bytes is not a positive multiple of 512");
                self.err(&raw.size.span(), &label, msg);
            }
        }
        let block_size = match &raw.block_size {
            None => Some(u64::from(DEFAULT_BLOCK_SIZE)),
            Some(b) => self.size(b, &label, "block_size").filter(|&v| {
                let ok = v.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&v);
                if !ok {
                    let msg = format!(
                        "block_size: {v} bytes is not a power of two between 4KiB and 8MiB"
                    );
                    self.err(&b.span(), &label, msg);
                }
                ok
            }),
        };
        if let Some(d) = &raw.description {
            if d.get_ref().len() > MAX_NAME_LEN || d.get_ref().contains('\0') {
                self.err(
                    &d.span(),
                    &label,
                    "description: must be at most 4096 bytes without NUL",
                );
            }
        }
        let allow = raw.allow.as_ref().and_then(|a| self.allow(a, &label));
        let lease = self.lease(raw.lease.as_ref(), &label);
        let codec = self.codec(raw, &label);
        let base = raw.base.as_ref().and_then(|b| {
            let parsed = parse_base(b.get_ref(), &name);
            if let Err(msg) = &parsed {
                self.err(&b.span(), &label, format!("base: {msg}"));
            }
            parsed.ok()
        });
        let auto_snapshots = self.auto_snapshots(raw, &label);
        let durability = self.durability(raw, &label);
        if self.errors.len() != before {
            return None;
        }
        Some(ExportConfig {
            name,
            size: size?,
            bucket: raw.bucket.get_ref().clone(),
            prefix,
            block_size: u32::try_from(block_size?).ok()?,
            read_only: raw.read_only.unwrap_or(false),
            description: raw.description.as_ref().map(|d| d.get_ref().clone()),
            allow,
            lease,
            codec,
            base,
            auto_snapshots,
            durability,
        })
    }

    /// `compression` and `encryption_key_file` (read now: a missing, open or short key file
    /// is a configuration error, not a surprise at open).
    fn codec(&mut self, raw: &RawExport, label: &str) -> CodecConfig {
        let mut codec = CodecConfig::default();
        if let Some(c) = &raw.compression {
            match Compression::parse(c.get_ref()) {
                Ok(v) => codec.compression = v,
                Err(msg) => self.err(&c.span(), label, format!("compression: {msg}")),
            }
        }
        if let Some(f) = &raw.encryption_key_file {
            match EncryptionKey::read(&self.base_dir.join(f.get_ref())) {
                Ok(key) => codec.encryption = Some(key),
                Err(msg) => self.err(&f.span(), label, format!("encryption_key_file: {msg}")),
            }
        }
        codec
    }
}

impl Checker<'_> {
    /// `snapshot_every` (at least 10 s) and `snapshot_keep` (at least 1; only with
    /// `snapshot_every`).
    fn auto_snapshots(&mut self, raw: &RawExport, label: &str) -> Option<super::AutoSnapshots> {
        let keep = raw
            .snapshot_keep
            .as_ref()
            .and_then(|k| match u32::try_from(*k.get_ref()) {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    self.err(&k.span(), label, "snapshot_keep: a count of at least 1");
                    None
                }
            });
        let Some(every) = &raw.snapshot_every else {
            if let Some(k) = &raw.snapshot_keep {
                self.err(&k.span(), label, "snapshot_keep needs snapshot_every");
            }
            return None;
        };
        match humantime::parse_duration(every.get_ref()) {
            Ok(d) if d >= std::time::Duration::from_secs(10) => {
                Some(super::AutoSnapshots { every: d, keep })
            }
            Ok(_) => {
                self.err(&every.span(), label, "snapshot_every: at least \"10s\"");
                None
            }
            Err(e) => {
                let msg = format!(
                    "snapshot_every: {:?} is not a duration like \"1h\" ({e})",
                    every.get_ref()
                );
                self.err(&every.span(), label, msg);
                None
            }
        }
    }
}

/// `base = "EXPORT@SNAP"`: the last `@` splits (export names may contain one).
fn parse_base(text: &str, me: &str) -> Result<super::BaseRef, String> {
    let (export, snapshot) = text
        .rsplit_once('@')
        .ok_or_else(|| format!("{text:?} is not \"EXPORT@SNAPSHOT\""))?;
    check_name(export).map_err(|m| format!("export name {m}"))?;
    check_snapshot_name(snapshot)?;
    if export == me {
        return Err("an export cannot be based on its own snapshot".into());
    }
    Ok(super::BaseRef {
        export: export.to_owned(),
        snapshot: snapshot.to_owned(),
        location: None,
    })
}

/// Parses one `listen` entry: `"host:port"` or `"unix:/path"`.
pub fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() || path.contains('\0') {
            return Err(format!("{text:?} needs a socket path after \"unix:\""));
        }
        return Ok(ListenAddr::Unix(path.into()));
    }
    let bad = || format!("{text:?} is not \"host:port\" or \"unix:/path\"");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return Err(format!(
            "{text:?}: write IPv6 addresses in brackets, e.g. \"[::1]:10809\""
        ));
    }
    Ok(ListenAddr::Tcp(text.to_string()))
}

/// Longest snapshot name.
const MAX_SNAPSHOT_NAME: usize = 64;

/// Snapshot names: 1-64 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SNAPSHOT_NAME
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid snapshot name {name:?}: use 1-{MAX_SNAPSHOT_NAME} characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// Export names: what NBD clients send, so non-empty, at most 4096 bytes, no NUL.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if name.contains('\0') {
        return Err("must not contain NUL".into());
    }
    Ok(())
}

/// Bucket names also become directory names in the `file://` store: no paths allowed.
pub fn check_bucket(bucket: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("must not be empty".into());
    }
    if bucket.len() > 255 || bucket.contains(['/', '\\', '\0']) || bucket == "." || bucket == ".." {
        return Err(format!("{bucket:?} is not a valid bucket name"));
    }
    Ok(())
}

/// Prefixes also become paths in the `file://` store: no `..`, no leading `/`, no NUL.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.starts_with('/') || prefix.contains('\0') || prefix.split('/').any(|c| c == "..") {
        return Err("must be a relative key prefix without \"..\" components".into());
    }
    if prefix.len() > 512 {
        return Err("is longer than 512 bytes".into());
    }
    Ok(())
}

/// Endpoints: `http(s)://host[:port]` or `file:///absolute/dir`.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if let Some(path) = endpoint.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(format!(
                "{endpoint:?}: a file:// endpoint needs an absolute path (file:///var/lib/nbd-s3)"
            ));
        }
        return Ok(());
    }
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| format!("{endpoint:?} must start with http://, https:// or file://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{endpoint:?} has no host"));
    }
    Ok(())
}

/// Reads a secret file that only its owner may read; the trailing newline is not part of it.
pub fn read_secret(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}, readable by group or others; run chmod 600 {shown}"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(secret.to_string())
}
