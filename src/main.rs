//! The `nbd-s3` command line. Placeholder.
fn main() {}
