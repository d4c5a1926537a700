//! Serving one device: add → queues armed → START_DEV → wait → stop → delete.
//!
//! Every path out of [`serve`], errors and panics included, stops and deletes the
//! device it added: nothing is left behind.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use crate::buf::{BufferChoice, BufferMode, resolve};
use crate::ctrl::{Control, params::build_params};
use crate::error::{Error, Result};
use crate::queue::stats::{QueueStats, StatsSnapshot};
use crate::queue::{self, QueueConfig, QueueEvent, QueueHandle, QueueReport};
use crate::sys::{self, features, uapi};
use crate::target::Target;

/// How to shape the device and its queues.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub queues: u16,
    pub depth: u16,
    /// Largest request, and the size of each tag's buffer.
    pub max_io_buf_bytes: u32,
    /// Requested device id; None lets the kernel choose.
    pub dev_id: Option<u32>,
    /// CPUs for the queue threads: queue i runs on `cpus[i % len]`. None: each queue
    /// runs on the CPUs the kernel maps to it (GET_QUEUE_AFFINITY).
    pub cpus: Option<Vec<usize>>,
    /// Try hugepage-backed buffers.
    pub huge_pages: bool,
    pub buffer: BufferChoice,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            depth: 128,
            max_io_buf_bytes: 512 << 10,
            dev_id: None,
            cpus: None,
            huge_pages: true,
            buffer: BufferChoice::Auto,
        }
    }
}

impl DeviceOptions {
    pub fn validate(&self) -> Result<()> {
        if self.queues == 0 || self.queues > uapi::MAX_NR_QUEUES {
            return Err(Error::Config(format!(
                "queue count {} must be from 1 to {}",
                self.queues,
                uapi::MAX_NR_QUEUES
            )));
        }
        if self.depth == 0 || self.depth > uapi::MAX_QUEUE_DEPTH {
            return Err(Error::Config(format!(
                "queue depth {} must be from 1 to {} (the ublk driver's limit)",
                self.depth,
                uapi::MAX_QUEUE_DEPTH
            )));
        }
        if self.max_io_buf_bytes > uapi::MAX_IO_BUF_BYTES {
            return Err(Error::Config(format!(
                "max IO size {} exceeds ublk's {}",
                self.max_io_buf_bytes,
                uapi::MAX_IO_BUF_BYTES
            )));
        }
        if let Some(id) = self.dev_id
            && id >= i32::MAX as u32
        {
            return Err(Error::Config(format!("device id {id} is out of range")));
        }
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return Err(Error::Config("empty CPU list".into()));
            }
            crate::cpus::check_available(cpus, &sys::allowed_cpus().map_err(|e| Error::io("sched_getaffinity", e))?)?;
        }
        Ok(())
    }
}

/// A device that has been started, as shown to the caller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartedDevice {
    pub dev_id: u32,
    pub block_path: PathBuf,
    pub char_path: PathBuf,
    /// Features the kernel offers (GET_FEATURES).
    pub kernel_features: u64,
    /// Flags the device was created with, as the kernel accepted them.
    pub dev_flags: u64,
    pub queue_depth: u16,
    pub max_io_buf_bytes: u32,
    pub queues: Vec<QueueReport>,
    pub pid: i32,
    pub buffer_mode: BufferMode,
    /// Why this buffer mode.
    pub buffer_reason: String,
}

/// Why serving ended, and the final counters.
#[derive(Debug, Clone)]
pub struct ServeSummary {
    pub dev_id: u32,
    pub reason: String,
    /// Over the whole life of the device.
    pub stats: DeviceStats,
}

/// Live statistics of a device: per queue and in total, with rates over the last tick.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    pub dev_id: u32,
    pub uptime_s: f64,
    /// Requests per second over the last interval (all ops).
    pub iops: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub total: StatsSnapshot,
    pub queues: Vec<StatsSnapshot>,
}

/// Computes [`DeviceStats`] at intervals.
struct StatsClock {
    dev_id: u32,
    start: Instant,
    last: Instant,
    last_total: StatsSnapshot,
}

impl StatsClock {
    fn new(dev_id: u32) -> Self {
        Self { dev_id, start: Instant::now(), last: Instant::now(), last_total: StatsSnapshot::default() }
    }

    /// Rates since the previous sample (`since_start`: since the start).
    fn sample(&mut self, queues: &[Arc<QueueStats>], since_start: bool) -> DeviceStats {
        let refs: Vec<&QueueStats> = queues.iter().map(|q| &**q).collect();
        let total = QueueStats::total(&refs);
        let now = Instant::now();
        if since_start {
            self.last = self.start;
            self.last_total = StatsSnapshot::default();
        }
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let s = DeviceStats {
            dev_id: self.dev_id,
            uptime_s: now.duration_since(self.start).as_secs_f64(),
            iops: rate(total.ops(), self.last_total.ops()),
            read_bytes_per_s: rate(total.bytes_read, self.last_total.bytes_read),
            write_bytes_per_s: rate(total.bytes_written, self.last_total.bytes_written),
            queues: refs.iter().map(|q| q.snapshot()).collect(),
            total: total.clone(),
        };
        self.last = now;
        self.last_total = total;
        s
    }
}

const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Blocks SIGINT/SIGTERM in the calling thread (and the threads it spawns later), so
/// that they are taken by [`serve`]'s wait loop rather than killing the process.
pub fn block_stop_signals() -> Result<()> {
    sys::block_signals(&STOP_SIGNALS).map_err(|e| Error::io("blocking signals", e))
}

