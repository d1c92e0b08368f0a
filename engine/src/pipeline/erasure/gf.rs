//! GF(2^8) arithmetic (polynomial 0x11D, generator 2), written out in plain Rust.
//!
//! The on-disk parity format is defined by this arithmetic and the Cauchy matrix below,
//! not by whichever library computes it fast. Keeping a slow, obviously-correct copy
//! lets the tests check the fast path byte for byte and gives a portable fallback.

/// The field's reduction polynomial x^8 + x^4 + x^3 + x^2 + 1 (the one ISA-L uses).
pub const POLY: u16 = 0x11D;

// The loop keeps x below 0x100 and i below 255, so the narrowing casts are exact.
#[allow(clippy::cast_possible_truncation)]
const fn build_tables() -> ([u8; 512], [u8; 256]) {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        exp[i + 255] = x as u8;
        log[x as usize] = i as u8;
        x <<= 1;
        if x & 0x100 != 0 {
            x ^= POLY;
        }
        i += 1;
    }
    (exp, log)
}

const TABLES: ([u8; 512], [u8; 256]) = build_tables();
const EXP: [u8; 512] = TABLES.0;
const LOG: [u8; 256] = TABLES.1;

/// Product of two field elements.
pub fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    EXP[usize::from(LOG[usize::from(a)]) + usize::from(LOG[usize::from(b)])]
}

/// Multiplicative inverse; the inverse of 0 is defined as 0 (never asked for by callers).
pub fn inv(a: u8) -> u8 {
    if a == 0 {
        return 0;
    }
    EXP[255 - usize::from(LOG[usize::from(a)])]
}

/// The parity rows of the systematic Cauchy generator matrix: `m` rows of `k`
/// coefficients, row `p` column `j` = 1 / ((k + p) XOR j). Same definition as ISA-L's
/// `gf_gen_cauchy1_matrix`, without the identity rows on top.
pub fn cauchy_parity_rows(k: usize, m: usize) -> Vec<u8> {
    let mut rows = Vec::with_capacity(k * m);
    for p in 0..m {
        for j in 0..k {
            // k + m <= MAX_STRIPS (32), so both fit in a byte.
            let i = u8::try_from(k + p).unwrap_or(0);
            let jj = u8::try_from(j).unwrap_or(0);
            rows.push(inv(i ^ jj));
        }
    }
    rows
}

/// Inverts an n x n matrix (row-major) by Gauss-Jordan elimination. `None` if singular.
pub fn invert(matrix: &[u8], n: usize) -> Option<Vec<u8>> {
    let mut a = matrix.to_vec();
    let mut out = vec![0u8; n * n];
    for i in 0..n {
        out[i * n + i] = 1;
    }
    for col in 0..n {
        let pivot = (col..n).find(|&r| a[r * n + col] != 0)?;
        if pivot != col {
            for c in 0..n {
                a.swap(pivot * n + c, col * n + c);
                out.swap(pivot * n + c, col * n + c);
            }
        }
        let scale = inv(a[col * n + col]);
        for c in 0..n {
            a[col * n + c] = mul(a[col * n + c], scale);
            out[col * n + c] = mul(out[col * n + c], scale);
        }
        for r in 0..n {
            if r != col {
                let f = a[r * n + col];
                if f != 0 {
                    for c in 0..n {
                        a[r * n + c] ^= mul(f, a[col * n + c]);
                        out[r * n + c] ^= mul(f, out[col * n + c]);
                    }
                }
            }
        }
    }
    Some(out)
}

/// `dst[i] ^= c * src[i]` over the common length.
pub fn mul_add(c: u8, src: &[u8], dst: &mut [u8]) {
    if c == 0 {
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= mul(c, *s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gf_inverse_is_inverse_for_every_nonzero_element() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "a = {a}");
        }
    }

    #[test]
    fn gf_mul_matches_carryless_multiply_reduced() {
        fn slow(a: u8, b: u8) -> u8 {
            let mut acc: u16 = 0;
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    acc ^= u16::from(a) << bit;
                }
            }
            for bit in (8..16).rev() {
                if acc & (1 << bit) != 0 {
                    acc ^= POLY << (bit - 8);
                }
            }
            u8::try_from(acc).unwrap_or(0)
        }
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), slow(a, b));
            }
        }
    }

    #[test]
    fn gf_invert_round_trips_cauchy_submatrix() {
        let k = 5;
        let rows = cauchy_parity_rows(k, 3);
        // Square matrix from 2 identity rows and 3 parity rows.
        let mut m = vec![0u8; k * k];
        m[0] = 1;
        m[k + 1] = 1;
        m[2 * k..].copy_from_slice(&rows);
        let inv_m = invert(&m, k).expect("cauchy submatrix is invertible");
        for r in 0..k {
            for c in 0..k {
                let mut acc = 0;
                for t in 0..k {
                    acc ^= mul(m[r * k + t], inv_m[t * k + c]);
                }
                assert_eq!(acc, u8::from(r == c));
            }
        }
    }
}
