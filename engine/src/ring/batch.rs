//! The batch protocol (UBLK_F_BATCH_IO, Linux 7.0+): one PREP_IO_CMDS for every tag,
//! a multishot FETCH_IO_CMDS that delivers tags into provided buffers, and the commits
//! of a pass sent as one COMMIT_IO_CMDS.

use io_uring::{IoUring, opcode, squeue, types};

use super::{Cqe, Kind, QueueRing, Ring, errno_of, tag};
use crate::buf::BufferMode;
use crate::sys::mmap::Region;
use crate::sys::uapi::{self, BatchIo, ElemHeader};
use crate::sys::uring;

/// The provided-buffer group the multishot FETCH_IO_CMDS picks its tag buffers from.
const FETCH_BGID: u16 = 0;
/// Bytes of one provided-buffer ring entry (`struct io_uring_buf`).
const BUF_RING_ENTRY: usize = 16;
/// The cookie of the PREP_IO_CMDS completion (commit arrays use their slot index).
const PREP_COOKIE: u16 = u16::MAX;

/// UBLK_F_BATCH_IO state of one queue.
///
/// The fetch side: a provided-buffer ring of `nbufs` buffers of `tag_buf_bytes` each
/// (one region: ring entries, then the buffers). Each fetch CQE carries at least one
/// tag and at most `depth` tags are outstanding, so `nbufs >= depth` buffers never run
/// out as long as each is given back before the next `io_uring_enter` (it is).
///
/// The commit side: elements appended during a pass, sent as one COMMIT_IO_CMDS at its
/// end; each array sent stays in `inflight` (indexed by the SQE's cookie) until its CQE.
pub(super) struct Batch {
    /// `ublk_batch_io.flags` of PREP and COMMIT (HAS_BUF_ADDR in copy mode only: the
    /// driver refuses it, EINVAL, for USER_COPY and the zero-copy modes).
    flags: u16,
    elem_bytes: usize,
    /// Shared with the kernel (it reads the ring entries and writes the buffers): only
    /// read and written with volatile accesses.
    mem: Region,
    nbufs: u16,
    tag_buf_bytes: usize,
    /// Our copy of the ring's tail.
    tail: u16,
    pending: Vec<u8>,
    inflight: Vec<Option<Vec<u8>>>,
    /// Spare element arrays (reused to avoid an allocation per pass).
    spare: Vec<Vec<u8>>,
    /// Commit SQEs pushed whose CQE has not been reaped.
    commits_inflight: u32,
}

/// What a COMMIT_IO_CMDS completion meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitOutcome {
    /// Every element was taken (or the rest is queued again).
    Done,
    /// The kernel refused the element for `tag` (with `-errno`); it was dropped.
    Refused { tag: u16, errno: i32 },
}

/// Splits a commit's element array after its CQE: the elements to send again, and the
/// tag the kernel refused (the first element, when it took none) with its error.
fn commit_leftover(elems: &[u8], elem_bytes: usize, res: i32) -> (std::ops::Range<usize>, Option<(u16, i32)>) {
    match usize::try_from(res) {
        Ok(done) if done >= elems.len() => (elems.len()..elems.len(), None),
        // A partial commit: the element at `done` was refused; it is sent again (and is
        // then refused alone, with its error).
        Ok(done) => ((done - done % elem_bytes)..elems.len(), None),
        Err(_) => {
            let refused = uapi::batch_elem_tag(elems, 0).map(|t| (t, res));
            (elem_bytes.min(elems.len())..elems.len(), refused)
        }
    }
}

