//! A fast hasher for the tables whose keys come from configuration (ports, networks,
//! tunnels, rule ids), which are looked up several times per frame.
//!
//! Tables whose keys a host controls (MAC table, connection table, decision cache)
//! keep std's keyed SipHash: with a fixed, fast hash a host could choose keys that
//! collide and turn every lookup into a list walk. Configuration keys are chosen by
//! the operator, so the multiply-rotate hash (the one rustc uses) is safe for them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// Multiply-rotate hasher over machine words.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(u64::try_from(i).unwrap_or(u64::MAX));
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A map keyed by configuration values.
pub type ConfigMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map() {
        let mut m: ConfigMap<(u32, u16), u8> = ConfigMap::default();
        for i in 0..1000u32 {
            m.insert((i, u16::try_from(i % 7).unwrap()), 1);
        }
        assert_eq!(m.len(), 1000);
        assert_eq!(m.get(&(999, 5)), Some(&1));
        assert_eq!(m.get(&(999, 4)), None);
    }
}
