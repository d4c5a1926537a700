//! Per-queue statistics: counters ([`Counters`]) and latency histograms, kept by the
//! queue thread ([`Recorder`]) and published to a shared copy ([`QueueStats`]) about
//! every 100 ms.
//!
//! Latency is measured from the FETCH completion that delivers a request to the
//! moment its COMMIT is queued: the time the request spends in the engine and target.
//!
//! Queues on the batch protocol (UBLK_F_BATCH_IO) also count how many requests each
//! FETCH_IO_CMDS completion delivers and how many elements each COMMIT_IO_CMDS carries
//! ([`BatchCounters`]); their counters have `batch: None` on the per-tag protocol.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::request::Op;

/// Latency histograms in nanoseconds, one per op class.
#[derive(Debug, Clone)]
pub struct Latency {
    pub read: Histogram<u64>,
    pub write: Histogram<u64>,
    /// FLUSH, DISCARD, WRITE_ZEROES.
    pub other: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        // 1 ns .. 60 s at 2 significant digits (values within 1%, like fio's own
        // percentiles): 30 KiB per histogram. At 3 digits each is 216 KiB, which the queue
        // thread then adds and clears every 100 ms, and every sample allocates (mmap) and
        // frees (munmap, a TLB shootdown of the queue threads' CPUs) several times over.
        // The bounds are constants, so this cannot fail.
        let h = || Histogram::new_with_bounds(1, 60_000_000_000, 2).unwrap_or_else(|_| unreachable!());
        Self { read: h(), write: h(), other: h() }
    }
}

impl Latency {
    fn for_op(&mut self, op: Op) -> &mut Histogram<u64> {
        match op {
            Op::Read => &mut self.read,
            Op::Write | Op::ZoneAppend => &mut self.write,
            _ => &mut self.other,
        }
    }

    fn add(&mut self, o: &Latency) {
        // Same bounds everywhere, so adding cannot fail.
        let _ = self.read.add(&o.read);
        let _ = self.write.add(&o.write);
        let _ = self.other.add(&o.other);
    }

    fn reset(&mut self) {
        self.read.reset();
        self.write.reset();
        self.other.reset();
    }
}

/// The counters of a queue, or of several queues together ([`Counters::merge`]). The
/// queue thread's `Recorder` keeps them with plain arithmetic and publishes a copy;
/// `stats --json` shows them at the top level of each queue and of the total.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// READs completed successfully.
    pub reads: u64,
    /// WRITEs completed successfully.
    pub writes: u64,
    /// FLUSHes completed successfully.
    pub flushes: u64,
    /// DISCARDs completed successfully.
    pub discards: u64,
    /// WRITE_ZEROES completed successfully.
    pub write_zeroes: u64,
    /// Zone operations completed successfully (zoned devices: open, close, finish,
    /// reset, report; a zone append counts as a write).
    #[serde(default)]
    pub zone_ops: u64,
    /// Reads and writes (also in `reads`/`writes`) whose data was in the device's
    /// shared memory (UBLK_F_SHMEM_ZC): nothing copied, nothing registered. The others
    /// were served the buffer mode's way.
    #[serde(default)]
    pub shmem_zc: u64,
    /// Bytes the successful READs returned.
    pub bytes_read: u64,
    /// Bytes the successful WRITEs took.
    pub bytes_written: u64,
    /// Requests that failed (any op, `bad_requests` included).
    pub errors: u64,
    /// Malformed requests, failed without reaching the target (also in `errors`).
    pub bad_requests: u64,
    /// Loop passes (one io_uring_enter each).
    pub passes: u64,
    /// CQEs those passes handled.
    pub cqes: u64,
    /// SQEs the kernel consumed (requests per submit = sqes / passes).
    pub sqes: u64,
    /// Requests being served by the target now (at the end of the last loop pass
    /// published). In a total: summed, the requests in flight across the queues now.
    pub inflight: u64,
    /// The most requests in the target at once, as seen at the end of a loop pass. In a
    /// total: the largest queue's peak, not the peak of the queues' sum, which per-queue
    /// samples cannot give (it is at least this and at most the queues' peaks summed).
    pub inflight_max: u64,
    /// Failed requests by errno ([`ErrnoCounts`]; also counted in `errors`).
    #[serde(default)]
    pub errors_by_errno: ErrnoCounts,
    /// Batch protocol queues only (`None`, and absent from the JSON, on per-tag queues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchCounters>,
}

