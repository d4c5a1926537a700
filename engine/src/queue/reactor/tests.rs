//! The reactor driven without a kernel: a fake ring records what the reactor sends and
//! hands back completions the test scripts, as the ublk driver and io_uring would.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::request::{FileSlot, Mem, MemId, Op};
use crate::ring::io::{Owner, Rw, Sock, TargetSq};

const DEPTH: u16 = 4;
const BUF: u32 = 64 << 10;
const DEV: u64 = 1 << 20;
const MORE: u32 = 1 << 1; // IORING_CQE_F_MORE

/// A target SQE the reactor pushed for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetIo {
    Rw(Rw),
    Sock(Sock),
    Fsync,
    Timeout,
}

/// What the kernel side has been told.
#[derive(Debug, Default)]
struct Kernel {
    /// Per-tag: FETCH_REQ for these tags (in order).
    fetches: Vec<u16>,
    /// Commits, per-tag or batch (sent), as (tag, result), in order.
    commits: Vec<(u16, i32)>,
    /// Target SQEs not yet completed: (tag, cookie, what).
    target: Vec<(u16, u16, TargetIo)>,
    /// Queue SQEs not yet completed: (cookie, what).
    queue: Vec<(u16, TargetIo)>,
    /// Link flags seen on pushes (the next SQE is linked).
    link_pending: bool,
    linked: u32,
    target_wakes_armed: u32,
    /// Completions the next reap returns.
    cqes: VecDeque<Cqe>,
    wake: u64,
    wakes_armed: u32,
    abandoned: bool,
    /// Batch: PREP_IO_CMDS sent, fetches armed, commits queued and sent by cookie.
    prepped: bool,
    fetch_arms: u32,
    queued: Vec<(u16, i32)>,
    sent: Vec<Option<Vec<(u16, i32)>>>,
    /// Batch: the tags the next Fetch completion delivers.
    to_fetch: Vec<u16>,
    /// User copy: char device reads and writes not yet completed: (tag, to_kernel, len).
    copies: Vec<(u16, bool, u32)>,
    /// Zone append commits: (tag, sector).
    append_sectors: Vec<(u16, u64)>,
    /// Shared memory (SHMEM_ZC): per tag, where its request's data is (set_shared), and
    /// the registered buffer's index and length (None: no shared memory).
    shared: Vec<Option<(u64, u32)>>,
    shmem: Option<(u16, u64)>,
}

#[derive(Debug, Clone, Default)]
struct FakeRing(Rc<RefCell<Kernel>>);

impl FakeRing {
    fn push(&mut self, owner: Owner, cookie: u16, what: TargetIo) -> Result<(), i32> {
        let mut k = self.0.borrow_mut();
        if std::mem::take(&mut k.link_pending) {
            k.linked += 1;
        }
        match owner {
            Owner::Request(tag) => k.target.push((tag, cookie, what)),
            Owner::Queue => k.queue.push((cookie, what)),
        }
        Ok(())
    }
}

impl TargetSq for FakeRing {
    fn rw(&mut self, tag: u16, rw: Rw, cookie: u16) -> Result<(), i32> {
        self.push(Owner::Request(tag), cookie, TargetIo::Rw(rw))
    }
    fn sock(&mut self, owner: Owner, io: Sock, cookie: u16) -> Result<(), i32> {
        if matches!((owner, io.mem), (Owner::Queue, Mem::Request { .. })) {
            return Err(-libc::EINVAL);
        }
        self.push(owner, cookie, TargetIo::Sock(io))
    }
    fn fsync(&mut self, owner: Owner, _file: FileSlot, _datasync: bool, cookie: u16) -> Result<(), i32> {
        self.push(owner, cookie, TargetIo::Fsync)
    }
    fn fallocate(&mut self, _: Owner, _: FileSlot, _: (i32, u64, u64), _: u16) -> Result<(), i32> {
        Err(-libc::EOPNOTSUPP)
    }
    fn timeout(&mut self, owner: Owner, _after: Duration, cookie: u16) -> Result<(), i32> {
        self.push(owner, cookie, TargetIo::Timeout)
    }
    fn link_next(&mut self) -> Result<(), i32> {
        self.0.borrow_mut().link_pending = true;
        Ok(())
    }
    fn mem(&mut self, _id: MemId) -> Option<&mut [u8]> {
        None
    }
    fn copy(&mut self, _tag: Option<u16>, _dst: Mem, _src: Option<Mem>) -> Result<(), i32> {
        Err(-libc::EOPNOTSUPP)
    }
    fn update_file(&mut self, _file: FileSlot, _fd: std::os::fd::RawFd) -> Result<(), i32> {
        Err(-libc::EOPNOTSUPP)
    }
    fn request_buf(&mut self, _tag: u16, _len: u32) -> Result<&mut [u8], i32> {
        Err(-libc::EOPNOTSUPP)
    }
}

impl Ring for FakeRing {
    fn sq(&mut self) -> &mut dyn TargetSq {
        self
    }
    fn push_ublk(&mut self, tag: u16, result: Option<i32>) -> Result<(), i32> {
        let mut k = self.0.borrow_mut();
        match result {
            None => k.fetches.push(tag),
            Some(r) => k.commits.push((tag, r)),
        }
        Ok(())
    }
    fn push_zone_append_commit(&mut self, tag: u16, result: i32, sector: u64) -> Result<(), i32> {
        let mut k = self.0.borrow_mut();
        k.commits.push((tag, result));
        k.append_sectors.push((tag, sector));
        Ok(())
    }
    fn push_wake(&mut self) -> Result<(), i32> {
        self.0.borrow_mut().wakes_armed += 1;
        Ok(())
    }
    fn push_target_wake(&mut self) -> Result<(), i32> {
        self.0.borrow_mut().target_wakes_armed += 1;
        Ok(())
    }
    fn wake_value(&self) -> u64 {
        self.0.borrow().wake
    }
    fn busy(&self) -> bool {
        let k = self.0.borrow();
        !k.queued.is_empty() || k.sent.iter().any(Option::is_some)
    }
    fn submit(&mut self, want: usize) -> std::io::Result<usize> {
        // A real ring would block here forever: the test left the reactor waiting.
        assert!(want == 0 || !self.0.borrow().cqes.is_empty(), "the reactor waits for a completion that never comes");
        Ok(0)
    }
    fn submit_wait_timeout(&mut self, _timeout: Duration) -> std::io::Result<usize> {
        self.submit(1)
    }
    fn reap(&mut self, out: &mut Vec<Cqe>) {
        out.extend(self.0.borrow_mut().cqes.drain(..));
    }
    fn abandon_buffers(&mut self) {
        self.0.borrow_mut().abandoned = true;
    }
    fn push_user_copy(&mut self, tag: u16, to_kernel: bool, len: u32) -> Result<(), i32> {
        self.0.borrow_mut().copies.push((tag, to_kernel, len));
        Ok(())
    }
    fn set_shared(&mut self, tag: u16, at: Option<(u64, u32)>) -> Result<(), i32> {
        let mut k = self.0.borrow_mut();
        k.shared.resize(usize::from(DEPTH), None);
        k.shared[usize::from(tag)] = None;
        if let Some((addr, len)) = at {
            let (index, size) = k.shmem.ok_or(-libc::EIO)?;
            let off = u64::from(uapi::shmem_zc_offset(addr));
            if uapi::shmem_zc_index(addr) != index || off + u64::from(len) > size {
                return Err(-libc::EIO);
            }
            k.shared[usize::from(tag)] = at;
        }
        Ok(())
    }
}

