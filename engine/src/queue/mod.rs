//! The data plane: one reactor per hardware queue, on its own pinned thread.
//!
//! Each pass of the loop submits everything the previous pass queued (commits and
//! target IO) with a single `io_uring_enter`, waits for at least one completion,
//! then handles every CQE that is ready.

pub mod ring;
pub mod stats;
pub mod tag;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use crate::buf::BufferMode;
use crate::error::{Error, Result};
use crate::sys::mmap::{IoDescTable, PageKind, Region};
use crate::sys::uapi::{self, IoDesc};
use crate::target::{Disposition, IoCtx, IoRequest, Op, QueueSetup, QueueTarget, Target};
use ring::{RingMode, RingSetup, SqWriter};
use stats::{QueueStats, Recorder};
use std::time::Instant;
use tag::Kind;

/// What one queue thread needs to know.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub q_id: u16,
    pub depth: u16,
    /// Bytes per tag buffer (`max_io_buf_bytes`).
    pub buf_size: u32,
    /// CPUs to bind the thread to (None: leave unbound).
    pub cpus: Option<Vec<usize>>,
    /// Try hugepage-backed buffers.
    pub huge_pages: bool,
    pub dev_size: u64,
    pub buffer_mode: BufferMode,
    /// Ring flags (None: the default, COOP_TASKRUN).
    pub ring: Option<RingMode>,
    /// How requests are fetched and committed.
    pub protocol: IoProtocol,
    /// Target IO of at least this many bytes is punted to io_uring's workers.
    pub offload_min: Option<u32>,
}

/// How a queue fetches and commits requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoProtocol {
    /// FETCH_REQ / COMMIT_AND_FETCH_REQ, one command per tag (every kernel).
    #[default]
    PerTag,
    /// UBLK_F_BATCH_IO (7.0+): one PREP_IO_CMDS, a multishot FETCH_IO_CMDS that
    /// delivers many tags per completion, one COMMIT_IO_CMDS per pass.
    Batch,
}

impl IoProtocol {
    pub fn name(self) -> &'static str {
        match self {
            IoProtocol::PerTag => "per-tag",
            IoProtocol::Batch => "batch",
        }
    }
}

impl std::fmt::Display for IoProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The [`name`](IoProtocol::name)s.
#[cfg(feature = "clap")]
impl clap::ValueEnum for IoProtocol {
    fn value_variants<'a>() -> &'a [Self] {
        &[IoProtocol::PerTag, IoProtocol::Batch]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// How a queue came up, for the startup report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueReport {
    pub q_id: u16,
    pub tid: i32,
    pub cpus: Option<Vec<usize>>,
    pub ring: RingMode,
    /// The ring's fd is registered (IORING_REGISTER_RING_FDS).
    pub ring_fd_registered: bool,
    pub buffer_mode: BufferMode,
    /// Pages behind the per-tag buffers (copy mode; None in the other modes).
    pub pages: Option<PageKind>,
    pub fixed_buffers: bool,
    pub io_flusher: bool,
}

/// Messages from queue threads to the control thread.
#[derive(Debug)]
pub enum QueueEvent {
    /// Every tag is fetched: START_DEV may go ahead.
    Ready(QueueReport),
    /// The thread ended; Err if it failed (before or after Ready).
    Exited { q_id: u16, result: Result<(), String> },
    /// The target panicked: the queue fails every request from now on.
    TargetFailed { q_id: u16, msg: String },
}

/// The control thread's handle on a running queue thread.
#[derive(Debug)]
pub struct QueueHandle {
    pub q_id: u16,
    pub join: JoinHandle<()>,
    pub wake: OwnedFd,
    pub stats: Arc<QueueStats>,
}

impl QueueHandle {
    /// Asks the thread to finish (once nothing is in flight) and exit.
    pub fn wake(&self) {
        self.signal(WAKE_STOP);
    }

    /// Asks the thread to exit now, giving up on requests still in the target (the
    /// kernel fails or, with recovery, re-queues them once the thread is gone).
    pub fn abort(&self) {
        self.signal(WAKE_ABORT);
    }

