//! Replays every input kept under `fuzz/regressions/nbd_session/` through the same
//! function the cargo-fuzz target `nbd_session` calls, so that a fixed crash stays
//! fixed (and the hand-written seeds keep reaching the request paths).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use engine::frontend::nbd::fuzzing::{nbd_session, nbd_session_replies};
use std::path::Path;

#[test]
fn replay_nbd_session_regressions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/nbd_session");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions/nbd_session exists")
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| nbd_session(&data));
        assert!(r.is_ok(), "regression input {} panics", f.display());
    }
    eprintln!("replayed {} inputs", files.len());
}

#[test]
fn the_structured_seed_reaches_transmission() {
    // The seed writes 0x11 at 8192 and reads it back with structured replies: the
    // harness must really get that far, or the fuzzer only ever sees handshakes.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/nbd_session");
    let data = std::fs::read(dir.join("seed-structured-io")).unwrap();
    let out = nbd_session_replies(&data);
    let chunk_magic = [0x66, 0x8e, 0x33, 0xef];
    let at = out
        .windows(4)
        .position(|w| w == chunk_magic)
        .expect("a structured reply");
    let rest = &out[at..];
    assert!(rest.windows(4096).any(|w| w.iter().all(|&b| b == 0x11)));
}
