//! The lease object's contents and the pure decision "may this daemon take it?". Kept free of
//! I/O so every case (ours, free, expired, dead holder, live holder) is unit-tested directly.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Version of the lease JSON; a daemon refuses to take over a lease of a newer format.
pub const FORMAT: u32 = 1;

/// Who this daemon process is, as written into every lease it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Random per process: tells our own lease from another daemon's even on the same host.
    pub owner: String,
    /// Host name, so the refusal message tells the admin where the holder runs.
    pub host: String,
    /// Process id, for the message and for the dead-holder check on the same host.
    pub pid: u32,
    /// Kernel boot id: "same host" for the dead-pid check means same host name AND same boot
    /// (a pid from before a reboot says nothing about a process now).
    pub boot_id: Option<String>,
}

impl Identity {
    /// This process: a fresh random owner id, the host name, pid and boot id.
    pub fn current() -> Self {
        Self {
            owner: format!("{:016x}", rand::random::<u64>()),
            host: read_trimmed("/proc/sys/kernel/hostname")
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "unknown-host".into()),
            pid: std::process::id(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The JSON stored at `<prefix>nbd-s3.lock`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    /// [`FORMAT`]; a newer format is never taken over.
    pub format: u32,
    /// The holder's [`Identity::owner`]: tells its own lease from another daemon's.
    pub owner: String,
    /// Where the holder runs, for the refusal message and the dead-pid check.
    pub host: String,
    /// The holder's process id, same uses.
    pub pid: u32,
    /// The holder's kernel boot id (see [`Identity::boot_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Expiry as RFC 3339, for humans reading the object.
    pub expires: String,
    /// Expiry in milliseconds since the Unix epoch, by the holder's clock.
    pub expires_unix_ms: u64,
    /// How long each renewal is valid.
    pub ttl_ms: u64,
    /// The holder gave the export up (no client left, nothing dirty, or shutdown): free for
    /// anyone. The record stays rather than being deleted, so the next holder can tell that
    /// nobody held the export in between (its version is unchanged) and keep its cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl LeaseRecord {
    /// A record held by `me` until `now_ms + ttl`.
    pub fn new(me: &Identity, now_ms: u64, ttl: Duration) -> Self {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires_unix_ms = now_ms.saturating_add(ttl_ms);
        let at = std::time::UNIX_EPOCH + Duration::from_millis(expires_unix_ms);
        Self {
            format: FORMAT,
            owner: me.owner.clone(),
            host: me.host.clone(),
            pid: me.pid,
            boot_id: me.boot_id.clone(),
            expires: humantime::format_rfc3339_millis(at).to_string(),
            expires_unix_ms,
            ttl_ms,
            released: false,
        }
    }

    /// The record `me` leaves when giving the lease up at `now_ms`: already expired, so a
    /// daemon that predates the `released` field takes it over at once too.
    pub fn released(me: &Identity, now_ms: u64) -> Self {
        Self {
            released: true,
            ..Self::new(me, now_ms, Duration::ZERO)
        }
    }

    /// Parses a stored lease; `None` for anything that is not a lease we understand.
    pub fn parse(raw: &[u8]) -> Option<Self> {
        serde_json::from_slice(raw).ok()
    }

    /// The bytes to store.
    pub fn to_bytes(&self) -> bytes::Bytes {
        // Serialising plain strings and integers cannot fail; fall back to an empty object
        // rather than panic (it would parse as "not a lease" and be taken over after a ttl).
        bytes::Bytes::from(serde_json::to_vec_pretty(self).unwrap_or_default())
    }

    /// "host H (pid P, lease until T)": what the admin needs to find the holder.
    pub fn describe(&self) -> String {
        format!(
            "nbd-s3 on host {} (pid {}, lease valid until {})",
            self.host, self.pid, self.expires
        )
    }
}

/// What to do about a lease object found at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Ours already (an earlier export version, or a lost reply of our own write): renew it.
    Ours,
    /// Another daemon's, but it is gone; `why` is logged with the takeover.
    Free { why: String },
    /// Another live daemon holds it; the message names it.
    Held { holder: String },
}

/// Facts about the world the verdict needs besides the record.
pub struct Context<'a> {
    /// This daemon.
    pub me: &'a Identity,
    /// Our wall clock, in Unix ms.
    pub now_ms: u64,
    /// How long we have seen this exact object version unchanged (our monotonic clock).
    pub unchanged_for: Duration,
    /// Whether a process with this pid exists on this host.
    pub alive: &'a dyn Fn(u32) -> bool,
}

/// Decides about a lease object (`None` = unreadable JSON). A holder that stopped renewing is
/// recognised two ways: its expiry passed by our wall clock, or (clock-skew proof) the object
/// stayed unchanged for a whole ttl while we watched. A holder on this host and boot whose
/// pid is gone (kill -9, systemd restart) is free at once.
pub fn judge(record: Option<&LeaseRecord>, ctx: &Context<'_>) -> Verdict {
    let Some(rec) = record else {
        return if ctx.unchanged_for >= crate::config::DEFAULT_LEASE_TTL {
            Verdict::Free {
                why: "unreadable lease object unchanged for a whole lease time".into(),
            }
        } else {
            Verdict::Held {
                holder: "an unreadable lease object (not nbd-s3 lease JSON); delete it if no daemon serves this export".into(),
            }
        };
    };
    if rec.owner == ctx.me.owner {
        return Verdict::Ours;
    }
    if rec.released && rec.format <= FORMAT {
        return Verdict::Free {
            why: format!("released by nbd-s3 on host {} (pid {})", rec.host, rec.pid),
        };
    }
    if rec.format > FORMAT {
        return Verdict::Held {
            holder: format!("{} (newer lease format {})", rec.describe(), rec.format),
        };
    }
    if ctx.now_ms > rec.expires_unix_ms {
        return Verdict::Free {
            why: format!("lease of {} expired", rec.describe()),
        };
    }
    if ctx.unchanged_for >= Duration::from_millis(rec.ttl_ms) {
        return Verdict::Free {
            why: format!("{} stopped renewing its lease", rec.describe()),
        };
    }
    let same_boot = rec.host == ctx.me.host && rec.boot_id == ctx.me.boot_id;
    if same_boot && (rec.pid == ctx.me.pid || !(ctx.alive)(rec.pid)) {
        // Our own pid under another owner id is an earlier incarnation (a container restarted
        // as pid 1); any other pid that no longer exists crashed.
        return Verdict::Free {
            why: format!("{} is no longer running", rec.describe()),
        };
    }
    Verdict::Held {
        holder: rec.describe(),
    }
}

/// Whether process `pid` exists (kill(pid, 0); EPERM still means it exists).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(nix::errno::Errno::ESRCH)
    )
}
