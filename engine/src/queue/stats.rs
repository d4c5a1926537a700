//! Per-queue statistics: counters (atomics, readable any time) and latency histograms
//! (kept by the queue thread, published to a shared copy about every 100 ms).
//!
//! Latency is measured from the FETCH completion that delivers a request to the
//! moment its COMMIT is queued: the time the request spends in the engine and target.
//!
//! Queues on the batch protocol (UBLK_F_BATCH_IO) also count how many requests each
//! FETCH_IO_CMDS completion delivers and how many elements each COMMIT_IO_CMDS carries
//! ([`BatchSnapshot`]); their snapshots have `batch: None` on the per-tag protocol.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
            Op::Write => &mut self.write,
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

#[derive(Debug, Default)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Loop passes (one io_uring_enter each) and the CQEs they handled.
    pub passes: AtomicU64,
    pub cqes: AtomicU64,
    /// SQEs the kernel consumed (requests per submit = sqes / passes).
    pub sqes: AtomicU64,
    /// Requests being served by the target now, and the most seen.
    pub inflight: AtomicU64,
    pub inflight_max: AtomicU64,
    /// The queue uses the batch protocol: the fields below are meaningful.
    pub batch: AtomicBool,
    /// Batch protocol: FETCH_IO_CMDS completions that delivered requests, the requests
    /// they delivered, and the most in one.
    pub fetch_cqes: AtomicU64,
    pub fetched: AtomicU64,
    pub fetched_max: AtomicU64,
    /// Batch protocol: COMMIT_IO_CMDS sent, the elements they carried, and the most in one.
    pub commits: AtomicU64,
    pub committed: AtomicU64,
    pub committed_max: AtomicU64,
    latency: Mutex<Latency>,
}

/// How often a queue publishes its statistics (at most; only while it has news).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Events of a variable size (requests in a fetch completion, elements in a commit):
/// how many, their sizes summed, and the largest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SizeCounter {
    pub count: u64,
    pub total: u64,
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

    fn summary(&self) -> SizeSummary {
        SizeSummary { count: self.count, total: self.total, mean: self.mean(), max: self.max }
    }
}

/// A [`SizeCounter`] with its mean, as shown by `stats --json`.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SizeSummary {
    /// Events (fetch completions, or commits sent).
    pub count: u64,
    /// Their sizes summed (requests delivered, or elements committed).
    pub total: u64,
    /// total / count (0 with no events).
    pub mean: f64,
    pub max: u64,
}

impl SizeSummary {
    fn counter(&self) -> SizeCounter {
        SizeCounter { count: self.count, total: self.total, max: self.max }
    }
}

/// Batch protocol statistics of a queue (or of several together).
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchSnapshot {
    /// Requests (tags) delivered per FETCH_IO_CMDS completion. Completions that
    /// delivered none (the end of a multishot fetch) are not counted.
    pub requests_per_fetch: SizeSummary,
    /// Elements (completed requests) per COMMIT_IO_CMDS sent; a partial commit's rest,
    /// sent again, counts as another commit.
    pub elements_per_commit: SizeSummary,
}

impl BatchSnapshot {
    /// Adds another queue's counts (means are recomputed from the sums).
    pub fn merge(&mut self, o: &BatchSnapshot) {
        for (a, b) in [
            (&mut self.requests_per_fetch, &o.requests_per_fetch),
            (&mut self.elements_per_commit, &o.elements_per_commit),
        ] {
            let mut c = a.counter();
            c.merge(&b.counter());
            *a = c.summary();
        }
    }
}

