//! The resources of a device being served, and their orderly teardown.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use super::clock::{DeviceStats, StatsClock};
use crate::ctrl::Control;
use crate::error::{Error, Result};
use crate::queue::QueueHandle;
use crate::queue::config::{QueueEvent, QueueReport};
use crate::queue::stats::QueueStats;
use crate::sys;

/// The signals that stop a served device, and [`HANDOFF_SIGNAL`] (blocked, and taken
/// by the wait loop).
pub(crate) const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, HANDOFF_SIGNAL];

/// Hand the device to a new daemon (`ubd-engine upgrade`): QUIESCE_DEV, let the queues
/// finish what they hold, exit and leave the device for the new daemon's recovery.
pub const HANDOFF_SIGNAL: libc::c_int = libc::SIGUSR1;

/// What teardown does with the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnExit {
    /// STOP_DEV + DEL_DEV.
    Delete,
    /// Only stop serving (close everything): a recoverable device stays recoverable.
    Leave,
}

/// The running device's resources; dropping it tears everything down.
pub(crate) struct Live {
    pub(crate) ctrl: Control,
    pub(crate) dev_id: u32,
    pub(crate) started: bool,
    pub(crate) on_exit: OnExit,
    pub(crate) cdev: Option<Arc<OwnedFd>>,
    pub(crate) queues: Vec<QueueHandle>,
    pub(crate) events: Option<Receiver<QueueEvent>>,
    /// How long STOP_DEV may wait for requests in flight before they are aborted.
    pub(crate) stop_grace: Duration,
    /// A queue thread failed: its requests will never complete, so teardown aborts
    /// the queues at once instead of waiting for them to drain.
    pub(crate) queue_failed: bool,
    /// The device was created with USER_RECOVERY.
    pub(crate) recoverable: bool,
    /// It has UBLK_F_QUIESCE: [`HANDOFF_SIGNAL`] hands it over.
    pub(crate) can_quiesce: bool,
    /// It was quiesced and is left for the daemon that takes it over.
    pub(crate) handed_over: bool,
    /// The kernel has UBLK_F_SAFE_STOP_DEV: a stop signal tries TRY_STOP_DEV first.
    pub(crate) safe_stop: bool,
    /// TRY_STOP_DEV stopped the device with nothing holding it open (nothing can open
    /// it since): teardown need not look for holders again.
    stopped_unheld: bool,
    /// Counters of the queues joined so far, and the first failure joining them.
    joined: Vec<Arc<QueueStats>>,
    join_err: Option<Error>,
    done: bool,
}

impl Live {
    pub(crate) fn new(ctrl: Control, dev_id: u32, on_exit: OnExit) -> Self {
        Self {
            ctrl,
            dev_id,
            started: false,
            on_exit,
            cdev: None,
            queues: Vec::new(),
            events: None,
            stop_grace: Duration::from_secs(30),
            queue_failed: false,
            recoverable: false,
            can_quiesce: false,
            handed_over: false,
            safe_stop: false,
            stopped_unheld: false,
            joined: Vec::new(),
            join_err: None,
            done: false,
        }
    }

    /// Waits until every queue has fetched its tags, or one fails.
    pub(crate) fn wait_ready(&mut self) -> Result<Vec<QueueReport>> {
        let mut reports = Vec::new();
        while reports.len() < self.queues.len() {
            let Some(events) = &self.events else { return Err(Error::Config("no queue events".into())) };
            match events.recv_timeout(Duration::from_secs(60)) {
                Ok(QueueEvent::Ready(r)) => reports.push(r),
                Ok(QueueEvent::TargetFailed { q_id, msg }) => return Err(Error::Queue { q_id, msg }),
                Ok(QueueEvent::Exited { q_id, result }) => {
                    return Err(Error::Queue {
                        q_id,
                        msg: result.err().unwrap_or_else(|| "exited during startup".into()),
                    });
                }
                Err(_) => {
                    return Err(Error::Config("queue threads did not start within 60 s".into()));
                }
            }
        }
        reports.sort_by_key(|r| (r.q_id, r.thread));
        Ok(reports)
    }

