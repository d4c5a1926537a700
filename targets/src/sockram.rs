//! `sockram`: a test target that proves the target API for targets that are not a
//! file. The data lives in a RAM store served by an in-process thread per queue over a
//! Unix socketpair, with a small request/reply protocol, as an NBD client talks to its
//! server:
//!
//! - each request's header is memory the queue target owns ([`QueueSetup::alloc`]),
//!   sent linked with a write's payload from the request buffer ([`IoCtx::link_next`]);
//!   sends are one request at a time, the next started for its own request from the
//!   completion of the previous one ([`IoCtx::for_request`]);
//! - a standing receive of reply headers belongs to the queue ([`QueueTarget::start`],
//!   [`QueueTarget::queue_complete`]); a reply finishes its request
//!   ([`IoCtx::finish`]), or a read's data is received into the request buffer, linked
//!   before the next header's receive;
//! - FLUSH goes to another thread, which wakes the queue when done ([`Waker`](ubd_engine::Waker),
//!   [`QueueTarget::woken`]);
//! - stop shuts the socket down, which ends the standing receive ([`QueueTarget::stop`]).
//!
//! Its data is gone with the process: a device to test with, not to keep data on.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use ubd_engine::{
    Disposition, FileSlot, IoCtx, IoRequest, Mem, MemId, Op, QueueSetup, QueueTarget, Target, TargetInfo,
};

use crate::TargetSpec;

const REQ_MAGIC: u32 = 0x7562_6472;
const REPLY_MAGIC: u32 = 0x7562_6461;
/// Request header: magic u32, op u16, tag u16, offset u64, len u32, 8 bytes reserved.
pub const REQ_LEN: usize = 28;
/// Reply header: magic u32, tag u16, reserved u16, result i32, data bytes u32.
pub const REPLY_LEN: usize = 16;

const OP_READ: u16 = 0;
const OP_WRITE: u16 = 1;
const OP_ZERO: u16 = 2;

// Cookies.
const HDR_SENT: u16 = 1;
const SENT: u16 = 2;
const DATA: u16 = 3;
const REPLY: u16 = 4;

/// A request on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireRequest {
    pub op: u16,
    pub tag: u16,
    pub offset: u64,
    pub len: u32,
}

impl WireRequest {
    pub fn encode(&self, out: &mut [u8]) {
        out[..REQ_LEN].fill(0);
        out[0..4].copy_from_slice(&REQ_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.op.to_le_bytes());
        out[6..8].copy_from_slice(&self.tag.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..20].copy_from_slice(&self.len.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..REQ_LEN)?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != REQ_MAGIC {
            return None;
        }
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[8..16]);
        Some(Self {
            op: u16::from_le_bytes([b[4], b[5]]),
            tag: u16::from_le_bytes([b[6], b[7]]),
            offset: u64::from_le_bytes(off),
            len: u32_at(16),
        })
    }
}

/// A reply on the wire: `result` is bytes done or `-errno`; `data` bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireReply {
    pub tag: u16,
    pub result: i32,
    pub data: u32,
}

impl WireReply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        out[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.tag.to_le_bytes());
        out[8..12].copy_from_slice(&self.result.to_le_bytes());
        out[12..16].copy_from_slice(&self.data.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..REPLY_LEN)?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (u32_at(0) == REPLY_MAGIC).then(|| Self {
            tag: u16::from_le_bytes([b[4], b[5]]),
            result: u32_at(8).cast_signed(),
            data: u32_at(12),
        })
    }
}

type Store = Arc<Mutex<Vec<u8>>>;

/// The server end: serves requests from `sock` on `store` until the socket closes.
fn serve_store(mut sock: UnixStream, store: &Store) -> io::Result<()> {
    let mut hdr = [0u8; REQ_LEN];
    let mut buf = Vec::new();
    loop {
        match sock.read_exact(&mut hdr) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let req = WireRequest::decode(&hdr).ok_or_else(|| io::Error::other("bad request magic"))?;
        let len = req.len as usize;
        buf.resize(len, 0);
        if req.op == OP_WRITE {
            sock.read_exact(&mut buf)?;
        }
        let mut data = store.lock().unwrap_or_else(PoisonError::into_inner);
        let range = usize::try_from(req.offset).ok().and_then(|o| Some(o..o.checked_add(len)?));
        let reply = match range.filter(|r| r.end <= data.len()) {
            None => WireReply { tag: req.tag, result: -libc::EIO, data: 0 },
            Some(r) => match req.op {
                OP_READ => {
                    buf.copy_from_slice(&data[r]);
                    WireReply { tag: req.tag, result: req.len.cast_signed(), data: req.len }
                }
                OP_WRITE => {
                    data[r].copy_from_slice(&buf);
                    WireReply { tag: req.tag, result: req.len.cast_signed(), data: 0 }
                }
                OP_ZERO => {
                    data[r].fill(0);
                    WireReply { tag: req.tag, result: 0, data: 0 }
                }
                _ => WireReply { tag: req.tag, result: -libc::EOPNOTSUPP, data: 0 },
            },
        };
        drop(data);
        sock.write_all(&reply.encode())?;
        if reply.data > 0 {
            sock.write_all(&buf)?;
        }
    }
}

