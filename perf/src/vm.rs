//! `--vm`: runs the same command as root inside the test VM (tests/vm/run.sh),
//! with its output directory shared read-write so the results outlive the VM.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, anyhow};

use crate::cmd::{absolute, engine_path, out_dir};
use crate::{Cmd, Common, CompareArgs, RegressArgs};

/// Options consumed here, and whether each takes a value.
const OWN: [(&str, bool); 5] =
    [("--vm", false), ("--kernel", true), ("--out", true), ("--engine", true), ("--rublk", true)];

/// The arguments minus the ones `--vm` handles (`--vm`, `--kernel`, `--out`,
/// `--engine`, in `--opt V` and `--opt=V` forms).
pub fn strip_own(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if let Some(&(_, takes)) = OWN.iter().find(|(o, _)| s == *o) {
            skip = takes;
            continue;
        }
        if OWN.iter().any(|(o, takes)| *takes && s.starts_with(&format!("{o}="))) {
            continue;
        }
        out.push(a.clone());
    }
    out
}

fn runner() -> PathBuf {
    std::env::var_os("UBD_VM_RUNNER")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vm/run.sh"), PathBuf::from)
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| absolute(p))
}

/// rublk as the guest can see it: /var/cache (where perf/install-peers.sh puts
/// it) is an empty tmpfs in the VM, so a binary under /var is copied into the
/// shared dir first.
fn guest_rublk(common: &Common, shared: &Path) -> Result<Option<PathBuf>> {
    let Some(r) = common.rublk.clone().or_else(ubd_perf::systems::find_rublk) else { return Ok(None) };
    let r = absolute(&r);
    if !r.starts_with("/var") {
        return Ok(Some(r));
    }
    let dir = shared.join("peers");
    let copy = dir.join("rublk");
    let same = |a: &Path, b: &Path| {
        let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) else { return false };
        x.len() == y.len() && x.modified().ok() <= y.modified().ok()
    };
    if !same(&r, &copy) {
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&r, &copy).with_context(|| format!("cannot copy {} to {}", r.display(), copy.display()))?;
    }
    Ok(Some(absolute(&copy)))
}

/// Re-runs this command inside the VM and returns its exit status.
pub fn reexec(cmd: &Cmd) -> Result<ExitCode> {
    let (name, common, extra_rw): (&str, &Common, Option<&Path>) = match cmd {
        Cmd::Compare(a) => ("compare", &a.m.common, None),
        Cmd::Regress(a) => ("regress", &a.m.common, a.update.then_some(a.baselines.as_path())),
        Cmd::Sweep(a) => ("sweep", &a.common, None),
    };
    let run_sh = runner();
    if !run_sh.is_file() {
        return Err(anyhow!("VM runner {} not found (set UBD_VM_RUNNER)", run_sh.display()));
    }
    let exe = std::env::current_exe().context("cannot find the ubd-perf binary")?;
    let engine = engine_path(common)
        .map(|p| absolute(&p))
        .ok_or_else(|| anyhow!("ubd-engine binary not found (cargo build --release -p ubd-tools, or --engine PATH)"))?;
    let out = absolute(&out_dir(common, name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let shared = std::env::var_os("UBD_VM_SHARED").map_or_else(|| PathBuf::from("/tmp/ubd-vm"), PathBuf::from);
    std::fs::create_dir_all(&shared).with_context(|| format!("cannot create {}", shared.display()))?;

    let mut c = Command::new(&run_sh);
    c.args(["--kernel", &common.kernel, "--shared"]).arg(&shared);
    // Kernel log lines are dropped unless asked for (a WARN from ublk shows there).
    if std::env::var_os("UBD_PERF_VM_KERNEL_LOG").is_none() {
        c.arg("--quiet");
    }
    if !canon(&out).starts_with(canon(&shared)) {
        c.arg("--rwdir").arg(&out);
    }
    if let Some(dir) = extra_rw {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        c.arg("--rwdir").arg(dir);
    }
    // Generous: every cell of up to 9 systems, plus boot and setup.
    let rounds = u64::from(common.rounds.unwrap_or(3));
    let workloads = if common.workloads.is_empty() { 5 } else { common.workloads.len() as u64 };
    let cells = if let Cmd::Sweep(a) = cmd {
        (a.queues.len() * a.depth.len() * a.cpus.len().max(1) * a.buffer_mode.len().max(3)) as u64
    } else if let Cmd::Compare(CompareArgs { m }) | Cmd::Regress(RegressArgs { m, .. }) = cmd {
        // Up to 11 systems, and 4 more (the engine's) per variant.
        11 + 4 * m.variant.len() as u64
    } else {
        11
    };
    let timeout = 300 + rounds * workloads * cells * (u64::from(common.runtime + common.ramp) * 3 + 10);
    c.args(["--timeout", &timeout.to_string(), "--"]);
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    c.arg(&exe).args(strip_own(&args)).arg("--out").arg(&out).arg("--engine").arg(&engine);
    if let Some(r) = guest_rublk(common, &shared)? {
        c.arg("--rublk").arg(r);
    }
    eprintln!("ubd-perf: running in the VM (kernel {}), results in {}", common.kernel, out.display());
    let st = c.status().with_context(|| format!("cannot run {}", run_sh.display()))?;
    let code = st.code().unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<OsString> {
        xs.iter().map(OsString::from).collect()
    }

    #[test]
    fn own_options_are_stripped() {
        let a = v(&[
            "compare",
            "--vm",
            "--kernel",
            "newest",
            "--rounds",
            "1",
            "--out=/x",
            "--engine",
            "/e",
            "--runtime",
            "5",
        ]);
        assert_eq!(strip_own(&a), v(&["compare", "--rounds", "1", "--runtime", "5"]));
        let b = v(&["regress", "--kernel=lts", "--vm", "--update", "--out", "/o"]);
        assert_eq!(strip_own(&b), v(&["regress", "--update"]));
    }
}
