//! What the dispatcher stores next: a pure function of the dirty queue and the moment (time,
//! memory pressure, flush target, background PUTs running), so every rule can be tested
//! without tasks, clocks or an object store.

use super::{Queue, BACKGROUND_PUTS, COLD, QUIET_PUTS};
use crate::store::budget::Pressure;
use tokio::time::Instant;

/// What the dispatcher knows when it chooses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moment {
    pub now: Instant,
    pub pressure: Pressure,
    /// Changes numbered below this must be stored now (FLUSH, shutdown).
    pub flush_target: u64,
    /// Write-back tasks running that nobody asked for.
    pub background_puts: usize,
    /// Journaled exports: only versions numbered below this may go now (the oldest epoch
    /// not yet in S3); `u64::MAX` when every closed epoch is stored, and always without a
    /// journal.
    pub limit: u64,
}

/// The dispatcher's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Store the block queued under `seq`. `background` when nobody asked for it (not FLUSH,
    /// FUA or pressure): such tasks count against the background limits.
    Store {
        seq: u64,
        block: u64,
        background: bool,
    },
    /// Nothing to store now: wait for a kick, or until `until`. With `cold`, first look for a
    /// block nobody wrote for a while (background write-back above half the dirty limit);
    /// `until` then includes the time to look again.
    Wait { until: Option<Instant>, cold: bool },
}

