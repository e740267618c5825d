//! Client side of the fixed-newstyle handshake: flags, option headers and option payloads,
//! parsed into typed values. Every length is checked against what was actually received
//! before anything is allocated from it, so a lying client costs us nothing.

use super::consts::*;

/// Why the handshake cannot continue; the server closes the connection (no reply is possible).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flag bits we never advertised.
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with IHAVEOPT: the stream is out of sync.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// The option claims more data than we are willing to even skip.
    #[error("option {option} length {length} is too large")]
    OptionTooLarge { option: u32, length: u32 },
    /// NBD_OPT_EXPORT_NAME cannot carry an error reply, so a bad one ends the connection.
    #[error("malformed NBD_OPT_EXPORT_NAME: {0}")]
    BadExportName(&'static str),
}

/// A malformed option payload; answered with the reply type in `reply_type()`, then the
/// handshake continues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Lengths inside the payload disagree with the option length, or a string is bad.
    #[error("option {option}: {reason}")]
    Invalid { option: u32, reason: &'static str },
}

impl OptionError {
    /// The option reply type the spec wants for this case.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::Invalid { .. } => REP_ERR_INVALID,
        }
    }
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// Fixed newstyle: unknown options get ERR_UNSUP rather than a disconnect.
    pub fixed_newstyle: bool,
    /// Leave out the 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Parses the client's 32-bit flags; unknown bits mean the client expects something we
/// cannot give, so the spec says to close.
pub fn parse_client_flags(raw: u32) -> Result<ClientFlags, HandshakeError> {
    if raw & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags(raw));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// The 16-byte header in front of every option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// What the server should do with an option's payload, decided before reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadPlan {
    /// Read `length` bytes and parse them.
    Read,
    /// Read and drop the bytes without allocating, then reply ERR_TOO_BIG.
    SkipTooBig,
}

/// Payloads up to this size are skipped when too big for their option; beyond it we close,
/// because reading gigabytes of junk only to refuse them is a denial of service.
pub const MAX_SKIP: u32 = 1024 * 1024;

/// The largest payload each option can legitimately need.
pub fn option_length_cap(option: u32) -> u32 {
    let string = MAX_STRING as u32;
    match option {
        OPT_EXPORT_NAME => string,
        // namelen + name + count + a generous list of info requests
        OPT_INFO | OPT_GO => 4 + string + 2 + 2 * 256,
        // export name + a few full-length queries
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => 8 + 4 * (4 + string),
        _ => 4096,
    }
}

impl OptionHeader {
    /// Decides, from the claimed length alone, whether to read, skip or give up.
    pub fn payload_plan(&self) -> Result<PayloadPlan, HandshakeError> {
        if self.length <= option_length_cap(self.option) {
            return Ok(PayloadPlan::Read);
        }
        if self.option == OPT_EXPORT_NAME || self.length > MAX_SKIP {
            return Err(HandshakeError::OptionTooLarge {
                option: self.option,
                length: self.length,
            });
        }
        Ok(PayloadPlan::SkipTooBig)
    }
}

/// Parses an option header; the magic must match or the stream is garbage.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, HandshakeError> {
    let magic = u64::from_be_bytes(buf[0..8].try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        length: u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]),
    })
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested NBD_INFO_* types (unknown ones are ignored by the server).
    pub info: Vec<u16>,
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    /// Each query is `namespace:rest`; syntax is checked here.
    pub queries: Vec<String>,
}

/// A fully parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    ExtendedHeaders,
    /// Anything else (PEEK_EXPORT included): ERR_UNSUP.
    Unknown(u32),
}

/// Parses an option payload. A bad EXPORT_NAME is `Fatal` (that option has no error reply);
/// any other malformed payload is a `Reply` error (ERR_INVALID) and negotiation goes on.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ParseOptionError> {
    let invalid = |reason| ParseOptionError::Reply(OptionError::Invalid { option, reason });
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(invalid("option must not carry data"))
        }
    };
    match option {
        OPT_EXPORT_NAME => check_string(data)
            .map(|s| ClientOption::ExportName(s.to_owned()))
            .map_err(|r| ParseOptionError::Fatal(HandshakeError::BadExportName(r))),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
        OPT_INFO => parse_info(data).map(ClientOption::Info).map_err(invalid),
        OPT_GO => parse_info(data).map(ClientOption::Go).map_err(invalid),
        OPT_LIST_META_CONTEXT => parse_meta(data)
            .map(ClientOption::ListMetaContext)
            .map_err(invalid),
        OPT_SET_META_CONTEXT => parse_meta(data)
            .map(ClientOption::SetMetaContext)
            .map_err(invalid),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// The two tiers of option failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseOptionError {
    /// Reply with an error and keep negotiating.
    #[error(transparent)]
    Reply(#[from] OptionError),
    /// Close the connection.
    #[error(transparent)]
    Fatal(#[from] HandshakeError),
}

/// A cursor over an option payload that never reads past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u32-length-prefixed string, the length checked against the bytes present.
    fn string(&mut self) -> Result<&'a str, &'static str> {
        let len = self.u32().ok_or("truncated string length")? as usize;
        let bytes = self
            .take(len)
            .ok_or("string length exceeds option length")?;
        check_string(bytes)
    }
}

/// Strings on the wire: at most 4096 bytes of UTF-8 without NUL.
fn check_string(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.len() > MAX_STRING {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")
}

fn parse_info(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut c = Cursor(data);
    let name = c.string()?.to_owned();
    let count = c.u16().ok_or("truncated information request count")? as usize;
    if c.0.len() != count * 2 {
        return Err("information request count disagrees with option length");
    }
    let info = (0..count).filter_map(|_| c.u16()).collect();
    Ok(InfoRequest { name, info })
}

fn parse_meta(data: &[u8]) -> Result<MetaContextRequest, &'static str> {
    let mut c = Cursor(data);
    let export = c.string()?.to_owned();
    let count = c.u32().ok_or("truncated query count")?;
    // Each query needs at least its 4-byte length: bound the count before trusting it.
    if count as usize > c.0.len() / 4 {
        return Err("query count exceeds option length");
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let q = c.string()?;
        if !q.contains(':') {
            return Err("meta context query lacks a namespace");
        }
        queries.push(q.to_owned());
    }
    if !c.0.is_empty() {
        return Err("trailing bytes after meta context queries");
    }
    Ok(MetaContextRequest { export, queries })
}

/// Client-side encoder of an option (tests, fuzz seeds, hostile clients).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Client-side encoder of an INFO/GO payload.
pub fn encode_info_request(name: &str, info: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for i in info {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

/// Client-side encoder of a LIST/SET_META_CONTEXT payload.
pub fn encode_meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests;
