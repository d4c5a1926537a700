//! The target interface: what a backend (loop, null, ...) implements.
//!
//! A [`Target`] describes the device and opens one [`QueueTarget`] per queue thread.
//! A queue target handles requests asynchronously: it pushes its own SQEs onto the
//! queue's ring through [`IoCtx`] and returns [`Disposition::Pending`], and is called
//! back with each completion; or it finishes at once with [`Disposition::Done`].
//! The per-request path builds no `Error`: results are bytes done or `-errno`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crate::request::{FileSlot, IoRequest, TargetInfo};
use crate::ring::io::{Rw, TargetSq};

/// A device-wide target. Shared by all queue threads.
pub trait Target: Send + Sync + fmt::Debug {
    /// Short name (`loop`, `null`).
    fn name(&self) -> &'static str;
    fn info(&self) -> &TargetInfo;
    /// JSON description for `list` and the state file (backing path, IO mode...).
    fn describe(&self) -> serde_json::Value;
    /// Called on queue thread `q_id`, after it is pinned, before any request.
    fn open_queue(&self, q_id: u16, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>>;
    /// Whether the target reads or writes request data. A target that never does
    /// (null) returns false: `--buffer-mode auto` then has the kernel move no data at
    /// all (buffer mode `none`, UBLK_F_USER_COPY), and [`IoCtx::read`]/[`IoCtx::write`]
    /// fail with `-EINVAL` in that mode.
    fn moves_data(&self) -> bool {
        true
    }
}

/// A per-queue-thread target instance.
pub trait QueueTarget {
    /// Starts `req`. Either finishes it now or pushes SQEs through `io` and returns Pending.
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition;
    /// One of this request's SQEs completed with `res`. `cookie` is what was passed at push.
    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition;
}

/// What became of a request after a target call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Finished: bytes transferred (or 0) on success, `-errno` on failure.
    Done(i32),
    /// SQEs are in flight; `complete` will be called.
    Pending,
}

/// Collects the files a queue target will use, to register them with the ring.
#[derive(Debug, Default)]
pub struct QueueSetup {
    pub(crate) fds: Vec<RawFd>,
}

impl QueueSetup {
    /// Registers `fd` with the queue's ring. The ring holds its own reference to the
    /// open file, so the caller may close `fd` afterwards.
    pub fn add_file(&mut self, fd: BorrowedFd<'_>) -> FileSlot {
        // Slot 0 is the ublk char device.
        let slot = FileSlot(u32::try_from(self.fds.len() + 1).unwrap_or(u32::MAX));
        self.fds.push(fd.as_raw_fd());
        slot
    }
}

/// The submission context of one request: its data buffer and the ring.
///
/// Every SQE pushed here carries the request's tag and the given cookie, and moves
/// data to or from this request's own buffer only, so a target needs no `unsafe`.
pub struct IoCtx<'a> {
    sq: &'a mut dyn TargetSq,
    tag: u16,
    /// SQEs pushed through this context (the reactor counts them per request).
    pushed: u16,
}

impl fmt::Debug for IoCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoCtx").field("tag", &self.tag).finish()
    }
}

impl<'a> IoCtx<'a> {
    pub(crate) fn new(sq: &'a mut dyn TargetSq, tag: u16) -> Self {
        Self { sq, tag, pushed: 0 }
    }

    /// How many SQEs the target pushed through this context.
    pub(crate) fn pushed(&self) -> u16 {
        self.pushed
    }

    fn count(&mut self, r: Result<(), i32>) -> Result<(), i32> {
        if r.is_ok() {
            self.pushed += 1;
        }
        r
    }

    /// Reads `len` bytes at file offset `offset` into the request buffer at `buf_off`.
    /// `-EINVAL` in buffer mode `none` (there is no buffer).
    pub fn read(&mut self, file: FileSlot, buf_off: u32, len: u32, offset: u64, cookie: u16) -> Result<(), i32> {
        let rw = Rw { write: false, file, buf_off, len, offset, rw_flags: 0 };
        let r = self.sq.rw(self.tag, rw, cookie);
        self.count(r)
    }

    /// Writes `len` bytes of the request buffer at `buf_off` to file offset `offset`.
    /// `dsync` makes the write durable before it completes (RWF_DSYNC). `-EINVAL` in
    /// buffer mode `none`.
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
        let r = self.sq.rw(self.tag, Rw { write: true, file, buf_off, len, offset, rw_flags }, cookie);
        self.count(r)
    }

    pub fn fsync(&mut self, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32> {
        let r = self.sq.fsync(self.tag, file, datasync, cookie);
        self.count(r)
    }

    /// A timer: completes with `-ETIME` after `after` (or `-ECANCELED` if the queue
    /// is torn down first). Fault injection uses it to delay and stall requests.
    pub fn sleep(&mut self, after: std::time::Duration, cookie: u16) -> Result<(), i32> {
        let r = self.sq.timeout(self.tag, after, cookie);
        self.count(r)
    }

    pub fn fallocate(&mut self, file: FileSlot, mode: i32, offset: u64, len: u64, cookie: u16) -> Result<(), i32> {
        let r = self.sq.fallocate(self.tag, file, mode, offset, len, cookie);
        self.count(r)
    }
}
