//! Hand-written mirror of the ublk UAPI (`include/uapi/linux/ublk_cmd.h`).
//!
//! Only the parts the engine uses are mirrored. Every struct is pinned with
//! compile-time size and offset assertions so a layout mistake fails the build.

use std::mem::{offset_of, size_of};

/// `_IOC` direction bits.
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Encodes an ioctl number the way `_IOC(dir, type, nr, size)` does on x86/arm.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    // `size` is at most 64 bytes for every ublk command: it fits the 14-bit field.
    (dir << 30) | ((size as u32 & 0x3fff) << 16) | ((ty as u32) << 8) | nr as u32
}

const fn ctrl_ior(nr: u8) -> u32 {
    ioc(IOC_READ, b'u', nr, size_of::<CtrlCmd>())
}
const fn ctrl_iowr(nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, b'u', nr, size_of::<CtrlCmd>())
}
const fn io_iowr(nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, b'u', nr, size_of::<IoCmd>())
}

// Control commands (ioctl-encoded; accepted by every kernel since 6.4).
pub const CMD_GET_QUEUE_AFFINITY: u32 = ctrl_ior(0x01);
pub const CMD_GET_DEV_INFO: u32 = ctrl_ior(0x02);
/// GET_DEV_INFO with the char device path in front of the buffer (6.5+): what an
/// unprivileged caller may send, and the one command that takes the path for any device.
pub const CMD_GET_DEV_INFO2: u32 = ctrl_ior(0x12);
pub const CMD_ADD_DEV: u32 = ctrl_iowr(0x04);
pub const CMD_DEL_DEV: u32 = ctrl_iowr(0x05);
pub const CMD_START_DEV: u32 = ctrl_iowr(0x06);
pub const CMD_STOP_DEV: u32 = ctrl_iowr(0x07);
pub const CMD_SET_PARAMS: u32 = ctrl_iowr(0x08);
pub const CMD_GET_PARAMS: u32 = ctrl_ior(0x09);
pub const CMD_START_USER_RECOVERY: u32 = ctrl_iowr(0x10);
pub const CMD_END_USER_RECOVERY: u32 = ctrl_iowr(0x11);
pub const CMD_GET_FEATURES: u32 = ctrl_ior(0x13);
/// UBLK_U_CMD_DEL_DEV_ASYNC (6.9+): DEL_DEV without waiting for the device's last user.
pub const CMD_DEL_DEV_ASYNC: u32 = ctrl_ior(0x14);
/// UBLK_U_CMD_UPDATE_SIZE (6.16+, UBLK_F_UPDATE_SIZE): `data[0]` is the new size in sectors.
pub const CMD_UPDATE_SIZE: u32 = ctrl_iowr(0x15);
/// UBLK_U_CMD_QUIESCE_DEV (6.16+, UBLK_F_QUIESCE): `data[0]` is a timeout in ms.
pub const CMD_QUIESCE_DEV: u32 = ctrl_iowr(0x16);
/// UBLK_U_CMD_TRY_STOP_DEV (7.0+, UBLK_F_SAFE_STOP_DEV): STOP_DEV unless the disk is open.
pub const CMD_TRY_STOP_DEV: u32 = ctrl_iowr(0x17);
/// UBLK_U_CMD_REG_BUF (7.1+, UBLK_F_SHMEM_ZC): `addr`/`len` point at a
/// [`ShmemBufReg`]; the result is the buffer's index.
pub const CMD_REG_BUF: u32 = ctrl_iowr(0x18);
/// UBLK_U_CMD_UNREG_BUF (7.1+): `data[0]` is the index REG_BUF returned. Unused: the
/// kernel frees a device's registrations with the device (and keeps them for recovery).
#[cfg(test)]
pub const CMD_UNREG_BUF: u32 = ctrl_iowr(0x19);