impl BatchRing for FakeRing {
    fn prep_all(&mut self) -> Result<i32, i32> {
        self.0.borrow_mut().prepped = true;
        Ok(0)
    }
    fn push_fetch(&mut self) -> Result<(), i32> {
        self.0.borrow_mut().fetch_arms += 1;
        Ok(())
    }
    fn take_fetched(&mut self, _res: i32, _flags: u32, out: &mut Vec<u16>) {
        out.clear();
        out.append(&mut self.0.borrow_mut().to_fetch);
    }
    fn queue_commit(&mut self, tag: u16, result: i32) -> Result<(), i32> {
        self.0.borrow_mut().queued.push((tag, result));
        Ok(())
    }
    fn flush_commits(&mut self, sent: &mut dyn FnMut(u16)) -> Result<(), i32> {
        let mut k = self.0.borrow_mut();
        if !k.queued.is_empty() {
            let elems = std::mem::take(&mut k.queued);
            sent(elems.len() as u16);
            k.sent.push(Some(elems));
        }
        Ok(())
    }
    /// res >= 0: all taken; res < 0: the first element refused, the rest queued again.
    fn on_commit(&mut self, slot: u16, res: i32) -> CommitOutcome {
        let mut k = self.0.borrow_mut();
        let elems = k.sent[usize::from(slot)].take().expect("a commit completed twice");
        if res >= 0 {
            k.commits.extend(elems);
            return CommitOutcome::Done;
        }
        k.queued.extend_from_slice(&elems[1..]);
        CommitOutcome::Refused { tag: elems[0].0, errno: res }
    }
}

#[derive(Debug, Clone, Default)]
struct FakeDescs(Rc<RefCell<Vec<IoDesc>>>);

impl Descs for FakeDescs {
    fn get(&self, tag: u16) -> IoDesc {
        self.0.borrow()[usize::from(tag)]
    }
}

/// What the test target saw.
#[derive(Debug, Default)]
struct Seen {
    submits: u32,
    completes: u32,
}

/// Loop-like: reads and writes go to file slot 1 in full, the rest is pushed again
/// after a short transfer; FLUSH is an fsync. Panics on a request at `panic_at`.
struct TestTarget {
    seen: Rc<RefCell<Seen>>,
    done: Vec<u32>,
    panic_at: Option<u64>,
}

impl TestTarget {
    fn push(&self, req: &IoRequest, done: u32, io: &mut IoCtx<'_>) -> Disposition {
        let len = req.len as u32 - done;
        let off = req.offset + u64::from(done);
        let r = match req.op {
            Op::Read => io.read(FileSlot(1), done, len, off, 0),
            _ => io.write(FileSlot(1), done, len, off, false, 0),
        };
        match r {
            Ok(()) => Disposition::Pending,
            Err(e) => Disposition::Done(e),
        }
    }
}

impl QueueTarget for TestTarget {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        self.seen.borrow_mut().submits += 1;
        if self.panic_at == Some(req.offset) {
            panic!("test target panics at {}", req.offset);
        }
        match req.op {
            Op::Read | Op::Write => {
                self.done[usize::from(req.tag)] = 0;
                self.push(req, 0, io)
            }
            Op::Flush => match io.fsync(FileSlot(1), true, 1) {
                Ok(()) => Disposition::Pending,
                Err(e) => Disposition::Done(e),
            },
            _ => Disposition::Done(0),
        }
    }
    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition {
        self.seen.borrow_mut().completes += 1;
        if res < 0 || cookie == 1 {
            return Disposition::Done(res.min(0));
        }
        let done = &mut self.done[usize::from(req.tag)];
        *done += res as u32;
        match *done {
            d if u64::from(d) >= req.len => Disposition::Done(req.len as i32),
            _ if res == 0 => Disposition::Done(-libc::EIO),
            d => self.push(req, d, io),
        }
    }
}

/// A reactor over the fakes, with the handles a test needs.
struct Sim {
    kernel: Rc<RefCell<Kernel>>,
    descs: Rc<RefCell<Vec<IoDesc>>>,
    seen: Rc<RefCell<Seen>>,
    events: mpsc::Receiver<QueueEvent>,
    reactor: Reactor<'static, FakeRing, FakeDescs>,
    cqes: Vec<Cqe>,
}

fn desc(op: u8, offset: u64, len: u32) -> IoDesc {
    IoDesc { op_flags: u32::from(op), nr_sectors: len / 512, start_sector: offset / 512, addr: 0 }
}

impl Sim {
    fn new(protocol: IoProtocol, panic_at: Option<u64>) -> Self {
        let seen = Rc::new(RefCell::new(Seen::default()));
        let target = TestTarget { seen: Rc::clone(&seen), done: vec![0; usize::from(DEPTH)], panic_at };
        Self::with_target(protocol, Box::new(target), seen)
    }

    fn with_target(protocol: IoProtocol, target: Box<dyn QueueTarget>, seen: Rc<RefCell<Seen>>) -> Self {
        Self::build(protocol, target, seen, false, |_| Some(DEV))
    }

    /// A queue in buffer mode user-copy.
    fn user_copy(protocol: IoProtocol) -> Self {
        let seen = Rc::new(RefCell::new(Seen::default()));
        let target = TestTarget { seen: Rc::clone(&seen), done: vec![0; usize::from(DEPTH)], panic_at: None };
        let mut s = Self::build(protocol, Box::new(target), seen, false, |_| Some(DEV));
        s.reactor.g.user_copy = true;
        s
    }

    /// Completes the oldest user-copy read or write of `tag` with `res`.
    fn complete_copy(&self, tag: u16, res: i32) -> (bool, u32) {
        let mut k = self.kernel.borrow_mut();
        let i = k.copies.iter().position(|&(t, _, _)| t == tag).expect("no user copy for the tag");
        let (_, to_kernel, len) = k.copies.remove(i);
        k.cqes.push_back(Cqe { kind: Kind::UserCopy, tag, cookie: 0, res, flags: 0 });
        (to_kernel, len)
    }

    /// A queue whose device the kernel has grown to twice the size it started with.
    fn grown(protocol: IoProtocol) -> Self {
        let seen = Rc::new(RefCell::new(Seen::default()));
        let target = TestTarget { seen: Rc::clone(&seen), done: vec![0; usize::from(DEPTH)], panic_at: None };
        Self::build(protocol, Box::new(target), seen, false, |_| Some(2 * DEV))
    }

