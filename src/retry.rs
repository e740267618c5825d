//! One retry policy and one backoff type for every loop that waits and tries again: object
//! calls (short blips), block reads, the manifest at open, the lease object, write-back, the
//! final flush of a removed export and the reopening of refused exports.
//!
//! A [`Policy`] is plain data (first delay, cap, jitter, attempt and time bounds, whether
//! corrupt reads count as passing), so each use is a named constant that can be read and
//! compared in one place. A [`Backoff`] is one running sequence of delays under a policy; the
//! delay computation takes the random draw and the elapsed time as arguments, so it is tested
//! without clocks. Errors say what they are through [`Classify`]; this module imports nothing
//! else from the crate, so anything may use it.

use rand::Rng;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// What a failure means to a retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// May pass by itself (network trouble, throttling, a 5xx): worth retrying.
    Transient,
    /// The bytes read were not what was written. Usually a real fault, but an object read
    /// while being replaced can look like this too, so policies for objects that are
    /// rewritten in place (the lease) or that a retry re-fetches (blocks) retry it.
    Corrupt,
    /// Only a person can fix it (credentials, a missing bucket, an unsupported feature).
    Permanent,
}

/// Errors that can say whether a retry may help.
pub trait Classify {
    /// The kind of this failure.
    fn kind(&self) -> Kind;
}

/// How a delay is spread around its exponential step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the step: for a single loop nobody else races (reopening one export).
    None,
    /// Uniform in [0, step]: many callers failing together do not retry together.
    Full,
    /// Uniform in [step/2, step]: spread out, but never much sooner than the step.
    Equal,
}

/// How hard and how often to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The step before the first retry; doubles after each failure.
    pub first: Duration,
    /// The largest step.
    pub cap: Duration,
    /// How the step becomes a delay.
    pub jitter: Jitter,
    /// Attempts in total, the first one included (1 = no retries; `u32::MAX` = unbounded).
    pub max_attempts: u32,
    /// No retry is started that would begin later than this after the first attempt.
    pub max_elapsed: Duration,
    /// Whether a [`Kind::Corrupt`] failure is retried.
    pub retry_corrupt: bool,
}

/// No bound on time.
const FOREVER: Duration = Duration::MAX;

impl Policy {
    /// One object-store call: about 6 s of retrying at worst covers blips and throttling,
    /// while a real outage surfaces quickly to the loops above that own longer waits.
    pub const OBJECT_CALL: Policy = Policy {
        first: Duration::from_millis(100),
        cap: Duration::from_secs(5),
        jitter: Jitter::Full,
        max_attempts: 6,
        max_elapsed: Duration::from_secs(30),
        retry_corrupt: false,
    };

    /// A block GET on the read path: a client waits for it, so few attempts; a corrupt or
    /// wrong-sized object is fetched again before EIO is returned.
    pub const BLOCK_READ: Policy = Policy {
        first: Duration::from_millis(50),
        cap: Duration::from_secs(2),
        jitter: Jitter::Equal,
        max_attempts: 3,
        max_elapsed: FOREVER,
        retry_corrupt: true,
    };

    /// Storing a dirty block: never gives up (the data exists nowhere else), backing off to
    /// 10 s so a recovering store is not hammered.
    pub const WRITE_BACK: Policy = Policy {
        first: Duration::from_millis(50),
        cap: Duration::from_secs(10),
        jitter: Jitter::Equal,
        max_attempts: u32::MAX,
        max_elapsed: FOREVER,
        retry_corrupt: false,
    };

    /// The calls made while opening an export (manifest, listing) and changing its snapshots:
    /// a blip at start-up should not refuse the export, a persistent failure should, within a
    /// few seconds. The manifest is rewritten in place (snapshots), so a read may catch it
    /// half-written on stores that replace objects in two steps: a torn read, gone next try.
    pub const MANIFEST: Policy = Policy {
        first: Duration::from_millis(100),
        cap: Duration::from_secs(2),
        jitter: Jitter::Equal,
        max_attempts: 6,
        max_elapsed: FOREVER,
        retry_corrupt: true,
    };

    /// Binding a port the process we took over from still holds until it exits (a second
    /// or so after the handover).
    pub const PORT_TAKEOVER: Policy = Policy {
        first: Duration::from_millis(50),
        cap: Duration::from_millis(500),
        jitter: Jitter::None,
        max_attempts: u32::MAX,
        max_elapsed: Duration::from_secs(30),
        retry_corrupt: false,
    };

    /// Reading the manifest back after a write whose outcome is unknown: never gives up
    /// (memory must follow what S3 holds, or flushed writes land on a layer nothing reads),
    /// backing off to 10 s.
    pub const MANIFEST_SETTLE: Policy = Policy {
        first: Duration::from_millis(100),
        cap: Duration::from_secs(10),
        jitter: Jitter::Equal,
        max_attempts: u32::MAX,
        max_elapsed: FOREVER,
        retry_corrupt: false,
    };

