//! An NBD client session fed arbitrary bytes through an in-memory stream, after an
//! optional well-formed prologue chosen by the first byte (see
//! `engine::frontend::nbd::fuzzing::nbd_session`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    engine::frontend::nbd::fuzzing::nbd_session(data);
});
