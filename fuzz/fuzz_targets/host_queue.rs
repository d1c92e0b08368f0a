//! The host's queue task (C2HData, R2T, response handling) against arbitrary
//! controller bytes (see `nvmeof::fuzzing::host_queue`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nvmeof::fuzzing::host_queue(data);
});
