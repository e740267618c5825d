//! The crash hook for tests: with `NBD_S3_CRASH_AT=<step>` in the environment, the process
//! aborts (as abruptly as kill -9: no flush, no cleanup) when it reaches the named step of a
//! metadata change. Tests use it to prove every step of snapshot create and delete leaves the
//! export readable. The steps are admin operations, never the data path, so the variable is
//! simply read each time (no process-wide state).
//!
//! Only test builds have it: debug builds (what `cargo test` runs) or the `crash-hook`
//! feature. A release build, as packaged, ignores the variable, so a stray environment
//! setting can never abort a production daemon.

/// Environment variable naming the step to die at.
#[cfg(any(debug_assertions, feature = "crash-hook"))]
pub const CRASH_ENV: &str = "NBD_S3_CRASH_AT";

/// Aborts the process if `NBD_S3_CRASH_AT` names `step` (test builds only).
#[cfg(any(debug_assertions, feature = "crash-hook"))]
pub fn crash_point(step: &str) {
    if std::env::var(CRASH_ENV).ok().as_deref() == Some(step) {
        eprintln!("{CRASH_ENV}={step}: aborting the process here");
        std::process::abort();
    }
}

/// Release builds: the hook does nothing.
#[cfg(not(any(debug_assertions, feature = "crash-hook")))]
pub fn crash_point(_step: &str) {}
