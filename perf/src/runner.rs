//! Workloads (fio job files), preflight checks, the backing device, and the
//! round-robin loop that measures every (workload, system) cell.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::fio::{self, Metrics};
use crate::stats::Sample;
use crate::systems::{self, EngineOpts, Env, System};

/// Set by the binary's SIGINT/SIGTERM handler: the matrix stops after the
/// current fio run, and every started system is torn down on the way out.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Fails once SIGINT or SIGTERM was received.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; stopped every system started");
    }
    Ok(())
}

/// A workload: a fio job file that reads its target from `${DEV}` and its
/// timing from `${RUNTIME}` and `${RAMP}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The file's stem, e.g. `randread-4k-qd64-2j`.
    pub name: String,
    pub path: PathBuf,
}

impl Workload {
    /// Whether the job file writes (an `rw=`/`readwrite=` other than read or
    /// randread), i.e. destroys what the target holds.
    pub fn writes(&self) -> Result<bool> {
        let text =
            std::fs::read_to_string(&self.path).with_context(|| format!("cannot read {}", self.path.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().split_once('='))
            .any(|(k, v)| matches!(k.trim(), "rw" | "readwrite") && !matches!(v.trim(), "read" | "randread")))
    }
}

/// The job files (`*.fio`) in `dir`, by name; `only` keeps those named (in that order).
pub fn load_workloads(dir: &Path, only: &[String]) -> Result<Vec<Workload>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read the job dir {}", dir.display()))?;
    let mut all = Vec::new();
    for e in rd {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "fio")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            all.push(Workload { name: stem.to_string(), path: path.clone() });
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    if all.is_empty() {
        bail!("no fio job files (*.fio) in {}", dir.display());
    }
    if only.is_empty() {
        return Ok(all);
    }
    only.iter()
        .map(|n| {
            all.iter().find(|w| &w.name == n).cloned().ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
                anyhow::anyhow!("unknown workload {n:?} (in {}: {})", dir.display(), names.join(", "))
            })
        })
        .collect()
}

/// fio's timing for one run, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub runtime: u32,
    pub ramp: u32,
}

/// Runs one workload on `dev` and parses the result.
/// `iomem`: where fio's buffers are (job files that read `${IOMEM}`; None: malloc).
pub fn run_fio(w: &Workload, dev: &Path, t: Timing, iomem: Option<&str>) -> Result<Metrics> {
    let out = Command::new("fio")
        .arg("--output-format=json")
        .arg(&w.path)
        .env("DEV", dev)
        .env("IOMEM", iomem.unwrap_or("malloc"))
        .env("RUNTIME", t.runtime.to_string())
        .env("RAMP", t.ramp.to_string())
        .output()
        .context("cannot run fio")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().chain(stdout.lines()).find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("fio {} on {} failed ({}): {}", w.name, dev.display(), out.status, line.trim());
    }
    fio::parse(&stdout).with_context(|| format!("fio {} on {}", w.name, dev.display()))
}

/// Fails with one line when fio is not installed.
pub fn check_fio() -> Result<()> {
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("fio is not installed or not on PATH (apt-get install fio)"),
    }
}

/// Makes sure /dev/ublk-control exists (loading ublk_drv if needed), or fails with one line.
pub fn check_ublk() -> Result<()> {
    let ctl = Path::new("/dev/ublk-control");
    if !ctl.exists() {
        let _ = Command::new("modprobe").arg("ublk_drv").output();
    }
    if !ctl.exists() {
        bail!(
            "ublk is not available: /dev/ublk-control does not exist and `modprobe ublk_drv` did not create it \
             (kernel {}); run inside the test VM with --vm",
            crate::baseline::MachineKey::current().kernel
        );
    }
    Ok(())
}