    /// A read-only device's queue.
    fn read_only(protocol: IoProtocol) -> Self {
        let seen = Rc::new(RefCell::new(Seen::default()));
        let target = TestTarget { seen: Rc::clone(&seen), done: vec![0; usize::from(DEPTH)], panic_at: None };
        Self::build(protocol, Box::new(target), seen, true, |_| Some(DEV))
    }

    fn build(
        protocol: IoProtocol,
        target: Box<dyn QueueTarget>,
        seen: Rc<RefCell<Seen>>,
        read_only: bool,
        size_now: fn(u32) -> Option<u64>,
    ) -> Self {
        let ring = FakeRing::default();
        let kernel = Rc::clone(&ring.0);
        let descs = FakeDescs(Rc::new(RefCell::new(vec![IoDesc::default(); usize::from(DEPTH)])));
        let (tx, events) = mpsc::channel();
        let stats: &'static QueueStats = Box::leak(Box::new(QueueStats::new(protocol == IoProtocol::Batch)));
        let g = Geometry {
            q_id: 0,
            depth: DEPTH,
            buf_size: BUF,
            dev_size: DEV,
            read_only,
            first_tag: 0,
            tag_end: DEPTH,
            user_copy: false,
            protocol,
            size_now,
            dev_id: 0,
        };
        let descs_handle = Rc::clone(&descs.0);
        let mut reactor = Reactor::new(ring, target, descs, g, tx, stats);
        reactor.arm().unwrap();
        reactor.start().unwrap();
        Sim { kernel, descs: descs_handle, seen, events, reactor, cqes: Vec::new() }
    }

    fn protocol(&self) -> IoProtocol {
        self.reactor.g.protocol
    }

    fn cqe(&self, kind: Kind, tag: u16, cookie: u16, res: i32, flags: u32) {
        self.kernel.borrow_mut().cqes.push_back(Cqe { kind, tag, cookie, res, flags });
    }

    /// The kernel hands `tag` a request.
    fn deliver(&self, tag: u16, d: IoDesc) {
        self.descs.borrow_mut()[usize::from(tag)] = d;
        match self.protocol() {
            IoProtocol::PerTag => self.cqe(Kind::Ublk, tag, 0, uapi::IO_RES_OK, 0),
            IoProtocol::Batch => {
                self.kernel.borrow_mut().to_fetch.push(tag);
                self.cqe(Kind::Fetch, 0, 0, 2, MORE);
            }
        }
    }

    fn pass(&mut self) {
        self.reactor.pass(&mut self.cqes).unwrap();
    }

    /// Completes the oldest target SQE of `tag` with `res`.
    fn complete(&self, tag: u16, res: i32) -> TargetIo {
        let mut k = self.kernel.borrow_mut();
        let i = k.target.iter().position(|&(t, _, _)| t == tag).expect("no target SQE for the tag");
        let (_, cookie, what) = k.target.remove(i);
        k.cqes.push_back(Cqe { kind: Kind::Target, tag, cookie, res, flags: 0 });
        what
    }

    /// Batch: completes every commit sent so far with `res`.
    fn complete_commits(&self, res: i32) {
        let slots: Vec<u16> = {
            let k = self.kernel.borrow();
            (0..k.sent.len()).filter(|&i| k.sent[i].is_some()).map(|i| i as u16).collect()
        };
        for s in slots {
            self.cqe(Kind::Commit, 0, s, res, 0);
        }
    }

    /// Sends the commits (batch) and completes them, so `commits` shows them.
    fn settle(&mut self) {
        if self.protocol() == IoProtocol::Batch {
            self.pass_idle();
            self.complete_commits(0);
            self.pass();
        }
    }

    /// A pass with nothing completing (batch: flushes queued commits).
    fn pass_idle(&mut self) {
        // Let the pass return: a fake completion of nothing the reactor waits for.
        self.kernel.borrow_mut().wake = 0;
        self.cqe(Kind::Aux, 0, 0, 0, 0);
        self.pass();
    }

    fn commits(&self) -> Vec<(u16, i32)> {
        self.kernel.borrow().commits.clone()
    }
}

fn both() -> [IoProtocol; 2] {
    [IoProtocol::PerTag, IoProtocol::Batch]
}

#[test]
fn arming_hands_every_tag_to_the_kernel() {
    let s = Sim::new(IoProtocol::PerTag, None);
    assert_eq!(s.kernel.borrow().fetches, [0, 1, 2, 3]);
    assert_eq!(s.kernel.borrow().wakes_armed, 1);
    let b = Sim::new(IoProtocol::Batch, None);
    let k = b.kernel.borrow();
    assert!(k.prepped && k.fetch_arms == 1 && k.fetches.is_empty() && k.wakes_armed == 1);
}

#[test]
fn a_read_is_served_and_committed_once() {
    for p in both() {
        let mut s = Sim::new(p, None);
        s.deliver(2, desc(uapi::IO_OP_READ, 8192, 4096));
        s.pass();
        let k = s.kernel.borrow().target.clone();
        assert_eq!(k.len(), 1, "{p}");
        let (tag, _, TargetIo::Rw(rw)) = k[0] else { panic!("{k:?}") };
        assert_eq!((tag, rw.write, rw.buf_off, rw.len, rw.offset), (2, false, 0, 4096, 8192));
        assert!(s.commits().is_empty());
        s.complete(2, 4096);
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(2, 4096)], "{p}");
    }
}

#[test]
fn short_transfers_are_pushed_again_until_done() {
    for p in both() {
        let mut s = Sim::new(p, None);
        s.deliver(1, desc(uapi::IO_OP_WRITE, 0, 16384));
        s.pass();
        for (res, rest) in [(4096, 12288), (512, 11776), (8192, 3584)] {
            s.complete(1, res);
            s.pass();
            let TargetIo::Rw(rw) = s.kernel.borrow().target[0].2 else { panic!() };
            assert_eq!(
                (rw.len, u64::from(rw.buf_off), rw.offset),
                (rest, 16384 - u64::from(rest), 16384 - u64::from(rest))
            );
            assert!(s.commits().is_empty());
        }
        s.complete(1, 3584);
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(1, 16384)], "{p}");
    }
}

#[test]
fn a_malformed_descriptor_fails_without_reaching_the_target() {
    for p in both() {
        let mut s = Sim::new(p, None);
        // Past the end of the device, bigger than the buffer, an unknown op.
        s.deliver(0, desc(uapi::IO_OP_READ, DEV, 4096));
        s.deliver(1, desc(uapi::IO_OP_WRITE, 0, BUF + 512));
        s.deliver(2, desc(77, 0, 4096));
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(0, -libc::EIO), (1, -libc::EIO), (2, -libc::EOPNOTSUPP)], "{p}");
        assert_eq!(s.seen.borrow().submits, 0);
        // The tags are the kernel's again: the next request on one is served.
        s.deliver(0, desc(uapi::IO_OP_FLUSH, 0, 0));
        s.pass();
        assert_eq!(s.complete(0, 0), TargetIo::Fsync);
        s.pass();
        s.settle();
        assert_eq!(s.commits().last(), Some(&(0, 0)), "{p}");
    }
}

