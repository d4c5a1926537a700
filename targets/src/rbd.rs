//! `rbd`: a Ceph RBD image (through librbd, see the `ubd-ceph` binding) as a block device.
//!
//! Completions reach the queue thread, not the other way round: librbd signals the
//! image's eventfd when an IO finishes (`rbd_set_image_notification`); that eventfd is
//! the queue's [`Waker`], whose read is kept armed on the queue's
//! ring, and [`QueueTarget::woken`] collects every finished IO with `rbd_poll_io_events`
//! and commits it from the queue thread. No callback runs on librbd's threads, and the
//! queue takes no lock and makes no system call of its own per request.
//!
//! Data: a write's bytes are copied from the request buffer into a buffer of the
//! binding's (librbd copies them again into its own), a read's bytes out of it; the
//! binding keeps a buffer until librbd is done with it, so a request failed by
//! `--io-timeout` while librbd still holds its IO cannot have librbd write into a
//! reused request buffer. Buffer mode copy only (librbd reads and writes plain memory).
//!
//! One queue per device: librbd signals one eventfd per open image, and two handles of
//! one image in one process fight over its exclusive lock.

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ubd_ceph::{AioQueue, ClusterOptions, Image, Op as AioOp, Pool, Rados};
use ubd_engine::{Disposition, IoCtx, IoRequest, Op, QueueSetup, QueueTarget, Target, TargetInfo, Waker};

use crate::TargetSpec;

/// Where the cluster is and how the client behaves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RbdOptions {
    /// Configuration file; None: `/etc/ceph/CLUSTER.conf`.
    pub conf: Option<PathBuf>,
    /// Client id (`client.ID`); None: admin.
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    /// Cluster name; None: ceph.
    pub cluster: Option<String>,
    /// A request librbd has not finished in this long fails with ETIMEDOUT. None: wait.
    pub io_timeout: Option<Duration>,
    /// Reaching a monitor gives up after this long (default 10 s).
    pub connect_timeout: Option<Duration>,
    /// Client configuration set after the file is read (`NAME`, `VALUE`), e.g.
    /// `rbd_cache` = `false`.
    pub options: Vec<(String, String)>,
}

impl RbdOptions {
    fn cluster(&self) -> ClusterOptions {
        let mut c = ClusterOptions {
            conf: self.conf.clone(),
            id: self.id.clone(),
            keyring: self.keyring.clone(),
            cluster: self.cluster.clone(),
            extra: self.options.clone(),
            ..Default::default()
        };
        if let Some(t) = self.connect_timeout {
            c.connect_timeout = t;
        }
        c
    }
}

/// librbd's `rbd_discard_granularity_bytes` default: smaller discards are no-ops
/// (`rbd_skip_partial_discard`).
const DISCARD_GRANULARITY: u32 = 64 << 10;
/// The largest DISCARD / WRITE_ZEROES the device takes (in 512-byte sectors).
const MOST_SECTORS: u32 = (1 << 30) >> 9;
/// How often requests are checked against `--io-timeout`.
const TICK: Duration = Duration::from_millis(500);

/// An RBD image served through librbd.
#[derive(Debug)]
pub struct RbdTarget {
    spec: String,
    opts: RbdOptions,
    info: TargetInfo,
    describe: serde_json::Value,
    /// The open image, until the (one) queue takes it.
    image: Mutex<Option<Image>>,
}

