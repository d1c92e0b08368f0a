//! The per-record pipeline, step by step and whole: compression, AES-256-GCM, crc32c and
//! Reed-Solomon, each with the candidate libraries, on text-like and random data, per
//! 4 KiB block and per 32 KiB / 128 KiB record. `pipeline_<data>_<size>` groups time the
//! steps on the exact intermediate buffers of a whole RS(4+2) row and the whole row, so
//! the whole can be compared with the sum of its steps (docs/benchmarks.md, "Pipeline").
//!
//! Run: `cargo bench -p benches --bench pipeline -- --warm-up-time 1 --measurement-time 2`
//! (add `--features rse-simd` to measure reed-solomon-erasure with its `simd-accel`).

use std::hint::black_box;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::KeyInit;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::pipeline::compress::Codec;
use engine::pipeline::keys::AeadKey;
use engine::pipeline::{
    coder_for, crc, Compression, DataKey, ErasureCoder, IsalCoder, MemoryEpochStore,
    NonceAllocator, RecordPipeline, VolumeId,
};

const SIZES: [(&str, usize); 3] = [("4k", 4096), ("32k", 32768), ("128k", 131_072)];
const K: usize = 4;
const M: usize = 2;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// English-like text from a 200-word vocabulary with punctuation and line breaks:
/// compresses about 2.5-3x with zstd, like logs or documents.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut next = xorshift(seed);
    let mut vocab = Vec::new();
    for i in 0..200u64 {
        let mut r = xorshift(i + 1000);
        let wl = 2 + r() % 9;
        let word: String = (0..wl)
            .map(|_| char::from(b'a' + u8::try_from(r() % 26).unwrap_or(0)))
            .collect();
        vocab.push(word);
    }
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = next();
        // Zipf-ish: low indices far more common.
        let idx = usize::try_from((r % 200) * (r % 200) / 200).unwrap_or(0);
        out.extend_from_slice(vocab[idx].as_bytes());
        out.push(match r % 17 {
            0 => b'\n',
            1 => b',',
            2 => b'.',
            _ => b' ',
        });
        if r % 13 == 0 {
            out.extend_from_slice((r % 10_000).to_string().as_bytes());
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut next = xorshift(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn data(kind: &str, len: usize, seed: u64) -> Vec<u8> {
    if kind == "text" {
        text(len, seed)
    } else {
        random(len, seed)
    }
}

fn bench_compress(c: &mut Criterion) {
    let settings = [
        ("lz4", Compression::Lz4),
        ("zstd1", Compression::Zstd { level: 1 }),
        ("zstd3", Compression::Zstd { level: 3 }),
    ];
    for kind in ["text", "random"] {
        let mut g = c.benchmark_group(format!("compress_{kind}"));
        for (size_name, size) in SIZES {
            let input = data(kind, size, 1);
            g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));
            for (name, setting) in settings {
                let mut codec = Codec::new(setting).expect("codec");
                g.bench_function(BenchmarkId::new(name, size_name), |b| {
                    b.iter(|| {
                        black_box(codec.compress(black_box(&input)).expect("compress"));
                    });
                });
            }
        }
        g.finish();
    }
    let mut g = c.benchmark_group("decompress_text");
    for (size_name, size) in SIZES {
        let input = text(size, 1);
        g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));
        for (name, setting) in settings {
            let mut codec = Codec::new(setting).expect("codec");
            let (alg, packed) = codec
                .compress(&input)
                .expect("compress")
                .map(|(a, p)| (a, p.to_vec()))
                .expect("text compresses");
            let mut out = vec![0u8; size];
            g.bench_function(BenchmarkId::new(name, size_name), |b| {
                b.iter(|| {
                    codec
                        .decompress(alg, black_box(&packed), &mut out)
                        .expect("ok")
                });
            });
        }
    }
    g.finish();
}

fn bench_aead(c: &mut Criterion) {
    let key = [0x11u8; 32];
    let aws = AeadKey::new(&key).expect("key");
    let rc = aes_gcm::Aes256Gcm::new_from_slice(&key).expect("key");
    let aad = [0u8; 60];
    let mut g = c.benchmark_group("aead_seal");
    for (size_name, size) in SIZES {
        let mut buf = random(size, 2);
        g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));
        let mut n = 0u64;
        g.bench_function(BenchmarkId::new("aws-lc-rs", size_name), |b| {
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_le_bytes());
                black_box(aws.seal_in_place(nonce, &aad, &mut buf).expect("seal"))
            });
        });
        g.bench_function(BenchmarkId::new("aes-gcm", size_name), |b| {
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_le_bytes());
                black_box(
                    rc.encrypt_in_place_detached(&nonce.into(), &aad, &mut buf)
                        .expect("seal"),
                )
            });
        });
    }
    g.finish();
}

fn bench_crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for (size_name, size) in SIZES {
        let buf = random(size, 3);
        g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));
        g.bench_function(BenchmarkId::new("isa-l", size_name), |b| {
            b.iter(|| crc::crc32c(black_box(&buf)));
        });
        g.bench_function(BenchmarkId::new("crc32c-crate", size_name), |b| {
            b.iter(|| crc32c::crc32c(black_box(&buf)));
        });
        g.bench_function(BenchmarkId::new("crc-fast", size_name), |b| {
            b.iter(|| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, black_box(&buf)));
        });
    }
    g.finish();
}