/// `struct ublk_shmem_buf_reg`: shared memory for UBLK_F_SHMEM_ZC, in the server's
/// address space (page aligned, at most [`SHMEM_BUF_MAX`] bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShmemBufReg {
    pub addr: u64,
    pub len: u64,
    pub flags: u32,
    pub reserved: u32,
}

/// `ublk_shmem_buf_reg.flags`: pinned without write access (a write-sealed memfd); only
/// WRITE requests can then match it.
pub const SHMEM_BUF_READ_ONLY: u32 = 1 << 0;
/// The largest buffer one REG_BUF takes.
pub const SHMEM_BUF_MAX: u64 = 4 << 30;

/// `op_flags` bit of a request whose pages all lie in one registered shared-memory
/// buffer: its descriptor's `addr` is [`shmem_zc_index`] << 32 | [`shmem_zc_offset`].
pub const IO_F_SHMEM_ZC: u32 = 1 << 19;

/// The registered buffer a SHMEM_ZC request's data is in (bits 32-47 of `addr`).
pub const fn shmem_zc_index(addr: u64) -> u16 {
    (addr >> 32) as u16
}

/// Where in that buffer the data starts (bits 0-31 of `addr`).
pub const fn shmem_zc_offset(addr: u64) -> u32 {
    addr as u32
}

// Per-IO commands on /dev/ublkcN.
pub const IO_FETCH_REQ: u32 = io_iowr(0x20);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = io_iowr(0x21);
pub const IO_REGISTER_IO_BUF: u32 = io_iowr(0x23);
pub const IO_UNREGISTER_IO_BUF: u32 = io_iowr(0x24);
// Per-queue batch commands (UBLK_F_BATCH_IO, 7.0+); the command area is a `BatchIo`.
pub const IO_PREP_IO_CMDS: u32 = ioc(IOC_READ | IOC_WRITE, b'u', 0x25, size_of::<BatchIo>());
pub const IO_COMMIT_IO_CMDS: u32 = ioc(IOC_READ | IOC_WRITE, b'u', 0x26, size_of::<BatchIo>());
pub const IO_FETCH_IO_CMDS: u32 = ioc(IOC_READ | IOC_WRITE, b'u', 0x27, size_of::<BatchIo>());

/// `ublk_batch_io.flags`: each element carries an 8-byte buffer address (copy mode).
pub const BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;

/// FETCH/COMMIT completion results.
pub const IO_RES_OK: i32 = 0;
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

pub const MAX_QUEUE_DEPTH: u16 = 4096;
pub const MAX_NR_QUEUES: u16 = 4096;
/// Largest per-request buffer the kernel accepts (`UBLK_IO_BUF_BITS` = 25).
pub const MAX_IO_BUF_BYTES: u32 = 1 << 25;

/// User copy (UBLK_F_USER_COPY): where request (`q_id`, `tag`)'s data sits in the char
/// device's file offsets (`UBLKSRV_IO_BUF_OFFSET` + queue << `UBLK_QID_OFF` + tag <<
/// `UBLK_TAG_OFF`; the low 25 bits are the offset inside the request).
pub const fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    const IO_BUF_OFFSET: u64 = 0x8000_0000;
    const TAG_OFF: u32 = 25;
    const QID_OFF: u32 = TAG_OFF + 16;
    IO_BUF_OFFSET + ((q_id as u64) << QID_OFF) + ((tag as u64) << TAG_OFF)
}

/// Per-queue stride of the descriptor area in the char device's mmap space.
pub const fn io_desc_queue_offset(q_id: u16, page_size: usize) -> usize {
    let per_queue = MAX_QUEUE_DEPTH as usize * size_of::<IoDesc>();
    q_id as usize * per_queue.next_multiple_of(page_size)
}

// Device states.
pub const DEV_DEAD: u16 = 0;
pub const DEV_LIVE: u16 = 1;
pub const DEV_QUIESCED: u16 = 2;
pub const DEV_FAIL_IO: u16 = 3;

