//! The per-record pipeline, step by step and whole: compression, AES-256-GCM, crc32c and
//! Reed-Solomon, each with the candidate libraries, on text-like and random data, per
//! 4 KiB block and per 32 KiB / 128 KiB record. `pipeline_<data>_<size>` groups time the
//! steps on the exact intermediate buffers of a whole RS(4+2) row and the whole row, so
//! the whole can be compared with the sum of its steps (docs/benchmarks.md, "Pipeline").
//!
//! Run: `cargo bench -p benches --bench pipeline -- --warm-up-time 1 --measurement-time 2`
//! (add `--features rse-simd` to measure reed-solomon-erasure with its `simd-accel`).

use std::hint::black_box;
use std::time::Duration;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::KeyInit;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use engine::pipeline::compress::Codec;
use engine::pipeline::keys::AeadKey;
use engine::pipeline::{
    coder_for, crc, Compression, DataKey, ErasureCoder, IsalCoder, MemoryEpochStore,
    NonceAllocator, RecordPipeline, VolumeId,
};

/// Criterion measurement of the benchmark thread's CPU time
/// (`CLOCK_THREAD_CPUTIME_ID`) instead of wall time: these machines have 2 cores shared
/// by many builds, and wall time there mostly measures who else was scheduled.
struct ThreadCpu {
    wall: WallTime,
}

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid, exclusive pointer;
    // CLOCK_THREAD_CPUTIME_ID is supported on every Linux this runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_secs_f64() * 1e9
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

type C = Criterion<ThreadCpu>;

const SIZES: [(&str, usize); 3] = [("4k", 4096), ("32k", 32768), ("128k", 131_072)];
const K: usize = 4;
const M: usize = 2;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
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

