//! `--metrics ADDR`: Prometheus text exposition at `http://ADDR/metrics`.
//!
//! The HTTP server (tiny_http) runs on threads of its own and reads only the last
//! [`DeviceStats`] the serving thread handed over (about once a second, from its stats
//! tick): a scrape never touches a queue thread or its counters. The text is written by
//! prometheus-client's encoder (Prometheus text format 0.0.4).

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use ubd_engine::{DeviceStats, ErrnoCounts, LatencySummary, StatsSnapshot};

/// What the metrics show besides the counters: the device and how it is served.
#[derive(Debug, Clone, Default)]
pub struct DeviceLabels {
    pub dev_id: u32,
    pub target: String,
    pub buffer_mode: String,
}

#[derive(Debug, Default)]
struct Shared {
    labels: Option<DeviceLabels>,
    stats: Option<DeviceStats>,
}

/// The running server; its threads end with the process.
#[derive(Debug)]
pub struct MetricsServer {
    shared: Arc<Mutex<Shared>>,
    addr: std::net::SocketAddr,
}

impl MetricsServer {
    /// Binds `addr` (HOST:PORT) and starts serving. Fails at once, naming the address,
    /// when it cannot be bound (in use, not a local address, bad syntax).
    pub fn start(addr: &str) -> Result<Self> {
        let sock: std::net::SocketAddr = addr
            .parse()
            .or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(addr)
                    .map_err(|e| e.to_string())
                    .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
            })
            .map_err(|e| anyhow::anyhow!("--metrics {addr:?}: expected HOST:PORT such as 127.0.0.1:9101 ({e})"))?;
        let listener = listen(sock).map_err(|e| anyhow::anyhow!("--metrics {addr}: cannot listen: {e}"))?;
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| anyhow::anyhow!("--metrics {addr}: cannot serve: {e}"))?;
        let bound = server.server_addr().to_ip().unwrap_or(sock);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve_http(&server, &s))
            .context("starting the metrics thread")?;
        Ok(Self { shared, addr: bound })
    }

    /// The address it listens on (the port the kernel chose, for port 0).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn set_labels(&self, labels: DeviceLabels) {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).labels = Some(labels);
    }

    pub fn update(&self, stats: &DeviceStats) {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).stats = Some(stats.clone());
    }
}

/// A listening TCP socket with SO_REUSEPORT (and SO_REUSEADDR): during `upgrade` the new
/// daemon binds the address while the old one still serves it (both answer scrapes for
/// that moment, with their own counters). Any other holder of the port (one without
/// SO_REUSEPORT, or another user's) still makes this fail with EADDRINUSE.
fn listen(sock: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = if sock.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &sock)?;
    rustix::net::listen(&fd, 64)?;
    Ok(std::net::TcpListener::from(fd))
}
fn serve_http(server: &tiny_http::Server, shared: &Arc<Mutex<Shared>>) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let resp = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => {
                let (labels, stats) = {
                    let s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    (s.labels.clone(), s.stats.clone())
                };
                let body = render(labels.as_ref(), stats.as_ref());
                let ct = tiny_http::Header::from_bytes(
                    "Content-Type",
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                )
                .unwrap_or_else(|()| unreachable!("a constant header"));
                tiny_http::Response::from_string(body).with_header(ct)
            }
            (tiny_http::Method::Get, "/") => tiny_http::Response::from_string("ubd-engine: see /metrics\n"),
            _ => tiny_http::Response::from_string("not found: see /metrics\n").with_status_code(404),
        };
        if let Err(e) = req.respond(resp) {
            tracing::debug!("metrics: answering a scrape failed: {e}");
        }
    }
}