    /// Serves until a stop signal, or until a queue thread ends on its own.
    pub(crate) fn wait_stop(
        &mut self,
        clock: &mut StatsClock,
        on_tick: &mut impl FnMut(&DeviceStats),
    ) -> Result<String> {
        let queue_stats: Vec<Arc<QueueStats>> = self.queues.iter().map(|q| Arc::clone(&q.stats)).collect();
        let mut last_tick = Instant::now();
        // A stop signal that came while the device was open: it stops once closed.
        let mut pending: Option<&'static str> = None;
        let mut last_check = Instant::now();
        loop {
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                on_tick(&clock.sample(&queue_stats, false));
            }
            let sig = sys::wait_signal(&STOP_SIGNALS, Duration::from_millis(100))
                .map_err(|e| Error::io("sigtimedwait", e))?;
            if sig == Some(HANDOFF_SIGNAL) {
                if let Some(reason) = self.hand_off() {
                    return Ok(reason);
                }
                continue;
            }
            if let Some(sig) = sig {
                let name = if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
                if let Some(first) = pending {
                    tracing::warn!(
                        dev_id = self.dev_id,
                        "{name} after {first}: stopping the device while it is in use"
                    );
                    return Ok(format!("{first}, then {name}: stopped while in use"));
                }
                match self.stop_unless_in_use() {
                    None => return Ok(format!("{name} received")),
                    Some(holders) => {
                        tracing::warn!(
                            dev_id = self.dev_id,
                            "{name}: /dev/ublkb{} is in use ({holders}): serving on until it is closed, then stopping; \
                             signal again to stop it now",
                            self.dev_id
                        );
                        pending = Some(name);
                        last_check = Instant::now();
                    }
                }
                continue;
            }
            if let Some(first) = pending
                && last_check.elapsed() >= Duration::from_millis(500)
            {
                last_check = Instant::now();
                if self.stop_unless_in_use().is_none() {
                    tracing::info!(dev_id = self.dev_id, "the device was closed: stopping ({first})");
                    return Ok(format!("{first} received; stopped once the device was closed"));
                }
            }
            let Some(events) = &self.events else { return Err(Error::Config("no queue events".into())) };
            match events.try_recv() {
                Ok(QueueEvent::Exited { q_id, result: Err(msg) }) => {
                    // The thread is gone with requests the kernel waits for. With recovery
                    // the device is left for `recover` (no IO is lost); else it is removed.
                    self.queue_failed = true;
                    if self.recoverable {
                        self.on_exit = OnExit::Leave;
                    }
                    return Err(Error::Queue { q_id, msg });
                }
                // The queue fails every request from now on: a normal stop drains it.
                Ok(QueueEvent::TargetFailed { q_id, msg }) => return Err(Error::Queue { q_id, msg }),
                Ok(QueueEvent::Exited { q_id, result: Ok(()) }) => {
                    return Ok(format!("queue {q_id} was stopped by the kernel (device stopped from outside)"));
                }
                Ok(QueueEvent::Ready(_)) | Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return Ok("all queue threads ended".into()),
            }
        }
    }

    /// Who has the block device open, as one line; None when nobody does. With
    /// UBLK_F_SAFE_STOP_DEV (7.0+) the kernel has the last word, and None then means
    /// the device is already stopped: TRY_STOP_DEV stops it only if nothing has it
    /// open, refusing new opens while it decides. (Teardown's STOP_DEV is then a no-op.)
    fn stop_unless_in_use(&mut self) -> Option<String> {
        let holders = super::holders::device_holders(self.dev_id);
        if !holders.is_empty() {
            return Some(holders.join(", "));
        }
        if self.safe_stop {
            match self.ctrl.try_stop_dev(self.dev_id) {
                Ok(()) => self.stopped_unheld = true,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Some("opened by something this process cannot see: TRY_STOP_DEV says EBUSY".into());
                }
                Err(e) => tracing::warn!(dev_id = self.dev_id, "TRY_STOP_DEV: {e}; stopping with STOP_DEV"),
            }
        }
        None
    }

    /// [`HANDOFF_SIGNAL`]: quiesces the device (UBLK_F_QUIESCE) so that the queues can
    /// end with the requests they hold completed, leaving it for the next daemon. Devices
    /// without QUIESCE (or recovery) are not handed over this way: `upgrade` kills
    /// their daemon instead. None: the signal is ignored.
    fn hand_off(&mut self) -> Option<String> {
        if !self.can_quiesce {
            tracing::warn!(
                dev_id = self.dev_id,
                "SIGUSR1 (hand over) ignored: the device has no UBLK_F_QUIESCE (Linux 6.16+, with recovery on)"
            );
            return None;
        }
        tracing::info!(dev_id = self.dev_id, "SIGUSR1: handing the device over (QUIESCE_DEV)");
        if let Err(e) = self.ctrl.quiesce_dev(self.dev_id, self.stop_grace) {
            // EBUSY: the kernel stopped handing out requests but did not abort every fetch:
            // the device cannot be served on from here either, only recovered.
            tracing::warn!(dev_id = self.dev_id, "{e}: the device is left for recovery all the same");
        }
        self.on_exit = OnExit::Leave;
        self.handed_over = true;
        Some("handed over to a new daemon (SIGUSR1)".into())
    }

    /// STOP_DEV (disk goes away, queues drain), join the queues, close the char
    /// device, DEL_DEV. Returns the final per-queue counters.
    pub(crate) fn teardown(&mut self) -> Result<Vec<Arc<QueueStats>>> {
        self.done = true;
        let mut first_err = None;
        tracing::debug!(dev_id = self.dev_id, started = self.started, "teardown: STOP_DEV");
        let delete = self.on_exit == OnExit::Delete;
        if self.queue_failed && !delete {
            // A queue thread died, and the device is to be recovered: the other queues
            // are not stopped one by one but left to end with the process, all at once,
            // which the kernel handles as any daemon crash (tested with kill -9): it
            // re-queues what was in flight for the next daemon. Stopping them in turn
            // was seen to leave 6.12's driver waiting, the device never recoverable.
            tracing::warn!(
                dev_id = self.dev_id,
                "a queue thread died: the device is left for recovery: run `ubd-engine recover {}`",
                self.dev_id
            );
            self.queues.clear();
            self.cdev = None;
            return Ok(Vec::new());
        }
        if self.queue_failed {
            // A queue thread died with requests the kernel will wait for forever: stop
            // serving at once. Once the char device is closed the kernel fails those
            // requests, and STOP_DEV can finish.
            tracing::warn!(dev_id = self.dev_id, "a queue thread failed: aborting the queues");
            self.abort_queues();
        }
        // Stopped while something has the block device open (a yank): DEL_DEV would wait
        // for it to close the dead device, so the delete does not wait.
        let held =
            delete && self.started && !self.stopped_unheld && !super::holders::device_holders(self.dev_id).is_empty();
        if delete && self.started {
            match self.stop_dev() {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => _ = first_err.get_or_insert(e),
            }
        }
        tracing::debug!(dev_id = self.dev_id, "teardown: waking queues");
        for q in &self.queues {
            q.wake();
        }
        self.join_queues();
        self.cdev = None;
        if let Some(e) = self.join_err.take() {
            first_err.get_or_insert(e);
        }
        if delete {
            tracing::debug!(dev_id = self.dev_id, held, "teardown: DEL_DEV");
            let deleted = if held {
                tracing::info!(
                    dev_id = self.dev_id,
                    "deleting device {0} while it is still open: its number stays taken until the last user closes /dev/ublkb{0}",
                    self.dev_id
                );
                self.ctrl.del_dev_nowait(self.dev_id)
            } else {
                self.ctrl.del_dev(self.dev_id)
            };
            match deleted {
                Err(e) if e.raw_os_error() != Some(libc::ENODEV) => _ = first_err.get_or_insert(e),
                _ => {}
            }
        } else if self.handed_over {
            tracing::info!(dev_id = self.dev_id, "device left in place for the daemon that takes it over");
        } else {
            tracing::warn!(
                dev_id = self.dev_id,
                "device left in place (recoverable): run `ubd-engine recover {}`",
                self.dev_id
            );
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut self.joined)),
        }
    }
}