// IO ops (low 8 bits of `op_flags`).
pub const IO_OP_READ: u8 = 0;
pub const IO_OP_WRITE: u8 = 1;
pub const IO_OP_FLUSH: u8 = 2;
pub const IO_OP_DISCARD: u8 = 3;
#[cfg(test)]
pub const IO_OP_WRITE_SAME: u8 = 4;
pub const IO_OP_WRITE_ZEROES: u8 = 5;
// Zoned devices (UBLK_F_ZONED).
pub const IO_OP_ZONE_OPEN: u8 = 10;
pub const IO_OP_ZONE_CLOSE: u8 = 11;
pub const IO_OP_ZONE_FINISH: u8 = 12;
pub const IO_OP_ZONE_APPEND: u8 = 13;
pub const IO_OP_ZONE_RESET_ALL: u8 = 14;
pub const IO_OP_ZONE_RESET: u8 = 15;
/// REQ_OP_DRV_IN: the server writes `nr_zones` (in `nr_sectors`) `struct blk_zone` from
/// `start_sector` into the request's buffer.
pub const IO_OP_REPORT_ZONES: u8 = 18;

// IO flags (the bits above the op).
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

// Block device attributes in `ParamBasic::attrs`.
pub const ATTR_READ_ONLY: u32 = 1 << 0;
pub const ATTR_ROTATIONAL: u32 = 1 << 1;
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const ATTR_FUA: u32 = 1 << 3;

// Parameter types in `Params::types`.
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const PARAM_TYPE_ZONED: u32 = 1 << 3;

/// `struct ublksrv_ctrl_cmd`: sits in the command area of a 128-byte SQE.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlCmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: written by the kernel, one per tag, in the mmapped area.
impl DevInfo {
    /// The state's name: `dead` (not started, or stopped), `live`, `quiesced` (its
    /// daemon died, recoverable), `fail-io`; `unknown` for a state this build does not know.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            DEV_DEAD => "dead",
            DEV_LIVE => "live",
            DEV_QUIESCED => "quiesced",
            DEV_FAIL_IO => "fail-io",
            _ => "unknown",
        }
    }

    /// Not started, or stopped.
    pub fn is_dead(&self) -> bool {
        self.state == DEV_DEAD
    }

    /// Its daemon is gone (or has let go) and it waits for a new one: QUIESCED or FAIL_IO.
    pub fn is_recoverable(&self) -> bool {
        matches!(self.state, DEV_QUIESCED | DEV_FAIL_IO)
    }

    /// Created with UBLK_F_QUIESCE: it can be handed to a new daemon with QUIESCE_DEV.
    pub fn can_quiesce(&self) -> bool {
        self.flags & super::features::F_QUIESCE != 0
    }
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    pub fn flags(&self) -> u32 {
        self.op_flags & !0xff
    }
    /// The byte just past the request's range (None if it overflows).
    pub fn end_byte(&self) -> Option<u64> {
        self.start_sector.checked_add(u64::from(self.nr_sectors))?.checked_mul(512)
    }
}

/// `struct ublksrv_io_cmd`: the 16-byte command of FETCH/COMMIT.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

impl IoCmd {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

/// `struct ublk_batch_io`: the 16-byte command area of PREP/COMMIT/FETCH_IO_CMDS.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchIo {
    pub q_id: u16,
    pub flags: u16,
    pub nr_elem: u16,
    pub elem_bytes: u8,
    pub reserved: u8,
    pub reserved2: u64,
}

impl BatchIo {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.flags.to_ne_bytes());
        b[4..6].copy_from_slice(&self.nr_elem.to_ne_bytes());
        b[6] = self.elem_bytes;
        b[7] = self.reserved;
        b[8..16].copy_from_slice(&self.reserved2.to_ne_bytes());
        b
    }
}

/// `struct ublk_elem_header`: the start of each PREP/COMMIT element.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ElemHeader {
    pub tag: u16,
    /// AUTO_BUF_REG: the buffer-table slot for the request's pages.
    pub buf_index: u16,
    pub result: i32,
}