impl RbdTarget {
    /// Connects to the cluster and opens `spec` (`POOL/IMAGE[@SNAP]`; a snapshot opens
    /// read-only). The error is one line naming what failed.
    pub fn open(spec: &str, opts: &RbdOptions) -> Result<Self, String> {
        let (pool, name, snap) = ubd_ceph::parse_image_spec(spec)?;
        let rados = Rados::connect(&opts.cluster()).map_err(|e| e.to_string())?;
        let pool = Pool::open(&rados, &pool).map_err(|e| match e.errno {
            libc::ENOENT => format!("pool {pool}: no such pool"),
            _ => e.to_string(),
        })?;
        let image = Image::open(&pool, &name, snap.as_deref(), false).map_err(|e| match e.errno {
            libc::ENOENT => format!("{spec}: no such image or snapshot"),
            _ => e.to_string(),
        })?;
        let st = image.stat().map_err(|e| e.to_string())?;
        let features = image.features().map_err(|e| e.to_string())?;
        let size = st.size / 512 * 512;
        if size == 0 {
            return Err(format!("{spec}: the image is smaller than one 512-byte block ({} bytes)", st.size));
        }
        if size != st.size {
            tracing::warn!(
                "{spec}: the image's {} bytes are not whole 512-byte blocks: the device has {size}",
                st.size
            );
        }
        let read_only = image.read_only();
        let info = TargetInfo {
            dev_size: size,
            logical_block_size: 512,
            physical_block_size: 4096,
            read_only,
            rotational: false,
            // librbd's cache (rbd_cache) holds writes until a flush.
            volatile_cache: !read_only,
            discard: (!read_only).then_some(ubd_engine::DiscardInfo {
                granularity: DISCARD_GRANULARITY,
                max_discard_sectors: MOST_SECTORS,
                max_write_zeroes_sectors: MOST_SECTORS,
            }),
            zoned: None,
        };
        let (maj, min, ext) = ubd_ceph::rbd_version().unwrap_or_default();
        let describe = serde_json::json!({
            "image": spec,
            "conf": opts.cluster().conf_path(),
            "id": opts.id.as_deref().unwrap_or("admin"),
            "size": st.size,
            "object_size": st.object_size,
            "features": features,
            "read_only": read_only,
            "librbd": format!("{maj}.{min}.{ext}"),
            "options": opts.options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        });
        Ok(Self { spec: spec.into(), opts: opts.clone(), info, describe, image: Mutex::new(Some(image)) })
    }

    /// What `recover` re-opens.
    pub fn spec(&self) -> TargetSpec {
        TargetSpec::Rbd {
            image: self.spec.clone(),
            conf: self.opts.conf.clone(),
            id: self.opts.id.clone(),
            keyring: self.opts.keyring.clone(),
            cluster: self.opts.cluster.clone(),
            io_timeout_secs: self.opts.io_timeout.map(|d| d.as_secs()),
            options: self.opts.options.clone(),
        }
    }
}

impl Target for RbdTarget {
    fn name(&self) -> &'static str {
        "rbd"
    }
    fn info(&self) -> &TargetInfo {
        &self.info
    }
    fn describe(&self) -> serde_json::Value {
        self.describe.clone()
    }
    /// librbd reads and writes plain memory: copy mode.
    fn supports_zero_copy(&self) -> bool {
        false
    }
    fn open_queue(&self, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        let image = self.image.lock().unwrap_or_else(PoisonError::into_inner).take().ok_or_else(|| {
            io::Error::other(format!("{}: one queue per rbd device (queue {} has none)", self.spec, setup.q_id()))
        })?;
        let waker = setup.waker()?;
        let aio = AioQueue::new(image, waker.as_fd()).map_err(|e| io::Error::other(e.to_string()))?;
        let depth = usize::from(setup.depth());
        Ok(Box::new(RbdQueue {
            aio,
            _waker: waker,
            spec: self.spec.clone(),
            io_timeout: self.opts.io_timeout,
            reqs: vec![Req::default(); depth],
            timer_armed: false,
            stopping: false,
            timed_out: 0,
        }))
    }
}

/// What a request's tag is doing.
#[derive(Debug, Clone, Copy, Default)]
struct Req {
    /// Bumped when the request ends, so that a late completion of an op of an earlier
    /// request with this tag (one failed by the timeout) is recognised and dropped.
    generation: u32,
    /// An op of the request is with librbd.
    busy: bool,
    /// A FUA write: a flush follows the write.
    then_flush: bool,
    /// Bytes of a read or write: what it completes with (ublk takes a read's or write's
    /// result as the bytes done, and re-sends the rest of a short one; librbd returns
    /// 0 for a write).
    len: u32,
    /// The request's op while it is the target's.
    op: Option<Op>,
    started: Option<Instant>,
}