#[test]
fn a_read_only_device_fails_writes_without_reaching_the_target() {
    for p in both() {
        let mut s = Sim::read_only(p);
        s.deliver(0, desc(uapi::IO_OP_WRITE, 0, 4096));
        s.deliver(1, desc(uapi::IO_OP_DISCARD, 4096, 4096));
        s.deliver(2, desc(uapi::IO_OP_WRITE_ZEROES, 8192, 4096));
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(0, -libc::EROFS), (1, -libc::EROFS), (2, -libc::EROFS)], "{p}");
        assert_eq!(s.seen.borrow().submits, 0, "{p}");
        // Reads and flushes are served.
        s.deliver(3, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        s.complete(3, 4096);
        s.pass();
        s.settle();
        assert_eq!(s.commits().last(), Some(&(3, 4096)), "{p}");
    }
}

#[test]
fn a_device_grown_by_the_kernel_serves_its_new_end() {
    for p in both() {
        let mut s = Sim::grown(p);
        s.deliver(0, desc(uapi::IO_OP_READ, DEV, 4096));
        s.deliver(1, desc(uapi::IO_OP_READ, 2 * DEV, 4096));
        s.pass();
        s.complete(0, 4096);
        s.pass();
        s.settle();
        // Past the old end: served; past the new one: still malformed.
        assert_eq!(s.commits(), [(1, -libc::EIO), (0, 4096)], "{p}");
        assert_eq!(s.seen.borrow().submits, 1, "{p}");
    }
}

#[test]
fn a_target_panic_fails_its_request_and_every_later_one() {
    for p in both() {
        let mut s = Sim::new(p, Some(4096));
        // Tag 0's read is in flight when tag 1's request makes the target panic.
        s.deliver(0, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        s.deliver(1, desc(uapi::IO_OP_READ, 4096, 4096));
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(1, -libc::EIO)], "{p}");
        assert!(
            matches!(s.events.try_recv(), Ok(QueueEvent::TargetFailed { q_id: 0, ref msg }) if msg.contains("test target panics"))
        );
        // Tag 0 fails once its SQE is done (it may still use the buffer), without the
        // target being called again; so does any later request.
        s.complete(0, 4096);
        s.deliver(2, desc(uapi::IO_OP_WRITE, 0, 512));
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(1, -libc::EIO), (0, -libc::EIO), (2, -libc::EIO)], "{p}");
        assert_eq!((s.seen.borrow().submits, s.seen.borrow().completes), (2, 0));
    }
}

#[test]
fn stop_waits_for_requests_in_the_target() {
    for p in both() {
        let mut s = Sim::new(p, None);
        s.deliver(3, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        s.kernel.borrow_mut().wake = WAKE_STOP;
        s.cqe(Kind::Wake, 0, 0, 8, 0);
        s.pass();
        assert!(!s.reactor.done(), "{p}: stopped with a request in the target");
        assert_eq!(s.kernel.borrow().wakes_armed, 2, "re-armed for an abort");
        s.complete(3, 4096);
        s.pass();
        if p == IoProtocol::Batch {
            // The commit is queued, then sent: the queue waits for it too.
            assert!(!s.reactor.done());
            s.pass_idle();
            assert!(!s.reactor.done(), "stopped with a commit in flight");
            s.complete_commits(0);
            s.pass();
        }
        assert!(s.reactor.done(), "{p}");
        assert_eq!(s.commits(), [(3, 4096)]);
        assert!(!s.kernel.borrow().abandoned);
    }
}

#[test]
fn abort_gives_up_on_io_in_flight_and_keeps_its_buffers() {
    for p in both() {
        let mut s = Sim::new(p, None);
        s.deliver(0, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        s.kernel.borrow_mut().wake = WAKE_ABORT;
        s.cqe(Kind::Wake, 0, 0, 8, 0);
        // serve() returns at once: nothing more is waited for.
        s.reactor.serve().unwrap();
        assert!(s.kernel.borrow().abandoned, "{p}: buffers of IO in flight were not kept");
        assert!(s.commits().is_empty());
    }
}

#[test]
fn the_kernel_aborting_every_tag_ends_the_queue() {
    let mut s = Sim::new(IoProtocol::PerTag, None);
    for tag in 0..DEPTH {
        s.cqe(Kind::Ublk, tag, 0, uapi::IO_RES_ABORT, 0);
    }
    assert!(!s.reactor.done());
    s.pass();
    assert!(s.reactor.done());
    // Batch: the multishot fetch ends with ABORT.
    let mut b = Sim::new(IoProtocol::Batch, None);
    b.cqe(Kind::Fetch, 0, 0, uapi::IO_RES_ABORT, 0);
    b.pass();
    assert!(b.reactor.done());
    assert_eq!(b.kernel.borrow().fetch_arms, 1, "an aborted fetch is not re-armed");
}

#[test]
fn a_refused_batch_commit_kills_that_tag_only() {
    let mut s = Sim::new(IoProtocol::Batch, None);
    s.deliver(0, desc(uapi::IO_OP_READ, 0, 4096));
    s.deliver(1, desc(uapi::IO_OP_READ, 4096, 4096));
    s.pass();
    s.complete(0, 4096);
    s.complete(1, 4096);
    s.pass();
    s.pass_idle();
    // The kernel takes none: the first (tag 0) is refused and dropped; tag 1 goes again.
    s.complete_commits(-libc::EINVAL);
    s.pass();
    assert_eq!(s.reactor.slots[0], Slot::Dead);
    s.settle();
    assert_eq!(s.commits(), [(1, 4096)]);
    assert_eq!(s.reactor.slots[1], Slot::Fetching);
}

#[test]
fn a_fetch_that_ends_is_armed_again() {
    let mut s = Sim::new(IoProtocol::Batch, None);
    s.cqe(Kind::Fetch, 0, 0, -libc::ENOBUFS, 0);
    s.pass();
    assert_eq!(s.kernel.borrow().fetch_arms, 2);
    assert!(!s.reactor.done());
}

/// One step of the kernel and the backing, chosen by proptest.
#[derive(Debug, Clone)]
enum Step {
    /// Deliver the next request on a free tag (the n-th free one).
    Deliver(usize),
    /// Complete the n-th target SQE in flight, transferring this share of what it asked.
    Complete(usize, u8),
    /// Batch: complete the commits sent.
    Commits,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0..8usize).prop_map(Step::Deliver),
        (0..8usize, 1..=4u8).prop_map(|(i, q)| Step::Complete(i, q)),
        Just(Step::Commits),
    ];
    proptest::collection::vec(step, 0..120)
}

