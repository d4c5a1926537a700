//! fio's JSON output (`--output-format=json`): per-direction IOPS, bandwidth and
//! completion-latency percentiles, summed over the jobs of one run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a fio output could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FioError {
    /// No `{` in the output at all (fio printed only an error, or nothing).
    #[error("fio printed no JSON (first line: {0:?})")]
    NoJson(String),
    /// The JSON did not have the expected shape.
    #[error("fio JSON could not be parsed: {0}")]
    Json(#[from] serde_json::Error),
    /// `jobs` was empty.
    #[error("fio JSON has no jobs")]
    NoJobs,
    /// A job reported a non-zero error code.
    #[error("fio job {job:?} failed with error {error} ({})", std::io::Error::from_raw_os_error(*error))]
    Job { job: String, error: i32 },
    /// The run did no IO at all.
    #[error("fio did no IO (jobs: {0})")]
    NoIo(String),
}

#[derive(Debug, Deserialize)]
struct RawOutput {
    #[serde(default)]
    jobs: Vec<RawJob>,
}

#[derive(Debug, Deserialize)]
struct RawJob {
    jobname: String,
    #[serde(default)]
    error: i32,
    read: RawDir,
    write: RawDir,
}

#[derive(Debug, Deserialize)]
struct RawDir {
    #[serde(default)]
    bw_bytes: f64,
    #[serde(default)]
    iops: f64,
    #[serde(default)]
    total_ios: u64,
    #[serde(default)]
    clat_ns: RawClat,
}

#[derive(Debug, Default, Deserialize)]
struct RawClat {
    #[serde(default)]
    mean: f64,
    /// Keys like `"99.900000"`.
    #[serde(default)]
    percentile: BTreeMap<String, f64>,
}

impl RawClat {
    fn pct(&self, p: f64) -> f64 {
        self.percentile
            .iter()
            .find(|(k, _)| k.parse::<f64>().is_ok_and(|v| (v - p).abs() < 1e-6))
            .map_or(0.0, |(_, v)| *v)
    }
}

/// One direction (read or write) of a fio run, summed over its jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// IOs per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// IOs completed (the weight for merging latencies).
    pub ios: u64,
    /// Mean completion latency, ns.
    pub clat_mean_ns: f64,
    /// Completion latency percentiles, ns.
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
}

impl Side {
    fn from_raw(d: &RawDir) -> Self {
        Side {
            iops: d.iops,
            bw_bytes: d.bw_bytes,
            ios: d.total_ios,
            clat_mean_ns: d.clat_ns.mean,
            p50_ns: d.clat_ns.pct(50.0),
            p99_ns: d.clat_ns.pct(99.0),
            p999_ns: d.clat_ns.pct(99.9),
        }
    }

    /// Adds another job's side: rates add up; latencies are averaged weighted by
    /// IO count. That is exact for means and an approximation for percentiles
    /// (fio merges histograms exactly with `group_reporting`, which the job files
    /// under perf/jobs use, so there is then only one job to merge).
    #[must_use]
    pub fn merge(self, o: Side) -> Side {
        let total = self.ios + o.ios;
        #[allow(clippy::cast_precision_loss)]
        let w = |a: f64, b: f64| {
            if total == 0 { 0.0 } else { (a * self.ios as f64 + b * o.ios as f64) / total as f64 }
        };
        Side {
            iops: self.iops + o.iops,
            bw_bytes: self.bw_bytes + o.bw_bytes,
            ios: total,
            clat_mean_ns: w(self.clat_mean_ns, o.clat_mean_ns),
            p50_ns: w(self.p50_ns, o.p50_ns),
            p99_ns: w(self.p99_ns, o.p99_ns),
            p999_ns: w(self.p999_ns, o.p999_ns),
        }
    }
}

/// A whole fio run: both directions, all jobs summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub read: Side,
    pub write: Side,
    /// CPU time of the serving process (the engine, a peer's daemon, rbd-nbd) per IO,
    /// µs, over the run (ramp included, with the IOs it is taken to have done at the
    /// run's rate). None for kernel clients, which have no process of their own.
    #[serde(default)]
    pub server_cpu_us_per_io: Option<f64>,
}

impl Metrics {
    /// Read plus write IOPS.
    pub fn iops(&self) -> f64 {
        self.read.iops + self.write.iops
    }

    /// Read plus write bandwidth, MB/s (10^6 bytes).
    pub fn mbps(&self) -> f64 {
        (self.read.bw_bytes + self.write.bw_bytes) / 1e6
    }

    /// The direction that did most IOs (its latencies are the ones reported in
    /// tables: reads for a 70/30 mix).
    pub fn main_side(&self) -> &Side {
        if self.write.ios > self.read.ios { &self.write } else { &self.read }
    }
}

