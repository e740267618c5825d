//! Block encryption: AES-256-GCM-SIV with a random 96-bit nonce per PUT. GCM-SIV stays safe
//! when random nonces collide (a repeat reveals only that two identical blocks were written
//! with the same nonce), so one key serves billions of writes. The associated data binds the
//! header, the export's identity and the block index: an object moved to another block or
//! export, or with its header changed, fails to open.

pub use aws_lc_rs::aead::NONCE_LEN;
use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM_SIV};
use aws_lc_rs::hmac;

/// Bytes the cipher adds to a payload: nonce in front, tag behind.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Length of the authentication tag after the ciphertext.
pub const TAG_LEN: usize = 16;

/// The algorithm's name in `nbd-s3.json`.
pub const ALGORITHM: &str = "aes-256-gcm-siv";

/// One export's sealing and opening key.
pub struct Cipher {
    key: RandomizedNonceKey,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(aes-256-gcm-siv, <redacted>)")
    }
}

/// The associated data of block `block` of the export `id` with header `header`.
fn aad(header: &[u8], id: &str, block: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + id.len() + 8);
    aad.extend_from_slice(header);
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(&block.to_be_bytes());
    aad
}

impl Cipher {
    pub fn new(key: &[u8; 32]) -> Self {
        let key = RandomizedNonceKey::new(&AES_256_GCM_SIV, key)
            // A 32-byte key is always accepted; reaching this is a library bug.
            .expect("AES-256-GCM-SIV accepts any 32-byte key");
        Self { key }
    }

    /// Seals in place: `out[at..at + NONCE_LEN]` is room for the nonce, the plaintext follows
    /// it. On return `out` holds, from `at`, the nonce, the ciphertext and the tag. `header`
    /// is authenticated with it.
    pub fn seal(
        &self,
        header: &[u8],
        id: &str,
        block: u64,
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), String> {
        let start = at + NONCE_LEN;
        let Some(plain) = out.get_mut(start..) else {
            return Err("no room for the nonce".into());
        };
        let (nonce, tag) = self
            .key
            .seal_in_place_separate_tag(Aad::from(aad(header, id, block)), plain)
            .map_err(|_| "encryption failed (no randomness?)".to_string())?;
        out[at..start].copy_from_slice(nonce.as_ref());
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens `payload` (nonce, ciphertext, tag): the plaintext, or `None` when it does not
    /// authenticate (wrong key, altered, truncated, or moved from another block or export).
    pub fn open(&self, header: &[u8], id: &str, block: u64, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < OVERHEAD {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&payload[..NONCE_LEN]).ok()?;
        let mut buf = payload[NONCE_LEN..].to_vec();
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad(header, id, block)), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

/// A key's fingerprint for `nbd-s3.json`: a keyed hash of a fixed string, so it identifies
/// the key without revealing anything about it.
pub fn fingerprint(key: &[u8; 32]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, b"nbd-s3 key fingerprint v1");
    let hex: String = tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("hmac-sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_payloads_open_only_in_place_and_with_the_key() {
        let c = Cipher::new(&[1; 32]);
        let mut out = b"HEAD............plaintext".to_vec();
        c.seal(b"HEAD", "id1", 5, &mut out, 4).expect("seal");
        assert_eq!(out.len(), 4 + 9 + OVERHEAD);
        assert_ne!(&out[4..16], b"............");
        assert!(!out.windows(9).any(|w| w == b"plaintext"));
        let payload = &out[4..];
        assert_eq!(
            c.open(b"HEAD", "id1", 5, payload).as_deref(),
            Some(&b"plaintext"[..])
        );
        assert!(c.open(b"HEAD", "id1", 6, payload).is_none(), "other block");
        assert!(c.open(b"HEAD", "id2", 5, payload).is_none(), "other export");
        assert!(c.open(b"HEAX", "id1", 5, payload).is_none(), "other header");
        assert!(Cipher::new(&[2; 32])
            .open(b"HEAD", "id1", 5, payload)
            .is_none());
        assert!(c
            .open(b"HEAD", "id1", 5, &payload[..payload.len() - 1])
            .is_none());
        assert!(c.open(b"HEAD", "id1", 5, &payload[..3]).is_none());
        let mut flipped = payload.to_vec();
        flipped[NONCE_LEN + 2] ^= 1;
        assert!(c.open(b"HEAD", "id1", 5, &flipped).is_none());
        // A fresh nonce each time: the same block never seals to the same bytes.
        let mut again = b"HEAD............plaintext".to_vec();
        c.seal(b"HEAD", "id1", 5, &mut again, 4).expect("seal");
        assert_ne!(again, out);
    }

    #[test]
    fn fingerprints_identify_keys_without_showing_them() {
        let a = fingerprint(&[1; 32]);
        assert_eq!(a, fingerprint(&[1; 32]));
        assert_ne!(a, fingerprint(&[2; 32]));
        assert!(a.starts_with("hmac-sha256:") && a.len() == 12 + 32, "{a}");
        assert!(!a.contains("0101"), "{a}");
    }
}
