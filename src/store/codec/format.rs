//! The header every block object of a compressed or encrypted export starts with. It makes
//! each object self-describing (a block that did not shrink is stored raw and says so), and
//! versioned, so a later format can be read next to this one.
//!
//! ```text
//! offset size
//!  0     4    magic "NBS3"
//!  4     1    format version (1)
//!  5     1    codec: 0 = none (raw), 1 = zstd
//!  6     1    flags: bit 0 = encrypted; other bits must be 0
//!  7     1    reserved, 0
//!  8     4    logical length: the block's bytes once decoded (= block_size), little endian
//! 12     4    payload length: bytes after the header, little endian
//! 16          payload: the (compressed or raw) block; when encrypted, a 12-byte nonce, the
//!             ciphertext and a 16-byte tag
//! ```

/// First bytes of every encoded block object.
pub const MAGIC: [u8; 4] = *b"NBS3";
/// The one header version this daemon writes and reads.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// Flag: the payload is sealed with the export's key.
pub const FLAG_ENCRYPTED: u8 = 1;

/// How the payload (after decryption) holds the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The block's bytes as they are (compression off, or the block did not shrink).
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub method: Method,
    pub encrypted: bool,
    pub logical_len: u32,
    pub payload_len: u32,
}

impl Header {
    /// The 16 header bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.method as u8;
        out[6] = if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        out[8..12].copy_from_slice(&self.logical_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Parses and checks the header of `object` (its whole bytes): the payload length must
    /// match what follows, so a truncated or extended object is caught before any work.
    pub fn parse(object: &[u8]) -> Result<Header, String> {
        let Some(h) = object.get(..HEADER_LEN) else {
            return Err(format!("{} bytes, shorter than the header", object.len()));
        };
        if h[..4] != MAGIC {
            return Err(
                "no block header (not written by a compressing or encrypting export)".into(),
            );
        }
        if h[4] != VERSION {
            return Err(format!("unknown block format version {}", h[4]));
        }
        let method = match h[5] {
            0 => Method::Raw,
            1 => Method::Zstd,
            other => return Err(format!("unknown codec {other}")),
        };
        if h[6] & !FLAG_ENCRYPTED != 0 || h[7] != 0 {
            return Err(format!("unknown flags {:#04x}/{:#04x}", h[6], h[7]));
        }
        let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let header = Header {
            method,
            encrypted: h[6] & FLAG_ENCRYPTED != 0,
            logical_len: word(8),
            payload_len: word(12),
        };
        let rest = object.len() - HEADER_LEN;
        if rest != header.payload_len as usize {
            return Err(format!(
                "payload is {rest} bytes, header says {}",
                header.payload_len
            ));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_damage_is_named() {
        let h = Header {
            method: Method::Zstd,
            encrypted: true,
            logical_len: 131072,
            payload_len: 3,
        };
        let mut obj = h.to_bytes().to_vec();
        assert_eq!(&obj[..8], b"NBS3\x01\x01\x01\x00");
        obj.extend_from_slice(b"abc");
        assert_eq!(Header::parse(&obj), Ok(h));
        let cases: [(usize, u8, &str); 5] = [
            (0, b'X', "no block header"),
            (4, 2, "version 2"),
            (5, 9, "codec 9"),
            (6, 3, "flags"),
            (7, 1, "flags"),
        ];
        for (at, value, msg) in cases {
            let mut bad = obj.clone();
            bad[at] = value;
            let err = Header::parse(&bad).expect_err(msg);
            assert!(err.contains(msg), "{err}");
        }
        assert!(Header::parse(&obj[..obj.len() - 1])
            .expect_err("truncated")
            .contains("header says 3"));
        assert!(Header::parse(&obj[..10])
            .expect_err("tiny")
            .contains("shorter"));
    }
}
