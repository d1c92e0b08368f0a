//! `dpuctl`: the operator's command line over dpud's control API.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("dpuctl: the control API arrives with the dpud issue; nothing to manage yet")
}
