//! Record sealing and opening: round trips, hostile input, corruption and AAD binding.

use engine::pipeline::record::{FORMAT_VERSION, MAX_RECORD_BLOCKS};
use engine::pipeline::{
    Algorithm, Compression, DataKey, Expected, MemoryEpochStore, NonceAllocator, PipelineError,
    RecordHeader, RecordPipeline, VolumeId, BLOCK_SIZE, HEADER_LEN,
};
use proptest::prelude::*;

const VOL: VolumeId = VolumeId([7; 16]);

fn key() -> DataKey {
    DataKey::from_bytes([0x42; 32])
}

fn writer(compression: Compression, encrypted: bool) -> RecordPipeline {
    let k = key();
    let nonces = NonceAllocator::open(&mut MemoryEpochStore::new()).expect("epoch");
    RecordPipeline::new(VOL, compression, encrypted.then_some(&k), Some(nonces)).expect("pipeline")
}

fn reader(compression: Compression, encrypted: bool) -> RecordPipeline {
    let k = key();
    RecordPipeline::new(VOL, compression, encrypted.then_some(&k), None).expect("pipeline")
}

/// Text-like data: words from a small vocabulary, deterministic from `seed`.
fn text(blocks: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "storage ", "engine ", "record ", "stripe ", "parity ", "node ", "volume ", "the ", "of ",
        "and ", "write ", "read\n",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(blocks * BLOCK_SIZE);
    while out.len() < blocks * BLOCK_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[usize::try_from(x % 12).unwrap_or(0)].as_bytes());
    }
    out.truncate(blocks * BLOCK_SIZE);
    out
}

fn random(blocks: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..blocks * BLOCK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

fn settings() -> [Compression; 4] {
    [
        Compression::Off,
        Compression::Lz4,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: 3 },
    ]
}

/// Recomputes the crc of a record whose header was edited (what an attacker with node
/// access can always do), so the test reaches the AEAD.
fn fix_crc(record: &mut [u8]) {
    fix_crc_for(&VOL, record);
}

