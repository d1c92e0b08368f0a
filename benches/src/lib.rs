//! Benchmarks live in `benches/benches/` (criterion) and `benches/fio/` (fio job files);
//! this library holds what they share.