proptest! {
    /// Whatever order requests arrive and their IO completes in, and however short the
    /// transfers, every request is committed exactly once, with its full length.
    #[test]
    fn every_request_is_committed_exactly_once(batch: bool, requests in 1..24usize, script in steps()) {
        let p = if batch { IoProtocol::Batch } else { IoProtocol::PerTag };
        let mut s = Sim::new(p, None);
        let mut delivered = 0usize;
        // Tags the kernel may hand a request now, and which request each tag carries.
        let mut free: Vec<u16> = (0..DEPTH).collect();
        let mut carried: Vec<Option<usize>> = vec![None; usize::from(DEPTH)];
        let mut committed: Vec<u32> = vec![0; requests];
        let mut seen_commits = 0;
        let len = |i: usize| 512 * (1 + (i as u32 * 7) % 16);
        let run = |s: &mut Sim, step: Step, delivered: &mut usize, free: &mut Vec<u16>, carried: &mut Vec<Option<usize>>| {
            match step {
                Step::Deliver(n) if *delivered < requests && !free.is_empty() => {
                    let tag = free.remove(n % free.len());
                    let i = *delivered;
                    *delivered += 1;
                    carried[usize::from(tag)] = Some(i);
                    let op = if i.is_multiple_of(3) { uapi::IO_OP_WRITE } else { uapi::IO_OP_READ };
                    s.deliver(tag, desc(op, (i as u64) * 8192, len(i)));
                }
                Step::Complete(n, share) => {
                    let inflight = s.kernel.borrow().target.len();
                    if inflight > 0 {
                        let (tag, _, what) = s.kernel.borrow().target[n % inflight];
                        let TargetIo::Rw(rw) = what else { unreachable!() };
                        let res = (rw.len * u32::from(share) / 4).max(512).min(rw.len);
                        let _ = s.complete(tag, res as i32);
                    }
                }
                Step::Commits => s.complete_commits(0),
                Step::Deliver(_) => {}
            }
        };
        for step in script {
            run(&mut s, step, &mut delivered, &mut free, &mut carried);
            if !s.kernel.borrow().cqes.is_empty() {
                s.pass();
            } else if p == IoProtocol::Batch {
                s.pass_idle();
            }
            // Committed tags are the kernel's again.
            let commits = s.commits();
            for &(tag, res) in &commits[seen_commits..] {
                let i = carried[usize::from(tag)].take().expect("a tag committed that carried no request");
                prop_assert_eq!(res, len(i) as i32);
                committed[i] += 1;
                free.push(tag);
            }
            seen_commits = commits.len();
        }
        // Drain: deliver what is left and complete everything in full.
        for _ in 0..requests * 8 {
            run(&mut s, Step::Deliver(0), &mut delivered, &mut free, &mut carried);
            run(&mut s, Step::Complete(0, 4), &mut delivered, &mut free, &mut carried);
            run(&mut s, Step::Commits, &mut delivered, &mut free, &mut carried);
            s.pass_idle();
            let commits = s.commits();
            for &(tag, res) in &commits[seen_commits..] {
                let i = carried[usize::from(tag)].take().expect("a tag committed that carried no request");
                prop_assert_eq!(res, len(i) as i32);
                committed[i] += 1;
                free.push(tag);
            }
            seen_commits = commits.len();
        }
        prop_assert!(committed.iter().all(|&n| n == 1), "commits per request: {:?}", committed);
        prop_assert_eq!(s.seen.borrow().submits as usize, requests);
    }
}

// ---- The target API for targets that are not a file ----

const SOCK: FileSlot = FileSlot(1);
const HDR: u16 = 100;
const SENT: u16 = 1;
const DATA: u16 = 2;

/// What the protocol test target is told by the test: replies on its socket (tag,
/// result, read data length), flushes done by another thread, and what it saw.
#[derive(Debug, Default)]
struct Wire {
    replies: VecDeque<(u16, i32)>,
    flushed: VecDeque<u16>,
    /// finish() results seen by the target.
    finish_errors: Vec<i32>,
    stopped: u32,
    panic_in_queue: bool,
}

/// A client of a socket protocol, as the NBD target will be: each request sends a
/// header (its own target memory) linked with its payload; a standing receive on the
/// queue takes replies and finishes their requests (receiving read data into the
/// request's buffer, acting for it); FLUSH goes to "another thread" that wakes the
/// queue when done; stop ends the standing receive.
struct ProtoTarget {
    wire: Rc<RefCell<Wire>>,
    hdrs: Vec<MemId>,
    reply: MemId,
    /// Per tag: its sends are done; the reply arrived first (with this result).
    sent: Vec<bool>,
    early: Vec<Option<i32>>,
    stopping: bool,
}

impl ProtoTarget {
    fn arm(&self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        io.recv(SOCK, Mem::Owned { id: self.reply, off: 0, len: 16 }, libc::MSG_WAITALL, HDR)
    }
}

impl QueueTarget for ProtoTarget {
    fn start(&mut self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        assert_eq!(io.tag(), None);
        // A queue context has no request buffer.
        assert_eq!(io.read(SOCK, 0, 512, 0, 0), Err(-libc::EINVAL));
        assert_eq!(io.send(SOCK, Mem::Request { off: 0, len: 512 }, 0, 0), Err(-libc::EINVAL));
        self.arm(io)
    }

    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        let tag = usize::from(req.tag);
        if req.op == Op::Flush {
            return Disposition::Pending; // "another thread" flushes, then wakes us
        }
        self.sent[tag] = false;
        self.early[tag] = None;
        let hdr = Mem::Owned { id: self.hdrs[tag], off: 0, len: 28 };
        let r = if req.op == Op::Write {
            io.link_next()
                .and_then(|()| io.send(SOCK, hdr, libc::MSG_MORE, 0))
                .and_then(|()| io.send(SOCK, Mem::Request { off: 0, len: req.len as u32 }, libc::MSG_WAITALL, SENT))
        } else {
            io.send(SOCK, hdr, 0, SENT)
        };
        match r {
            Ok(()) => Disposition::Pending,
            Err(e) => Disposition::Done(e),
        }
    }

    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, _io: &mut IoCtx<'_>) -> Disposition {
        let tag = usize::from(req.tag);
        match cookie {
            _ if res < 0 => Disposition::Done(res),
            SENT => {
                self.sent[tag] = true;
                // The reply may have come before this completion was reaped.
                self.early[tag].take().map_or(Disposition::Pending, Disposition::Done)
            }
            DATA => Disposition::Done(res),
            _ => Disposition::Pending,
        }
    }

    fn queue_complete(&mut self, cookie: u16, res: i32, io: &mut IoCtx<'_>) {
        assert_eq!(cookie, HDR);
        if self.wire.borrow().panic_in_queue {
            panic!("protocol target panics in its queue context");
        }
        if res <= 0 || self.stopping {
            return; // the socket was shut down: the standing receive ends
        }
        let (tag, result) = self.wire.borrow_mut().replies.pop_front().expect("a reply header was received");
        if let Some(len) = (result > 0).then_some(result) {
            // A read's data follows the header: received into the request's buffer,
            // on its behalf, and the next header only after it.
            if let Some(mut rio) = io.for_request(tag)
                && rio.link_next().is_ok()
                && rio.recv(SOCK, Mem::Request { off: 0, len: len as u32 }, libc::MSG_WAITALL, DATA).is_ok()
            {
                self.arm(io).unwrap();
                return;
            }
        }
        match io.finish(tag, result.min(0)) {
            Ok(()) => {}
            Err(e) => {
                // Its own sends are still in flight: finished when they complete.
                self.wire.borrow_mut().finish_errors.push(e);
                self.early[usize::from(tag)] = Some(result.min(0));
            }
        }
        self.arm(io).unwrap();
    }

    fn woken(&mut self, io: &mut IoCtx<'_>) {
        while let Some(tag) = self.wire.borrow_mut().flushed.pop_front() {
            io.finish(tag, 0).unwrap();
        }
    }

    fn stop(&mut self, _io: &mut IoCtx<'_>) {
        self.stopping = true;
        self.wire.borrow_mut().stopped += 1;
    }
}

