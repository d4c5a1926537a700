//! The reactor: one queue's request state machine.
//!
//! Each tag is in one [`Slot`] state: fetching (the kernel has it), in the target, or
//! dead (the kernel aborted it). A pass of [`Reactor::serve`] submits everything the
//! previous pass queued (commits and target IO) with one `io_uring_enter`, waits for at
//! least one completion, then handles every completion that is ready. The reactor
//! knows its ring only through [`Ring`] + [`BatchRing`] and the descriptors through
//! [`Descs`], so the unit tests below drive it with synthetic completions, no kernel.

use std::sync::mpsc::Sender;

use super::config::{IoProtocol, QueueEvent};
use super::stats::{self, QueueStats, Recorder};
use crate::hooks::QueuePanic;
use crate::request::{IoRequest, Op, decode_request};
use crate::ring::io::Owner;
use crate::ring::{BatchRing, CommitOutcome, Cqe, Kind, Ring, errno_of};
use crate::sys::uapi::{self, IoDesc};
use crate::target::{Disposition, Inflight, IoCtx, QueueTarget};

/// Wake-up values added to a queue's eventfd (a read returns their sum).
pub(crate) const WAKE_STOP: u64 = 1;
pub(crate) const WAKE_ABORT: u64 = 1 << 32;

thread_local! {
    /// Set while a queue thread is inside its target (a panic there is caught).
    pub(crate) static IN_TARGET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The kernel's request descriptors of one queue.
pub(crate) trait Descs {
    /// A copy of the descriptor of `tag`'s current request.
    fn get(&self, tag: u16) -> IoDesc;
}

impl Descs for crate::sys::mmap::IoDescTable {
    fn get(&self, tag: u16) -> IoDesc {
        crate::sys::mmap::IoDescTable::get(self, tag)
    }
}

/// The text of a panic, for the one-line error.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not yet fetched.
    Idle,
    /// FETCH or COMMIT_AND_FETCH is with the kernel (or, batch, the tag is prepared
    /// and its commit queued or sent).
    Fetching,
    /// A request is being served by the target.
    InTarget(IoRequest),
    /// User copy: a write's data is being read from the char device into the tag's
    /// buffer; the target gets the request once it is there.
    CopyIn(IoRequest),
    /// User copy: the target read the request's data (result given); it is being
    /// written to the char device, and the request is committed once it is there.
    CopyOut(IoRequest, i32),
    /// The kernel aborted the tag (device going away), or its commit could not be
    /// sent: not re-issued.
    Dead,
}

/// The fixed facts of a reactor's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) q_id: u16,
    pub(crate) depth: u16,
    pub(crate) buf_size: u32,
    pub(crate) dev_size: u64,
    /// Writes, discards and write-zeroes fail with EROFS, unseen by the target.
    pub(crate) read_only: bool,
    /// The tags this reactor serves: `first_tag..tag_end` (a block of the queue's tags
    /// with several threads per queue, UBLK_F_PER_IO_DAEMON; 0..depth for the whole queue).
    pub(crate) first_tag: u16,
    pub(crate) tag_end: u16,
    /// Buffer mode user-copy: the queue moves request data through the char device
    /// ([`Ring::push_user_copy`]) before and after the target.
    pub(crate) user_copy: bool,
    pub(crate) protocol: IoProtocol,
    /// The device's size now, as the kernel has it (bytes), read when a request ends
    /// past `dev_size`: the device may have grown (UPDATE_SIZE). None: unknown.
    pub(crate) size_now: fn(dev_id: u32) -> Option<u64>,
    pub(crate) dev_id: u32,
}