impl Batch {
    /// Allocates and registers the provided-buffer ring for fetched tags.
    pub(super) fn new(ring: &IoUring, depth: u16, mode: BufferMode) -> std::io::Result<Self> {
        let nbufs = depth.next_power_of_two().max(8);
        let tag_buf_bytes = 2 * usize::from(depth.min(64));
        let ring_bytes = (usize::from(nbufs) * BUF_RING_ENTRY).next_multiple_of(64);
        let mem = Region::new(ring_bytes + usize::from(nbufs) * tag_buf_bytes, false)?;
        // SAFETY: the ring memory is page aligned (mmap), sized for `nbufs` entries, and
        // outlives the registration: it is never unmapped (see `leak`), and the ring is
        // closed before anything else could reuse it.
        unsafe { ring.submitter().register_buf_ring_with_flags(mem.as_ptr() as u64, nbufs, FETCH_BGID, 0) }?;
        let flags = if mode == BufferMode::Copy { uapi::BATCH_F_HAS_BUF_ADDR } else { 0 };
        let mut b = Batch {
            flags,
            elem_bytes: uapi::batch_elem_bytes(flags),
            mem,
            nbufs,
            tag_buf_bytes,
            tail: 0,
            pending: Vec::new(),
            inflight: Vec::new(),
            spare: Vec::new(),
            commits_inflight: 0,
        };
        for bid in 0..nbufs {
            b.provide(bid);
        }
        Ok(b)
    }

    /// Commit elements queued or in flight.
    pub(super) fn busy(&self) -> bool {
        !self.pending.is_empty() || self.commits_inflight > 0
    }

    /// The ring is going away; its teardown in the kernel is asynchronous, so the
    /// memory the kernel may still read or write is never freed.
    pub(super) fn leak(self) {
        std::mem::forget(self.mem);
        for v in self.inflight.into_iter().flatten() {
            std::mem::forget(v);
        }
    }

    fn ring_bytes(&self) -> usize {
        (usize::from(self.nbufs) * BUF_RING_ENTRY).next_multiple_of(64)
    }

    fn buf_offset(&self, bid: u16) -> usize {
        self.ring_bytes() + usize::from(bid) * self.tag_buf_bytes
    }

    /// Puts buffer `bid` at the ring's tail and publishes the new tail.
    fn provide(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.nbufs - 1)) * BUF_RING_ENTRY;
        let addr = self.mem.as_ptr() as u64 + self.buf_offset(bid) as u64;
        // struct io_uring_buf { addr u64, len u32, bid u16, resv u16 }
        self.mem.store(slot, addr);
        self.mem.store(slot + 8, self.tag_buf_bytes as u32);
        self.mem.store(slot + 12, bid);
        self.tail = self.tail.wrapping_add(1);
        // The tail is the `resv` field of entry 0 (byte 14); the region is page aligned.
        let tail_ptr = self.mem.as_ptr().wrapping_add(14).cast::<u16>();
        // SAFETY: `tail_ptr` is inside the region, 2-byte aligned, and only read by the
        // kernel (atomically) and written by this thread.
        let tail = unsafe { std::sync::atomic::AtomicU16::from_ptr(tail_ptr) };
        tail.store(self.tail, std::sync::atomic::Ordering::Release);
    }
}

impl QueueRing {
    fn batch_mut(&mut self) -> Result<&mut Batch, i32> {
        self.batch.as_mut().ok_or(-libc::EINVAL)
    }

    /// The element for `tag`: buffer-table slot = tag (AUTO_BUF_REG), the buffer
    /// address in copy mode.
    fn batch_elem(&self, tag: u16, result: i32, out: &mut Vec<u8>, flags: u16) {
        let elem = ElemHeader { tag, buf_index: tag, result };
        uapi::push_batch_elem(out, flags, elem, self.buf_addr(tag) as u64);
    }

    fn batch_cmd(&self, op: u32, flags: u16, nr_elem: u16, elem_bytes: u8) -> opcode::UringCmd16 {
        let cmd = BatchIo { q_id: self.q_id, flags, nr_elem, elem_bytes, ..Default::default() };
        opcode::UringCmd16::new(types::Fixed(0), op).cmd(cmd.to_bytes())
    }
}