/// Failed requests by errno: the errnos a target returns, each counted on its own, the
/// rest together as `other`. A fixed array, so that [`Counters`] stays `Copy` and the
/// queue thread's count is one add.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrnoCounts(pub [u64; ErrnoCounts::NAMES.len()]);

impl ErrnoCounts {
    /// The errnos counted on their own, then `other`.
    pub const NAMES: [&'static str; 10] =
        ["EIO", "ENOSPC", "ETIMEDOUT", "EROFS", "EINVAL", "EOPNOTSUPP", "ENOMEM", "EAGAIN", "ENODEV", "other"];
    const ERRNOS: [i32; 9] = [
        libc::EIO,
        libc::ENOSPC,
        libc::ETIMEDOUT,
        libc::EROFS,
        libc::EINVAL,
        libc::EOPNOTSUPP,
        libc::ENOMEM,
        libc::EAGAIN,
        libc::ENODEV,
    ];

    /// Counts one failure with `errno` (positive).
    pub fn add(&mut self, errno: i32) {
        let i = Self::ERRNOS.iter().position(|&e| e == errno).unwrap_or(Self::ERRNOS.len());
        self.0[i] += 1;
    }

    /// `(name, count)` of every slot, `other` last.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::NAMES.iter().copied().zip(self.0.iter().copied())
    }

    fn merge(&mut self, o: &ErrnoCounts) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

impl Counters {
    /// Adds another queue's counters, making a total: counts and `inflight` summed,
    /// `inflight_max` the larger, `batch` merged ([`BatchCounters::merge`]; present if
    /// either has it).
    pub fn merge(&mut self, o: &Counters) {
        // Destructured, so that a counter added to the struct cannot be left out here.
        let Counters {
            reads,
            writes,
            flushes,
            discards,
            write_zeroes,
            zone_ops,
            shmem_zc,
            bytes_read,
            bytes_written,
            errors,
            bad_requests,
            passes,
            cqes,
            sqes,
            inflight,
            inflight_max,
            errors_by_errno,
            batch,
        } = *o;
        self.errors_by_errno.merge(&errors_by_errno);
        self.reads += reads;
        self.writes += writes;
        self.flushes += flushes;
        self.discards += discards;
        self.write_zeroes += write_zeroes;
        self.zone_ops += zone_ops;
        self.shmem_zc += shmem_zc;
        self.bytes_read += bytes_read;
        self.bytes_written += bytes_written;
        self.errors += errors;
        self.bad_requests += bad_requests;
        self.passes += passes;
        self.cqes += cqes;
        self.sqes += sqes;
        self.inflight += inflight;
        self.inflight_max = self.inflight_max.max(inflight_max);
        if let Some(b) = batch {
            self.batch.get_or_insert_default().merge(&b);
        }
    }

    /// Requests completed (any op, successful).
    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes + self.zone_ops
    }

    /// SQEs per io_uring_enter.
    pub fn sqes_per_submit(&self) -> f64 {
        if self.passes == 0 { 0.0 } else { self.sqes as f64 / self.passes as f64 }
    }

    /// CQEs handled per pass.
    pub fn cqes_per_pass(&self) -> f64 {
        if self.passes == 0 { 0.0 } else { self.cqes as f64 / self.passes as f64 }
    }
}

/// Events of a variable size (requests in a fetch completion, elements in a commit):
/// how many, their sizes summed, and the largest. In JSON with its mean:
/// `{ "count", "total", "mean", "max" }` (the mean is recomputed when read back).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "SizeSummary", from = "SizeSummary")]
pub struct SizeCounter {
    /// Events (fetch completions, or commits sent).
    pub count: u64,
    /// Their sizes summed (requests delivered, or elements committed).
    pub total: u64,
    /// The largest.
    pub max: u64,
}

impl SizeCounter {
    /// One event of size `n`.
    pub fn add(&mut self, n: u64) {
        self.count += 1;
        self.total = self.total.saturating_add(n);
        self.max = self.max.max(n);
    }

