//! Baselines for `regress`: the median IOPS of each cell, stored per machine
//! (kernel version, CPU model, CPU count) so a run is only compared with its like.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::stats::{Cell, change};

/// What a baseline is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineKey {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
}

impl MachineKey {
    /// The running machine's key (from /proc).
    pub fn current() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let nproc = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        MachineKey { kernel, cpu_model, nproc }
    }

    /// File name of this key's baseline: `<kernel>__<cpu>__<n>cpu.json`, with
    /// anything but `[A-Za-z0-9.+-]` turned into `_`.
    pub fn file_name(&self) -> String {
        let clean = |s: &str| -> String {
            let t: String =
                s.chars().map(|c| if c.is_ascii_alphanumeric() || "+-.".contains(c) { c } else { '_' }).collect();
            let mut out = String::new();
            for c in t.chars() {
                if !(c == '_' && out.ends_with('_')) {
                    out.push(c);
                }
            }
            out.trim_matches('_').to_string()
        };
        format!("{}__{}__{}cpu.json", clean(&self.kernel), clean(&self.cpu_model), self.nproc)
    }
}

/// One cell of a baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineCell {
    pub workload: String,
    pub system: String,
    pub iops: f64,
    pub mbps: f64,
    pub p99_us: f64,
}

/// A stored baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub key: MachineKey,
    /// How it was measured (for the reader; not matched).
    pub runtime_s: u32,
    pub rounds: u32,
    pub backing: String,
    pub cells: Vec<BaselineCell>,
}

/// Why a baseline could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("no baseline for this machine: {path} does not exist (record one with `ubd-perf regress --update`)")]
    Missing { path: PathBuf },
    #[error("cannot read baseline {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("baseline {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("baseline {path} is for another machine ({theirs:?}, this is {ours:?})")]
    OtherMachine { path: PathBuf, theirs: Box<MachineKey>, ours: Box<MachineKey> },
}

impl Baseline {
    /// A baseline from a run's cells.
    pub fn from_cells(key: MachineKey, runtime_s: u32, rounds: u32, backing: &str, cells: &[Cell]) -> Self {
        let cells = cells
            .iter()
            .map(|c| BaselineCell {
                workload: c.workload.clone(),
                system: c.system.clone(),
                iops: c.iops,
                mbps: c.mbps,
                p99_us: c.p99_us,
            })
            .collect();
        Baseline { key, runtime_s, rounds, backing: backing.to_string(), cells }
    }

    /// Path of `key`'s baseline in `dir`.
    pub fn path_in(dir: &Path, key: &MachineKey) -> PathBuf {
        dir.join(key.file_name())
    }

    /// Loads `key`'s baseline from `dir`, checking that it is for that key.
    pub fn load(dir: &Path, key: &MachineKey) -> Result<Self, BaselineError> {
        let path = Self::path_in(dir, key);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BaselineError::Missing { path }),
            Err(source) => return Err(BaselineError::Io { path, source }),
        };
        let b: Baseline =
            serde_json::from_str(&text).map_err(|source| BaselineError::Parse { path: path.clone(), source })?;
        if &b.key != key {
            return Err(BaselineError::OtherMachine { path, theirs: Box::new(b.key), ours: Box::new(key.clone()) });
        }
        Ok(b)
    }

    /// Writes the baseline into `dir` under its key's file name; returns the path.
    pub fn save(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = Self::path_in(dir, &self.key);
        let mut text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        text.push('\n');
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// One cell's comparison with the baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delta {
    pub workload: String,
    pub system: String,
    pub baseline_iops: f64,
    pub iops: f64,
    /// Relative change of the median IOPS (-0.07 = 7% lower).
    pub change: f64,
    pub regressed: bool,
}

/// A run compared with a baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Comparison {
    pub deltas: Vec<Delta>,
    /// Cells of the run that the baseline does not have.
    pub new_cells: Vec<(String, String)>,
    /// Cells of the baseline that the run did not measure.
    pub missing_cells: Vec<(String, String)>,
}

impl Comparison {
    pub fn regressions(&self) -> impl Iterator<Item = &Delta> {
        self.deltas.iter().filter(|d| d.regressed)
    }
}

