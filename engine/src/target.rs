//! The target interface: what a backend (loop, null, a network client...) implements.
//!
//! A [`Target`] describes the device and opens one [`QueueTarget`] per queue thread.
//! A queue target handles requests asynchronously: it pushes its own SQEs onto the
//! queue's ring through [`IoCtx`] and returns [`Disposition::Pending`], and is called
//! back with each completion; or it finishes at once with [`Disposition::Done`].
//! The per-request path builds no `Error`: results are bytes done or `-errno`.
//!
//! Beyond files, a queue target may own memory ([`QueueSetup::alloc`]: protocol
//! headers), push IO that belongs to the queue rather than to a request (a standing
//! receive, completed in [`QueueTarget::queue_complete`]), be woken from another thread
//! ([`QueueSetup::waker`], [`QueueTarget::woken`]), finish one request from another's
//! completion ([`IoCtx::finish`]) or act for it ([`IoCtx::for_request`]), link SQEs
//! ([`IoCtx::link_next`]), gather a pass's requests into one SQE
//! ([`QueueTarget::end_of_pass`]), and arm and cancel its standing IO in
//! [`QueueTarget::start`] and [`QueueTarget::stop`]. See `engine/DESIGN.md`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::request::{FileSlot, IoRequest, Mem, MemId, TargetInfo};
use crate::ring::io::{Owner, Rw, Sock, TargetSq};

/// A device-wide target. Shared by all queue threads.
pub trait Target: Send + Sync + fmt::Debug {
    /// Short name (`loop`, `null`).
    fn name(&self) -> &'static str;
    fn info(&self) -> &TargetInfo;
    /// JSON description for `list` and the state file (backing path, IO mode...).
    fn describe(&self) -> serde_json::Value;
    /// Called on queue thread `setup.q_id()`, after it is pinned, before any request.
    fn open_queue(&self, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>>;
    /// Whether the target reads or writes request data. A target that never does
    /// (null) returns false: `--buffer-mode auto` then has the kernel move no data at
    /// all (buffer mode `none`, UBLK_F_USER_COPY), and [`IoCtx::read`]/[`IoCtx::write`]
    /// fail with `-EINVAL` in that mode.
    fn moves_data(&self) -> bool {
        true
    }
    /// Whether the target's data IO can use the request's own pages (reads and writes
    /// of registered files, in the zero-copy buffer modes). A target that sends or
    /// receives request data over a socket ([`Mem::Request`]) returns false: `auto`
    /// then picks buffer mode copy, and the zero-copy modes are refused.
    fn supports_zero_copy(&self) -> bool {
        true
    }
}

/// A per-queue-thread target instance.
pub trait QueueTarget {
    /// Starts `req`. Either finishes it now or pushes SQEs through `io` and returns Pending.
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition;
    /// One of this request's SQEs completed with `res`. `cookie` is what was passed at push.
    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition;
    /// The queue is about to serve: arm standing IO (a receive) here. An error fails
    /// the queue's start.
    fn start(&mut self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        let _ = io;
        Ok(())
    }
    /// One of the queue's own SQEs (pushed from a queue context: `start`,
    /// `queue_complete`, `woken`, `stop`) completed with `res`.
    fn queue_complete(&mut self, cookie: u16, res: i32, io: &mut IoCtx<'_>) {
        let _ = (cookie, res, io);
    }
    /// Once per pass of the queue, after the pass's completions (new requests, SQE
    /// completions) were all handed to the target, while requests are in the target:
    /// push what the pass gathered, e.g. many requests' headers in one send (as blk-mq's
    /// `commit_rqs`). What is pushed goes to the kernel with the next submission, at once.
    fn end_of_pass(&mut self, io: &mut IoCtx<'_>) {
        let _ = io;
    }
    /// The [`Waker`] was woken (once or more since the last call).
    fn woken(&mut self, io: &mut IoCtx<'_>) {
        let _ = io;
    }
    /// The queue is stopping (no request is in the target, and none will come): make
    /// every queue SQE still in flight complete (shut the socket down), so that the
    /// queue can end. Called once.
    fn stop(&mut self, io: &mut IoCtx<'_>) {
        let _ = io;
    }
}

/// What became of a request after a target call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Finished: bytes transferred (or 0) on success, `-errno` on failure.
    Done(i32),
    /// SQEs are in flight, or another context will [`finish`](IoCtx::finish) it.
    Pending,
}

