//! Transmission-phase parser fuzzing: a limits selector byte, then request headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_s3::proto::fuzzing::request(data);
});