    fn signal(&self, value: u64) {
        use std::os::fd::AsFd;
        if let Err(e) = crate::sys::eventfd_add(self.wake.as_fd(), value) {
            tracing::warn!(q_id = self.q_id, "cannot wake queue thread: {e}");
        }
    }
}

thread_local! {
    /// Set while a queue thread is inside its target (a panic there is caught).
    static IN_TARGET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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
pub fn crash_on_queue_panic(dev_id: u32) {
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
                // SAFETY: _exit ends the process at once; nothing runs after it.
                unsafe { libc::_exit(1) };
            }
        }));
    });
}

/// Wake-up values added to a queue's eventfd (a read returns their sum).
const WAKE_STOP: u64 = 1;
const WAKE_ABORT: u64 = 1 << 32;

/// Starts queue thread `cfg.q_id`. The thread sends `Ready` once its tags are fetched
/// and `Exited` when it ends, whatever the reason (a panic included).
pub fn spawn(
    cfg: QueueConfig,
    target: Arc<dyn Target>,
    cdev: Arc<OwnedFd>,
    events: Sender<QueueEvent>,
) -> Result<QueueHandle> {
    let q_id = cfg.q_id;
    let wake = crate::sys::eventfd().map_err(|e| Error::io("creating eventfd", e))?;
    let wake_thread = wake.try_clone().map_err(|e| Error::io("dup eventfd", e))?;
    let stats = Arc::new(QueueStats::new(cfg.protocol == IoProtocol::Batch));
    let stats_thread = Arc::clone(&stats);
    let join = std::thread::Builder::new()
        .name(format!("ubd-q{q_id}"))
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

/// Test hook: `UBD_DEBUG_QUEUE_PANIC=N` makes queue 0's thread (not its target) panic
/// at its N-th request, to test what a dying queue thread leaves behind.
fn debug_panic_after() -> Option<u64> {
    std::env::var("UBD_DEBUG_QUEUE_PANIC").ok()?.parse().ok()
}

/// The text of a panic, for the one-line error.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

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
    let bufs = RingSetup { ring: cfg.ring, mode: cfg.buffer_mode, region, batch, offload_min: cfg.offload_min };
    let mut setup = QueueSetup::default();
    let qt = target.open_queue(q_id, &mut setup).map_err(|e| qerr(format!("opening {} target: {e}", target.name())))?;
    let sq = SqWriter::new(q_id, cfg.depth, cfg.buf_size, bufs, wake, cdev.as_raw_fd(), &setup.fds)
        .map_err(|e| qerr(format!("setting up io_uring: {e}")))?;
    let report = QueueReport {
        q_id,
        tid: crate::sys::gettid(),
        cpus: cfg.cpus.clone(),
        ring: sq.ring_mode,
        ring_fd_registered: sq.ring_fd_registered(),
        buffer_mode: cfg.buffer_mode,
        pages: sq.page_kind(),
        fixed_buffers: sq.fixed_buffers(),
        io_flusher,
    };
    let mut q = Queue {
        sq,
        target: qt,
        descs,
        slots: vec![Slot::Idle; usize::from(cfg.depth)],
        q_id,
        depth: cfg.depth,
        buf_size: cfg.buf_size,
        dev_size: cfg.dev_size,
        cmds_inflight: 0,
        in_target: 0,
        stopping: false,
        aborting: false,
        poisoned: false,
        events: events.clone(),
        tag_sqes: vec![0; usize::from(cfg.depth)],
        panic_after: if q_id == 0 { debug_panic_after() } else { None },
        errors_seen: 0,
        stats,
        recorder: Recorder::default(),
        started: vec![Instant::now(); usize::from(cfg.depth)],
        fetch_armed: false,
        fetched: Vec::with_capacity(usize::from(cfg.depth)),
    };
    let what = if batch { "PREP_IO_CMDS / FETCH_IO_CMDS" } else { "FETCH_REQ" };
    q.arm().map_err(|errno| qerr(format!("submitting {what}: {}", std::io::Error::from_raw_os_error(-errno))))?;
    let _ = events.send(QueueEvent::Ready(report));
    q.serve().map_err(|e| qerr(format!("io_uring_enter: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not yet fetched.
    Idle,
    /// FETCH or COMMIT_AND_FETCH is with the kernel.
    Fetching,
    /// A request is being served by the target.
    InTarget(IoRequest),
    /// The kernel aborted the tag (device going away): not re-issued.
    Dead,
}

// Field order: `sq` (the ring) is dropped before the target and the descriptor map.
struct Queue<'a> {
    sq: SqWriter,
    target: Box<dyn QueueTarget>,
    descs: IoDescTable,
    slots: Vec<Slot>,
    q_id: u16,
    depth: u16,
    buf_size: u32,
    dev_size: u64,
    cmds_inflight: u32,
    in_target: u32,
    stopping: bool,
    /// Told to abort: give up on requests still in the target and exit now.
    aborting: bool,
    /// The target panicked: it is not called again, and every request on this queue
    /// fails with EIO until the device is stopped.
    poisoned: bool,
    events: Sender<QueueEvent>,
    /// Target SQEs in flight per tag.
    tag_sqes: Vec<u16>,
    /// Test hook (`UBD_DEBUG_QUEUE_PANIC=N`): the thread itself dies at the N-th request.
    panic_after: Option<u64>,
    errors_seen: u64,
    stats: &'a QueueStats,
    recorder: Recorder,
    /// When each tag's current request was delivered.
    started: Vec<Instant>,
    /// Batch mode: the multishot FETCH_IO_CMDS is with the kernel.
    fetch_armed: bool,
    /// Batch mode: scratch list of the tags of one fetch completion.
    fetched: Vec<u16>,
}

impl Queue<'_> {
    /// FETCH_REQ for every tag plus the wake-up read, submitted at once.
    fn arm(&mut self) -> Result<(), i32> {
        if self.sq.is_batch() {
            // PREP first (and alone): the tags must be prepared before the fetch.
            let res = self.sq.prep_all()?;
            if res < 0 {
                return Err(res);
            }
            self.slots.fill(Slot::Fetching);
            self.sq.push_fetch()?;
            self.fetch_armed = true;
            self.sq.push_wake()?;
            self.sq.submit(0).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
            return Ok(());
        }
        for tag in 0..self.depth {
            self.sq.push_ublk(tag, None)?;
            self.slots[usize::from(tag)] = Slot::Fetching;
            self.cmds_inflight += 1;
        }
        self.sq.push_wake()?;
        self.sq.submit(0).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
        Ok(())
    }

    fn done(&self) -> bool {
        if self.aborting {
            return true;
        }
        if self.sq.target_inflight > 0 || self.sq.aux_inflight > 0 || self.in_target > 0 {
            return false;
        }
        if self.sq.is_batch() {
            // Commits queued or in flight name memory of ours: wait for them.
            return !self.sq.commits_busy() && (!self.fetch_armed || self.stopping);
        }
        self.cmds_inflight == 0 || self.stopping
    }

    fn serve(&mut self) -> std::io::Result<()> {
        let mut cqes = Vec::with_capacity(usize::from(self.depth) * 2 + 1);
        while !self.done() {
            let recorder = &mut self.recorder;
            if let Err(errno) = self.sq.flush_commits(|elements| recorder.record_commit(elements)) {
                tracing::error!(q_id = self.q_id, "cannot queue COMMIT_IO_CMDS: errno {}", -errno);
            }
            // With statistics not yet published, wake up in time to publish them.
            let sqes = if self.recorder.dirty() {
                self.sq.submit_wait_timeout(stats::FLUSH_INTERVAL)?
            } else {
                self.sq.submit(1)?
            };
            cqes.clear();
            self.sq.reap(&mut cqes);
            self.recorder.tick();
            for &(ud, res, flags) in &cqes {
                self.handle(ud, res, flags);
            }
            self.recorder.record_pass(cqes.len() as u64, sqes as u64, u64::from(self.in_target));
            self.recorder.maybe_flush(self.stats, false);
        }
        self.recorder.maybe_flush(self.stats, true);
        if self.aborting && (self.in_target > 0 || self.sq.target_inflight > 0 || self.sq.aux_inflight > 0) {
            tracing::warn!(
                q_id = self.q_id,
                "aborting with {} requests in the target ({} target SQEs in flight): the kernel fails them",
                self.in_target,
                self.sq.target_inflight
            );
            self.sq.abandon_buffers();
        }
        tracing::debug!(q_id = self.q_id, cmds = self.cmds_inflight, stopping = self.stopping, "queue loop done");
        Ok(())
    }

    fn handle(&mut self, user_data: u64, res: i32, cqe_flags: u32) {
        let Some((kind, tag, cookie)) = tag::decode(user_data) else {
            tracing::error!(q_id = self.q_id, user_data, "CQE with unknown user_data");
            return;
        };
        match kind {
            Kind::Wake if self.sq.wake_value() >= WAKE_ABORT => {
                tracing::debug!(q_id = self.q_id, "wake-up: aborting");
                self.aborting = true;
            }
            Kind::Wake => {
                tracing::debug!(q_id = self.q_id, "wake-up: stopping");
                self.stopping = true;
                // Armed again, for an abort.
                if self.sq.push_wake().is_err() {
                    tracing::warn!(q_id = self.q_id, "cannot re-arm the wake-up read");
                }
            }
            Kind::Ublk => self.on_ublk(tag, res),
            Kind::Fetch => self.on_fetch(res, cqe_flags),
            Kind::Commit => match self.sq.on_commit(cookie, res) {
                ring::CommitOutcome::Done => {}
                ring::CommitOutcome::Refused { tag, errno } => {
                    tracing::error!(
                        q_id = self.q_id,
                        tag,
                        "COMMIT_IO_CMDS refused the tag: {}",
                        std::io::Error::from_raw_os_error(-errno)
                    );
                    if let Some(slot) = self.slots.get_mut(usize::from(tag)) {
                        *slot = Slot::Dead;
                    }
                }
            },
            Kind::Target => self.on_target(tag, cookie, res),
            Kind::Aux => {
                self.sq.aux_inflight -= 1;
                if res < 0 {
                    tracing::error!(
                        q_id = self.q_id,
                        tag,
                        "request buffer (un)registration failed: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                }
            }
        }
    }

    /// A multishot FETCH_IO_CMDS completion: new requests on the tags it names.
    fn on_fetch(&mut self, res: i32, cqe_flags: u32) {
        let mut tags = std::mem::take(&mut self.fetched);
        self.sq.take_fetched(res, cqe_flags, &mut tags);
        self.recorder.record_fetch(tags.len());
        for &tag in &tags {
            match self.slots.get(usize::from(tag)) {
                Some(Slot::Fetching) => self.start_request(tag),
                other => {
                    tracing::error!(q_id = self.q_id, tag, ?other, "fetched a tag the kernel does not own");
                }
            }
        }
        self.fetched = tags;
        if io_uring::cqueue::more(cqe_flags) {
            return;
        }
        self.fetch_armed = false;
        match res {
            uapi::IO_RES_ABORT => tracing::debug!(q_id = self.q_id, "FETCH_IO_CMDS aborted: the device is going away"),
            _ if self.stopping || self.aborting => {}
            r if r >= 0 || r == -libc::ENOBUFS => {
                tracing::debug!(q_id = self.q_id, res, "FETCH_IO_CMDS ended; armed again");
                match self.sq.push_fetch() {
                    Ok(()) => self.fetch_armed = true,
                    Err(errno) => tracing::error!(q_id = self.q_id, "cannot re-arm FETCH_IO_CMDS: errno {}", -errno),
                }
            }
            r => tracing::error!(
                q_id = self.q_id,
                "FETCH_IO_CMDS failed: {}; no more requests on this queue",
                std::io::Error::from_raw_os_error(-r)
            ),
        }
    }

    /// A request arrived on `tag`: decode it and hand it to the target.
    fn start_request(&mut self, tag: u16) {
        let idx = usize::from(tag);
        if let Some(n) = self.panic_after.as_mut() {
            *n = n.saturating_sub(1);
            assert!(*n > 0, "UBD_DEBUG_QUEUE_PANIC: queue thread {} dies as asked", self.q_id);
        }
        self.started[idx] = self.recorder.now();
        let desc = self.descs.get(tag);
        match decode_request(tag, &desc, self.buf_size, self.dev_size) {
            Ok(req) => {
                self.slots[idx] = Slot::InTarget(req);
                self.in_target += 1;
                if let Disposition::Done(r) = self.call_target(tag, |t, io| t.submit(&req, io)) {
                    self.commit(tag, r);
                }
            }
            Err(errno) => {
                self.recorder.count_bad_request();
                tracing::warn!(q_id = self.q_id, tag, ?desc, "rejecting malformed request");
                self.slots[idx] = Slot::InTarget(IoRequest { tag, op: Op::Flush, flags: 0, offset: 0, len: 0 });
                self.in_target += 1;
                self.commit(tag, errno);
            }
        }
    }

    fn on_ublk(&mut self, tag: u16, res: i32) {
        self.cmds_inflight -= 1;
        let idx = usize::from(tag);
        match res {
            uapi::IO_RES_OK => self.start_request(tag),
            uapi::IO_RES_ABORT => self.slots[idx] = Slot::Dead,
            other => {
                tracing::error!(
                    q_id = self.q_id,
                    tag,
                    "ublk io command failed: {}",
                    std::io::Error::from_raw_os_error(-other)
                );
                self.slots[idx] = Slot::Dead;
            }
        }
    }

    fn on_target(&mut self, tag: u16, cookie: u16, res: i32) {
        self.sq.target_inflight -= 1;
        let Some(Slot::InTarget(req)) = self.slots.get(usize::from(tag)).copied() else {
            tracing::error!(q_id = self.q_id, tag, "target completion for a tag not in the target");
            return;
        };
        let idx = usize::from(tag);
        self.tag_sqes[idx] = self.tag_sqes[idx].saturating_sub(1);
        if self.poisoned {
            // The target is not called again; the request fails once none of its SQEs
            // is in flight (they may still use its buffer).
            if self.tag_sqes[idx] == 0 {
                self.commit(tag, -libc::EIO);
            }
            return;
        }
        if let Disposition::Done(r) = self.call_target(tag, |t, io| t.complete(&req, cookie, res, io)) {
            self.commit(tag, r);
        }
    }

    /// Calls into the target for `tag`. A panic there poisons the queue: the request
    /// fails with EIO (once its SQEs are done), as does every later one, and the
    /// control thread is told so that it stops the device.
    fn call_target(
        &mut self,
        tag: u16,
        f: impl FnOnce(&mut dyn QueueTarget, &mut IoCtx<'_>) -> Disposition,
    ) -> Disposition {
        if self.poisoned {
            return Disposition::Done(-libc::EIO);
        }
        let before = self.sq.target_inflight;
        let target = &mut *self.target;
        let mut io = IoCtx { sq: &mut self.sq, tag };
        IN_TARGET.with(|t| t.set(true));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(target, &mut io)));
        IN_TARGET.with(|t| t.set(false));
        let pushed = self.sq.target_inflight.saturating_sub(before);
        let idx = usize::from(tag);
        self.tag_sqes[idx] = self.tag_sqes[idx].saturating_add(u16::try_from(pushed).unwrap_or(u16::MAX));
        match out {
            Ok(d) => d,
            Err(payload) => {
                let msg = format!("target panicked: {}", panic_message(&*payload));
                tracing::error!(q_id = self.q_id, "{msg}; failing every request on this queue");
                let _ = self.events.send(QueueEvent::TargetFailed { q_id: self.q_id, msg });
                self.poisoned = true;
                if self.tag_sqes[idx] == 0 { Disposition::Done(-libc::EIO) } else { Disposition::Pending }
            }
        }
    }

    /// Logs a failed request: the first few, then one in every thousand.
    fn log_error(&mut self, req: &IoRequest, res: i32) {
        self.errors_seen += 1;
        let n = self.errors_seen;
        if n <= 10 || n.is_multiple_of(1000) {
            let err = std::io::Error::from_raw_os_error(-res);
            tracing::warn!(
                q_id = self.q_id,
                "{:?} at byte {} length {} failed: {err} (error {n} on this queue)",
                req.op,
                req.offset,
                req.len
            );
        }
    }

    /// Completes the request on `tag` with `res` and fetches the next one.
    fn commit(&mut self, tag: u16, res: i32) {
        let idx = usize::from(tag);
        if let Slot::InTarget(req) = self.slots[idx] {
            self.in_target -= 1;
            self.recorder.record(req.op, res, self.started[idx]);
            if res < 0 {
                self.log_error(&req, res);
            }
        }
        if self.sq.is_batch() {
            match self.sq.queue_commit(tag, res) {
                Ok(()) => self.slots[idx] = Slot::Fetching,
                Err(errno) => {
                    tracing::error!(q_id = self.q_id, tag, "cannot queue COMMIT_IO_CMDS: errno {}", -errno);
                    self.slots[idx] = Slot::Dead;
                }
            }
            return;
        }
        match self.sq.push_ublk(tag, Some(res)) {
            Ok(()) => {
                self.cmds_inflight += 1;
                self.slots[idx] = Slot::Fetching;
            }
            Err(errno) => {
                tracing::error!(q_id = self.q_id, tag, "cannot queue COMMIT_AND_FETCH: errno {}", -errno);
                self.slots[idx] = Slot::Dead;
            }
        }
    }
}

/// Turns a kernel descriptor into a checked request, or the `-errno` to fail it with.
pub fn decode_request(tag: u16, desc: &IoDesc, buf_size: u32, dev_size: u64) -> Result<IoRequest, i32> {
    let op = match desc.op() {
        uapi::IO_OP_READ => Op::Read,
        uapi::IO_OP_WRITE => Op::Write,
        uapi::IO_OP_FLUSH => Op::Flush,
        uapi::IO_OP_DISCARD => Op::Discard,
        uapi::IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(-libc::EOPNOTSUPP),
    };
    if op == Op::Flush {
        // A flush has no range: the kernel sends start_sector = -1 and no sectors.
        return Ok(IoRequest { tag, op, flags: desc.flags(), offset: 0, len: 0 });
    }
    let offset = desc.start_sector.checked_mul(512).ok_or(-libc::EIO)?;
    let len = u64::from(desc.nr_sectors) * 512;
    {
        let end = offset.checked_add(len).ok_or(-libc::EIO)?;
        if len == 0 || end > dev_size {
            return Err(-libc::EIO);
        }
    }
    if matches!(op, Op::Read | Op::Write) && len > u64::from(buf_size) {
        return Err(-libc::EIO);
    }
    Ok(IoRequest { tag, op, flags: desc.flags(), offset, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u8, flags: u32, start: u64, nr: u32) -> IoDesc {
        IoDesc { op_flags: u32::from(op) | flags, nr_sectors: nr, start_sector: start, addr: 0 }
    }

    #[test]
    fn decodes_good_requests() {
        let r = decode_request(3, &desc(uapi::IO_OP_WRITE, uapi::IO_F_FUA, 8, 16), 1 << 19, 1 << 20).unwrap();
        assert_eq!(r, IoRequest { tag: 3, op: Op::Write, flags: uapi::IO_F_FUA, offset: 4096, len: 8192 });
        assert!(r.fua());
        let f = decode_request(0, &desc(uapi::IO_OP_FLUSH, 0, 0, 0), 4096, 4096).unwrap();
        assert_eq!((f.op, f.len), (Op::Flush, 0));
        // What the kernel really sends for an empty flush (seen on 6.12).
        let f = decode_request(0, &desc(uapi::IO_OP_FLUSH, 0, u64::MAX, 0), 4096, 4096).unwrap();
        assert_eq!((f.op, f.offset, f.len), (Op::Flush, 0, 0));
        // A discard larger than the buffer is fine: it carries no data.
        let d = decode_request(0, &desc(uapi::IO_OP_DISCARD, 0, 0, 2048), 4096, 1 << 20).unwrap();
        assert_eq!(d.len, 1 << 20);
        // The last sector of the device.
        decode_request(0, &desc(uapi::IO_OP_READ, 0, 2047, 1), 4096, 1 << 20).unwrap();
    }

    #[test]
    fn rejects_bad_requests() {
        let dev = 1u64 << 20;
        // Past the end, zero length, bigger than the buffer, unknown op, overflow.
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_READ, 0, 2048, 1), 4096, dev), Err(-libc::EIO));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_READ, 0, 0, 0), 4096, dev), Err(-libc::EIO));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_WRITE, 0, 0, 9), 4096, dev), Err(-libc::EIO));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_WRITE_SAME, 0, 0, 1), 4096, dev), Err(-libc::EOPNOTSUPP));
        assert_eq!(decode_request(0, &desc(77, 0, 0, 1), 4096, dev), Err(-libc::EOPNOTSUPP));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_READ, 0, u64::MAX / 256, 1), 4096, u64::MAX), Err(-libc::EIO));
        assert_eq!(
            decode_request(0, &desc(uapi::IO_OP_DISCARD, 0, u64::MAX / 512, 8), 4096, u64::MAX),
            Err(-libc::EIO)
        );
    }
}