fn proto_sim() -> (Sim, Rc<RefCell<Wire>>) {
    let wire = Rc::new(RefCell::new(Wire::default()));
    let target = ProtoTarget {
        wire: Rc::clone(&wire),
        hdrs: (0..DEPTH).map(MemId).collect(),
        reply: MemId(DEPTH),
        sent: vec![false; usize::from(DEPTH)],
        early: vec![None; usize::from(DEPTH)],
        stopping: false,
    };
    (Sim::with_target(IoProtocol::PerTag, Box::new(target), Rc::default()), wire)
}

impl Sim {
    /// The socket delivers a reply header: the standing receive completes.
    fn reply(&self, wire: &Rc<RefCell<Wire>>, tag: u16, res: i32) {
        wire.borrow_mut().replies.push_back((tag, res));
        self.complete_queue(HDR, 16);
    }

    fn complete_queue(&self, cookie: u16, res: i32) {
        let mut k = self.kernel.borrow_mut();
        let i = k.queue.iter().position(|&(c, _)| c == cookie).expect("no queue SQE with that cookie");
        k.queue.remove(i);
        k.cqes.push_back(Cqe { kind: Kind::QueueIo, tag: 0, cookie, res, flags: 0 });
    }
}

/// A target that gathers: submit only notes the request; end_of_pass sends one header
/// batch for all the pass brought, and the send's completion finishes them.
struct Gather {
    waiting: Vec<u16>,
    sent: Vec<u16>,
    passes: Rc<RefCell<u32>>,
}

impl QueueTarget for Gather {
    fn submit(&mut self, req: &IoRequest, _io: &mut IoCtx<'_>) -> Disposition {
        self.waiting.push(req.tag);
        Disposition::Pending
    }
    fn complete(&mut self, _req: &IoRequest, _cookie: u16, _res: i32, _io: &mut IoCtx<'_>) -> Disposition {
        unreachable!("the sends belong to the queue")
    }
    fn end_of_pass(&mut self, io: &mut IoCtx<'_>) {
        *self.passes.borrow_mut() += 1;
        assert_eq!(io.tag(), None);
        if !self.waiting.is_empty() && self.sent.is_empty() {
            let len = 28 * self.waiting.len() as u32;
            io.send(SOCK, Mem::Owned { id: MemId(0), off: 0, len }, 0, HDR).unwrap();
            self.sent = std::mem::take(&mut self.waiting);
        }
    }
    fn queue_complete(&mut self, _cookie: u16, _res: i32, io: &mut IoCtx<'_>) {
        for tag in self.sent.drain(..) {
            io.finish(tag, 0).unwrap();
        }
    }
}

#[test]
fn end_of_pass_gathers_the_requests_of_a_pass() {
    let passes = Rc::new(RefCell::new(0));
    let target = Gather { waiting: Vec::new(), sent: Vec::new(), passes: Rc::clone(&passes) };
    let mut s = Sim::with_target(IoProtocol::PerTag, Box::new(target), Rc::default());
    // Idle passes do not call it.
    s.pass_idle();
    assert_eq!(*passes.borrow(), 0);
    for tag in 0..3 {
        s.deliver(tag, desc(uapi::IO_OP_READ, u64::from(tag) * 4096, 4096));
    }
    s.pass();
    // Three requests in one pass: one call, one send of three headers.
    assert_eq!(*passes.borrow(), 1);
    {
        let k = s.kernel.borrow();
        assert_eq!(k.queue.len(), 1);
        let (HDR, TargetIo::Sock(sock)) = k.queue[0] else { panic!("{:?}", k.queue) };
        assert!(sock.send && sock.mem == Mem::Owned { id: MemId(0), off: 0, len: 84 });
    }
    s.complete_queue(HDR, 84);
    s.pass();
    let mut c = s.commits();
    c.sort_unstable();
    assert_eq!(c, [(0, 0), (1, 0), (2, 0)]);
    // Nothing in the target after that pass: no more calls.
    let n = *passes.borrow();
    s.pass_idle();
    assert_eq!(*passes.borrow(), n);
}

#[test]
fn start_arms_the_standing_receive_and_the_waker() {
    let (s, _) = proto_sim();
    let k = s.kernel.borrow();
    assert_eq!(k.queue.len(), 1);
    let (HDR, TargetIo::Sock(sock)) = k.queue[0] else { panic!("{:?}", k.queue) };
    assert!(!sock.send && sock.mem == Mem::Owned { id: MemId(DEPTH), off: 0, len: 16 });
    assert_eq!(k.target_wakes_armed, 1);
    assert_eq!(s.reactor.inflight.queue, 1);
}

#[test]
fn a_reply_on_the_queue_finishes_its_request() {
    let (mut s, wire) = proto_sim();
    s.deliver(1, desc(uapi::IO_OP_WRITE, 0, 4096));
    s.pass();
    // Header and payload, linked.
    assert_eq!(s.kernel.borrow().target.len(), 2);
    assert_eq!(s.kernel.borrow().linked, 1);
    s.complete(1, 28);
    s.complete(1, 4096);
    s.pass();
    assert!(s.commits().is_empty(), "committed before its reply");
    s.reply(&wire, 1, 0);
    s.pass();
    assert_eq!(s.commits(), [(1, 0)]);
    // The receive is armed again.
    assert_eq!(s.kernel.borrow().queue.len(), 1);
}

#[test]
fn a_reply_before_the_send_completes_waits_for_it() {
    let (mut s, wire) = proto_sim();
    s.deliver(0, desc(uapi::IO_OP_WRITE, 0, 512));
    s.pass();
    s.complete(0, 28);
    s.pass();
    // The reply comes while the payload's send completion is not reaped yet.
    s.reply(&wire, 0, -libc::ENOSPC);
    s.pass();
    assert_eq!(wire.borrow().finish_errors, [-libc::EBUSY]);
    assert!(s.commits().is_empty());
    s.complete(0, 512);
    s.pass();
    assert_eq!(s.commits(), [(0, -libc::ENOSPC)]);
}

