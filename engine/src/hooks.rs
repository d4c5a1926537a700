//! Test hooks, compiled only with the `test-hooks` cargo feature (the e2e suite's
//! build turns it on; `cargo build --release` leaves it off, and then these are no-ops
//! that read no environment).
//!
//! - `UBD_DEBUG_PAUSE=before-start|before-end-recovery`: the daemon stops itself
//!   (SIGSTOP) at that point, so that a test can kill it there.
//! - `UBD_DEBUG_QUEUE_PANIC=N`: queue 0's thread (not its target) panics at its N-th
//!   request, to test what a dying queue thread leaves behind.

/// Stops the process at `point` if `UBD_DEBUG_PAUSE` names it (test builds only).
/// Points: `before-start` (queues ready, START_DEV not sent), `before-end-recovery`
/// (START_USER_RECOVERY done, queues ready, END_USER_RECOVERY not sent).
pub(crate) fn pause(point: &str) {
    #[cfg(feature = "test-hooks")]
    if std::env::var("UBD_DEBUG_PAUSE").is_ok_and(|p| p == point) {
        tracing::warn!("UBD_DEBUG_PAUSE: stopping at {point}");
        crate::sys::stop_self();
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = point;
}

/// `UBD_DEBUG_QUEUE_PANIC=N` for queue `q_id`: zero-sized, and [`tick`](Self::tick)
/// does nothing, without the `test-hooks` feature.
#[derive(Debug, Default)]
pub(crate) struct QueuePanic {
    #[cfg(feature = "test-hooks")]
    left: Option<u64>,
}

impl QueuePanic {
    pub(crate) fn new(q_id: u16) -> Self {
        #[cfg(feature = "test-hooks")]
        {
            let left =
                if q_id == 0 { std::env::var("UBD_DEBUG_QUEUE_PANIC").ok().and_then(|v| v.parse().ok()) } else { None };
            Self { left }
        }
        #[cfg(not(feature = "test-hooks"))]
        {
            let _ = q_id;
            Self {}
        }
    }

    /// A request arrived on queue `q_id`: panics (the queue thread itself) at the N-th.
    #[inline]
    pub(crate) fn tick(&mut self, q_id: u16) {
        #[cfg(feature = "test-hooks")]
        if let Some(n) = self.left.as_mut() {
            *n = n.saturating_sub(1);
            assert!(*n > 0, "UBD_DEBUG_QUEUE_PANIC: queue thread {q_id} dies as asked");
        }
        #[cfg(not(feature = "test-hooks"))]
        let _ = q_id;
    }
}
