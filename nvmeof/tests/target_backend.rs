//! Namespace backends: data round trips, alignment and range rejection, zeroing and
//! deallocation, for the memory backend and both file I/O engines.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use nvmeof::backend::{
    Backend, BackendError, FileBackend, FileOptions, IoMode, IoPath, MemoryBackend,
};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| {
            u8::try_from(i % 256)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect::<Vec<u8>>()
        .into()
}

/// The checks every backend must pass.
async fn exercise(b: Arc<dyn Backend>) {
    let bs = u64::from(b.block_size());
    let size = b.size();
    assert!(size >= 64 * bs, "test backend too small");

    // Fresh contents read as zeroes.
    let z = b.read(0, 4 * bs).await.unwrap();
    assert!(z.iter().all(|&x| x == 0));

    // Round trip at several places, including the very last block.
    let a = pattern(1, usize::try_from(8 * bs).unwrap());
    b.write(bs, a.clone()).await.unwrap();
    assert_eq!(b.read(bs, 8 * bs).await.unwrap(), a);
    let last = pattern(9, usize::try_from(bs).unwrap());
    b.write(size - bs, last.clone()).await.unwrap();
    assert_eq!(b.read(size - bs, bs).await.unwrap(), last);
    // A partial overlap read sees both old zeroes and new data.
    let r = b.read(0, 2 * bs).await.unwrap();
    assert!(r[..usize::try_from(bs).unwrap()].iter().all(|&x| x == 0));
    assert_eq!(
        &r[usize::try_from(bs).unwrap()..],
        &a[..usize::try_from(bs).unwrap()]
    );

    // Many writes in flight at once land where they should.
    let futs: Vec<_> = (0..32u64)
        .map(|i| {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                let d = pattern(u8::try_from(i).unwrap(), usize::try_from(bs).unwrap());
                b.write((16 + i) * bs, d).await.unwrap();
            })
        })
        .collect();
    for f in futs {
        f.await.unwrap();
    }
    for i in 0..32u64 {
        let d = b.read((16 + i) * bs, bs).await.unwrap();
        assert_eq!(
            d,
            pattern(u8::try_from(i).unwrap(), usize::try_from(bs).unwrap())
        );
    }

    // Unaligned offsets and lengths are rejected, and nothing is written.
    assert!(matches!(
        b.read(1, bs).await,
        Err(BackendError::Unaligned { .. })
    ));
    assert!(matches!(
        b.read(0, bs + 1).await,
        Err(BackendError::Unaligned { .. })
    ));
    assert!(matches!(
        b.write(bs / 2, pattern(3, usize::try_from(bs).unwrap()))
            .await,
        Err(BackendError::Unaligned { .. })
    ));
    assert!(matches!(
        b.write(0, Bytes::from(vec![7u8; 100])).await,
        Err(BackendError::Unaligned { .. })
    ));
    assert!(b.read(0, bs).await.unwrap().iter().all(|&x| x == 0));
    assert!(matches!(
        b.write_zeroes(3, bs).await,
        Err(BackendError::Unaligned { .. })
    ));
    assert!(matches!(
        b.deallocate(0, 5).await,
        Err(BackendError::Unaligned { .. })
    ));

    // Out of range, including overflow.
    assert!(matches!(
        b.read(size, bs).await,
        Err(BackendError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.read(size - bs, 2 * bs).await,
        Err(BackendError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write(size, pattern(0, usize::try_from(bs).unwrap()))
            .await,
        Err(BackendError::OutOfRange { .. })
    ));
    let top = u64::MAX - u64::MAX % bs;
    assert!(matches!(
        b.read(top, bs).await,
        Err(BackendError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write_zeroes(size - bs, 2 * bs).await,
        Err(BackendError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.deallocate(top, bs).await,
        Err(BackendError::OutOfRange { .. })
    ));
    assert_eq!(b.read(size - bs, bs).await.unwrap(), last);

    // Write zeroes clears exactly the range.
    b.write_zeroes(2 * bs, 3 * bs).await.unwrap();
    let r = b.read(bs, 8 * bs).await.unwrap();
    let ubs = usize::try_from(bs).unwrap();
    assert_eq!(&r[..ubs], &a[..ubs]);
    assert!(r[ubs..4 * ubs].iter().all(|&x| x == 0));
    assert_eq!(&r[4 * ubs..], &a[4 * ubs..]);

    // Deallocate: reads back zeroes where the backend promises it; neighbours intact.
    b.deallocate(16 * bs, 4 * bs).await.unwrap();
    if b.deallocate_reads_zeroes() {
        assert!(b
            .read(16 * bs, 4 * bs)
            .await
            .unwrap()
            .iter()
            .all(|&x| x == 0));
    }
    assert_eq!(b.read(20 * bs, bs).await.unwrap(), pattern(4, ubs));

    b.flush().await.unwrap();
}

#[tokio::test]
async fn memory_backend_round_trip_and_rejections() {
    let m = Arc::new(MemoryBackend::new(8 << 20, 4096).unwrap());
    assert_eq!(m.io_path(), IoPath::Memory);
    assert!(!m.volatile_write_cache());
    exercise(m.clone()).await;
    let m512 = Arc::new(MemoryBackend::new(1 << 20, 512).unwrap());
    exercise(m512).await;
}

#[tokio::test]
async fn memory_backend_is_sparse_and_frees_on_deallocate() {
    let m = MemoryBackend::new(1 << 30, 4096).unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    m.write(5 << 20, pattern(1, 4096)).await.unwrap();
    assert_eq!(m.allocated_bytes(), 1 << 20);
    m.deallocate(4 << 20, 4 << 20).await.unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    assert!(m.read(5 << 20, 4096).await.unwrap().iter().all(|&x| x == 0));
}

#[test]
fn memory_backend_rejects_bad_geometry() {
    assert!(matches!(
        MemoryBackend::new(4096, 1000),
        Err(BackendError::Config(_))
    ));
    assert!(matches!(
        MemoryBackend::new(4095, 512),
        Err(BackendError::Config(_))
    ));
    assert!(matches!(
        MemoryBackend::new(0, 512),
        Err(BackendError::Config(_))
    ));
}

fn temp_file(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ns.img");
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    (dir, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_blocking_path() {
    let (_d, p) = temp_file(4 << 20);
    let opts = FileOptions {
        io: IoMode::Blocking,
        ..FileOptions::default()
    };
    let f = Arc::new(FileBackend::open(&p, &opts).unwrap());
    assert!(
        matches!(f.io_path(), IoPath::Blocking { .. }),
        "{}",
        f.io_path()
    );
    assert!(f.volatile_write_cache());
    exercise(f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_auto_path_reports_engine_and_verifies_data() {
    let (_d, p) = temp_file(4 << 20);
    let f = Arc::new(FileBackend::open(&p, &FileOptions::default()).unwrap());
    // Whatever engine was chosen, it is reported, and it works.
    eprintln!("auto path: {}", f.describe());
    exercise(f.clone()).await;
    // The data is really in the file.
    f.write(0, pattern(42, 4096)).await.unwrap();
    f.flush().await.unwrap();
    let on_disk = std::fs::read(&p).unwrap();
    assert_eq!(&on_disk[..4096], &pattern(42, 4096)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_io_uring_path() {
    let (_d, p) = temp_file(4 << 20);
    let opts = FileOptions {
        io: IoMode::IoUring,
        ..FileOptions::default()
    };
    match FileBackend::open(&p, &opts) {
        Ok(f) => {
            assert!(matches!(f.io_path(), IoPath::IoUring { .. }));
            exercise(Arc::new(f)).await;
        }
        // Only acceptable failure: io_uring itself is unavailable on this kernel.
        Err(BackendError::Io {
            op: "io_uring setup",
            source,
            ..
        }) => {
            eprintln!("io_uring unavailable here: {source}");
            let auto = FileBackend::open(&p, &FileOptions::default()).unwrap();
            assert!(matches!(auto.io_path(), IoPath::Blocking { .. }));
        }
        Err(e) => panic!("unexpected open error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_deallocate_punches_holes() {
    let (_d, p) = temp_file(8 << 20);
    let f = FileBackend::open(&p, &FileOptions::default()).unwrap();
    f.write(0, Bytes::from(vec![0xa5u8; 4 << 20]))
        .await
        .unwrap();
    f.flush().await.unwrap();
    let before = std::fs::metadata(&p).unwrap().blocks();
    f.deallocate(0, 4 << 20).await.unwrap();
    let after = std::fs::metadata(&p).unwrap().blocks();
    assert!(after < before, "blocks before {before}, after {after}");
    assert!(f.read(0, 4 << 20).await.unwrap().iter().all(|&x| x == 0));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 << 20, "size kept");
}

#[test]
fn file_backend_open_errors() {
    let (_d, p) = temp_file(100);
    assert!(matches!(
        FileBackend::open(&p, &FileOptions::default()),
        Err(BackendError::Config(_))
    ));
    assert!(matches!(
        FileBackend::open("/nonexistent/x", &FileOptions::default()),
        Err(BackendError::Io { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        FileBackend::open(dir.path(), &FileOptions::default()),
        Err(BackendError::Config(_))
    ));
    let (_d2, p2) = temp_file(1 << 20);
    let bad = FileOptions {
        block_size: Some(3000),
        ..FileOptions::default()
    };
    assert!(matches!(
        FileBackend::open(&p2, &bad),
        Err(BackendError::Config(_))
    ));
    // create_size makes a new file of that size.
    let newp = dir.path().join("new.img");
    let opts = FileOptions {
        create_size: Some(1 << 20),
        ..FileOptions::default()
    };
    let f = FileBackend::open(&newp, &opts).unwrap();
    assert_eq!(f.size(), 1 << 20);
}