/// The test target: `size` bytes of RAM behind a socket.
#[derive(Debug)]
pub struct SockRamTarget {
    info: TargetInfo,
    store: Store,
}

impl SockRamTarget {
    pub fn new(size: u64, logical_block_size: u32) -> io::Result<Self> {
        let len = usize::try_from(size).map_err(|_| io::Error::other("size too large"))?;
        Ok(Self {
            info: TargetInfo {
                dev_size: size,
                logical_block_size,
                physical_block_size: logical_block_size,
                read_only: false,
                rotational: false,
                volatile_cache: true,
                discard: Some(ubd_engine::DiscardInfo {
                    granularity: logical_block_size,
                    max_discard_sectors: 1 << 16,
                    max_write_zeroes_sectors: 1 << 16,
                }),
                zoned: None,
            },
            store: Arc::new(Mutex::new(vec![0; len])),
        })
    }

    pub fn spec(&self) -> TargetSpec {
        TargetSpec::SockRam { size: self.info.dev_size, logical_block_size: self.info.logical_block_size }
    }
}

impl Target for SockRamTarget {
    fn name(&self) -> &'static str {
        "sockram"
    }
    fn info(&self) -> &TargetInfo {
        &self.info
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "size": self.info.dev_size, "logical_block_size": self.info.logical_block_size })
    }
    /// Request data goes over a socket from our own buffers: copy mode.
    fn supports_zero_copy(&self) -> bool {
        false
    }
    fn open_queue(&self, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        let (ours, theirs) = UnixStream::pair()?;
        let store = Arc::clone(&self.store);
        let q_id = setup.q_id();
        let server = std::thread::Builder::new().name(format!("sockram-s{q_id}")).spawn(move || {
            if let Err(e) = serve_store(theirs, &store) {
                tracing::error!(q_id, "sockram server: {e}");
            }
        })?;
        // FLUSH: another thread takes it (a barrier on the store), and wakes the queue.
        let waker = setup.waker()?;
        let (flush_tx, flush_rx) = mpsc::channel::<u16>();
        let (done_tx, done_rx) = mpsc::channel::<u16>();
        let store = Arc::clone(&self.store);
        let flusher = std::thread::Builder::new().name(format!("sockram-f{q_id}")).spawn(move || {
            for tag in flush_rx {
                drop(store.lock().unwrap_or_else(PoisonError::into_inner));
                if done_tx.send(tag).is_err() {
                    break;
                }
                waker.wake();
            }
        })?;
        let depth = usize::from(setup.depth());
        let slot = setup.add_file(ours.as_fd());
        let hdrs = (0..depth).map(|_| setup.alloc(REQ_LEN as u32)).collect::<io::Result<Vec<_>>>()?;
        let reply = setup.alloc(REPLY_LEN as u32)?;
        Ok(Box::new(SockRamQueue {
            sock: ours,
            slot,
            hdrs,
            reply,
            reqs: vec![None; depth],
            sent: vec![false; depth],
            early: vec![None; depth],
            data_in: vec![None; depth],
            waiting: VecDeque::new(),
            sending: false,
            flush_tx: Some(flush_tx),
            done_rx,
            threads: vec![server, flusher],
            stopping: false,
        }))
    }
}

struct SockRamQueue {
    sock: UnixStream,
    slot: FileSlot,
    /// Each tag's request header.
    hdrs: Vec<MemId>,
    /// Where the standing receive puts a reply header.
    reply: MemId,
    reqs: Vec<Option<IoRequest>>,
    /// The tag's sends are done; the reply came first (its result); a read's data is in.
    sent: Vec<bool>,
    early: Vec<Option<i32>>,
    data_in: Vec<Option<i32>>,
    /// Requests waiting to send (one request's sends at a time on the stream).
    waiting: VecDeque<u16>,
    sending: bool,
    flush_tx: Option<Sender<u16>>,
    done_rx: Receiver<u16>,
    threads: Vec<JoinHandle<()>>,
    stopping: bool,
}

