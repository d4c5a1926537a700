//! Running as a service: systemd notifications (`sd-notify`: READY, STATUS, MAINPID,
//! STOPPING; no-ops without `$NOTIFY_SOCKET`) and `upgrade`, which hands a served
//! device to a new process.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::Signal;
use sd_notify::NotifyState;
use ubd_engine::{Control, Recovery};

use crate::state;

/// Tells systemd (if it started us with Type=notify) `states`.
pub fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Waits (up to `timeout`) until systemd has handled every notification sent before
/// (sd_notify_barrier(3): `BARRIER=1` with the write end of a pipe, which systemd closes
/// once it got there). `upgrade` needs it: the old daemon must not exit before systemd
/// knows the new main process, or systemd takes the exit for the service's end.
pub fn notify_barrier(timeout: Duration) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return tracing::debug!("sd_notify barrier: pipe: {e}"),
    };
    use std::os::fd::AsFd;
    if let Err(e) = sd_notify::notify_with_fds(&[NotifyState::Custom("BARRIER=1")], &[writer.as_fd()]) {
        return tracing::debug!("sd_notify barrier: {e}");
    }
    drop(writer);
    let mut fds = [rustix::event::PollFd::new(&reader, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec::try_from(timeout).unwrap_or(rustix::event::Timespec { tv_sec: 5, tv_nsec: 0 });
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(0) => tracing::warn!("systemd did not acknowledge the new main process within {} s", timeout.as_secs()),
        Ok(_) => {}
        Err(e) => tracing::debug!("sd_notify barrier: poll: {e}"),
    }
}

/// What `--takeover` prints on stdout (with its pid: `upgrade` does not start it as its
/// own child) once its target is open and it waits for the old daemon to let go.
pub fn prepared_line(id: u32, pid: u32) -> String {
    format!("prepared {id} pid {pid}")
}

fn parse_prepared(id: u32, line: &str) -> Option<u32> {
    line.strip_prefix(&format!("prepared {id} pid "))?.parse().ok()
}

/// `BINARY --version`, checked: it must run and say it is ubd-engine.
fn check_binary(binary: &Path) -> Result<String> {
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} --version did not finish within 10 s", binary.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !status.success() || !text.starts_with("ubd-engine ") {
        bail!(
            "{} is not a working ubd-engine: `--version` gave {status} and {:?}",
            binary.display(),
            text.lines().next().unwrap_or("")
        );
    }
    Ok(text)
}

/// Lines from the new daemon's stdout, read on a thread of their own.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Waits up to `timeout` for a line `want(line)` from the new daemon; Err says why not.
fn wait_line<T>(
    lines: &mpsc::Receiver<String>,
    timeout: Duration,
    want: impl Fn(&str) -> Option<T>,
) -> std::result::Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => match want(&l) {
                Some(v) => return Ok(v),
                None => tracing::debug!("new daemon: {l}"),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Its stdout closed: it exited (its own messages went to stderr, which it shares).
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("it exited".into()),
        }
        if Instant::now() > deadline {
            return Err(format!("it was not ready within {} s", timeout.as_secs()));
        }
    }
}

/// Kills the new daemon: its process group (it is no child of ours to kill by pid).
fn stop_group(pgid: Option<rustix::process::Pid>) {
    if let Some(g) = pgid {
        let _ = rustix::process::kill_process_group(g, Signal::KILL);
    }
}

