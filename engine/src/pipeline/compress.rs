//! Record compression: off, zstd at a level, or lz4 (block format).
//!
//! A record is kept raw unless compression saves at least 1/8 of it: below that the
//! read-side cost of decompressing buys too little space. Contexts are kept per sealer
//! and reused, because creating a zstd context costs more than compressing 4 KiB.

use std::fmt;
use std::str::FromStr;

use super::PipelineError;

/// The compression a profile asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store records raw.
    #[default]
    Off,
    /// zstd at the given level (1..=19).
    Zstd {
        /// zstd compression level.
        level: i32,
    },
    /// LZ4 block format.
    Lz4,
}

impl FromStr for Compression {
    type Err = PipelineError;

    /// Parses `off`, `lz4`, `zstd` (level 1) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PipelineError::BadCompressionSetting(s.to_owned());
        match s {
            "off" | "none" => Ok(Self::Off),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd { level: 1 }),
            _ => {
                let level = s
                    .strip_prefix("zstd:")
                    .ok_or_else(bad)?
                    .parse::<i32>()
                    .map_err(|_| bad())?;
                if (1..=19).contains(&level) {
                    Ok(Self::Zstd { level })
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Zstd { level } => write!(f, "zstd:{level}"),
            Self::Lz4 => f.write_str("lz4"),
        }
    }
}

/// How a stored payload was compressed (the record header's algorithm field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Stored raw.
    None = 0,
    /// zstd frame.
    Zstd = 1,
    /// LZ4 block.
    Lz4 = 2,
}

impl Algorithm {
    /// The header code of this algorithm.
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Zstd => 1,
            Self::Lz4 => 2,
        }
    }

    /// The algorithm for a header code, if known.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::None),
            1 => Some(Self::Zstd),
            2 => Some(Self::Lz4),
            _ => None,
        }
    }
}

/// Largest compressed size worth storing for `raw_len` bytes: it must save 1/8 or more.
pub fn worthwhile_limit(raw_len: usize) -> usize {
    raw_len - raw_len / 8
}

/// Reusable compression and decompression contexts.
pub struct Codec {
    setting: Compression,
    zstd_c: Option<zstd::bulk::Compressor<'static>>,
    zstd_d: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("setting", &self.setting)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// Contexts for compressing with `setting` (decompression handles every algorithm).
    pub fn new(setting: Compression) -> Result<Self, PipelineError> {
        let zstd_c = match setting {
            Compression::Zstd { level } => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| PipelineError::Compress(e.to_string()))?,
            ),
            _ => None,
        };
        Ok(Self {
            setting,
            zstd_c,
            zstd_d: None,
            buf: Vec::new(),
        })
    }

    /// The configured setting.
    pub fn setting(&self) -> Compression {
        self.setting
    }

    /// Compresses `src` into the codec's own buffer. Returns the algorithm and the
    /// compressed bytes, or `None` when compression is off or saves less than 1/8: the
    /// caller then stores the record raw.
    pub fn compress(&mut self, src: &[u8]) -> Result<Option<(Algorithm, &[u8])>, PipelineError> {
        let limit = worthwhile_limit(src.len());
        match self.setting {
            Compression::Off => Ok(None),
            Compression::Lz4 => {
                // lz4_flex wants room for the worst case even when the result is small.
                let room = lz4_flex::block::get_maximum_output_size(src.len());
                if self.buf.len() < room {
                    self.buf.resize(room, 0);
                }
                let n = lz4_flex::block::compress_into(src, &mut self.buf[..room])
                    .map_err(|e| PipelineError::Compress(format!("lz4: {e}")))?;
                Ok((n <= limit).then(|| (Algorithm::Lz4, &self.buf[..n])))
            }
            Compression::Zstd { .. } => {
                if self.buf.len() < limit {
                    self.buf.resize(limit, 0);
                }
                let c = self
                    .zstd_c
                    .as_mut()
                    .ok_or_else(|| PipelineError::Compress("zstd context missing".into()))?;
                // With the output capped at the limit, zstd reports "destination too
                // small" as an error: that only means the data does not compress well
                // enough, so the record stays raw.
                Ok(c.compress_to_buffer(src, &mut self.buf[..limit])
                    .ok()
                    .map(|n| (Algorithm::Zstd, &self.buf[..n])))
            }
        }
    }

    /// Decompresses `src` into exactly `dst.len()` bytes; any other size is an error.
    pub fn decompress(
        &mut self,
        algorithm: Algorithm,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), PipelineError> {
        let n = match algorithm {
            Algorithm::None => {
                if src.len() != dst.len() {
                    return Err(PipelineError::Decompress("raw length mismatch".into()));
                }
                dst.copy_from_slice(src);
                src.len()
            }
            Algorithm::Lz4 => lz4_flex::block::decompress_into(src, dst)
                .map_err(|e| PipelineError::Decompress(format!("lz4: {e}")))?,
            Algorithm::Zstd => {
                if self.zstd_d.is_none() {
                    self.zstd_d = Some(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| PipelineError::Decompress(e.to_string()))?,
                    );
                }
                let d = self
                    .zstd_d
                    .as_mut()
                    .ok_or_else(|| PipelineError::Decompress("zstd context missing".into()))?;
                d.decompress_to_buffer(src, dst)
                    .map_err(|e| PipelineError::Decompress(format!("zstd: {e}")))?
            }
        };
        if n != dst.len() {
            return Err(PipelineError::Decompress(format!(
                "produced {n} bytes, header says {}",
                dst.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_setting_parses_and_prints() {
        for s in ["off", "lz4", "zstd:1", "zstd:19"] {
            assert_eq!(
                s.parse::<Compression>().map(|c| c.to_string()),
                Ok(s.into())
            );
        }
        assert_eq!("zstd".parse(), Ok(Compression::Zstd { level: 1 }));
        for s in ["zstd:0", "zstd:20", "zstd:x", "gzip", ""] {
            assert!(s.parse::<Compression>().is_err(), "{s}");
        }
    }

    #[test]
    fn incompressible_data_does_not_fit_the_worthwhile_limit() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        for setting in [Compression::Lz4, Compression::Zstd { level: 3 }] {
            let mut codec = Codec::new(setting).expect("codec");
            assert_eq!(codec.compress(&random), Ok(None), "{setting}");
        }
    }

    #[test]
    fn text_round_trips_through_each_algorithm() {
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(100);
        let text = &text[..4096];
        for setting in [Compression::Lz4, Compression::Zstd { level: 1 }] {
            let mut codec = Codec::new(setting).expect("codec");
            let (alg, packed) = codec
                .compress(text)
                .expect("compress")
                .map(|(a, p)| (a, p.to_vec()))
                .unwrap_or_else(|| panic!("{setting}: text did not compress"));
            assert!(packed.len() < 1000, "{setting}: {}", packed.len());
            let mut back = vec![0u8; 4096];
            codec
                .decompress(alg, &packed, &mut back)
                .expect("decompress");
            assert_eq!(back, text);
            // Asking for a different size is an error, not a short read.
            let mut short = vec![0u8; 4095];
            assert!(codec.decompress(alg, &packed, &mut short).is_err());
        }
    }
}