#[test]
fn read_data_is_received_for_its_request() {
    let (mut s, wire) = proto_sim();
    s.deliver(2, desc(uapi::IO_OP_READ, 8192, 8192));
    s.pass();
    s.complete(2, 28);
    s.pass();
    let linked_before = s.kernel.borrow().linked;
    s.reply(&wire, 2, 8192);
    s.pass();
    {
        let k = s.kernel.borrow();
        // The data receive belongs to the request and is linked before the next header's.
        assert_eq!(k.target.len(), 1);
        let (2, DATA, TargetIo::Sock(sock)) = k.target[0] else { panic!("{:?}", k.target) };
        assert!(!sock.send && sock.mem == Mem::Request { off: 0, len: 8192 });
        assert_eq!(k.linked, linked_before + 1);
        assert_eq!(k.queue.len(), 1);
    }
    s.complete(2, 8192);
    s.pass();
    assert_eq!(s.commits(), [(2, 8192)]);
}

#[test]
fn a_waker_lets_another_thread_finish_requests() {
    let (mut s, wire) = proto_sim();
    s.deliver(3, desc(uapi::IO_OP_FLUSH, 0, 0));
    s.pass();
    assert!(s.commits().is_empty());
    wire.borrow_mut().flushed.push_back(3);
    s.cqe(Kind::Waker, 0, 0, 8, 0);
    s.pass();
    assert_eq!(s.commits(), [(3, 0)]);
    assert_eq!(s.kernel.borrow().target_wakes_armed, 2, "re-armed");
}

#[test]
fn finish_refuses_what_it_cannot_finish() {
    let (mut s, wire) = proto_sim();
    // A reply for a tag with no request: not live.
    s.reply(&wire, 2, 0);
    s.pass();
    assert_eq!(wire.borrow().finish_errors, [-libc::EINVAL]);
    assert!(s.commits().is_empty());
}

#[test]
fn stop_ends_the_queue_io_then_the_queue() {
    let (mut s, wire) = proto_sim();
    s.kernel.borrow_mut().wake = WAKE_STOP;
    s.cqe(Kind::Wake, 0, 0, 8, 0);
    s.pass();
    s.reactor.maybe_stop();
    assert_eq!(wire.borrow().stopped, 1);
    // The standing receive is still in flight: not done until it ends.
    assert!(!s.reactor.done());
    s.complete_queue(HDR, 0);
    s.pass();
    s.reactor.maybe_stop();
    assert!(s.reactor.done());
    assert_eq!(wire.borrow().stopped, 1, "stop is called once");
}

#[test]
fn a_panic_in_the_queue_context_fails_the_waiting_requests() {
    let (mut s, wire) = proto_sim();
    s.deliver(1, desc(uapi::IO_OP_WRITE, 0, 512));
    s.deliver(2, desc(uapi::IO_OP_FLUSH, 0, 0));
    s.pass();
    s.complete(1, 28);
    s.pass();
    wire.borrow_mut().panic_in_queue = true;
    s.reply(&wire, 1, 0);
    s.pass();
    // The flush waited on nothing of its own: failed now. The write fails once its
    // payload's send is done (it may still read the buffer).
    assert_eq!(s.commits(), [(2, -libc::EIO)]);
    assert!(matches!(s.events.try_recv(), Ok(QueueEvent::TargetFailed { .. })));
    s.complete(1, 512);
    s.pass();
    assert_eq!(s.commits(), [(2, -libc::EIO), (1, -libc::EIO)]);
}

/// Loop-like, but says Done while its second read is still in flight.
struct Hasty;

impl QueueTarget for Hasty {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        let half = req.len as u32 / 2;
        io.read(FileSlot(1), 0, half, req.offset, 0).unwrap();
        io.read(FileSlot(1), half, half, req.offset + u64::from(half), 1).unwrap();
        Disposition::Pending
    }
    fn complete(&mut self, req: &IoRequest, cookie: u16, _res: i32, _io: &mut IoCtx<'_>) -> Disposition {
        assert_eq!(cookie, 0, "called again after it said Done");
        Disposition::Done(req.len as i32)
    }
}

#[test]
fn done_with_sqes_in_flight_commits_when_they_complete() {
    let mut s = Sim::with_target(IoProtocol::PerTag, Box::new(Hasty), Rc::default());
    s.deliver(0, desc(uapi::IO_OP_READ, 0, 8192));
    s.pass();
    s.complete(0, 4096);
    s.pass();
    assert!(s.commits().is_empty(), "committed while its buffer may still be written");
    s.complete(0, 4096);
    s.pass();
    assert_eq!(s.commits(), [(0, 8192)]);
}

/// A request whose data the kernel found in shared memory buffer `index` at `off`.
fn shared_desc(op: u8, offset: u64, len: u32, index: u16, off: u32) -> IoDesc {
    IoDesc {
        op_flags: u32::from(op) | uapi::IO_F_SHMEM_ZC,
        addr: u64::from(index) << 32 | u64::from(off),
        ..desc(op, offset, len)
    }
}

#[test]
fn shared_memory_requests_skip_the_user_copy_and_are_counted() {
    for p in both() {
        let mut s = Sim::user_copy(p);
        s.kernel.borrow_mut().shmem = Some((0, 1 << 20));
        // A write in the shared memory: no char device read, straight to the target.
        s.deliver(1, shared_desc(uapi::IO_OP_WRITE, 4096, 8192, 0, 65536));
        s.pass();
        assert!(s.kernel.borrow().copies.is_empty(), "{p}");
        assert_eq!(s.kernel.borrow().shared[1], Some((65536, 8192)), "{p}");
        s.complete(1, 8192);
        s.pass();
        // A read too: committed without a char device write.
        s.deliver(2, shared_desc(uapi::IO_OP_READ, 0, 4096, 0, 0));
        s.pass();
        s.complete(2, 4096);
        s.pass();
        assert!(s.kernel.borrow().copies.is_empty(), "{p}");
        s.settle();
        assert_eq!(s.commits(), [(1, 8192), (2, 4096)], "{p}");
        // An ordinary request on the same tag after: its data is copied as usual, and
        // the tag no longer points into the shared memory.
        s.deliver(1, desc(uapi::IO_OP_WRITE, 0, 4096));
        s.pass();
        assert_eq!(s.kernel.borrow().copies, [(1, false, 4096)], "{p}");
        assert_eq!(s.kernel.borrow().shared[1], None, "{p}");
        s.complete_copy(1, 4096);
        s.pass();
        s.complete(1, 4096);
        s.pass();
        s.settle();
        s.reactor.recorder.maybe_flush(s.reactor.stats, true);
        let c = s.reactor.stats.snapshot().counters;
        assert_eq!((c.writes, c.reads, c.shmem_zc), (2, 1, 2), "{p}");
    }
}

