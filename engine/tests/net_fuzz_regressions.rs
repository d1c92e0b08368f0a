//! Replays every input kept under `fuzz/regressions/net_parse/` (crashes and slow
//! inputs found by `cargo fuzz run net_parse`) through the function the fuzz target
//! calls, so a fixed crash stays fixed.

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn replay_net_parse_regressions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/net_parse");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions/net_parse exists")
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| engine::net::fuzzing::net_parse(&data));
        assert!(r.is_ok(), "regression input {} panics", f.display());
    }
    eprintln!("replayed {} net_parse inputs", files.len());
}

/// The harness really reaches the pipeline: a valid frame from an access port with
/// an allow rule is forwarded.
#[test]
fn harness_accepts_a_valid_frame() {
    use engine::net::packet::{build, ETH_P_IPV4, IPPROTO_UDP};
    use engine::net::MacAddr;
    let s = "10.0.0.1".parse().unwrap();
    let d = "10.0.0.2".parse().unwrap();
    let ip = build::ip(s, d, IPPROTO_UDP, &build::udp(s, d, 1, 2, b"x"));
    let mut input = vec![0u8];
    input.extend(build::ethernet(
        MacAddr([2; 6]),
        MacAddr([4; 6]),
        None,
        ETH_P_IPV4,
        &ip,
    ));
    // Flooded to the other access port, the trunk and the VXLAN tunnel, twice.
    assert_eq!(engine::net::fuzzing::net_parse(&input), 6);
    // The same frame from the uplink is not VXLAN: nothing is sent.
    input[0] = 3;
    assert_eq!(engine::net::fuzzing::net_parse(&input), 0);
}