    /// Another counter's events, as if they had been added here.
    pub fn merge(&mut self, o: &SizeCounter) {
        self.count = self.count.saturating_add(o.count);
        self.total = self.total.saturating_add(o.total);
        self.max = self.max.max(o.max);
    }

    /// Mean size (0 with no events).
    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.total as f64 / self.count as f64 }
    }
}

/// A [`SizeCounter`] as `stats --json` shows it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SizeSummary {
    count: u64,
    total: u64,
    /// total / count (0 with no events).
    mean: f64,
    max: u64,
}

impl From<SizeCounter> for SizeSummary {
    fn from(c: SizeCounter) -> Self {
        Self { count: c.count, total: c.total, mean: c.mean(), max: c.max }
    }
}

impl From<SizeSummary> for SizeCounter {
    fn from(s: SizeSummary) -> Self {
        Self { count: s.count, total: s.total, max: s.max }
    }
}

/// Batch protocol counters of a queue (or of several together).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchCounters {
    /// Requests (tags) delivered per FETCH_IO_CMDS completion. Completions that
    /// delivered none (the end of a multishot fetch) are not counted.
    pub requests_per_fetch: SizeCounter,
    /// Elements (completed requests) per COMMIT_IO_CMDS sent; a partial commit's rest,
    /// sent again, counts as another commit.
    pub elements_per_commit: SizeCounter,
}

impl BatchCounters {
    /// Adds another queue's counts (counts and sizes summed, the larger maximum: the
    /// mean is then over all events, not a mean of means).
    pub fn merge(&mut self, o: &BatchCounters) {
        self.requests_per_fetch.merge(&o.requests_per_fetch);
        self.elements_per_commit.merge(&o.elements_per_commit);
    }
}

/// How often a queue publishes its statistics (at most; only while it has news).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A queue's statistics as last published by its thread, readable from any thread.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// The queue uses the batch protocol: its snapshots have `batch`.
    batch: bool,
    /// Replaced (counters) and added to (histograms) by the queue thread about every
    /// 100 ms. A mutex, not atomics or a seqlock: the histograms need a lock anyway, the
    /// queue thread takes it once per 100 ms and the daemon to sample about once a
    /// second, so it is not contended, needs no unsafe code, and a reader gets counters
    /// and histograms of the same moment.
    published: Mutex<Published>,
}

#[derive(Debug, Default)]
struct Published {
    counters: Counters,
    latency: Latency,
}

/// The queue thread's side: its own counters and histograms, published into the
/// shared [`QueueStats`] about every 100 ms, so the per-request path does no atomic
/// read-modify-write and takes no lock.
#[derive(Debug)]
pub struct Recorder {
    c: Counters,
    local: Latency,
    /// The clock, read once per loop pass ([`Recorder::tick`]): requests delivered and
    /// finished in one pass share it. A clock read costs about 1 µs in the test VM,
    /// against a server CPU budget of ~25 µs per request; once per pass instead of twice
    /// per request, and latencies are still exact to within one pass's processing.
    now: Instant,
    last_flush: Instant,
    pending: u32,
    /// `c.passes` when last published.
    published: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        let now = Instant::now();
        Self { c: Counters::default(), local: Latency::default(), now, last_flush: now, pending: 0, published: 0 }
    }
}

impl Recorder {
    /// Reads the clock: the time of this loop pass.
    pub fn tick(&mut self) {
        self.now = Instant::now();
    }

    /// The time of this loop pass.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// A request finished with `res` (bytes or -errno) after being delivered at `started`.
    pub fn record(&mut self, op: Op, res: i32, started: Instant) {
        let c = &mut self.c;
        if res < 0 {
            c.errors += 1;
            c.errors_by_errno.add(-res);
        } else {
            let bytes = u64::from(res.cast_unsigned());
            match op {
                Op::Read => {
                    c.reads += 1;
                    c.bytes_read += bytes;
                }
                Op::Write | Op::ZoneAppend => {
                    c.writes += 1;
                    c.bytes_written += bytes;
                }
                Op::Flush => c.flushes += 1,
                Op::Discard => c.discards += 1,
                Op::WriteZeroes => c.write_zeroes += 1,
                _ => c.zone_ops += 1,
            }
        }
        let ns = u64::try_from(self.now.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX);
        self.local.for_op(op).saturating_record(ns.max(1));
        self.pending += 1;
    }