/// Plain counters kept by the queue thread (no atomic operation per request).
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    reads: u64,
    writes: u64,
    flushes: u64,
    discards: u64,
    write_zeroes: u64,
    bytes_read: u64,
    bytes_written: u64,
    errors: u64,
    bad_requests: u64,
    passes: u64,
    cqes: u64,
    sqes: u64,
    inflight: u64,
    inflight_max: u64,
    fetch: SizeCounter,
    commit: SizeCounter,
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
        } else {
            let bytes = u64::from(res.cast_unsigned());
            match op {
                Op::Read => {
                    c.reads += 1;
                    c.bytes_read += bytes;
                }
                Op::Write => {
                    c.writes += 1;
                    c.bytes_written += bytes;
                }
                Op::Flush => c.flushes += 1,
                Op::Discard => c.discards += 1,
                Op::WriteZeroes => c.write_zeroes += 1,
            }
        }
        let ns = u64::try_from(self.now.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX);
        self.local.for_op(op).saturating_record(ns.max(1));
        self.pending += 1;
    }

    pub fn count_bad_request(&mut self) {
        self.c.bad_requests += 1;
    }

    /// Batch protocol: a FETCH_IO_CMDS completion delivered `requests` tags (one that
    /// delivered none is not counted).
    pub fn record_fetch(&mut self, requests: usize) {
        if requests > 0 {
            self.c.fetch.add(requests as u64);
        }
    }

    /// Batch protocol: a COMMIT_IO_CMDS carrying `elements` was queued for submission.
    pub fn record_commit(&mut self, elements: u16) {
        self.c.commit.add(u64::from(elements));
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
        let c = &self.c;
        for (a, v) in [
            (&shared.reads, c.reads),
            (&shared.writes, c.writes),
            (&shared.flushes, c.flushes),
            (&shared.discards, c.discards),
            (&shared.write_zeroes, c.write_zeroes),
            (&shared.bytes_read, c.bytes_read),
            (&shared.bytes_written, c.bytes_written),
            (&shared.errors, c.errors),
            (&shared.bad_requests, c.bad_requests),
            (&shared.passes, c.passes),
            (&shared.cqes, c.cqes),
            (&shared.sqes, c.sqes),
            (&shared.inflight, c.inflight),
            (&shared.inflight_max, c.inflight_max),
            (&shared.fetch_cqes, c.fetch.count),
            (&shared.fetched, c.fetch.total),
            (&shared.fetched_max, c.fetch.max),
            (&shared.commits, c.commit.count),
            (&shared.committed, c.commit.total),
            (&shared.committed_max, c.commit.max),
        ] {
            a.store(v, Relaxed);
        }
        if self.pending > 0
            && let Ok(mut l) = shared.latency.lock()
        {
            l.add(&self.local);
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
}

impl LatencySummary {
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
        }
    }
}

/// A plain copy of [`QueueStats`], with latency summaries.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub bad_requests: u64,
    pub passes: u64,
    pub cqes: u64,
    pub sqes: u64,
    pub inflight: u64,
    pub inflight_max: u64,
    /// Batch protocol queues only (absent from the JSON of per-tag queues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSnapshot>,
    pub read_latency: LatencySummary,
    pub write_latency: LatencySummary,
    pub other_latency: LatencySummary,
}

impl QueueStats {
    /// Statistics of a queue; `batch`: it uses the batch protocol.
    pub fn new(batch: bool) -> Self {
        Self { batch: AtomicBool::new(batch), ..Self::default() }
    }

    fn batch_snapshot(&self) -> Option<BatchSnapshot> {
        if !self.batch.load(Relaxed) {
            return None;
        }
        let counter = |count: &AtomicU64, total: &AtomicU64, max: &AtomicU64| SizeCounter {
            count: count.load(Relaxed),
            total: total.load(Relaxed),
            max: max.load(Relaxed),
        };
        Some(BatchSnapshot {
            requests_per_fetch: counter(&self.fetch_cqes, &self.fetched, &self.fetched_max).summary(),
            elements_per_commit: counter(&self.commits, &self.committed, &self.committed_max).summary(),
        })
    }

    /// A copy of the published latency histograms (taken under the lock, which the queue
    /// thread also takes to publish: the summaries are computed from the copy).
    fn latency(&self) -> Latency {
        self.latency.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.snapshot_with(&self.latency())
    }

    fn snapshot_with(&self, lat: &Latency) -> StatsSnapshot {
        StatsSnapshot {
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bad_requests: self.bad_requests.load(Relaxed),
            passes: self.passes.load(Relaxed),
            cqes: self.cqes.load(Relaxed),
            sqes: self.sqes.load(Relaxed),
            inflight: self.inflight.load(Relaxed),
            inflight_max: self.inflight_max.load(Relaxed),
            batch: self.batch_snapshot(),
            read_latency: LatencySummary::of(&lat.read),
            write_latency: LatencySummary::of(&lat.write),
            other_latency: LatencySummary::of(&lat.other),
        }
    }

    /// The counters and histograms of several queues together.
    pub fn total(queues: &[&QueueStats]) -> StatsSnapshot {
        Self::sample(queues).0
    }