/// One queue's state machine over ring `R` and descriptors `D`.
// Field order: `ring` is dropped before the target and the descriptor map.
pub(crate) struct Reactor<'a, R: Ring + BatchRing, D: Descs> {
    ring: R,
    target: Box<dyn QueueTarget>,
    descs: D,
    g: Geometry,
    slots: Vec<Slot>,
    /// Target SQEs in flight, per request and for the queue.
    inflight: Inflight,
    /// Requests a target call finished for other tags ([`IoCtx::finish`]).
    finished: Vec<(u16, i32)>,
    /// Zone appends a target call placed ([`IoCtx::zone_appended`]), and per tag the
    /// sector its zone append wrote at, for its commit.
    appended: Vec<(u16, u64)>,
    append_at: Vec<Option<u64>>,
    /// The target's `stop` has been called.
    stop_called: bool,
    /// Requests the target finished while SQEs of theirs were still in flight: committed
    /// (with this result) once those complete, without calling the target again.
    deferred: Vec<Option<i32>>,
    /// Per-tag protocol: FETCH / COMMIT_AND_FETCH commands with the kernel.
    cmds_inflight: u32,
    /// Batch protocol: the multishot FETCH_IO_CMDS is with the kernel.
    fetch_armed: bool,
    /// Requests in the target (user copy: and those whose data is being copied).
    in_target: u32,
    /// User-copy reads and writes of the char device in flight (they use tag buffers).
    copies_inflight: u32,
    stopping: bool,
    /// Told to abort: give up on requests still in the target and exit now.
    aborting: bool,
    /// The target panicked: it is not called again, and every request on this queue
    /// fails with EIO until the device is stopped.
    poisoned: bool,
    events: Sender<QueueEvent>,
    panic_hook: QueuePanic,
    errors_seen: u64,
    stats: &'a QueueStats,
    recorder: Recorder,
    /// When each tag's current request was delivered.
    started: Vec<std::time::Instant>,
    /// Batch mode: scratch list of the tags of one fetch completion.
    fetched: Vec<u16>,
}

impl<R: Ring + BatchRing, D: Descs> Drop for Reactor<'_, R, D> {
    fn drop(&mut self) {
        // Gone with target IO in flight (an abort, a panic): the ring's teardown in the
        // kernel is asynchronous, so the buffers that IO uses must stay mapped.
        if self.inflight.requests > 0 || self.inflight.queue > 0 || self.copies_inflight > 0 {
            self.ring.abandon_buffers();
        }
    }
}

impl<'a, R: Ring + BatchRing, D: Descs> Reactor<'a, R, D> {
    pub(crate) fn new(
        ring: R,
        target: Box<dyn QueueTarget>,
        descs: D,
        g: Geometry,
        events: Sender<QueueEvent>,
        stats: &'a QueueStats,
    ) -> Self {
        let depth = usize::from(g.depth);
        Self {
            ring,
            target,
            descs,
            g,
            slots: vec![Slot::Idle; depth],
            inflight: Inflight::new(g.depth),
            finished: Vec::new(),
            appended: Vec::new(),
            append_at: vec![None; depth],
            stop_called: false,
            deferred: vec![None; depth],
            cmds_inflight: 0,
            fetch_armed: false,
            in_target: 0,
            copies_inflight: 0,
            stopping: false,
            aborting: false,
            poisoned: false,
            events,
            panic_hook: QueuePanic::new(g.q_id),
            errors_seen: 0,
            stats,
            recorder: Recorder::default(),
            started: vec![std::time::Instant::now(); depth],
            fetched: Vec::with_capacity(depth),
        }
    }

    /// Hands every tag to the kernel (FETCH_REQ each, or PREP_IO_CMDS and the multishot
    /// FETCH_IO_CMDS) and arms the wake-up read, submitted at once.
    pub(crate) fn arm(&mut self) -> Result<(), i32> {
        match self.g.protocol {
            IoProtocol::Batch => {
                // PREP first (and alone): the tags must be prepared before the fetch.
                let res = self.ring.prep_all()?;
                if res < 0 {
                    return Err(res);
                }
                self.slots.fill(Slot::Fetching);
                self.ring.push_fetch()?;
                self.fetch_armed = true;
            }
            IoProtocol::PerTag => {
                for tag in self.g.first_tag..self.g.tag_end.min(self.g.depth) {
                    self.ring.push_ublk(tag, None)?;
                    self.slots[usize::from(tag)] = Slot::Fetching;
                    self.cmds_inflight += 1;
                }
            }
        }
        self.ring.push_wake()?;
        self.ring.submit(0).map_err(|e| errno_of(&e))?;
        Ok(())
    }

