//! crc32c (Castagnoli) over stored records.
//!
//! The crc lets a reader tell a bit flipped on a node or on the wire from a forged
//! record before spending an AEAD open on it, and lets unencrypted volumes detect
//! corruption at all. ISA-L's `crc32_iscsi` was chosen by measurement over the crc32c
//! and crc-fast crates (docs/dependencies.md).

use super::isal;

/// CRC-32C of `data` (check value for "123456789" is 0xE3069283).
pub fn crc32c(data: &[u8]) -> u32 {
    isal::crc32c_append(0, data)
}

/// Continues a CRC-32C: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    isal::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn crc32c_append_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32)
            .map(|i| (i * 31 % 251).to_le_bytes()[0])
            .collect();
        for split in [0, 1, 7, 4096, 9_999, 10_000] {
            let (a, b) = data.split_at(split);
            assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data), "split {split}");
        }
    }
}