fn fix_crc_for(volume: &VolumeId, record: &mut [u8]) {
    let crc = engine::pipeline::record::record_crc(volume, &record[..44], &record[HEADER_LEN..]);
    record[44..48].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn record_round_trips_for_every_setting_and_data_kind() {
    for compression in settings() {
        for encrypted in [false, true] {
            let mut w = writer(compression, encrypted);
            let mut r = reader(compression, encrypted);
            for (kind, data) in [("text", text(8, 3)), ("random", random(8, 5))] {
                let mut strip = Vec::new();
                let sealed = w.seal(1000, 9, &data, &mut strip).expect("seal");
                assert_eq!(sealed.offset, 0);
                assert_eq!(sealed.len, strip.len());
                let mut out = Vec::new();
                let h = r
                    .open(
                        &strip,
                        Some(Expected {
                            first_lba: 1000,
                            generation: 9,
                        }),
                        &mut out,
                    )
                    .expect("open");
                assert_eq!(out, data, "{compression} encrypted={encrypted} {kind}");
                assert_eq!(h, sealed.header);
                assert_eq!(h.encrypted, encrypted);
                let expect_alg = match (compression, kind) {
                    (_, "random") | (Compression::Off, _) => Algorithm::None,
                    (Compression::Lz4, _) => Algorithm::Lz4,
                    (Compression::Zstd { .. }, _) => Algorithm::Zstd,
                };
                assert_eq!(h.algorithm, expect_alg, "{compression} {kind}");
                if kind == "text" && compression != Compression::Off {
                    assert!(
                        strip.len() < data.len() / 2,
                        "{compression}: {}",
                        strip.len()
                    );
                }
            }
        }
    }
}

#[test]
fn records_append_to_a_strip_and_open_from_their_ranges() {
    let mut w = writer(Compression::Zstd { level: 1 }, true);
    let mut r = reader(Compression::Off, true);
    let mut strip = Vec::new();
    let datas: Vec<Vec<u8>> = (0..5u64)
        .map(|i| {
            let blocks = usize::try_from(i + 1).expect("small");
            if i % 2 == 0 {
                text(blocks, i)
            } else {
                random(blocks, i)
            }
        })
        .collect();
    let mut placed = Vec::new();
    for (i, d) in datas.iter().enumerate() {
        let lba = u64::try_from(i).expect("small") * 100;
        placed.push((lba, w.seal(lba, 1, d, &mut strip).expect("seal")));
    }
    for ((lba, s), d) in placed.iter().zip(&datas) {
        let mut out = Vec::new();
        let exp = Expected {
            first_lba: *lba,
            generation: 1,
        };
        r.open(&strip[s.offset..s.offset + s.len], Some(exp), &mut out)
            .expect("open");
        assert_eq!(&out, d);
    }
    // Replay: walk the strip by headers alone.
    let mut at = 0;
    let mut n = 0;
    while at < strip.len() {
        let h = RecordHeader::decode(&strip[at..]).expect("header");
        at += h.record_len();
        n += 1;
    }
    assert_eq!((at, n), (strip.len(), 5));
}

#[test]
fn compression_is_kept_only_when_it_saves_an_eighth() {
    // Half text, half random: compresses to a bit over half, so it is kept.
    let mut half = text(1, 1);
    half[2048..].copy_from_slice(&random(1, 2)[2048..]);
    // 1/16 text, 15/16 random: cannot save 1/8, so it is stored raw.
    let mut little = random(1, 3);
    little[..256].fill(b'a');
    for compression in [Compression::Lz4, Compression::Zstd { level: 1 }] {
        let mut w = writer(compression, false);
        let mut buf = Vec::new();
        let h = w.seal(0, 0, &half, &mut buf).expect("seal").header;
        assert_ne!(h.algorithm, Algorithm::None, "{compression}");
        assert!(usize::try_from(h.payload_len).expect("u32") <= 4096 - 512);
        buf.clear();
        let h = w.seal(0, 0, &little, &mut buf).expect("seal").header;
        assert_eq!(h.algorithm, Algorithm::None, "{compression}");
        assert_eq!(h.payload_len, 4096);
    }
}

#[test]
fn bad_lengths_are_refused_when_sealing() {
    let mut w = writer(Compression::Off, true);
    let mut out = Vec::new();
    for len in [0, 1, 4095, 4097] {
        assert!(matches!(
            w.seal(0, 0, &vec![0; len], &mut out),
            Err(PipelineError::BadRecordLength { .. })
        ));
    }
    let too_big = vec![0; (usize::from(MAX_RECORD_BLOCKS) + 1) * BLOCK_SIZE];
    assert!(matches!(
        w.seal(0, 0, &too_big, &mut out),
        Err(PipelineError::BadRecordLength { .. })
    ));
    assert!(matches!(
        w.seal(u64::MAX, 0, &vec![0; 4096], &mut out),
        Err(PipelineError::BadHeader(_))
    ));
    assert!(out.is_empty());
    // A reader without a writer session cannot seal encrypted records.
    let mut r = reader(Compression::Off, true);
    assert_eq!(
        r.seal(0, 0, &vec![0; 4096], &mut out),
        Err(PipelineError::NotWriter)
    );
}

#[test]
fn header_errors_are_precise() {
    let mut w = writer(Compression::Off, false);
    let mut r = reader(Compression::Off, false);
    let mut rec = Vec::new();
    w.seal(5, 6, &text(1, 1), &mut rec).expect("seal");
    let mut out = Vec::new();

    assert_eq!(
        r.open(&rec[..10], None, &mut out),
        Err(PipelineError::Truncated {
            needed: HEADER_LEN,
            have: 10
        })
    );
    assert_eq!(
        r.open(&rec[..rec.len() - 1], None, &mut out),
        Err(PipelineError::Truncated {
            needed: rec.len(),
            have: rec.len() - 1
        })
    );
    let mut bad = rec.clone();
    bad[0] = b'X';
    assert!(matches!(
        r.open(&bad, None, &mut out),
        Err(PipelineError::BadMagic { .. })
    ));
    let mut bad = rec.clone();
    bad[4] = FORMAT_VERSION + 1;
    assert_eq!(
        r.open(&bad, None, &mut out),
        Err(PipelineError::UnsupportedVersion {
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION
        })
    );
    let mut bad = rec.clone();
    bad[5] |= 0x80;
    assert!(matches!(
        r.open(&bad, None, &mut out),
        Err(PipelineError::BadHeader(_))
    ));
    let mut bad = rec.clone();
    bad[100] ^= 1;
    assert!(matches!(
        r.open(&bad, None, &mut out),
        Err(PipelineError::CrcMismatch { .. })
    ));
    let mut long = rec.clone();
    long.push(0);
    assert!(matches!(
        r.open(&long, None, &mut out),
        Err(PipelineError::BadHeader(_))
    ));
    assert_eq!(
        r.open(
            &rec,
            Some(Expected {
                first_lba: 5,
                generation: 7
            }),
            &mut out
        ),
        Err(PipelineError::Misplaced {
            found_lba: 5,
            found_generation: 6,
            expected_lba: 5,
            expected_generation: 7
        })
    );
    assert!(out.is_empty(), "failed opens leave no data behind");
}

#[test]
fn encryption_flag_must_match_the_volume() {
    let mut plain = Vec::new();
    writer(Compression::Off, false)
        .seal(0, 0, &text(1, 1), &mut plain)
        .expect("seal");
    let mut out = Vec::new();
    assert!(matches!(
        reader(Compression::Off, true).open(&plain, None, &mut out),
        Err(PipelineError::EncryptionMismatch { .. })
    ));
    let mut enc = Vec::new();
    writer(Compression::Off, true)
        .seal(0, 0, &text(1, 1), &mut enc)
        .expect("seal");
    assert!(matches!(
        reader(Compression::Off, false).open(&enc, None, &mut out),
        Err(PipelineError::EncryptionMismatch { .. })
    ));
}

#[test]
fn ciphertext_moved_to_another_lba_fails_to_open() {
    let mut w = writer(Compression::Zstd { level: 1 }, true);
    let mut r = reader(Compression::Off, true);
    let mut rec = Vec::new();
    w.seal(4096, 3, &text(2, 9), &mut rec).expect("seal");
    let mut out = Vec::new();
    let elsewhere = Expected {
        first_lba: 8192,
        generation: 3,
    };
    // As stored, the header gives the move away.
    assert!(matches!(
        r.open(&rec, Some(elsewhere), &mut out),
        Err(PipelineError::Misplaced { .. })
    ));
    // With the header rewritten to the new LBA (and the crc fixed), the AAD does.
    let mut moved = rec.clone();
    moved[8..16].copy_from_slice(&8192u64.to_le_bytes());
    fix_crc(&mut moved);
    assert_eq!(
        r.open(&moved, Some(elsewhere), &mut out),
        Err(PipelineError::AeadFailure)
    );
    assert!(out.is_empty());
}

#[test]
fn ciphertext_replayed_from_an_older_generation_fails_to_open() {
    let mut w = writer(Compression::Off, true);
    let mut r = reader(Compression::Off, true);
    let mut old = Vec::new();
    w.seal(77, 1, &text(1, 1), &mut old).expect("seal old");
    let mut new = Vec::new();
    w.seal(77, 2, &text(1, 2), &mut new).expect("seal new");
    let current = Expected {
        first_lba: 77,
        generation: 2,
    };
    let mut out = Vec::new();
    r.open(&new, Some(current), &mut out)
        .expect("current opens");
    assert!(matches!(
        r.open(&old, Some(current), &mut out),
        Err(PipelineError::Misplaced { .. })
    ));
    let mut replay = old.clone();
    replay[16..24].copy_from_slice(&2u64.to_le_bytes());
    fix_crc(&mut replay);
    assert_eq!(
        r.open(&replay, Some(current), &mut out),
        Err(PipelineError::AeadFailure)
    );
}

#[test]
fn record_from_another_volume_fails_to_open() {
    let mut rec = Vec::new();
    writer(Compression::Off, true)
        .seal(0, 0, &text(1, 1), &mut rec)
        .expect("seal");
    let k = key();
    let mut other =
        RecordPipeline::new(VolumeId([8; 16]), Compression::Off, Some(&k), None).expect("pipeline");
    // The crc is seeded with the volume id, so a stale record of another volume is
    // rejected before the AEAD; with the crc forged, the AAD still stops it.
    assert!(matches!(
        other.open(&rec, None, &mut Vec::new()),
        Err(PipelineError::CrcMismatch { .. })
    ));
    fix_crc_for(&VolumeId([8; 16]), &mut rec);
    assert_eq!(
        other.open(&rec, None, &mut Vec::new()),
        Err(PipelineError::AeadFailure)
    );
}

#[test]
fn plain_record_of_another_volume_fails_its_crc() {
    let mut rec = Vec::new();
    writer(Compression::Off, false)
        .seal(0, 5, &text(1, 1), &mut rec)
        .expect("seal");
    let mut other =
        RecordPipeline::new(VolumeId([8; 16]), Compression::Off, None, None).expect("pipeline");
    assert!(matches!(
        other.open(&rec, None, &mut Vec::new()),
        Err(PipelineError::CrcMismatch { .. })
    ));
}

#[test]
fn zero_records_round_trip_and_cannot_be_forged() {
    for encrypted in [false, true] {
        let mut w = writer(Compression::Zstd { level: 1 }, encrypted);
        let mut r = reader(Compression::Off, encrypted);
        let mut rec = Vec::new();
        let sealed = w.seal_zeroes(77, 12, 100_000, &mut rec).expect("seal");
        assert_eq!(rec.len(), HEADER_LEN + if encrypted { 16 } else { 0 });
        let mut out = vec![1u8; 10];
        let h = r
            .open(
                &rec,
                Some(Expected {
                    first_lba: 77,
                    generation: 12,
                }),
                &mut out,
            )
            .expect("open");
        assert_eq!(h, sealed.header);
        assert!(h.is_zeroes());
        assert_eq!(h.zero_blocks, 100_000);
        assert!(out.is_empty());
        // Widening the range with a recomputed crc: the AEAD (when encrypted) stops it.
        let mut wider = rec.clone();
        wider[40..44].copy_from_slice(&200_000u32.to_le_bytes());
        fix_crc(&mut wider);
        let opened = r.open(&wider, None, &mut Vec::new());
        if encrypted {
            assert_eq!(opened, Err(PipelineError::AeadFailure));
        } else {
            assert!(
                opened.is_ok(),
                "plain volumes have no authenticity, only a crc"
            );
        }
        // Without the crc fixed, any edit is caught.
        let mut bad = rec.clone();
        bad[41] ^= 1;
        assert!(matches!(
            r.open(&bad, None, &mut Vec::new()),
            Err(PipelineError::CrcMismatch { .. })
        ));
    }
    // A zero record claiming data blocks, or a data record claiming a zero range: refused.
    let mut w = writer(Compression::Off, false);
    let mut rec = Vec::new();
    w.seal_zeroes(0, 1, 4, &mut rec).expect("seal");
    rec[6] = 1;
    assert!(matches!(
        RecordHeader::decode(&rec),
        Err(PipelineError::BadHeader(_))
    ));
    let mut data = Vec::new();
    w.seal(0, 2, &text(1, 2), &mut data).expect("seal");
    data[40] = 1;
    assert!(matches!(
        RecordHeader::decode(&data),
        Err(PipelineError::BadHeader(_))
    ));
    assert!(w.seal_zeroes(u64::MAX - 2, 3, 4, &mut Vec::new()).is_err());
    assert!(w.seal_zeroes(0, 3, 0, &mut Vec::new()).is_err());
}

#[test]
fn header_fields_in_the_aad_cannot_be_edited() {
    let mut w = writer(Compression::Lz4, true);
    let mut r = reader(Compression::Off, true);
    let mut rec = Vec::new();
    w.seal(10, 20, &text(2, 4), &mut rec).expect("seal");
    // Nonce bytes (epoch and counter): valid header, wrong AEAD input.
    for at in [28, 33, 39] {
        let mut bad = rec.clone();
        bad[at] ^= 0x10;
        fix_crc(&mut bad);
        assert_eq!(
            r.open(&bad, None, &mut Vec::new()),
            Err(PipelineError::AeadFailure),
            "byte {at}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_records_round_trip(
        blocks in 1usize..=8,
        seed in any::<u64>(),
        textlike in any::<bool>(),
        setting in 0usize..4,
        encrypted in any::<bool>(),
        lba in 0u64..(1 << 40),
        generation in any::<u64>(),
    ) {
        let compression = settings()[setting];
        let data = if textlike { text(blocks, seed) } else { random(blocks, seed) };
        let mut w = writer(compression, encrypted);
        let mut rec = Vec::new();
        w.seal(lba, generation, &data, &mut rec).expect("seal");
        let mut out = Vec::new();
        let h = reader(Compression::Off, encrypted)
            .open(&rec, Some(Expected { first_lba: lba, generation }), &mut out)
            .expect("open");
        prop_assert_eq!(out, data);
        prop_assert_eq!(usize::from(h.block_count), blocks);
    }

    #[test]
    fn random_bytes_give_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for encrypted in [false, true] {
            let mut out = Vec::new();
            prop_assert!(reader(Compression::Off, encrypted).open(&bytes, None, &mut out).is_err());
            prop_assert!(out.is_empty());
        }
    }

    #[test]
    fn random_bytes_behind_a_valid_magic_and_version_give_an_error(
        mut bytes in proptest::collection::vec(any::<u8>(), 48..5000),
        flags in 0u8..8,
        blocks in 0u16..3,
    ) {
        bytes[..4].copy_from_slice(b"DPUR");
        bytes[4] = FORMAT_VERSION;
        bytes[5] = flags;
        bytes[6..8].copy_from_slice(&blocks.to_le_bytes());
        let len = u32::try_from(bytes.len() - HEADER_LEN).expect("small");
        bytes[24..28].copy_from_slice(&len.to_le_bytes());
        bytes[40..44].fill(0);
        for encrypted in [false, true] {
            let mut out = Vec::new();
            prop_assert!(reader(Compression::Off, encrypted).open(&bytes, None, &mut out).is_err());
            // Even with a correct crc, garbage must not open: the AEAD or the
            // decompressor's exact-length check stops it.
            let mut fixed = bytes.clone();
            fix_crc(&mut fixed);
            let r = reader(Compression::Off, encrypted).open(&fixed, None, &mut out);
            if encrypted {
                prop_assert!(r.is_err());
            }
            if r.is_err() {
                prop_assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn any_single_flipped_byte_is_an_error_never_wrong_data(
        blocks in 1usize..=3,
        seed in any::<u64>(),
        textlike in any::<bool>(),
        setting in 0usize..4,
        encrypted in any::<bool>(),
        pos in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let data = if textlike { text(blocks, seed) } else { random(blocks, seed) };
        let mut rec = Vec::new();
        writer(settings()[setting], encrypted).seal(3, 4, &data, &mut rec).expect("seal");
        let pos = pos.index(rec.len());
        rec[pos] ^= flip;
        let mut out = Vec::new();
        let r = reader(Compression::Off, encrypted).open(&rec, None, &mut out);
        prop_assert!(r.is_err(), "flip at {} of {} opened", pos, rec.len());
        prop_assert!(out.is_empty());
    }
}
