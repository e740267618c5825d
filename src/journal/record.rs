//! One journal record on disk: a fixed header (magic, kind, record number, offset, length,
//! CRC-32C over header and payload), then the payload of a write. Decoding checks the length
//! against the largest payload before allocating, and the checksum before anything is
//! applied, so a torn or foreign tail is recognised and never replayed.

use std::io::{self, Read};

/// Marks the start of every record.
pub const MAGIC: [u8; 4] = *b"NBJR";
/// Bytes of the header before any payload.
pub const HEADER: usize = 32;
/// Largest payload: one block of the largest block size.
pub const MAX_PAYLOAD: u32 = 8 << 20;

/// What a record says happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `data` was written at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// `len` bytes at `offset` now read as zeros (TRIM, WRITE_ZEROES, an all-zero write).
    Zero { offset: u64, len: u32 },
    /// A FLUSH: the writes before it form one epoch, uploaded before any write after it.
    Flush,
}

impl Entry {
    /// Bytes this entry takes on disk.
    pub fn encoded_len(&self) -> usize {
        HEADER + self.payload().len()
    }

    fn payload(&self) -> &[u8] {
        match self {
            Entry::Write { data, .. } => data,
            _ => &[],
        }
    }
}

/// A record read back: its number and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub number: u64,
    pub entry: Entry,
}

/// Appends the record for `entry` numbered `number` to `out`. Borrowed data so the write
/// path copies a block once, straight into the journal buffer.
pub fn encode(out: &mut Vec<u8>, number: u64, kind: Kind<'_>) {
    let (k, offset, len, payload): (u8, u64, u32, &[u8]) = match kind {
        Kind::Write { offset, data } => (1, offset, data.len() as u32, data),
        Kind::Zero { offset, len } => (2, offset, len, &[]),
        Kind::Flush => (3, 0, 0, &[]),
    };
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[k, 0, 0, 0]);
    out.extend_from_slice(&number.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..]), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// An entry by reference, for encoding without an owned copy.
#[derive(Debug, Clone, Copy)]
pub enum Kind<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u32 },
    Flush,
}

impl Kind<'_> {
    /// Bytes this record takes on disk.
    pub fn encoded_len(&self) -> usize {
        match self {
            Kind::Write { data, .. } => HEADER + data.len(),
            _ => HEADER,
        }
    }
}

/// Encodes an owned entry (tests, tools).
pub fn encode_entry(out: &mut Vec<u8>, number: u64, entry: &Entry) {
    encode(out, number, entry.as_kind());
}

impl Entry {
    /// The entry by reference, for [`encode`] and the journal's append.
    pub fn as_kind(&self) -> Kind<'_> {
        match self {
            Entry::Write { offset, data } => Kind::Write {
                offset: *offset,
                data,
            },
            Entry::Zero { offset, len } => Kind::Zero {
                offset: *offset,
                len: *len,
            },
            Entry::Flush => Kind::Flush,
        }
    }
}

/// Why reading stopped before a whole, valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Clean end: no byte of a further record.
    End,
    /// A partial or damaged record (torn write, foreign bytes): it and all after it are
    /// discarded.
    Torn(String),
}

/// Reads the next record. `Err(Stop::End)` at a clean end, `Err(Stop::Torn)` for a record
/// cut short or failing its checks. I/O errors other than a short read are returned as they
/// are (the caller must not mistake an unreadable disk for a torn tail).
pub fn read<R: Read>(r: &mut R) -> io::Result<Result<Record, Stop>> {
    let mut h = [0u8; HEADER];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Ok(Err(Stop::End));
    }
    if got < HEADER {
        return Ok(Err(Stop::Torn(format!(
            "header cut short after {got} bytes"
        ))));
    }
    if h[0..4] != MAGIC {
        return Ok(Err(Stop::Torn("no record magic".into())));
    }
    let kind = h[4];
    let number = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    let offset = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(h[24..28].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(h[28..32].try_into().unwrap_or_default());
    let payload_len = match kind {
        1 if len <= MAX_PAYLOAD => len as usize,
        1 => {
            return Ok(Err(Stop::Torn(format!(
                "payload of {len} bytes is too long"
            ))))
        }
        2 | 3 => 0,
        k => return Ok(Err(Stop::Torn(format!("unknown record kind {k}")))),
    };
    if h[5..8] != [0, 0, 0] {
        return Ok(Err(Stop::Torn("reserved header bytes are not zero".into())));
    }
    let mut data = vec![0u8; payload_len];
    let got = read_full(r, &mut data)?;
    if got < payload_len {
        return Ok(Err(Stop::Torn(format!(
            "payload cut short: {got} of {payload_len} bytes"
        ))));
    }
    let sum = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), &data);
    if sum != crc {
        return Ok(Err(Stop::Torn("checksum mismatch".into())));
    }
    let entry = match kind {
        1 => Entry::Write { offset, data },
        2 => Entry::Zero { offset, len },
        _ if offset == 0 && len == 0 => Entry::Flush,
        _ => return Ok(Err(Stop::Torn("flush record with a range".into()))),
    };
    Ok(Ok(Record { number, entry }))
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests;
