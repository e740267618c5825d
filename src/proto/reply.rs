//! Server-side encoders: greeting, option replies, export info, simple replies and structured
//! chunks. They write into any `BufMut` (a `Vec`, a `BytesMut`, or a fixed `&mut [u8]`), so the
//! server can build small headers on the stack and stream payloads separately.

use super::consts::*;
use bytes::BufMut;

/// Length of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;
/// Length of a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// The 18-byte greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Header of an option reply; `len` bytes of data must follow.
pub fn option_reply_header(buf: &mut impl BufMut, option: u32, reply: u32, len: u32) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(len);
}

/// A complete option reply with its data (errors carry a human-readable message).
pub fn option_reply(buf: &mut impl BufMut, option: u32, reply: u32, data: &[u8]) {
    option_reply_header(buf, option, reply, data.len() as u32);
    buf.put_slice(data);
}

/// One NBD_REP_SERVER entry of a LIST reply: name, then the optional description.
pub fn list_entry(buf: &mut impl BufMut, name: &str, description: Option<&str>) {
    let desc = description.unwrap_or("");
    option_reply_header(
        buf,
        OPT_LIST,
        REP_SERVER,
        (4 + name.len() + desc.len()) as u32,
    );
    buf.put_u32(name.len() as u32);
    buf.put_slice(name.as_bytes());
    buf.put_slice(desc.as_bytes());
}

/// NBD_INFO_EXPORT: size and transmission flags.
pub fn info_export(buf: &mut impl BufMut, option: u32, size: u64, tflags: u16) {
    option_reply_header(buf, option, REP_INFO, 12);
    buf.put_u16(INFO_EXPORT);
    buf.put_u64(size);
    buf.put_u16(tflags);
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION: a string without length prefix.
pub fn info_string(buf: &mut impl BufMut, option: u32, info: u16, s: &str) {
    option_reply_header(buf, option, REP_INFO, (2 + s.len()) as u32);
    buf.put_u16(info);
    buf.put_slice(s.as_bytes());
}

/// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block sizes.
pub fn info_block_size(buf: &mut impl BufMut, option: u32, min: u32, preferred: u32, max: u32) {
    option_reply_header(buf, option, REP_INFO, 14);
    buf.put_u16(INFO_BLOCK_SIZE);
    buf.put_u32(min);
    buf.put_u32(preferred);
    buf.put_u32(max);
}

/// NBD_REP_META_CONTEXT: a context id and its name.
pub fn meta_context(buf: &mut impl BufMut, option: u32, id: u32, name: &str) {
    option_reply_header(buf, option, REP_META_CONTEXT, (4 + name.len()) as u32);
    buf.put_u32(id);
    buf.put_slice(name.as_bytes());
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes.
pub fn export_name_reply(buf: &mut impl BufMut, size: u64, tflags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(tflags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

/// A simple reply header; READ data follows it.
pub fn simple_reply(buf: &mut impl BufMut, errno: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(errno);
    buf.put_u64(cookie);
}

/// A structured chunk header; `len` payload bytes follow.
pub fn chunk_header(buf: &mut impl BufMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(kind);
    buf.put_u64(cookie);
    buf.put_u32(len);
}

/// OFFSET_DATA chunk header and offset; `data_len` bytes of data must follow.
pub fn offset_data_header(
    buf: &mut impl BufMut,
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
) {
    chunk_header(
        buf,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    buf.put_u64(offset);
}

/// A complete OFFSET_HOLE chunk: `len` bytes at `offset` read as zeros.
pub fn offset_hole(buf: &mut impl BufMut, flags: u16, cookie: u64, offset: u64, len: u32) {
    chunk_header(buf, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    buf.put_u64(offset);
    buf.put_u32(len);
}

/// A complete NONE chunk (used to end a zero-length read).
pub fn none_chunk(buf: &mut impl BufMut, cookie: u64) {
    chunk_header(buf, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// A complete ERROR chunk with DONE set; the message is for humans.
pub fn error_chunk(buf: &mut impl BufMut, cookie: u64, errno: u32, message: &str) {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    chunk_header(
        buf,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    buf.put_u32(errno);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg);
}

/// A complete BLOCK_STATUS chunk with DONE set: `(length, flags)` descriptors for `context`.
pub fn block_status(buf: &mut impl BufMut, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    chunk_header(buf, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    buf.put_u32(context);
    for &(length, flags) in extents {
        buf.put_u32(length);
        buf.put_u32(flags);
    }
}

#[cfg(test)]
mod tests;