/// Parses fio's JSON output. Text before the JSON object (fio prints warnings
/// such as "fio: file hash not empty on exit" on stdout) is skipped.
pub fn parse(text: &str) -> Result<Metrics, FioError> {
    let start = if text.starts_with('{') { Some(0) } else { text.find("\n{").map(|i| i + 1) };
    let start = start.ok_or_else(|| FioError::NoJson(text.lines().next().unwrap_or("").to_string()))?;
    let mut de = serde_json::Deserializer::from_str(&text[start..]);
    let raw = RawOutput::deserialize(&mut de)?;
    if raw.jobs.is_empty() {
        return Err(FioError::NoJobs);
    }
    let mut m = Metrics::default();
    for j in &raw.jobs {
        if j.error != 0 {
            return Err(FioError::Job { job: j.jobname.clone(), error: j.error });
        }
        m.read = m.read.merge(Side::from_raw(&j.read));
        m.write = m.write.merge(Side::from_raw(&j.write));
    }
    if m.read.ios + m.write.ios == 0 {
        let names: Vec<&str> = raw.jobs.iter().map(|j| j.jobname.as_str()).collect();
        return Err(FioError::NoIo(names.join(", ")));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn single_job_randread() {
        let m = parse(&fixture("randread-1job.json")).unwrap();
        assert!(m.read.iops > 1000.0);
        assert_eq!(m.write.ios, 0);
        assert_eq!(m.write.iops, 0.0);
        assert!(m.read.p50_ns > 0.0 && m.read.p50_ns <= m.read.p99_ns && m.read.p99_ns <= m.read.p999_ns);
        // 4k blocks: bandwidth = 4096 * IOPS, within rounding.
        assert!((m.read.bw_bytes / m.read.iops - 4096.0).abs() < 8.0);
        assert_eq!(m.main_side(), &m.read);
    }

    #[test]
    fn mixed_randrw_has_both_sides() {
        let m = parse(&fixture("randrw-70-30.json")).unwrap();
        assert!(m.read.ios > 0 && m.write.ios > 0);
        let share = m.read.iops / m.iops();
        assert!((0.6..0.8).contains(&share), "read share {share}");
        assert!(m.write.p99_ns > 0.0);
        assert_eq!(m.main_side(), &m.read);
        assert!((m.mbps() * 1e6 - (m.read.bw_bytes + m.write.bw_bytes)).abs() < 1.0);
    }

    #[test]
    fn two_jobs_are_summed() {
        let text = fixture("randwrite-2jobs.json");
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        let jobs = raw["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 2);
        let want: f64 = jobs.iter().map(|j| j["write"]["iops"].as_f64().unwrap()).sum();
        let m = parse(&text).unwrap();
        assert!((m.write.iops - want).abs() < 1e-6);
        let ios: u64 = jobs.iter().map(|j| j["write"]["total_ios"].as_u64().unwrap()).sum();
        assert_eq!(m.write.ios, ios);
        let p99: Vec<f64> =
            jobs.iter().map(|j| j["write"]["clat_ns"]["percentile"]["99.000000"].as_f64().unwrap()).collect();
        let lo = p99.iter().copied().fold(f64::MAX, f64::min);
        let hi = p99.iter().copied().fold(0.0, f64::max);
        assert!(m.write.p99_ns >= lo && m.write.p99_ns <= hi);
        assert_eq!(m.main_side(), &m.write);
    }

    #[test]
    fn group_reporting_is_one_job() {
        let text = fixture("randread-2jobs-group.json");
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(raw["jobs"].as_array().unwrap().len(), 1);
        let m = parse(&text).unwrap();
        assert_eq!(m.read.iops, raw["jobs"][0]["read"]["iops"].as_f64().unwrap());
        assert_eq!(m.read.p999_ns, raw["jobs"][0]["read"]["clat_ns"]["percentile"]["99.900000"].as_f64().unwrap());
    }

    #[test]
    fn leading_warning_lines_are_skipped() {
        let text = format!("fio: file hash not empty on exit\n{}", fixture("randread-1job.json"));
        parse(&text).unwrap();
    }

    #[test]
    fn bad_outputs_are_errors() {
        assert!(matches!(parse(""), Err(FioError::NoJson(_))));
        assert!(matches!(parse("fio: pid=0, err=2/file:filesetup.c"), Err(FioError::NoJson(_))));
        assert!(matches!(parse("{\"jobs\": []}"), Err(FioError::NoJobs)));
        assert!(matches!(parse("{\"jobs\": 3}"), Err(FioError::Json(_))));
        let mut v: serde_json::Value = serde_json::from_str(&fixture("randread-1job.json")).unwrap();
        v["jobs"][0]["error"] = 5.into();
        let e = parse(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("error 5"), "{e}");
        v["jobs"][0]["error"] = 0.into();
        v["jobs"][0]["read"]["total_ios"] = 0.into();
        assert!(matches!(parse(&v.to_string()), Err(FioError::NoIo(_))));
    }
}