/// Bytes per element for these `ublk_batch_io.flags` (zone LBAs are not used).
pub const fn batch_elem_bytes(flags: u16) -> usize {
    size_of::<ElemHeader>() + if flags & BATCH_F_HAS_BUF_ADDR != 0 { 8 } else { 0 }
}

/// Appends one element (header, then the buffer address if `flags` says so) to `out`.
pub fn push_batch_elem(out: &mut Vec<u8>, flags: u16, elem: ElemHeader, buf_addr: u64) {
    out.extend_from_slice(&elem.tag.to_ne_bytes());
    out.extend_from_slice(&elem.buf_index.to_ne_bytes());
    out.extend_from_slice(&elem.result.to_ne_bytes());
    if flags & BATCH_F_HAS_BUF_ADDR != 0 {
        out.extend_from_slice(&buf_addr.to_ne_bytes());
    }
}

/// The tag of the element at byte `at` of an element array.
pub fn batch_elem_tag(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes([*buf.get(at)?, *buf.get(at + 1)?]))
}

impl CtrlCmd {
    /// The 80-byte command area of an SQE128 with this command at its start.
    pub fn to_cmd80(self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (read-only, filled by GET_PARAMS once started).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned` (UBLK_PARAM_TYPE_ZONED: zoned devices).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_param_dma_align`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamDmaAlign {
    pub alignment: u32,
    pub pad: [u8; 4],
}

/// `struct ublk_param_segment` (6.15+).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamSegment {
    pub seg_boundary_mask: u64,
    pub max_segment_size: u32,
    pub max_segments: u16,
    pub pad: [u8; 2],
}

/// The prefix of `struct ublk_params` up to `seg`.
///
/// The kernel clamps `len` to what it knows, and newer kernels accept a shorter
/// `len` than their own struct, so sending this prefix works on old and new kernels.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
    pub dma: ParamDmaAlign,
    pub seg: ParamSegment,
}

impl Params {
    /// Bytes every kernel since 6.6 knows, and all that is sent: up to the end of `zoned`.
    pub const WIRE_LEN: u32 = (offset_of!(Params, zoned) + size_of::<ParamZoned>()) as u32;

    /// The device's size in bytes (0 before SET_PARAMS).
    pub fn size_bytes(&self) -> u64 {
        self.basic.dev_sectors << 9
    }

    /// The logical block size in bytes.
    pub fn logical_block_size(&self) -> u32 {
        1u32.checked_shl(u32::from(self.basic.logical_bs_shift)).unwrap_or(512)
    }

    /// UBLK_ATTR_READ_ONLY: the kernel refuses writes.
    pub fn read_only(&self) -> bool {
        self.basic.attrs & ATTR_READ_ONLY != 0
    }
}

