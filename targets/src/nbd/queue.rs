//! One queue's NBD connection, driven from the queue's ring.
//!
//! - **Sends**: requests wait in `queued`; at the end of each queue pass
//!   ([`QueueTarget::end_of_pass`]), when no send is in flight, as many as fit are gathered into the send buffer (28-byte headers, and the data of writes up to
//!   [`SMALL_WRITE`], copied from the request buffer) and sent in one SQE. A larger
//!   write ends the batch: its data follows from its request buffer, linked.
//! - **Replies**: one standing receive into the receive buffer takes whatever the
//!   server has sent; each complete reply finishes its request ([`IoCtx::finish`]). A
//!   read's data is copied out of the receive buffer, or, when only part of it is in,
//!   the rest is received straight into the request's buffer (MSG_WAITALL) before the
//!   standing receive resumes. Structured replies: data and hole chunks land at their
//!   offsets, error chunks give the request its errno.
//! - **Handles** are generation, sequence and tag: a reply that names no request sent on
//!   this connection, or bytes that are not a reply, break the connection; no request
//!   is ever completed by the wrong reply.
//! - **A broken connection** (closed, failed, garbled, or no reply within the IO
//!   timeout) is shut down and re-made on a helper thread with backoff; its requests
//!   wait and are sent again on the new one. After the reconnect timeout they fail
//!   with EIO, as do new ones, until the server is back: the device stays.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use ubd_engine::{Disposition, FileSlot, IoCtx, IoRequest, Mem, MemId, Op, QueueSetup, QueueTarget, Waker};

use super::proto::{self, Export, Reply};
use super::{Endpoint, NbdOptions, Stream};

/// Writes up to this size are copied into the send buffer with their header; larger
/// ones are sent from the request buffer.
const SMALL_WRITE: u32 = 16 << 10;
const SEND_CAP: u32 = 256 << 10;
const RECV_CAP: u32 = 256 << 10;
/// The largest non-data chunk payload taken (an error chunk: a 4096-byte message).
const MAX_META: u32 = 8 << 10;
/// How often the queue's timer checks the IO timeout and the reconnect deadline.
const TICK: Duration = Duration::from_millis(500);

// Cookie: kind in the low 4 bits, the connection generation above.
const RECV: u16 = 1;
const SEND: u16 = 2;
const DATA_SEND: u16 = 3;
const DATA_RECV: u16 = 4;
const TIMER: u16 = 5;
const GEN_MASK: u16 = 0x0fff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Free,
    /// Waiting in `queued` to be sent.
    Queued,
    /// Sent; its reply is awaited.
    Sent,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    req: Option<IoRequest>,
    st: St,
    /// The command sent for it (FLUSH after a write whose FUA the server lacks).
    ty: u16,
    flags: u16,
    handle: u64,
    seq: u16,
    /// An SQE of the request's own (its data sent or received) is in flight.
    own_sqe: bool,
    /// The first error chunk of its reply.
    error: Option<i32>,
    /// Its result, for when its own SQE completes.
    done: Option<i32>,
    /// A write with FUA to a server without FUA: a FLUSH follows its reply.
    then_flush: bool,
    write_res: i32,
    sent_at: Instant,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Self {
            req: None,
            st: St::Free,
            ty: 0,
            flags: 0,
            handle: 0,
            seq: 0,
            own_sqe: false,
            error: None,
            done: None,
            then_flush: false,
            write_res: 0,
            sent_at: now,
        }
    }

    fn ok_result(&self) -> i32 {
        match self.req {
            Some(r) if matches!(r.op, Op::Read | Op::Write) && self.ty != proto::CMD_FLUSH => r.len as i32,
            Some(r) if r.op == Op::Write => self.write_res,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Broken at `since`; `failing` once the reconnect timeout passed.
    Down {
        since: Instant,
        failing: bool,
    },
}

/// A read's data being received straight into its buffer.
#[derive(Debug, Clone, Copy)]
struct Direct {
    tag: u16,
    len: u32,
    /// The reply's last chunk: the request is done when it is in.
    last: bool,
}

pub(super) struct NbdQueue {
    endpoint: Arc<Endpoint>,
    export: Export,
    opts: NbdOptions,
    q_id: u16,
    stream: Stream,
    slot: FileSlot,
    sbuf: MemId,
    rbuf: MemId,
    slots: Vec<Slot>,
    queued: VecDeque<u16>,
    /// SQEs naming the send buffer or a write's data, of any generation.
    send_inflight: u32,
    send_len: u32,
    /// The standing receive is in flight (of any generation).
    recv_armed: bool,
    /// Bytes in the receive buffer not yet taken.
    fill: u32,
    direct: Option<Direct>,
    conn_gen: u16,
    link: Link,
    timer_armed: bool,
    waker: Waker,
    new_conn: Receiver<Stream>,
    new_conn_tx: Sender<Stream>,
    reconnecting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stopping: bool,
    /// Error chunks seen (the first few are logged).
    server_errors: u64,
}

impl std::fmt::Debug for NbdQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdQueue").field("q_id", &self.q_id).field("link", &self.link).finish()
    }
}

fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(-e).to_string()
}

/// Why a send of `want` bytes that completed with `res` falls short.
fn short_why(res: i32, want: u64) -> String {
    if res < 0 { errno_name(res) } else { format!("{res} of {want} bytes") }
}

impl NbdQueue {
    pub(super) fn new(
        setup: &mut QueueSetup,
        endpoint: Arc<Endpoint>,
        export: Export,
        opts: NbdOptions,
        stream: Stream,
    ) -> std::io::Result<Self> {
        let slot = setup.add_file(std::os::fd::AsFd::as_fd(&stream));
        let sbuf = setup.alloc(SEND_CAP)?;
        let rbuf = setup.alloc(RECV_CAP)?;
        let waker = setup.waker()?;
        let (tx, rx) = mpsc::channel();
        let now = Instant::now();
        Ok(Self {
            endpoint,
            export,
            opts,
            q_id: setup.q_id(),
            stream,
            slot,
            sbuf,
            rbuf,
            slots: vec![Slot::new(now); usize::from(setup.depth())],
            queued: VecDeque::new(),
            send_inflight: 0,
            send_len: 0,
            recv_armed: false,
            fill: 0,
            direct: None,
            conn_gen: 0,
            link: Link::Up,
            timer_armed: false,
            waker,
            new_conn: rx,
            new_conn_tx: tx,
            reconnecting: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            stopping: false,
            server_errors: 0,
        })
    }

    fn ck(&self, kind: u16) -> u16 {
        kind | (self.conn_gen << 4)
    }

    fn cookie_gen(cookie: u16) -> u16 {
        cookie >> 4
    }

    /// Arms the standing receive, unless one is in flight, data goes to a request, or
    /// the connection is down.
    fn arm_recv(&mut self, io: &mut IoCtx<'_>) {
        if self.recv_armed || self.direct.is_some() || self.link != Link::Up || self.stopping {
            return;
        }
        let mem = Mem::Owned { id: self.rbuf, off: self.fill, len: RECV_CAP - self.fill };
        let ck = self.ck(RECV);
        match io.for_queue().recv(self.slot, mem, 0, ck) {
            Ok(()) => self.recv_armed = true,
            Err(e) => self.broken(io, &format!("cannot receive: {}", errno_name(e))),
        }
    }

