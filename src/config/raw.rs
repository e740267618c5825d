//! The configuration file exactly as written: serde structs that reject unknown keys, with the
//! source span of every value kept so validation errors can name `PATH:LINE`. Nothing here
//! interprets values beyond their TOML type; `validate` turns them into a `Config`.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub s3: Option<RawS3>,
    pub cache: Option<RawCache>,
    #[serde(default)]
    pub export: Vec<Spanned<RawExport>>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<RawListen>>,
    pub metrics: Option<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
    pub control: Option<Spanned<String>>,
}

/// `[server.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
}

/// `[s3]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub endpoint: Option<Spanned<String>>,
    pub region: Option<Spanned<String>>,
    pub path_style: Option<bool>,
    pub access_key_id: Option<Spanned<String>>,
    pub secret_access_key_file: Option<Spanned<String>>,
    pub adaptive_concurrency: Option<bool>,
}

/// `[cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub memory: Option<Spanned<RawSize>>,
    pub dirty: Option<Spanned<RawSize>>,
    pub flush_timeout: Option<Spanned<String>>,
    pub journal: Option<Spanned<String>>,
    pub journal_size: Option<Spanned<RawSize>>,
}

/// One `[[export]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    pub name: Spanned<String>,
    pub size: Spanned<RawSize>,
    pub bucket: Spanned<String>,
    pub prefix: Option<Spanned<String>>,
    pub block_size: Option<Spanned<RawSize>>,
    pub read_only: Option<bool>,
    pub description: Option<Spanned<String>>,
    pub allow: Option<Spanned<Vec<String>>>,
    pub lease: Option<Spanned<String>>,
    pub compression: Option<Spanned<String>>,
    pub encryption_key_file: Option<Spanned<String>>,
    pub base: Option<Spanned<String>>,
    pub snapshot_every: Option<Spanned<String>>,
    pub snapshot_keep: Option<Spanned<i64>>,
    pub durability: Option<Spanned<String>>,
}

/// A size as written: a string with a unit, or a plain integer number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSize {
    Text(String),
    Bytes(i64),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"20GiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom("size is too large"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `listen`: one address or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawListen(pub Vec<String>);

impl<'de> Deserialize<'de> for RawListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawListen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an address string (\"host:port\" or \"unix:/path\") or an array of them",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawListen, E> {
                Ok(RawListen(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawListen, A::Error> {
                let mut all = Vec::new();
                while let Some(addr) = seq.next_element::<String>()? {
                    all.push(addr);
                }
                Ok(RawListen(all))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses the TOML text; errors carry the toml span for `locate`.
pub fn parse(src: &str) -> Result<RawConfig, toml::de::Error> {
    toml::from_str(src)
}