impl Drop for SockRamQueue {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        self.flush_tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn pending_or(r: Result<(), i32>) -> Disposition {
    match r {
        Ok(()) => Disposition::Pending,
        Err(e) => Disposition::Done(e),
    }
}

impl SockRamQueue {
    fn arm(&self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        let mem = Mem::Owned { id: self.reply, off: 0, len: REPLY_LEN as u32 };
        io.recv(self.slot, mem, libc::MSG_WAITALL, REPLY)
    }

    /// Sends `req`'s header (and a write's payload, linked after it) in `io`, its context.
    fn send(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Result<(), i32> {
        let tag = usize::from(req.tag);
        let op = match req.op {
            Op::Read => OP_READ,
            Op::Write => OP_WRITE,
            _ => OP_ZERO,
        };
        let len = u32::try_from(req.len).map_err(|_| -libc::EINVAL)?;
        let wire = WireRequest { op, tag: req.tag, offset: req.offset, len };
        // Free: the tag's previous header send completed before its request was committed.
        wire.encode(io.mem(self.hdrs[tag]).ok_or(-libc::EBUSY)?);
        let hdr = Mem::Owned { id: self.hdrs[tag], off: 0, len: REQ_LEN as u32 };
        self.sending = true;
        if op == OP_WRITE {
            io.link_next()?;
            io.send(self.slot, hdr, libc::MSG_WAITALL, HDR_SENT)?;
            if let Err(e) = io.send(self.slot, Mem::Request { off: 0, len }, libc::MSG_WAITALL, SENT) {
                // The header is on its way: the request fails when its send completes.
                self.early[tag] = Some(e);
            }
            Ok(())
        } else {
            io.send(self.slot, hdr, libc::MSG_WAITALL, SENT)
        }
    }

    /// The stream is free: the next waiting request sends, in its own context.
    fn send_next(&mut self, io: &mut IoCtx<'_>) {
        self.sending = false;
        while let Some(tag) = self.waiting.pop_front() {
            let Some(req) = self.reqs[usize::from(tag)] else { continue };
            let sent = match io.for_request(tag) {
                Some(mut rio) => self.send(&req, &mut rio),
                None => continue,
            };
            match sent {
                Ok(()) => return,
                Err(e) => {
                    self.sending = false;
                    self.reqs[usize::from(tag)] = None;
                    let _ = io.finish(tag, e);
                }
            }
        }
    }

    /// The request on `tag` is done when its sends are and its reply (and read data) is in.
    fn outcome(&mut self, tag: u16) -> Disposition {
        let t = usize::from(tag);
        if !self.sent[t] {
            return Disposition::Pending;
        }
        match (self.early[t], self.data_in[t]) {
            (Some(r), _) | (None, Some(r)) => {
                self.reqs[t] = None;
                Disposition::Done(r)
            }
            _ => Disposition::Pending,
        }
    }
}

impl QueueTarget for SockRamQueue {
    fn start(&mut self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        self.arm(io)
    }

    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        let tag = usize::from(req.tag);
        if req.op == Op::Flush {
            return match self.flush_tx.as_ref().map(|tx| tx.send(req.tag)) {
                Some(Ok(())) => Disposition::Pending,
                _ => Disposition::Done(-libc::EIO),
            };
        }
        self.reqs[tag] = Some(*req);
        self.sent[tag] = false;
        self.early[tag] = None;
        self.data_in[tag] = None;
        if self.sending {
            self.waiting.push_back(req.tag);
            return Disposition::Pending;
        }
        let r = self.send(req, io);
        if r.is_err() {
            self.sending = false;
            self.reqs[tag] = None;
        }
        pending_or(r)
    }

    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition {
        let tag = usize::from(req.tag);
        match cookie {
            // The header of a write: its payload's completion ends the send (unless the
            // payload could not be queued).
            HDR_SENT if res >= 0 && self.early[tag].is_none() => Disposition::Pending,
            HDR_SENT | SENT => {
                self.sent[tag] = true;
                if res < 0 {
                    self.early[tag].get_or_insert(res);
                }
                self.send_next(io);
                self.outcome(req.tag)
            }
            DATA => {
                self.data_in[tag] = Some(if res < 0 { res } else { req.len as i32 });
                self.outcome(req.tag)
            }
            _ => Disposition::Pending,
        }
    }

