//! The network module's metrics: the CPU split between network and storage on the
//! shared reactors (the figure an operator tunes `[net] cpu_share` by), the poller's
//! work, and per-port counters.

use std::fmt::Write as _;

use super::metrics::{header, sample};
use crate::net::control::NetControl;

/// Reads one counter of a port.
type PortCounter = fn(&crate::net::dataplane::PortCounters) -> u64;

/// Appends the network metrics to `out`.
pub(crate) async fn render(net: &NetControl, out: &mut String) {
    let (net_s, storage_s) = net.cpu_seconds();
    header(
        out,
        "dpud_net_cpu_seconds_total",
        "counter",
        "Thread CPU time the network poller used on its reactor.",
    );
    let _ = writeln!(out, "dpud_net_cpu_seconds_total {net_s}");
    header(
        out,
        "dpud_storage_cpu_seconds_total",
        "counter",
        "Thread CPU time of the storage reactors, minus the network poller's.",
    );
    let _ = writeln!(out, "dpud_storage_cpu_seconds_total {storage_s}");
    header(
        out,
        "dpud_net_cpu_share",
        "gauge",
        "Configured share of its reactor the network poller may use per period.",
    );
    let _ = writeln!(
        out,
        "dpud_net_cpu_share {}",
        f64::from(net.settings().cpu_share)
    );
    header(
        out,
        "dpud_net_throttled_periods_total",
        "counter",
        "Periods in which the network poller used its whole share and slept.",
    );
    let _ = writeln!(
        out,
        "dpud_net_throttled_periods_total {}",
        net.throttled_periods()
    );
    let Ok(snap) = net.snapshot().await else {
        return;
    };
    let counters: [(&str, &str, PortCounter); 5] = [
        (
            "dpud_net_port_rx_packets_total",
            "Frames received on the port.",
            |c| c.rx_packets,
        ),
        (
            "dpud_net_port_rx_bytes_total",
            "Bytes received on the port.",
            |c| c.rx_bytes,
        ),
        (
            "dpud_net_port_tx_packets_total",
            "Frames sent on the port.",
            |c| c.tx_packets,
        ),
        (
            "dpud_net_port_tx_bytes_total",
            "Bytes sent on the port.",
            |c| c.tx_bytes,
        ),
        (
            "dpud_net_port_drops_total",
            "Frames received on the port and dropped.",
            |c| c.drops.total(),
        ),
    ];
    for (name, help, get) in counters {
        header(out, name, "counter", help);
        for p in &snap.stats.ports {
            let label = snap
                .names
                .get(&p.id)
                .cloned()
                .unwrap_or_else(|| p.name.clone());
            sample(out, name, "port", &label, get(&p.counters));
        }
    }
    header(
        out,
        "dpud_net_connections",
        "gauge",
        "Connections the firewall tracks.",
    );
    let _ = writeln!(out, "dpud_net_connections {}", snap.stats.connections);
}
