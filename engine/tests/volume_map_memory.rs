//! The map's memory bound: at most 32 bytes per written 4 KiB block, measured on the
//! heap itself (a counting global allocator in this test binary) and compared with the
//! map's own report, for a large random write pattern and for sequential writes.

// Ratios printed for the report; the exact checks use integers.
#![allow(clippy::cast_precision_loss)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use engine::map::{BlockMap, Location};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(
            isize::try_from(layout.size()).unwrap_or(0),
            Ordering::Relaxed,
        );
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(
            isize::try_from(layout.size()).unwrap_or(0),
            Ordering::Relaxed,
        );
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            isize::try_from(new_size).unwrap_or(0) - isize::try_from(layout.size()).unwrap_or(0),
            Ordering::Relaxed,
        );
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn loc(n: u64) -> Location {
    Location {
        row: n / 30,
        strip: u8::try_from(n % 4).unwrap_or(0),
        offset: u32::try_from((n % 30) * 4160).unwrap_or(0),
        len: 4160,
        index: 0,
        generation: n + 1,
    }
}

/// Fills a map with `writes` random single-block writes over `span` blocks and returns
/// (heap bytes measured, map's own report, mapped blocks).
fn random_pattern(writes: u64, span: u64, seed: u64) -> (isize, usize, u64) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut map = BlockMap::new();
    let mut x = seed | 1;
    for n in 0..writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        assert!(map.set(x % span, loc(n)));
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    let r = (used, map.memory_bytes(), map.mapped_blocks());
    drop(map);
    r
}

/// One test function: the heap counter is global, so measurements must not overlap.
#[test]
fn map_memory_within_32_bytes_per_written_block() {
    random_4k_writes();
    sequential_writes_use_dense_pages();
    scattered_worst_case();
}

/// Not bounded, printed for the record: one written block per 1 MiB of LBA space
/// (every page holds one entry) pays the page index per block.
fn scattered_worst_case() {
    let (heap, _, mapped) = random_pattern(50_000, 1 << 40, 0x9abc_def1);
    println!(
        "map: 50000 random writes over 2^40 blocks (one per page): {} B/block",
        heap as f64 / mapped as f64
    );
}

fn random_4k_writes() {
    // 1M random 4 KiB writes over a 16 GiB volume (4M blocks): most pages are sparse.
    // Then 400k over 1 GiB (262144 blocks): overwrites, pages mostly dense.
    for (writes, span) in [(1_000_000u64, 4u64 << 20), (400_000, 262_144)] {
        let (heap, reported, mapped) = random_pattern(writes, span, 0x1234_5678);
        let per_block = heap as f64 / mapped as f64;
        println!(
            "map: {writes} random writes over {span} blocks: {mapped} mapped, \
             {heap} heap bytes = {per_block:.2} B/block (map reports {reported})"
        );
        assert!(heap > 0);
        assert!(
            u64::try_from(heap).unwrap_or(u64::MAX) <= 32 * mapped,
            "{per_block:.2} bytes per block"
        );
        // The report is within a quarter of what the heap says.
        let (h, r) = (heap as f64, reported as f64);
        assert!((r - h).abs() <= h / 4.0, "reported {reported}, heap {heap}");
    }
}

fn sequential_writes_use_dense_pages() {
    let before = LIVE.load(Ordering::Relaxed);
    let mut map = BlockMap::new();
    for lba in 0..100_000u64 {
        assert!(map.set(lba, loc(lba)));
    }
    let heap = LIVE.load(Ordering::Relaxed) - before;
    let per_block = heap as f64 / 100_000.0;
    println!("map: 100000 sequential blocks: {heap} heap bytes = {per_block:.2} B/block");
    assert!(u64::try_from(heap).unwrap_or(u64::MAX) <= 32 * 100_000);
    map.clear(0, 100_000);
    assert_eq!(map.mapped_blocks(), 0);
    assert_eq!(map.memory_bytes(), 0);
}
