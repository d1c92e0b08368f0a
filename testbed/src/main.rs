//! `testbed`: brings up a loopback cluster (storage nodes and dpud), injects faults and
//! runs the benchmark suite.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("testbed: the loopback cluster arrives with the dpud issue; see scripts/main-job")
}
