//! `fault`: a wrapper around any target that injects faults, so that error paths,
//! slow backends and stuck queues can be tested without device-mapper.
//!
//! The spec is a comma-separated list (see [`FaultSpec::parse`]):
//!
//! | key | effect |
//! |---|---|
//! | `delay=DUR` | every request waits DUR (e.g. `5ms`) before it reaches the target |
//! | `fail=PCT` | a random PCT% of requests (e.g. `2%`, `0.5`) fail without reaching the target |
//! | `range=OFF:LEN` | every request overlapping bytes OFF..OFF+LEN fails (K/M/G suffixes) |
//! | `ops=read\|write\|all` | which requests `fail` and `range` apply to (default all) |
//! | `errno=NAME\|N` | the error failed requests get (default EIO; ENOSPC, ENODATA, EPERM, ...) |
//! | `stall=AFTER:DUR` | queue 0 stops after AFTER requests: everything arriving in the next DUR waits until it ends (`inf`: until the device is stopped) |
//! | `panic=N` | queue 0's thread panics at its N-th request (exercises the abort path) |
//! | `seed=N` | seed of the random choices (default 1) |

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ubd_engine::{Disposition, IoCtx, IoRequest, Op, QueueSetup, QueueTarget, Target, TargetInfo};

/// The cookie of the fault layer's own timers (targets use small cookies).
const TIMER: u16 = u16::MAX;

/// A stall that lasts until the device is stopped is a timer this long.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which requests the failure rules apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOps {
    All,
    Read,
    Write,
}

/// What to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub delay: Option<Duration>,
    /// Failure probability, in parts per million.
    pub fail_ppm: u32,
    /// Byte range whose requests fail: (offset, length).
    pub range: Option<(u64, u64)>,
    pub ops: FaultOps,
    /// Positive errno given to failed requests.
    pub errno: i32,
    /// Queue 0 stalls after this many requests, for this long (None: until stopped).
    pub stall: Option<(u64, Option<Duration>)>,
    /// Queue 0 panics at this request.
    pub panic_at: Option<u64>,
    pub seed: u64,
    /// The text it was parsed from.
    pub text: String,
}

impl Default for FaultSpec {
    fn default() -> Self {
        Self {
            delay: None,
            fail_ppm: 0,
            range: None,
            ops: FaultOps::All,
            errno: libc::EIO,
            stall: None,
            panic_at: None,
            seed: 1,
            text: String::new(),
        }
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 500us, 5ms, 2s)"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" | "" => v,
        _ => return Err(format!("bad duration unit in {s:?} (us, ms or s)")),
    };
    if !(0.0..=1e6).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad byte count {s:?} (e.g. 4096, 64K, 1M)"))
}

fn parse_errno(s: &str) -> Result<i32, String> {
    let known = [
        ("EIO", libc::EIO),
        ("ENOSPC", libc::ENOSPC),
        ("ENODATA", libc::ENODATA),
        ("EPERM", libc::EPERM),
        ("ENOLINK", libc::ENOLINK),
        ("EILSEQ", libc::EILSEQ),
        ("ETIMEDOUT", libc::ETIMEDOUT),
        ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ];
    if let Some(&(_, e)) = known.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
        return Ok(e);
    }
    match s.parse::<i32>() {
        Ok(n) if (1..4096).contains(&n) => Ok(n),
        _ => Err(format!("unknown errno {s:?} (EIO, ENOSPC, ENODATA, ... or a number)")),
    }
}

impl FaultSpec {
    /// Parses `key=value,...` (the keys are in the module docs).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut spec = FaultSpec { text: text.to_string(), ..Default::default() };
        if text.trim().is_empty() {
            return Err("empty fault spec".into());
        }
        for item in text.split(',') {
            let (key, val) = item.split_once('=').ok_or_else(|| format!("{item:?} is not key=value"))?;
            match key {
                "delay" => spec.delay = Some(parse_duration(val)?),
                "fail" => {
                    let v: f64 = val
                        .trim_end_matches('%')
                        .parse()
                        .map_err(|_| format!("bad failure rate {val:?} (a percentage, e.g. 2%)"))?;
                    if !(0.0..=100.0).contains(&v) {
                        return Err(format!("failure rate {val:?} must be from 0 to 100%"));
                    }
                    spec.fail_ppm = (v * 10_000.0).round() as u32;
                }
                "range" => {
                    let (off, len) =
                        val.split_once(':').ok_or_else(|| format!("range {val:?} is not OFFSET:LENGTH"))?;
                    let (off, len) = (parse_bytes(off)?, parse_bytes(len)?);
                    if len == 0 || off.checked_add(len).is_none() {
                        return Err(format!("range {val:?} is empty or overflows"));
                    }
                    spec.range = Some((off, len));
                }
                "ops" => {
                    spec.ops = match val {
                        "all" => FaultOps::All,
                        "read" => FaultOps::Read,
                        "write" => FaultOps::Write,
                        _ => return Err(format!("ops {val:?} must be read, write or all")),
                    }
                }
                "errno" => spec.errno = parse_errno(val)?,
                "stall" => {
                    let (after, dur) =
                        val.split_once(':').ok_or_else(|| format!("stall {val:?} is not AFTER:DURATION"))?;
                    let after = after.parse().map_err(|_| format!("bad request count {after:?} in stall"))?;
                    let dur = if dur == "inf" { None } else { Some(parse_duration(dur)?) };
                    spec.stall = Some((after, dur));
                }
                "panic" => {
                    spec.panic_at = Some(val.parse().map_err(|_| format!("bad request count {val:?} in panic"))?)
                }
                "seed" => spec.seed = val.parse().map_err(|_| format!("bad seed {val:?}"))?,
                _ => {
                    return Err(format!(
                        "unknown fault key {key:?} (delay, fail, range, ops, errno, stall, panic, seed)"
                    ));
                }
            }
        }
        Ok(spec)
    }

    fn applies_to(&self, op: Op) -> bool {
        match self.ops {
            FaultOps::All => true,
            FaultOps::Read => op == Op::Read,
            FaultOps::Write => matches!(op, Op::Write | Op::WriteZeroes | Op::Discard),
        }
    }

    fn in_range(&self, req: &IoRequest) -> bool {
        match self.range {
            Some((off, len)) if req.op != Op::Flush => req.offset < off + len && off < req.offset + req.len,
            _ => false,
        }
    }
}

