//! Device-level statistics sampled from the queues' counters.

use std::sync::Arc;
use std::time::Instant;

use crate::queue::stats::{Counters, QueueStats, StatsSnapshot};

/// Live statistics of a device: per queue and in total, with rates over the last tick.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    pub dev_id: u32,
    pub uptime_s: f64,
    /// Requests per second over the last interval (all ops).
    pub iops: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub total: StatsSnapshot,
    pub queues: Vec<StatsSnapshot>,
}

/// Computes [`DeviceStats`] at intervals.
pub(crate) struct StatsClock {
    dev_id: u32,
    start: Instant,
    last: Instant,
    last_total: Counters,
}

impl StatsClock {
    pub(crate) fn new(dev_id: u32) -> Self {
        Self { dev_id, start: Instant::now(), last: Instant::now(), last_total: Counters::default() }
    }

    /// Rates since the previous sample (`since_start`: since the start).
    pub(crate) fn sample(&mut self, queues: &[Arc<QueueStats>], since_start: bool) -> DeviceStats {
        let refs: Vec<&QueueStats> = queues.iter().map(|q| &**q).collect();
        let (total, each) = QueueStats::sample(&refs);
        let now = Instant::now();
        if since_start {
            self.last = self.start;
            self.last_total = Counters::default();
        }
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let (c, last) = (total.counters, self.last_total);
        let s = DeviceStats {
            dev_id: self.dev_id,
            uptime_s: now.duration_since(self.start).as_secs_f64(),
            iops: rate(c.ops(), last.ops()),
            read_bytes_per_s: rate(c.bytes_read, last.bytes_read),
            write_bytes_per_s: rate(c.bytes_written, last.bytes_written),
            queues: each,
            total,
        };
        self.last = now;
        self.last_total = c;
        s
    }
}