// Layout pins: these mirror the C header exactly.
const _: () = {
    assert!(size_of::<CtrlCmd>() == 32);
    assert!(offset_of!(CtrlCmd, addr) == 8);
    assert!(offset_of!(CtrlCmd, data) == 16);
    assert!(offset_of!(CtrlCmd, dev_path_len) == 24);
    assert!(size_of::<DevInfo>() == 64);
    assert!(offset_of!(DevInfo, max_io_buf_bytes) == 8);
    assert!(offset_of!(DevInfo, dev_id) == 12);
    assert!(offset_of!(DevInfo, ublksrv_pid) == 16);
    assert!(offset_of!(DevInfo, flags) == 24);
    assert!(offset_of!(DevInfo, owner_uid) == 40);
    assert!(size_of::<IoDesc>() == 24);
    assert!(offset_of!(IoDesc, start_sector) == 8);
    assert!(offset_of!(IoDesc, addr) == 16);
    assert!(size_of::<IoCmd>() == 16);
    assert!(offset_of!(IoCmd, result) == 4);
    assert!(offset_of!(IoCmd, addr) == 8);
    assert!(size_of::<BatchIo>() == 16);
    assert!(offset_of!(BatchIo, flags) == 2);
    assert!(offset_of!(BatchIo, nr_elem) == 4);
    assert!(offset_of!(BatchIo, elem_bytes) == 6);
    assert!(offset_of!(BatchIo, reserved2) == 8);
    assert!(size_of::<ElemHeader>() == 8);
    assert!(offset_of!(ElemHeader, buf_index) == 2);
    assert!(offset_of!(ElemHeader, result) == 4);
    assert!(batch_elem_bytes(0) == 8);
    assert!(batch_elem_bytes(BATCH_F_HAS_BUF_ADDR) == 16);
    assert!(size_of::<ParamBasic>() == 32);
    assert!(offset_of!(ParamBasic, max_sectors) == 8);
    assert!(offset_of!(ParamBasic, dev_sectors) == 16);
    assert!(size_of::<ParamDiscard>() == 20);
    assert!(size_of::<ParamDevt>() == 16);
    assert!(size_of::<ParamZoned>() == 32);
    assert!(offset_of!(Params, basic) == 8);
    assert!(offset_of!(Params, discard) == 40);
    assert!(offset_of!(Params, devt) == 60);
    assert!(offset_of!(Params, zoned) == 76);
    assert!(Params::WIRE_LEN == 108);
    assert!(size_of::<ParamDmaAlign>() == 8);
    assert!(size_of::<ParamSegment>() == 16);
    assert!(offset_of!(Params, dma) == 108);
    assert!(offset_of!(Params, seg) == 120);
    assert!(size_of::<Params>() == 136);
    assert!(size_of::<ShmemBufReg>() == 24);
    assert!(offset_of!(ShmemBufReg, flags) == 16);
};

/// The bytes of a plain-data UAPI struct.
pub(crate) fn struct_bytes<T: Copy + UapiStruct>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<T>()];
    // SAFETY: T is a #[repr(C)] UAPI struct of integers (UapiStruct), so every byte is
    // initialised plain data; `out` has exactly size_of::<T>() bytes and does not overlap.
    unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), out.len()) };
    out
}

/// Reads a plain-data UAPI struct back from bytes (short input is zero-extended).
pub(crate) fn struct_from_bytes<T: Copy + Default + UapiStruct>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = bytes.len().min(size_of::<T>());
    // SAFETY: T is a #[repr(C)] struct of integers, for which any bit pattern is valid;
    // we copy at most size_of::<T>() bytes into it from a non-overlapping slice.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut v).cast::<u8>(), n) };
    v
}

/// Marker for `#[repr(C)]` UAPI structs made only of integers (any bit pattern valid).
pub(crate) trait UapiStruct {}
impl UapiStruct for DevInfo {}
impl UapiStruct for Params {}
impl UapiStruct for ShmemBufReg {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_encodings_match_the_header() {
        // Values as the C preprocessor computes them for x86_64.
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(IO_REGISTER_IO_BUF, 0xc010_7523);
        assert_eq!(IO_UNREGISTER_IO_BUF, 0xc010_7524);
        assert_eq!(IO_PREP_IO_CMDS, 0xc010_7525);
        assert_eq!(IO_COMMIT_IO_CMDS, 0xc010_7526);
        assert_eq!(IO_FETCH_IO_CMDS, 0xc010_7527);
        assert_eq!(CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_GET_DEV_INFO2, 0x8020_7512);
        // ublk_user_copy_pos(q, tag, 0) as the kernel header computes it.
        assert_eq!(user_copy_offset(0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(3, 7), 0x8000_0000 + (3 << 41) + (7 << 25));
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(CMD_START_DEV, 0xc020_7506);
        assert_eq!(CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(CMD_UPDATE_SIZE, 0xc020_7515);
        assert_eq!(CMD_QUIESCE_DEV, 0xc020_7516);
        assert_eq!(CMD_TRY_STOP_DEV, 0xc020_7517);
        assert_eq!(CMD_REG_BUF, 0xc020_7518);
        assert_eq!(CMD_UNREG_BUF, 0xc020_7519);
        assert_eq!(size_of::<ShmemBufReg>(), 24);
        assert_eq!(std::mem::offset_of!(ShmemBufReg, len), 8);
        assert_eq!(std::mem::offset_of!(ShmemBufReg, flags), 16);
        assert_eq!(std::mem::offset_of!(ShmemBufReg, reserved), 20);
        assert_eq!(shmem_zc_index(3 << 32 | 0x1000), 3);
        assert_eq!(shmem_zc_offset(3 << 32 | 0x1000), 0x1000);
    }

    #[test]
    fn desc_area_offsets() {
        // 4096 tags * 24 bytes = 96 KiB, already a multiple of 4 KiB.
        assert_eq!(io_desc_queue_offset(0, 4096), 0);
        assert_eq!(io_desc_queue_offset(1, 4096), 98_304);
        assert_eq!(io_desc_queue_offset(3, 65_536), 3 * 131_072);
    }

    #[test]
    fn cmd_bytes_are_native_layout() {
        let c = IoCmd { q_id: 0x0102, tag: 0x0304, result: -5, addr: 0x1122_3344_5566_7788 };
        let b = c.to_bytes();
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 0x0102);
        assert_eq!(u16::from_ne_bytes([b[2], b[3]]), 0x0304);
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().unwrap()), -5);
        assert_eq!(u64::from_ne_bytes(b[8..16].try_into().unwrap()), 0x1122_3344_5566_7788);