/// Wraps `inner`, injecting the faults of `spec`.
#[derive(Debug)]
pub struct FaultTarget {
    inner: Arc<dyn Target>,
    spec: Arc<FaultSpec>,
}

impl FaultTarget {
    pub fn new(inner: Arc<dyn Target>, spec: FaultSpec) -> Self {
        tracing::warn!("fault injection on: {spec}");
        Self { inner, spec: Arc::new(spec) }
    }
}

impl Target for FaultTarget {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn info(&self) -> &TargetInfo {
        self.inner.info()
    }
    /// Faults never touch data: as the wrapped target.
    fn moves_data(&self) -> bool {
        self.inner.moves_data()
    }
    fn supports_zero_copy(&self) -> bool {
        self.inner.supports_zero_copy()
    }
    fn describe(&self) -> serde_json::Value {
        let mut d = self.inner.describe();
        if let Some(obj) = d.as_object_mut() {
            obj.insert("fault".into(), self.spec.text.clone().into());
        }
        d
    }
    fn open_queue(&self, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        let q_id = setup.q_id();
        let inner = self.inner.open_queue(setup)?;
        Ok(Box::new(FaultQueue {
            inner,
            spec: Arc::clone(&self.spec),
            q_id,
            rng: self.spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (u64::from(q_id) + 1),
            count: 0,
            stall_until: None,
            counts: Counts::default(),
        }))
    }
}

#[derive(Debug, Default)]
struct Counts {
    failed: u64,
    delayed: u64,
    stalled: u64,
}

struct FaultQueue {
    inner: Box<dyn QueueTarget>,
    spec: Arc<FaultSpec>,
    q_id: u16,
    rng: u64,
    /// Requests seen on this queue.
    count: u64,
    /// Queue 0 during a stall: when it ends.
    stall_until: Option<Instant>,
    counts: Counts,
}

impl Drop for FaultQueue {
    fn drop(&mut self) {
        let c = &self.counts;
        tracing::info!(
            q_id = self.q_id,
            "fault injection: {} requests, {} failed, {} delayed, {} stalled",
            self.count,
            c.failed,
            c.delayed,
            c.stalled
        );
    }
}

impl FaultQueue {
    /// xorshift64*: cheap, deterministic for a seed.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn should_fail(&mut self, req: &IoRequest) -> bool {
        if !self.spec.applies_to(req.op) {
            return false;
        }
        if self.spec.in_range(req) {
            return true;
        }
        self.spec.fail_ppm > 0 && (self.next_random() % 1_000_000) < u64::from(self.spec.fail_ppm)
    }
}

