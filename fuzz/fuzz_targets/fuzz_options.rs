//! Option-phase parser fuzzing: arbitrary bytes as a stream of client options.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_s3::proto::fuzzing::options(data);
});