        let cc =
            CtrlCmd { dev_id: 7, queue_id: u16::MAX, len: 64, addr: 0xdead_beef, data: [42], ..Default::default() };
        let b = cc.to_cmd80();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 7);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), u16::MAX);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 64);
        assert_eq!(u64::from_ne_bytes(b[8..16].try_into().unwrap()), 0xdead_beef);
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().unwrap()), 42);
        assert!(b[26..].iter().all(|&x| x == 0));
    }

    #[test]
    fn batch_encoding() {
        let h = BatchIo { q_id: 3, flags: BATCH_F_HAS_BUF_ADDR, nr_elem: 0x0102, elem_bytes: 16, ..Default::default() };
        let b = h.to_bytes();
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 3);
        assert_eq!(u16::from_ne_bytes([b[2], b[3]]), 2);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x0102);
        assert_eq!(b[6], 16);
        assert!(b[7..].iter().all(|&x| x == 0));

        let mut v = Vec::new();
        push_batch_elem(&mut v, 0, ElemHeader { tag: 7, buf_index: 7, result: -5 }, 0xdead);
        assert_eq!(v.len(), batch_elem_bytes(0));
        assert_eq!(batch_elem_tag(&v, 0), Some(7));
        assert_eq!(u16::from_ne_bytes([v[2], v[3]]), 7);
        assert_eq!(i32::from_ne_bytes(v[4..8].try_into().unwrap()), -5);

        let mut v = Vec::new();
        for tag in [1u16, 2] {
            let e = ElemHeader { tag, buf_index: 0, result: 4096 };
            push_batch_elem(&mut v, BATCH_F_HAS_BUF_ADDR, e, 0x1000 * u64::from(tag));
        }
        assert_eq!(v.len(), 2 * batch_elem_bytes(BATCH_F_HAS_BUF_ADDR));
        assert_eq!(batch_elem_tag(&v, 16), Some(2));
        assert_eq!(i32::from_ne_bytes(v[20..24].try_into().unwrap()), 4096);
        assert_eq!(u64::from_ne_bytes(v[24..32].try_into().unwrap()), 0x2000);
        assert_eq!(batch_elem_tag(&v, 32), None);
    }

    #[test]
    fn desc_op_and_flags() {
        let d = IoDesc { op_flags: u32::from(IO_OP_WRITE) | IO_F_FUA, nr_sectors: 8, start_sector: 0, addr: 0 };
        assert_eq!(d.op(), IO_OP_WRITE);
        assert_eq!(d.flags(), IO_F_FUA);
    }
}