    /// A request served from the shared memory completed (see [`Counters::shmem_zc`]).
    pub fn count_shared(&mut self) {
        self.c.shmem_zc += 1;
    }

    pub fn count_bad_request(&mut self) {
        self.c.bad_requests += 1;
    }

    /// Batch protocol: a FETCH_IO_CMDS completion delivered `requests` tags (one that
    /// delivered none is not counted).
    pub fn record_fetch(&mut self, requests: usize) {
        if requests > 0 {
            self.c.batch.get_or_insert_default().requests_per_fetch.add(requests as u64);
        }
    }

    /// Batch protocol: a COMMIT_IO_CMDS carrying `elements` was queued for submission.
    pub fn record_commit(&mut self, elements: u16) {
        self.c.batch.get_or_insert_default().elements_per_commit.add(u64::from(elements));
    }

    /// One loop pass: CQEs handled, SQEs submitted, requests in the target now.
    pub fn record_pass(&mut self, cqes: u64, sqes: u64, inflight: u64) {
        let c = &mut self.c;
        c.passes += 1;
        c.cqes += cqes;
        c.sqes += sqes;
        c.inflight = inflight;
        c.inflight_max = c.inflight_max.max(inflight);
    }

    /// Publishes counters and histograms if ~100 ms passed (or `force`).
    pub fn maybe_flush(&mut self, shared: &QueueStats, force: bool) {
        if !self.dirty() || (!force && self.now.saturating_duration_since(self.last_flush) < FLUSH_INTERVAL) {
            return;
        }
        {
            // Plain data: a panic elsewhere while holding the lock leaves nothing broken.
            let mut p = shared.published.lock().unwrap_or_else(PoisonError::into_inner);
            p.counters = self.c;
            if self.pending > 0 {
                p.latency.add(&self.local);
            }
        }
        if self.pending > 0 {
            self.local.reset();
            self.pending = 0;
        }
        self.last_flush = self.now;
        self.published = self.c.passes;
    }

    /// Has anything happened since the last publication?
    pub fn dirty(&self) -> bool {
        self.pending > 0 || self.c.passes != self.published
    }
}

/// Latency percentiles of one op class, in microseconds.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Sum of all latencies, in seconds (a Prometheus histogram's `_sum`).
    #[serde(default)]
    pub sum_s: f64,
    /// Requests that took at most [`LatencySummary::BUCKETS_S`]`[i]` seconds, cumulative (a
    /// Prometheus histogram's `_bucket{le}`; `count` is the `+Inf` bucket).
    #[serde(default)]
    pub buckets: Vec<u64>,
}

impl LatencySummary {
    /// Upper bounds of the [`buckets`](LatencySummary::buckets), in seconds: 10 µs to 10 s.
    pub const BUCKETS_S: [f64; 19] = [
        10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 0.5, 1.0,
        2.5, 5.0, 10.0,
    ];

    fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            sum_s: h.mean() * h.len() as f64 / 1e9,
            // hdrhistogram keeps values within 1% (2 significant digits), so a request at a
            // bucket's bound may land in the next bucket up: a bound's count is exact to 1%.
            buckets: Self::BUCKETS_S.iter().map(|&b| h.count_between(0, (b * 1e9) as u64)).collect(),
        }
    }
}

/// A queue's (or a total's) counters and latency summaries, as `stats --json` shows
/// them: the counters at the top level, then `read_latency`, `write_latency`,
/// `other_latency`.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    #[serde(flatten)]
    pub counters: Counters,
    pub read_latency: LatencySummary,
    pub write_latency: LatencySummary,
    pub other_latency: LatencySummary,
}

impl StatsSnapshot {
    fn new(counters: Counters, lat: &Latency) -> Self {
        Self {
            counters,
            read_latency: LatencySummary::of(&lat.read),
            write_latency: LatencySummary::of(&lat.write),
            other_latency: LatencySummary::of(&lat.other),
        }
    }
}