#[test]
fn shared_memory_outside_the_buffer_fails_unseen() {
    for p in both() {
        let mut s = Sim::new(p, None);
        s.kernel.borrow_mut().shmem = Some((0, 1 << 20));
        // Another buffer's index, then a range past the end: EIO, the target never sees them.
        s.deliver(0, shared_desc(uapi::IO_OP_WRITE, 0, 4096, 1, 0));
        s.deliver(1, shared_desc(uapi::IO_OP_READ, 0, 8192, 0, (1 << 20) - 4096));
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(0, -libc::EIO), (1, -libc::EIO)], "{p}");
        assert_eq!(s.seen.borrow().submits, 0, "{p}");
    }
}

#[test]
fn user_copy_brings_a_writes_data_in_before_the_target() {
    for p in both() {
        let mut s = Sim::user_copy(p);
        s.deliver(1, desc(uapi::IO_OP_WRITE, 4096, 8192));
        s.pass();
        // The data is read from the char device first; the target has not seen it.
        assert_eq!(s.kernel.borrow().copies, [(1, false, 8192)], "{p}");
        assert_eq!(s.seen.borrow().submits, 0, "{p}");
        assert!(s.kernel.borrow().target.is_empty(), "{p}");
        s.complete_copy(1, 8192);
        s.pass();
        assert_eq!(s.seen.borrow().submits, 1, "{p}");
        let TargetIo::Rw(rw) = s.complete(1, 8192) else { panic!("not a write") };
        assert!(rw.write && rw.len == 8192 && rw.offset == 4096, "{p}: {rw:?}");
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(1, 8192)], "{p}");
        assert!(s.kernel.borrow().copies.is_empty(), "{p}");
    }
}

#[test]
fn user_copy_sends_a_reads_data_out_before_the_commit() {
    for p in both() {
        let mut s = Sim::user_copy(p);
        s.deliver(2, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        assert!(s.kernel.borrow().copies.is_empty(), "{p}");
        s.complete(2, 4096);
        s.pass();
        // Read into our buffer: it goes to the kernel before the tag is committed.
        assert_eq!(s.kernel.borrow().copies, [(2, true, 4096)], "{p}");
        assert!(s.commits().is_empty(), "{p}");
        s.complete_copy(2, 4096);
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(2, 4096)], "{p}");
        // No data, no copy: a flush goes straight to the target.
        s.deliver(3, desc(uapi::IO_OP_FLUSH, 0, 0));
        s.pass();
        assert!(s.kernel.borrow().copies.is_empty(), "{p}");
        assert!(matches!(s.complete(3, 0), TargetIo::Fsync), "{p}");
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(2, 4096), (3, 0)], "{p}");
    }
}

#[test]
fn user_copy_failures_fail_the_request() {
    for p in both() {
        let mut s = Sim::user_copy(p);
        // A short read of a write's data: EIO, and the target never sees it.
        s.deliver(0, desc(uapi::IO_OP_WRITE, 0, 4096));
        s.pass();
        s.complete_copy(0, 512);
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(0, -libc::EIO)], "{p}");
        assert_eq!(s.seen.borrow().submits, 0, "{p}");
        // A failed write of a read's data: its errno.
        s.deliver(1, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        s.complete(1, 4096);
        s.pass();
        s.complete_copy(1, -libc::EFAULT);
        s.pass();
        s.settle();
        assert_eq!(s.commits(), [(0, -libc::EIO), (1, -libc::EFAULT)], "{p}");
        // A read the target failed: no copy, its error.
        s.deliver(2, desc(uapi::IO_OP_READ, 0, 4096));
        s.pass();
        s.complete(2, -libc::EIO);
        s.pass();
        s.settle();
        assert!(s.kernel.borrow().copies.is_empty(), "{p}");
        assert_eq!(s.commits().last(), Some(&(2, -libc::EIO)), "{p}");
    }
}

/// Zoned: serves zone appends from its buffer at a fixed sector, reports into it.
struct AppendTarget {
    at: u64,
    forget: bool,
}

impl QueueTarget for AppendTarget {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        match req.op {
            Op::ZoneAppend if !self.forget => {
                io.zone_appended(req.tag, self.at).unwrap();
                Disposition::Done(req.len as i32)
            }
            Op::ReportZones | Op::ZoneAppend => Disposition::Done(req.len as i32),
            Op::ZoneReset => Disposition::Done(0),
            _ => Disposition::Done(-libc::EOPNOTSUPP),
        }
    }
    fn complete(&mut self, _: &IoRequest, _: u16, _: i32, _: &mut IoCtx<'_>) -> Disposition {
        Disposition::Done(-libc::EIO)
    }
}

#[test]
fn zone_appends_commit_where_they_wrote() {
    let seen = Rc::new(RefCell::new(Seen::default()));
    let mut s = Sim::with_target(IoProtocol::PerTag, Box::new(AppendTarget { at: 4096, forget: false }), seen);
    s.reactor.g.user_copy = true;
    // The data comes in first, as for a write; the commit carries the sector.
    s.deliver(1, desc(uapi::IO_OP_ZONE_APPEND, 1 << 19, 8192));
    s.pass();
    assert_eq!(s.kernel.borrow().copies, [(1, false, 8192)]);
    s.complete_copy(1, 8192);
    s.pass();
    assert_eq!(s.commits(), [(1, 8192)]);
    assert_eq!(s.kernel.borrow().append_sectors, [(1, 4096)]);
    // A report's descriptors go out like a read's data (nr_zones in nr_sectors).
    let mut d = desc(uapi::IO_OP_REPORT_ZONES, 0, 0);
    d.nr_sectors = 4;
    s.deliver(2, d);
    s.pass();
    assert_eq!(s.kernel.borrow().copies, [(2, true, 256)]);
    s.complete_copy(2, 256);
    s.pass();
    // A zone reset has no data.
    s.deliver(3, desc(uapi::IO_OP_ZONE_RESET, 1 << 19, 0));
    s.pass();
    assert_eq!(s.commits(), [(1, 8192), (2, 256), (3, 0)]);
    assert_eq!(s.kernel.borrow().append_sectors.len(), 1);
}

#[test]
fn a_zone_append_without_its_sector_fails() {
    let seen = Rc::new(RefCell::new(Seen::default()));
    let mut s = Sim::with_target(IoProtocol::PerTag, Box::new(AppendTarget { at: 0, forget: true }), seen);
    s.reactor.g.user_copy = true;
    s.deliver(0, desc(uapi::IO_OP_ZONE_APPEND, 0, 4096));
    s.pass();
    s.complete_copy(0, 4096);
    s.pass();
    assert_eq!(s.commits(), [(0, -libc::EIO)]);
    assert!(s.kernel.borrow().append_sectors.is_empty());
}
