//! Pure NBD wire format: bytes in, typed values out. No I/O, no tokio, so every parser can be
//! unit-tested, property-tested and fuzzed on its own. `doc/proto.md` of the NBD project is the
//! authority; `consts` names its numbers.

pub mod consts;
pub mod fuzzing;
pub mod handshake;
pub mod reply;
pub mod request;

pub use handshake::{
    parse_client_flags, parse_option, parse_option_header, ClientFlags, ClientOption,
    HandshakeError, InfoRequest, MetaContextRequest, OptionError, OptionHeader, ParseOptionError,
    PayloadPlan,
};
pub use request::{
    parse_header, validate, Command, CommandFlags, FatalError, Limits, Request, RequestError,
    RequestHeader,
};