impl QueueStats {
    /// Statistics of a queue; `batch`: it uses the batch protocol.
    pub fn new(batch: bool) -> Self {
        Self { batch, ..Self::default() }
    }

    /// A copy of the published counters and histograms (taken under the lock, which the
    /// queue thread also takes to publish: the summaries are computed from the copy).
    fn published(&self) -> (Counters, Latency) {
        let p = self.published.lock().unwrap_or_else(PoisonError::into_inner);
        // Batch queues have batch counters (zero before their first fetch), others none.
        let c = Counters { batch: self.batch.then(|| p.counters.batch.unwrap_or_default()), ..p.counters };
        (c, p.latency.clone())
    }

    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let (c, lat) = self.published();
        StatsSnapshot::new(c, &lat)
    }

    /// The counters and histograms of several queues together.
    #[cfg(test)]
    fn total(queues: &[&QueueStats]) -> StatsSnapshot {
        Self::sample(queues).0
    }

    /// The total of several queues ([`Counters::merge`]) and each queue's snapshot, each
    /// queue's histograms copied once.
    pub fn sample(queues: &[&QueueStats]) -> (StatsSnapshot, Vec<StatsSnapshot>) {
        let (mut total, mut lat) = (Counters::default(), Latency::default());
        let each = queues
            .iter()
            .map(|q| {
                let (c, l) = q.published();
                total.merge(&c);
                lat.add(&l);
                StatsSnapshot::new(c, &l)
            })
            .collect();
        (StatsSnapshot::new(total, &lat), each)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn records_by_op_and_latency() {
        let s = QueueStats::default();
        let mut r = Recorder::default();
        let t0 = Instant::now() - Duration::from_micros(50);
        // Latency is measured against the pass clock, read by tick().
        r.tick();
        r.record(Op::Read, 4096, t0);
        r.record(Op::Write, 512, t0);
        r.record(Op::Write, -5, t0);
        r.record(Op::Flush, 0, t0);
        r.record_pass(3, 4, 2);
        r.record_pass(1, 2, 1);
        // Nothing is published until a flush.
        assert_eq!(s.snapshot().counters.reads, 0);
        r.maybe_flush(&s, true);
        let snap = s.snapshot();
        let c = &snap.counters;
        assert_eq!((c.reads, c.bytes_read, c.writes, c.bytes_written), (1, 4096, 1, 512));
        assert_eq!((c.errors, c.flushes, c.ops()), (1, 1, 3));
        assert_eq!((snap.read_latency.count, snap.write_latency.count, snap.other_latency.count), (1, 2, 1));
        assert!(snap.read_latency.p50_us >= 50.0, "{:?}", snap.read_latency);
        assert_eq!((c.inflight, c.inflight_max), (1, 2));
        assert_eq!(c.sqes_per_submit(), 3.0);
        let total = QueueStats::total(&[&s, &s]);
        assert_eq!((total.counters.reads, total.read_latency.count, total.counters.passes), (2, 2, 4));
        // A second flush publishes totals, not deltas, and does not double the histograms.
        r.record(Op::Read, 4096, t0);
        r.maybe_flush(&s, true);
        let snap = s.snapshot();
        assert_eq!((snap.counters.reads, snap.read_latency.count), (2, 2));
        // A per-tag queue has no batch statistics.
        assert_eq!((snap.counters.batch, total.counters.batch), (None, None));
    }

    /// A per-tag queue whose recorder saw passes with `inflight` requests in the target.
    fn queue_with_inflight(inflight: &[u64]) -> QueueStats {
        let s = QueueStats::new(false);
        let mut r = Recorder::default();
        for &n in inflight {
            r.record_pass(1, 1, n);
        }
        r.maybe_flush(&s, true);
        s
    }

    #[test]
    fn total_inflight_max_is_the_largest_queue_peak() {
        let a = queue_with_inflight(&[5, 1]);
        let b = queue_with_inflight(&[3, 2]);
        let t = QueueStats::total(&[&a, &b]).counters;
        // In flight now: summed. The peak: the largest queue's (5), not the sum of the
        // peaks (8), which no moment need have reached.
        assert_eq!((t.inflight, t.inflight_max, t.passes), (3, 5, 4));
        assert_eq!(QueueStats::total(&[&b, &a]).counters, t);
        // Merging counters directly agrees.
        let mut m = a.snapshot().counters;
        m.merge(&b.snapshot().counters);
        assert_eq!(m, t);
        assert_eq!(QueueStats::total(&[]).counters, Counters::default());
    }

    #[test]
    fn size_counter_arithmetic() {
        let mut c = SizeCounter::default();
        assert_eq!((c.count, c.mean(), c.max), (0, 0.0, 0));
        for n in [1, 4, 7] {
            c.add(n);
        }
        assert_eq!(c, SizeCounter { count: 3, total: 12, max: 7 });
        assert_eq!(c.mean(), 4.0);
        let mut d = SizeCounter::default();
        d.add(20);
        c.merge(&d);
        assert_eq!(c, SizeCounter { count: 4, total: 32, max: 20 });
        assert_eq!(c.mean(), 8.0);
        // Merging nothing changes nothing; sums saturate instead of wrapping.
        c.merge(&SizeCounter::default());
        assert_eq!(c, SizeCounter { count: 4, total: 32, max: 20 });
        let mut big = SizeCounter { count: 1, total: u64::MAX - 1, max: 5 };
        big.add(5);
        assert_eq!((big.count, big.total, big.max), (2, u64::MAX, 5));
    }

    /// A batch queue whose recorder saw fetch completions of `fetches` tags and commits
    /// of `commits` elements, published.
    fn batch_queue(fetches: &[usize], commits: &[u16]) -> QueueStats {
        let s = QueueStats::new(true);
        let mut r = Recorder::default();
        for &n in fetches {
            r.record_fetch(n);
        }
        for &n in commits {
            r.record_commit(n);
        }
        r.record_pass(1, 1, 0);
        r.maybe_flush(&s, true);
        s
    }

    #[test]
    fn batch_counts_per_queue() {
        // Before any IO: present, all zero.
        let idle = QueueStats::new(true);
        assert_eq!(idle.snapshot().counters.batch, Some(BatchCounters::default()));
        // A fetch completion with no tags (the end of a multishot fetch) is not counted.
        let q = batch_queue(&[3, 0, 1, 8], &[2, 6]);
        let b = q.snapshot().counters.batch.unwrap();
        assert_eq!(b.requests_per_fetch, SizeCounter { count: 3, total: 12, max: 8 });
        assert_eq!(b.elements_per_commit, SizeCounter { count: 2, total: 8, max: 6 });
        assert_eq!((b.requests_per_fetch.mean(), b.elements_per_commit.mean()), (4.0, 4.0));
        // Nothing is published before a flush.
        let s = QueueStats::new(true);
        let mut r = Recorder::default();
        r.record_fetch(5);
        r.record_commit(5);
        assert_eq!(s.snapshot().counters.batch, Some(BatchCounters::default()));
        r.record_pass(1, 1, 0);
        r.maybe_flush(&s, true);
        assert_eq!(s.snapshot().counters.batch.unwrap().requests_per_fetch.count, 1);
        // A batch queue published before its first fetch or commit still has them (zero).
        let early = batch_queue(&[], &[]);
        assert_eq!(early.snapshot().counters.batch, Some(BatchCounters::default()));
    }

    #[test]
    fn batch_totals_across_queues() {
        let a = batch_queue(&[1, 1, 1, 1], &[4]);
        let b = batch_queue(&[16, 32], &[32, 16]);
        let t = QueueStats::total(&[&a, &b]).counters.batch.unwrap();
        // Means over all events (weighted), not the mean of the queues' means.
        assert_eq!(t.requests_per_fetch, SizeCounter { count: 6, total: 52, max: 32 });
        assert_eq!(t.elements_per_commit, SizeCounter { count: 3, total: 52, max: 32 });
        assert_eq!((t.requests_per_fetch.mean(), t.elements_per_commit.mean()), (52.0 / 6.0, 52.0 / 3.0));
        // An idle queue adds nothing; the total of idle queues is present and zero.
        let idle = QueueStats::new(true);
        let batch_total = |qs: &[&QueueStats]| QueueStats::total(qs).counters.batch;
        assert_eq!(batch_total(&[&a, &idle, &b]), Some(t));
        assert_eq!(batch_total(&[&idle]), Some(BatchCounters::default()));
        // Per-tag queues contribute nothing to it.
        let per_tag = QueueStats::new(false);
        assert_eq!(batch_total(&[&per_tag, &a]), batch_total(&[&a]));
        assert_eq!(batch_total(&[&per_tag]), None);
        assert_eq!(batch_total(&[]), None);
        // Merging snapshots agrees with merging counters.
        let mut m = a.snapshot().counters.batch.unwrap();
        m.merge(&b.snapshot().counters.batch.unwrap());
        assert_eq!(m, t);
    }

    #[test]
    fn batch_json_only_for_batch_queues() {
        let per_tag = serde_json::to_value(QueueStats::new(false).snapshot()).unwrap();
        assert!(per_tag.get("batch").is_none(), "{per_tag}");
        assert!(per_tag.get("sqes").is_some());
        let snap = batch_queue(&[2, 4], &[6]).snapshot();
        let v = serde_json::to_value(&snap).unwrap();
        assert_eq!(
            v["batch"]["requests_per_fetch"],
            serde_json::json!({ "count": 2, "total": 6, "mean": 3.0, "max": 4 })
        );
        assert_eq!(
            v["batch"]["elements_per_commit"],
            serde_json::json!({ "count": 1, "total": 6, "mean": 6.0, "max": 6 })
        );
        let back: StatsSnapshot = serde_json::from_value(v).unwrap();
        assert_eq!(back, snap);
        // A stats file written without the field still reads.
        let old: StatsSnapshot = serde_json::from_value(per_tag).unwrap();
        assert_eq!(old.counters.batch, None);
    }

    /// The keys of a JSON object.
    fn keys(v: &serde_json::Value) -> BTreeSet<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn errors_by_errno_and_latency_buckets() {
        let mut r = Recorder::default();
        let t0 = Instant::now();
        r.tick();
        for res in [-libc::EIO, -libc::EIO, -libc::ETIMEDOUT, -libc::EXDEV, 4096] {
            r.record(Op::Write, res, t0);
        }
        let s = QueueStats::new(false);
        r.maybe_flush(&s, true);
        let snap = s.snapshot();
        let c = &snap.counters;
        assert_eq!(c.errors, 4);
        let by: std::collections::BTreeMap<_, _> = c.errors_by_errno.iter().collect();
        assert_eq!((by["EIO"], by["ETIMEDOUT"], by["other"], by["ENOSPC"]), (2, 1, 1, 0));
        let mut total = *c;
        total.merge(c);
        assert_eq!(total.errors_by_errno.iter().find(|e| e.0 == "EIO").unwrap().1, 4);
        // Latency buckets: cumulative, ending at the count.
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 2).unwrap();
        for ns in [5_000, 20_000, 20_000, 3_000_000, 20_000_000_000] {
            h.record(ns).unwrap();
        }
        let l = LatencySummary::of(&h);
        assert_eq!(l.buckets.len(), LatencySummary::BUCKETS_S.len());
        assert_eq!(&l.buckets[..3], &[1, 3, 3], "{l:?}");
        assert_eq!(l.buckets[l.buckets.len() - 1], 4, "the 20 s request is only in +Inf");
        assert!(l.buckets.windows(2).all(|w| w[0] <= w[1]));
        assert!((l.sum_s - 20.003045).abs() < 0.3, "{}", l.sum_s);
    }

    #[test]
    fn json_field_names_unchanged() {
        const COUNTERS: [&str; 17] = [
            "reads",
            "writes",
            "flushes",
            "discards",
            "write_zeroes",
            "zone_ops",
            "shmem_zc",
            "bytes_read",
            "bytes_written",
            "errors",
            "bad_requests",
            "passes",
            "cqes",
            "sqes",
            "inflight",
            "inflight_max",
            "errors_by_errno",
        ];
        const LATENCIES: [&str; 3] = ["read_latency", "write_latency", "other_latency"];
        let set = |k: &[&'static str]| k.iter().copied().collect::<BTreeSet<_>>();
        let per_tag = set(&[COUNTERS.as_slice(), &LATENCIES].concat());
        let with_batch = set(&[COUNTERS.as_slice(), &["batch"], &LATENCIES].concat());
        let lat_keys =
            set(&["count", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "sum_s", "buckets"]);
        let size_keys = set(&["count", "total", "mean", "max"]);

        let mut r = Recorder::default();
        r.record(Op::Read, 512, Instant::now());
        r.record_pass(1, 1, 1);
        let s = QueueStats::new(false);
        r.maybe_flush(&s, true);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(keys(&v), per_tag, "{v}");
        for l in LATENCIES {
            assert_eq!(keys(&v[l]), lat_keys, "{v}");
        }

        let b = batch_queue(&[3], &[3]);
        let total = QueueStats::total(&[&b, &s]);
        for snap in [b.snapshot(), total] {
            let v = serde_json::to_value(&snap).unwrap();
            assert_eq!(keys(&v), with_batch, "{v}");
            assert_eq!(keys(&v["batch"]), set(&["requests_per_fetch", "elements_per_commit"]), "{v}");
            assert_eq!(keys(&v["batch"]["requests_per_fetch"]), size_keys, "{v}");
            assert_eq!(keys(&v["batch"]["elements_per_commit"]), size_keys, "{v}");
            // And back, unchanged.
            assert_eq!(serde_json::from_value::<StatsSnapshot>(v.clone()).unwrap(), snap);
            // Written in the same order as before: the counters, `batch`, the latencies.
            let text = serde_json::to_string(&snap).unwrap();
            let at: Vec<usize> = COUNTERS
                .iter()
                .chain(&["batch"])
                .chain(&LATENCIES)
                .map(|k| text.find(&format!("\"{k}\":")).unwrap())
                .collect();
            assert!(at.is_sorted(), "{text}");
        }

        // A snapshot as the previous layout wrote it reads back, and writes out the same.
        let lat = serde_json::json!({
            "count": 1, "mean_us": 2.5, "p50_us": 2.5, "p90_us": 2.5, "p99_us": 2.5, "p999_us": 2.5, "max_us": 2.5
        });
        let zero = serde_json::to_value(LatencySummary::default()).unwrap();
        let old = serde_json::json!({
            "reads": 1, "writes": 2, "flushes": 3, "discards": 4, "write_zeroes": 5, "bytes_read": 6,
            "bytes_written": 7, "errors": 8, "bad_requests": 9, "passes": 10, "cqes": 11, "sqes": 12,
            "inflight": 13, "inflight_max": 14,
            "batch": {
                "requests_per_fetch": { "count": 2, "total": 6, "mean": 3.0, "max": 4 },
                "elements_per_commit": { "count": 0, "total": 0, "mean": 0.0, "max": 0 }
            },
            "read_latency": lat, "write_latency": zero, "other_latency": zero
        });
        let snap: StatsSnapshot = serde_json::from_value(old.clone()).unwrap();
        let c = &snap.counters;
        assert_eq!((c.reads, c.bad_requests, c.inflight, c.inflight_max), (1, 9, 13, 14));
        assert_eq!(c.batch.unwrap().requests_per_fetch, SizeCounter { count: 2, total: 6, max: 4 });
        assert_eq!(snap.read_latency.p999_us, 2.5);
        // Written back: the old fields as they were, and the newer ones (zero) added.
        let mut back = serde_json::to_value(&snap).unwrap();
        let m = back.as_object_mut().unwrap();
        assert_eq!(m.remove("errors_by_errno").unwrap(), serde_json::json!([0u64; ErrnoCounts::NAMES.len()].to_vec()));
        assert_eq!(m.remove("zone_ops").unwrap(), serde_json::json!(0));
        assert_eq!(m.remove("shmem_zc").unwrap(), serde_json::json!(0));
        let mut old = old;
        for l in ["read_latency", "write_latency", "other_latency"] {
            for v in [&mut m[l], &mut old[l]] {
                let l = v.as_object_mut().unwrap();
                l.remove("sum_s");
                l.remove("buckets");
            }
        }
        assert_eq!(back, old);
    }
}
