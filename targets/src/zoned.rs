//! `zoned`: a host-managed zoned device kept in memory (UBLK_F_ZONED), as the kernel's
//! null_blk zoned mode and rublk's zoned target are: sequential-write-required zones
//! with write pointers, zone append, open/close/finish/reset, REPORT ZONES, open and
//! active zone limits, and optional conventional zones at the start.
//!
//! One lock guards the zones and their data: every queue serializes on it. The target
//! is for testing zoned software (filesystems, fio `zonemode=zbd`), not for speed; a
//! zone holds memory only up to its write pointer, and a reset frees it.

use std::io;
use std::sync::{Arc, Mutex};

use crate::TargetSpec;
use ubd_engine::{Disposition, IoCtx, IoRequest, Op, QueueSetup, QueueTarget, Target, TargetInfo, ZonedInfo};

/// The geometry of a zoned device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZonedOptions {
    /// Device size in bytes: a multiple of `zone_size`.
    pub size: u64,
    /// Zone size in bytes: a power of two, at least 64 KiB.
    pub zone_size: u64,
    /// Conventional (randomly writable) zones at the start of the device.
    pub conventional: u32,
    /// Zones that may be open at once (0: no limit).
    pub max_open: u32,
    /// Zones that may be open or closed at once (0: no limit).
    pub max_active: u32,
    /// The logical block size.
    pub block_size: u32,
}

/// A zone's condition (`enum blk_zone_cond`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cond {
    NotWp = 0,
    Empty = 1,
    ImpOpen = 2,
    ExpOpen = 3,
    Closed = 4,
    Full = 0xe,
}

#[derive(Debug)]
struct Zone {
    cond: Cond,
    /// Write pointer, bytes from the zone's start (sequential zones).
    wp: u64,
    /// The data written, up to the write pointer (or the furthest write of a
    /// conventional zone); reads past it return zeroes.
    data: Vec<u8>,
}

#[derive(Debug)]
struct Zones {
    zone_size: u64,
    max_open: u32,
    max_active: u32,
    zones: Vec<Zone>,
}

/// Errors as the block layer reports them for zoned devices.
const E_IO: i32 = -libc::EIO;
/// BLK_STS_ZONE_OPEN_RESOURCE.
const E_OPEN: i32 = -libc::ETOOMANYREFS;
/// BLK_STS_ZONE_ACTIVE_RESOURCE.
const E_ACTIVE: i32 = -libc::EOVERFLOW;

impl Zones {
    fn new(o: &ZonedOptions) -> Self {
        let n = o.size / o.zone_size;
        let zones = (0..n)
            .map(|i| Zone {
                cond: if i < u64::from(o.conventional) { Cond::NotWp } else { Cond::Empty },
                wp: 0,
                data: Vec::new(),
            })
            .collect();
        Zones { zone_size: o.zone_size, max_open: o.max_open, max_active: o.max_active, zones }
    }

    fn open_count(&self) -> u32 {
        self.zones.iter().filter(|z| matches!(z.cond, Cond::ImpOpen | Cond::ExpOpen)).count() as u32
    }

    fn active_count(&self) -> u32 {
        self.zones.iter().filter(|z| matches!(z.cond, Cond::ImpOpen | Cond::ExpOpen | Cond::Closed)).count() as u32
    }

    /// The zone that holds byte `offset`, if any.
    fn index(&self, offset: u64) -> Option<usize> {
        let i = usize::try_from(offset / self.zone_size).ok()?;
        (i < self.zones.len()).then_some(i)
    }

    /// Makes room to open zone `i` (EMPTY or CLOSED now): the active limit for an empty
    /// zone, then the open limit, closing an implicitly open zone if that frees one
    /// (what a drive does). Errors as the block layer has them.
    fn make_room_to_open(&mut self, i: usize) -> Result<(), i32> {
        if self.zones[i].cond == Cond::Empty && self.max_active > 0 && self.active_count() >= self.max_active {
            return Err(E_ACTIVE);
        }
        if self.max_open > 0 && self.open_count() >= self.max_open {
            let victim = self.zones.iter().position(|z| z.cond == Cond::ImpOpen).ok_or(E_OPEN)?;
            self.zones[victim].cond = Cond::Closed;
        }
        Ok(())
    }