impl QueueTarget for FaultQueue {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        self.count += 1;
        if self.q_id == 0 && self.spec.panic_at == Some(self.count) {
            panic!("fault injection: queue 0 panics at request {} (--fault panic)", self.count);
        }
        if self.should_fail(req) {
            self.counts.failed += 1;
            return Disposition::Done(-self.spec.errno);
        }
        if self.q_id == 0
            && let Some((after, dur)) = self.spec.stall
        {
            if self.count == after + 1 {
                tracing::warn!(
                    "fault injection: queue 0 stalls for {}",
                    dur.map_or("ever".into(), |d| format!("{d:?}"))
                );
                self.stall_until = Some(Instant::now() + dur.unwrap_or(FOREVER));
            }
            if let Some(until) = self.stall_until {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.stall_until = None;
                } else {
                    self.counts.stalled += 1;
                    return match io.sleep(left, TIMER) {
                        Ok(()) => Disposition::Pending,
                        Err(e) => Disposition::Done(e),
                    };
                }
            }
        }
        if let Some(d) = self.spec.delay {
            self.counts.delayed += 1;
            return match io.sleep(d, TIMER) {
                Ok(()) => Disposition::Pending,
                Err(e) => Disposition::Done(e),
            };
        }
        self.inner.submit(req, io)
    }

    // The queue's own hooks pass through: faults apply to requests.
    fn start(&mut self, io: &mut IoCtx<'_>) -> Result<(), i32> {
        self.inner.start(io)
    }
    fn queue_complete(&mut self, cookie: u16, res: i32, io: &mut IoCtx<'_>) {
        self.inner.queue_complete(cookie, res, io);
    }
    fn woken(&mut self, io: &mut IoCtx<'_>) {
        self.inner.woken(io);
    }
    fn stop(&mut self, io: &mut IoCtx<'_>) {
        self.inner.stop(io);
    }

    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition {
        if cookie != TIMER {
            return self.inner.complete(req, cookie, res, io);
        }
        match res {
            // The timer ran out: the request goes on to the target.
            r if r == -libc::ETIME || r >= 0 => self.inner.submit(req, io),
            // Cancelled (the queue is going away) or failed: the request fails.
            _ => Disposition::Done(-libc::EIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = FaultSpec::parse("delay=5ms,fail=2.5%,ops=read,errno=ENOSPC,stall=100:3s,panic=7,seed=9").unwrap();
        assert_eq!(s.delay, Some(Duration::from_millis(5)));
        assert_eq!(s.fail_ppm, 25_000);
        assert_eq!(s.ops, FaultOps::Read);
        assert_eq!(s.errno, libc::ENOSPC);
        assert_eq!(s.stall, Some((100, Some(Duration::from_secs(3)))));
        assert_eq!((s.panic_at, s.seed), (Some(7), 9));
        let s = FaultSpec::parse("range=1M:64K,stall=0:inf,errno=5").unwrap();
        assert_eq!(s.range, Some((1 << 20, 64 << 10)));
        assert_eq!(s.stall, Some((0, None)));
        assert_eq!(s.errno, libc::EIO);
        assert_eq!(FaultSpec::parse("delay=250us").unwrap().delay, Some(Duration::from_micros(250)));
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "delay",
            "delay=5x",
            "fail=101%",
            "fail=-1",
            "fail=abc",
            "range=1M",
            "range=0:0",
            "ops=rw",
            "errno=EWHAT",
            "errno=0",
            "stall=10",
            "stall=x:1s",
            "panic=-1",
            "bogus=1",
            "delay=5ms,,",
        ] {
            assert!(FaultSpec::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ranges_and_ops() {
        let s = FaultSpec::parse("range=4096:4096,ops=write").unwrap();
        let req = |op, offset, len| IoRequest { tag: 0, op, flags: 0, offset, len };
        assert!(s.in_range(&req(Op::Write, 4096, 512)));
        assert!(s.in_range(&req(Op::Write, 0, 4097)));
        assert!(!s.in_range(&req(Op::Write, 0, 4096)));
        assert!(!s.in_range(&req(Op::Write, 8192, 4096)));
        assert!(!s.in_range(&req(Op::Flush, 0, 0)));
        assert!(s.applies_to(Op::Write) && s.applies_to(Op::Discard) && !s.applies_to(Op::Read));
    }

    #[test]
    fn failure_rate_is_close_to_the_spec() {
        let spec = Arc::new(FaultSpec::parse("fail=10%").unwrap());
        let mut q = FaultQueue {
            inner: Box::new(Never),
            spec,
            q_id: 1,
            rng: 42,
            count: 0,
            stall_until: None,
            counts: Counts::default(),
        };
        let req = IoRequest { tag: 0, op: Op::Read, flags: 0, offset: 0, len: 4096 };
        let n = (0..100_000).filter(|_| q.should_fail(&req)).count();
        assert!((9_000..11_000).contains(&n), "{n} of 100000 failed, want about 10%");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "[a-z=,:%0-9.]{0,40}") {
            let _ = FaultSpec::parse(&text);
        }

        #[test]
        fn parses_generated_specs(ms in 0u64..10_000, pct in 0u32..=100, off in 0u64..1 << 30, len in 1u64..1 << 20,
                                  after in 0u64..1_000_000, seed: u64) {
            let text = format!("delay={ms}ms,fail={pct}%,range={off}:{len},stall={after}:inf,seed={seed}");
            let s = FaultSpec::parse(&text).unwrap();
            proptest::prop_assert_eq!(s.delay, Some(Duration::from_millis(ms)));
            proptest::prop_assert_eq!(s.fail_ppm, pct * 10_000);
            proptest::prop_assert_eq!(s.range, Some((off, len)));
            proptest::prop_assert_eq!(s.stall, Some((after, None)));
            proptest::prop_assert_eq!(s.seed, seed);
        }
    }

    struct Never;
    impl QueueTarget for Never {
        fn submit(&mut self, _: &IoRequest, _: &mut IoCtx<'_>) -> Disposition {
            Disposition::Done(0)
        }
        fn complete(&mut self, _: &IoRequest, _: u16, _: i32, _: &mut IoCtx<'_>) -> Disposition {
            Disposition::Done(0)
        }
    }
}
