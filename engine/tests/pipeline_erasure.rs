//! Erasure coding: exact reconstruction up to m losses, errors beyond, and the fast
//! ISA-L path held byte for byte to the plain-Rust definition of the parity format.

use engine::pipeline::erasure::gf;
use engine::pipeline::{coder_for, ErasureCoder, IsalCoder, Mirror, PipelineError, ReferenceCoder};
use proptest::prelude::*;

fn parity_bufs(m: usize, len: usize) -> Vec<Vec<u8>> {
    vec![vec![0xAA; len]; m]
}

fn encode(coder: &dyn ErasureCoder, data: &[Vec<u8>], len: usize) -> Vec<Vec<u8>> {
    let mut parity = parity_bufs(coder.parity_strips(), len);
    let d: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
    coder.encode(&d, &mut p).expect("encode");
    parity
}

fn padded(s: &[u8], len: usize) -> Vec<u8> {
    let mut v = s.to_vec();
    v.resize(len, 0);
    v
}

/// Drops `lost` strips and rebuilds all of them; returns the rebuilt strips.
fn rebuild(
    coder: &dyn ErasureCoder,
    all: &[Vec<u8>],
    lost: &[usize],
    len: usize,
) -> Result<Vec<Vec<u8>>, PipelineError> {
    let strips: Vec<Option<&[u8]>> = all
        .iter()
        .enumerate()
        .map(|(i, s)| (!lost.contains(&i)).then_some(s.as_slice()))
        .collect();
    let mut sorted = lost.to_vec();
    sorted.sort_unstable();
    let mut bufs = vec![vec![0x55u8; len]; sorted.len()];
    let mut wanted: Vec<(usize, &mut [u8])> = sorted
        .iter()
        .copied()
        .zip(bufs.iter_mut().map(Vec::as_mut_slice))
        .collect();
    coder.reconstruct(&strips, &mut wanted)?;
    Ok(bufs)
}

#[test]
fn isal_generator_matches_the_documented_cauchy_matrix() {
    for k in 2..=16 {
        for m in 1..=4 {
            let fast = IsalCoder::new(k, m).expect("isal");
            let reference = ReferenceCoder::new(k, m).expect("reference");
            assert_eq!(fast.generator(), reference.generator(), "k={k} m={m}");
            // Parity row p, column j = 1/((k+p) XOR j).
            let g = reference.generator();
            let row = k + m - 1;
            let j = k - 1;
            let expect = gf::inv(u8::try_from(row ^ j).expect("small"));
            assert_eq!(g[row * k + j], expect);
        }
    }
}

#[test]
fn rs_4_2_known_answer() {
    // Pinned parity bytes: if this changes, every stored row becomes unreadable.
    let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1, 0x10 * i, 0xFF, 0]).collect();
    let coder = IsalCoder::new(4, 2).expect("isal");
    let parity = encode(&coder, &data, 4);
    assert_eq!(
        parity,
        vec![vec![0x48, 0xe8, 0x96, 0x00], vec![0x0f, 0xd2, 0x96, 0x00]]
    );
    let reference = encode(&ReferenceCoder::new(4, 2).expect("ref"), &data, 4);
    assert_eq!(parity, reference);
    // Column 3 is all zero, so its parity is zero; column 2 is all 0xFF, so parity is
    // 0xFF times the XOR of the row's coefficients.
    let g = coder.generator();
    for p in 0..2 {
        assert_eq!(parity[p][3], 0);
        let coef_sum = g[(4 + p) * 4..(5 + p) * 4].iter().fold(0, |a, c| a ^ c);
        assert_eq!(parity[p][2], gf::mul(0xFF, coef_sum));
    }
}

#[test]
fn mirror_is_plain_copies() {
    let coder = coder_for(1, 3).expect("mirror");
    let data = vec![b"hello".to_vec()];
    let parity = encode(coder.as_ref(), &data, 8);
    for p in &parity {
        assert_eq!(p, b"hello\0\0\0");
    }
    let all: Vec<Vec<u8>> = std::iter::once(data[0].clone()).chain(parity).collect();
    let rebuilt = rebuild(coder.as_ref(), &all, &[0, 1, 2], 8).expect("rebuild");
    for r in rebuilt {
        assert_eq!(r, b"hello\0\0\0");
    }
    assert_eq!(
        rebuild(coder.as_ref(), &all, &[0, 1, 2, 3], 8),
        Err(PipelineError::TooManyErasures {
            present: 0,
            needed: 1
        })
    );
}

