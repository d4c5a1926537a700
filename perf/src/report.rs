//! Output files of a run: results.json, results.csv and report.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::baseline::MachineKey;
use crate::stats::{Cell, Sample};

/// How and where a run was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub machine: MachineKey,
    pub backing: String,
    pub backing_size: u64,
    pub runtime_s: u32,
    pub ramp_s: u32,
    pub rounds: u32,
    pub queues: u32,
    pub depth: u32,
    pub cpus: Option<String>,
    pub systems: Vec<String>,
    pub workloads: Vec<String>,
    /// The kernel's ublk feature names (from `ubd-engine features --json`).
    pub ublk_features: Vec<String>,
    /// Seconds since the Unix epoch at the start.
    pub started: u64,
    /// `fio --version` and `ubd-engine --version`, as printed.
    #[serde(default)]
    pub fio_version: String,
    #[serde(default)]
    pub engine_version: String,
}

/// Everything a run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub info: RunInfo,
    pub cells: Vec<Cell>,
    pub samples: Vec<Sample>,
}

/// The CSV header; one row per cell follows.
pub const CSV_HEADER: &str = "workload,system,rounds,iops_median,iops_min,iops_max,spread_pct,mbps_median,p50_us,p99_us,p999_us,ratio_kloop,cpu_us_per_io";

/// The cells as CSV.
pub fn csv(cells: &[Cell]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for c in cells {
        let ratio = c.ratio_kloop.map_or(String::new(), |r| format!("{r:.3}"));
        let cpu = c.cpu_us_per_io.map_or(String::new(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            "{},{},{},{:.0},{:.0},{:.0},{:.1},{:.1},{:.1},{:.1},{:.1},{},{}",
            c.workload,
            c.system,
            c.n,
            c.iops,
            c.iops_min,
            c.iops_max,
            c.spread * 100.0,
            c.mbps,
            c.p50_us,
            c.p99_us,
            c.p999_us,
            ratio,
            cpu
        );
    }
    s
}

/// `12345.6` as `12.3k`, `1234567` as `1.23M`.
pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// One Markdown table per workload.
pub fn markdown_tables(cells: &[Cell]) -> String {
    let mut s = String::new();
    let mut workloads: Vec<&str> = Vec::new();
    for c in cells {
        if !workloads.contains(&c.workload.as_str()) {
            workloads.push(&c.workload);
        }
    }
    for w in workloads {
        let _ = writeln!(s, "### {w}\n");
        s.push_str(
            "| system | IOPS (median) | spread | MB/s | p50 µs | p99 µs | p99.9 µs | × ref | server CPU µs/IO |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in cells.iter().filter(|c| c.workload == w) {
            let ratio = c.ratio_kloop.map_or("–".to_string(), |r| format!("{r:.2}"));
            let cpu = c.cpu_us_per_io.map_or("–".to_string(), |v| format!("{v:.0}"));
            let _ = writeln!(
                s,
                "| {} | {} | {:.0}% | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} |",
                c.system,
                human(c.iops),
                c.spread * 100.0,
                c.mbps,
                c.p50_us,
                c.p99_us,
                c.p999_us,
                ratio,
                cpu
            );
        }
        s.push('\n');
    }
    s
}

/// The whole report.md.
pub fn markdown(r: &Results) -> String {
    let i = &r.info;
    let mut s = String::from("# ubd-perf compare\n\n");
    let _ = writeln!(
        s,
        "Kernel {}, {} × {}; backing {} ({} MiB); fio {} s (+{} s ramp) per cell, {} round(s), median shown; \
         engines and peers with {} queues × depth {}{}; {}, {}.\n",
        i.machine.kernel,
        i.machine.nproc,
        i.machine.cpu_model,
        i.backing,
        i.backing_size >> 20,
        i.runtime_s,
        i.ramp_s,
        i.rounds,
        i.queues,
        i.depth,
        i.cpus.as_ref().map_or(String::new(), |c| format!(" on CPUs {c}")),
        i.fio_version,
        if i.engine_version.is_empty() { "ubd-engine version unknown" } else { &i.engine_version },
    );
    s.push_str(
        "spread = (max − min) / median of IOPS over the rounds; latencies are fio's completion latency \
         (clat) of the main direction (reads for a mix), medians over the rounds; × ref = median IOPS over \
         the kernel loop driver's (`losetup --direct-io=on`) on the same backing, or for the nbd systems over \
         the kernel NBD client's (`knbd-tcp`, `knbd-unix`: nbd-client, as many connections) of the same nbdkit \
         server.\n\n",
    );
    s.push_str(&markdown_tables(&r.cells));
    s
}

/// Writes results.json, results.csv and report.md into `dir`.
pub fn write_all(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    w("results.json", serde_json::to_string_pretty(r)? + "\n")?;
    w("results.csv", csv(&r.cells))?;
    w("report.md", markdown(r))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::fio::{Metrics, Side};
    use crate::stats::summarize;

    pub(crate) fn results() -> Results {
        let mut samples = Vec::new();
        for (w, sys, iops) in [("rr", "kloop", 1000.0), ("rr", "engine-loop", 1500.0), ("sw", "kloop", 50.0)] {
            let side = Side {
                iops,
                bw_bytes: iops * 4096.0,
                ios: 9,
                p50_ns: 2e4,
                p99_ns: 5e4,
                p999_ns: 9e4,
                ..Side::default()
            };
            samples.push(Sample {
                workload: w.into(),
                system: sys.into(),
                round: 0,
                metrics: Metrics { read: side, write: Side::default(), server_cpu_us_per_io: None },
            });
        }
        let cells = summarize(&samples);
        Results {
            info: RunInfo {
                machine: MachineKey { kernel: "6.12".into(), cpu_model: "cpu".into(), nproc: 2 },
                backing: "/dev/ram0".into(),
                backing_size: 512 << 20,
                runtime_s: 5,
                ramp_s: 1,
                rounds: 1,
                queues: 2,
                depth: 64,
                cpus: None,
                systems: vec!["kloop".into(), "engine-loop".into()],
                workloads: vec!["rr".into(), "sw".into()],
                ublk_features: vec![],
                started: 0,
                fio_version: "fio-3.33".into(),
                engine_version: String::new(),
            },
            cells,
            samples,
        }
    }

    #[test]
    fn csv_rows_and_markdown_tables() {
        let r = results();
        let c = csv(&r.cells);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "rr,engine-loop,1,1500,1500,1500,0.0,6.1,20.0,50.0,90.0,1.500,");
        assert!(lines.iter().all(|l| l.split(',').count() == 13));
        let md = markdown(&r);
        assert!(md.contains("### rr\n") && md.contains("### sw\n"));
        assert!(md.contains("| engine-loop | 1500 | 0% | 6.1 | 20 | 50 | 90 | 1.50 | – |"), "{md}");
        assert!(md.contains("Kernel 6.12, 2 × cpu; backing /dev/ram0 (512 MiB)"));
        assert_eq!(human(1234.0), "1234");
        assert_eq!(human(45678.0), "45.7k");
        assert_eq!(human(2_345_678.0), "2.35M");
    }

    #[test]
    fn files_are_written_and_json_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let r = results();
        write_all(dir.path(), &r).unwrap();
        for f in ["results.json", "results.csv", "report.md"] {
            assert!(dir.path().join(f).metadata().unwrap().len() > 0, "{f}");
        }
        let back: Results =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
