//! A target connection fed arbitrary bytes through an in-memory stream, after an
//! optional well-formed prologue chosen by the first byte (see
//! `nvmeof::target::fuzzing::target_connection`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nvmeof::target::fuzzing::target_connection(data);
});