/// Creates the device for `target`, serves it until SIGINT/SIGTERM (or a queue
/// failure), then stops and deletes it. `on_started` runs once the block device exists.
pub fn serve(
    target: Arc<dyn Target>,
    opts: &DeviceOptions,
    on_started: impl FnOnce(&StartedDevice),
    mut on_tick: impl FnMut(&DeviceStats),
) -> Result<ServeSummary> {
    opts.validate()?;
    let params = build_params(target.info(), opts.max_io_buf_bytes)?;
    block_stop_signals()?;
    let mut ctrl = Control::open()?;
    let kernel_features = ctrl.features()?;
    let (buffer_mode, buffer_reason) = resolve(opts.buffer, kernel_features)?;
    let mut info = uapi::DevInfo {
        nr_hw_queues: opts.queues,
        queue_depth: opts.depth,
        max_io_buf_bytes: opts.max_io_buf_bytes,
        dev_id: opts.dev_id.unwrap_or(u32::MAX),
        ublksrv_pid: sys::getpid(),
        flags: features::F_CMD_IOCTL_ENCODE | buffer_mode.dev_flag(),
        ..Default::default()
    };
    ctrl.add_dev(&mut info).map_err(|e| match (e.raw_os_error(), opts.dev_id) {
        (Some(libc::EEXIST), Some(id)) => Error::Config(format!("device id {id} is already in use")),
        _ => e,
    })?;
    let dev_id = info.dev_id;
    let (tx, rx) = mpsc::channel();
    let mut live = Live { ctrl, dev_id, started: false, cdev: None, queues: Vec::new(), events: rx, done: false };
    tracing::debug!(dev_id, ?info, "device added");
    if info.flags & buffer_mode.dev_flag() != buffer_mode.dev_flag() {
        return Err(Error::Config(format!(
            "the kernel refused buffer mode {buffer_mode} (device flags {:#x})",
            info.flags
        )));
    }

    live.ctrl.set_params(dev_id, &params)?;
    let char_path = PathBuf::from(format!("/dev/ublkc{dev_id}"));
    wait_for_node(&char_path)?;
    let cdev: Arc<OwnedFd> = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&char_path)
            .map_err(|e| Error::Open { path: char_path.clone(), cause: e })?
            .into(),
    );
    live.cdev = Some(Arc::clone(&cdev));

    for q_id in 0..opts.queues {
        let cpus = match &opts.cpus {
            Some(list) => Some(vec![list[usize::from(q_id) % list.len()]]),
            None => match live.ctrl.queue_affinity(dev_id, q_id) {
                Ok(set) if !set.is_empty() => Some(set),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(q_id, "GET_QUEUE_AFFINITY failed ({e}); queue thread left unbound");
                    None
                }
            },
        };
        let cfg = QueueConfig {
            q_id,
            depth: info.queue_depth,
            buf_size: info.max_io_buf_bytes,
            cpus,
            huge_pages: opts.huge_pages,
            dev_size: target.info().dev_size,
            buffer_mode,
        };
        let handle = queue::spawn(cfg, Arc::clone(&target), Arc::clone(&cdev), tx.clone())?;
        live.queues.push(handle);
    }
    drop(tx);
    // Only `live` and the queue threads may keep the char device open: DEL_DEV waits for the last close.
    drop(cdev);
    let reports = live.wait_ready()?;
    live.ctrl.start_dev(dev_id, sys::getpid())?;
    live.started = true;
    let block_path = PathBuf::from(format!("/dev/ublkb{dev_id}"));
    wait_for_node(&block_path)?;
    let started = StartedDevice {
        dev_id,
        block_path,
        char_path,
        kernel_features,
        dev_flags: info.flags,
        queue_depth: info.queue_depth,
        max_io_buf_bytes: info.max_io_buf_bytes,
        queues: reports,
        pid: sys::getpid(),
        buffer_mode,
        buffer_reason,
    };
    on_started(&started);
    let mut clock = StatsClock::new(dev_id);
    let reason = live.wait_stop(&mut clock, &mut on_tick)?;
    let queue_stats = live.teardown()?;
    let stats = clock.sample(&queue_stats, true);
    Ok(ServeSummary { dev_id, reason, stats })
}

fn wait_for_node(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(Error::Config(format!("{} did not appear within 10 s", path.display())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The running device's resources; dropping it tears everything down.
struct Live {
    ctrl: Control,
    dev_id: u32,
    started: bool,
    cdev: Option<Arc<OwnedFd>>,
    queues: Vec<QueueHandle>,
    events: Receiver<QueueEvent>,
    done: bool,
}

impl Live {
    /// Waits until every queue has fetched its tags, or one fails.
    fn wait_ready(&mut self) -> Result<Vec<QueueReport>> {
        let mut reports = Vec::new();
        while reports.len() < self.queues.len() {
            match self.events.recv_timeout(Duration::from_secs(60)) {
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
    fn wait_stop(&mut self, clock: &mut StatsClock, on_tick: &mut impl FnMut(&DeviceStats)) -> Result<String> {
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
            match self.events.try_recv() {
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
    fn teardown(&mut self) -> Result<Vec<Arc<QueueStats>>> {
        self.done = true;
        let mut first_err = None;
        tracing::debug!(dev_id = self.dev_id, started = self.started, "teardown: STOP_DEV");
        if self.started
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
        tracing::debug!(dev_id = self.dev_id, "teardown: DEL_DEV");
        match self.ctrl.del_dev(self.dev_id) {
            Err(e) if e.raw_os_error() != Some(libc::ENODEV) => _ = first_err.get_or_insert(e),
            _ => {}
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
