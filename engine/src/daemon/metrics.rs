//! The Prometheus endpoint: `GET /metrics` in the text exposition format 0.0.4.
//!
//! Everything is computed at scrape time from the engine's counters, the store and the
//! front-ends, so an idle daemon does no metrics work. Rates (IOPS, MB/s) are left to
//! Prometheus (`rate(dpud_volume_reads_total[1m])`); the names are listed in
//! docs/operations.md. The listener is HTTP/1.1 only and binds to loopback unless
//! configured otherwise.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::service::{LatencyHistogram, NodeAdminState};
use crate::api::ControlPlane;

use super::frontends::DaemonFrontends;

/// What a scrape reads.
#[derive(Debug, Clone)]
pub(crate) struct MetricsSource {
    pub(crate) plane: Arc<ControlPlane>,
    pub(crate) frontends: Arc<DaemonFrontends>,
    pub(crate) net: Arc<crate::net::control::NetControl>,
}

/// Reads one counter of a volume.
type Counter = fn(&crate::api::service::VolumeMetrics) -> u64;

/// Escapes a label value.
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Writes `# HELP` and `# TYPE` for a metric.
pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample with a single label.
pub(crate) fn sample(
    out: &mut String,
    name: &str,
    key: &str,
    value_label: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {value}", label(value_label));
}

fn histogram(out: &mut String, name: &str, volume: &str, h: &LatencyHistogram) {
    let mut cumulative = 0u64;
    let v = label(volume);
    for (i, bound) in h.bounds_seconds.iter().enumerate() {
        cumulative += h.counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{name}_bucket{{volume=\"{v}\",le=\"{bound}\"}} {cumulative}"
        );
    }
    let total = h.count();
    let _ = writeln!(out, "{name}_bucket{{volume=\"{v}\",le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum{{volume=\"{v}\"}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{volume=\"{v}\"}} {total}");
}

/// CPU seconds (user + system) and resident bytes of this process, from /proc/self.
pub(crate) fn process_stats() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ")".
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u32::try_from(ticks).ok().filter(|t| *t > 0)?;
    // Tick counts stay below 2^52 (f64's exact range) for a million years of CPU time.
    #[allow(clippy::cast_precision_loss)]
    let cpu = (utime + stime) as f64 / f64::from(ticks);
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((cpu, rss_kib * 1024))
}

/// Renders every metric.
pub(crate) async fn render(src: &MetricsSource) -> String {
    let mut out = String::with_capacity(4096);
    header(&mut out, "dpud_build_info", "gauge", "dpud's version.");
    sample(
        &mut out,
        "dpud_build_info",
        "version",
        env!("CARGO_PKG_VERSION"),
        1,
    );

    let service = src.plane.service();
    match service.metrics().await {
        Ok(volumes) => {
            let counters: [(&str, &str, Counter); 6] = [
                ("dpud_volume_reads_total", "Read requests completed.", |m| {
                    m.reads
                }),
                (
                    "dpud_volume_writes_total",
                    "Write and write-zeroes requests completed.",
                    |m| m.writes,
                ),
                ("dpud_volume_read_bytes_total", "Bytes read.", |m| {
                    m.read_bytes
                }),
                ("dpud_volume_written_bytes_total", "Bytes written.", |m| {
                    m.write_bytes
                }),
                ("dpud_volume_flushes_total", "Flushes completed.", |m| {
                    m.flushes
                }),
                ("dpud_volume_errors_total", "Requests that failed.", |m| {
                    m.errors
                }),
            ];
            for (name, help, get) in counters {
                header(&mut out, name, "counter", help);
                for m in &volumes {
                    sample(&mut out, name, "volume", &m.name, get(m));
                }
            }
            header(
                &mut out,
                "dpud_volume_degraded",
                "gauge",
                "1 if the volume is degraded or rebuilding.",
            );
            for m in &volumes {
                sample(
                    &mut out,
                    "dpud_volume_degraded",
                    "volume",
                    &m.name,
                    u8::from(m.degraded),
                );
            }
            for (name, help, pick) in [
                ("dpud_volume_read_latency_seconds", "Read latency.", true),
                ("dpud_volume_write_latency_seconds", "Write latency.", false),
            ] {
                header(&mut out, name, "histogram", help);
                for m in &volumes {
                    histogram(
                        &mut out,
                        name,
                        &m.name,
                        if pick {
                            &m.read_latency
                        } else {
                            &m.write_latency
                        },
                    );
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "volume metrics unavailable"),
    }

    let nodes = src.plane.registered_nodes().await.unwrap_or_default();
    let status = service.status().await.unwrap_or_default();
    header(
        &mut out,
        "dpud_node_state",
        "gauge",
        "1 for the node's administrative state (up, draining, removed).",
    );
    for n in &nodes {
        for s in [
            NodeAdminState::Up,
            NodeAdminState::Draining,
            NodeAdminState::Removed,
        ] {
            let _ = writeln!(
                out,
                "dpud_node_state{{node=\"{}\",state=\"{s}\"}} {}",
                label(&n.name),
                u8::from(n.state == s)
            );
        }
    }
    header(
        &mut out,
        "dpud_node_reachable",
        "gauge",
        "1 if the engine reaches the node's target.",
    );
    for n in &nodes {
        let seen = status.nodes.iter().find(|s| s.name == n.name);
        sample(
            &mut out,
            "dpud_node_reachable",
            "node",
            &n.name,
            u8::from(seen.is_some_and(|s| s.reachable)),
        );
    }
    header(
        &mut out,
        "dpud_node_errors_total",
        "counter",
        "I/O errors the engine counted on the node.",
    );
    for n in &nodes {
        let seen = status.nodes.iter().find(|s| s.name == n.name);
        sample(
            &mut out,
            "dpud_node_errors_total",
            "node",
            &n.name,
            seen.map_or(0, |s| s.errors),
        );
    }
    header(
        &mut out,
        "dpud_volume_pending_repairs",
        "gauge",
        "Repairs queued and not yet done.",
    );
    for v in &status.volumes {
        sample(
            &mut out,
            "dpud_volume_pending_repairs",
            "volume",
            &v.name,
            v.pending_repairs,
        );
    }

    for (name, help, pick) in [
        (
            "dpud_rebuild_done_bytes",
            "Bytes of pieces rebuilt so far by the rebuild under way.",
            true,
        ),
        (
            "dpud_rebuild_total_bytes",
            "Bytes of pieces the rebuild under way has to write in all.",
            false,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for r in &status.rebuilds {
            let v = if pick { r.done_bytes } else { r.total_bytes };
            sample(&mut out, name, "volume", &r.volume, v);
        }
    }

    src.frontends.write_metrics(&mut out);
    super::net_metrics::render(&src.net, &mut out).await;

    if let Some((cpu, rss)) = process_stats() {
        header(
            &mut out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of dpud.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {cpu}");
        header(
            &mut out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of dpud.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {rss}");
    }
    out
}

async fn handle(
    src: MetricsSource,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n".into(),
            "text/plain",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET\n".into(),
            "text/plain",
        );
    }
    reply(
        StatusCode::OK,
        render(&src).await,
        "text/plain; version=0.0.4; charset=utf-8",
    )
}

/// Serves `/metrics` on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    src: MetricsSource,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer): (_, SocketAddr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let src = src.clone();
                let mut stop = stop.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(src.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                tracing::debug!(%peer, error = %e, "metrics connection ended");
                            }
                        }
                        _ = stop.changed() => conn.as_mut().graceful_shutdown(),
                    }
                });
            }
        }
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}
