//! What a block object holds for an export with `compression` or `encryption_key_file`: the
//! block compressed (when it shrinks) and sealed, behind a versioned header (`format`). An
//! export with neither keeps raw objects and never reaches this module.
//!
//! Pure CPU work on byte slices, no I/O: `objects` runs it off the async threads.

mod cipher;
mod compress;
mod format;

pub(crate) use cipher::{fingerprint, ALGORITHM};

use crate::config::{CodecConfig, Compression};
use format::{Header, Method, HEADER_LEN};
use std::path::PathBuf;

/// Why an object could not be turned back into its block. Never wrong data: the read fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The object is not a well-formed block object of this export (header, lengths,
    /// compressed stream).
    Malformed(String),
    /// The object does not authenticate under the export's key: wrong key, altered, truncated,
    /// or moved from another block or export.
    Decrypt { key_file: PathBuf },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(m) => f.write_str(m),
            DecodeError::Decrypt { key_file } => write!(
                f,
                "does not decrypt with the key in {} (wrong key, or the object was altered, truncated or moved)",
                key_file.display()
            ),
        }
    }
}

/// The encoded object and what it cost, for the logical vs stored byte counters.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub object: Vec<u8>,
    /// Whether the payload is compressed (the block shrank).
    pub compressed: bool,
}

/// One export's block codec.
#[derive(Debug)]
pub(crate) struct Codec {
    compression: Compression,
    cipher: Option<(cipher::Cipher, PathBuf)>,
    block_size: usize,
}

impl Codec {
    /// The codec for `cfg`, or `None` for a plain export (raw objects, no header).
    pub fn new(cfg: &CodecConfig, block_size: usize) -> Option<Self> {
        if cfg.is_plain() {
            return None;
        }
        let cipher = cfg
            .encryption
            .as_ref()
            .map(|k| (cipher::Cipher::new(k.expose()), k.path().to_path_buf()));
        Some(Self {
            compression: cfg.compression,
            cipher,
            block_size,
        })
    }

    /// The key file of an encrypted export (log lines name it).
    pub fn key_file(&self) -> Option<&std::path::Path> {
        self.cipher.as_ref().map(|(_, path)| path.as_path())
    }

    /// The object for block `block` of the export (or layer) `id`; `data` is the whole block.
    pub fn encode(&self, id: &str, block: u64, data: &[u8]) -> Result<Encoded, String> {
        let (nonce_len, tag_len) = match self.cipher {
            Some(_) => (cipher::NONCE_LEN, cipher::TAG_LEN),
            None => (0, 0),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + nonce_len + data.len() + tag_len);
        out.resize(HEADER_LEN + nonce_len, 0);
        let at = out.len();
        let compressed = match self.compression {
            Compression::Zstd { level } if compress::worth_trying(level, data) => {
                compress::compress_into(level, data, &mut out)
            }
            _ => false,
        };
        if !compressed {
            out.extend_from_slice(data);
        }
        debug_assert!(out.len() >= at);
        let payload = out.len() - HEADER_LEN + tag_len;
        let header = Header {
            method: if compressed {
                Method::Zstd
            } else {
                Method::Raw
            },
            encrypted: self.cipher.is_some(),
            logical_len: u32::try_from(data.len()).map_err(|_| "block too large")?,
            payload_len: u32::try_from(payload).map_err(|_| "block too large")?,
        }
        .to_bytes();
        out[..HEADER_LEN].copy_from_slice(&header);
        if let Some((c, _)) = &self.cipher {
            c.seal(&header, id, block, &mut out, HEADER_LEN)?;
        }
        debug_assert_eq!(out.len(), HEADER_LEN + payload);
        Ok(Encoded {
            object: out,
            compressed,
        })
    }

    /// The block in `object`, stored as block `block` of the export (or layer) `id`.
    pub fn decode(&self, id: &str, block: u64, object: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let header = Header::parse(object).map_err(DecodeError::Malformed)?;
        if header.logical_len as usize != self.block_size {
            return Err(DecodeError::Malformed(format!(
                "holds a block of {} bytes, expected {}",
                header.logical_len, self.block_size
            )));
        }
        let payload = &object[HEADER_LEN..];
        let plain = match (&self.cipher, header.encrypted) {
            (Some((c, path)), true) => c
                .open(&object[..HEADER_LEN], id, block, payload)
                .ok_or_else(|| DecodeError::Decrypt {
                    key_file: path.clone(),
                })?,
            // Clear text in an encrypted export is never served: anyone who can write the
            // bucket could plant it.
            (Some((_, path)), false) => {
                return Err(DecodeError::Decrypt {
                    key_file: path.clone(),
                })
            }
            (None, true) => {
                return Err(DecodeError::Malformed(
                    "is encrypted but the export has no encryption_key_file".into(),
                ))
            }
            (None, false) => payload.to_vec(),
        };
        match header.method {
            Method::Raw if plain.len() == self.block_size => Ok(plain),
            Method::Raw => Err(DecodeError::Malformed(format!(
                "raw payload of {} bytes, expected {}",
                plain.len(),
                self.block_size
            ))),
            Method::Zstd => {
                compress::decompress(&plain, self.block_size).map_err(DecodeError::Malformed)
            }
        }
    }
}

#[cfg(test)]
mod tests;
