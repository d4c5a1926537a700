//! The data plane: one reactor per hardware queue, on its own thread.
//!
//! [`spawn`] starts a queue thread; the thread sets itself up ([`run`]: CPU binding,
//! descriptor map, buffers, the target's queue, the ring) and hands over to its
//! [`reactor::Reactor`], which serves requests until the device stops.

pub(crate) mod config;
pub(crate) mod reactor;
pub(crate) mod stats;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::ring::{QueueRing, RingSetup};
use crate::sys::mmap::{IoDescTable, Region};
use crate::target::{QueueSetup, Target};
use config::{IoProtocol, QueueConfig, QueueEvent, QueueReport};
use reactor::{Geometry, IN_TARGET, Reactor, WAKE_ABORT, WAKE_STOP, panic_message};
use stats::QueueStats;

/// The control thread's handle on a running queue thread.
#[derive(Debug)]
pub(crate) struct QueueHandle {
    pub(crate) q_id: u16,
    pub(crate) join: JoinHandle<()>,
    wake: OwnedFd,
    pub(crate) stats: Arc<QueueStats>,
}

impl QueueHandle {
    /// Asks the thread to finish (once nothing is in flight) and exit.
    pub(crate) fn wake(&self) {
        self.signal(WAKE_STOP);
    }

    /// Asks the thread to exit now, giving up on requests still in the target (the
    /// kernel fails or, with recovery, re-queues them once the thread is gone).
    pub(crate) fn abort(&self) {
        self.signal(WAKE_ABORT);
    }

    fn signal(&self, value: u64) {
        use std::os::fd::AsFd;
        if let Err(e) = crate::sys::eventfd_add(self.wake.as_fd(), value) {
            tracing::warn!(q_id = self.q_id, "cannot wake queue thread: {e}");
        }
    }
}

/// Device whose queue threads end the process if they panic outside the target
/// (u32::MAX: none).
static CRASH_DEV: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
static CRASH_HOOK: std::sync::Once = std::sync::Once::new();

/// For a device with recovery: a queue thread that panics outside its target ends the
/// whole process at once, as a crash would. The kernel then keeps the device, with the
/// requests in flight, for `ubd-engine recover`. (Unwinding instead closes that queue's
/// ring while the other queues still run; 6.12's driver was seen to never quiesce the
/// device after that, leaving it neither recoverable nor deletable.)
#[allow(clippy::print_stderr, reason = "the process's last line, printed just before _exit")]
pub(crate) fn crash_on_queue_panic(dev_id: u32) {
    use std::sync::atomic::Ordering::Relaxed;
    CRASH_DEV.store(dev_id, Relaxed);
    CRASH_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let dev = CRASH_DEV.load(Relaxed);
            let name = std::thread::current().name().unwrap_or("").to_string();
            if dev != u32::MAX && name.starts_with("ubd-q") && !IN_TARGET.with(std::cell::Cell::get) {
                // The process ends here, so this is its last word, in the CLI's format.
                eprintln!(
                    "error: queue thread {name} panicked: {}; device {dev} is left for recovery: run `ubd-engine recover {dev}`",
                    panic_message(info.payload())
                );
                crate::sys::exit_now(1);
            }
        }));
    });
}

/// Starts queue thread `cfg.q_id`. The thread sends `Ready` once its tags are fetched
/// and `Exited` when it ends, whatever the reason (a panic included).
pub(crate) fn spawn(
    cfg: QueueConfig,
    target: Arc<dyn Target>,
    cdev: Arc<OwnedFd>,
    events: Sender<QueueEvent>,
) -> Result<QueueHandle> {
    let q_id = cfg.q_id;
    let name = if cfg.threads > 1 { format!("ubd-q{q_id}.{}", cfg.thread) } else { format!("ubd-q{q_id}") };
    let wake = crate::sys::eventfd().map_err(|e| Error::io("creating eventfd", e))?;
    let wake_thread = wake.try_clone().map_err(|e| Error::io("dup eventfd", e))?;
    let stats = Arc::new(QueueStats::new(cfg.protocol == IoProtocol::Batch));
    let stats_thread = Arc::clone(&stats);
    let join = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| run(cfg, &*target, &cdev, wake_thread, &stats_thread, &events));
            let result = match std::panic::catch_unwind(run) {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(payload) => Err(format!("queue thread panicked: {}", panic_message(&*payload))),
            };
            let _ = events.send(QueueEvent::Exited { q_id, result });
        })
        .map_err(|e| Error::io(format!("spawning queue thread {q_id}"), e))?;
    Ok(QueueHandle { q_id, join, wake, stats })
}