    /// Every queue's snapshot and their total, each queue's histograms copied once.
    pub fn sample(queues: &[&QueueStats]) -> (StatsSnapshot, Vec<StatsSnapshot>) {
        let mut lat = Latency::default();
        let mut t = StatsSnapshot::default();
        let mut each = Vec::with_capacity(queues.len());
        for q in queues {
            let l = q.latency();
            lat.add(&l);
            let s = q.snapshot_with(&l);
            t.reads += s.reads;
            t.writes += s.writes;
            t.flushes += s.flushes;
            t.discards += s.discards;
            t.write_zeroes += s.write_zeroes;
            t.bytes_read += s.bytes_read;
            t.bytes_written += s.bytes_written;
            t.errors += s.errors;
            t.bad_requests += s.bad_requests;
            t.passes += s.passes;
            t.cqes += s.cqes;
            t.sqes += s.sqes;
            t.inflight += s.inflight;
            t.inflight_max += s.inflight_max;
            if let Some(b) = &s.batch {
                t.batch.get_or_insert_default().merge(b);
            }
            each.push(s);
        }
        t.read_latency = LatencySummary::of(&lat.read);
        t.write_latency = LatencySummary::of(&lat.write);
        t.other_latency = LatencySummary::of(&lat.other);
        (t, each)
    }
}

impl StatsSnapshot {
    /// Requests completed (any op, successful).
    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes
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

#[cfg(test)]
mod tests {
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
        assert_eq!(s.snapshot().reads, 0);
        r.maybe_flush(&s, true);
        let snap = s.snapshot();
        assert_eq!((snap.reads, snap.bytes_read, snap.writes, snap.bytes_written), (1, 4096, 1, 512));
        assert_eq!((snap.errors, snap.flushes, snap.ops()), (1, 1, 3));
        assert_eq!((snap.read_latency.count, snap.write_latency.count, snap.other_latency.count), (1, 2, 1));
        assert!(snap.read_latency.p50_us >= 50.0, "{:?}", snap.read_latency);
        assert_eq!((snap.inflight, snap.inflight_max), (1, 2));
        assert_eq!(snap.sqes_per_submit(), 3.0);
        let total = QueueStats::total(&[&s, &s]);
        assert_eq!((total.reads, total.read_latency.count, total.passes), (2, 2, 4));
        // A second flush publishes totals, not deltas, and does not double the histograms.
        r.record(Op::Read, 4096, t0);
        r.maybe_flush(&s, true);
        let snap = s.snapshot();
        assert_eq!((snap.reads, snap.read_latency.count), (2, 2));
        // A per-tag queue has no batch statistics.
        assert_eq!((snap.batch, total.batch), (None, None));
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
        assert_eq!(idle.snapshot().batch, Some(BatchSnapshot::default()));
        // A fetch completion with no tags (the end of a multishot fetch) is not counted.
        let q = batch_queue(&[3, 0, 1, 8], &[2, 6]);
        let b = q.snapshot().batch.unwrap();
        assert_eq!(b.requests_per_fetch, SizeSummary { count: 3, total: 12, mean: 4.0, max: 8 });
        assert_eq!(b.elements_per_commit, SizeSummary { count: 2, total: 8, mean: 4.0, max: 6 });
        // Nothing is published before a flush.
        let s = QueueStats::new(true);
        let mut r = Recorder::default();
        r.record_fetch(5);
        r.record_commit(5);
        assert_eq!(s.snapshot().batch, Some(BatchSnapshot::default()));
        r.record_pass(1, 1, 0);
        r.maybe_flush(&s, true);
        assert_eq!(s.snapshot().batch.unwrap().requests_per_fetch.count, 1);
    }

    #[test]
    fn batch_totals_across_queues() {
        let a = batch_queue(&[1, 1, 1, 1], &[4]);
        let b = batch_queue(&[16, 32], &[32, 16]);
        let t = QueueStats::total(&[&a, &b]).batch.unwrap();
        // Means over all events (weighted), not the mean of the queues' means.
        assert_eq!(t.requests_per_fetch, SizeSummary { count: 6, total: 52, mean: 52.0 / 6.0, max: 32 });
        assert_eq!(t.elements_per_commit, SizeSummary { count: 3, total: 52, mean: 52.0 / 3.0, max: 32 });
        // An idle queue adds nothing; the total of idle queues is present and zero.
        let idle = QueueStats::new(true);
        assert_eq!(QueueStats::total(&[&a, &idle, &b]).batch, Some(t));
        assert_eq!(QueueStats::total(&[&idle]).batch, Some(BatchSnapshot::default()));
        // Per-tag queues contribute nothing to it.
        let per_tag = QueueStats::new(false);
        assert_eq!(QueueStats::total(&[&per_tag, &a]).batch, QueueStats::total(&[&a]).batch);
        assert_eq!(QueueStats::total(&[&per_tag]).batch, None);
        assert_eq!(QueueStats::total(&[]).batch, None);
        // Merging snapshots agrees with merging counters.
        let mut m = a.snapshot().batch.unwrap();
        m.merge(&b.snapshot().batch.unwrap());
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
        assert_eq!(old.batch, None);
    }
}
