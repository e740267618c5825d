//! Transmission requests: the 28-byte header parsed and validated completely, so the server
//! only ever executes well-formed, in-bounds commands. Errors come in two tiers: `FatalError`
//! closes the connection (the byte stream can no longer be trusted), `RequestError` is
//! answered with an errno and the connection goes on.

use super::consts::*;

/// The connection cannot continue: the stream is out of sync or the client is hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FatalError {
    /// A request that does not start with the request magic.
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    /// A WRITE whose payload on the wire exceeds the advertised maximum: we will not read it.
    #[error("write payload of {0} bytes exceeds the 32 MiB maximum")]
    PayloadTooLarge(u32),
}

/// The raw header, magic checked, nothing else yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// How many payload bytes follow this header on the wire (only WRITE carries data). They
    /// must be consumed even when the request is rejected, to stay in sync.
    pub fn payload_len(&self) -> Result<u32, FatalError> {
        if self.command != CMD_WRITE {
            return Ok(0);
        }
        if self.length > MAX_PAYLOAD {
            return Err(FatalError::PayloadTooLarge(self.length));
        }
        Ok(self.length)
    }

    /// Client-side encoder (tests, fuzz seeds).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Parses a request header; only the magic can make it fail.
pub fn parse_header(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, FatalError> {
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    let magic = be32(0);
    if magic != REQUEST_MAGIC {
        return Err(FatalError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        cookie: be64(8),
        offset: be64(16),
        length: be32(24),
    })
}

/// A known command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    /// Maps a wire number; `None` for commands we do not implement (RESIZE, unknown).
    pub fn from_wire(n: u16) -> Option<Command> {
        Some(match n {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    /// Commands that modify data: refused on read-only exports, ENOSPC past the end.
    pub fn is_write(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }

    /// Flags that make sense with this command (FUA is accepted on all, as the spec says).
    fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

/// Command flags of a validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    /// Force unit access: durable before the reply.
    pub fn fua(self) -> bool {
        self.0 & CMD_FLAG_FUA != 0
    }
    /// WRITE_ZEROES must not punch a hole (we accept it; zeroes are stored as absences anyway).
    pub fn no_hole(self) -> bool {
        self.0 & CMD_FLAG_NO_HOLE != 0
    }
    /// READ: send the data in one chunk.
    pub fn df(self) -> bool {
        self.0 & CMD_FLAG_DF != 0
    }
    /// BLOCK_STATUS: one descriptor only.
    pub fn req_one(self) -> bool {
        self.0 & CMD_FLAG_REQ_ONE != 0
    }
    /// WRITE_ZEROES: fail fast rather than write slowly.
    pub fn fast_zero(self) -> bool {
        self.0 & CMD_FLAG_FAST_ZERO != 0
    }
}

/// A request that passed every check and can be executed as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub command: Command,
    pub flags: CommandFlags,
    pub offset: u64,
    pub length: u32,
}

/// What validation needs to know about the negotiated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size advertised at the handshake.
    pub export_size: u64,
    pub read_only: bool,
    /// Structured replies negotiated (required for DF).
    pub structured: bool,
    /// `base:allocation` selected (required for BLOCK_STATUS).
    pub block_status: bool,
}

/// A request refused with an errno; the connection continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("flags {flags:#x} are not valid for {command:?}")]
    Unsupported { command: Command, flags: u16 },
    #[error("DF requires structured replies")]
    DfWithoutStructured,
    #[error("{0:?} on a read-only export")]
    ReadOnly(Command),
    #[error("length {0} exceeds the 32 MiB maximum")]
    TooLarge(u32),
    #[error("{command:?} of {length} bytes at {offset} is past the end of the export")]
    OutOfRange {
        command: Command,
        offset: u64,
        length: u32,
    },
    #[error("block status without a negotiated base:allocation context")]
    NoMetaContext,
    #[error("block status of zero length")]
    EmptyBlockStatus,
}

impl RequestError {
    /// The errno the client receives, per the checklist's table.
    pub fn to_errno(&self) -> u32 {
        match self {
            RequestError::ReadOnly(_) => EPERM,
            RequestError::OutOfRange {
                command: Command::Write | Command::WriteZeroes,
                ..
            } => ENOSPC,
            _ => EINVAL,
        }
    }
}

/// Validates a header against the negotiated connection. Order matters: command, flags,
/// permissions, size, bounds — the first failing check decides the errno.
pub fn validate(h: &RequestHeader, limits: &Limits) -> Result<Request, RequestError> {
    let command = Command::from_wire(h.command).ok_or(RequestError::UnknownCommand(h.command))?;
    let bad_flags = h.flags & !command.allowed_flags();
    if bad_flags != 0 {
        return Err(RequestError::Unsupported {
            command,
            flags: bad_flags,
        });
    }
    let flags = CommandFlags(h.flags);
    if flags.df() && !limits.structured {
        return Err(RequestError::DfWithoutStructured);
    }
    if command.is_write() && limits.read_only {
        return Err(RequestError::ReadOnly(command));
    }
    // Only READ and WRITE move data; qemu sends TRIM/zero ranges up to 2 GiB regardless.
    if matches!(command, Command::Read | Command::Write) && h.length > MAX_PAYLOAD {
        return Err(RequestError::TooLarge(h.length));
    }
    let ranged = !matches!(command, Command::Disconnect | Command::Flush);
    let in_bounds = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= limits.export_size);
    if ranged && !in_bounds {
        return Err(RequestError::OutOfRange {
            command,
            offset: h.offset,
            length: h.length,
        });
    }
    if command == Command::BlockStatus {
        if !limits.block_status {
            return Err(RequestError::NoMetaContext);
        }
        if h.length == 0 {
            return Err(RequestError::EmptyBlockStatus);
        }
    }
    Ok(Request {
        cookie: h.cookie,
        command,
        flags,
        offset: h.offset,
        length: h.length,
    })
}

#[cfg(test)]
mod tests;