/// The tags thread `thread` of a queue's `threads` serves, `first..end`: a contiguous
/// block of the queue's tags each. Measured against every N-th tag (7.2,
/// TCG, 4k randread qd64 x2, one queue x 2 threads, 2 rounds twice): auto-reg 0.99x of
/// one thread with blocks, 0.84x interleaved; two queues x 2 threads 0.97-1.04x of two
/// queues with blocks, 0.61-0.66x interleaved (blk-mq hands a submitter neighbouring
/// tags, so a block keeps one submitter's requests on one thread).
fn tag_share(depth: u16, thread: u16, threads: u16) -> (u16, u16) {
    let n = u32::from(threads.max(1));
    let at = |k: u32| (u32::from(depth) * k / n) as u16;
    (at(u32::from(thread)), at(u32::from(thread) + 1))
}

/// The queue thread: set up, report Ready, serve.
fn run(
    cfg: QueueConfig,
    target: &dyn Target,
    cdev: &OwnedFd,
    wake: OwnedFd,
    stats: &QueueStats,
    events: &Sender<QueueEvent>,
) -> Result<()> {
    let q_id = cfg.q_id;
    let qerr = |msg: String| Error::Queue { q_id, msg };
    // Bind first, so that the ring and the buffers are allocated on this CPU's node.
    if let Some(cpus) = &cfg.cpus {
        crate::sys::set_thread_affinity(cpus).map_err(|e| qerr(format!("binding to CPUs {cpus:?}: {e}")))?;
    }
    // This thread serves writeback; memory reclaim must not wait on it.
    let io_flusher = match crate::sys::set_io_flusher() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(q_id, "PR_SET_IO_FLUSHER failed: {e}");
            false
        }
    };
    let descs = IoDescTable::map(std::os::fd::AsFd::as_fd(cdev), q_id, cfg.depth)
        .map_err(|e| qerr(format!("mapping io descriptors: {e}")))?;
    // Copy mode needs a buffer per tag; in the zero-copy modes data stays in the
    // request's pages, and in `none` (USER_COPY, a target that moves no data) nowhere.
    let region = if !cfg.buffer_mode.needs_buffers() {
        None
    } else {
        let total = usize::from(cfg.depth) * cfg.buf_size as usize;
        let r = Region::new(total, cfg.huge_pages)
            .map_err(|e| qerr(format!("allocating {total} bytes of buffers: {e}")))?;
        Some(r)
    };
    let batch = cfg.protocol == IoProtocol::Batch;
    let mut asked = QueueSetup::new(q_id, cfg.depth, cfg.buf_size);
    let qt = target.open_queue(&mut asked).map_err(|e| qerr(format!("opening {} target: {e}", target.name())))?;
    let setup = RingSetup {
        ring: cfg.ring,
        mode: cfg.buffer_mode,
        region,
        batch,
        offload_min: cfg.offload_min,
        owned: asked.mem,
        target_wake: asked.waker,
        shmem: cfg.shmem.clone(),
    };
    let ring = QueueRing::new(q_id, cfg.depth, cfg.buf_size, setup, wake, cdev.as_raw_fd(), &asked.fds)
        .map_err(|e| qerr(format!("setting up io_uring: {e}")))?;
    let report = QueueReport {
        q_id,
        thread: cfg.thread,
        tid: crate::sys::gettid(),
        cpus: cfg.cpus.clone(),
        ring: ring.ring_mode(),
        ring_fd_registered: ring.ring_fd_registered(),
        buffer_mode: cfg.buffer_mode,
        pages: ring.page_kind(),
        fixed_buffers: ring.fixed_buffers(),
        io_flusher,
    };
    let (first_tag, tag_end) = tag_share(cfg.depth, cfg.thread, cfg.threads);
    let g = Geometry {
        q_id,
        depth: cfg.depth,
        buf_size: cfg.buf_size,
        dev_size: cfg.dev_size,
        read_only: cfg.read_only,
        first_tag,
        tag_end,
        user_copy: cfg.buffer_mode == crate::buf::BufferMode::UserCopy,
        protocol: cfg.protocol,
        size_now: crate::sys::disk_bytes,
        dev_id: cfg.dev_id,
    };
    let mut reactor = Reactor::new(ring, qt, descs, g, events.clone(), stats);
    let what = if batch { "PREP_IO_CMDS / FETCH_IO_CMDS" } else { "FETCH_REQ" };
    reactor.arm().map_err(|errno| qerr(format!("submitting {what}: {}", std::io::Error::from_raw_os_error(-errno))))?;
    reactor.start().map_err(|errno| {
        qerr(format!("starting the {} target: {}", target.name(), std::io::Error::from_raw_os_error(-errno)))
    })?;
    let _ = events.send(QueueEvent::Ready(report));
    reactor.serve().map_err(|e| qerr(format!("io_uring_enter: {e}")))
}
