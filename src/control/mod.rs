//! The control socket: how the admin commands (`nbd-s3 status`, `nbd-s3 snapshot …`) reach
//! the running daemon. One request per connection: the client writes one JSON line, the
//! daemon answers one JSON line and closes. The socket is a Unix socket (mode 0660), so who
//! may administer the daemon is decided by file permissions, like the daemon's other files.
//!
//! - [`protocol`]: the request and reply documents both sides share;
//! - [`server`]: the daemon side (bound by `service`, answered from the `Daemon`);
//! - [`client`]: the command-line side (finds the socket, prints tables or JSON, exit codes);
//! - [`handover`]: a takeover's sockets and connection states, passed with SCM_RIGHTS.

pub mod client;
pub mod handover;
pub mod protocol;
pub mod server;

pub use protocol::{Reply, Request};
