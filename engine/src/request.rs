//! What a target and the engine exchange: the device's geometry ([`TargetInfo`]), the
//! requests decoded from the kernel's descriptors ([`IoRequest`]), and the handle of a
//! file registered with a queue's ring ([`FileSlot`]).
//!
//! This module is below both the ring and the target API: it imports neither.

use crate::sys::uapi::{self, IoDesc};

/// Static properties of the device a target serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetInfo {
    /// Device size in bytes (a multiple of `logical_block_size`).
    pub dev_size: u64,
    /// The smallest unit the device addresses (512 to the page size, a power of two).
    pub logical_block_size: u32,
    /// The unit the backing writes without a read-modify-write.
    pub physical_block_size: u32,
    /// The kernel refuses writes.
    pub read_only: bool,
    /// Shown to the block layer as a rotational disk.
    pub rotational: bool,
    /// The backend has a volatile write cache: the kernel sends FLUSH (and FUA).
    pub volatile_cache: bool,
    /// DISCARD / WRITE_ZEROES support, if any.
    pub discard: Option<DiscardInfo>,
    /// A host-managed zoned device (UBLK_F_ZONED, Linux 6.6+): its zone geometry. The
    /// target then gets the zone operations ([`Op::ZoneAppend`] and the rest), and the
    /// device is served in buffer mode user-copy.
    pub zoned: Option<ZonedInfo>,
}

/// The zones of a host-managed zoned device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ZonedInfo {
    /// Bytes of each zone (a power of two; the device size is a multiple of it).
    pub zone_size: u64,
    /// Zones that may be open at once (0: no limit).
    pub max_open_zones: u32,
    /// Zones that may be open or closed (written but not full) at once (0: no limit).
    pub max_active_zones: u32,
}

/// DISCARD / WRITE_ZEROES limits of a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiscardInfo {
    /// Bytes; discards are aligned to it.
    pub granularity: u32,
    /// Largest DISCARD, in 512-byte sectors.
    pub max_discard_sectors: u32,
    /// Largest WRITE_ZEROES, in 512-byte sectors (0: not supported).
    pub max_write_zeroes_sectors: u32,
}

/// The operation of a request. Zone operations come only to zoned devices
/// ([`TargetInfo::zoned`]); more may come with new kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum Op {
    /// Read `len` bytes at `offset` into the request buffer.
    Read,
    /// Write `len` bytes of the request buffer at `offset`.
    Write,
    /// Make every completed write durable (no range).
    Flush,
    /// The range's contents are no longer needed.
    Discard,
    /// The range reads back as zeroes.
    WriteZeroes,
    /// Open the zone at `offset` explicitly.
    ZoneOpen,
    /// Close the open zone at `offset`.
    ZoneClose,
    /// Make the zone at `offset` full.
    ZoneFinish,
    /// Write `len` bytes of the request buffer at the write pointer of the zone at
    /// `offset`; the target says where with [`IoCtx::zone_appended`](crate::IoCtx::zone_appended).
    ZoneAppend,
    /// Reset the zone at `offset` (empty, write pointer at its start).
    ZoneReset,
    /// Reset every sequential zone.
    ZoneResetAll,
    /// Fill the request buffer with up to `len / 64` zone descriptors (`struct
    /// blk_zone`), from the zone at `offset` on; the result is the bytes written.
    ReportZones,
}

impl Op {
    /// The request brings data for the target (its buffer holds it when the target
    /// gets the request).
    pub fn carries_data_in(self) -> bool {
        matches!(self, Op::Write | Op::ZoneAppend)
    }
    /// The target fills the request buffer (its result is the bytes filled).
    pub fn carries_data_out(self) -> bool {
        matches!(self, Op::Read | Op::ReportZones)
    }
    /// A zone operation (only a zoned device gets these).
    pub fn is_zone_op(self) -> bool {
        matches!(
            self,
            Op::ZoneOpen
                | Op::ZoneClose
                | Op::ZoneFinish
                | Op::ZoneAppend
                | Op::ZoneReset
                | Op::ZoneResetAll
                | Op::ReportZones
        )
    }
}

/// A validated request, decoded from the kernel's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    /// The request's slot in its queue (0 to depth - 1).
    pub tag: u16,
    pub op: Op,
    /// `UBLK_IO_F_*` flags (see [`fua`](Self::fua), [`no_unmap`](Self::no_unmap)).
    pub flags: u32,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (0 for FLUSH).
    pub len: u64,
}

impl IoRequest {
    /// Forced unit access: the write must be durable when it completes.
    pub fn fua(&self) -> bool {
        self.flags & uapi::IO_F_FUA != 0
    }
    /// WRITE_ZEROES must not deallocate.
    pub fn no_unmap(&self) -> bool {
        self.flags & uapi::IO_F_NOUNMAP != 0
    }
    /// The data is in the device's shared memory (UBLK_F_SHMEM_ZC): the kernel copied
    /// nothing, and the target's reads and writes use the client's own pages.
    pub fn shared_memory(&self) -> bool {
        self.flags & uapi::IO_F_SHMEM_ZC != 0
    }
}

/// Index of a file in the queue ring's registered file table (see
/// [`QueueSetup::add_file`](crate::QueueSetup::add_file)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSlot(pub(crate) u32);

/// Memory a queue target owns beyond the request buffers (protocol headers, a receive
/// buffer), from [`QueueSetup::alloc`](crate::QueueSetup::alloc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemId(pub(crate) u16);

/// The memory a send or receive moves bytes from or into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    /// Bytes `off..off + len` of the request's own buffer (buffer mode copy; a target
    /// that uses this says so with [`Target::supports_zero_copy`](crate::Target::supports_zero_copy)).
    Request { off: u32, len: u32 },
    /// Bytes `off..off + len` of target memory `id`.
    Owned { id: MemId, off: u32, len: u32 },
}

