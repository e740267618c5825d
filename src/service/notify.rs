//! The sd_notify(3) conversation with systemd: readiness, reloads, stopping, status and the
//! watchdog. systemd orders dependent units and times restarts on these messages, so each one
//! is sent only when its statement is true. Without `NOTIFY_SOCKET` everything is a no-op.

use sd_notify::NotifyState;
use std::time::Duration;

/// Sends state changes to the service manager, if there is one.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Talks to systemd when `NOTIFY_SOCKET` is set (the variable stays set: we send many
    /// messages over the process lifetime).
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    /// A notifier that never sends (tests, ad-hoc runs).
    pub fn disabled() -> Self {
        Self { enabled: false }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::debug!("sd_notify failed: {e}");
        }
    }

    /// Every listener is bound and the configuration is loaded: clients can connect now.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload started; systemd wants the monotonic timestamp with it (Type=notify-reload).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// One-line status shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Shutdown began; systemd stops waiting for READY and starts the stop timeout.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// The flush is still progressing: push the stop timeout out by `by`.
    pub fn extend_timeout(&self, by: Duration, status: &str) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::ExtendTimeoutUsec(usec),
            NotifyState::Status(status),
        ]);
    }

    /// Proof of life; only sent from a path that checked the daemon works.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Half of `WatchdogSec` when systemd asked for a watchdog for this very process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        let mut usec = 0u64;
        if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
            Some(Duration::from_micros(usec / 2))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_notifier_has_no_watchdog() {
        let n = Notifier::disabled();
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x"); // must not panic or send
    }
}
