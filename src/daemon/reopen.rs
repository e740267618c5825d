//! Background reopening of refused exports: an export refused because S3 was unreachable (at
//! start or at a reload), or because another daemon held its lease, is opened again by itself
//! with backoff, and swapped into the registry the moment it opens — no reload needed.
//! Exports refused for reasons only an admin can fix (`Retry::Never`) are left alone. An
//! export whose lease another daemon took is treated as refused once no client is attached:
//! new clients then get "in use by …" instead of EIO on every write, and it comes back by
//! itself when the other daemon lets go. What to retry and how often is decided by the
//! export ([`Export::reopen_rule`]) and one [`Schedule`] per export; this task only runs it.

use super::Daemon;
use crate::export::{try_open, Export, Retry, Schedule};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How often the registry is scanned for newly refused exports.
const SCAN: Duration = Duration::from_millis(500);

/// Retry bookkeeping of one refused export.
struct Pending {
    /// The refused version in the registry; a reload replacing it resets the schedule.
    export: Weak<Export>,
    due: Instant,
    schedule: Schedule,
}

/// Runs until the daemon is gone or stops it (shutdown aborts the task).
pub(super) async fn run(daemon: Weak<Daemon>) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut scan = tokio::time::interval(SCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        scan.tick().await;
        let Some(d) = daemon.upgrade() else { return };
        schedule(&d, &mut pending);
        let now = Instant::now();
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let attempts = due.iter().filter_map(|name| {
            let old = pending.get(name)?.export.upgrade()?;
            Some(attempt(&d, old))
        });
        for (name, outcome) in futures_util::future::join_all(attempts).await {
            match (outcome, pending.get_mut(&name)) {
                (Some(refused), Some(p)) => reschedule(p, &refused),
                _ => drop(pending.remove(&name)),
            }
        }
    }
}

/// Adds refused, retryable exports of the current registry to `pending`; forgets entries whose
/// export was replaced or removed by a reload.
fn schedule(d: &Daemon, pending: &mut HashMap<String, Pending>) {
    let snapshot = d.registry.snapshot();
    pending.retain(|name, p| {
        let current = snapshot.get(name);
        current.is_some_and(|c| p.export.upgrade().is_some_and(|o| Arc::ptr_eq(c, &o)))
    });
    for (name, export) in snapshot.iter() {
        let Some(rule) = export.reopen_rule() else {
            continue;
        };
        if pending.contains_key(name) {
            continue;
        }
        let mut schedule = Schedule::new();
        let delay = schedule.next(rule);
        pending.insert(
            name.clone(),
            Pending {
                export: Arc::downgrade(export),
                due: Instant::now() + delay,
                schedule,
            },
        );
    }
}

/// Sets the next attempt after another refusal (`refused` is now the registry's version).
fn reschedule(p: &mut Pending, refused: &Arc<Export>) {
    p.schedule.failed();
    p.export = Arc::downgrade(refused);
    let rule = refused.reopen_rule().unwrap_or(Retry::Backoff);
    p.due = Instant::now() + p.schedule.next(rule);
}

/// Opens `old`'s definition again. Returns the export's name and, if it is still refused, the
/// refused version now in the registry (`None`: it is up, or a reload took over).
async fn attempt(d: &Daemon, old: Arc<Export>) -> (String, Option<Arc<Export>>) {
    let name = old.name().to_owned();
    let fresh = try_open(&old.config, &d.factory, &d.ctx)
        .await
        .counting_on(&old);
    let _no_reload_meanwhile = d.reload_lock.lock().await;
    let current = d.registry.snapshot();
    if !current.get(&name).is_some_and(|c| Arc::ptr_eq(c, &old)) {
        return (name, None); // a reload replaced or removed it while we were opening
    }
    if old.attached() > 0 && old.is_serving() {
        return (name, Some(old)); // lost lease, but a client attached meanwhile: not now
    }
    let up = fresh.is_serving();
    let lost = old.lease_slot().and_then(|s| s.lost_reason());
    match (old.refusal(), fresh.refusal()) {
        (None, None) => warn!(
            export = name.as_str(),
            "export lease lost ({}): reopened with nothing cached; new clients are refused while the other daemon holds it",
            lost.as_deref().unwrap_or("taken over")
        ),
        (_, None) => info!(
            export = name.as_str(),
            "export is up (refused before: opened again by itself)"
        ),
        (None, Some(now)) => warn!(
            export = name.as_str(),
            "export lease lost: new clients are refused until it is free again: {now}"
        ),
        (Some(before), Some(now))
            if before.to_string() != now.to_string() || now.retry() == Retry::Never =>
        {
            warn!(export = name.as_str(), "export still refused: {now}")
        }
        (_, Some(now)) => debug!(export = name.as_str(), "export still refused: {now}"),
    }
    let mut next = (*current).clone();
    next.insert(name.clone(), Arc::clone(&fresh));
    d.registry.replace(next);
    if up {
        info!("{}", d.status());
    }
    let still_refused = fresh.reopen_rule().is_some().then_some(fresh);
    (name, still_refused)
}
