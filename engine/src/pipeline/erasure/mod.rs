//! Erasure coding of stripe rows: k data strips protected by m parity strips.
//!
//! Rows are written once and never modified, and records land in a data strip one at a
//! time, so the coder has to work on strips *as filled*: a strip shorter than the row's
//! strip length counts as if zero-padded to it, without anyone copying it into a padded
//! buffer. `accumulate` folds one appended record into running parity, so the layout can
//! keep parity current while it fills a row and seal it without a second pass.
//!
//! The parity bytes are an on-disk format. They are defined by [`gf`] (GF(2^8), polynomial
//! 0x11D) and the systematic Cauchy matrix (parity row p, column j = 1/((k+p) XOR j)),
//! documented in docs/format.md. [`IsalCoder`] computes them fast; [`ReferenceCoder`]
//! computes the same bytes slowly in plain Rust and exists so tests can hold the fast
//! path to the definition. Mirroring (k = 1) is defined as plain copies: [`Mirror`].
//!
//! Coders are per reactor (`Send`, not `Sync`): the decode-table cache is a `RefCell`,
//! so reconstruction takes no lock on the I/O path.

pub mod gf;

use std::cell::RefCell;
use std::collections::HashMap;

use super::isal;
use super::PipelineError;

/// Most strips (k + m) a row may have.
pub const MAX_STRIPS: usize = 32;

/// Most loss patterns whose decode tables one coder keeps (each is at most 32*k*m bytes).
pub const DECODE_CACHE_ENTRIES: usize = 4096;

/// A k + m erasure code over byte strips.
pub trait ErasureCoder: Send + std::fmt::Debug {
    /// k: data strips per row.
    fn data_strips(&self) -> usize;
    /// m: parity strips per row (copies, for a mirror).
    fn parity_strips(&self) -> usize;
    /// Computes every parity strip from the data strips as filled.
    ///
    /// `data` has k strips, `parity` m buffers of one common length L (the row's strip
    /// length); each data strip is at most L bytes and counts as zero-padded to L.
    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), PipelineError>;
    /// Folds `bytes`, newly written at `offset` of data strip `strip` over bytes that were
    /// zero, into parity that was correct before the write.
    fn accumulate(
        &self,
        strip: usize,
        offset: usize,
        bytes: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), PipelineError>;
    /// Rebuilds the strips listed in `wanted` (ascending, distinct indices in 0..k+m,
    /// data strips first) from those present in `strips` (k + m entries, `None` when
    /// missing). All wanted buffers share one length L; present strips are at most L
    /// bytes and count as zero-padded to L. A wanted data strip comes back padded to L.
    fn reconstruct(
        &self,
        strips: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), PipelineError>;
}

/// The coder a profile asks for: a mirror when k = 1, otherwise ISA-L Reed-Solomon.
pub fn coder_for(k: usize, m: usize) -> Result<Box<dyn ErasureCoder>, PipelineError> {
    if k == 1 {
        Ok(Box::new(Mirror::new(m)?))
    } else {
        Ok(Box::new(IsalCoder::new(k, m)?))
    }
}

fn check_geometry(k: usize, m: usize) -> Result<(), PipelineError> {
    if k == 0 || m == 0 || k + m > MAX_STRIPS {
        return Err(PipelineError::ErasureArgs(format!(
            "need k >= 1, m >= 1, k + m <= {MAX_STRIPS}; got k={k} m={m}"
        )));
    }
    Ok(())
}

/// [`check_geometry`] for a Reed-Solomon coder, which also needs k >= 2.
fn check_rs_geometry(k: usize, m: usize) -> Result<(), PipelineError> {
    check_geometry(k, m)?;
    if k < 2 {
        return Err(PipelineError::ErasureArgs(
            "k = 1 is a mirror, not Reed-Solomon".into(),
        ));
    }
    Ok(())
}