/// The batch protocol's commands, as the reactor uses them (the real one is
/// [`QueueRing`]; the reactor's unit tests drive a fake). Errors are `-errno`; on a
/// ring without the batch protocol every call fails with `-EINVAL`.
pub(crate) trait BatchRing {
    /// PREP_IO_CMDS for every tag, waiting for its completion (nothing else may be in
    /// flight). Returns the command's result.
    fn prep_all(&mut self) -> Result<i32, i32>;
    /// Arms the multishot FETCH_IO_CMDS.
    fn push_fetch(&mut self) -> Result<(), i32>;
    /// The tags a fetch CQE (`res`, `cqe_flags`) delivered, into `out`.
    fn take_fetched(&mut self, res: i32, cqe_flags: u32, out: &mut Vec<u16>);
    /// Queues the commit of `tag` with `result`, sent by `flush_commits`.
    fn queue_commit(&mut self, tag: u16, result: i32) -> Result<(), i32>;
    /// Sends the queued commits, calling `sent` with the element count of each command.
    fn flush_commits(&mut self, sent: &mut dyn FnMut(u16)) -> Result<(), i32>;
    /// A COMMIT_IO_CMDS completion (`slot` is its cookie).
    fn on_commit(&mut self, slot: u16, res: i32) -> CommitOutcome;
}

impl BatchRing for QueueRing {
    /// PREP_IO_CMDS for every tag, waiting for its completion (nothing else may be in
    /// flight). Returns the command's result.
    fn prep_all(&mut self) -> Result<i32, i32> {
        let b = self.batch_mut()?;
        let (flags, elem_bytes) = (b.flags, b.elem_bytes);
        let mut elems = Vec::with_capacity(usize::from(self.depth) * elem_bytes);
        for tag in 0..self.depth {
            self.batch_elem(tag, 0, &mut elems, flags);
        }
        let sqe = self
            .batch_cmd(uapi::IO_PREP_IO_CMDS, flags, self.depth, elem_bytes as u8)
            .addr(Some(elems.as_ptr() as u64))
            .build()
            .user_data(tag::encode(Kind::Commit, 0, PREP_COOKIE));
        // SAFETY: `elems` lives until the CQE is reaped below (the function waits for it).
        unsafe { self.push(&sqe) }?;
        let mut cqes: Vec<Cqe> = Vec::new();
        while cqes.is_empty() {
            self.submit(1).map_err(|e| errno_of(&e))?;
            self.reap(&mut cqes);
        }
        drop(elems);
        Ok(cqes[0].res)
    }

    /// Arms the multishot FETCH_IO_CMDS: tags arrive in buffers of group FETCH_BGID.
    fn push_fetch(&mut self) -> Result<(), i32> {
        self.batch_mut()?;
        let sqe = self
            .batch_cmd(uapi::IO_FETCH_IO_CMDS, 0, self.depth, 2)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(tag::encode(Kind::Fetch, 0, 0));
        let sqe = uring::uring_cmd_multishot(sqe, FETCH_BGID);
        // SAFETY: the command names no memory but the registered buffer group, whose
        // memory is never freed while the ring exists.
        unsafe { self.push(&sqe) }
    }

    /// The tags of a fetch CQE (`res` bytes in buffer `flags >> 16`) into `out`; the
    /// buffer is given back to the ring.
    fn take_fetched(&mut self, res: i32, cqe_flags: u32, out: &mut Vec<u16>) {
        out.clear();
        let q_id = self.q_id;
        let Some(b) = &mut self.batch else { return };
        let Some(bid) = io_uring::cqueue::buffer_select(cqe_flags) else { return };
        if bid >= b.nbufs {
            tracing::error!(q_id, bid, "fetch CQE names an unknown buffer");
            return;
        }
        let len = usize::try_from(res).unwrap_or(0).min(b.tag_buf_bytes);
        let off = b.buf_offset(bid);
        out.extend((off..off + len - len % 2).step_by(2).map(|at| b.mem.load::<u16>(at)));
        b.provide(bid);
    }

