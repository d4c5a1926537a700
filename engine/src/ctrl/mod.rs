//! The control plane: `/dev/ublk-control` driven with uring_cmd on an SQE128 ring.

pub mod params;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::error::{Error, Result};
use crate::sys::uapi::{self, CtrlCmd, DevInfo, Params};

pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// An open `/dev/ublk-control` with its own small SQE128 ring.
///
/// Commands are synchronous: each call submits one SQE and waits for its CQE, so the
/// buffers it points the kernel at live on the caller's stack until completion.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("fd", &self.file.as_raw_fd()).finish()
    }
}

impl Control {
    /// Opens the control device, turning the usual failures into clear errors.
    pub fn open() -> Result<Self> {
        let path = Path::new(CONTROL_PATH);
        if !path.exists() {
            return Err(Error::NoUblk { path: path.into() });
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                Error::NotRoot { path: path.into() }
            } else {
                Error::Open { path: path.into(), cause: e }
            }
        })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|e| Error::io("creating the control io_uring (SQE128)", e))?;
        Ok(Self { ring, file })
    }

    /// Runs one control command. `buf`, when given, is what `addr`/`len` point at.
    fn exec(&mut self, cmd_op: u32, name: &'static str, mut cmd: CtrlCmd, buf: Option<&mut [u8]>) -> Result<i32> {
        if let Some(buf) = buf {
            cmd.addr = buf.as_mut_ptr() as u64;
            cmd.len = u16::try_from(buf.len()).map_err(|_| Error::Config(format!("{name}: buffer too large")))?;
        }
        let dev = if cmd.dev_id == u32::MAX { "(new)".to_string() } else { cmd.dev_id.to_string() };
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(cmd.to_cmd80())
            .build()
            .user_data(u64::from(cmd_op));
        // SAFETY: the SQE points at `buf` (borrowed for this whole call) and reads the
        // command inline; we wait for its completion below before returning, so the
        // buffer outlives the kernel's use of it. The control fd is open (self.file).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| Error::Config("control ring unexpectedly full".into()))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    return Err(Error::Ctrl { cmd: name, dev, cause: e });
                }
            }
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                if res < 0 {
                    return Err(Error::Ctrl { cmd: name, dev, cause: io::Error::from_raw_os_error(-res) });
                }
                return Ok(res);
            }
        }
    }

    /// Feature bits the running kernel's ublk driver supports.
    pub fn features(&mut self) -> Result<u64> {
        let mut buf = [0u8; 8];
        let cmd = CtrlCmd { dev_id: u32::MAX, queue_id: u16::MAX, ..Default::default() };
        self.exec(uapi::CMD_GET_FEATURES, "GET_FEATURES", cmd, Some(&mut buf))?;
        Ok(u64::from_ne_bytes(buf))
    }

    /// ADD_DEV: creates the device; `info` is updated with what the kernel chose
    /// (device id, accepted flags).
    pub fn add_dev(&mut self, info: &mut DevInfo) -> Result<()> {
        let cmd = CtrlCmd { dev_id: info.dev_id, queue_id: u16::MAX, ..Default::default() };
        let mut buf = struct_bytes(info);
        self.exec(uapi::CMD_ADD_DEV, "ADD_DEV", cmd, Some(&mut buf))?;
        *info = struct_from_bytes(&buf);
        Ok(())
    }

    pub fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let mut buf = [0u8; size_of::<DevInfo>()];
        match self.exec(uapi::CMD_GET_DEV_INFO, "GET_DEV_INFO", cmd, Some(&mut buf)) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(Error::NoDevice { dev_id }),
            Err(e) => Err(e),
            Ok(_) => Ok(struct_from_bytes(&buf)),
        }
    }

    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let mut p = *params;
        p.len = Params::WIRE_LEN;
        let mut buf = struct_bytes(&p);
        self.exec(uapi::CMD_SET_PARAMS, "SET_PARAMS", cmd, Some(&mut buf[..Params::WIRE_LEN as usize]))?;
        Ok(())
    }

    pub fn get_params(&mut self, dev_id: u32) -> Result<Params> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let p = Params {
            len: Params::WIRE_LEN,
            types: uapi::PARAM_TYPE_BASIC | uapi::PARAM_TYPE_DEVT,
            ..Default::default()
        };
        let mut buf = struct_bytes(&p);
        self.exec(uapi::CMD_GET_PARAMS, "GET_PARAMS", cmd, Some(&mut buf[..Params::WIRE_LEN as usize]))?;
        Ok(struct_from_bytes(&buf))
    }

    /// CPUs the kernel maps to hardware queue `q_id` (blk-mq's queue map).
    pub fn queue_affinity(&mut self, dev_id: u32, q_id: u16) -> Result<Vec<usize>> {
        let cmd = CtrlCmd { dev_id, queue_id: q_id, data: [u64::from(q_id)], ..Default::default() };
        let mut buf = [0u8; size_of::<libc::cpu_set_t>()];
        self.exec(uapi::CMD_GET_QUEUE_AFFINITY, "GET_QUEUE_AFFINITY", cmd, Some(&mut buf))?;
        Ok(crate::sys::cpumask_bytes_to_vec(&buf))
    }

    /// START_DEV: blocks until every queue has fetched every tag, then adds the disk.
    pub fn start_dev(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let pid = u64::try_from(daemon_pid).map_err(|_| Error::Config("bad pid".into()))?;
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, data: [pid], ..Default::default() };
        self.exec(uapi::CMD_START_DEV, "START_DEV", cmd, None)?;
        Ok(())
    }

    /// START_USER_RECOVERY: the device's old daemon is gone; a new one takes over.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        self.exec(uapi::CMD_START_USER_RECOVERY, "START_USER_RECOVERY", cmd, None)?;
        Ok(())
    }

    /// END_USER_RECOVERY: blocks until every queue has fetched every tag again.
    pub fn end_user_recovery(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let pid = u64::try_from(daemon_pid).map_err(|_| Error::Config("bad pid".into()))?;
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, data: [pid], ..Default::default() };
        self.exec(uapi::CMD_END_USER_RECOVERY, "END_USER_RECOVERY", cmd, None)?;
        Ok(())
    }

    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        self.exec(uapi::CMD_STOP_DEV, "STOP_DEV", cmd, None)?;
        Ok(())
    }

    /// DEL_DEV: waits until `/dev/ublkcN` is closed by everyone.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        self.exec(uapi::CMD_DEL_DEV, "DEL_DEV", cmd, None)?;
        Ok(())
    }

    /// Ids of the ublk devices that exist now (from `/sys/class/ublk-char`).
    pub fn list_ids() -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// The bytes of a plain-data UAPI struct.
