use super::*;
use futures_util::FutureExt;
use proptest::prelude::*;

#[test]
fn a_burst_of_throttling_cuts_once_to_half_of_what_was_in_flight() {
    let mut a = Aimd::new(2, 64);
    let tickets: Vec<Ticket> = (0..20).map(|_| a.start()).collect();
    // 20 in flight under a limit of 64: the cut starts from the 20, not from 64.
    assert_eq!(a.throttled(tickets[0]), Some((64, 10)));
    // Every other call of that generation comes back throttled too: no further cut.
    for t in &tickets[1..] {
        assert_eq!(a.throttled(*t), None);
    }
    assert_eq!((a.limit(), a.in_flight()), (10, 0));
    // A call started after the cut may cut again.
    let late: Vec<Ticket> = (0..10).map(|_| a.start()).collect();
    assert_eq!(a.throttled(late[0]), Some((10, 5)));
    assert_eq!(a.throttled(late[1]), None);
}

#[test]
fn the_floor_holds() {
    let mut a = Aimd::new(2, 8);
    for _ in 0..10 {
        let t = a.start();
        a.throttled(t);
        assert!(a.limit() >= 2);
    }
    assert_eq!(a.limit(), 2);
    assert_eq!(a.in_flight(), 0);
}

#[test]
fn successes_grow_by_one_per_limit_while_the_limit_binds() {
    let mut a = Aimd::new(2, 64);
    let burst: Vec<Ticket> = (0..8).map(|_| a.start()).collect();
    a.throttled(burst[0]);
    for t in &burst[1..] {
        a.succeeded(*t);
    }
    assert_eq!(a.limit(), 4);
    // Keep the limit full: one call ends, one starts.
    let mut open: Vec<Ticket> = (0..4).map(|_| a.start()).collect();
    let mut grown = vec![];
    for _ in 0..40 {
        let t = open.remove(0);
        if let Some(l) = a.succeeded(t) {
            grown.push(l);
        }
        while a.has_room() {
            open.push(a.start());
        }
    }
    // The burst left 3 successes of credit, so 1 more grows it to 5, then 5 more to 6, 6 to
    // 7, and so on: 1+5+6+7+8+9 = 36 of the 40.
    assert_eq!(grown, [5, 6, 7, 8, 9, 10]);
}

#[test]
fn an_idle_limit_does_not_grow() {
    let mut a = Aimd::new(2, 64);
    let t = a.start();
    a.throttled(t);
    assert_eq!(a.limit(), 2);
    // One call at a time never fills a limit of 2: no growth, however many succeed.
    for _ in 0..100 {
        let t = a.start();
        assert_eq!(a.succeeded(t), None);
    }
    assert_eq!(a.limit(), 2);
}

#[test]
fn the_ceiling_holds() {
    let mut a = Aimd::new(1, 3);
    for _ in 0..100 {
        let ts: Vec<Ticket> = (0..3).map(|_| a.start()).collect();
        for t in ts {
            a.succeeded(t);
        }
    }
    assert_eq!(a.limit(), 3);
}

#[derive(Debug, Clone)]
enum Step {
    Start,
    Succeed(usize),
    Throttle(usize),
    Abandon(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Start),
        2 => any::<usize>().prop_map(Step::Succeed),
        2 => any::<usize>().prop_map(Step::Throttle),
        1 => any::<usize>().prop_map(Step::Abandon),
    ]
}

proptest! {
    /// Whatever the order of answers: the limit stays within its bounds, counts what is in
    /// flight, grows by at most one per success, and is cut at most once per generation of
    /// calls, never below half of what was in flight (nor the floor).
    #[test]
    fn limit_invariants(
        floor in 1u32..4,
        ceiling in 4u32..40,
        steps in proptest::collection::vec(step(), 0..400),
    ) {
        let mut a = Aimd::new(floor, ceiling);
        let mut open: Vec<Ticket> = vec![];
        let mut cut_generations = std::collections::BTreeSet::new();
        for s in steps {
            let before = a.limit();
            let flight = a.in_flight();
            match s {
                Step::Start if a.has_room() => open.push(a.start()),
                Step::Succeed(i) if !open.is_empty() => {
                    let t = open.swap_remove(i % open.len());
                    let grew = a.succeeded(t);
                    prop_assert!(a.limit() == before || a.limit() == before + 1);
                    prop_assert_eq!(grew.is_some(), a.limit() != before);
                }
                Step::Throttle(i) if !open.is_empty() => {
                    let t = open.swap_remove(i % open.len());
                    match a.throttled(t) {
                        Some((old, new)) => {
                            prop_assert_eq!(old, before);
                            prop_assert!(new < old);
                            prop_assert!(new == floor || new <= flight.min(before) / 2);
                            prop_assert!(cut_generations.insert(t.generation));
                        }
                        None => prop_assert_eq!(a.limit(), before),
                    }
                }
                Step::Abandon(i) if !open.is_empty() => {
                    let t = open.swap_remove(i % open.len());
                    a.abandoned(t);
                    prop_assert_eq!(a.limit(), before);
                }
                _ => {}
            }
            prop_assert!(a.limit() >= floor && a.limit() <= ceiling);
            prop_assert_eq!(a.in_flight() as usize, open.len());
        }
    }
}

/// Takes a permit if one is free now.
fn now<'a>(l: &'a AdaptiveLimit) -> Option<Permit<'a>> {
    l.acquire().now_or_never()
}

#[test]
fn permits_follow_the_limit_down_and_up() {
    let l = AdaptiveLimit::with_bounds("vm1", true, 2, 8);
    let mut held: Vec<Permit> = (0..8).map(|_| now(&l).unwrap()).collect();
    assert!(now(&l).is_none(), "8 of 8 in flight");
    held.pop().unwrap().finish(Answer::Throttled);
    assert_eq!(l.limit(), 4);
    // 7 still in flight above a limit of 4: nothing starts until only 3 remain.
    for _ in 0..3 {
        held.pop().unwrap().finish(Answer::Served);
        assert!(now(&l).is_none());
    }
    held.pop().unwrap().finish(Answer::Served);
    assert_eq!(l.in_flight(), 3);
    let p = now(&l).expect("3 in flight under a limit of 4");
    assert!(now(&l).is_none());
    held.push(p);
    assert_eq!(l.in_flight(), 4);
    // Full, so successes grow it: 4 of them make it 5.
    for _ in 0..4 {
        held.remove(0).finish(Answer::Served);
        held.push(now(&l).unwrap());
    }
    assert_eq!(l.limit(), 5);
    held.push(now(&l).expect("the fifth slot"));
    assert!(now(&l).is_none());
}

#[test]
fn a_cancelled_call_frees_its_slot_and_changes_nothing() {
    let l = AdaptiveLimit::with_bounds("vm1", true, 2, 2);
    let a = now(&l).unwrap();
    let b = now(&l).unwrap();
    assert!(now(&l).is_none());
    drop(a);
    assert_eq!(l.limit(), 2);
    let c = now(&l).expect("the dropped call's slot");
    b.finish(Answer::Served);
    c.finish(Answer::Served);
    assert_eq!(l.in_flight(), 0);
}

#[test]
fn a_fixed_limit_ignores_throttling() {
    let l = AdaptiveLimit::with_bounds("vm1", false, 2, 8);
    for _ in 0..5 {
        let held: Vec<Permit> = (0..8).map(|_| now(&l).unwrap()).collect();
        for p in held {
            p.finish(Answer::Throttled);
        }
    }
    assert_eq!(l.limit(), 8);
}
