//! An export's `compression` and `encryption_key_file`: how its blocks are transformed before
//! they leave the machine. Parsed and checked here (the key file is read at validation, like
//! the S3 secret, so `check-config` catches a bad key before the daemon needs it); the block
//! store's codec does the transforming.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Length of an encryption key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// zstd level used by `compression = "zstd"`: zstd's own default, a good speed/ratio balance.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Highest accepted zstd level (above it zstd's "ultra" levels need far more memory).
pub const MAX_ZSTD_LEVEL: i32 = 19;

/// `compression`: whether blocks are compressed before they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Blocks are stored as they are (the default).
    #[default]
    Off,
    /// zstd at this level (1-19).
    Zstd { level: i32 },
}

impl Compression {
    /// Parses `"off"`, `"zstd"` or `"zstd:LEVEL"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(Compression::Off),
            "zstd" => Ok(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            }),
            _ => {
                let bad = || {
                    format!(
                        "{text:?} is not \"off\", \"zstd\" or \"zstd:LEVEL\" with LEVEL 1-{MAX_ZSTD_LEVEL}"
                    )
                };
                let level = text.strip_prefix("zstd:").ok_or_else(bad)?;
                match level.parse::<i32>() {
                    Ok(l) if (1..=MAX_ZSTD_LEVEL).contains(&l) => {
                        Ok(Compression::Zstd { level: l })
                    }
                    _ => Err(bad()),
                }
            }
        }
    }
}

/// The canonical text of a setting, as `nbd-s3.json` records it and messages show it:
/// `off` or `zstd:LEVEL` (so `zstd` and `zstd:3` are the same setting).
impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// The key of `encryption_key_file`, with the path it came from (log lines name the file,
/// never the key). `Debug` shows only the path.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey {
    path: PathBuf,
    key: Arc<[u8; KEY_LEN]>,
}

impl EncryptionKey {
    /// Reads a key file: exactly 32 raw bytes, or 64 hex characters (one trailing newline
    /// ignored), mode 0600 or stricter.
    pub fn read(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown} has mode {mode:04o}, readable by group or others; run chmod 600 {shown}"
            ));
        }
        // A key file is tiny: refuse to read anything large (a wrong path to a disk image).
        if meta.len() > 256 {
            return Err(format!(
                "{shown} is {} bytes; a key is 32 raw bytes or 64 hex characters",
                meta.len()
            ));
        }
        let raw = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let key = parse_key(&raw).ok_or_else(|| {
            format!(
                "{shown} is {} bytes; a key is 32 raw bytes or 64 hex characters (one trailing newline allowed)",
                raw.len()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            key: Arc::new(key),
        })
    }

    /// A key from bytes (tests).
    pub fn from_bytes(path: impl Into<PathBuf>, key: [u8; KEY_LEN]) -> Self {
        Self {
            path: path.into(),
            key: Arc::new(key),
        }
    }

    /// The file the key was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key itself, for the one place that needs it (the block cipher).
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.key
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("path", &self.path)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// 32 raw bytes, or 64 hex digits with at most one trailing newline (`\n` or `\r\n`).
fn parse_key(raw: &[u8]) -> Option<[u8; KEY_LEN]> {
    if raw.len() == KEY_LEN {
        return raw.try_into().ok();
    }
    let text = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw);
    if text.len() != 2 * KEY_LEN {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (out, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        *out = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(key)
}

/// An export's codec settings: `compression` and `encryption_key_file`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CodecConfig {
    pub compression: Compression,
    /// `None`: blocks are stored in clear.
    pub encryption: Option<EncryptionKey>,
}

impl CodecConfig {
    /// Whether blocks are stored as they are (no object header): the layout of exports
    /// without either setting.
    pub fn is_plain(&self) -> bool {
        self.compression == Compression::Off && self.encryption.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn compression_settings_parse_and_print_canonically() {
        assert_eq!(Compression::parse("off"), Ok(Compression::Off));
        assert_eq!(
            Compression::parse("zstd").map(|c| c.to_string()),
            Ok("zstd:3".into())
        );
        assert_eq!(
            Compression::parse("zstd:19"),
            Ok(Compression::Zstd { level: 19 })
        );
        for bad in [
            "", "zstd:0", "zstd:20", "zstd:", "zstd:x", "gzip", "ZSTD", "zstd:-1",
        ] {
            let err = Compression::parse(bad).expect_err(bad);
            assert!(err.contains("zstd:LEVEL"), "{err}");
        }
    }

    fn key_file(dir: &Path, name: &str, body: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn key_files_raw_or_hex_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = [7u8; 32];
        let k = EncryptionKey::read(&key_file(dir.path(), "raw", &raw, 0o600)).expect("raw");
        assert_eq!(k.expose(), &raw);
        let hex = "00ff".repeat(16);
        for body in [hex.clone(), format!("{hex}\n"), format!("{hex}\r\n")] {
            let p = key_file(dir.path(), "hex", body.as_bytes(), 0o400);
            let k = EncryptionKey::read(&p).expect("hex");
            assert_eq!(k.expose()[..2], [0, 0xff]);
        }
        let err =
            EncryptionKey::read(&key_file(dir.path(), "open", &raw, 0o640)).expect_err("0640");
        assert!(err.contains("chmod 600"), "{err}");
        for bad in [
            &b"short"[..],
            &[1u8; 33][..],
            format!("{hex}\n\n").as_bytes(),
            "zz".repeat(32).as_bytes(),
        ] {
            let err =
                EncryptionKey::read(&key_file(dir.path(), "bad", bad, 0o600)).expect_err("bad");
            assert!(err.contains("32 raw bytes or 64 hex"), "{err}");
        }
        let err = EncryptionKey::read(&dir.path().join("missing")).expect_err("missing");
        assert!(err.contains("cannot read"), "{err}");
        assert!(
            !format!("{k:?}").contains("255"),
            "Debug shows no key bytes"
        );
    }
}
