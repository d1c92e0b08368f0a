//! Hand-written bindings to the few Intel ISA-L (libisal) routines the pipeline uses:
//! GF(2^8) erasure coding and the iSCSI (Castagnoli) crc. ISA-L was chosen by measurement
//! (docs/dependencies.md); its functions dispatch at run time to the best SIMD code the
//! CPU has, on x86-64 and aarch64 alike.
//!
//! Only safe wrappers leave this module. Each one checks the buffer shapes the C code
//! relies on (pointer counts, lengths, `int` range) before calling it.

use core::ffi::{c_int, c_uchar, c_uint};

use super::erasure::MAX_STRIPS;
use super::PipelineError;

// Declarations follow /usr/include/isa-l/erasure_code.h and crc.h (libisal 2.30).
extern "C" {
    fn ec_init_tables(k: c_int, rows: c_int, a: *mut c_uchar, gftbls: *mut c_uchar);
    fn ec_encode_data(
        len: c_int,
        k: c_int,
        rows: c_int,
        gftbls: *mut c_uchar,
        data: *mut *mut c_uchar,
        coding: *mut *mut c_uchar,
    );
    fn ec_encode_data_update(
        len: c_int,
        k: c_int,
        rows: c_int,
        vec_i: c_int,
        g_tbls: *mut c_uchar,
        data: *mut c_uchar,
        coding: *mut *mut c_uchar,
    );
    fn gf_gen_cauchy1_matrix(a: *mut c_uchar, m: c_int, k: c_int);
    fn gf_invert_matrix(input: *mut c_uchar, output: *mut c_uchar, n: c_int) -> c_int;
    fn crc32_iscsi(buffer: *mut c_uchar, len: c_int, init_crc: c_uint) -> c_uint;
}

fn c_len(n: usize, what: &str) -> Result<c_int, PipelineError> {
    c_int::try_from(n).map_err(|_| PipelineError::ErasureArgs(format!("{what} {n} exceeds C int")))
}

fn check_geometry(k: usize, rows: usize) -> Result<(c_int, c_int), PipelineError> {
    if k == 0 || rows == 0 || k > MAX_STRIPS || rows > MAX_STRIPS {
        return Err(PipelineError::ErasureArgs(format!(
            "ISA-L geometry k={k} rows={rows} outside 1..={MAX_STRIPS}"
        )));
    }
    Ok((c_len(k, "k")?, c_len(rows, "rows")?))
}

/// The full (k + m) x k systematic Cauchy generator matrix, row-major.
pub(crate) fn cauchy_matrix(k: usize, m: usize) -> Result<Vec<u8>, PipelineError> {
    let total = k + m;
    let (ck, ctotal) = check_geometry(k, total)?;
    let mut a = vec![0u8; total * k];
    // SAFETY: gf_gen_cauchy1_matrix writes exactly m*k bytes (here total*k, its `m` being
    // the total row count) into `a`, which has that length; k and total are in 1..=32.
    unsafe { gf_gen_cauchy1_matrix(a.as_mut_ptr(), ctotal, ck) };
    Ok(a)
}

/// Inverse of an n x n GF(2^8) matrix, `None` when singular.
pub(crate) fn invert_matrix(matrix: &[u8], n: usize) -> Result<Option<Vec<u8>>, PipelineError> {
    let (cn, _) = check_geometry(n, n)?;
    if matrix.len() != n * n {
        return Err(PipelineError::ErasureArgs(format!(
            "matrix of {} bytes is not {n}x{n}",
            matrix.len()
        )));
    }
    let mut input = matrix.to_vec();
    let mut out = vec![0u8; n * n];
    // SAFETY: both buffers hold n*n bytes as gf_invert_matrix requires; it reads and
    // destroys `input` (our private copy) and writes `out`.
    let rc = unsafe { gf_invert_matrix(input.as_mut_ptr(), out.as_mut_ptr(), cn) };
    Ok((rc == 0).then_some(out))
}

/// Expands a rows x k coefficient matrix into ISA-L's multiplication tables.
pub(crate) fn init_tables(k: usize, rows: usize, coefs: &[u8]) -> Result<Vec<u8>, PipelineError> {
    let (ck, crows) = check_geometry(k, rows)?;
    if coefs.len() != k * rows {
        return Err(PipelineError::ErasureArgs(format!(
            "{} coefficients for a {rows}x{k} matrix",
            coefs.len()
        )));
    }
    let mut coefs = coefs.to_vec();
    let mut tables = vec![0u8; 32 * k * rows];
    // SAFETY: ec_init_tables reads k*rows coefficients and writes 32*k*rows table bytes;
    // both buffers have exactly those sizes. It does not keep the pointers.
    unsafe { ec_init_tables(ck, crows, coefs.as_mut_ptr(), tables.as_mut_ptr()) };
    Ok(tables)
}