    /// A write of `data` at byte `offset` (a zone append: at the write pointer of the
    /// zone starting there). Returns the byte offset written at.
    fn write(&mut self, offset: u64, data: &[u8], append: bool) -> Result<u64, i32> {
        let i = self.index(offset).ok_or(E_IO)?;
        let start = i as u64 * self.zone_size;
        let len = data.len() as u64;
        if self.zones[i].cond == Cond::NotWp {
            if append || offset + len > start + self.zone_size {
                return Err(E_IO);
            }
            let z = &mut self.zones[i];
            let at = (offset - start) as usize;
            if z.data.len() < at + data.len() {
                z.data.resize(at + data.len(), 0);
            }
            z.data[at..at + data.len()].copy_from_slice(data);
            return Ok(offset);
        }
        if append && offset != start {
            return Err(E_IO);
        }
        let wp = self.zones[i].wp;
        let at = if append { start + wp } else { offset };
        // Sequential write required: at the write pointer, within the zone, not full.
        if self.zones[i].cond == Cond::Full || at != start + wp || wp + len > self.zone_size {
            return Err(E_IO);
        }
        if matches!(self.zones[i].cond, Cond::Empty | Cond::Closed) {
            self.make_room_to_open(i)?;
            self.zones[i].cond = Cond::ImpOpen;
        }
        let z = &mut self.zones[i];
        z.data.extend_from_slice(data);
        z.wp += len;
        if z.wp == self.zone_size {
            z.cond = Cond::Full;
        }
        Ok(at)
    }

    /// Reads into `buf` from byte `offset` (zeroes past what was written).
    fn read(&self, mut offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let mut done = 0;
        while done < buf.len() {
            let i = self.index(offset).ok_or(E_IO)?;
            let start = i as u64 * self.zone_size;
            let in_zone = (offset - start) as usize;
            let n = (buf.len() - done).min((self.zone_size - (offset - start)) as usize);
            let out = &mut buf[done..done + n];
            let data = &self.zones[i].data;
            let have = data.len().saturating_sub(in_zone).min(n);
            if have > 0 {
                out[..have].copy_from_slice(&data[in_zone..in_zone + have]);
            }
            out[have..].fill(0);
            done += n;
            offset += n as u64;
        }
        Ok(())
    }

    /// A zone management operation on the zone starting at `offset`.
    fn manage(&mut self, op: Op, offset: u64) -> Result<(), i32> {
        if op == Op::ZoneResetAll {
            for z in self.zones.iter_mut().filter(|z| z.cond != Cond::NotWp) {
                *z = Zone { cond: Cond::Empty, wp: 0, data: Vec::new() };
            }
            return Ok(());
        }
        let i = self.index(offset).ok_or(E_IO)?;
        if offset != i as u64 * self.zone_size || self.zones[i].cond == Cond::NotWp {
            return Err(E_IO);
        }
        let cond = self.zones[i].cond;
        match op {
            Op::ZoneOpen => match cond {
                Cond::ExpOpen => {}
                Cond::ImpOpen => self.zones[i].cond = Cond::ExpOpen,
                Cond::Empty | Cond::Closed => {
                    self.make_room_to_open(i)?;
                    self.zones[i].cond = Cond::ExpOpen;
                }
                _ => return Err(E_IO),
            },
            Op::ZoneClose => match cond {
                Cond::Closed => {}
                Cond::ImpOpen | Cond::ExpOpen => {
                    let z = &mut self.zones[i];
                    z.cond = if z.wp == 0 { Cond::Empty } else { Cond::Closed };
                }
                _ => return Err(E_IO),
            },
            Op::ZoneFinish => match cond {
                Cond::Full => {}
                Cond::Empty if self.max_active > 0 && self.active_count() >= self.max_active => return Err(E_ACTIVE),
                _ => {
                    let z = &mut self.zones[i];
                    z.cond = Cond::Full;
                    z.wp = self.zone_size;
                }
            },
            Op::ZoneReset => self.zones[i] = Zone { cond: Cond::Empty, wp: 0, data: Vec::new() },
            _ => return Err(-libc::EOPNOTSUPP),
        }
        Ok(())
    }