    /// Queues the commit of `tag` with `result` (sent at the end of the pass by
    /// `flush_commits`). In zero-copy mode a registered request buffer is unregistered first.
    fn queue_commit(&mut self, tag: u16, result: i32) -> Result<(), i32> {
        let flags = self.batch_mut()?.flags;
        self.unregister_request_buf(tag)?;
        let mut pending = std::mem::take(&mut self.batch_mut()?.pending);
        self.batch_elem(tag, result, &mut pending, flags);
        self.batch_mut()?.pending = pending;
        Ok(())
    }

    /// Sends the queued commit elements as COMMIT_IO_CMDS (at most `depth` per SQE),
    /// calling `sent` with the element count of each command queued.
    fn flush_commits(&mut self, sent: &mut dyn FnMut(u16)) -> Result<(), i32> {
        loop {
            let max_elems = usize::from(self.depth);
            let Some(b) = &mut self.batch else { return Ok(()) };
            if b.pending.is_empty() {
                return Ok(());
            }
            let max = max_elems * b.elem_bytes;
            let mut elems = std::mem::take(&mut b.pending);
            let mut next = b.spare.pop().unwrap_or_default();
            next.clear();
            if elems.len() > max {
                next.extend_from_slice(&elems[max..]);
                elems.truncate(max);
            }
            b.pending = next;
            let nr = (elems.len() / b.elem_bytes) as u16;
            let (flags, elem_bytes) = (b.flags, b.elem_bytes as u8);
            let slot = match b.inflight.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    b.inflight.push(None);
                    b.inflight.len() - 1
                }
            };
            let addr = elems.as_ptr() as u64;
            b.inflight[slot] = Some(elems);
            b.commits_inflight += 1;
            let sqe = self
                .batch_cmd(uapi::IO_COMMIT_IO_CMDS, flags, nr, elem_bytes)
                .addr(Some(addr))
                .build()
                .user_data(tag::encode(Kind::Commit, 0, slot as u16));
            // SAFETY: the array is kept in `inflight[slot]` (a heap buffer that does not
            // move) until this SQE's CQE is reaped, and leaked if the ring goes first.
            unsafe { self.push(&sqe) }?;
            sent(nr);
        }
    }

    /// Handles a COMMIT_IO_CMDS completion: unconsumed elements are queued again.
    fn on_commit(&mut self, slot: u16, res: i32) -> CommitOutcome {
        let q_id = self.q_id;
        let Some(b) = &mut self.batch else { return CommitOutcome::Done };
        let Some(mut elems) = b.inflight.get_mut(usize::from(slot)).and_then(Option::take) else {
            tracing::error!(q_id, slot, "completion of an unknown commit");
            return CommitOutcome::Done;
        };
        b.commits_inflight -= 1;
        let (again, refused) = commit_leftover(&elems, b.elem_bytes, res);
        b.pending.extend_from_slice(&elems[again]);
        elems.clear();
        b.spare.push(elems);
        match refused {
            Some((tag, errno)) => CommitOutcome::Refused { tag, errno },
            None => CommitOutcome::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elems(tags: &[u16], flags: u16) -> Vec<u8> {
        let mut v = Vec::new();
        for &tag in tags {
            uapi::push_batch_elem(&mut v, flags, ElemHeader { tag, buf_index: tag, result: 0 }, 0x1000);
        }
        v
    }

    #[test]
    fn commit_leftovers() {
        for flags in [0, uapi::BATCH_F_HAS_BUF_ADDR] {
            let eb = uapi::batch_elem_bytes(flags);
            let v = elems(&[4, 5, 6], flags);
            // All taken.
            assert_eq!(commit_leftover(&v, eb, v.len() as i32), (v.len()..v.len(), None));
            // One taken: the rest goes again, starting with the one refused.
            assert_eq!(commit_leftover(&v, eb, eb as i32), (eb..v.len(), None));
            // None taken: the first is dropped (refused), the rest goes again.
            assert_eq!(commit_leftover(&v, eb, -libc::EBUSY), (eb..v.len(), Some((4, -libc::EBUSY))));
            let one = elems(&[9], flags);
            assert_eq!(commit_leftover(&one, eb, -libc::EINVAL), (eb..eb, Some((9, -libc::EINVAL))));
        }
    }
}
