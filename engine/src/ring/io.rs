//! The SQEs a target pushes on behalf of a request: reads and writes into the
//! request's own buffer, fsync, fallocate, timers. [`TargetSq`] is the seam between
//! the target API's `IoCtx` and the ring (the reactor's tests put a fake behind it).

use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::{Kind, QueueRing, tag};
use crate::buf::BufferMode;
use crate::request::FileSlot;

/// A read or write between a registered file and the request's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rw {
    pub(crate) write: bool,
    pub(crate) file: FileSlot,
    /// Offset in the request buffer.
    pub(crate) buf_off: u32,
    pub(crate) len: u32,
    /// Offset in the file.
    pub(crate) offset: u64,
    /// `RWF_*` flags.
    pub(crate) rw_flags: i32,
}

/// The SQEs a target may push for request `tag`; each completion comes back to the
/// target with `cookie`. Errors are `-errno`.
pub(crate) trait TargetSq {
    fn rw(&mut self, tag: u16, rw: Rw, cookie: u16) -> Result<(), i32>;
    fn fsync(&mut self, tag: u16, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32>;
    fn fallocate(&mut self, tag: u16, file: FileSlot, mode: i32, offset: u64, len: u64, cookie: u16)
    -> Result<(), i32>;
    /// Completes with `-ETIME` after `after`.
    fn timeout(&mut self, tag: u16, after: Duration, cookie: u16) -> Result<(), i32>;
}

impl TargetSq for QueueRing {
    fn rw(&mut self, tag: u16, rw: Rw, cookie: u16) -> Result<(), i32> {
        let Rw { write, file, buf_off, len, offset, rw_flags } = rw;
        // `none`: there is no buffer to read into or write from.
        if !self.mode.moves_data()
            || tag >= self.depth
            || u64::from(buf_off) + u64::from(len) > u64::from(self.buf_size)
        {
            return Err(-libc::EINVAL);
        }
        let fd = types::Fixed(file.0);
        let sqe = if self.mode.is_zero_copy() {
            if self.mode == BufferMode::ZeroCopy {
                // REGISTER_IO_BUF linked before the IO, both in one submission.
                self.register_request_buf(tag)?;
            }
            // Buffer-table slot `tag` holds the request's pages; the address is an
            // offset into them.
            let at = std::ptr::without_provenance_mut::<u8>(buf_off as usize);
            if write {
                opcode::WriteFixed::new(fd, at, len, tag).offset(offset).rw_flags(rw_flags).build()
            } else {
                opcode::ReadFixed::new(fd, at, len, tag).offset(offset).rw_flags(rw_flags).build()
            }
        } else {
            // SAFETY: buf_off + len <= buf_size was checked: the range is inside this tag's buffer.
            let ptr = unsafe { self.buf_addr(tag).add(buf_off as usize) };
            match (write, self.fixed_bufs) {
                (false, true) => opcode::ReadFixed::new(fd, ptr, len, tag).offset(offset).rw_flags(rw_flags).build(),
                (false, false) => opcode::Read::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
                (true, true) => opcode::WriteFixed::new(fd, ptr, len, tag).offset(offset).rw_flags(rw_flags).build(),
                (true, false) => opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
            }
        };
        // Large IO goes to io-wq: its copy then runs on whichever CPU is free, not
        // serially in the queue thread (a single submitter loads a single queue).
        let sqe = if len >= self.offload_min { sqe.flags(squeue::Flags::ASYNC) } else { sqe };
        // Copy mode: the range is inside this tag's buffer (checked above), which lives as
        // long as the ring. Zero-copy modes: the kernel owns the registered request pages,
        // and the request is not committed (so they stay registered) until this CQE is reaped.
        // SAFETY: the data range is valid for the whole IO, as just said.
        unsafe { self.push(&sqe.user_data(tag::encode(Kind::Target, tag, cookie))) }
    }

    fn fsync(&mut self, tag: u16, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32> {
        let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        let sqe = opcode::Fsync::new(types::Fixed(file.0)).flags(flags).build();
        // SAFETY: fsync names no memory; the file is registered.
        unsafe { self.push(&sqe.user_data(tag::encode(Kind::Target, tag, cookie))) }
    }

    fn fallocate(
        &mut self,
        tag: u16,
        file: FileSlot,
        mode: i32,
        offset: u64,
        len: u64,
        cookie: u16,
    ) -> Result<(), i32> {
        let sqe = opcode::Fallocate::new(types::Fixed(file.0), len).offset(offset).mode(mode).build();
        // SAFETY: fallocate names no memory; the file is registered.
        unsafe { self.push(&sqe.user_data(tag::encode(Kind::Target, tag, cookie))) }
    }

    /// Names no memory past submission: the kernel copies the timespec when it
    /// prepares the SQE.
    fn timeout(&mut self, tag: u16, after: Duration, cookie: u16) -> Result<(), i32> {
        let Some(ts) = self.timeouts.get_mut(usize::from(tag)) else { return Err(-libc::EINVAL) };
        *ts = types::Timespec::new().sec(after.as_secs()).nsec(after.subsec_nanos());
        let ptr: *const types::Timespec = ts;
        let sqe = opcode::Timeout::new(ptr).count(0).build().user_data(tag::encode(Kind::Target, tag, cookie));
        // SAFETY: `ptr` is this tag's slot in `self.timeouts`, which is never resized and
        // lives as long as the ring; a tag has one timer at a time, so the slot is not
        // rewritten before the SQE is submitted (the kernel copies it then).
        unsafe { self.push(&sqe) }
    }
}