struct RbdQueue {
    aio: AioQueue,
    /// Keeps the eventfd librbd signals (the binding holds a duplicate too).
    _waker: Waker,
    spec: String,
    io_timeout: Option<Duration>,
    reqs: Vec<Req>,
    timer_armed: bool,
    stopping: bool,
    /// Ops of requests failed by the timeout still with librbd.
    timed_out: usize,
}

fn user(tag: u16, generation: u32) -> u64 {
    u64::from(generation) << 16 | u64::from(tag)
}

fn split(user: u64) -> (u16, u32) {
    ((user & 0xffff) as u16, (user >> 16) as u32)
}

/// The request a finished op belongs to, if it is still waiting for it (not failed by
/// the timeout meanwhile).
fn waiting(reqs: &[Req], user: u64) -> Option<(u16, Req)> {
    let (tag, generation) = split(user);
    reqs.get(usize::from(tag)).filter(|r| r.generation == generation && r.busy).map(|r| (tag, *r))
}

impl RbdQueue {
    fn start_op(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Result<(), i32> {
        let tag = req.tag;
        let r = &mut self.reqs[usize::from(tag)];
        let u = user(tag, r.generation);
        let len = u32::try_from(req.len).map_err(|_| -libc::EINVAL)?;
        r.len = len;
        r.then_flush = false;
        r.op = Some(req.op);
        let op = match req.op {
            Op::Read => AioOp::Read { off: req.offset, len: len as usize },
            Op::Write => {
                r.then_flush = req.fua();
                AioOp::Write { off: req.offset, len: len as usize }
            }
            Op::Flush => AioOp::Flush,
            Op::Discard => AioOp::Discard { off: req.offset, len: req.len },
            Op::WriteZeroes => AioOp::WriteZeroes { off: req.offset, len: req.len },
            // Zone operations: an RBD image is not zoned.
            _ => return Err(-libc::EOPNOTSUPP),
        };
        self.aio.submit(op, u, |buf| {
            buf.copy_from_slice(io.request_buf(len)?);
            Ok(())
        })?;
        let r = &mut self.reqs[usize::from(tag)];
        r.busy = true;
        r.started = self.io_timeout.map(|_| Instant::now());
        self.arm_timer(io);
        Ok(())
    }

    /// Ends request `tag` (from a queue context).
    fn end(&mut self, io: &mut IoCtx<'_>, tag: u16, res: i32) {
        let r = &mut self.reqs[usize::from(tag)];
        r.generation = r.generation.wrapping_add(1);
        r.busy = false;
        r.op = None;
        r.started = None;
        if let Err(e) = io.finish(tag, res) {
            tracing::error!("rbd: {}: cannot finish request {tag}: errno {}", self.spec, -e);
        }
    }

    fn arm_timer(&mut self, io: &mut IoCtx<'_>) {
        if self.timer_armed || self.stopping || self.io_timeout.is_none() {
            return;
        }
        match io.for_queue().sleep(TICK, 0) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::warn!("rbd: cannot arm the IO timer: errno {}", -e),
        }
    }

    /// A read's bytes into its request's buffer: the result to finish it with.
    fn copy_read(io: &mut IoCtx<'_>, r: Req, tag: u16, data: &[u8]) -> i64 {
        let copied = io.for_request(tag).ok_or(-libc::EINVAL).and_then(|mut ctx| {
            if data.len() != r.len as usize {
                return Err(-libc::EIO);
            }
            ctx.request_buf(r.len)?.copy_from_slice(data);
            Ok(())
        });
        copied.map_or_else(i64::from, |()| i64::from(r.len))
    }