    fn queue_complete(&mut self, cookie: u16, res: i32, io: &mut IoCtx<'_>) {
        if cookie != REPLY || self.stopping {
            return;
        }
        if res < REPLY_LEN as i32 {
            tracing::error!("sockram: the server's socket closed or failed ({res}): the queue's requests stall");
            return;
        }
        let Some(reply) = io.mem(self.reply).and_then(|m| WireReply::decode(m)) else {
            tracing::error!("sockram: bad reply header: the queue's requests stall");
            return;
        };
        let t = usize::from(reply.tag);
        if reply.data > 0 && t < self.reqs.len() {
            // Read data follows: into the request's buffer, for it, before the next header.
            let mem = Mem::Request { off: 0, len: reply.data };
            if let Some(mut rio) = io.for_request(reply.tag)
                && rio.link_next().is_ok()
                && rio.recv(self.slot, mem, libc::MSG_WAITALL, DATA).is_ok()
            {
                if let Err(e) = self.arm(io) {
                    tracing::error!("sockram: cannot receive the next reply: errno {}", -e);
                }
                return;
            }
        }
        match io.finish(reply.tag, reply.result) {
            Ok(()) => {
                if let Some(r) = self.reqs.get_mut(t) {
                    *r = None;
                }
            }
            // Its sends' completions are not in yet: it finishes with the last of them.
            Err(e) if e == -libc::EBUSY => self.early[t] = Some(reply.result),
            Err(_) => tracing::error!(tag = reply.tag, "sockram: a reply for no request"),
        }
        if let Err(e) = self.arm(io) {
            tracing::error!("sockram: cannot receive the next reply: errno {}", -e);
        }
    }

    fn woken(&mut self, io: &mut IoCtx<'_>) {
        while let Ok(tag) = self.done_rx.try_recv() {
            if let Err(e) = io.finish(tag, 0) {
                tracing::error!(tag, "sockram: finishing a flush: errno {}", -e);
            }
        }
    }

    fn stop(&mut self, _io: &mut IoCtx<'_>) {
        // The standing receive sees the end of the stream; the threads end.
        self.stopping = true;
        let _ = self.sock.shutdown(Shutdown::Both);
        self.flush_tx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trips() {
        let r = WireRequest { op: OP_WRITE, tag: 7, offset: 1 << 40, len: 131072 };
        let mut b = [0xffu8; REQ_LEN];
        r.encode(&mut b);
        assert_eq!(WireRequest::decode(&b), Some(r));
        assert_eq!(WireRequest::decode(&b[..REQ_LEN - 1]), None);
        b[0] ^= 1;
        assert_eq!(WireRequest::decode(&b), None);
        let p = WireReply { tag: 3, result: -libc::ENOSPC, data: 0 };
        assert_eq!(WireReply::decode(&p.encode()), Some(p));
        let mut bad = p.encode();
        bad[1] ^= 1;
        assert_eq!(WireReply::decode(&bad), None);
    }

    /// The server end alone, over a socketpair: writes land, reads return them, zeroing
    /// zeroes, out of range is EIO, and the server ends at EOF.
    #[test]
    fn the_server_serves_the_store() {
        let store: Store = Arc::new(Mutex::new(vec![0; 1 << 16]));
        let (mut c, s) = UnixStream::pair().unwrap();
        let st = Arc::clone(&store);
        let server = std::thread::spawn(move || serve_store(s, &st));
        let call = |c: &mut UnixStream, r: WireRequest, payload: &[u8]| {
            let mut h = [0u8; REQ_LEN];
            r.encode(&mut h);
            c.write_all(&h).unwrap();
            c.write_all(payload).unwrap();
            let mut rh = [0u8; REPLY_LEN];
            c.read_exact(&mut rh).unwrap();
            let reply = WireReply::decode(&rh).unwrap();
            let mut data = vec![0u8; reply.data as usize];
            c.read_exact(&mut data).unwrap();
            (reply, data)
        };
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let (w, _) = call(&mut c, WireRequest { op: OP_WRITE, tag: 1, offset: 8192, len: 4096 }, &pattern);
        assert_eq!((w.tag, w.result, w.data), (1, 4096, 0));
        let (r, data) = call(&mut c, WireRequest { op: OP_READ, tag: 2, offset: 8192, len: 4096 }, &[]);
        assert_eq!((r.tag, r.result, data), (2, 4096, pattern.clone()));
        let (z, _) = call(&mut c, WireRequest { op: OP_ZERO, tag: 3, offset: 8192, len: 512 }, &[]);
        assert_eq!(z.result, 0);
        assert!(store.lock().unwrap()[8192..8704].iter().all(|&b| b == 0));
        assert_eq!(store.lock().unwrap()[8704..12288], pattern[512..]);
        let (e, _) = call(&mut c, WireRequest { op: OP_READ, tag: 4, offset: 1 << 16, len: 512 }, &[]);
        assert_eq!(e.result, -libc::EIO);
        drop(c);
        server.join().unwrap().unwrap();
    }
}