    fn arm_timer(&mut self, io: &mut IoCtx<'_>) {
        if self.timer_armed || self.stopping {
            return;
        }
        let wanted = matches!(self.link, Link::Down { failing: false, .. })
            || (self.opts.io_timeout.is_some() && self.slots.iter().any(|s| s.st == St::Sent));
        if !wanted {
            return;
        }
        let ck = self.ck(TIMER);
        match io.for_queue().sleep(TICK, ck) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::warn!(q = self.q_id, "nbd: cannot arm the timer: {}", errno_name(e)),
        }
    }

    /// Gathers queued requests into one send (see the module doc).
    fn pump(&mut self, io: &mut IoCtx<'_>) {
        if self.link != Link::Up || self.send_inflight > 0 || self.stopping {
            return;
        }
        let mut pos = 0u32;
        let mut big = None;
        let now = Instant::now();
        while let Some(&tag) = self.queued.front() {
            let t = usize::from(tag);
            let s = self.slots[t];
            let Some(req) = s.req.filter(|_| s.st == St::Queued) else {
                self.queued.pop_front();
                continue;
            };
            if s.own_sqe {
                // Its data SQE of the broken connection is still in flight.
                break;
            }
            let payload = if s.ty == proto::CMD_WRITE { req.len as u32 } else { 0 };
            let inline = if payload <= SMALL_WRITE { payload } else { 0 };
            if pos + proto::REQUEST_LEN as u32 + inline > SEND_CAP {
                break;
            }
            let seq = s.seq.wrapping_add(1);
            let handle = (u64::from(self.conn_gen) << 32) | (u64::from(seq) << 16) | u64::from(tag);
            let wire = proto::Request {
                flags: s.flags,
                ty: s.ty,
                handle,
                offset: if s.ty == proto::CMD_FLUSH { 0 } else { req.offset },
                len: if s.ty == proto::CMD_FLUSH { 0 } else { req.len as u32 },
            };
            let Some(m) = io.mem(self.sbuf) else { return };
            wire.encode(&mut m[pos as usize..pos as usize + proto::REQUEST_LEN]);
            pos += proto::REQUEST_LEN as u32;
            if inline > 0 {
                let dst = Mem::Owned { id: self.sbuf, off: pos, len: inline };
                let copied = match io.for_request(tag) {
                    Some(mut rio) => rio.copy(dst, Mem::Request { off: 0, len: inline }),
                    None => Err(-libc::EINVAL),
                };
                if let Err(e) = copied {
                    tracing::error!(q = self.q_id, tag, "nbd: cannot copy a write's data: {}", errno_name(e));
                    pos -= proto::REQUEST_LEN as u32;
                    self.queued.pop_front();
                    self.slots[t].st = St::Free;
                    self.settle(io, tag, e);
                    continue;
                }
                pos += inline;
            }
            self.queued.pop_front();
            let s = &mut self.slots[t];
            s.seq = seq;
            s.handle = handle;
            s.st = St::Sent;
            s.sent_at = now;
            s.error = None;
            if payload > inline {
                big = Some((tag, payload));
                break;
            }
        }
        if pos == 0 {
            return;
        }
        let hdrs = Mem::Owned { id: self.sbuf, off: 0, len: pos };
        let (ck, dck) = (self.ck(SEND), self.ck(DATA_SEND));
        self.send_len = pos;
        let pushed = match big {
            None => io.for_queue().send(self.slot, hdrs, libc::MSG_WAITALL, ck).map(|()| 1),
            Some((tag, len)) => match io.link_next() {
                Err(e) => Err(e),
                Ok(()) => match io.for_queue().send(self.slot, hdrs, libc::MSG_WAITALL, ck) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        self.send_inflight = 1;
                        let data = match io.for_request(tag) {
                            Some(mut rio) => rio.send(self.slot, Mem::Request { off: 0, len }, libc::MSG_WAITALL, dck),
                            None => Err(-libc::EINVAL),
                        };
                        data.map(|()| {
                            self.slots[usize::from(tag)].own_sqe = true;
                            2
                        })
                    }
                },
            },
        };
        match pushed {
            Ok(n) => self.send_inflight = n,
            // What was pushed completes, and is counted, then.
            Err(e) => self.broken(io, &format!("cannot send: {}", errno_name(e))),
        }
        self.arm_timer(io);
    }

    /// The request on `tag` has its result: finish it (or leave the result for its own
    /// SQE's completion, or for the caller when `tag` is the context's own).
    fn settle(&mut self, io: &mut IoCtx<'_>, tag: u16, res: i32) {
        let s = &mut self.slots[usize::from(tag)];
        if s.own_sqe || io.tag() == Some(tag) {
            s.done = Some(res);
            s.st = St::Free;
            return;
        }
        match io.finish(tag, res) {
            Ok(()) => *s = Slot::new(s.sent_at),
            Err(e) => {
                tracing::error!(q = self.q_id, tag, "nbd: cannot finish a request: {}", errno_name(e));
            }
        }
    }

    /// A reply ended the request on `tag` with `res`.
    fn replied(&mut self, io: &mut IoCtx<'_>, tag: u16, res: i32) {
        let s = &mut self.slots[usize::from(tag)];
        s.st = St::Free;
        if res >= 0 && s.then_flush {
            s.then_flush = false;
            s.write_res = res;
            s.ty = proto::CMD_FLUSH;
            s.flags = 0;
            s.st = St::Queued;
            self.queued.push_back(tag);
            return;
        }
        self.settle(io, tag, res);
    }

    /// The request a reply's handle names, if it was sent on this connection.
    fn lookup(&self, handle: u64) -> Option<u16> {
        let tag = (handle & 0xffff) as u16;
        let s = self.slots.get(usize::from(tag))?;
        (s.st == St::Sent && s.handle == handle).then_some(tag)
    }

    /// Takes every complete reply from the receive buffer.
    fn take_replies(&mut self, io: &mut IoCtx<'_>) {
        let mut pos = 0u32;
        loop {
            let head = {
                let Some(m) = io.mem(self.rbuf) else { return };
                proto::parse_reply(&m[pos as usize..self.fill as usize], self.export.structured)
            };
            let (reply, hlen) = match head {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return self.broken(io, &format!("garbled reply: {e}")),
            };
            let body = pos + hlen as u32;
            let avail = self.fill - body;
            match reply {
                Reply::Simple { handle, error } => {
                    let Some(tag) = self.lookup(handle) else {
                        return self.broken(io, &format!("reply for unknown handle {handle:#x}"));
                    };
                    let s = self.slots[usize::from(tag)];
                    let is_read = s.req.is_some_and(|r| r.op == Op::Read);
                    if error != 0 || !is_read {
                        pos = body;
                        let res = if error != 0 { proto::errno(error) } else { s.ok_result() };
                        if error != 0 {
                            self.server_error(res, "");
                        }
                        self.replied(io, tag, res);
                        continue;
                    }
                    if self.export.structured {
                        return self
                            .broken(io, "a simple reply with data to a read (structured replies were negotiated)");
                    }
                    let len = s.req.map_or(0, |r| r.len as u32);
                    match self.take_data(io, tag, body, avail, 0, len, true) {
                        Some(used) => pos = body + used,
                        None => return,
                    }
                }
                Reply::Chunk { flags, ty, handle, len } => {
                    let Some(tag) = self.lookup(handle) else {
                        return self.broken(io, &format!("reply chunk for unknown handle {handle:#x}"));
                    };
                    let last = flags & proto::REPLY_FLAG_DONE != 0;
                    let req = self.slots[usize::from(tag)].req;
                    if ty == proto::REPLY_TYPE_OFFSET_DATA {
                        if len < 9 {
                            return self.broken(io, "a data chunk shorter than 9 bytes");
                        }
                        if avail < 8 {
                            break;
                        }
                        let off = {
                            let Some(m) = io.mem(self.rbuf) else { return };
                            let b = body as usize;
                            u64::from_be_bytes(m[b..b + 8].try_into().unwrap_or_default())
                        };
                        let dlen = len - 8;
                        let Some(boff) = req.filter(|r| r.op == Op::Read).and_then(|r| {
                            let rel = off.checked_sub(r.offset)?;
                            (rel + u64::from(dlen) <= r.len).then_some(rel as u32)
                        }) else {
                            return self.broken(io, "a data chunk outside its read");
                        };
                        match self.take_data(io, tag, body + 8, avail - 8, boff, dlen, last) {
                            Some(used) => pos = body + 8 + used,
                            None => return,
                        }
                        continue;
                    }
                    if len > MAX_META {
                        return self.broken(io, &format!("a reply chunk of {len} bytes"));
                    }
                    if avail < len {
                        break;
                    }
                    if let Err(e) = self.take_chunk(io, tag, ty, body, len) {
                        return self.broken(io, &e);
                    }
                    pos = body + len;
                    if last {
                        let s = self.slots[usize::from(tag)];
                        self.replied(io, tag, s.error.unwrap_or_else(|| s.ok_result()));
                    }
                }
            }
        }
        if pos > 0 {
            let (p, f) = (pos as usize, self.fill as usize);
            if let Some(m) = io.mem(self.rbuf) {
                m.copy_within(p..f, 0);
            }
            self.fill -= pos;
        }
        self.arm_recv(io);
    }

    /// A read's `len` bytes of data for buffer offset `boff`, `avail` of them at `at` in
    /// the receive buffer: copies those in and returns how many; if the rest is still
    /// to come it is received straight into the request's buffer (None: stop taking).
    #[allow(clippy::too_many_arguments)]
    fn take_data(
        &mut self,
        io: &mut IoCtx<'_>,
        tag: u16,
        at: u32,
        avail: u32,
        boff: u32,
        len: u32,
        last: bool,
    ) -> Option<u32> {
        let have = avail.min(len);
        if have > 0 {
            let src = Mem::Owned { id: self.rbuf, off: at, len: have };
            let r = io.for_request(tag).map(|mut rio| rio.copy(Mem::Request { off: boff, len: have }, src));
            if !matches!(r, Some(Ok(()))) {
                self.broken(io, "cannot copy a read's data");
                return None;
            }
        }
        if have == len {
            if last {
                let s = self.slots[usize::from(tag)];
                self.replied(io, tag, s.error.unwrap_or_else(|| s.ok_result()));
            }
            return Some(have);
        }
        // The rest of it is on its way: straight into the request buffer.
        let rest = Mem::Request { off: boff + have, len: len - have };
        let ck = self.ck(DATA_RECV);
        let slot = self.slot;
        let r = io.for_request(tag).map(|mut rio| rio.recv(slot, rest, libc::MSG_WAITALL, ck));
        if !matches!(r, Some(Ok(()))) {
            self.broken(io, "cannot receive a read's data");
            return None;
        }
        self.slots[usize::from(tag)].own_sqe = true;
        self.direct = Some(Direct { tag, len: len - have, last });
        self.fill = 0;
        None
    }

    /// A non-data chunk of `len` bytes at `at` (all in the buffer).
    fn take_chunk(&mut self, io: &mut IoCtx<'_>, tag: u16, ty: u16, at: u32, len: u32) -> Result<(), String> {
        let req = self.slots[usize::from(tag)].req;
        let payload = {
            let Some(m) = io.mem(self.rbuf) else { return Err("receive buffer busy".into()) };
            m[at as usize..(at + len) as usize].to_vec()
        };
        match ty {
            proto::REPLY_TYPE_NONE if len == 0 => Ok(()),
            proto::REPLY_TYPE_OFFSET_HOLE if len == 12 => {
                let off = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
                let hole = u32::from_be_bytes(payload[8..12].try_into().unwrap_or_default());
                let boff = req
                    .filter(|r| r.op == Op::Read)
                    .and_then(|r| {
                        let rel = off.checked_sub(r.offset)?;
                        (hole > 0 && rel + u64::from(hole) <= r.len).then_some(rel as u32)
                    })
                    .ok_or("a hole chunk outside its read")?;
                let r = io.for_request(tag).map(|mut rio| rio.zero(Mem::Request { off: boff, len: hole }));
                if matches!(r, Some(Ok(()))) { Ok(()) } else { Err("cannot zero a hole".into()) }
            }
            t if t & proto::REPLY_TYPE_ERROR_BIT != 0 && len >= 6 => {
                let error = u32::from_be_bytes(payload[..4].try_into().unwrap_or_default());
                let mlen = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
                let msg = payload.get(6..6 + mlen).ok_or("an error chunk's message is longer than the chunk")?;
                let errno = if error == 0 { -libc::EIO } else { proto::errno(error) };
                self.slots[usize::from(tag)].error.get_or_insert(errno);
                self.server_error(errno, &String::from_utf8_lossy(msg));
                Ok(())
            }
            t => Err(format!("a reply chunk of type {t} and {len} bytes")),
        }
    }

    /// Logs the first few errors the server reports.
    fn server_error(&mut self, errno: i32, msg: &str) {
        self.server_errors += 1;
        if self.server_errors <= 5 {
            tracing::warn!(
                q = self.q_id,
                "nbd: {}: the server failed a request: {}{}{}",
                self.endpoint.uri,
                errno_name(errno),
                if msg.is_empty() { String::new() } else { format!(" ({msg})") },
                if self.server_errors == 5 { "; further errors are counted, not logged" } else { "" }
            );
        }
    }

    /// The connection is broken: shut it down, put its requests back in the queue, and
    /// re-make it on a helper thread.
    fn broken(&mut self, io: &mut IoCtx<'_>, why: &str) {
        if self.link != Link::Up || self.stopping {
            return;
        }
        tracing::error!(
            q = self.q_id,
            "nbd: {}: connection lost: {why}; reconnecting (requests wait up to {} s)",
            self.endpoint.uri,
            self.opts.reconnect_timeout.as_secs()
        );
        self.stream.shutdown();
        self.conn_gen = (self.conn_gen + 1) & GEN_MASK;
        self.link = Link::Down { since: Instant::now(), failing: false };
        self.direct = None;
        self.fill = 0;
        for tag in 0..self.slots.len() {
            let s = &mut self.slots[tag];
            if s.st == St::Sent {
                s.st = St::Queued;
                s.error = None;
                self.queued.push_back(tag as u16);
            }
        }
        self.reconnect();
        self.arm_timer(io);
    }

    fn reconnect(&self) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let endpoint = Arc::clone(&self.endpoint);
        let want = self.export.clone();
        let (tx, waker, busy, stop) =
            (self.new_conn_tx.clone(), self.waker.clone(), Arc::clone(&self.reconnecting), Arc::clone(&self.stop));
        let q = self.q_id;
        let spawned = std::thread::Builder::new().name(format!("nbd-reconnect-q{q}")).spawn(move || {
            let mut wait = Duration::from_millis(100);
            let mut said = String::new();
            while !stop.load(Ordering::Acquire) {
                match endpoint.connect() {
                    Ok((s, e)) if e.size == want.size && e.flags == want.flags && e.structured == want.structured => {
                        if tx.send(s).is_ok() {
                            waker.wake();
                        }
                        break;
                    }
                    Ok((s, e)) => {
                        let m = format!(
                            "the export changed (size {} flags {:#x}; was {} {:#x})",
                            e.size, e.flags, want.size, want.flags
                        );
                        if m != said {
                            tracing::error!(q, "nbd: {}: {m}: not reconnecting to it", endpoint.uri);
                            said = m;
                        }
                        s.shutdown();
                    }
                    Err(m) => {
                        if m != said {
                            tracing::warn!(q, "nbd: reconnect: {m} (retrying)");
                            said = m;
                        }
                    }
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            busy.store(false, Ordering::Release);
        });
        if let Err(e) = spawned {
            tracing::error!(q, "nbd: cannot start the reconnect thread: {e}");
            self.reconnecting.store(false, Ordering::Release);
        }
    }

    /// Fails every waiting request (past the reconnect timeout) with EIO.
    fn fail_waiting(&mut self, io: &mut IoCtx<'_>) {
        while let Some(tag) = self.queued.pop_front() {
            if self.slots[usize::from(tag)].st == St::Queued {
                self.slots[usize::from(tag)].st = St::Free;
                self.settle(io, tag, -libc::EIO);
            }
        }
    }

    fn on_timer(&mut self, io: &mut IoCtx<'_>) {
        let now = Instant::now();
        match self.link {
            Link::Down { since, failing: false } if now.duration_since(since) >= self.opts.reconnect_timeout => {
                let n = self.queued.len();
                tracing::error!(
                    q = self.q_id,
                    "nbd: {}: no connection for {} s: failing {n} requests with EIO, and new ones until the server is back",
                    self.endpoint.uri,
                    self.opts.reconnect_timeout.as_secs()
                );
                self.link = Link::Down { since, failing: true };
                self.fail_waiting(io);
            }
            Link::Up => {
                if let Some(limit) = self.opts.io_timeout {
                    let late: Vec<u16> = (0..self.slots.len())
                        .filter(|&t| self.slots[t].st == St::Sent && now.duration_since(self.slots[t].sent_at) >= limit)
                        .map(|t| t as u16)
                        .collect();
                    if !late.is_empty() {
                        tracing::error!(
                            q = self.q_id,
                            "nbd: {}: {} requests had no reply in {} s: failing them with EIO",
                            self.endpoint.uri,
                            late.len(),
                            limit.as_secs()
                        );
                        for tag in late {
                            self.settle(io, tag, -libc::EIO);
                        }
                        self.broken(io, "IO timeout");
                    }
                }
            }
            Link::Down { .. } => {}
        }
        self.arm_timer(io);
    }
}