fn rse_name() -> &'static str {
    if cfg!(feature = "rse-simd") {
        "rs-erasure-simd-accel"
    } else {
        "rs-erasure-pure"
    }
}

/// RS(4+2) over a row carrying `size` bytes of data (4 strips of size/4).
fn bench_rs(c: &mut Criterion) {
    let mut g = c.benchmark_group("rs_encode_4+2");
    for (size_name, size) in SIZES {
        let strip = size / K;
        let data: Vec<Vec<u8>> = (0..K).map(|i| random(strip, 10 + i as u64)).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let mut parity = vec![vec![0u8; strip]; M];
        g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));

        let isal = IsalCoder::new(K, M).expect("isal");
        g.bench_function(BenchmarkId::new("isa-l", size_name), |b| {
            b.iter(|| {
                let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
                isal.encode(black_box(&refs), &mut p).expect("encode");
            });
        });

        let rse = reed_solomon_erasure::galois_8::ReedSolomon::new(K, M).expect("rse");
        g.bench_function(BenchmarkId::new(rse_name(), size_name), |b| {
            b.iter(|| {
                rse.encode_sep(black_box(&refs), &mut parity)
                    .expect("encode")
            });
        });

        let mut simd = reed_solomon_simd::ReedSolomonEncoder::new(K, M, strip).expect("simd");
        g.bench_function(BenchmarkId::new("rs-simd", size_name), |b| {
            b.iter(|| {
                for d in &refs {
                    simd.add_original_shard(d).expect("add");
                }
                let r = simd.encode().expect("encode");
                for (out, rec) in parity.iter_mut().zip(r.recovery_iter()) {
                    out.copy_from_slice(rec);
                }
            });
        });
    }
    g.finish();

    // Two data strips lost: rebuild them from the other two data strips and the parity.
    let mut g = c.benchmark_group("rs_decode_4+2_lose2");
    for (size_name, size) in SIZES {
        let strip = size / K;
        let data: Vec<Vec<u8>> = (0..K).map(|i| random(strip, 20 + i as u64)).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));

        let isal = IsalCoder::new(K, M).expect("isal");
        let mut parity = vec![vec![0u8; strip]; M];
        {
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            isal.encode(&refs, &mut p).expect("encode");
        }
        let mut out = vec![vec![0u8; strip]; 2];
        g.bench_function(BenchmarkId::new("isa-l-cached-tables", size_name), |b| {
            b.iter(|| {
                let strips = [
                    None,
                    Some(refs[1]),
                    None,
                    Some(refs[3]),
                    Some(parity[0].as_slice()),
                    Some(parity[1].as_slice()),
                ];
                let (a, rest) = out.split_at_mut(1);
                isal.reconstruct(&strips, &mut [(0, &mut a[0]), (2, &mut rest[0])])
                    .expect("rebuild");
            });
        });
        g.bench_function(BenchmarkId::new("isa-l-fresh-tables", size_name), |b| {
            b.iter(|| {
                let fresh = IsalCoder::new(K, M).expect("isal");
                let strips = [
                    None,
                    Some(refs[1]),
                    None,
                    Some(refs[3]),
                    Some(parity[0].as_slice()),
                    Some(parity[1].as_slice()),
                ];
                let (a, rest) = out.split_at_mut(1);
                fresh
                    .reconstruct(&strips, &mut [(0, &mut a[0]), (2, &mut rest[0])])
                    .expect("rebuild");
            });
        });

        let rse = reed_solomon_erasure::galois_8::ReedSolomon::new(K, M).expect("rse");
        let mut rse_parity = vec![vec![0u8; strip]; M];
        rse.encode_sep(&refs, &mut rse_parity).expect("encode");
        let mut bufs: Vec<Vec<u8>> = data.iter().cloned().chain(rse_parity).collect();
        g.bench_function(BenchmarkId::new(rse_name(), size_name), |b| {
            b.iter(|| {
                let mut shards: Vec<(&mut [u8], bool)> = bufs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| (s.as_mut_slice(), i != 0 && i != 2))
                    .collect();
                rse.reconstruct_data(&mut shards).expect("rebuild");
            });
        });

        let mut enc = reed_solomon_simd::ReedSolomonEncoder::new(K, M, strip).expect("simd");
        for d in &refs {
            enc.add_original_shard(d).expect("add");
        }
        let recovery: Vec<Vec<u8>> = enc
            .encode()
            .expect("encode")
            .recovery_iter()
            .map(<[u8]>::to_vec)
            .collect();
        let mut dec = reed_solomon_simd::ReedSolomonDecoder::new(K, M, strip).expect("simd");
        g.bench_function(BenchmarkId::new("rs-simd", size_name), |b| {
            b.iter(|| {
                dec.add_original_shard(1, refs[1]).expect("add");
                dec.add_original_shard(3, refs[3]).expect("add");
                dec.add_recovery_shard(0, &recovery[0]).expect("add");
                dec.add_recovery_shard(1, &recovery[1]).expect("add");
                let r = dec.decode().expect("decode");
                for (i, s) in r.restored_original_iter() {
                    out[i / 2].copy_from_slice(s);
                }
            });
        });
    }
    g.finish();
}

