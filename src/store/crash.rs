//! The crash hook for tests: with `NBD_S3_CRASH_AT=<step>` in the environment, the process
//! aborts (as abruptly as kill -9: no flush, no cleanup) when it reaches the named step of a
//! metadata change. Tests use it to prove every step of snapshot create and delete leaves the
//! export readable. Unset (always, in production), a step costs one comparison.

use std::sync::OnceLock;

/// Environment variable naming the step to die at.
pub const CRASH_ENV: &str = "NBD_S3_CRASH_AT";

/// Aborts the process if `NBD_S3_CRASH_AT` names `step`.
pub fn crash_point(step: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_ENV).ok());
    if at.as_deref() == Some(step) {
        eprintln!("{CRASH_ENV}={step}: aborting the process here");
        std::process::abort();
    }
}
