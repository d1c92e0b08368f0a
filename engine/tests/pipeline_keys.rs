//! Data key wrapping under a KEK, and nonce allocation across writer restarts.

use std::collections::HashSet;

use engine::pipeline::keys::WRAPPED_LEN;
use engine::pipeline::{
    unwrap_data_key, wrap_data_key, Compression, DataKey, EpochStore, FileEpochStore, Kek,
    MemoryEpochStore, NonceAllocator, PipelineError, RecordHeader, RecordPipeline, VolumeId,
    WrappedKey,
};

const VOL: VolumeId = VolumeId([1; 16]);

#[test]
fn wrapped_key_unwraps_to_the_same_key() {
    let kek = Kek::generate().expect("kek");
    let key = DataKey::generate().expect("key");
    let wrapped = wrap_data_key(&kek, &VOL, &key).expect("wrap");
    assert_eq!(wrapped.as_bytes().len(), WRAPPED_LEN);
    assert!(!wrapped
        .as_bytes()
        .windows(32)
        .any(|w| w == key.expose().as_slice()));
    let parsed = WrappedKey::from_bytes(wrapped.as_bytes()).expect("parse");
    let back = unwrap_data_key(&kek, &VOL, &parsed).expect("unwrap");
    assert_eq!(back.expose(), key.expose());
    // Two wraps of one key differ (fresh nonce each time).
    let again = wrap_data_key(&kek, &VOL, &key).expect("wrap");
    assert_ne!(again, wrapped);
}

#[test]
fn unwrap_fails_with_the_wrong_kek_volume_or_any_changed_byte() {
    let kek = Kek::from_bytes([3; 32]);
    let key = DataKey::from_bytes([4; 32]);
    let wrapped = wrap_data_key(&kek, &VOL, &key).expect("wrap");
    assert!(matches!(
        unwrap_data_key(&Kek::from_bytes([5; 32]), &VOL, &wrapped),
        Err(PipelineError::KeyUnwrap(_))
    ));
    assert!(matches!(
        unwrap_data_key(&kek, &VolumeId([2; 16]), &wrapped),
        Err(PipelineError::KeyUnwrap(_))
    ));
    for i in 1..WRAPPED_LEN {
        let mut b = *wrapped.as_bytes();
        b[i] ^= 0x01;
        let w = WrappedKey::from_bytes(&b).expect("same shape");
        assert!(unwrap_data_key(&kek, &VOL, &w).is_err(), "byte {i}");
    }
    let mut b = *wrapped.as_bytes();
    b[0] = 2;
    assert!(WrappedKey::from_bytes(&b).is_err(), "unknown version");
    assert!(WrappedKey::from_bytes(&b[..WRAPPED_LEN - 1]).is_err());
}

#[test]
fn secrets_do_not_show_in_debug_output() {
    let key = DataKey::from_bytes([0xAB; 32]);
    let kek = Kek::from_bytes([0xCD; 32]);
    let shown = format!("{key:?} {kek:?}");
    assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab, "));
    assert!(shown.contains("redacted"));
}

#[test]
fn no_nonce_repeats_under_one_key_across_1000_engine_restarts() {
    let key = DataKey::from_bytes([9; 32]);
    let mut store = MemoryEpochStore::new();
    let mut seen = HashSet::new();
    let mut strip = Vec::new();
    for restart in 0..1000u64 {
        let nonces = NonceAllocator::open(&mut store).expect("epoch");
        let mut p =
            RecordPipeline::new(VOL, Compression::Off, Some(&key), Some(nonces)).expect("pipeline");
        // A varying number of writes per session, then a "crash" (drop without saving).
        for i in 0..(restart % 5 + 1) {
            strip.clear();
            let h = p
                .seal(i, restart, &[0u8; 4096], &mut strip)
                .expect("seal")
                .header;
            let parsed = RecordHeader::decode(&strip).expect("header");
            assert_eq!(parsed.nonce, h.nonce);
            assert!(
                seen.insert(h.nonce.to_bytes()),
                "nonce {:?} reused",
                h.nonce
            );
        }
    }
    let expected: u64 = (0..1000u64).map(|r| r % 5 + 1).sum();
    assert_eq!(u64::try_from(seen.len()).expect("fits"), expected);
}

#[test]
fn a_failed_epoch_persist_hands_out_no_nonce() {
    let mut store = MemoryEpochStore::new();
    let first = NonceAllocator::open(&mut store).expect("epoch 0");
    assert_eq!(first.epoch(), 0);
    store.fail_next_persist = true;
    assert!(matches!(
        NonceAllocator::open(&mut store),
        Err(PipelineError::EpochStore(_))
    ));
    // The failed attempt did not advance the durable epoch, and the next open skips
    // nothing it might have used: it takes epoch 1, unused so far.
    assert_eq!(store.load(), Ok(Some(0)));
    assert_eq!(
        NonceAllocator::open(&mut store).expect("epoch 1").epoch(),
        1
    );
}

#[test]
fn epoch_exhaustion_is_an_error() {
    let mut store = MemoryEpochStore::with_last(u32::MAX);
    assert_eq!(
        NonceAllocator::open(&mut store).map(|a| a.epoch()),
        Err(PipelineError::EpochExhausted)
    );
}

#[test]
fn file_epoch_store_survives_reopen_and_detects_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("epoch");
    let mut epochs = Vec::new();
    for _ in 0..5 {
        // A new store object each time, as after a process restart.
        let mut store = FileEpochStore::new(&path);
        epochs.push(NonceAllocator::open(&mut store).expect("open").epoch());
    }
    assert_eq!(epochs, vec![0, 1, 2, 3, 4]);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[0] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    assert!(matches!(
        NonceAllocator::open(&mut FileEpochStore::new(&path)),
        Err(PipelineError::EpochStore(_))
    ));
}