impl Live {
    /// STOP_DEV: waits `stop_grace` for the requests in flight; then the queues are
    /// aborted and the char device closed, so that the kernel fails (or re-queues)
    /// what is left, and STOP_DEV gets a last `CMD_TIMEOUT`.
    fn stop_dev(&mut self) -> Result<()> {
        let cmd = self.ctrl.stop_dev_begin(self.dev_id)?;
        if self.ctrl.try_finish(&cmd, self.stop_grace)? {
            return Ok(());
        }
        tracing::warn!(
            dev_id = self.dev_id,
            "STOP_DEV has waited {} s for requests in flight: aborting them",
            self.stop_grace.as_secs()
        );
        self.abort_queues();
        self.ctrl.finish(&cmd, crate::ctrl::CMD_TIMEOUT)
    }

    /// Tells every queue to give up and exit, joins them, and closes the char device.
    fn abort_queues(&mut self) {
        for q in &self.queues {
            q.abort();
        }
        self.join_queues();
        self.cdev = None;
    }

    fn join_queues(&mut self) {
        for q in self.queues.drain(..) {
            self.joined.push(q.stats);
            if q.join.join().is_err() {
                self.join_err.get_or_insert(Error::Queue { q_id: q.q_id, msg: "queue thread panicked".into() });
            }
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.teardown()
        {
            tracing::error!(dev_id = self.dev_id, "cleaning up the device failed: {e}");
        }
    }
}
