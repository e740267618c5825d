//! The process around the daemon: logging, signals, sd-notify and orderly shutdown. Block data
//! never passes through here; this module decides *when* the daemon starts, reloads and stops,
//! and tells systemd and the admin about it.

pub mod logging;
pub mod notify;