fn bench_compress(c: &mut C) {
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

fn bench_aead(c: &mut C) {
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

fn bench_crc(c: &mut C) {
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
fn bench_rs(c: &mut C) {
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
fn bench_record(c: &mut C) {
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

/// One RS(4+2) row holding four records of `size` (one per data strip), with the
/// intermediate buffers of one real pass, so each step can be timed on exactly what it
/// sees inside the pipeline.
struct Row {
    records: Vec<Vec<u8>>,
    writer: RecordPipeline,
    strips: Vec<Vec<u8>>,
    codec: Codec,
    bodies: Vec<Vec<u8>>,
    parity: Vec<Vec<u8>>,
    coder: Box<dyn ErasureCoder>,
    aead: AeadKey,
    nonce: u64,
}

impl Row {
    fn new(kind: &str, size: usize) -> Self {
        let records: Vec<Vec<u8>> = (0..K).map(|i| data(kind, size, 30 + i as u64)).collect();
        let compression = Compression::Zstd { level: 1 };
        let mut row = Self {
            writer: writer(compression),
            strips: (0..K).map(|_| Vec::with_capacity(size + 128)).collect(),
            codec: Codec::new(compression).expect("codec"),
            bodies: Vec::new(),
            parity: Vec::new(),
            coder: coder_for(K, M).expect("coder"),
            aead: AeadKey::new(&[0x22; 32]).expect("key"),
            nonce: 0,
            records,
        };
        row.whole();
        let mut codec = Codec::new(compression).expect("codec");
        row.bodies = row
            .records
            .iter()
            .map(|r| match codec.compress(r).expect("compress") {
                Some((_, p)) => p.to_vec(),
                None => r.clone(),
            })
            .collect();
        row
    }

    fn step_compress(&mut self) {
        for r in &self.records {
            black_box(self.codec.compress(black_box(r)).expect("compress"));
        }
    }

    fn step_aead(&mut self) {
        let aad = [0u8; 60];
        for body in &mut self.bodies {
            self.nonce += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&self.nonce.to_le_bytes());
            black_box(self.aead.seal_in_place(nonce, &aad, body).expect("seal"));
        }
    }

    fn step_crc(&mut self) {
        for s in &self.strips {
            black_box(crc::crc32c(black_box(s)));
        }
    }

    fn step_ec(&mut self) {
        let d: Vec<&[u8]> = self.strips.iter().map(Vec::as_slice).collect();
        let mut p: Vec<&mut [u8]> = self.parity.iter_mut().map(Vec::as_mut_slice).collect();
        self.coder.encode(black_box(&d), &mut p).expect("encode");
    }

    /// Compress, seal (AES-GCM, crc32c) and append each record to its strip, then
    /// compute parity over the strips as filled.
    fn whole(&mut self) {
        for (i, r) in self.records.iter().enumerate() {
            self.strips[i].clear();
            let lba = u64::try_from(i).unwrap_or(0) * 1000;
            self.writer
                .seal(lba, 1, r, &mut self.strips[i])
                .expect("seal");
        }
        let len = self.strips.iter().map(Vec::len).max().unwrap_or(0);
        self.parity.resize(M, Vec::new());
        for p in &mut self.parity {
            p.resize(len, 0);
        }
        self.step_ec();
    }
}

type Step = (&'static str, fn(&mut Row));
const STEPS: [Step; 5] = [
    ("step_compress", Row::step_compress),
    ("step_aead", Row::step_aead),
    ("step_crc", Row::step_crc),
    ("step_ec", Row::step_ec),
    ("whole", Row::whole),
];

fn bench_whole(c: &mut C) {
    for kind in ["text", "random"] {
        for (size_name, size) in SIZES {
            let mut g = c.benchmark_group(format!("pipeline_{kind}_{size_name}"));
            g.throughput(Throughput::Bytes(u64::try_from(size * K).unwrap_or(0)));
            let mut row = Row::new(kind, size);
            for (name, step) in STEPS {
                g.bench_function(name, |b| b.iter(|| step(&mut row)));
            }
            g.finish();
        }
    }
}

/// Whole versus the sum of its steps: thread CPU time, the steps and the whole timed in
/// interleaved rounds (median of 31) so what other processes do to caches and clocks
/// hits all of them alike. Run with `PIPELINE_RATIO=1 cargo bench -p benches --bench pipeline`.
fn interleaved_ratio_report() {
    println!("| data | record | compress | aead | crc | ec | sum of steps | whole | whole/sum |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for kind in ["text", "random"] {
        for (size_name, size) in SIZES {
            let mut row = Row::new(kind, size);
            // Calibrate: enough iterations for about 5 ms per batch.
            let iters: Vec<u32> = STEPS
                .iter()
                .map(|(_, step)| {
                    let t = thread_cpu_now();
                    step(&mut row);
                    let one = thread_cpu_now().saturating_sub(t).as_nanos().max(1);
                    u32::try_from((5_000_000 / one).clamp(1, 100_000)).unwrap_or(1)
                })
                .collect();
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
            for _ in 0..31 {
                for (i, (_, step)) in STEPS.iter().enumerate() {
                    let t = thread_cpu_now();
                    for _ in 0..iters[i] {
                        step(&mut row);
                    }
                    let spent = thread_cpu_now().saturating_sub(t);
                    samples[i].push(spent.as_secs_f64() * 1e6 / f64::from(iters[i]));
                }
            }
            let med: Vec<f64> = samples
                .iter_mut()
                .map(|s| {
                    s.sort_by(f64::total_cmp);
                    s[s.len() / 2]
                })
                .collect();
            let sum: f64 = med[..4].iter().sum();
            println!(
                "| {kind} | {size_name} | {:.2} | {:.2} | {:.2} | {:.2} | {sum:.2} | {:.2} | {:.3} |",
                med[0],
                med[1],
                med[2],
                med[3],
                med[4],
                med[4] / sum
            );
        }
    }
}

criterion_group!(
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu { wall: WallTime });
    targets =
    bench_compress,
    bench_aead,
    bench_crc,
    bench_rs,
    bench_record,
    bench_whole
);
fn main() {
    if std::env::var_os("PIPELINE_RATIO").is_some() {
        interleaved_ratio_report();
        return;
    }
    benches();
    Criterion::default()
        .with_measurement(ThreadCpu { wall: WallTime })
        .configure_from_args()
        .final_summary();
}