/// The exposition text of one snapshot.
pub fn render(labels: Option<&DeviceLabels>, stats: Option<&DeviceStats>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { labels: labels.cloned(), stats: stats.cloned() }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Snapshot {
    labels: Option<DeviceLabels>,
    stats: Option<DeviceStats>,
}

type Labels = Vec<(&'static str, String)>;

const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

fn op_counts(s: &StatsSnapshot) -> [u64; 5] {
    let c = &s.counters;
    [c.reads, c.writes, c.flushes, c.discards, c.write_zeroes]
}

/// One family: `rows` are (labels, value) pairs.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut rows = rows.into_iter().peekable();
    let Some((_, first)) = rows.peek() else { return Ok(()) };
    let mut m = enc.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in rows {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histogram_family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, &LatencySummary)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, l) in rows {
        let mut buckets: Vec<(f64, u64)> = if l.buckets.len() == LatencySummary::BUCKETS_S.len() {
            LatencySummary::BUCKETS_S.iter().copied().zip(l.buckets.iter().copied()).collect()
        } else {
            // No requests yet (or a summary without buckets): every bucket is empty.
            LatencySummary::BUCKETS_S.iter().map(|&b| (b, 0)).collect()
        };
        buckets.push((f64::INFINITY, l.count));
        // The text encoder takes per-bucket counts and accumulates them itself.
        let mut prev = 0;
        for b in &mut buckets {
            let cum = b.1.max(prev);
            b.1 = cum - prev;
            prev = cum;
        }
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(l.sum_s, l.count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (Some(info), Some(stats)) = (&self.labels, &self.stats) else {
            // Not serving yet: nothing but the fact.
            return family(
                &mut enc,
                "ubd_up",
                "1 when the device is served, 0 while it is being set up",
                [(Vec::new(), ConstGauge::new(0i64))],
            );
        };
        let dev = info.dev_id.to_string();
        family(
            &mut enc,
            "ubd_up",
            "1 when the device is served, 0 while it is being set up",
            [(vec![("device", dev.clone())], ConstGauge::new(1i64))],
        )?;
        family(
            &mut enc,
            "ubd_device_info",
            "The served device: its target and buffer mode",
            [(
                vec![
                    ("device", dev.clone()),
                    ("target", info.target.clone()),
                    ("buffer_mode", info.buffer_mode.clone()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                ConstGauge::new(1i64),
            )],
        )?;
        family(
            &mut enc,
            "ubd_uptime_seconds",
            "Seconds since this daemon started serving the device",
            [(vec![("device", dev.clone())], ConstGauge::new(stats.uptime_s))],
        )?;
        // Totals (device) and per queue: the same counters, two families each, so that a
        // sum over queues never counts a total twice.
        let queues: Vec<(String, &StatsSnapshot)> =
            stats.queues.iter().enumerate().map(|(i, q)| (i.to_string(), q)).collect();
        let scopes: [(&str, Vec<(Labels, &StatsSnapshot)>); 2] = [
            ("ubd", vec![(vec![("device", dev.clone())], &stats.total)]),
            (
                "ubd_queue",
                queues.iter().map(|(q, s)| (vec![("device", dev.clone()), ("queue", q.clone())], *s)).collect(),
            ),
        ];
        for (prefix, rows) in &scopes {
            let per = if *prefix == "ubd" { "" } else { " of one queue" };
            family(
                &mut enc,
                &format!("{prefix}_requests"),
                &format!("Requests completed successfully{per}, by op"),
                rows.iter().flat_map(|(l, s)| {
                    OPS.iter().zip(op_counts(s)).map(move |(op, n)| (with(l, "op", op), ConstCounter::new(n)))
                }),
            )?;
            family(
                &mut enc,
                &format!("{prefix}_shmem_zc_requests"),
                &format!(
                    "Reads and writes{per} whose data was in the device's shared memory (UBLK_F_SHMEM_ZC): served with no copy"
                ),
                rows.iter().map(|(l, s)| (l.clone(), ConstCounter::new(s.counters.shmem_zc))),
            )?;
            family(
                &mut enc,
                &format!("{prefix}_bytes"),
                &format!("Bytes read and written{per}"),
                rows.iter().flat_map(|(l, s)| {
                    [("read", s.counters.bytes_read), ("write", s.counters.bytes_written)]
                        .map(|(op, n)| (with(l, "op", op), ConstCounter::new(n)))
                }),
            )?;
            family(
                &mut enc,
                &format!("{prefix}_errors"),
                &format!("Requests that failed{per}, by errno (other: any errno not named)"),
                rows.iter().flat_map(|(l, s)| {
                    ErrnoCounts::iter(&s.counters.errors_by_errno)
                        .map(move |(e, n)| (with(l, "errno", e), ConstCounter::new(n)))
                        .collect::<Vec<_>>()
                }),
            )?;
            family(
                &mut enc,
                &format!("{prefix}_inflight"),
                &format!("Requests in the target now{per}"),
                rows.iter()
                    .map(|(l, s)| (l.clone(), ConstGauge::new(i64::try_from(s.counters.inflight).unwrap_or(i64::MAX)))),
            )?;
            let lat: Vec<(Labels, &LatencySummary)> = rows
                .iter()
                .flat_map(|(l, s)| {
                    [("read", &s.read_latency), ("write", &s.write_latency), ("other", &s.other_latency)]
                        .map(|(op, h)| (with(l, "op", op), h))
                })
                .collect();
            histogram_family(
                &mut enc,
                &format!("{prefix}_request_duration_seconds"),
                &format!("Time a request spent in the engine and target{per} (other: flush, discard, write zeroes)"),
                &lat,
            )?;
        }
        Ok(())
    }
}

fn with(l: &Labels, k: &'static str, v: &str) -> Labels {
    let mut l = l.clone();
    l.push((k, v.to_string()));
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceStats {
        let mut q = StatsSnapshot::default();
        q.counters.reads = 10;
        q.counters.writes = 4;
        q.counters.bytes_read = 40960;
        q.counters.errors = 3;
        q.counters.errors_by_errno.add(libc::EIO);
        q.counters.errors_by_errno.add(libc::EIO);
        q.counters.errors_by_errno.add(libc::EXDEV);
        q.counters.inflight = 2;
        q.read_latency = LatencySummary {
            count: 10,
            sum_s: 0.002,
            buckets: [0, 5, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10].to_vec(),
            ..Default::default()
        };
        DeviceStats {
            dev_id: 3,
            uptime_s: 5.0,
            total: q.clone(),
            queues: vec![q.clone(), StatsSnapshot::default()],
            ..Default::default()
        }
    }

    #[test]
    fn exposition_has_counters_and_histograms() {
        let labels = DeviceLabels { dev_id: 3, target: "loop".into(), buffer_mode: "copy".into() };
        let text = render(Some(&labels), Some(&sample()));
        for want in [
            "# TYPE ubd_requests_total counter",
            r#"ubd_requests_total{device="3",op="read"} 10"#,
            r#"ubd_queue_requests_total{device="3",queue="0",op="write"} 4"#,
            r#"ubd_queue_requests_total{device="3",queue="1",op="read"} 0"#,
            r#"ubd_bytes_total{device="3",op="read"} 40960"#,
            r#"ubd_errors_total{device="3",errno="EIO"} 2"#,
            r#"ubd_errors_total{device="3",errno="other"} 1"#,
            r#"ubd_inflight{device="3"} 2"#,
            "# TYPE ubd_request_duration_seconds histogram",
            r#"ubd_request_duration_seconds_bucket{device="3",op="read",le="1e-05"} 0"#,
            r#"ubd_request_duration_seconds_bucket{device="3",op="read",le="2.5e-05"} 5"#,
            r#"ubd_request_duration_seconds_bucket{device="3",op="read",le="5e-05"} 9"#,
            r#"ubd_request_duration_seconds_bucket{device="3",op="read",le="+Inf"} 10"#,
            r#"ubd_request_duration_seconds_count{device="3",op="read"} 10"#,
            r#"ubd_request_duration_seconds_sum{device="3",op="read"} 0.002"#,
            r#"ubd_request_duration_seconds_bucket{device="3",op="write",le="+Inf"} 0"#,
            r#"ubd_device_info{device="3",target="loop",buffer_mode="copy","#,
            r#"ubd_up{device="3"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }

    #[test]
    fn before_the_device_starts_only_up_is_shown() {
        let text = render(None, None);
        assert!(text.contains("ubd_up 0"), "{text}");
        assert!(!text.contains("ubd_requests"), "{text}");
    }

    #[test]
    fn an_address_in_use_is_a_clear_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let e = format!("{:#}", MetricsServer::start(&addr).unwrap_err());
        assert!(e.starts_with(&format!("--metrics {addr}: cannot listen: ")), "{e}");
        assert!(!e.contains('\n'));
        let e = format!("{:#}", MetricsServer::start("localhost").unwrap_err());
        assert!(e.starts_with("--metrics \"localhost\": expected HOST:PORT"), "{e}");
    }

    #[test]
    fn a_successor_binds_the_address_while_the_old_daemon_serves_it() {
        // upgrade: both daemons hold the address for a moment.
        let old = MetricsServer::start("127.0.0.1:0").unwrap();
        let new = MetricsServer::start(&old.addr().to_string()).unwrap();
        assert_eq!(new.addr(), old.addr());
        assert!(get(new.addr(), "/metrics").contains("ubd_up"));
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn scrape_over_http() {
        let m = MetricsServer::start("127.0.0.1:0").unwrap();
        assert!(m.addr().ip().is_loopback());
        let before = get(m.addr(), "/metrics");
        assert!(before.starts_with("HTTP/1.") && before.contains(" 200 "), "{before}");
        assert!(before.contains("ubd_up 0"), "{before}");
        m.set_labels(DeviceLabels { dev_id: 3, target: "loop".into(), buffer_mode: "copy".into() });
        m.update(&sample());
        let after = get(m.addr(), "/metrics?x=1");
        assert!(after.contains("text/plain; version=0.0.4"), "{after}");
        assert!(after.contains(r#"ubd_requests_total{device="3",op="read"} 10"#), "{after}");
        assert!(get(m.addr(), "/nope").contains(" 404 "));
    }
}
