//! Block integrity: every object we write carries the CRC32C of its body, and every read checks
//! it (and the length), so a bit flip or a short read in the store, the network or a proxy
//! becomes `BackendError::Corrupt` instead of wrong data on a client's disk.

use super::BackendError;

/// User-metadata name of the checksum on S3 (sent as `x-amz-meta-nbd-s3-crc32c`).
pub const S3_METADATA_KEY: &str = "nbd-s3-crc32c";

/// The checksum as we store it: 8 lowercase hex digits of the CRC32C.
pub fn crc32c_hex(data: &[u8]) -> String {
    hex_of(crc32c::crc32c(data))
}

/// How a CRC32C is written in object metadata (and xattrs): 8 lowercase hex digits.
pub fn hex_of(crc: u32) -> String {
    format!("{crc:08x}")
}

/// Checks a body read back from the store against what was recorded at write time.
/// `expected_crc` is the stored hex checksum (absent for objects written by other tools, which
/// are then trusted), `expected_len` the length the store announced.
pub fn verify(
    key: &str,
    data: &[u8],
    expected_crc: Option<&str>,
    expected_len: Option<u64>,
) -> Result<(), BackendError> {
    let corrupt = |reason: String| BackendError::Corrupt {
        key: key.to_string(),
        reason,
    };
    if let Some(len) = expected_len {
        if len != data.len() as u64 {
            return Err(corrupt(format!(
                "length {} but {} bytes were expected",
                data.len(),
                len
            )));
        }
    }
    let Some(expected) = expected_crc else {
        return Ok(());
    };
    let expected = parse_crc(expected).ok_or_else(|| {
        corrupt(format!(
            "stored checksum {expected:?} is not a CRC32C in hex"
        ))
    })?;
    let actual = crc32c::crc32c(data);
    if actual != expected {
        return Err(corrupt(format!(
            "CRC32C {actual:08x} but {expected:08x} was stored ({} bytes)",
            data.len()
        )));
    }
    Ok(())
}

/// Parses 1..=8 hex digits (we write 8; be lenient about leading zeros others may strip).
fn parse_crc(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_checksum_and_length_pass() {
        let data = b"hello world";
        let crc = crc32c_hex(data);
        assert_eq!(crc.len(), 8);
        verify("k", data, Some(&crc), Some(11)).unwrap();
        verify("k", data, None, None).unwrap();
    }

    #[test]
    fn bit_flip_is_corrupt() {
        let crc = crc32c_hex(b"hello world");
        let err = verify("vm1/0", b"hello worle", Some(&crc), Some(11)).unwrap_err();
        match err {
            BackendError::Corrupt { key, reason } => {
                assert_eq!(key, "vm1/0");
                assert!(reason.contains("CRC32C"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn short_body_is_corrupt_even_without_checksum() {
        let err = verify("k", b"hell", None, Some(11)).unwrap_err();
        assert!(matches!(err, BackendError::Corrupt { .. }));
    }

    #[test]
    fn garbage_checksum_is_corrupt() {
        for bad in ["", "xyz", "123456789", "12 34"] {
            let err = verify("k", b"a", Some(bad), None).unwrap_err();
            assert!(matches!(err, BackendError::Corrupt { .. }), "{bad:?}");
        }
    }
}