/// What a queue target is opened with, and what it asks of the queue's ring: files to
/// register, memory of its own, a waker.
#[derive(Debug)]
pub struct QueueSetup {
    q_id: u16,
    depth: u16,
    buf_size: u32,
    pub(crate) fds: Vec<RawFd>,
    pub(crate) mem: Vec<u32>,
    pub(crate) waker: Option<OwnedFd>,
}

impl QueueSetup {
    pub(crate) fn new(q_id: u16, depth: u16, buf_size: u32) -> Self {
        Self { q_id, depth, buf_size, fds: Vec::new(), mem: Vec::new(), waker: None }
    }

    /// The queue's index.
    pub fn q_id(&self) -> u16 {
        self.q_id
    }

    /// Requests the queue may have in the target at once (tags 0 to depth - 1).
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Bytes of each request's buffer: the largest request.
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Registers `fd` with the queue's ring. The ring holds its own reference to the
    /// open file, so the caller may close `fd` afterwards.
    pub fn add_file(&mut self, fd: BorrowedFd<'_>) -> FileSlot {
        // Slot 0 is the ublk char device.
        let slot = FileSlot(u32::try_from(self.fds.len() + 1).unwrap_or(u32::MAX));
        self.fds.push(fd.as_raw_fd());
        slot
    }

    /// `len` bytes of zeroed memory the target owns, which sends and receives can use
    /// ([`Mem::Owned`]) and [`IoCtx::mem`] reaches while no SQE uses it.
    pub fn alloc(&mut self, len: u32) -> io::Result<MemId> {
        let id = u16::try_from(self.mem.len())
            .ok()
            .filter(|&id| id < u16::MAX)
            .ok_or_else(|| io::Error::other("too many target memory allocations"))?;
        self.mem.push(len);
        Ok(MemId(id))
    }

    /// A [`Waker`]: another thread calls [`Waker::wake`], and the queue target's
    /// [`woken`](QueueTarget::woken) runs on the queue thread. One per queue.
    pub fn waker(&mut self) -> io::Result<Waker> {
        if self.waker.is_some() {
            return Err(io::Error::other("the queue already has a waker"));
        }
        let fd = crate::sys::eventfd()?;
        let theirs = fd.try_clone()?;
        self.waker = Some(fd);
        Ok(Waker(Arc::new(theirs)))
    }
}

/// Wakes a queue target from any thread (see [`QueueSetup::waker`]).
#[derive(Debug, Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    /// Has the queue thread call its target's `woken` soon. Wakes that come before the
    /// call are folded into one.
    pub fn wake(&self) {
        if let Err(e) = crate::sys::eventfd_add(self.0.as_fd(), 1) {
            tracing::warn!("cannot wake the queue: {e}");
        }
    }

    /// The waker's eventfd, for a library that signals completions on an eventfd of
    /// the caller's (librbd's `rbd_set_image_notification`): each write of it has the
    /// queue call `woken`, as [`wake`](Self::wake) does.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The target SQEs in flight, per request and for the queue (kept by the reactor;
/// counted here as a target pushes them).
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    pub(crate) per_tag: Vec<u16>,
    pub(crate) requests: u32,
    pub(crate) queue: u32,
}

impl Inflight {
    pub(crate) fn new(depth: u16) -> Self {
        Self { per_tag: vec![0; usize::from(depth)], requests: 0, queue: 0 }
    }

    fn charge(&mut self, owner: Owner) {
        match owner {
            Owner::Request(tag) => {
                self.per_tag[usize::from(tag)] += 1;
                self.requests += 1;
            }
            Owner::Queue => self.queue += 1,
        }
    }
}

/// A target's view of its queue during one call: the request it serves (or the queue
/// itself), and the ring.
///
/// Every SQE pushed here belongs to that request (its completion comes back to
/// [`QueueTarget::complete`] with the cookie given) or, in a queue context, to the
/// queue ([`QueueTarget::queue_complete`]). Data moves only to or from the request's
/// own buffer or memory the target owns, so a target needs no `unsafe`.
pub struct IoCtx<'a> {
    sq: &'a mut dyn TargetSq,
    owner: Owner,
    inflight: &'a mut Inflight,
    /// Is this tag's request in the target?
    live: &'a dyn Fn(u16) -> bool,
    /// Requests finished from this call ([`IoCtx::finish`]), committed after it.
    finished: &'a mut Vec<(u16, i32)>,
    /// Zone appends and the sector each wrote at ([`IoCtx::zone_appended`]).
    appended: &'a mut Vec<(u16, u64)>,
}

impl fmt::Debug for IoCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoCtx").field("owner", &self.owner).finish()
    }
}