    /// The target's start hook, then the waker's read: the queue is about to serve.
    pub(crate) fn start(&mut self) -> Result<(), i32> {
        let started = self.call(Owner::Queue, |t, io| t.start(io));
        self.after_call(started.is_none());
        started.unwrap_or(Err(-libc::EIO))?;
        self.ring.push_target_wake()
    }

    /// Does the kernel still hold a fetch of ours (a tag it may send a request on)?
    fn fetching(&self) -> bool {
        match self.g.protocol {
            IoProtocol::Batch => self.fetch_armed,
            IoProtocol::PerTag => self.cmds_inflight > 0,
        }
    }

    /// Nothing is left to wait for: told to abort, or nothing of ours is in flight and
    /// the kernel holds no fetch (it aborted them all), or we are told to stop.
    fn done(&self) -> bool {
        if self.aborting {
            return true;
        }
        if self.inflight.requests > 0 || self.inflight.queue > 0 || self.in_target > 0 || self.ring.busy() {
            return false;
        }
        !self.fetching() || self.stopping
    }

    /// Once no request is in the target and none can come (told to stop, or the
    /// kernel aborted every fetch), the target's stop hook ends its queue IO.
    fn maybe_stop(&mut self) {
        if self.stop_called || self.aborting || self.in_target > 0 || (self.fetching() && !self.stopping) {
            return;
        }
        self.stop_called = true;
        self.call_queue(|t, io| t.stop(io));
    }

    /// Serves requests until [`done`](Self::done).
    pub(crate) fn serve(&mut self) -> std::io::Result<()> {
        let mut cqes = Vec::with_capacity(usize::from(self.g.depth) * 2 + 1);
        loop {
            self.maybe_stop();
            if self.done() {
                break;
            }
            self.pass(&mut cqes)?;
        }
        self.recorder.maybe_flush(self.stats, true);
        let left = self.inflight.requests + self.inflight.queue;
        if self.aborting && (self.in_target > 0 || left > 0 || self.ring.busy()) {
            tracing::warn!(
                q_id = self.g.q_id,
                "aborting with {} requests in the target ({left} target SQEs in flight): the kernel fails them",
                self.in_target,
            );
            self.ring.abandon_buffers();
        }
        tracing::debug!(q_id = self.g.q_id, cmds = self.cmds_inflight, stopping = self.stopping, "queue loop done");
        Ok(())
    }

    /// One pass: queue the batch's commits, submit and wait, handle what completed.
    fn pass(&mut self, cqes: &mut Vec<Cqe>) -> std::io::Result<()> {
        if self.g.protocol == IoProtocol::Batch {
            let recorder = &mut self.recorder;
            if let Err(errno) = self.ring.flush_commits(&mut |elements| recorder.record_commit(elements)) {
                tracing::error!(q_id = self.g.q_id, "cannot queue COMMIT_IO_CMDS: errno {}", -errno);
            }
        }
        // With statistics not yet published, wake up in time to publish them.
        let sqes = if self.recorder.dirty() {
            self.ring.submit_wait_timeout(stats::FLUSH_INTERVAL)?
        } else {
            self.ring.submit(1)?
        };
        cqes.clear();
        self.ring.reap(cqes);
        self.recorder.tick();
        for &c in cqes.iter() {
            self.handle(c);
        }
        if self.in_target > 0 {
            self.call_queue(|t, io| t.end_of_pass(io));
        }
        self.recorder.record_pass(cqes.len() as u64, sqes as u64, u64::from(self.in_target));
        self.recorder.maybe_flush(self.stats, false);
        Ok(())
    }

