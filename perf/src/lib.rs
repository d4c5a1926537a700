//! ubd-engine performance toolkit (fio comparison, regression runs, tuning sweeps).
//! Under construction: see perf/README.md.
#![forbid(unsafe_code)]