impl QueueTarget for NbdQueue {
    fn start(&mut self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        self.arm_recv(io);
        if self.recv_armed { Ok(()) } else { Err(-libc::EIO) }
    }

    fn submit(&mut self, req: &IoRequest, _io: &mut IoCtx<'_>) -> Disposition {
        let e = &self.export;
        let (ty, mut flags) = match req.op {
            Op::Read => (proto::CMD_READ, 0),
            Op::Write if e.has(proto::TF_READ_ONLY) => return Disposition::Done(-libc::EROFS),
            Op::Write => (proto::CMD_WRITE, 0),
            Op::Flush if !e.has(proto::TF_SEND_FLUSH) => return Disposition::Done(0),
            Op::Flush => (proto::CMD_FLUSH, 0),
            Op::Discard if !e.has(proto::TF_SEND_TRIM) => return Disposition::Done(-libc::EOPNOTSUPP),
            Op::Discard => (proto::CMD_TRIM, 0),
            Op::WriteZeroes if !e.has(proto::TF_SEND_WRITE_ZEROES) => return Disposition::Done(-libc::EOPNOTSUPP),
            Op::WriteZeroes => (proto::CMD_WRITE_ZEROES, if req.no_unmap() { proto::CMD_FLAG_NO_HOLE } else { 0 }),
            // Zone operations: an NBD export is not zoned.
            _ => return Disposition::Done(-libc::EOPNOTSUPP),
        };
        if u32::try_from(req.len).is_err() {
            return Disposition::Done(-libc::EINVAL);
        }
        let mut then_flush = false;
        if req.fua() && matches!(req.op, Op::Write | Op::WriteZeroes) {
            if e.has(proto::TF_SEND_FUA) {
                flags |= proto::CMD_FLAG_FUA;
            } else {
                then_flush = e.has(proto::TF_SEND_FLUSH);
            }
        }
        if matches!(self.link, Link::Down { failing: true, .. }) {
            return Disposition::Done(-libc::EIO);
        }
        let s = &mut self.slots[usize::from(req.tag)];
        *s = Slot { req: Some(*req), st: St::Queued, ty, flags, then_flush, seq: s.seq, ..Slot::new(s.sent_at) };
        self.queued.push_back(req.tag);
        // Sent from end_of_pass, with the pass's other requests.
        Disposition::Pending
    }

    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition {
        let t = usize::from(req.tag);
        self.slots[t].own_sqe = false;
        let current = Self::cookie_gen(cookie) == self.conn_gen && self.link == Link::Up;
        match cookie & 0xf {
            DATA_SEND => {
                self.send_inflight = self.send_inflight.saturating_sub(1);
                if current && res != req.len as i32 {
                    self.broken(io, &format!("sending a write's data: {}", short_why(res, req.len)));
                }
            }
            DATA_RECV => {
                // A stale one (of a broken connection) leaves alone a receive of the new one.
                if current {
                    let d = self.direct.take();
                    match d {
                        Some(d) if d.tag == req.tag && res == d.len as i32 => {
                            if d.last {
                                let s = self.slots[t];
                                self.replied(io, req.tag, s.error.unwrap_or_else(|| s.ok_result()));
                            }
                            self.arm_recv(io);
                        }
                        _ => {
                            let why = if res <= 0 {
                                if res == 0 { "the server closed the connection".into() } else { errno_name(res) }
                            } else {
                                format!("short read data ({res} bytes)")
                            };
                            self.broken(io, &format!("receiving a read's data: {why}"));
                        }
                    }
                } else if self.link == Link::Up {
                    self.arm_recv(io);
                }
            }
            _ => {}
        }
        match self.slots[t].done.take() {
            Some(r) => {
                self.slots[t] = Slot::new(self.slots[t].sent_at);
                Disposition::Done(r)
            }
            None => Disposition::Pending,
        }
    }