/// Compares `cells` with `base`: a cell regressed when its median IOPS is lower
/// than the baseline's by more than `threshold` (a fraction: 0.05 = 5%).
pub fn compare(base: &Baseline, cells: &[Cell], threshold: f64) -> Comparison {
    let mut out = Comparison::default();
    for c in cells {
        match base.cells.iter().find(|b| b.workload == c.workload && b.system == c.system) {
            Some(b) => {
                let ch = change(b.iops, c.iops).unwrap_or(0.0);
                out.deltas.push(Delta {
                    workload: c.workload.clone(),
                    system: c.system.clone(),
                    baseline_iops: b.iops,
                    iops: c.iops,
                    change: ch,
                    regressed: ch < -threshold,
                });
            }
            None => out.new_cells.push((c.workload.clone(), c.system.clone())),
        }
    }
    for b in &base.cells {
        if !cells.iter().any(|c| c.workload == b.workload && c.system == b.system) {
            out.missing_cells.push((b.workload.clone(), b.system.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::{Metrics, Side};
    use crate::stats::{Sample, summarize};

    fn key() -> MachineKey {
        MachineKey {
            kernel: "6.12.117+deb12-amd64".into(),
            cpu_model: "QEMU Virtual CPU version 2.5+".into(),
            nproc: 2,
        }
    }

    fn cells(scale: f64) -> Vec<Cell> {
        let mut s = Vec::new();
        for (w, sys, iops) in [("rr", "kloop", 1000.0), ("rr", "engine", 1200.0), ("sw", "engine", 300.0)] {
            for round in 0..3 {
                let side = Side { iops: scale * iops * (1.0 + f64::from(round) * 0.01), ios: 10, ..Side::default() };
                s.push(Sample {
                    workload: w.into(),
                    system: sys.into(),
                    round,
                    metrics: Metrics { read: side, write: Side::default(), server_cpu_us_per_io: None },
                });
            }
        }
        summarize(&s)
    }

    #[test]
    fn file_name_is_clean_and_keyed() {
        assert_eq!(key().file_name(), "6.12.117+deb12-amd64__QEMU_Virtual_CPU_version_2.5+__2cpu.json");
        let mut other = key();
        other.nproc = 4;
        assert_ne!(other.file_name(), key().file_name());
        assert!(!MachineKey::current().kernel.is_empty());
    }

    #[test]
    fn passes_on_its_own_baseline() {
        let c = cells(1.0);
        let b = Baseline::from_cells(key(), 10, 3, "/dev/ram0", &c);
        let r = compare(&b, &c, 0.05);
        assert_eq!(r.deltas.len(), 3);
        assert_eq!(r.regressions().count(), 0);
        assert!(r.deltas.iter().all(|d| d.change == 0.0));
    }

    #[test]
    fn fails_on_a_doctored_baseline() {
        let c = cells(1.0);
        let mut b = Baseline::from_cells(key(), 10, 3, "/dev/ram0", &c);
        for bc in &mut b.cells {
            bc.iops *= 1.5;
        }
        let r = compare(&b, &c, 0.05);
        assert_eq!(r.regressions().count(), 3);
        assert!(r.deltas.iter().all(|d| (d.change + 1.0 / 3.0).abs() < 1e-9));
        // A 4% drop is within a 5% threshold, a 6% drop is not.
        assert_eq!(compare(&Baseline::from_cells(key(), 10, 3, "x", &cells(1.04)), &c, 0.05).regressions().count(), 0);
        assert_eq!(compare(&Baseline::from_cells(key(), 10, 3, "x", &cells(1.07)), &c, 0.05).regressions().count(), 3);
        // Faster is never a regression.
        assert_eq!(compare(&Baseline::from_cells(key(), 10, 3, "x", &cells(0.5)), &c, 0.05).regressions().count(), 0);
    }

    #[test]
    fn new_and_missing_cells() {
        let c = cells(1.0);
        let mut b = Baseline::from_cells(key(), 10, 3, "/dev/ram0", &c[..2]);
        b.cells.push(BaselineCell {
            workload: "gone".into(),
            system: "kloop".into(),
            iops: 1.0,
            mbps: 0.0,
            p99_us: 0.0,
        });
        let r = compare(&b, &c, 0.05);
        assert_eq!(r.new_cells, vec![("sw".to_string(), "engine".to_string())]);
        assert_eq!(r.missing_cells, vec![("gone".to_string(), "kloop".to_string())]);
    }

    #[test]
    fn save_load_round_trip_and_key_check() {
        let dir = tempfile::tempdir().unwrap();
        let b = Baseline::from_cells(key(), 10, 3, "/dev/ram0", &cells(1.0));
        let path = b.save(dir.path()).unwrap();
        assert_eq!(path, dir.path().join(key().file_name()));
        assert_eq!(Baseline::load(dir.path(), &key()).unwrap(), b);
        let mut other = key();
        other.kernel = "7.2.13+deb14-amd64".into();
        assert!(matches!(Baseline::load(dir.path(), &other), Err(BaselineError::Missing { .. })));
        // A file under this key's name but holding another key is refused.
        std::fs::copy(&path, dir.path().join(other.file_name())).unwrap();
        let e = Baseline::load(dir.path(), &other).unwrap_err();
        assert!(matches!(e, BaselineError::OtherMachine { .. }), "{e}");
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(Baseline::load(dir.path(), &key()), Err(BaselineError::Parse { .. })));
    }
}