/// Checks encode shapes; returns the strip length L.
fn check_encode(
    k: usize,
    m: usize,
    data: &[&[u8]],
    parity: &[&mut [u8]],
) -> Result<usize, PipelineError> {
    if data.len() != k || parity.len() != m {
        return Err(PipelineError::ErasureArgs(format!(
            "encode wants {k} data and {m} parity strips, got {} and {}",
            data.len(),
            parity.len()
        )));
    }
    let len = parity.first().map_or(0, |p| p.len());
    if parity.iter().any(|p| p.len() != len) {
        return Err(PipelineError::ErasureArgs(
            "parity strips differ in length".into(),
        ));
    }
    if let Some(d) = data.iter().find(|d| d.len() > len) {
        return Err(PipelineError::ErasureArgs(format!(
            "data strip of {} bytes is longer than the parity strips ({len})",
            d.len()
        )));
    }
    Ok(len)
}

fn check_accumulate(
    k: usize,
    m: usize,
    strip: usize,
    offset: usize,
    bytes: &[u8],
    parity: &[&mut [u8]],
) -> Result<(), PipelineError> {
    let end = offset
        .checked_add(bytes.len())
        .ok_or_else(|| PipelineError::ErasureArgs("offset + length overflows".into()))?;
    if strip >= k || parity.len() != m || parity.iter().any(|p| p.len() < end) {
        return Err(PipelineError::ErasureArgs(format!(
            "accumulate: strip {strip} of {k}, {} parity strips of {m}, range ..{end}",
            parity.len()
        )));
    }
    Ok(())
}

/// A validated reconstruction request.
struct Plan {
    /// Strip length L.
    len: usize,
    /// The first k present strips, ascending: the sources.
    sources: Vec<usize>,
    /// Bit i set: strip i is a source.
    source_mask: u32,
    /// Bit i set: strip i is wanted.
    wanted_mask: u32,
}

fn plan_reconstruct(
    k: usize,
    m: usize,
    strips: &[Option<&[u8]>],
    wanted: &[(usize, &mut [u8])],
) -> Result<Plan, PipelineError> {
    let n = k + m;
    if strips.len() != n {
        return Err(PipelineError::ErasureArgs(format!(
            "reconstruct wants {n} strip slots, got {}",
            strips.len()
        )));
    }
    let len = wanted.first().map_or(0, |(_, b)| b.len());
    let mut wanted_mask = 0u32;
    let mut prev: Option<usize> = None;
    for (idx, buf) in wanted {
        if *idx >= n || prev.is_some_and(|p| p >= *idx) {
            return Err(PipelineError::ErasureArgs(format!(
                "wanted strip indices must be ascending, distinct and below {n}"
            )));
        }
        if buf.len() != len {
            return Err(PipelineError::ErasureArgs(
                "wanted buffers differ in length".into(),
            ));
        }
        prev = Some(*idx);
        wanted_mask |= 1 << idx;
    }
    let mut sources = Vec::with_capacity(k);
    let mut source_mask = 0u32;
    let mut present = 0;
    for (i, s) in strips.iter().enumerate() {
        if let Some(s) = s {
            if s.len() > len && !wanted.is_empty() {
                return Err(PipelineError::ErasureArgs(format!(
                    "present strip {i} has {} bytes, more than the wanted length {len}",
                    s.len()
                )));
            }
            present += 1;
            if sources.len() < k {
                sources.push(i);
                source_mask |= 1 << i;
            }
        }
    }
    if present < k {
        return Err(PipelineError::TooManyErasures { present, needed: k });
    }
    Ok(Plan {
        len,
        sources,
        source_mask,
        wanted_mask,
    })
}

/// Coefficients (wanted rows x k) that rebuild each wanted strip from the sources.
///
/// `generator` is the full (k + m) x k matrix; `invert` inverts a k x k matrix.
fn decode_coefficients(
    k: usize,
    generator: &[u8],
    sources: &[usize],
    wanted: impl Iterator<Item = usize>,
    invert: impl Fn(&[u8], usize) -> Result<Option<Vec<u8>>, PipelineError>,
) -> Result<Vec<u8>, PipelineError> {
    let mut b = Vec::with_capacity(k * k);
    for &s in sources {
        b.extend_from_slice(&generator[s * k..(s + 1) * k]);
    }
    let d = invert(&b, k)?.ok_or_else(|| {
        PipelineError::ErasureArgs("decode matrix is singular (generator broken)".into())
    })?;
    let mut out = Vec::new();
    for w in wanted {
        // Row w of generator times D: strip w expressed in the sources.
        for col in 0..k {
            let mut acc = 0u8;
            for t in 0..k {
                acc ^= gf::mul(generator[w * k + t], d[t * k + col]);
            }
            out.push(acc);
        }
    }
    Ok(out)
}