/// Turns a kernel descriptor into a checked request, or the `-errno` to fail it with.
pub(crate) fn decode_request(tag: u16, desc: &IoDesc, buf_size: u32, dev_size: u64) -> Result<IoRequest, i32> {
    let op = match desc.op() {
        uapi::IO_OP_READ => Op::Read,
        uapi::IO_OP_WRITE => Op::Write,
        uapi::IO_OP_FLUSH => Op::Flush,
        uapi::IO_OP_DISCARD => Op::Discard,
        uapi::IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        uapi::IO_OP_ZONE_OPEN => Op::ZoneOpen,
        uapi::IO_OP_ZONE_CLOSE => Op::ZoneClose,
        uapi::IO_OP_ZONE_FINISH => Op::ZoneFinish,
        uapi::IO_OP_ZONE_APPEND => Op::ZoneAppend,
        uapi::IO_OP_ZONE_RESET => Op::ZoneReset,
        uapi::IO_OP_ZONE_RESET_ALL => Op::ZoneResetAll,
        uapi::IO_OP_REPORT_ZONES => Op::ReportZones,
        _ => return Err(-libc::EOPNOTSUPP),
    };
    if op == Op::Flush {
        // A flush has no range: the kernel sends start_sector = -1 and no sectors.
        return Ok(IoRequest { tag, op, flags: desc.flags(), offset: 0, len: 0 });
    }
    if matches!(op, Op::ZoneOpen | Op::ZoneClose | Op::ZoneFinish | Op::ZoneReset | Op::ZoneResetAll) {
        // No data: the zone's start (0 for RESET_ALL).
        let offset = desc.start_sector.checked_mul(512).ok_or(-libc::EIO)?;
        if offset >= dev_size {
            return Err(-libc::EIO);
        }
        return Ok(IoRequest { tag, op, flags: desc.flags(), offset, len: 0 });
    }
    if op == Op::ReportZones {
        // `nr_sectors` holds nr_zones: the buffer has room for that many descriptors.
        let offset = desc.start_sector.checked_mul(512).ok_or(-libc::EIO)?;
        let len = u64::from(desc.nr_sectors) * 64;
        if offset >= dev_size || len == 0 || len > u64::from(buf_size) {
            return Err(-libc::EIO);
        }
        return Ok(IoRequest { tag, op, flags: desc.flags(), offset, len });
    }
    let offset = desc.start_sector.checked_mul(512).ok_or(-libc::EIO)?;
    let len = u64::from(desc.nr_sectors) * 512;
    let end = offset.checked_add(len).ok_or(-libc::EIO)?;
    if len == 0 || end > dev_size {
        return Err(-libc::EIO);
    }
    if matches!(op, Op::Read | Op::Write | Op::ZoneAppend) && len > u64::from(buf_size) {
        return Err(-libc::EIO);
    }
    Ok(IoRequest { tag, op, flags: desc.flags(), offset, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u8, flags: u32, start: u64, nr: u32) -> IoDesc {
        IoDesc { op_flags: u32::from(op) | flags, nr_sectors: nr, start_sector: start, addr: 0 }
    }

    #[test]
    fn decodes_good_requests() {
        let r = decode_request(3, &desc(uapi::IO_OP_WRITE, uapi::IO_F_FUA, 8, 16), 1 << 19, 1 << 20).unwrap();
        assert_eq!(r, IoRequest { tag: 3, op: Op::Write, flags: uapi::IO_F_FUA, offset: 4096, len: 8192 });
        assert!(r.fua());
        let f = decode_request(0, &desc(uapi::IO_OP_FLUSH, 0, 0, 0), 4096, 4096).unwrap();
        assert_eq!((f.op, f.len), (Op::Flush, 0));
        // What the kernel really sends for an empty flush (seen on 6.12).
        let f = decode_request(0, &desc(uapi::IO_OP_FLUSH, 0, u64::MAX, 0), 4096, 4096).unwrap();
        assert_eq!((f.op, f.offset, f.len), (Op::Flush, 0, 0));
        // A discard larger than the buffer is fine: it carries no data.
        let d = decode_request(0, &desc(uapi::IO_OP_DISCARD, 0, 0, 2048), 4096, 1 << 20).unwrap();
        assert_eq!(d.len, 1 << 20);
        // The last sector of the device.
        decode_request(0, &desc(uapi::IO_OP_READ, 0, 2047, 1), 4096, 1 << 20).unwrap();
    }

    #[test]
    fn rejects_bad_requests() {
        let dev = 1u64 << 20;
        // Past the end, zero length, bigger than the buffer, unknown op, overflow.
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_READ, 0, 2048, 1), 4096, dev), Err(-libc::EIO));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_READ, 0, 0, 0), 4096, dev), Err(-libc::EIO));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_WRITE, 0, 0, 9), 4096, dev), Err(-libc::EIO));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_WRITE_SAME, 0, 0, 1), 4096, dev), Err(-libc::EOPNOTSUPP));
        assert_eq!(decode_request(0, &desc(77, 0, 0, 1), 4096, dev), Err(-libc::EOPNOTSUPP));
        assert_eq!(decode_request(0, &desc(uapi::IO_OP_READ, 0, u64::MAX / 256, 1), 4096, u64::MAX), Err(-libc::EIO));
        assert_eq!(
            decode_request(0, &desc(uapi::IO_OP_DISCARD, 0, u64::MAX / 512, 8), 4096, u64::MAX),
            Err(-libc::EIO)
        );
    }
}