impl<'a> IoCtx<'a> {
    pub(crate) fn new(
        sq: &'a mut dyn TargetSq,
        owner: Owner,
        inflight: &'a mut Inflight,
        live: &'a dyn Fn(u16) -> bool,
        finished: &'a mut Vec<(u16, i32)>,
        appended: &'a mut Vec<(u16, u64)>,
    ) -> Self {
        Self { sq, owner, inflight, live, finished, appended }
    }

    /// Zoned devices: the zone append on `tag` wrote its data at `sector` (512-byte
    /// units: where the zone's write pointer was), which the kernel reports to the
    /// writer. Say it before the request is finished (`Done`, or [`IoCtx::finish`]).
    /// `-EINVAL` if `tag` is not in the target.
    pub fn zone_appended(&mut self, tag: u16, sector: u64) -> Result<(), i32> {
        if !self.open(tag) {
            return Err(-libc::EINVAL);
        }
        self.appended.retain(|&(t, _)| t != tag);
        self.appended.push((tag, sector));
        Ok(())
    }

    fn count(&mut self, r: Result<(), i32>) -> Result<(), i32> {
        if r.is_ok() {
            self.inflight.charge(self.owner);
        }
        r
    }

    /// The request this context serves (None in a queue context).
    pub fn tag(&self) -> Option<u16> {
        match self.owner {
            Owner::Request(tag) => Some(tag),
            Owner::Queue => None,
        }
    }

    /// Is request `tag` in the target and not finished in this call?
    fn open(&self, tag: u16) -> bool {
        (self.live)(tag) && !self.finished.iter().any(|&(t, _)| t == tag)
    }

    fn request_tag(&self) -> Result<u16, i32> {
        self.tag().ok_or(-libc::EINVAL)
    }

    /// Reads `len` bytes at file offset `offset` into the request buffer at `buf_off`.
    /// `-EINVAL` in buffer mode `none` (there is no buffer) and in a queue context.
    pub fn read(&mut self, file: FileSlot, buf_off: u32, len: u32, offset: u64, cookie: u16) -> Result<(), i32> {
        let rw = Rw { write: false, file, buf_off, len, offset, rw_flags: 0 };
        let r = self.request_tag().and_then(|tag| self.sq.rw(tag, rw, cookie));
        self.count(r)
    }

    /// Writes `len` bytes of the request buffer at `buf_off` to file offset `offset`.
    /// `dsync` makes the write durable before it completes (RWF_DSYNC). `-EINVAL` in
    /// buffer mode `none` and in a queue context.
    pub fn write(
        &mut self,
        file: FileSlot,
        buf_off: u32,
        len: u32,
        offset: u64,
        dsync: bool,
        cookie: u16,
    ) -> Result<(), i32> {
        let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let rw = Rw { write: true, file, buf_off, len, offset, rw_flags };
        let r = self.request_tag().and_then(|tag| self.sq.rw(tag, rw, cookie));
        self.count(r)
    }

    /// Sends `mem` on socket `file` (`flags`: `MSG_*`, e.g. MSG_WAITALL to send it all).
    pub fn send(&mut self, file: FileSlot, mem: Mem, flags: i32, cookie: u16) -> Result<(), i32> {
        let r = self.sq.sock(self.owner, Sock { send: true, file, mem, flags }, cookie);
        self.count(r)
    }

    /// Receives into `mem` from socket `file` (`flags`: `MSG_*`, e.g. MSG_WAITALL to
    /// fill it). The result is the bytes received; 0 is the end of the stream.
    pub fn recv(&mut self, file: FileSlot, mem: Mem, flags: i32, cookie: u16) -> Result<(), i32> {
        let r = self.sq.sock(self.owner, Sock { send: false, file, mem, flags }, cookie);
        self.count(r)
    }