/// Mirroring: k = 1, every parity strip is a copy of the data strip.
#[derive(Debug, Clone)]
pub struct Mirror {
    copies: usize,
}

impl Mirror {
    /// A mirror with `copies` extra copies (m).
    pub fn new(copies: usize) -> Result<Self, PipelineError> {
        check_geometry(1, copies)?;
        Ok(Self { copies })
    }
}

impl ErasureCoder for Mirror {
    fn data_strips(&self) -> usize {
        1
    }

    fn parity_strips(&self) -> usize {
        self.copies
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), PipelineError> {
        check_encode(1, self.copies, data, parity)?;
        let d = data[0];
        for p in parity.iter_mut() {
            p[..d.len()].copy_from_slice(d);
            p[d.len()..].fill(0);
        }
        Ok(())
    }

    fn accumulate(
        &self,
        strip: usize,
        offset: usize,
        bytes: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), PipelineError> {
        check_accumulate(1, self.copies, strip, offset, bytes, parity)?;
        for p in parity.iter_mut() {
            for (d, s) in p[offset..offset + bytes.len()].iter_mut().zip(bytes) {
                *d ^= *s;
            }
        }
        Ok(())
    }

    fn reconstruct(
        &self,
        strips: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), PipelineError> {
        let plan = plan_reconstruct(1, self.copies, strips, wanted)?;
        let src = plan.sources.first().and_then(|&i| strips[i]).ok_or(
            PipelineError::TooManyErasures {
                present: 0,
                needed: 1,
            },
        )?;
        for (_, buf) in wanted.iter_mut() {
            buf[..src.len()].copy_from_slice(src);
            buf[src.len()..].fill(0);
        }
        Ok(())
    }
}

/// Reed-Solomon in plain Rust, byte by byte: the definition of the parity format.
#[derive(Debug, Clone)]
pub struct ReferenceCoder {
    k: usize,
    m: usize,
    generator: Vec<u8>,
}

impl ReferenceCoder {
    /// A k + m code; k >= 2 (k = 1 is a [`Mirror`]).
    pub fn new(k: usize, m: usize) -> Result<Self, PipelineError> {
        check_rs_geometry(k, m)?;
        let mut generator = vec![0u8; k * k];
        for i in 0..k {
            generator[i * k + i] = 1;
        }
        generator.extend(gf::cauchy_parity_rows(k, m));
        Ok(Self { k, m, generator })
    }

    /// The full (k + m) x k generator matrix, row-major.
    pub fn generator(&self) -> &[u8] {
        &self.generator
    }
}

impl ErasureCoder for ReferenceCoder {
    fn data_strips(&self) -> usize {
        self.k
    }

    fn parity_strips(&self) -> usize {
        self.m
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), PipelineError> {
        check_encode(self.k, self.m, data, parity)?;
        for (p, out) in parity.iter_mut().enumerate() {
            out.fill(0);
            for (j, d) in data.iter().enumerate() {
                gf::mul_add(self.generator[(self.k + p) * self.k + j], d, out);
            }
        }
        Ok(())
    }

    fn accumulate(
        &self,
        strip: usize,
        offset: usize,
        bytes: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), PipelineError> {
        check_accumulate(self.k, self.m, strip, offset, bytes, parity)?;
        for (p, out) in parity.iter_mut().enumerate() {
            let c = self.generator[(self.k + p) * self.k + strip];
            gf::mul_add(c, bytes, &mut out[offset..offset + bytes.len()]);
        }
        Ok(())
    }

    fn reconstruct(
        &self,
        strips: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), PipelineError> {
        let plan = plan_reconstruct(self.k, self.m, strips, wanted)?;
        let coefs = decode_coefficients(
            self.k,
            &self.generator,
            &plan.sources,
            wanted.iter().map(|(i, _)| *i),
            |m, n| Ok(gf::invert(m, n)),
        )?;
        for (row, (_, out)) in wanted.iter_mut().enumerate() {
            out.fill(0);
            for (col, &s) in plan.sources.iter().enumerate() {
                if let Some(src) = strips[s] {
                    gf::mul_add(coefs[row * self.k + col], src, out);
                }
            }
        }
        Ok(())
    }
}