/// `upgrade ID`: start `binary --takeover ID <the daemon's own arguments>`; once it has
/// opened its target, the old daemon lets go (HANDOFF_SIGNAL → QUIESCE_DEV where the
/// device has UBLK_F_QUIESCE, else SIGKILL) and the new one recovers the device. Until
/// the old daemon is told, any failure leaves it serving; after that the device stays
/// recoverable.
pub fn upgrade(id: u32, binary: Option<&Path>, timeout: u64) -> Result<()> {
    crate::cmd::preflight()?;
    let timeout = Duration::from_secs(timeout.max(1));
    let mut ctrl = Control::open()?;
    let info = ctrl.dev_info(id)?;
    let st = state::read(id)?.with_context(|| {
        format!("device {id} is not served by ubd-engine (no state file {})", state::path(id).display())
    })?;
    if info.ublksrv_pid != st.pid {
        bail!(
            "device {id}: the kernel says its daemon is process {}, ubd-engine's state file says {}: not ours to upgrade",
            info.ublksrv_pid,
            st.pid
        );
    }
    let Some(old) = crate::cmd::live_process(st.pid).filter(|_| info.state_name() == "live") else {
        bail!(
            "device {id} ({}) has no running daemon (process {} is gone): use `ubd-engine recover {id}`",
            info.state_name(),
            st.pid
        );
    };
    match Recovery::from_dev_flags(info.flags) {
        Recovery::Reissue => {}
        r => bail!(
            "device {id} was created with --recovery {r}: handing it over would {}; only devices with --recovery reissue can be upgraded",
            if r == Recovery::Off { "delete it" } else { "fail the IO in flight" }
        ),
    }
    if st.argv.is_empty() {
        bail!(
            "device {id} was started by an ubd-engine that did not record its command line: stop it and start it again"
        );
    }
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe().context("finding this program's path")?,
    };
    let version = check_binary(&binary)?;
    let how =
        if info.can_quiesce() { "QUIESCE_DEV" } else { "kill -9 and recovery (no UBLK_F_QUIESCE on this device)" };
    // The new daemon is started as a grandchild: the shell in between starts it in the
    // background and exits at once, so that the daemon is reparented to PID 1 (systemd)
    // before it is announced as the main process; systemd supervises a main process that
    // is not its child only poorly (it does not see it exit, and stops it with SIGKILL).
    // (The daemon gives SIGINT, which a background job inherits ignored, its action back.)
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#""$0" "$@" &"#)
        .arg(&binary)
        .arg("--takeover")
        .arg(id.to_string())
        .args(&st.argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
    let pgid = rustix::process::Pid::from_raw(child.id().cast_signed());
    let lines = lines_of(&mut child);
    let _ = child.wait();
    let new_pid = match wait_line(&lines, timeout, |l| parse_prepared(id, l)) {
        Ok(p) => p,
        Err(why) => {
            stop_group(pgid);
            bail!(
                "the new daemon ({}) failed before taking over: {why}; device {id} stays with process {}",
                binary.display(),
                st.pid
            );
        }
    };
    tracing::info!(
        "device {id}: the new daemon (process {new_pid}, {version}) is ready; handing over from process {} ({}) by {how}",
        st.pid,
        if st.version.is_empty() { "ubd-engine" } else { &st.version },
    );
    // From here the new process is the service's main process (systemd, NotifyAccess=all).
    notify(&[NotifyState::MainPid(new_pid)]);
    notify_barrier(Duration::from_secs(5));
    let sig = if info.can_quiesce() { Signal::USR1 } else { Signal::KILL };
    debug_assert_eq!(Signal::USR1.as_raw(), ubd_engine::HANDOFF_SIGNAL);
    if let Err(e) = rustix::process::kill_process(old, sig) {
        stop_group(pgid);
        notify(&[NotifyState::MainPid(st.pid.cast_unsigned())]);
        bail!("cannot signal process {} ({e}): device {id} stays with it", st.pid);
    }
    let block = format!("/dev/ublkb{id}");
    // The old daemon drains for up to its stop timeout; recovery then takes a moment.
    match wait_line(&lines, timeout + Duration::from_secs(60), |l| (l == block).then_some(())) {
        Ok(_) => {
            println!("device {id} upgraded: process {} -> {new_pid} ({version})", st.pid);
            Ok(())
        }
        Err(why) => {
            stop_group(pgid);
            bail!(
                "the new daemon did not take device {id} over: {why}; the device is left recoverable: run `ubd-engine recover {id}`"
            )
        }
    }
}

/// Waits until the kernel no longer has device `id` LIVE: its daemon has closed
/// `/dev/ublkcN`, and the device waits for recovery.
pub fn wait_not_live(id: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut ctrl = Control::open()?;
    while ctrl.dev_info(id)?.state_name() == "live" {
        if Instant::now() > deadline {
            bail!("device {id} was still live {} s after its daemon exited", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until `pid` (the daemon being replaced) is gone.
pub fn wait_exit(pid: i32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while ubd_engine::pid_alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} did not let go of the device within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_line_round_trip() {
        assert_eq!(parse_prepared(7, &prepared_line(7, 4242)), Some(4242));
        assert_eq!(parse_prepared(8, &prepared_line(7, 4242)), None);
        assert_eq!(parse_prepared(7, "prepared 7"), None);
        assert_eq!(parse_prepared(7, "/dev/ublkb7"), None);
    }

    #[test]
    fn a_zombie_is_not_waited_for() {
        // wait_exit ends once the process has exited, reaped or not.
        let mut child = Command::new("true").spawn().unwrap();
        wait_exit(child.id().cast_signed(), Duration::from_secs(10)).unwrap();
        child.wait().unwrap();
        let mut sleeper = Command::new("sleep").arg("5").spawn().unwrap();
        let e = wait_exit(sleeper.id().cast_signed(), Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("did not let go of the device"), "{e}");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