/// The backing device: `given`, else a brd RAM disk /dev/ram0 of `size_mib`,
/// loaded with `modprobe brd` when absent and written once through so that
/// reads hit allocated pages.
pub fn prepare_backing(given: Option<&Path>, size_mib: u64) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.exists() {
            bail!("backing {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let ram = PathBuf::from("/dev/ram0");
    if !ram.exists() {
        let kib = size_mib * 1024;
        systems::run(Command::new("modprobe").args(["brd", "rd_nr=1", &format!("rd_size={kib}")]))
            .context("cannot create a brd RAM disk as backing (or give --backing)")?;
        systems::run(Command::new("dd").args([
            "if=/dev/zero",
            "of=/dev/ram0",
            "bs=1M",
            &format!("count={size_mib}"),
            "oflag=direct",
            "status=none",
        ]))?;
    }
    Ok(ram)
}

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ: 100 in Linux's ABI).
const USER_HZ: f64 = 100.0;

/// utime + stime of process `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU µs per IO from two tick counts around a run of `iops` over ramp + runtime.
fn cpu_per_io(before: Option<u64>, after: Option<u64>, iops: f64, t: Timing) -> Option<f64> {
    let (b, a) = (before?, after?);
    let ios = iops * f64::from(t.runtime + t.ramp);
    #[allow(clippy::cast_precision_loss)]
    let cpu_s = a.checked_sub(b)? as f64 / USER_HZ;
    (ios > 0.0).then(|| cpu_s * 1e6 / ios)
}

/// Runs `rounds` rounds; in each, every system is started once, runs every
/// workload, and is stopped. The system order rotates from round to round so no
/// system always runs first. `on_sample` sees each result as it comes.
pub fn run_matrix(
    env: &Env,
    eo: &EngineOpts,
    systems: &[System],
    workloads: &[Workload],
    t: Timing,
    rounds: u32,
    on_sample: &mut dyn FnMut(&Sample),
) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let n = systems.len();
        for i in 0..n {
            check_interrupted()?;
            let sys = &systems[(i + round as usize) % n];
            let running =
                systems::start(sys, env, eo).with_context(|| format!("starting {} (round {})", sys.name, round + 1))?;
            for w in workloads {
                check_interrupted()?;
                let pid = running.server_pid();
                let before = pid.and_then(cpu_ticks);
                let metrics = run_fio(w, &running.dev, t, running.iomem.as_deref().or(env.fio_iomem.as_deref()));
                let after = pid.and_then(cpu_ticks);
                check_interrupted()?;
                let mut metrics = metrics.with_context(|| format!("system {}", sys.name))?;
                metrics.server_cpu_us_per_io = cpu_per_io(before, after, metrics.iops(), t);
                let s = Sample { workload: w.name.clone(), system: sys.name.clone(), round, metrics };
                on_sample(&s);
                samples.push(s);
            }
            running.stop().with_context(|| format!("stopping {}", sys.name))?;
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_of_this_process_and_per_io() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert_eq!(cpu_ticks(u32::MAX), None);
        let t = Timing { runtime: 8, ramp: 2 };
        // 50 ticks = 0.5 s over 10 s at 1000 IOPS: 50 µs per IO.
        assert_eq!(cpu_per_io(Some(100), Some(150), 1000.0, t), Some(50.0));
        assert_eq!(cpu_per_io(None, Some(150), 1000.0, t), None);
        assert_eq!(cpu_per_io(Some(1), Some(2), 0.0, t), None);
    }

    #[test]
    fn default_jobs_are_the_five_workloads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let w = load_workloads(&dir, &[]).unwrap();
        let names: Vec<&str> = w.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "randread-4k-qd1",
                "randread-4k-qd64-2j",
                "randrw-16k-70-30-qd32",
                "randwrite-4k-qd64-2j",
                "seqread-128k-qd16"
            ]
        );
        for w in &w {
            let text = std::fs::read_to_string(&w.path).unwrap();
            for var in ["${DEV}", "${RUNTIME}", "${RAMP}", "group_reporting=1", "direct=1"] {
                assert!(text.contains(var), "{} lacks {var}", w.name);
            }
        }
        let writes: Vec<bool> = w.iter().map(|w| w.writes().unwrap()).collect();
        assert_eq!(writes, [false, false, true, true, false]);
        let one = load_workloads(&dir, &["randread-4k-qd1".into()]).unwrap();
        assert_eq!(one.len(), 1);
        let e = load_workloads(&dir, &["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown workload \"nope\""), "{e}");
        load_workloads(Path::new("/no/such/dir"), &[]).unwrap_err();
    }

    /// Runs a default job file with fio against a small temp file (fio is
    /// needed; skipped loudly without it).
    #[test]
    fn job_file_runs_under_fio() {
        if check_fio().is_err() {
            eprintln!("SKIP job_file_runs_under_fio: fio not installed");
            return;
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(16 << 20).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let w = load_workloads(&dir, &["randrw-16k-70-30-qd32".into()]).unwrap();
        // O_DIRECT may be refused by the temp dir's filesystem: then fio fails
        // with a clear error, which is fine here too.
        match run_fio(&w[0], f.path(), Timing { runtime: 1, ramp: 0 }, None) {
            Ok(m) => assert!(m.read.ios > 0 && m.write.ios > 0),
            Err(e) => assert!(e.to_string().contains("fio randrw-16k-70-30-qd32"), "{e:#}"),
        }
        let e = run_fio(&w[0], Path::new("/nonexistent/dev"), Timing { runtime: 1, ramp: 0 }, None).unwrap_err();
        assert!(e.to_string().contains("failed"), "{e:#}");
    }
}