/// The next block to store: the oldest change below the flush target (or any, under hard
/// pressure), then the block due first if its time has come and the quiet limit allows.
/// While a closed epoch is not fully stored, only its versions go, all of them at once
/// (the journal holds their space and later epochs wait for them).
pub(crate) fn choose(queue: &Queue, m: &Moment) -> Choice {
    let urgent_below = if m.limit != u64::MAX {
        m.limit
    } else if m.pressure == Pressure::Hard {
        u64::MAX
    } else {
        m.flush_target
    };
    // Below half the dirty limit, blocks that are merely due share a few PUTs.
    let quiet = m.pressure == Pressure::None;
    let due_ok = !quiet || m.background_puts < QUIET_PUTS;
    let until = match queue.by_seq.first_key_value() {
        None => None,
        Some((&seq, &(block, _))) if seq < urgent_below => {
            return Choice::Store {
                seq,
                block,
                background: false,
            }
        }
        Some(_) if m.limit != u64::MAX => None,
        Some(_) => match queue.by_due.first_key_value() {
            Some((&(due, _), _)) if due <= m.now && !due_ok => None,
            Some((&(due, seq), &block)) if due <= m.now => {
                return Choice::Store {
                    seq,
                    block,
                    background: quiet,
                }
            }
            Some((&(due, _), _)) => Some(due),
            None => None,
        },
    };
    if m.pressure == Pressure::Background
        && m.background_puts < BACKGROUND_PUTS
        && m.limit == u64::MAX
    {
        let recheck = m.now + COLD / 4;
        return Choice::Wait {
            until: Some(until.map_or(recheck, |t| t.min(recheck))),
            cold: true,
        };
    }
    Choice::Wait { until, cold: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LATER: Duration = Duration::from_secs(30);

    fn moment(now: Instant, pressure: Pressure) -> Moment {
        Moment {
            now,
            pressure,
            flush_target: 0,
            background_puts: 0,
            limit: u64::MAX,
        }
    }

    fn store(seq: u64, block: u64, background: bool) -> Choice {
        Choice::Store {
            seq,
            block,
            background,
        }
    }

    #[test]
    fn an_empty_queue_waits_for_a_kick() {
        let now = Instant::now();
        let q = Queue::default();
        for p in [Pressure::None, Pressure::Hard] {
            let c = choose(&q, &moment(now, p));
            assert_eq!(
                c,
                Choice::Wait {
                    until: None,
                    cold: false
                },
                "{p:?}"
            );
        }
    }

    #[test]
    fn a_block_not_yet_due_waits_until_its_time() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(5, 50, now + LATER);
        let c = choose(&q, &moment(now, Pressure::None));
        assert_eq!(
            c,
            Choice::Wait {
                until: Some(now + LATER),
                cold: false
            }
        );
    }

    #[test]
    fn flush_takes_the_oldest_change_first_whenever_it_is_due() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(7, 70, now);
        q.add(3, 30, now + LATER);
        let mut m = moment(now, Pressure::None);
        m.flush_target = 4;
        m.background_puts = QUIET_PUTS; // the quiet limit does not hold FLUSH back
        assert_eq!(choose(&q, &m), store(3, 30, false));
        m.flush_target = 3;
        assert_eq!(
            choose(&q, &m),
            Choice::Wait {
                until: None,
                cold: false
            },
            "a change the flush does not cover waits for the quiet limit"
        );
    }

    #[test]
    fn due_blocks_go_first_by_due_time_within_the_quiet_limit() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(1, 10, now + LATER);
        q.add(2, 20, now - Duration::from_millis(5));
        q.add(3, 30, now - Duration::from_millis(9));
        let mut m = moment(now, Pressure::None);
        m.background_puts = QUIET_PUTS - 1;
        assert_eq!(choose(&q, &m), store(3, 30, true), "counts as background");
        m.background_puts = QUIET_PUTS;
        assert_eq!(
            choose(&q, &m),
            Choice::Wait {
                until: None,
                cold: false
            }
        );
    }

    #[test]
    fn hard_pressure_stores_everything_oldest_first() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(9, 90, now + LATER);
        q.add(4, 40, now + LATER);
        let mut m = moment(now, Pressure::Hard);
        m.background_puts = BACKGROUND_PUTS + QUIET_PUTS;
        assert_eq!(choose(&q, &m), store(4, 40, false));
    }

    #[test]
    fn background_pressure_stores_due_blocks_unthrottled_and_looks_for_cold_ones() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(1, 10, now + LATER);
        let mut m = moment(now, Pressure::Background);
        let recheck = now + COLD / 4;
        assert_eq!(
            choose(&q, &m),
            Choice::Wait {
                until: Some(recheck),
                cold: true
            }
        );
        m.background_puts = BACKGROUND_PUTS;
        assert_eq!(
            choose(&q, &m),
            Choice::Wait {
                until: Some(now + LATER),
                cold: false
            },
            "enough background PUTs run already"
        );
        q.add(2, 20, now + Duration::from_millis(1));
        m.background_puts = 0;
        assert_eq!(
            choose(&q, &m),
            Choice::Wait {
                until: Some(now + Duration::from_millis(1)),
                cold: true
            },
            "the earlier of the due time and the cold recheck"
        );
        m.now = now + Duration::from_millis(1);
        m.background_puts = QUIET_PUTS;
        assert_eq!(choose(&q, &m), store(2, 20, false), "not quiet: every slot");
    }

    #[test]
    fn a_later_epoch_waits_until_the_earlier_one_is_stored() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(2, 20, now + LATER);
        q.add(5, 50, now);
        let mut m = moment(now, Pressure::Hard);
        m.limit = 4;
        m.flush_target = u64::MAX;
        assert_eq!(
            choose(&q, &m),
            store(2, 20, false),
            "urgent although not due"
        );
        q.take(2);
        let idle = Choice::Wait {
            until: None,
            cold: false,
        };
        assert_eq!(choose(&q, &m), idle, "due, flushed and pressed, yet later");
        m.pressure = Pressure::Background;
        assert_eq!(choose(&q, &m), idle, "no cold pick either");
        m.limit = u64::MAX;
        assert_eq!(choose(&q, &m), store(5, 50, false));
    }

    #[test]
    fn choosing_leaves_the_queue_alone() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(1, 10, now);
        let m = moment(now, Pressure::Hard);
        assert_eq!(choose(&q, &m), choose(&q, &m));
        assert_eq!(q.oldest(2), vec![(1, 10)]);
    }
}