    /// Reading the lease object while taking it. Its holder rewrites it in place every few
    /// seconds, so a read can catch it half-written and fail its checksum: that is retried
    /// at once, not treated as a lasting fault.
    pub const LEASE: Policy = Policy {
        first: Duration::from_millis(50),
        cap: Duration::from_millis(500),
        jitter: Jitter::Equal,
        max_attempts: 5,
        max_elapsed: FOREVER,
        retry_corrupt: true,
    };

    /// Taking the export lease for a client attaching (and re-reading the export when
    /// another daemon held it): a client waits, so a few attempts over a few seconds, enough
    /// to ride out flaky replies; a store that stays away refuses the client.
    pub const LEASE_ATTACH: Policy = Policy {
        first: Duration::from_millis(100),
        cap: Duration::from_secs(1),
        jitter: Jitter::Equal,
        max_attempts: 8,
        max_elapsed: Duration::from_secs(15),
        retry_corrupt: true,
    };

    /// Reopening an export refused because the store could not be reached: soon at first,
    /// then once a minute while the outage lasts.
    pub const REOPEN: Policy = Policy {
        first: Duration::from_secs(1),
        cap: Duration::from_secs(60),
        jitter: Jitter::None,
        max_attempts: u32::MAX,
        max_elapsed: FOREVER,
        retry_corrupt: false,
    };

    /// The final flush of a removed export whose data the store refuses: retried until it
    /// succeeds (the data exists nowhere else), at most every 30 s.
    pub const RETIRED_FLUSH: Policy = Policy {
        first: Duration::from_millis(500),
        cap: Duration::from_secs(30),
        jitter: Jitter::None,
        max_attempts: u32::MAX,
        max_elapsed: FOREVER,
        retry_corrupt: false,
    };

    /// Storing what the last client of an export left dirty, so its lease can be given up:
    /// the same rule as a removed export's final flush (the data exists nowhere else).
    pub const IDLE_FLUSH: Policy = Policy::RETIRED_FLUSH;

    /// Renewing a lease of `ttl` after a failed renewal: every tenth of the ttl (between
    /// 0.1 s and 2 s), without backing off, because the lease runs out at a fixed time and
    /// every chance to renew before it matters.
    pub fn renewal(ttl: Duration) -> Policy {
        let every = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(2));
        Policy {
            first: every,
            cap: every,
            jitter: Jitter::None,
            max_attempts: u32::MAX,
            max_elapsed: FOREVER,
            retry_corrupt: true,
        }
    }

    /// Whether this policy retries a failure of `kind` at all (bounds aside).
    pub fn retries(&self, kind: Kind) -> bool {
        match kind {
            Kind::Transient => true,
            Kind::Corrupt => self.retry_corrupt,
            Kind::Permanent => false,
        }
    }

    /// The exponential step before retry number `retry` (0-based), capped.
    pub fn step(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.cap)
    }

    /// The delay before retry `retry` for a uniform draw `unit` in [0, 1].
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let step = self.step(retry);
        let unit = unit.clamp(0.0, 1.0);
        match self.jitter {
            Jitter::None => step,
            Jitter::Full => step.mul_f64(unit),
            Jitter::Equal => step / 2 + (step / 2).mul_f64(unit),
        }
    }

    /// A fresh sequence of delays starting now.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(*self)
    }

    /// Runs `op` until it succeeds, fails in a way this policy does not retry, or the policy
    /// runs out; returns the last result.
    pub async fn run<T, E, F, Fut>(&self, op: F) -> Result<T, E>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_observed(op, |_, _, _| {}).await
    }

    /// [`Policy::run`], calling `on_retry(error, retry number (1-based), delay)` before each
    /// wait (for counters and log lines). A caller can tell "ran out" from "not retryable"
    /// by asking [`Policy::retries`] about the error returned.
    pub async fn run_observed<T, E, F, Fut>(
        &self,
        mut op: F,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = self.backoff();
        loop {
            let err = match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !self.retries(e.kind()) => return Err(e),
                Err(e) => e,
            };
            let Some(delay) = backoff.next_delay() else {
                return Err(err);
            };
            on_retry(&err, backoff.failures(), delay);
            tokio::time::sleep(delay).await;
        }
    }
}

/// One running sequence of delays under a [`Policy`].
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    failures: u32,
    started: Instant,
}

impl Backoff {
    /// Starts a sequence now (the first attempt begins now).
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            failures: 0,
            started: Instant::now(),
        }
    }

    /// Records a failure and returns the wait before the next attempt, or `None` when the
    /// policy allows no further attempt.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let unit = rand::thread_rng().gen_range(0.0..=1.0);
        self.next_delay_at(self.started.elapsed(), unit)
    }

    /// [`Backoff::next_delay`] with the time since the first attempt and the random draw given.
    pub fn next_delay_at(&mut self, elapsed: Duration, unit: f64) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.policy.max_attempts {
            return None;
        }
        let delay = self.policy.delay(self.failures - 1, unit);
        if elapsed.saturating_add(delay) > self.policy.max_elapsed {
            return None;
        }
        Some(delay)
    }

    /// Failures recorded so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts over from the first step (after a success, or when something changed that
    /// makes waiting long pointless).
    pub fn reset(&mut self) {
        self.failures = 0;
        self.started = Instant::now();
    }
}

#[cfg(test)]
mod tests;