    fn handle(&mut self, c: Cqe) {
        let q_id = self.g.q_id;
        match c.kind {
            Kind::Wake if self.ring.wake_value() >= WAKE_ABORT => {
                tracing::debug!(q_id, "wake-up: aborting");
                self.aborting = true;
            }
            Kind::Wake => {
                tracing::debug!(q_id, "wake-up: stopping");
                self.stopping = true;
                // Armed again, for an abort.
                if self.ring.push_wake().is_err() {
                    tracing::warn!(q_id, "cannot re-arm the wake-up read");
                }
            }
            Kind::Ublk => self.on_ublk(c.tag, c.res),
            Kind::Fetch => self.on_fetch(c.res, c.flags),
            Kind::Commit => {
                if let CommitOutcome::Refused { tag, errno } = self.ring.on_commit(c.cookie, c.res) {
                    let e = std::io::Error::from_raw_os_error(-errno);
                    tracing::error!(q_id, tag, "COMMIT_IO_CMDS refused the tag: {e}");
                    if let Some(slot) = self.slots.get_mut(usize::from(tag)) {
                        *slot = Slot::Dead;
                    }
                }
            }
            Kind::Target => self.on_target(c.tag, c.cookie, c.res),
            Kind::UserCopy => self.on_user_copy(c.tag, c.res),
            Kind::QueueIo => {
                self.inflight.queue -= 1;
                self.call_queue(|t, io| t.queue_complete(c.cookie, c.res, io));
            }
            Kind::Waker => {
                if let Err(errno) = self.ring.push_target_wake() {
                    tracing::error!(q_id, "cannot re-arm the target's waker: errno {}", -errno);
                }
                self.call_queue(|t, io| t.woken(io));
            }
            // The ring handles its own commands' completions.
            Kind::Aux => {}
        }
    }

    /// A multishot FETCH_IO_CMDS completion: new requests on the tags it names.
    fn on_fetch(&mut self, res: i32, cqe_flags: u32) {
        let q_id = self.g.q_id;
        let mut tags = std::mem::take(&mut self.fetched);
        self.ring.take_fetched(res, cqe_flags, &mut tags);
        self.recorder.record_fetch(tags.len());
        for &tag in &tags {
            match self.slots.get(usize::from(tag)) {
                Some(Slot::Fetching) => self.start_request(tag),
                other => tracing::error!(q_id, tag, ?other, "fetched a tag the kernel does not own"),
            }
        }
        self.fetched = tags;
        if io_uring::cqueue::more(cqe_flags) {
            return;
        }
        self.fetch_armed = false;
        match res {
            uapi::IO_RES_ABORT => tracing::debug!(q_id, "FETCH_IO_CMDS aborted: the device is going away"),
            _ if self.stopping || self.aborting => {}
            r if r >= 0 || r == -libc::ENOBUFS => {
                tracing::debug!(q_id, res, "FETCH_IO_CMDS ended; armed again");
                match self.ring.push_fetch() {
                    Ok(()) => self.fetch_armed = true,
                    Err(errno) => tracing::error!(q_id, "cannot re-arm FETCH_IO_CMDS: errno {}", -errno),
                }
            }
            r => {
                let e = std::io::Error::from_raw_os_error(-r);
                tracing::error!(q_id, "FETCH_IO_CMDS failed: {e}; no more requests on this queue");
            }
        }
    }

