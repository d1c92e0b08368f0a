//! Data helpers shared by the real-peer tests: bytes that are cheap to regenerate on
//! either side of a guest boundary, and a digest the guest's busybox can compute too.

use std::io::Write;
use std::process::{Command, Stdio};

/// `len` deterministic bytes from an xorshift64 stream started at `seed`, so that a
/// block read from the wrong place, or a stale one, never matches.
pub fn xorshift_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The sha256 of `data` as lowercase hex, by the host's `sha256sum` (the same tool
/// the guest uses, so the two sides compare like with like).
pub fn sha256_hex(data: &[u8]) -> std::io::Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?;
    stdin.write_all(data)?;
    drop(stdin);
    let out = child.wait_with_output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other("sha256sum printed nothing"))
}
