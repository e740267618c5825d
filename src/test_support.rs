//! Helpers shared by the unit tests of every module. A leaf: it uses nothing of the crate,
//! so any module's tests may use it without adding an edge to the module graph.

use std::time::{Duration, Instant};

/// How long `wait_until` waits: far beyond any legitimate wait, so reaching it means the
/// condition never came.
const WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` every 2 ms until it holds; fails the test with `what` after 20 s. The way to
/// wait for a real condition instead of sleeping.
///
/// The deadline is wall-clock time while the polling sleeps on tokio's clock, so it also
/// works in tests with a paused clock: the sleeps advance virtual time, the bound stays real.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