    /// A request arrived on `tag`: decode it and hand it to the target.
    fn start_request(&mut self, tag: u16) {
        let idx = usize::from(tag);
        self.panic_hook.tick(self.g.q_id);
        self.started[idx] = self.recorder.now();
        let desc = self.descs.get(tag);
        let mut decoded = decode_request(tag, &desc, self.g.buf_size, self.g.dev_size);
        if decoded.is_err() && desc.end_byte().is_some_and(|end| end > self.g.dev_size) {
            // Past the size the queue knows: the device may have grown since. The
            // kernel's capacity is the word (it never sends past it).
            if let Some(now) = (self.g.size_now)(self.g.dev_id).filter(|&n| n > self.g.dev_size) {
                tracing::info!(q_id = self.g.q_id, "the device grew from {} to {now} bytes", self.g.dev_size);
                self.g.dev_size = now;
                decoded = decode_request(tag, &desc, self.g.buf_size, self.g.dev_size);
            }
        }
        // SHMEM_ZC: the data is in the shared memory (an address outside it fails the request).
        let shared = match &decoded {
            Ok(req) => {
                let at = req.shared_memory().then(|| (desc.addr, u32::try_from(req.len).unwrap_or(u32::MAX)));
                self.ring.set_shared(tag, at).map(|()| at.is_some())
            }
            Err(_) => self.ring.set_shared(tag, None).map(|()| false),
        };
        match decoded {
            Ok(req) if shared.is_err() => {
                tracing::warn!(q_id = self.g.q_id, tag, ?desc, "shared-memory request outside the registered buffer");
                self.slots[idx] = Slot::InTarget(req);
                self.in_target += 1;
                self.commit(tag, -libc::EIO);
            }
            Ok(req) if self.g.read_only && !matches!(req.op, Op::Read | Op::Flush | Op::ReportZones) => {
                // The kernel refuses writes to a read-only disk at open and in the write
                // path, but a bio submitted directly only gets a warning: it stops here.
                // Counted and logged as a failed request, as if the target had failed it.
                self.slots[idx] = Slot::InTarget(req);
                self.in_target += 1;
                self.commit(tag, -libc::EROFS);
            }
            Ok(req) if self.g.user_copy && shared == Ok(false) && req.op.carries_data_in() && req.len > 0 => {
                // The data first: the target sees the request once it is in our buffer.
                self.slots[idx] = Slot::CopyIn(req);
                self.in_target += 1;
                match self.ring.push_user_copy(tag, false, u32::try_from(req.len).unwrap_or(u32::MAX)) {
                    Ok(()) => self.copies_inflight += 1,
                    Err(errno) => self.commit(tag, errno),
                }
            }
            Ok(req) => {
                self.slots[idx] = Slot::InTarget(req);
                self.in_target += 1;
                self.run_target(tag, |t, io| t.submit(&req, io));
            }
            Err(errno) => {
                self.recorder.count_bad_request();
                tracing::warn!(q_id = self.g.q_id, tag, ?desc, "rejecting malformed request");
                self.send_commit(tag, errno, None);
            }
        }
    }

    fn on_ublk(&mut self, tag: u16, res: i32) {
        self.cmds_inflight -= 1;
        let idx = usize::from(tag);
        if idx >= self.slots.len() {
            tracing::error!(q_id = self.g.q_id, tag, "ublk completion for a tag past the queue depth");
            return;
        }
        match res {
            uapi::IO_RES_OK => self.start_request(tag),
            uapi::IO_RES_ABORT => self.slots[idx] = Slot::Dead,
            other => {
                let e = std::io::Error::from_raw_os_error(-other);
                tracing::error!(q_id = self.g.q_id, tag, "ublk io command failed: {e}");
                self.slots[idx] = Slot::Dead;
            }
        }
    }

    /// User copy: the char device read (a write's data in) or write (a read's data out)
    /// of `tag` completed with `res` bytes moved.
    fn on_user_copy(&mut self, tag: u16, res: i32) {
        self.copies_inflight -= 1;
        // None: all `want` bytes moved; else the errno (a short copy: the kernel has
        // less of the request than it said, EIO).
        let failed = |want: u32, what: &str, q_id: u16| match res {
            r if r >= 0 && r as u32 == want => None,
            r => {
                tracing::warn!(q_id, tag, "{what} the char device failed: {r}");
                Some(if r < 0 { r } else { -libc::EIO })
            }
        };
        let q_id = self.g.q_id;
        match self.slots.get(usize::from(tag)).copied() {
            Some(Slot::CopyIn(req)) => {
                match failed(u32::try_from(req.len).unwrap_or(u32::MAX), "reading the request's data from", q_id) {
                    None if self.poisoned || self.aborting => self.commit(tag, -libc::EIO),
                    None => {
                        self.slots[usize::from(tag)] = Slot::InTarget(req);
                        self.run_target(tag, |t, io| t.submit(&req, io));
                    }
                    Some(errno) => self.commit(tag, errno),
                }
            }
            Some(Slot::CopyOut(_, done)) => {
                let res = failed(done as u32, "writing the request's data to", q_id).unwrap_or(done);
                self.finish_commit(tag, res);
            }
            other => tracing::error!(q_id, tag, ?other, "user-copy completion for a tag not copying"),
        }
    }

