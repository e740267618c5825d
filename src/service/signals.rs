//! The signals a daemon answers: SIGHUP reloads, SIGTERM/SIGINT stop (a second one aborts).
//! Handlers are installed before startup so an early SIGTERM is handled, not fatal.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGTERM or SIGINT (named for the log).
    Stop(&'static str),
}

/// The installed handlers.
#[derive(Debug)]
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers; fails only if the runtime cannot register signals at all.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.hup.recv() => Request::Reload,
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
        }
    }

    /// The next SIGTERM/SIGINT; SIGHUPs meanwhile are ignored (logged).
    pub async fn next_stop(&mut self) -> &'static str {
        loop {
            match self.next().await {
                Request::Stop(name) => return name,
                Request::Reload => {
                    tracing::info!("SIGHUP ignored: a reload or shutdown is already running")
                }
            }
        }
    }
}
