//! Targets for ubd-engine: `loop` (a file or block device), `null`, and the `fault`
//! injection wrapper; [`TargetSpec`], what a served target is re-opened from.
#![forbid(unsafe_code)]

pub mod fault;
pub mod loop_target;
pub mod nbd;
pub mod null;
pub mod rbd;
pub mod sockram;
pub mod spec;
pub mod zoned;

pub use fault::{FaultSpec, FaultTarget};
pub use loop_target::{DirectIo, LoopOptions, LoopTarget};
pub use nbd::{NbdOptions, NbdTarget};
pub use null::NullTarget;
pub use rbd::{RbdOptions, RbdTarget};
pub use sockram::SockRamTarget;
pub use spec::TargetSpec;
pub use zoned::{ZonedOptions, ZonedTarget};
