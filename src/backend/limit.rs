//! How many object-store calls of one export may be in flight at once, adapted to what the
//! store answers (AIMD, as TCP's congestion window): a throttling answer (503 SlowDown, 429)
//! cuts the limit to half of what was in flight, successes while the limit is what holds
//! calls back raise it by one per limit's worth of calls (about one per round trip).
//!
//! Scope: one limit per export, that is per bucket and prefix. S3 throttles per prefix
//! partition, so exports in one bucket do not slow each other down, and an export's calls
//! are all pooled under the one limit its partition enforces.
//!
//! - A burst of throttling answers is one congestion event: only a call that *started*
//!   after the latest cut may cut again (each cut opens a new generation), so the 503s of
//!   calls already in flight when the first came back do not halve the limit once each.
//! - The cut starts from the calls in flight, not from the limit (TCP's `FlightSize / 2`):
//!   a limit far above what the store actually uses comes down in one step.
//! - The limit grows only while it binds (some call found it full since the last
//!   increase), so an unthrottled export's limit stays at most one above what it uses
//!   instead of drifting to the ceiling, and the next cut bites at once.
//!
//! [`Aimd`] is the arithmetic, pure and tested on its own; [`AdaptiveLimit`] is the gate
//! calls wait at (a semaphore whose permits follow the limit) and the observer's view.

use parking_lot::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Above anything one export's store puts in flight (64 GET and 64 PUT slots at most,
/// listing ranges, delete batches): unthrottled, the limit never holds a call back.
pub const CEILING: u32 = 256;
/// The lowest limit: two calls, so one slow call never stops an export entirely.
pub const FLOOR: u32 = 2;
/// Cut to this share of the calls in flight on throttling (TCP Reno's one half).
const CUT_NUMERATOR: u32 = 1;
const CUT_DENOMINATOR: u32 = 2;
/// At most one log line per export this often; the cuts between are summed into the next.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a call was admitted under: the generation it started in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
}

/// The limit's arithmetic: no clock, no waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aimd {
    limit: u32,
    floor: u32,
    ceiling: u32,
    in_flight: u32,
    /// Bumped by every cut; calls started before it do not cut again.
    generation: u64,
    /// Successes since the limit last grew.
    credit: u32,
    /// Whether some call found the limit full since it last grew.
    bound: bool,
}