    fn queue_complete(&mut self, cookie: u16, res: i32, io: &mut IoCtx<'_>) {
        let current = Self::cookie_gen(cookie) == self.conn_gen && self.link == Link::Up;
        match cookie & 0xf {
            RECV => {
                self.recv_armed = false;
                if self.stopping {
                    return;
                }
                if !current {
                    self.arm_recv(io);
                    return;
                }
                if res <= 0 {
                    let why = if res == 0 { "the server closed the connection".to_string() } else { errno_name(res) };
                    return self.broken(io, &why);
                }
                self.fill += res as u32;
                self.take_replies(io);
            }
            SEND => {
                self.send_inflight = self.send_inflight.saturating_sub(1);
                if current && res != self.send_len as i32 {
                    self.broken(io, &format!("sending requests: {}", short_why(res, self.send_len.into())));
                }
            }
            TIMER => {
                self.timer_armed = false;
                if !self.stopping {
                    self.on_timer(io);
                }
            }
            _ => {}
        }
    }

    /// The pass's requests (and those that waited for the send in flight) go out in
    /// one send.
    fn end_of_pass(&mut self, io: &mut IoCtx<'_>) {
        self.pump(io);
    }

    fn woken(&mut self, io: &mut IoCtx<'_>) {
        while let Ok(s) = self.new_conn.try_recv() {
            if self.stopping || self.link == Link::Up {
                s.shutdown();
                continue;
            }
            if let Err(e) = io.replace_file(self.slot, std::os::fd::AsFd::as_fd(&s)) {
                tracing::error!(q = self.q_id, "nbd: cannot use the new connection: {}", errno_name(e));
                s.shutdown();
                self.reconnect();
                continue;
            }
            let down = match self.link {
                Link::Down { since, .. } => since.elapsed(),
                Link::Up => Duration::ZERO,
            };
            tracing::info!(
                q = self.q_id,
                "nbd: {}: reconnected after {:.1} s; resending {} requests",
                self.endpoint.uri,
                down.as_secs_f64(),
                self.queued.len()
            );
            self.stream = s;
            self.link = Link::Up;
            self.arm_recv(io);
        }
    }

    fn stop(&mut self, _io: &mut IoCtx<'_>) {
        self.stopping = true;
        self.stop.store(true, Ordering::Release);
        if self.link == Link::Up && self.send_inflight == 0 {
            // A soft disconnect: NBD_CMD_DISC, then the socket is shut down.
            let mut b = [0u8; proto::REQUEST_LEN];
            proto::Request { flags: 0, ty: proto::CMD_DISC, handle: 0, offset: 0, len: 0 }.encode(&mut b);
            let _ = self.stream.write_all(&b);
        }
        self.stream.shutdown();
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