fn struct_bytes<T: Copy + UapiStruct>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<T>()];
    // SAFETY: T is a #[repr(C)] UAPI struct of integers (UapiStruct), so every byte is
    // initialised plain data; `out` has exactly size_of::<T>() bytes and does not overlap.
    unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), out.len()) };
    out
}

/// Reads a plain-data UAPI struct back from bytes (short input is zero-extended).
fn struct_from_bytes<T: Copy + Default + UapiStruct>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = bytes.len().min(size_of::<T>());
    // SAFETY: T is a #[repr(C)] struct of integers, for which any bit pattern is valid;
    // we copy at most size_of::<T>() bytes into it from a non-overlapping slice.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut v).cast::<u8>(), n) };
    v
}

/// Marker for `#[repr(C)]` UAPI structs made only of integers (any bit pattern valid).
trait UapiStruct {}
impl UapiStruct for DevInfo {}
impl UapiStruct for Params {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_bytes_roundtrip() {
        let info = DevInfo {
            nr_hw_queues: 2,
            queue_depth: 64,
            dev_id: 9,
            max_io_buf_bytes: 1 << 19,
            flags: 0x40,
            ..Default::default()
        };
        let b = struct_bytes(&info);
        assert_eq!(b.len(), 64);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 2);
        assert_eq!(u32::from_ne_bytes(b[12..16].try_into().unwrap()), 9);
        assert_eq!(struct_from_bytes::<DevInfo>(&b), info);
        // A short read zero-extends.
        let short: DevInfo = struct_from_bytes(&b[..4]);
        assert_eq!((short.nr_hw_queues, short.queue_depth, short.dev_id), (2, 64, 0));
    }
}
