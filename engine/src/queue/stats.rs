//! Per-queue counters, written by the queue thread and read by anyone.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::target::Op;

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
    pub passes: AtomicU64,
    pub cqes: AtomicU64,
    pub submits: AtomicU64,
    pub sqes: AtomicU64,
}

/// A plain copy of [`QueueStats`].
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
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
    pub submits: u64,
    pub sqes: u64,
}

impl QueueStats {
    pub fn record(&self, op: Op, res: i32) {
        if res < 0 {
            self.errors.fetch_add(1, Relaxed);
            return;
        }
        let bytes = u64::from(res.cast_unsigned());
        match op {
            Op::Read => {
                self.reads.fetch_add(1, Relaxed);
                self.bytes_read.fetch_add(bytes, Relaxed);
            }
            Op::Write => {
                self.writes.fetch_add(1, Relaxed);
                self.bytes_written.fetch_add(bytes, Relaxed);
            }
            Op::Flush => _ = self.flushes.fetch_add(1, Relaxed),
            Op::Discard => _ = self.discards.fetch_add(1, Relaxed),
            Op::WriteZeroes => _ = self.write_zeroes.fetch_add(1, Relaxed),
        }
    }

    pub fn count_bad_request(&self) {
        self.bad_requests.fetch_add(1, Relaxed);
    }

    pub fn record_pass(&self, cqes: u64) {
        self.passes.fetch_add(1, Relaxed);
        self.cqes.fetch_add(cqes, Relaxed);
    }

    pub fn set_submits(&self, submits: u64, sqes: u64) {
        self.submits.store(submits, Relaxed);
        self.sqes.store(sqes, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
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
            submits: self.submits.load(Relaxed),
            sqes: self.sqes.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    pub fn add(&mut self, o: &StatsSnapshot) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.write_zeroes += o.write_zeroes;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.errors += o.errors;
        self.bad_requests += o.bad_requests;
        self.passes += o.passes;
        self.cqes += o.cqes;
        self.submits += o.submits;
        self.sqes += o.sqes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_op() {
        let s = QueueStats::default();
        s.record(Op::Read, 4096);
        s.record(Op::Write, 512);
        s.record(Op::Write, -5);
        s.record(Op::Flush, 0);
        let snap = s.snapshot();
        assert_eq!((snap.reads, snap.bytes_read, snap.writes, snap.bytes_written), (1, 4096, 1, 512));
        assert_eq!((snap.errors, snap.flushes), (1, 1));
        let mut total = StatsSnapshot::default();
        total.add(&snap);
        total.add(&snap);
        assert_eq!(total.bytes_read, 8192);
    }
}