#[test]
fn bad_geometry_and_shapes_are_errors() {
    assert!(IsalCoder::new(0, 2).is_err());
    assert!(IsalCoder::new(1, 2).is_err());
    assert!(IsalCoder::new(4, 0).is_err());
    assert!(IsalCoder::new(30, 3).is_err());
    assert!(Mirror::new(0).is_err());
    let coder = IsalCoder::new(4, 2).expect("isal");
    let d = [&[0u8; 8][..]; 3];
    let mut p0 = [0u8; 8];
    let mut p1 = [0u8; 8];
    assert!(coder.encode(&d, &mut [&mut p0, &mut p1]).is_err());
    let long = [0u8; 9];
    let d = [&[0u8; 8][..], &[0u8; 8], &[0u8; 8], &long];
    assert!(coder.encode(&d, &mut [&mut p0, &mut p1]).is_err());
    assert!(coder
        .accumulate(4, 0, &[1], &mut [&mut p0, &mut p1])
        .is_err());
    assert!(coder
        .accumulate(0, 8, &[1], &mut [&mut p0, &mut p1])
        .is_err());
    // Wanted indices out of order.
    let strips = [Some(&[0u8; 8][..]); 6];
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    assert!(coder
        .reconstruct(&strips, &mut [(2, &mut a), (1, &mut b)])
        .is_err());
}

#[test]
fn decode_tables_are_cached_per_loss_pattern() {
    let coder = IsalCoder::new(6, 3).expect("isal");
    let data: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 64]).collect();
    let parity = encode(&coder, &data, 64);
    let all: Vec<Vec<u8>> = data.iter().cloned().chain(parity).collect();
    for _ in 0..3 {
        rebuild(&coder, &all, &[1, 4], 64).expect("rebuild");
    }
    assert_eq!(coder.cached_patterns(), 1);
    rebuild(&coder, &all, &[0, 7], 64).expect("rebuild");
    assert_eq!(coder.cached_patterns(), 2);
}

/// Data strips of random lengths (as filled), each at most `len`.
fn ragged_row() -> impl Strategy<Value = (usize, usize, usize, Vec<Vec<u8>>)> {
    (1usize..=16, 1usize..=4, 1usize..300).prop_flat_map(|(k, m, len)| {
        let strip = (0..=len).prop_flat_map(|l| proptest::collection::vec(any::<u8>(), l));
        (
            Just(k),
            Just(m),
            Just(len),
            proptest::collection::vec(strip, k),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn up_to_m_erasures_reconstruct_exactly(
        (k, m, len, data) in ragged_row(),
        lost_seed in any::<u64>(),
        lost_count in 0usize..=4,
    ) {
        let coder = coder_for(k, m).expect("coder");
        let parity = encode(coder.as_ref(), &data, len);
        let all: Vec<Vec<u8>> = data.iter().cloned().chain(parity).collect();
        let n = k + m;
        // Distinct lost strips chosen from the seed.
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = lost_seed | 1;
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, usize::try_from(x % u64::try_from(i + 1).expect("small")).expect("small"));
        }
        let lost: Vec<usize> = order[..lost_count.min(n)].to_vec();
        let result = rebuild(coder.as_ref(), &all, &lost, len);
        if lost.len() <= m {
            let rebuilt = result.expect("rebuild");
            let mut sorted = lost.clone();
            sorted.sort_unstable();
            for (idx, got) in sorted.iter().zip(&rebuilt) {
                prop_assert_eq!(got, &padded(&all[*idx], len), "strip {} k={} m={}", idx, k, m);
            }
        } else {
            prop_assert_eq!(
                result,
                Err(PipelineError::TooManyErasures { present: n - lost.len(), needed: k })
            );
        }
    }

    #[test]
    fn isal_parity_equals_reference_parity((k, m, len, data) in ragged_row()) {
        prop_assume!(k >= 2);
        let fast = encode(&IsalCoder::new(k, m).expect("isal"), &data, len);
        let slow = encode(&ReferenceCoder::new(k, m).expect("ref"), &data, len);
        prop_assert_eq!(fast, slow);
    }

    #[test]
    fn accumulating_records_equals_encoding_the_filled_row(
        (k, m, len, data) in ragged_row(),
        cuts in proptest::collection::vec(1usize..64, 1..6),
    ) {
        let coder = coder_for(k, m).expect("coder");
        let want = encode(coder.as_ref(), &data, len);
        let mut parity = vec![vec![0u8; len]; m];
        // Append each strip's bytes as a sequence of "records" of assorted sizes.
        for (strip, bytes) in data.iter().enumerate() {
            let mut at = 0;
            let mut c = cuts.iter().cycle();
            while at < bytes.len() {
                let end = (at + c.next().copied().unwrap_or(1)).min(bytes.len());
                let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
                coder.accumulate(strip, at, &bytes[at..end], &mut p).expect("accumulate");
                at = end;
            }
        }
        prop_assert_eq!(parity, want);
    }
}