/// `outputs[r][..len] = sum_j coef[r][j] * sources[j][..len]` for tables of `rows` x `k`.
pub(crate) fn encode(
    tables: &[u8],
    len: usize,
    sources: &[&[u8]],
    outputs: &mut [&mut [u8]],
) -> Result<(), PipelineError> {
    let k = sources.len();
    let rows = outputs.len();
    let (ck, crows) = check_geometry(k, rows)?;
    let clen = c_len(len, "length")?;
    if tables.len() != 32 * k * rows
        || sources.iter().any(|s| s.len() < len)
        || outputs.iter().any(|o| o.len() < len)
    {
        return Err(PipelineError::ErasureArgs(
            "ISA-L encode: table or buffer shape mismatch".into(),
        ));
    }
    if len == 0 {
        return Ok(());
    }
    let mut src_ptrs = [core::ptr::null_mut::<c_uchar>(); MAX_STRIPS];
    for (p, s) in src_ptrs.iter_mut().zip(sources) {
        // ISA-L's prototype takes `unsigned char **` but only reads the sources.
        *p = s.as_ptr().cast_mut();
    }
    let mut out_ptrs = [core::ptr::null_mut::<c_uchar>(); MAX_STRIPS];
    for (p, o) in out_ptrs.iter_mut().zip(outputs.iter_mut()) {
        *p = o.as_mut_ptr();
    }
    // SAFETY: k source pointers each valid for `len` readable bytes, `rows` output
    // pointers each valid for `len` writable bytes (checked above; outputs are distinct
    // &mut slices so they do not alias each other or the sources), tables sized
    // 32*k*rows. ec_encode_data only reads sources/tables and writes outputs[..len].
    unsafe {
        ec_encode_data(
            clen,
            ck,
            crows,
            tables.as_ptr().cast_mut(),
            src_ptrs.as_mut_ptr(),
            out_ptrs.as_mut_ptr(),
        )
    };
    Ok(())
}

/// `outputs[r][offset..offset+src.len()] ^= coef[r][vec_i] * src` (one source's share).
pub(crate) fn encode_update(
    tables: &[u8],
    k: usize,
    vec_i: usize,
    src: &[u8],
    outputs: &mut [&mut [u8]],
    offset: usize,
) -> Result<(), PipelineError> {
    let rows = outputs.len();
    let (ck, crows) = check_geometry(k, rows)?;
    let len = src.len();
    let clen = c_len(len, "length")?;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| PipelineError::ErasureArgs("offset + length overflows".into()))?;
    if vec_i >= k || tables.len() != 32 * k * rows || outputs.iter().any(|o| o.len() < end) {
        return Err(PipelineError::ErasureArgs(
            "ISA-L update: index, table or buffer shape mismatch".into(),
        ));
    }
    if len == 0 {
        return Ok(());
    }
    let cvec = c_len(vec_i, "vec_i")?;
    let mut out_ptrs = [core::ptr::null_mut::<c_uchar>(); MAX_STRIPS];
    for (p, o) in out_ptrs.iter_mut().zip(outputs.iter_mut()) {
        *p = o[offset..end].as_mut_ptr();
    }
    // SAFETY: `src` is valid for `len` readable bytes (ISA-L only reads it despite the
    // mutable prototype); each of the `rows` output pointers starts a writable range of
    // `len` bytes inside a distinct &mut slice (bounds checked above); tables sized 32*k*rows.
    unsafe {
        ec_encode_data_update(
            clen,
            ck,
            crows,
            cvec,
            tables.as_ptr().cast_mut(),
            src.as_ptr().cast_mut(),
            out_ptrs.as_mut_ptr(),
        )
    };
    Ok(())
}

/// Standard CRC-32C (Castagnoli, reflected, init and final XOR 0xFFFFFFFF) continued from
/// `crc` (0 for a fresh checksum).
pub(crate) fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // ISA-L's crc32_iscsi keeps the register un-inverted at both ends: pass the inverted
    // running value in and invert the result.
    let mut reg: c_uint = !crc;
    for chunk in data.chunks(1 << 30) {
        // Chunks are at most 2^30 bytes, so the length fits in a C int.
        let len = c_int::try_from(chunk.len()).unwrap_or(c_int::MAX);
        // SAFETY: crc32_iscsi reads exactly `len` bytes from `chunk` (its prototype is
        // non-const but it does not write) and keeps no pointer.
        reg = unsafe { crc32_iscsi(chunk.as_ptr().cast_mut(), len, reg) };
    }
    !reg
}