    pub fn fsync(&mut self, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32> {
        let r = self.sq.fsync(self.owner, file, datasync, cookie);
        self.count(r)
    }

    /// A timer: completes with `-ETIME` after `after` (or `-ECANCELED` if the queue
    /// is torn down first). One at a time per request, and one for the queue.
    pub fn sleep(&mut self, after: Duration, cookie: u16) -> Result<(), i32> {
        let r = self.sq.timeout(self.owner, after, cookie);
        self.count(r)
    }

    pub fn fallocate(&mut self, file: FileSlot, mode: i32, offset: u64, len: u64, cookie: u16) -> Result<(), i32> {
        let r = self.sq.fallocate(self.owner, file, (mode, offset, len), cookie);
        self.count(r)
    }

    /// Links the next SQE pushed (from this context or another in this call) to the one
    /// pushed after it: that one starts only once the first has completed, and is
    /// cancelled (`-ECANCELED`) if the first fails or is short. Both go to the kernel in
    /// one submission.
    pub fn link_next(&mut self) -> Result<(), i32> {
        self.sq.link_next()
    }

    /// Target memory `id`, or None while an SQE in flight uses it.
    pub fn mem(&mut self, id: MemId) -> Option<&mut [u8]> {
        self.sq.mem(id)
    }

    /// Copies `src` into `dst` (equal lengths): between this context's request buffer
    /// ([`Mem::Request`], buffer mode copy) and target memory, or within target memory.
    /// For protocols that carry many requests' data in one buffer: a write's payload
    /// gathered into a send buffer, a read's data taken out of a receive buffer.
    /// `-EBUSY` while an SQE in flight names either side, `-EINVAL` for a range out of
    /// bounds or unequal lengths, `-EOPNOTSUPP` for the request buffer in other modes.
    pub fn copy(&mut self, dst: Mem, src: Mem) -> Result<(), i32> {
        let tag = self.copy_tag(dst, Some(src))?;
        self.sq.copy(tag, dst, Some(src))
    }

    /// Zeroes `dst` (a hole in a read's reply), as [`copy`](Self::copy) would write it.
    pub fn zero(&mut self, dst: Mem) -> Result<(), i32> {
        let tag = self.copy_tag(dst, None)?;
        self.sq.copy(tag, dst, None)
    }

    /// The first `len` bytes of this context's request buffer (buffer mode copy), for a
    /// target whose backend moves data through memory of its own (a library that reads
    /// into its buffers): a write's data to copy out, a read's buffer to fill. `-EBUSY`
    /// while an SQE of the request is in flight, `-EINVAL` in a queue context or past
    /// the buffer's end, `-EOPNOTSUPP` in other buffer modes.
    pub fn request_buf(&mut self, len: u32) -> Result<&mut [u8], i32> {
        let tag = self.copy_tag(Mem::Request { off: 0, len }, None)?.ok_or(-libc::EINVAL)?;
        self.sq.request_buf(tag, len)
    }

    /// The request a copy names, checked: this context's, with no SQE of its own in flight.
    fn copy_tag(&self, dst: Mem, src: Option<Mem>) -> Result<Option<u16>, i32> {
        let names_request = |m: Mem| matches!(m, Mem::Request { .. });
        if !names_request(dst) && !src.is_some_and(names_request) {
            return Ok(None);
        }
        let tag = self.request_tag()?;
        if self.inflight.per_tag[usize::from(tag)] > 0 {
            return Err(-libc::EBUSY);
        }
        Ok(Some(tag))
    }

    /// Points the registered file `file` at `fd` from now on (a socket reconnected):
    /// SQEs already in flight keep the old one. The ring holds its own reference, so
    /// the caller may close `fd` afterwards.
    pub fn replace_file(&mut self, file: FileSlot, fd: BorrowedFd<'_>) -> Result<(), i32> {
        self.sq.update_file(file, fd.as_raw_fd())
    }

    /// Finishes request `tag` with `res` (bytes or `-errno`), as its own `Done` would:
    /// for a request that waits on something else (its reply arrived on the queue's
    /// receive). `-EINVAL` if `tag` is this context's own request (return `Done`) or is
    /// not in the target, `-EBUSY` while SQEs of its own are in flight.
    pub fn finish(&mut self, tag: u16, res: i32) -> Result<(), i32> {
        if self.owner == Owner::Request(tag) || !self.open(tag) {
            return Err(-libc::EINVAL);
        }
        if self.inflight.per_tag[usize::from(tag)] > 0 {
            return Err(-libc::EBUSY);
        }
        self.finished.push((tag, res));
        Ok(())
    }

    /// A context acting for the queue: what it pushes belongs to the queue (its
    /// completion goes to [`QueueTarget::queue_complete`]), from any context.
    pub fn for_queue(&mut self) -> IoCtx<'_> {
        IoCtx {
            sq: &mut *self.sq,
            owner: Owner::Queue,
            inflight: &mut *self.inflight,
            live: self.live,
            finished: &mut *self.finished,
            appended: &mut *self.appended,
        }
    }

    /// A context acting for request `tag` (which must be in the target): what it
    /// pushes belongs to that request, and reaches its buffer.
    pub fn for_request(&mut self, tag: u16) -> Option<IoCtx<'_>> {
        if !self.open(tag) {
            return None;
        }
        Some(IoCtx {
            sq: &mut *self.sq,
            owner: Owner::Request(tag),
            inflight: &mut *self.inflight,
            live: self.live,
            finished: &mut *self.finished,
            appended: &mut *self.appended,
        })
    }
}