impl Aimd {
    /// Starts at `ceiling` (nothing known yet about the store: hold nothing back).
    pub fn new(floor: u32, ceiling: u32) -> Aimd {
        let floor = floor.max(1);
        let ceiling = ceiling.max(floor);
        Aimd {
            limit: ceiling,
            floor,
            ceiling,
            in_flight: 0,
            generation: 0,
            credit: 0,
            bound: false,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether one more call may start now.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.limit
    }

    /// A call starts (the caller checked [`Aimd::has_room`] or holds a permit).
    pub fn start(&mut self) -> Ticket {
        self.in_flight = self.in_flight.saturating_add(1);
        if self.in_flight >= self.limit {
            self.bound = true;
        }
        Ticket {
            generation: self.generation,
        }
    }

    /// A call of `ticket` ended without a throttling answer; `Some(new limit)` when the
    /// limit grew.
    pub fn succeeded(&mut self, _ticket: Ticket) -> Option<u32> {
        self.end();
        self.credit = self.credit.saturating_add(1);
        if self.credit < self.limit {
            return None;
        }
        self.credit = 0;
        let grow = self.bound && self.limit < self.ceiling;
        self.bound = false;
        grow.then(|| {
            self.limit += 1;
            self.limit
        })
    }

    /// A call of `ticket` was answered "slow down"; `Some((old, new))` when this cut the
    /// limit (the first throttling answer of a generation, above the floor).
    pub fn throttled(&mut self, ticket: Ticket) -> Option<(u32, u32)> {
        // The call still counts as in flight here: it is one of those the store refused.
        let flight = self.in_flight.min(self.limit);
        self.end();
        if ticket.generation != self.generation {
            return None;
        }
        let cut = (flight.saturating_mul(CUT_NUMERATOR) / CUT_DENOMINATOR).max(self.floor);
        if cut >= self.limit {
            return None;
        }
        let old = self.limit;
        self.limit = cut;
        self.generation += 1;
        self.credit = 0;
        self.bound = false;
        Some((old, cut))
    }

    /// A call ended in a way that says nothing about load (cancelled, other errors).
    pub fn abandoned(&mut self, _ticket: Ticket) {
        self.end();
    }

    fn end(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

/// How a limited call ended, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The store did the work (or refused for a reason other than load).
    Served,
    /// The store asked us to slow down.
    Throttled,
}

/// One export's adaptive limit on object-store calls in flight.
#[derive(Debug)]
pub struct AdaptiveLimit {
    /// The export, for the log line.
    name: String,
    /// Off: the limit stays at the ceiling whatever the store answers.
    adaptive: bool,
    /// Free permits = limit − in flight, less `State::debt`.
    permits: Semaphore,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    aimd: Aimd,
    /// Permits still to be withdrawn after a cut: they were held by calls in flight then,
    /// and are forgotten as those calls end instead of returning to the semaphore.
    debt: u32,
    /// Throttling answers, and cuts, since the last log line.
    unlogged_throttles: u64,
    unlogged_cuts: u64,
    /// The limit when the last log line was written (or the ceiling).
    logged_limit: u32,
    last_log: Option<Instant>,
}

impl AdaptiveLimit {
    /// A limit between [`FLOOR`] and [`CEILING`] for export `name`; `adaptive = false` keeps
    /// it at the ceiling (fixed concurrency: the store's own slots decide).
    pub fn new(name: &str, adaptive: bool) -> AdaptiveLimit {
        AdaptiveLimit::with_bounds(name, adaptive, FLOOR, CEILING)
    }

    /// With explicit bounds (tests).
    pub fn with_bounds(name: &str, adaptive: bool, floor: u32, ceiling: u32) -> AdaptiveLimit {
        let aimd = Aimd::new(floor, ceiling);
        AdaptiveLimit {
            name: name.to_owned(),
            adaptive,
            permits: Semaphore::new(aimd.limit() as usize),
            state: Mutex::new(State {
                logged_limit: aimd.limit(),
                aimd,
                debt: 0,
                unlogged_throttles: 0,
                unlogged_cuts: 0,
                last_log: None,
            }),
        }
    }

    /// The current limit (metrics).
    pub fn limit(&self) -> u32 {
        self.state.lock().aimd.limit()
    }

    /// Calls in flight now (metrics).
    pub fn in_flight(&self) -> u32 {
        self.state.lock().aimd.in_flight()
    }

    /// Waits until a call may start. The permit must be ended with [`Permit::finish`];
    /// dropping it unfinished (a cancelled call) frees the slot and changes nothing else.
    pub async fn acquire(&self) -> Permit<'_> {
        // The semaphore is never closed, so this cannot fail; if it ever were, the call goes
        // ahead unlimited rather than failing.
        if let Ok(p) = self.permits.acquire().await {
            p.forget();
        } else {
            debug_assert!(false, "limit semaphore closed");
        }
        let ticket = self.state.lock().aimd.start();
        Permit {
            limit: self,
            ticket: Some(ticket),
        }
    }

    fn end(&self, ticket: Ticket, answer: Option<Answer>) {
        let mut st = self.state.lock();
        if answer == Some(Answer::Throttled) {
            st.unlogged_throttles += 1;
        }
        let (grew, cut) = match answer {
            Some(Answer::Served) if self.adaptive => (st.aimd.succeeded(ticket).is_some(), None),
            Some(Answer::Throttled) if self.adaptive => (false, st.aimd.throttled(ticket)),
            _ => {
                st.aimd.abandoned(ticket);
                (false, None)
            }
        };
        // This call's own permit, and one more if the limit grew.
        self.give_back(&mut st, 1 + u32::from(grew));
        if let Some((old, new)) = cut {
            let owed = old - new;
            let taken = self.permits.forget_permits(owed as usize);
            let taken = u32::try_from(taken).unwrap_or(owed).min(owed);
            st.debt = st.debt.saturating_add(owed - taken);
            self.log_cut(&mut st);
        }
    }

    /// Returns `n` permits to the semaphore, paying off debt first.
    fn give_back(&self, st: &mut State, n: u32) {
        let paid = n.min(st.debt);
        st.debt -= paid;
        if n > paid {
            self.permits.add_permits((n - paid) as usize);
        }
    }

    /// One info line per [`LOG_EVERY`] at most, summing the cuts since the last.
    fn log_cut(&self, st: &mut State) {
        st.unlogged_cuts += 1;
        let now = Instant::now();
        if st
            .last_log
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            return;
        }
        tracing::info!(
            "export {}: the object store is throttling ({} slow-down answers): object calls in flight limited to {} (was {}, {} cuts)",
            self.name,
            st.unlogged_throttles,
            st.aimd.limit(),
            st.logged_limit,
            st.unlogged_cuts,
        );
        st.last_log = Some(now);
        st.logged_limit = st.aimd.limit();
        st.unlogged_throttles = 0;
        st.unlogged_cuts = 0;
    }
}

/// One admitted call.
#[derive(Debug)]
pub struct Permit<'a> {
    limit: &'a AdaptiveLimit,
    ticket: Option<Ticket>,
}

impl Permit<'_> {
    /// The call ended with `answer`.
    pub fn finish(mut self, answer: Answer) {
        if let Some(t) = self.ticket.take() {
            self.limit.end(t, Some(answer));
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.limit.end(t, None);
        }
    }
}

#[cfg(test)]
mod tests;
