//! The resources of a device being served, and their orderly teardown.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use super::STOP_SIGNALS;
use super::clock::{DeviceStats, StatsClock};
use crate::ctrl::Control;
use crate::error::{Error, Result};
use crate::queue::stats::QueueStats;
use crate::queue::{QueueEvent, QueueHandle, QueueReport};
use crate::sys;

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
    done: bool,
}

impl Live {
    pub(crate) fn new(ctrl: Control, dev_id: u32, on_exit: OnExit) -> Self {
        Self { ctrl, dev_id, started: false, on_exit, cdev: None, queues: Vec::new(), events: None, done: false }
    }

    /// Waits until every queue has fetched its tags, or one fails.
    pub(crate) fn wait_ready(&mut self) -> Result<Vec<QueueReport>> {
        let mut reports = Vec::new();
        while reports.len() < self.queues.len() {
            let Some(events) = &self.events else { return Err(Error::Config("no queue events".into())) };
            match events.recv_timeout(Duration::from_secs(60)) {
                Ok(QueueEvent::Ready(r)) => reports.push(r),
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
        reports.sort_by_key(|r| r.q_id);
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
        loop {
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                on_tick(&clock.sample(&queue_stats, false));
            }
            let sig = sys::wait_signal(&STOP_SIGNALS, Duration::from_millis(100))
                .map_err(|e| Error::io("sigtimedwait", e))?;
            if let Some(sig) = sig {
                let name = if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
                return Ok(format!("{name} received"));
            }
            let Some(events) = &self.events else { return Err(Error::Config("no queue events".into())) };
            match events.try_recv() {
                Ok(QueueEvent::Exited { q_id, result: Err(msg) }) => return Err(Error::Queue { q_id, msg }),
                Ok(QueueEvent::Exited { q_id, result: Ok(()) }) => {
                    return Ok(format!("queue {q_id} was stopped by the kernel (device stopped from outside)"));
                }
                Ok(QueueEvent::Ready(_)) | Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return Ok("all queue threads ended".into()),
            }
        }
    }

    /// STOP_DEV (disk goes away, queues drain), join the queues, close the char
    /// device, DEL_DEV. Returns the final per-queue counters.
    pub(crate) fn teardown(&mut self) -> Result<Vec<Arc<QueueStats>>> {
        self.done = true;
        let mut first_err = None;
        tracing::debug!(dev_id = self.dev_id, started = self.started, "teardown: STOP_DEV");
        let delete = self.on_exit == OnExit::Delete;
        if delete
            && self.started
            && let Err(e) = self.ctrl.stop_dev(self.dev_id)
            && e.raw_os_error() != Some(libc::ENODEV)
        {
            first_err.get_or_insert(e);
        }
        tracing::debug!(dev_id = self.dev_id, "teardown: waking queues");
        for q in &self.queues {
            q.wake();
        }
        let mut stats = Vec::new();
        for q in self.queues.drain(..) {
            stats.push(q.stats);
            if q.join.join().is_err() {
                first_err.get_or_insert(Error::Queue { q_id: q.q_id, msg: "queue thread panicked".into() });
            }
        }
        self.cdev = None;
        if delete {
            tracing::debug!(dev_id = self.dev_id, "teardown: DEL_DEV");
            match self.ctrl.del_dev(self.dev_id) {
                Err(e) if e.raw_os_error() != Some(libc::ENODEV) => _ = first_err.get_or_insert(e),
                _ => {}
            }
        } else {
            tracing::warn!(
                dev_id = self.dev_id,
                "device left in place (recoverable): run `ubd-engine recover {}`",
                self.dev_id
            );
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats),
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
