//! Placement throughput on a 1,000-node map, and the balance and movement figures that
//! docs/benchmarks.md quotes (printed before the timed runs).
//!
//! Run: `cargo bench -p benches --bench placement`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use placement::{ClusterMap, Layout, Node, NodeId, NodeState, Placer, SegmentId};

const RACKS: u32 = 50;
const PER_RACK: u32 = 20;
/// Segments for the balance and movement figures.
const SEGMENTS: u32 = 200_000;

/// 50 racks of 20 nodes, weights 1..=10 from a fixed sequence.
fn map_1000() -> ClusterMap {
    let mut map = ClusterMap::new(["rack", "node"]).expect("levels");
    let mut x: u64 = 1;
    for r in 0..RACKS {
        for i in 0..PER_RACK {
            x = placement::hash::mix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            let weight = 1 + u32::try_from(x % 10).unwrap_or(0);
            let id = format!("r{r}n{i}");
            let node = Node::new(
                id.clone(),
                format!("10.1.{r}.{i}:4420"),
                format!("nqn.2024-01.io.bench:{id}"),
                1 << 40,
                format!("rack{r}/{id}"),
            )
            .with_weight(weight);
            map.add_node(node).expect("node");
        }
    }
    map
}

fn to_f64(n: u32) -> f64 {
    f64::from(n)
}

fn count_f64(n: u64) -> f64 {
    // Counts here stay far below 2^32.
    f64::from(u32::try_from(n).unwrap_or(u32::MAX))
}

fn share(map: &ClusterMap, layout: Layout, id: &NodeId) -> f64 {
    let total: u32 = map
        .nodes()
        .iter()
        .filter(|n| n.eligible())
        .map(|n| n.weight)
        .sum();
    let pieces = u32::try_from(layout.pieces()).unwrap_or(0);
    let w = map.node(id).map_or(0, |n| n.weight);
    to_f64(SEGMENTS) * to_f64(pieces) * to_f64(w) / to_f64(total)
}

/// Prints balance (load / weight-proportional share: min and max over nodes, and summed
/// over the nodes of weight 1 and of weight 10) and movement (moved pieces / theoretical
/// minimum) for adding a node of weight 5 and for taking node r13n4 out.
fn figures() {
    let map = map_1000();
    let mut added = map.clone();
    added
        .add_node(
            Node::new(
                "new",
                "10.2.0.1:4420",
                "nqn.2024-01.io.bench:new",
                1 << 40,
                "rack7/new",
            )
            .with_weight(5),
        )
        .expect("add");
    let victim = NodeId::from("r13n4");
    let mut removed = map.clone();
    removed.set_state(&victim, NodeState::Out).expect("out");
    for (layout, level) in [
        (Layout::ec(4, 2), "rack"),
        (Layout::ec(4, 2), "node"),
        (Layout::mirror(3), "rack"),
    ] {
        let p = Placer::new(&map, layout, level).expect("placer");
        let pa = Placer::new(&added, layout, level).expect("placer");
        let pr = Placer::new(&removed, layout, level).expect("placer");
        let mut load: HashMap<NodeId, u64> = HashMap::new();
        let (mut add, mut rm) = (0u64, 0u64);
        for s in 0..SEGMENTS {
            let seg = SegmentId::new(1, u64::from(s));
            let x = p.place(seg);
            let (ya, yr) = (pa.place(seg), pr.place(seg));
            add += x.iter().filter(|id| !ya.contains(id)).count() as u64;
            rm += x.iter().filter(|id| !yr.contains(id)).count() as u64;
            for n in x {
                *load.entry(n).or_insert(0) += 1;
            }
        }
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        let mut class = [(0.0f64, 0.0f64); 11];
        for n in map.nodes() {
            let got = count_f64(load.get(&n.id).copied().unwrap_or(0));
            let want = share(&map, layout, &n.id);
            lo = lo.min(got / want);
            hi = hi.max(got / want);
            let c = &mut class[usize::try_from(n.weight).unwrap_or(0).min(10)];
            c.0 += got;
            c.1 += want;
        }
        let lightest = share(
            &map,
            layout,
            &map.nodes()
                .iter()
                .min_by_key(|n| n.weight)
                .expect("nodes")
                .id,
        );
        let add_min = share(&added, layout, &"new".into());
        let held = count_f64(load.get(&victim).copied().unwrap_or(0));
        println!(
            "figures {layout} level={level} segments={SEGMENTS}: load/share min {lo:.3} max {hi:.3} \
             (sampling sd of the lightest node {:.3}); weight-1 nodes {:.3}, weight-10 nodes {:.3}; \
             add weight-5 node: moved {add}, minimum {add_min:.0}, ratio {:.3}; \
             take r13n4 out: moved {rm}, held {held:.0}, ratio {:.3}",
            1.0 / lightest.sqrt(),
            class[1].0 / class[1].1,
            class[10].0 / class[10].1,
            count_f64(add) / add_min,
            count_f64(rm) / held
        );
    }
}

/// CPU time of this thread in nanoseconds (Linux `schedstat`), so the throughput figure
/// does not depend on how many other processes share the machine.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Placements per second of CPU time and of wall time, over 100,000 placements.
fn cpu_throughput() {
    let map = map_1000();
    for (layout, level) in [
        (Layout::ec(4, 2), "rack"),
        (Layout::ec(4, 2), "node"),
        (Layout::mirror(3), "rack"),
    ] {
        let p = Placer::new(&map, layout, level).expect("placer");
        let count: u32 = 100_000;
        let wall = std::time::Instant::now();
        let cpu0 = thread_cpu_ns();
        for s in 0..count {
            black_box(p.place(SegmentId::new(2, u64::from(s))));
        }
        let cpu = cpu0.zip(thread_cpu_ns()).map(|(a, b)| b.saturating_sub(a));
        let wall_s = wall.elapsed().as_secs_f64();
        let per_cpu_s = cpu.map_or(f64::NAN, |ns| to_f64(count) / (count_f64(ns / 1000) / 1e6));
        println!(
            "cpu-throughput {layout} level={level}: {count} placements, {:.0} per CPU-second, {:.0} per wall-second",
            per_cpu_s,
            to_f64(count) / wall_s
        );
    }
}

fn bench(c: &mut Criterion) {
    cpu_throughput();
    figures();
    let map = map_1000();
    let mut g = c.benchmark_group("placement_1000_nodes");
    g.throughput(Throughput::Elements(1));
    for (name, layout, level) in [
        ("ec4+2_rack", Layout::ec(4, 2), "rack"),
        ("ec4+2_node", Layout::ec(4, 2), "node"),
        ("mirror3_rack", Layout::mirror(3), "rack"),
    ] {
        let p = Placer::new(&map, layout, level).expect("placer");
        let mut s = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                s = s.wrapping_add(1);
                black_box(p.place(SegmentId::new(1, black_box(s))))
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