    fn on_target(&mut self, tag: u16, cookie: u16, res: i32) {
        self.inflight.requests -= 1;
        let idx = usize::from(tag);
        let Some(Slot::InTarget(req)) = self.slots.get(idx).copied() else {
            tracing::error!(q_id = self.g.q_id, tag, "target completion for a tag not in the target");
            return;
        };
        self.inflight.per_tag[idx] = self.inflight.per_tag[idx].saturating_sub(1);
        if self.poisoned || self.deferred[idx].is_some() {
            // The target is not called again; the request is committed once none of its
            // SQEs is in flight (they may still use its buffer): failed on a poisoned queue.
            if self.inflight.per_tag[idx] == 0 {
                let res = if self.poisoned { -libc::EIO } else { self.deferred[idx].unwrap_or(-libc::EIO) };
                self.commit(tag, res);
            }
            return;
        }
        self.run_target(tag, |t, io| t.complete(&req, cookie, res, io));
    }

    /// Calls into the target for request `tag`, and commits what it finished: the
    /// request itself (`Done`) and any other it finished ([`IoCtx::finish`]).
    fn run_target(&mut self, tag: u16, f: impl FnOnce(&mut dyn QueueTarget, &mut IoCtx<'_>) -> Disposition) {
        if self.poisoned {
            self.commit(tag, -libc::EIO);
            return;
        }
        let poisoned = match self.call(Owner::Request(tag), f) {
            Some(Disposition::Done(r)) if self.inflight.per_tag[usize::from(tag)] > 0 => {
                tracing::warn!(
                    q_id = self.g.q_id,
                    tag,
                    "the target finished a request with SQEs of its in flight: committed when they complete"
                );
                self.deferred[usize::from(tag)] = Some(r);
                false
            }
            Some(Disposition::Done(r)) => {
                self.commit(tag, r);
                false
            }
            Some(Disposition::Pending) => false,
            None => true,
        };
        self.after_call(poisoned);
    }

    /// Calls into the target in the queue's own context.
    fn call_queue(&mut self, f: impl FnOnce(&mut dyn QueueTarget, &mut IoCtx<'_>)) {
        if self.poisoned {
            return;
        }
        let poisoned = self.call(Owner::Queue, f).is_none();
        self.after_call(poisoned);
    }

    /// Calls into the target in `owner`'s context; None if it panicked. A panic
    /// poisons the queue: the target is not called again, and the control thread is
    /// told so that it stops the device.
    fn call<T>(&mut self, owner: Owner, f: impl FnOnce(&mut dyn QueueTarget, &mut IoCtx<'_>) -> T) -> Option<T> {
        let slots = &self.slots;
        let live = |t: u16| matches!(slots.get(usize::from(t)), Some(Slot::InTarget(_)));
        let target = &mut *self.target;
        let mut io =
            IoCtx::new(self.ring.sq(), owner, &mut self.inflight, &live, &mut self.finished, &mut self.appended);
        IN_TARGET.with(|t| t.set(true));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(target, &mut io)));
        IN_TARGET.with(|t| t.set(false));
        // Where the call's zone appends wrote, before their commits (now or later).
        for (tag, sector) in self.appended.drain(..) {
            if let Some(at) = self.append_at.get_mut(usize::from(tag)) {
                *at = Some(sector);
            }
        }
        match out {
            Ok(v) => Some(v),
            Err(payload) => {
                let msg = format!("target panicked: {}", panic_message(&*payload));
                tracing::error!(q_id = self.g.q_id, "{msg}; failing every request on this queue");
                let _ = self.events.send(QueueEvent::TargetFailed { q_id: self.g.q_id, msg });
                self.poisoned = true;
                None
            }
        }
    }

    /// After a target call: commit the requests it finished for other tags; after a
    /// panic, fail instead every request in the target that waits on no SQE of its own
    /// (the others fail as their SQEs complete: those may still use the buffer).
    fn after_call(&mut self, panicked: bool) {
        // The common case, once per target call: nothing to do.
        if !panicked && self.finished.is_empty() {
            return;
        }
        let mut finished = std::mem::take(&mut self.finished);
        if panicked {
            finished.clear();
            for tag in 0..self.g.depth {
                if matches!(self.slots[usize::from(tag)], Slot::InTarget(_))
                    && self.inflight.per_tag[usize::from(tag)] == 0
                {
                    self.commit(tag, -libc::EIO);
                }
            }
        }
        for (tag, res) in finished.drain(..) {
            self.commit(tag, res);
        }
        self.finished = finished;
    }

    /// Logs a failed request: the first few, then one in every thousand.
    fn log_error(&mut self, req: &IoRequest, res: i32) {
        self.errors_seen += 1;
        let n = self.errors_seen;
        if n <= 10 || n.is_multiple_of(1000) {
            let err = std::io::Error::from_raw_os_error(-res);
            tracing::warn!(
                q_id = self.g.q_id,
                "{:?} at byte {} length {} failed: {err} (error {n} on this queue)",
                req.op,
                req.offset,
                req.len
            );
        }
    }

    /// The target finished the request on `tag` with `res`: record it and commit it
    /// (user copy: a read's data goes to the kernel first, then [`Self::finish_commit`]).
    fn commit(&mut self, tag: u16, res: i32) {
        let idx = usize::from(tag);
        match self.slots[idx] {
            Slot::InTarget(req) if self.g.user_copy && !req.shared_memory() && req.op.carries_data_out() && res > 0 => {
                self.slots[idx] = Slot::CopyOut(req, res);
                // res <= req.len <= buf_size: what the target read into the buffer.
                match self.ring.push_user_copy(tag, true, res as u32) {
                    Ok(()) => self.copies_inflight += 1,
                    Err(errno) => self.finish_commit(tag, errno),
                }
            }
            Slot::InTarget(_) | Slot::CopyIn(_) => self.finish_commit(tag, res),
            _ => tracing::error!(q_id = self.g.q_id, tag, "a request finished twice: the second is ignored"),
        }
    }

    /// Records the request on `tag` as done with `res` and gives the tag back.
    fn finish_commit(&mut self, tag: u16, res: i32) {
        let idx = usize::from(tag);
        let (Slot::InTarget(req) | Slot::CopyIn(req) | Slot::CopyOut(req, _)) = self.slots[idx] else {
            tracing::error!(q_id = self.g.q_id, tag, "a request finished twice: the second is ignored");
            return;
        };
        self.in_target -= 1;
        self.deferred[idx] = None;
        let append_at = self.append_at[idx].take();
        let res = match (req.op, append_at) {
            // A zone append must say where it wrote.
            (Op::ZoneAppend, None) if res >= 0 => {
                tracing::error!(q_id = self.g.q_id, tag, "the target finished a zone append without its sector");
                -libc::EIO
            }
            _ => res,
        };
        self.recorder.record(req.op, res, self.started[idx]);
        if res >= 0 && req.shared_memory() {
            self.recorder.count_shared();
        }
        if res < 0 {
            self.log_error(&req, res);
        }
        self.send_commit(tag, res, append_at.filter(|_| req.op == Op::ZoneAppend && res >= 0));
    }

    /// Gives `tag` back to the kernel with `res` (and asks for its next request); a zone
    /// append also says the sector it wrote at.
    fn send_commit(&mut self, tag: u16, res: i32, append_at: Option<u64>) {
        let sent = match (self.g.protocol, append_at) {
            // Batch commit elements carry no zone LBA here: zoned devices use per-tag.
            (IoProtocol::Batch, Some(_)) => self.ring.queue_commit(tag, -libc::EIO),
            (IoProtocol::Batch, None) => self.ring.queue_commit(tag, res),
            (IoProtocol::PerTag, Some(sector)) => {
                self.ring.push_zone_append_commit(tag, res, sector).map(|()| self.cmds_inflight += 1)
            }
            (IoProtocol::PerTag, None) => self.ring.push_ublk(tag, Some(res)).map(|()| self.cmds_inflight += 1),
        };
        self.slots[usize::from(tag)] = match sent {
            Ok(()) => Slot::Fetching,
            Err(errno) => {
                tracing::error!(q_id = self.g.q_id, tag, "cannot queue the commit: errno {}", -errno);
                Slot::Dead
            }
        };
    }
}

#[cfg(test)]
mod tests;