    /// One finished op (from a queue context), a read's data already copied.
    fn on_done(&mut self, io: &mut IoCtx<'_>, user: u64, res: i64) {
        let Some((tag, r)) = waiting(&self.reqs, user) else {
            // Its request was failed by the timeout meanwhile.
            self.timed_out = self.timed_out.saturating_sub(1);
            tracing::info!("rbd: {}: a timed-out request's IO finished late (result {res})", self.spec);
            return;
        };
        if res < 0 {
            let e = i32::try_from(res).unwrap_or(-libc::EIO);
            return self.end(io, tag, e);
        }
        if r.op == Some(Op::Read) {
            return self.end(io, tag, i32::try_from(res).unwrap_or(-libc::EIO));
        }
        if r.then_flush {
            // FUA: the write is durable once a flush after it completes.
            self.reqs[usize::from(tag)].then_flush = false;
            if let Err(e) = self.aio.submit(AioOp::Flush, user, |_| Ok(())) {
                return self.end(io, tag, e);
            }
            return;
        }
        let done = if r.op == Some(Op::Write) { r.len as i32 } else { 0 };
        self.end(io, tag, done)
    }

    fn on_timer(&mut self, io: &mut IoCtx<'_>) {
        let Some(limit) = self.io_timeout else { return };
        let now = Instant::now();
        let late: Vec<u16> = (0..self.reqs.len())
            .filter(|&t| self.reqs[t].busy && self.reqs[t].started.is_some_and(|s| now.duration_since(s) >= limit))
            .map(|t| t as u16)
            .collect();
        if !late.is_empty() {
            tracing::error!(
                "rbd: {}: {} requests not finished by librbd in {} s: failing them with ETIMEDOUT",
                self.spec,
                late.len(),
                limit.as_secs()
            );
            self.timed_out += late.len();
            for tag in late {
                self.end(io, tag, -libc::ETIMEDOUT);
            }
        }
        if self.reqs.iter().any(|r| r.busy) {
            self.arm_timer(io);
        }
    }
}

impl QueueTarget for RbdQueue {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        match self.start_op(req, io) {
            Ok(()) => Disposition::Pending,
            Err(e) => Disposition::Done(e),
        }
    }

    /// The queue pushes no SQE of a request's own: nothing comes back here.
    fn complete(&mut self, _req: &IoRequest, _cookie: u16, res: i32, _io: &mut IoCtx<'_>) -> Disposition {
        Disposition::Done(if res < 0 { res } else { -libc::EIO })
    }

    fn queue_complete(&mut self, _cookie: u16, _res: i32, io: &mut IoCtx<'_>) {
        self.timer_armed = false;
        if !self.stopping {
            self.on_timer(io);
        }
    }

    fn woken(&mut self, io: &mut IoCtx<'_>) {
        self.aio.poll();
        loop {
            let reqs = &self.reqs;
            // A read's data is copied while the binding lends its buffer.
            let got = self.aio.next(|d, data| match waiting(reqs, d.user) {
                Some((tag, r)) if r.op == Some(Op::Read) && d.res >= 0 => (d.user, Self::copy_read(io, r, tag, data)),
                _ => (d.user, d.res),
            });
            let Some((user, res)) = got else { break };
            self.on_done(io, user, res);
        }
    }

    fn stop(&mut self, _io: &mut IoCtx<'_>) {
        self.stopping = true;
        if self.timed_out > 0 {
            tracing::warn!(
                "rbd: {}: {} IOs of timed-out requests are still with librbd: waiting for them",
                self.spec,
                self.timed_out
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_words_carry_tag_and_generation() {
        for (tag, generation) in [(0u16, 0u32), (15, 1), (u16::MAX, u32::MAX), (7, 0x1234_5678)] {
            assert_eq!(split(user(tag, generation)), (tag, generation));
        }
        assert_ne!(user(3, 1), user(3, 2));
    }

    #[test]
    fn a_bad_image_spec_is_refused_before_any_connection() {
        let e = RbdTarget::open("justimage", &RbdOptions::default()).unwrap_err();
        assert!(e.contains("expected POOL/IMAGE[@SNAP]"), "{e}");
    }
}