/// Reed-Solomon through Intel ISA-L, with decode tables cached per loss pattern.
#[derive(Debug)]
pub struct IsalCoder {
    k: usize,
    m: usize,
    generator: Vec<u8>,
    encode_tables: Vec<u8>,
    /// (source mask << 32 | wanted mask) -> ISA-L tables for that pattern.
    decode_tables: RefCell<HashMap<u64, Vec<u8>>>,
}

impl IsalCoder {
    /// A k + m code; k >= 2 (k = 1 is a [`Mirror`]).
    pub fn new(k: usize, m: usize) -> Result<Self, PipelineError> {
        check_rs_geometry(k, m)?;
        let generator = isal::cauchy_matrix(k, m)?;
        let encode_tables = isal::init_tables(k, m, &generator[k * k..])?;
        Ok(Self {
            k,
            m,
            generator,
            encode_tables,
            decode_tables: RefCell::new(HashMap::new()),
        })
    }

    /// The full (k + m) x k generator matrix ISA-L produced, row-major.
    pub fn generator(&self) -> &[u8] {
        &self.generator
    }

    /// Number of loss patterns whose decode tables are cached.
    pub fn cached_patterns(&self) -> usize {
        self.decode_tables.borrow().len()
    }

    /// `outputs = tables * sources` for sources of possibly different lengths (each at
    /// most the output length), the missing tails counting as zeros.
    fn apply(
        &self,
        tables: &[u8],
        sources: &[&[u8]],
        outputs: &mut [&mut [u8]],
    ) -> Result<(), PipelineError> {
        let min = sources.iter().map(|s| s.len()).min().unwrap_or(0);
        isal::encode(tables, min, sources, outputs)?;
        let mut tails = false;
        for s in sources {
            tails |= s.len() > min;
        }
        let len = outputs.first().map_or(0, |o| o.len());
        if min < len {
            for o in outputs.iter_mut() {
                o[min..].fill(0);
            }
        }
        if tails {
            for (j, s) in sources.iter().enumerate() {
                if s.len() > min {
                    isal::encode_update(tables, self.k, j, &s[min..], outputs, min)?;
                }
            }
        }
        Ok(())
    }
}

impl ErasureCoder for IsalCoder {
    fn data_strips(&self) -> usize {
        self.k
    }

    fn parity_strips(&self) -> usize {
        self.m
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), PipelineError> {
        check_encode(self.k, self.m, data, parity)?;
        self.apply(&self.encode_tables, data, parity)
    }

    fn accumulate(
        &self,
        strip: usize,
        offset: usize,
        bytes: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), PipelineError> {
        check_accumulate(self.k, self.m, strip, offset, bytes, parity)?;
        isal::encode_update(&self.encode_tables, self.k, strip, bytes, parity, offset)
    }

    fn reconstruct(
        &self,
        strips: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), PipelineError> {
        let plan = plan_reconstruct(self.k, self.m, strips, wanted)?;
        if wanted.is_empty() {
            return Ok(());
        }
        let key = (u64::from(plan.source_mask) << 32) | u64::from(plan.wanted_mask);
        let mut cache = self.decode_tables.borrow_mut();
        if !cache.contains_key(&key) {
            let coefs = decode_coefficients(
                self.k,
                &self.generator,
                &plan.sources,
                wanted.iter().map(|(i, _)| *i),
                isal::invert_matrix,
            )?;
            let tables = isal::init_tables(self.k, wanted.len(), &coefs)?;
            if cache.len() >= DECODE_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, tables);
        }
        let tables = cache
            .get(&key)
            .ok_or_else(|| PipelineError::ErasureArgs("decode table cache lost an entry".into()))?;
        let mut sources: [&[u8]; MAX_STRIPS] = [&[]; MAX_STRIPS];
        for (slot, &s) in sources.iter_mut().zip(&plan.sources) {
            *slot = strips[s].unwrap_or(&[]);
        }
        let mut outs: Vec<&mut [u8]> = wanted.iter_mut().map(|(_, b)| &mut **b).collect();
        debug_assert!(outs.iter().all(|o| o.len() == plan.len));
        self.apply(tables, &sources[..self.k], &mut outs)
    }
}