    /// REPORT ZONES: `struct blk_zone` for the zones from the one holding `offset` on,
    /// into `buf` (all of it: entries past the last zone are zero, which ends a report).
    fn report(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let first = self.index(offset).ok_or(E_IO)?;
        buf.fill(0);
        let sectors = self.zone_size >> 9;
        for (n, out) in buf.chunks_exact_mut(64).enumerate() {
            let i = first + n;
            let Some(z) = self.zones.get(i) else { break };
            let start = i as u64 * sectors;
            let wp = match z.cond {
                Cond::NotWp | Cond::Full => start + sectors,
                _ => start + (z.wp >> 9),
            };
            out[0..8].copy_from_slice(&start.to_ne_bytes());
            out[8..16].copy_from_slice(&sectors.to_ne_bytes());
            out[16..24].copy_from_slice(&wp.to_ne_bytes());
            // BLK_ZONE_TYPE_CONVENTIONAL 1, BLK_ZONE_TYPE_SEQWRITE_REQ 2.
            out[24] = if z.cond == Cond::NotWp { 1 } else { 2 };
            out[25] = z.cond as u8;
            // capacity: the whole zone.
            out[32..40].copy_from_slice(&sectors.to_ne_bytes());
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct ZonedTarget {
    info: TargetInfo,
    opts: ZonedOptions,
    zones: Arc<Mutex<Zones>>,
}

impl ZonedTarget {
    /// A zoned device of `o`'s geometry, all sequential zones empty. Refuses a geometry
    /// the kernel would not take, in one line.
    pub fn new(o: &ZonedOptions) -> Result<Self, String> {
        let bs = o.block_size;
        if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
            return Err(format!("block size {bs} must be a power of two from 512 to 4096"));
        }
        if !o.zone_size.is_power_of_two() || o.zone_size < 64 << 10 || o.zone_size > 1 << 40 {
            return Err(format!("zone size {} must be a power of two from 64K to 1T", o.zone_size));
        }
        if o.size == 0 || !o.size.is_multiple_of(o.zone_size) {
            return Err(format!("size {} is not a positive multiple of the zone size {}", o.size, o.zone_size));
        }
        let nr = o.size / o.zone_size;
        if u64::from(o.conventional) >= nr {
            return Err(format!(
                "{} conventional zones leave no sequential zone of the {nr} (size / zone size)",
                o.conventional
            ));
        }
        let seq = nr - u64::from(o.conventional);
        for (what, n) in [("--max-open", o.max_open), ("--max-active", o.max_active)] {
            if u64::from(n) > seq {
                return Err(format!("{what} {n} exceeds the {seq} sequential zones"));
            }
        }
        if o.max_active > 0 && o.max_open > o.max_active {
            return Err(format!("--max-open {} exceeds --max-active {}", o.max_open, o.max_active));
        }
        let info = TargetInfo {
            dev_size: o.size,
            logical_block_size: bs,
            physical_block_size: bs,
            read_only: false,
            rotational: false,
            volatile_cache: false,
            discard: None,
            zoned: Some(ZonedInfo {
                zone_size: o.zone_size,
                max_open_zones: o.max_open,
                max_active_zones: o.max_active,
            }),
        };
        Ok(Self { info, opts: *o, zones: Arc::new(Mutex::new(Zones::new(o))) })
    }

    /// What the state file records: the geometry (the data died with the daemon, so
    /// opening it again is refused).
    pub fn spec(&self) -> TargetSpec {
        let o = &self.opts;
        TargetSpec::Zoned {
            size: o.size,
            zone_size: o.zone_size,
            conventional: o.conventional,
            max_open: o.max_open,
            max_active: o.max_active,
            logical_block_size: o.block_size,
        }
    }
}

impl Target for ZonedTarget {
    fn name(&self) -> &'static str {
        "zoned"
    }
    fn info(&self) -> &TargetInfo {
        &self.info
    }
    fn describe(&self) -> serde_json::Value {
        let o = &self.opts;
        serde_json::json!({
            "size": o.size,
            "zone_size": o.zone_size,
            "zones": o.size / o.zone_size,
            "conventional": o.conventional,
            "max_open": o.max_open,
            "max_active": o.max_active,
            "logical_block_size": o.block_size,
            "backing": "memory",
        })
    }
    fn open_queue(&self, _setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        Ok(Box::new(ZonedQueue { zones: Arc::clone(&self.zones) }))
    }
}

struct ZonedQueue {
    zones: Arc<Mutex<Zones>>,
}

impl ZonedQueue {
    fn serve(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Result<i32, i32> {
        let len = u32::try_from(req.len).map_err(|_| E_IO)?;
        // A queue that panicked while holding the lock poisons it: the zones may be
        // half-updated, so every later request fails.
        let mut zones = self.zones.lock().map_err(|_| E_IO)?;
        match req.op {
            Op::Read => {
                zones.read(req.offset, io.request_buf(len)?)?;
                Ok(len as i32)
            }
            Op::Write | Op::ZoneAppend => {
                let append = req.op == Op::ZoneAppend;
                let at = zones.write(req.offset, io.request_buf(len)?, append)?;
                if append {
                    io.zone_appended(req.tag, at >> 9)?;
                }
                Ok(len as i32)
            }
            Op::ReportZones => {
                zones.report(req.offset, io.request_buf(len)?)?;
                Ok(len as i32)
            }
            Op::Flush => Ok(0),
            Op::ZoneOpen | Op::ZoneClose | Op::ZoneFinish | Op::ZoneReset | Op::ZoneResetAll => {
                zones.manage(req.op, req.offset)?;
                Ok(0)
            }
            _ => Err(-libc::EOPNOTSUPP),
        }
    }
}

impl QueueTarget for ZonedQueue {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        Disposition::Done(self.serve(req, io).unwrap_or_else(|e| e))
    }
    fn complete(&mut self, _req: &IoRequest, _cookie: u16, _res: i32, _io: &mut IoCtx<'_>) -> Disposition {
        // Everything is served at once: no SQEs, so nothing completes.
        Disposition::Done(-libc::EIO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Z: u64 = 1 << 20;

    fn zones(conventional: u32, max_open: u32, max_active: u32) -> Zones {
        Zones::new(&ZonedOptions { size: 8 * Z, zone_size: Z, conventional, max_open, max_active, block_size: 4096 })
    }

    #[test]
    fn sequential_writes_at_the_write_pointer_only() {
        let mut z = zones(1, 0, 0);
        // Conventional zone 0: anywhere.
        z.write(8192, &[1; 4096], false).unwrap();
        // Zone 1: at its start, then at the write pointer; anything else fails.
        assert_eq!(z.write(Z + 4096, &[2; 4096], false), Err(E_IO));
        assert_eq!(z.write(Z, &[2; 4096], false), Ok(Z));
        assert_eq!(z.zones[1].cond, Cond::ImpOpen);
        assert_eq!(z.write(Z, &[3; 4096], false), Err(E_IO));
        assert_eq!(z.write(Z + 4096, &[3; 4096], false), Ok(Z + 4096));
        // Append: at the write pointer, named by the zone start.
        assert_eq!(z.write(Z, &[4; 4096], true), Ok(Z + 8192));
        assert_eq!(z.write(Z + 4096, &[4; 4096], true), Err(E_IO));
        let mut b = vec![9u8; 16384];
        z.read(Z, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 2) && b[8192..12288].iter().all(|&x| x == 4));
        assert!(b[12288..].iter().all(|&x| x == 0), "past the write pointer reads zeroes");
        // Wholly past it, and in a zone never written.
        let mut far = vec![9u8; 8192];
        z.read(Z + 65536, &mut far).unwrap();
        z.read(5 * Z + 4096, &mut far[..4096]).unwrap();
        assert!(far.iter().all(|&x| x == 0));
        // Fill the zone: it becomes full and takes nothing more.
        let rest = vec![5u8; (Z - 12288) as usize];
        z.write(Z + 12288, &rest, false).unwrap();
        assert_eq!(z.zones[1].cond, Cond::Full);
        assert_eq!(z.write(Z, &[6; 512], true), Err(E_IO));
        // Reset empties it and frees its memory.
        z.manage(Op::ZoneReset, Z).unwrap();
        assert_eq!((z.zones[1].cond, z.zones[1].wp, z.zones[1].data.capacity()), (Cond::Empty, 0, 0));
        // Management on a conventional zone, or not at a zone start, fails.
        assert_eq!(z.manage(Op::ZoneReset, 0), Err(E_IO));
        assert_eq!(z.manage(Op::ZoneOpen, Z + 512), Err(E_IO));
    }

    #[test]
    fn open_and_active_limits() {
        let mut z = zones(0, 2, 3);
        z.write(0, &[1; 512], false).unwrap();
        z.manage(Op::ZoneOpen, Z).unwrap();
        // Two open: a third implicit open closes the implicitly open zone 0.
        z.write(2 * Z, &[1; 512], false).unwrap();
        assert_eq!((z.zones[0].cond, z.zones[1].cond, z.zones[2].cond), (Cond::Closed, Cond::ExpOpen, Cond::ImpOpen));
        // Three active (closed 0, open 1 and 2): a fourth zone cannot start.
        assert_eq!(z.write(3 * Z, &[1; 512], false), Err(E_ACTIVE));
        // Explicitly open zones are never closed for room: with 1 and 2 explicit, opening
        // the closed zone 0 has no room.
        z.manage(Op::ZoneOpen, 2 * Z).unwrap();
        assert_eq!(z.manage(Op::ZoneOpen, 0), Err(E_OPEN));
        // Finishing one frees both an open and an active slot.
        z.manage(Op::ZoneFinish, Z).unwrap();
        assert_eq!(z.zones[1].cond, Cond::Full);
        z.write(3 * Z, &[1; 512], false).unwrap();
        // Open zones 2 and 3: opening zone 0 closes the implicitly open zone 3.
        z.manage(Op::ZoneOpen, 0).unwrap();
        assert_eq!((z.zones[0].cond, z.zones[3].cond), (Cond::ExpOpen, Cond::Closed));
        z.manage(Op::ZoneResetAll, 0).unwrap();
        assert!(z.zones.iter().all(|zone| zone.cond == Cond::Empty));
        // Closing an open zone with nothing written makes it empty again.
        z.manage(Op::ZoneOpen, 4 * Z).unwrap();
        z.manage(Op::ZoneClose, 4 * Z).unwrap();
        assert_eq!(z.zones[4].cond, Cond::Empty);
        assert_eq!(z.manage(Op::ZoneClose, 4 * Z), Err(E_IO));
    }

    #[test]
    fn reports_zones() {
        let mut z = zones(1, 0, 0);
        z.write(Z, &[1; 8192], false).unwrap();
        z.manage(Op::ZoneFinish, 2 * Z).unwrap();
        // From zone 0, room for 10: 8 zones, then a zero entry.
        let mut b = vec![0xffu8; 640];
        z.report(0, &mut b).unwrap();
        let e = |i: usize, at: usize| u64::from_ne_bytes(b[i * 64 + at..i * 64 + at + 8].try_into().unwrap());
        let sectors = Z >> 9;
        assert_eq!((e(0, 0), e(0, 8), b[24], b[25]), (0, sectors, 1, 0), "conventional");
        assert_eq!((e(1, 0), e(1, 16), b[64 + 24], b[64 + 25]), (sectors, sectors + 16, 2, Cond::ImpOpen as u8));
        assert_eq!((e(2, 16), b[128 + 25]), (3 * sectors, Cond::Full as u8));
        assert_eq!((e(3, 16), b[192 + 25], e(3, 32)), (3 * sectors, Cond::Empty as u8, sectors));
        assert!(b[8 * 64..].iter().all(|&x| x == 0));
        // From the middle of zone 5, room for 2.
        let mut b = vec![0u8; 128];
        z.report(5 * Z + 4096, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b[..8].try_into().unwrap()), 5 * sectors);
        assert_eq!(z.report(8 * Z, &mut b), Err(E_IO));
    }

    #[test]
    fn bad_geometry_is_one_line() {
        let o = ZonedOptions {
            size: 64 << 20,
            zone_size: 4 << 20,
            conventional: 0,
            max_open: 0,
            max_active: 0,
            block_size: 4096,
        };
        ZonedTarget::new(&o).unwrap();
        for (bad, want) in [
            (ZonedOptions { zone_size: 3 << 20, ..o }, "power of two"),
            (ZonedOptions { size: 65 << 20, ..o }, "multiple of the zone size"),
            (ZonedOptions { conventional: 16, ..o }, "leave no sequential zone"),
            (ZonedOptions { max_open: 17, ..o }, "--max-open 17 exceeds"),
            (ZonedOptions { max_open: 4, max_active: 2, ..o }, "exceeds --max-active"),
            (ZonedOptions { block_size: 1000, ..o }, "block size"),
        ] {
            let e = ZonedTarget::new(&bad).unwrap_err();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
    }
}
