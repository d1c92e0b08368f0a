//! The Prometheus endpoint, scraped over HTTP and parsed: per-volume counters and
//! latency histograms follow the I/O a test does, node states and process figures are
//! there, and anything but `GET /metrics` is refused.

use std::collections::BTreeMap;

use engine::api::proto;
use engine::api::proto::{nodes_client::NodesClient, volumes_client::VolumesClient};
use engine::api::service::{VolumeService, VolumeState};
use engine::api::testing::{connect_unix, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn http(
    addr: std::net::SocketAddr,
    request: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Parses the exposition format into `series -> value`, checking every line's shape.
fn parse(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        assert!(
            out.insert(series.to_owned(), v).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_io_and_state() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let addr = d.handle.metrics_addr().ok_or("no metrics listener")?;
    assert!(addr.ip().is_loopback());
    let ch = connect_unix(d.handle.api_socket()).await?;
    let mut nodes = NodesClient::new(ch.clone());
    for i in 0..2 {
        nodes
            .add(proto::AddNodeRequest {
                name: format!("n{i}"),
                address: format!("127.0.0.1:{}", 4420 + i),
                nqn: format!("nqn.2026-11.io.example:n{i}"),
                domain: None,
                weight: None,
            })
            .await?;
    }
    nodes
        .drain(proto::DrainNodeRequest { name: "n1".into() })
        .await?;
    VolumesClient::new(ch)
        .create(proto::CreateVolumeRequest {
            name: "vol1".into(),
            profile: "scratch".into(),
            size_bytes: 1 << 20,
        })
        .await?;

    // I/O through the device the front-ends would serve.
    let dev = d.service.device("vol1").await?.ok_or("no device")?;
    for i in 0..5u64 {
        dev.write(i * 4096, vec![0xab; 8192], false).await?;
    }
    for _ in 0..3 {
        dev.read(0, 4096).await?;
    }
    dev.flush().await?;
    d.service.set_node_status("n0", false, 4, Some("timed out"));
    d.service.set_volume_state("vol1", VolumeState::Degraded, 2);

    let resp = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no header end")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let m = parse(body);
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("missing {k}\n{body}"))
    };
    assert_eq!(get("dpud_volume_writes_total{volume=\"vol1\"}"), 5.0);
    assert_eq!(
        get("dpud_volume_written_bytes_total{volume=\"vol1\"}"),
        5.0 * 8192.0
    );
    assert_eq!(get("dpud_volume_reads_total{volume=\"vol1\"}"), 3.0);
    assert_eq!(
        get("dpud_volume_read_bytes_total{volume=\"vol1\"}"),
        3.0 * 4096.0
    );
    assert_eq!(get("dpud_volume_flushes_total{volume=\"vol1\"}"), 1.0);
    assert_eq!(get("dpud_volume_degraded{volume=\"vol1\"}"), 1.0);
    assert_eq!(get("dpud_volume_pending_repairs{volume=\"vol1\"}"), 2.0);
    // The histogram is cumulative, ends in +Inf and agrees with its count.
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("dpud_volume_write_latency_seconds_bucket{volume=\"vol1\""))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 17);
    let inf = get("dpud_volume_write_latency_seconds_bucket{volume=\"vol1\",le=\"+Inf\"}");
    assert_eq!(inf, 5.0);
    assert_eq!(
        get("dpud_volume_write_latency_seconds_count{volume=\"vol1\"}"),
        5.0
    );
    assert!(buckets.iter().all(|b| *b <= inf));
    assert!(get("dpud_volume_read_latency_seconds_sum{volume=\"vol1\"}") >= 0.0);
    // Nodes.
    assert_eq!(get("dpud_node_state{node=\"n0\",state=\"up\"}"), 1.0);
    assert_eq!(get("dpud_node_state{node=\"n1\",state=\"draining\"}"), 1.0);
    assert_eq!(get("dpud_node_state{node=\"n1\",state=\"up\"}"), 0.0);
    assert_eq!(get("dpud_node_reachable{node=\"n0\"}"), 0.0);
    assert_eq!(get("dpud_node_reachable{node=\"n1\"}"), 1.0);
    assert_eq!(get("dpud_node_errors_total{node=\"n0\"}"), 4.0);
    // The process.
    assert!(get("process_cpu_seconds_total") > 0.0);
    assert!(get("process_resident_memory_bytes") > 1_000_000.0);

    // Anything else is refused.
    let r = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    let r = http(addr, "garbage\r\n\r\n").await?;
    assert!(r.starts_with("HTTP/1.1 400") || r.is_empty(), "{r}");
    let again = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "still serving after bad requests"
    );

    d.handle.shutdown().await?;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed at shutdown"
    );
    Ok(())
}
