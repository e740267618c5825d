use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

const MS: Duration = Duration::from_millis(1);

#[derive(Debug, PartialEq)]
struct Fail(Kind);

impl Classify for Fail {
    fn kind(&self) -> Kind {
        self.0
    }
}

fn policy(max_attempts: u32) -> Policy {
    Policy {
        first: 10 * MS,
        cap: 80 * MS,
        jitter: Jitter::None,
        max_attempts,
        max_elapsed: FOREVER,
        retry_corrupt: false,
    }
}

#[test]
fn steps_double_up_to_the_cap() {
    let p = policy(u32::MAX);
    let steps: Vec<_> = (0..6).map(|r| p.step(r)).collect();
    assert_eq!(
        steps,
        [10 * MS, 20 * MS, 40 * MS, 80 * MS, 80 * MS, 80 * MS]
    );
    assert_eq!(p.step(u32::MAX), 80 * MS, "huge retry counts saturate");
    assert_eq!(Policy::REOPEN.step(0), Duration::from_secs(1));
    assert_eq!(Policy::REOPEN.step(10), Duration::from_secs(60));
}

#[test]
fn jitter_stays_within_its_band() {
    let full = Policy {
        jitter: Jitter::Full,
        ..policy(9)
    };
    let equal = Policy {
        jitter: Jitter::Equal,
        ..policy(9)
    };
    assert_eq!(full.delay(1, 0.0), Duration::ZERO);
    assert_eq!(full.delay(1, 1.0), 20 * MS);
    assert_eq!(full.delay(1, 0.5), 10 * MS);
    assert_eq!(equal.delay(1, 0.0), 10 * MS);
    assert_eq!(equal.delay(1, 1.0), 20 * MS);
    assert_eq!(policy(9).delay(1, 0.3), 20 * MS);
    assert_eq!(
        equal.delay(1, 7.0),
        20 * MS,
        "draws outside [0, 1] are clamped"
    );
}

#[test]
fn attempts_are_bounded_counting_the_first() {
    let mut b = policy(3).backoff();
    assert_eq!(b.next_delay_at(Duration::ZERO, 1.0), Some(10 * MS));
    assert_eq!(b.next_delay_at(Duration::ZERO, 1.0), Some(20 * MS));
    assert_eq!(
        b.next_delay_at(Duration::ZERO, 1.0),
        None,
        "third failure was the last attempt"
    );
    assert_eq!(b.failures(), 3);
    b.reset();
    assert_eq!(b.next_delay_at(Duration::ZERO, 1.0), Some(10 * MS));
    let mut once = policy(1).backoff();
    assert_eq!(once.next_delay_at(Duration::ZERO, 1.0), None);
}

#[test]
fn no_retry_starts_after_the_deadline() {
    let p = Policy {
        max_elapsed: 100 * MS,
        ..policy(u32::MAX)
    };
    let mut b = p.backoff();
    assert_eq!(b.next_delay_at(50 * MS, 1.0), Some(10 * MS));
    assert_eq!(
        b.next_delay_at(81 * MS, 1.0),
        None,
        "81 + 20 ms is past the bound"
    );
}

#[test]
fn what_is_retried_depends_on_the_policy() {
    assert!(Policy::OBJECT_CALL.retries(Kind::Transient));
    assert!(!Policy::OBJECT_CALL.retries(Kind::Corrupt));
    assert!(Policy::LEASE.retries(Kind::Corrupt));
    assert!(Policy::BLOCK_READ.retries(Kind::Corrupt));
    assert!(!Policy::LEASE.retries(Kind::Permanent));
}

/// Runs `p` over a sequence of outcomes; returns the result, the calls made and the delays
/// reported to the observer.
async fn drive(
    p: Policy,
    outcomes: Vec<Result<u32, Kind>>,
) -> (Result<u32, Fail>, u32, Vec<Duration>) {
    let calls = AtomicU32::new(0);
    let mut waits = Vec::new();
    let result = p
        .run_observed(
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
                let out = outcomes.get(n).cloned().unwrap_or(Err(Kind::Transient));
                async move { out.map_err(Fail) }
            },
            |_, retry, delay| {
                assert_eq!(retry as usize, waits.len() + 1);
                waits.push(delay);
            },
        )
        .await;
    (result, calls.load(Ordering::SeqCst), waits)
}

#[tokio::test(start_paused = true)]
async fn run_retries_transient_failures_until_success() {
    let outcomes = vec![Err(Kind::Transient), Err(Kind::Transient), Ok(7)];
    let (result, calls, waits) = drive(policy(6), outcomes).await;
    assert_eq!(result, Ok(7));
    assert_eq!(calls, 3);
    assert_eq!(waits, [10 * MS, 20 * MS]);
}

#[tokio::test(start_paused = true)]
async fn run_gives_up_when_the_policy_runs_out() {
    let (result, calls, waits) = drive(policy(4), vec![]).await;
    assert_eq!(result, Err(Fail(Kind::Transient)));
    assert_eq!((calls, waits.len()), (4, 3));
}

#[tokio::test(start_paused = true)]
async fn run_returns_unretried_kinds_at_once() {
    let (result, calls, waits) = drive(policy(6), vec![Err(Kind::Permanent)]).await;
    assert_eq!(
        (result, calls, waits.len()),
        (Err(Fail(Kind::Permanent)), 1, 0)
    );
    let (result, calls, _) = drive(policy(6), vec![Err(Kind::Corrupt), Ok(1)]).await;
    assert_eq!((result, calls), (Err(Fail(Kind::Corrupt)), 1));
    let torn = Policy {
        retry_corrupt: true,
        ..policy(6)
    };
    let (result, calls, _) = drive(torn, vec![Err(Kind::Corrupt), Ok(1)]).await;
    assert_eq!((result, calls), (Ok(1), 2));
}

#[test]
fn lease_renewals_retry_at_a_steady_tenth_of_the_ttl() {
    let mut b = Policy::renewal(Duration::from_secs(3)).backoff();
    for _ in 0..50 {
        assert_eq!(b.next_delay_at(Duration::ZERO, 0.0), Some(300 * MS));
    }
    let short = Policy::renewal(Duration::from_millis(200));
    assert_eq!(short.delay(0, 1.0), 100 * MS);
    assert_eq!(
        Policy::renewal(Duration::from_secs(600)).delay(9, 1.0),
        2000 * MS
    );
}
