//! `null`: completes every request at once without touching data (like null_blk).

use std::io;

use crate::TargetSpec;
use ubd_engine::{Disposition, IoCtx, IoRequest, Op, QueueSetup, QueueTarget, Target, TargetInfo};

#[derive(Debug)]
pub struct NullTarget {
    info: TargetInfo,
}

impl NullTarget {
    pub fn new(size: u64, logical_block_size: u32) -> Self {
        Self {
            info: TargetInfo {
                dev_size: size,
                logical_block_size,
                physical_block_size: logical_block_size,
                read_only: false,
                rotational: false,
                volatile_cache: false,
                discard: None,
                zoned: None,
            },
        }
    }

    /// What re-opens this target: the same size and block size.
    pub fn spec(&self) -> TargetSpec {
        TargetSpec::Null { size: self.info.dev_size, logical_block_size: self.info.logical_block_size }
    }
}

impl Target for NullTarget {
    fn name(&self) -> &'static str {
        "null"
    }
    fn info(&self) -> &TargetInfo {
        &self.info
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "size": self.info.dev_size, "logical_block_size": self.info.logical_block_size })
    }
    fn open_queue(&self, _setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        Ok(Box::new(NullQueue))
    }
    /// Like null_blk: the data is never looked at, so the kernel need not move it.
    fn moves_data(&self) -> bool {
        false
    }
}

struct NullQueue;

impl QueueTarget for NullQueue {
    fn submit(&mut self, req: &IoRequest, _io: &mut IoCtx<'_>) -> Disposition {
        Disposition::Done(null_result(req))
    }
    fn complete(&mut self, _req: &IoRequest, _cookie: u16, _res: i32, _io: &mut IoCtx<'_>) -> Disposition {
        // The null target pushes no SQEs, so nothing completes.
        Disposition::Done(-libc::EIO)
    }
}

/// Reads and writes "transfer" their full length; everything else succeeds with 0.
fn null_result(req: &IoRequest) -> i32 {
    match req.op {
        Op::Read | Op::Write => i32::try_from(req.len).unwrap_or(-libc::EIO),
        Op::Flush | Op::Discard | Op::WriteZeroes => 0,
        // Zone operations: a null device is not zoned.
        _ => -libc::EOPNOTSUPP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results() {
        let r = |op, len| null_result(&IoRequest { tag: 0, op, flags: 0, offset: 0, len });
        assert_eq!(r(Op::Read, 4096), 4096);
        assert_eq!(r(Op::Write, 512), 512);
        assert_eq!(r(Op::Flush, 0), 0);
        assert_eq!(r(Op::Discard, 1 << 40), 0);
        let t = NullTarget::new(1 << 30, 512);
        assert_eq!(t.info().dev_size, 1 << 30);
        assert_eq!(t.describe()["size"], 1 << 30);
        assert!(!t.moves_data());
    }
}