fn writer(compression: Compression) -> RecordPipeline {
    let key = DataKey::from_bytes([0x22; 32]);
    let nonces = NonceAllocator::open(&mut MemoryEpochStore::new()).expect("epoch");
    RecordPipeline::new(VolumeId([5; 16]), compression, Some(&key), Some(nonces)).expect("pipeline")
}

/// Whole record seal/open (zstd:1 + AES-256-GCM + crc32c) per record size.
fn bench_record(c: &mut Criterion) {
    for kind in ["text", "random"] {
        let mut g = c.benchmark_group(format!("record_{kind}"));
        for (size_name, size) in SIZES {
            let input = data(kind, size, 4);
            g.throughput(Throughput::Bytes(u64::try_from(size).unwrap_or(0)));
            let mut w = writer(Compression::Zstd { level: 1 });
            let mut rec = Vec::with_capacity(size + 128);
            g.bench_function(BenchmarkId::new("seal", size_name), |b| {
                b.iter(|| {
                    rec.clear();
                    w.seal(7, 1, black_box(&input), &mut rec).expect("seal")
                });
            });
            let mut out = Vec::with_capacity(size);
            g.bench_function(BenchmarkId::new("open", size_name), |b| {
                b.iter(|| w.open(black_box(&rec), None, &mut out).expect("open"));
            });
        }
        g.finish();
    }
}

/// One RS(4+2) row holding four records of `size` (one per data strip): the steps on
/// their exact intermediate buffers, then the whole pipeline.
fn bench_whole(c: &mut Criterion) {
    for kind in ["text", "random"] {
        for (size_name, size) in SIZES {
            let mut g = c.benchmark_group(format!("pipeline_{kind}_{size_name}"));
            g.throughput(Throughput::Bytes(u64::try_from(size * K).unwrap_or(0)));
            let records: Vec<Vec<u8>> = (0..K).map(|i| data(kind, size, 30 + i as u64)).collect();
            let compression = Compression::Zstd { level: 1 };

            // Intermediate buffers, produced by one pass of the real pipeline.
            let mut w = writer(compression);
            let mut strips: Vec<Vec<u8>> = (0..K).map(|_| Vec::with_capacity(size + 128)).collect();
            for (i, r) in records.iter().enumerate() {
                w.seal(u64::try_from(i).unwrap_or(0) * 1000, 1, r, &mut strips[i])
                    .expect("seal");
            }
            let mut codec = Codec::new(compression).expect("codec");
            let mut bodies: Vec<Vec<u8>> = records
                .iter()
                .map(|r| match codec.compress(r).expect("compress") {
                    Some((_, p)) => p.to_vec(),
                    None => r.clone(),
                })
                .collect();
            let strip_len = strips.iter().map(Vec::len).max().unwrap_or(0);
            let mut parity = vec![vec![0u8; strip_len]; M];
            let coder: Box<dyn ErasureCoder> = coder_for(K, M).expect("coder");
            let aead = AeadKey::new(&[0x22; 32]).expect("key");
            let aad = [0u8; 60];

            g.bench_function("step_compress", |b| {
                b.iter(|| {
                    for r in &records {
                        black_box(codec.compress(black_box(r)).expect("compress"));
                    }
                });
            });
            let mut n = 0u64;
            g.bench_function("step_aead", |b| {
                b.iter(|| {
                    for body in &mut bodies {
                        n += 1;
                        let mut nonce = [0u8; 12];
                        nonce[4..].copy_from_slice(&n.to_le_bytes());
                        black_box(aead.seal_in_place(nonce, &aad, body).expect("seal"));
                    }
                });
            });
            g.bench_function("step_crc", |b| {
                b.iter(|| {
                    for s in &strips {
                        black_box(crc::crc32c(black_box(s)));
                    }
                });
            });
            g.bench_function("step_ec", |b| {
                b.iter(|| {
                    let d: Vec<&[u8]> = strips.iter().map(Vec::as_slice).collect();
                    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
                    coder.encode(black_box(&d), &mut p).expect("encode");
                });
            });
            g.bench_function("whole", |b| {
                b.iter(|| {
                    for (i, r) in records.iter().enumerate() {
                        strips[i].clear();
                        w.seal(u64::try_from(i).unwrap_or(0) * 1000, 1, r, &mut strips[i])
                            .expect("seal");
                    }
                    let len = strips.iter().map(Vec::len).max().unwrap_or(0);
                    for p in &mut parity {
                        p.resize(len, 0);
                    }
                    let d: Vec<&[u8]> = strips.iter().map(Vec::as_slice).collect();
                    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
                    coder.encode(&d, &mut p).expect("encode");
                });
            });
            g.finish();
        }
    }
}

criterion_group!(
    benches,
    bench_compress,
    bench_aead,
    bench_crc,
    bench_rs,
    bench_record,
    bench_whole
);
criterion_main!(benches);
