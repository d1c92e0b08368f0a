//! `testbed`: brings up a loopback cluster (storage nodes and dpud), injects faults and
//! runs the benchmark suite.
//!
//! `testbed guest-run SCRIPT` boots the kernel-peer test guest by hand (docs/testing.md).

use std::time::Duration;

use anyhow::{bail, Context};
use testbed::guest::{GuestConfig, GuestEnv, Network};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("guest-run") => guest_run(&args[1..]),
        _ => bail!(
            "testbed: the loopback cluster arrives with the dpud issue; see scripts/main-job\n\
             usage: testbed guest-run SCRIPT [--forward HOSTPORT:GUESTPORT]... [--passt] \
             [--timeout SECS] [--kernel-arg WORD]..."
        ),
    }
}

/// Boots the test guest with SCRIPT as its `/test.sh`, streams nothing, and prints the
/// console when the guest has powered off.
fn guest_run(args: &[String]) -> anyhow::Result<()> {
    let mut script_path = None;
    let mut forwards = Vec::new();
    let mut network = Network::Slirp;
    let mut timeout = Duration::from_secs(300);
    let mut kernel_args = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--forward" => {
                let spec = it.next().context("--forward needs HOSTPORT:GUESTPORT")?;
                let (h, g) = spec
                    .split_once(':')
                    .context("--forward needs HOSTPORT:GUESTPORT")?;
                forwards.push((h.parse::<u16>()?, g.parse::<u16>()?));
            }
            "--passt" => network = Network::Passt,
            "--kernel-arg" => {
                kernel_args.push(it.next().context("--kernel-arg needs a word")?.clone());
            }
            "--timeout" => {
                let secs: u64 = it.next().context("--timeout needs seconds")?.parse()?;
                timeout = Duration::from_secs(secs);
            }
            other if script_path.is_none() => script_path = Some(other.to_owned()),
            other => bail!("unexpected argument {other:?}"),
        }
    }
    let script_path = script_path.context("guest-run needs a script")?;
    let script =
        std::fs::read_to_string(&script_path).with_context(|| format!("reading {script_path}"))?;
    let env = GuestEnv::discover()?;
    let mut config = GuestConfig::new("manual", script)
        .network(network)
        .timeout(timeout);
    config.kernel_args = kernel_args;
    for (h, g) in forwards {
        config = config.forward(h, g);
    }
    let run = env.run(config)?;
    print!("{}", run.console);
    eprintln!(
        "testbed: boot {:?}, total {:?}, script status {:?}, log {}",
        run.boot_time,
        run.total_time,
        run.test_rc,
        run.log_path.display()
    );
    run.check()?;
    Ok(())
}
