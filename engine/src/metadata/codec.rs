//! Little-endian field encoding for the on-node headers.
//!
//! Every byte decoded here comes from a node and may be garbage, so the reader never
//! indexes past its input: a short buffer is an error value, never a panic.

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Zero bytes up to `len` (no-op when already that long).
    pub(crate) fn pad_to(&mut self, len: usize) {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian fields from untrusted bytes; `None` once the input runs out.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.buf.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn bytes16(&mut self) -> Option<[u8; 16]> {
        self.array()
    }

    /// Bytes consumed so far.
    pub(crate) fn position(&self) -> usize {
        self.at
    }
}

/// Rounds `len` up to a multiple of `block` (a power of two or any nonzero size);
/// `None` on overflow or a zero block.
pub(crate) fn round_up(len: u64, block: u64) -> Option<u64> {
    if block == 0 {
        return None;
    }
    let rem = len % block;
    if rem == 0 {
        Some(len)
    } else {
        len.checked_add(block - rem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_stops_at_the_end_instead_of_panicking() {
        let mut w = Writer::default();
        w.u32(7);
        w.u16(3);
        let v = w.into_vec();
        let mut r = Reader::new(&v);
        assert_eq!(r.u32(), Some(7));
        assert_eq!(r.u64(), None);
        assert_eq!(r.u16(), Some(3));
        assert_eq!(r.u16(), None);
        assert_eq!(r.take(usize::MAX), None);
    }

    #[test]
    fn round_up_handles_edges() {
        assert_eq!(round_up(0, 4096), Some(0));
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(u64::MAX, 4096), None);
        assert_eq!(round_up(5, 0), None);
    }
}
