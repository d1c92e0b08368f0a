//! The fixed hash and the little floating-point arithmetic placement depends on.
//!
//! Placement must come out the same on every engine, every platform and every build, for
//! years: a placement recorded on an Arm DPU today must be recomputed bit for bit by an x86
//! DPU after an upgrade. So nothing here uses `std`'s hashers (their algorithm is not
//! promised to stay the same, and `RandomState` is seeded at random) or the platform's
//! `libm` (`ln` may differ in the last bit between C libraries). The hash is a
//! written-out FNV-1a plus the SplitMix64 finaliser, and `ln` is evaluated with
//! additions, multiplications and divisions only, which IEEE 754 defines to the bit (Rust
//! never fuses them into FMAs on its own). The exact definitions are in `docs/placement.md`.

/// The SplitMix64 finaliser (Steele, Lea and Flood): a bijection on `u64` whose output bits
/// each depend on every input bit.
#[must_use]
pub const fn mix64(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64-bit key of a name (a node id): FNV-1a over its UTF-8 bytes, then [`mix64`].
#[must_use]
pub fn name_key(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The draw of one node for one segment: a 64-bit value that depends on the volume, the
/// segment number and the node's key, and on nothing else.
#[must_use]
pub const fn draw(volume: u64, segment: u64, key: u64) -> u64 {
    node_draw(segment_seed(volume, segment), key)
}

/// The part of [`draw`] that depends only on the segment, computed once per placement.
#[must_use]
pub const fn segment_seed(volume: u64, segment: u64) -> u64 {
    let h = mix64(volume ^ 0x9e37_79b9_7f4a_7c15);
    mix64(h ^ segment.wrapping_add(0x6a09_e667_f3bc_c909))
}

/// The rest of [`draw`]: `draw(v, s, key) == node_draw(segment_seed(v, s), key)`.
#[must_use]
pub const fn node_draw(seed: u64, key: u64) -> u64 {
    mix64(seed ^ key)
}

/// Maps a draw to a number strictly between 0 and 1: the top 52 bits, plus one half, over
/// 2^52. Every step is exact (`top + 0.5` needs 53 significant bits, which `f64` has).
#[must_use]
pub fn unit(h: u64) -> f64 {
    let top = h >> 12;
    let hi = u32::try_from(top >> 32).unwrap_or(u32::MAX);
    let lo = u32::try_from(top & 0xffff_ffff).unwrap_or(u32::MAX);
    (f64::from(hi) * 4_294_967_296.0 + f64::from(lo) + 0.5) / 4_503_599_627_370_496.0
}

const SQRT_2: f64 = std::f64::consts::SQRT_2;
const LN_2: f64 = std::f64::consts::LN_2;

/// Natural logarithm of a positive, finite, normal `x`, from IEEE basic operations only.
///
/// `x = m * 2^e` with `m` in `[sqrt(1/2), sqrt(2))`; `ln m = 2 atanh(s)`, `s = (m-1)/(m+1)`,
/// `|s| < 0.172`, summed to the `s^23` term (error below 1e-17 relative). Zero, negative
/// and non-normal inputs give `f64::NEG_INFINITY`; placement never passes them.
#[must_use]
pub fn ln(x: f64) -> f64 {
    if !(x.is_normal() && x > 0.0) {
        return f64::NEG_INFINITY;
    }
    let bits = x.to_bits();
    let biased = i32::try_from((bits >> 52) & 0x7ff).unwrap_or(1023);
    let mut e = biased - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // Horner form of 1 + s2/3 + s2^2/5 + ... + s2^11/23 (the reciprocals are constants,
    // correctly rounded at compile time exactly as they would be at run time).
    const INV: [f64; 11] = [
        1.0 / 21.0,
        1.0 / 19.0,
        1.0 / 17.0,
        1.0 / 15.0,
        1.0 / 13.0,
        1.0 / 11.0,
        1.0 / 9.0,
        1.0 / 7.0,
        1.0 / 5.0,
        1.0 / 3.0,
        1.0,
    ];
    let mut p = 1.0 / 23.0;
    for c in INV {
        p = p * s2 + c;
    }
    f64::from(e) * LN_2 + 2.0 * s * p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_and_keys_are_pinned() {
        // Golden values: these are part of the placement contract (docs/placement.md).
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        assert_eq!(name_key(""), mix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(name_key("node1"), name_key("node1"));
        assert_ne!(name_key("node1"), name_key("node2"));
    }

    #[test]
    fn draw_splits_into_segment_seed_and_node_draw() {
        for (v, s, k) in [(0, 0, 0), (1, 2, 3), (u64::MAX, 7, name_key("n"))] {
            assert_eq!(draw(v, s, k), node_draw(segment_seed(v, s), k));
        }
    }

    #[test]
    fn unit_is_strictly_inside_zero_one() {
        assert!(unit(0) > 0.0);
        assert!(unit(u64::MAX) < 1.0);
        assert_eq!(unit(0), 0.5 / 4_503_599_627_370_496.0);
    }

    #[test]
    fn ln_matches_std_closely() {
        let mut x = 1e-16;
        while x <= 1.0 {
            let ours = ln(x);
            let std = x.ln();
            assert!(
                (ours - std).abs() <= 1e-14 * std.abs().max(1.0),
                "ln({x}): {ours} vs {std}"
            );
            x *= 1.37;
        }
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
    }
}
