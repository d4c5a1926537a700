//! The control plane: `/dev/ublk-control` driven with uring_cmd on an SQE128 ring.

pub(crate) mod params;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::error::{Error, Result};
use crate::sys::uapi::{self, CtrlCmd, DevInfo, Params, struct_bytes, struct_from_bytes};

pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// How long a control command may take before it is reported as hung. START/STOP/DEL
/// wait on the block layer (partition scan, draining IO, the last close of the char
/// device); nothing else should take more than a moment.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// An open `/dev/ublk-control` with its own small SQE128 ring.
///
/// Each command gets a sequence number as `user_data`, and the buffer the kernel is
/// pointed at is owned here (copied in and out), so that a command that times out
/// can be abandoned safely: its buffer stays allocated until its completion is seen,
/// or for the life of the process if it never comes.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    seq: u64,
    /// Commands submitted whose completion has not been seen, with their buffers.
    pending: Vec<(u64, Vec<u8>)>,
    /// Completions seen for commands nobody waits on any more.
    results: Vec<(u64, i32)>,
    /// Devices known to be unprivileged (UBLK_F_UNPRIVILEGED_DEV) or not. Every command
    /// to an unprivileged device must name its char device (the kernel checks that the
    /// caller may open it), and only some commands are allowed for it.
    unprivileged: HashMap<u32, bool>,
}

/// The char device of device `dev_id`.
pub fn char_path(dev_id: u32) -> String {
    format!("/dev/ublkc{dev_id}")
}

/// The buffer of a command to an unprivileged device: its char device path, then
/// `rest`, with `cmd.dev_path_len` set to the path's length (how the kernel finds it).
fn with_path_prefix(cmd: &mut CtrlCmd, rest: &[u8]) -> Vec<u8> {
    let mut buf = char_path(cmd.dev_id).into_bytes();
    cmd.dev_path_len = buf.len() as u16; // "/dev/ublkcN": at most 20 bytes
    buf.extend_from_slice(rest);
    buf
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("fd", &self.file.as_raw_fd()).field("pending", &self.pending.len()).finish()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // A command still with the kernel may write to its buffer after the ring is
        // closed (the ring's teardown is asynchronous): those few bytes are leaked.
        for (_, buf) in self.pending.drain(..) {
            std::mem::forget(buf);
        }
    }
}

/// A command sent with a `*_begin` method, still to be waited for.
#[derive(Debug)]
pub struct PendingCmd(Submitted);

/// A submitted command, for [`Control::wait`].
#[derive(Debug)]
struct Submitted {
    seq: u64,
    name: &'static str,
    dev: String,
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
            .build(8)
            .map_err(|e| Error::io("creating the control io_uring (SQE128)", e))?;
        Ok(Self { ring, file, seq: 0, pending: Vec::new(), results: Vec::new(), unprivileged: HashMap::new() })
    }

    /// Queues one command and hands it to the kernel. `buf`, when given, is what
    /// `addr`/`len` point at; it is kept in `self.pending` until the command completes.
    fn submit(&mut self, cmd_op: u32, name: &'static str, mut cmd: CtrlCmd, buf: Option<&[u8]>) -> Result<Submitted> {
        let dev = if cmd.dev_id == u32::MAX { "(new)".to_string() } else { cmd.dev_id.to_string() };
        self.seq += 1;
        let seq = self.seq;
        let mut owned = buf.map(<[u8]>::to_vec).unwrap_or_default();
        if buf.is_some() {
            cmd.addr = owned.as_mut_ptr() as u64;
            cmd.len = u16::try_from(owned.len()).map_err(|_| Error::Config(format!("{name}: buffer too large")))?;
        }
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(cmd.to_cmd80())
            .build()
            .user_data(seq);
        // The SQE names `owned`'s heap memory, which moves into `self.pending` (moving a
        // Vec does not move its heap buffer) and is freed only after this command's CQE is
        // seen, or never (Drop leaks what is still pending). The command is inline in the SQE.
        // SAFETY: that memory outlives the command, as just said; the control fd is open.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| Error::Config("control ring unexpectedly full".into()))?;
        self.pending.push((seq, owned));
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(Error::Ctrl { cmd: name, dev, cause: e }),
            }
        }
        Ok(Submitted { seq, name, dev })
    }

    /// Waits up to `timeout` for `cmd` to complete. Ok(None) on timeout: the command
    /// stays pending and may be waited for again. On completion, returns the result
    /// and the command's buffer.
    fn wait(&mut self, cmd: &Submitted, timeout: Duration) -> Result<Option<(i32, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            self.results.extend(cqes);
            if let Some(i) = self.results.iter().position(|&(s, _)| s == cmd.seq) {
                let (_, res) = self.results.swap_remove(i);
                let buf = self.take_pending(cmd.seq);
                return Ok(Some((res, buf)));
            }
            // Buffers of abandoned commands that have now completed can go.
            let done: Vec<u64> = self.results.iter().map(|&(s, _)| s).collect();
            self.pending.retain(|(s, _)| !done.contains(s));
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let left = deadline - now;
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME | libc::EBUSY)) => {}
                Err(e) => return Err(Error::Ctrl { cmd: cmd.name, dev: cmd.dev.clone(), cause: e }),
            }
        }
    }

    fn take_pending(&mut self, seq: u64) -> Vec<u8> {
        match self.pending.iter().position(|(s, _)| *s == seq) {
            Some(i) => self.pending.swap_remove(i).1,
            None => Vec::new(),
        }
    }

    /// Runs one control command and waits (up to [`CMD_TIMEOUT`]) for it. `buf`, when
    /// given, is what `addr`/`len` point at, and receives what the kernel wrote there.
    /// EINTR from the kernel (a wait interrupted) is retried.
    fn exec(&mut self, cmd_op: u32, name: &'static str, cmd: CtrlCmd, mut buf: Option<&mut [u8]>) -> Result<i32> {
        for _ in 0..5 {
            let sub = self.submit(cmd_op, name, cmd, buf.as_deref())?;
            let Some((res, owned)) = self.wait(&sub, CMD_TIMEOUT)? else {
                return Err(Error::CtrlTimeout { cmd: name, dev: sub.dev, secs: CMD_TIMEOUT.as_secs() });
            };
            if res == -libc::EINTR {
                continue;
            }
            if res < 0 {
                return Err(Error::Ctrl { cmd: name, dev: sub.dev, cause: io::Error::from_raw_os_error(-res) });
            }
            if let Some(b) = buf.as_deref_mut() {
                let n = b.len().min(owned.len());
                b[..n].copy_from_slice(&owned[..n]);
            }
            return Ok(res);
        }
        Err(Error::Ctrl { cmd: name, dev: cmd.dev_id.to_string(), cause: io::Error::from_raw_os_error(libc::EINTR) })
    }

    /// Runs a command addressed to one device: as [`Control::exec`], with the device's
    /// char device path in front of `buf` when the device is unprivileged (what the
    /// kernel requires of every command to such a device, from anyone). The kernel then
    /// checks that the caller may open that path (read, or read and write for commands
    /// that change the device): another user's device answers EACCES, reported as such.
    fn exec_dev(&mut self, cmd_op: u32, name: &'static str, mut cmd: CtrlCmd, buf: Option<&mut [u8]>) -> Result<i32> {
        if !self.is_unprivileged(cmd.dev_id) {
            return self.exec(cmd_op, name, cmd, buf).map_err(|e| match e.raw_os_error() {
                // An ordinary device, and this caller lacks CAP_SYS_ADMIN.
                Some(libc::EPERM) if cmd.dev_id != u32::MAX => Error::NotYours {
                    cmd: name,
                    dev_id: cmd.dev_id,
                    owner: "root (an ordinary device: only CAP_SYS_ADMIN may command it)".into(),
                    path: char_path(cmd.dev_id),
                },
                _ => e,
            });
        }
        let mut full = with_path_prefix(&mut cmd, buf.as_deref().unwrap_or_default());
        let n = usize::from(cmd.dev_path_len);
        let res = self.exec(cmd_op, name, cmd, Some(&mut full)).map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) => not_yours(cmd.dev_id, name, &char_path(cmd.dev_id)),
            // The char device is gone while the device is still being deleted.
            Some(libc::ENOENT) => Error::NoDevice { dev_id: cmd.dev_id },
            _ => e,
        })?;
        if let Some(b) = buf {
            b.copy_from_slice(&full[n..]);
        }
        Ok(res)
    }

    /// For a command to an unprivileged device: the bytes of its char device path, which
    /// must start the command's buffer, with `cmd.dev_path_len` set. None for others.
    fn path_prefix(&mut self, cmd: &mut CtrlCmd) -> Option<Vec<u8>> {
        self.is_unprivileged(cmd.dev_id).then(|| with_path_prefix(cmd, &[]))
    }

    /// Whether `dev_id` is an unprivileged device (asked once with GET_DEV_INFO2, which
    /// takes the char device path from anyone, then remembered). A device this caller
    /// may not query at all counts as privileged: its commands then fail with the
    /// kernel's own answer (EPERM: not root).
    pub fn is_unprivileged(&mut self, dev_id: u32) -> bool {
        if dev_id == u32::MAX {
            return false;
        }
        if let Some(&u) = self.unprivileged.get(&dev_id) {
            return u;
        }
        let mut cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let mut buf = with_path_prefix(&mut cmd, &[0; size_of::<DevInfo>()]);
        let n = usize::from(cmd.dev_path_len);
        let answer = match self.exec(uapi::CMD_GET_DEV_INFO2, "GET_DEV_INFO2", cmd, Some(&mut buf)) {
            Ok(_) => {
                Some(struct_from_bytes::<DevInfo>(&buf[n..]).flags & crate::sys::features::F_UNPRIVILEGED_DEV != 0)
            }
            // Another user's unprivileged device: the kernel refused our access to its path.
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => Some(true),
            // A privileged device, and we are not root.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Some(false),
            // A kernel without GET_DEV_INFO2 (< 6.5) has no unprivileged devices either.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => Some(false),
            // No such device (yet), or no char node: asked again next time.
            Err(_) => None,
        };
        if let Some(u) = answer {
            self.unprivileged.insert(dev_id, u);
        }
        answer.unwrap_or(false)
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
        self.unprivileged.insert(info.dev_id, info.flags & crate::sys::features::F_UNPRIVILEGED_DEV != 0);
        Ok(())
    }

    pub fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let mut buf = [0u8; size_of::<DevInfo>()];
        match self.exec_dev(uapi::CMD_GET_DEV_INFO, "GET_DEV_INFO", cmd, Some(&mut buf)) {
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
        self.exec_dev(uapi::CMD_SET_PARAMS, "SET_PARAMS", cmd, Some(&mut buf[..Params::WIRE_LEN as usize]))?;
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
        self.exec_dev(uapi::CMD_GET_PARAMS, "GET_PARAMS", cmd, Some(&mut buf[..Params::WIRE_LEN as usize]))?;
        Ok(struct_from_bytes(&buf))
    }

    /// CPUs the kernel maps to hardware queue `q_id` (blk-mq's queue map).
    pub fn queue_affinity(&mut self, dev_id: u32, q_id: u16) -> Result<Vec<usize>> {
        let cmd = CtrlCmd { dev_id, queue_id: q_id, data: [u64::from(q_id)], ..Default::default() };
        let mut buf = [0u8; size_of::<libc::cpu_set_t>()];
        self.exec_dev(uapi::CMD_GET_QUEUE_AFFINITY, "GET_QUEUE_AFFINITY", cmd, Some(&mut buf))?;
        Ok(crate::sys::cpumask_bytes_to_vec(&buf))
    }

    /// START_DEV: blocks until every queue has fetched every tag, then adds the disk.
    pub fn start_dev(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let pid = u64::try_from(daemon_pid).map_err(|_| Error::Config("bad pid".into()))?;
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, data: [pid], ..Default::default() };
        self.exec_dev(uapi::CMD_START_DEV, "START_DEV", cmd, None)?;
        Ok(())
    }

    /// START_USER_RECOVERY: the device's old daemon is gone; a new one takes over.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        self.exec_dev(uapi::CMD_START_USER_RECOVERY, "START_USER_RECOVERY", cmd, None)?;
        Ok(())
    }

    /// END_USER_RECOVERY: blocks until every queue has fetched every tag again.
    pub fn end_user_recovery(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let pid = u64::try_from(daemon_pid).map_err(|_| Error::Config("bad pid".into()))?;
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, data: [pid], ..Default::default() };
        self.exec_dev(uapi::CMD_END_USER_RECOVERY, "END_USER_RECOVERY", cmd, None)?;
        Ok(())
    }

    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let cmd = self.stop_dev_begin(dev_id)?;
        self.finish(&cmd, CMD_TIMEOUT)
    }

    /// Sends STOP_DEV without waiting: it completes once the requests in flight have
    /// completed and the disk is gone. Wait for it with [`Control::finish`].
    pub fn stop_dev_begin(&mut self, dev_id: u32) -> Result<PendingCmd> {
        let mut cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let path = self.path_prefix(&mut cmd);
        Ok(PendingCmd(self.submit(uapi::CMD_STOP_DEV, "STOP_DEV", cmd, path.as_deref())?))
    }

    /// Waits up to `timeout` for `cmd`: Ok(false) if it has not completed yet (it may
    /// be waited for again), Ok(true) once it has succeeded.
    pub fn try_finish(&mut self, cmd: &PendingCmd, timeout: Duration) -> Result<bool> {
        match self.wait(&cmd.0, timeout)? {
            None => Ok(false),
            Some((res, _)) if res == -libc::EACCES && cmd.0.dev != "(new)" => {
                let id: u32 = cmd.0.dev.parse().unwrap_or(u32::MAX);
                Err(not_yours(id, cmd.0.name, &char_path(id)))
            }
            Some((res, _)) if res < 0 => {
                Err(Error::Ctrl { cmd: cmd.0.name, dev: cmd.0.dev.clone(), cause: io::Error::from_raw_os_error(-res) })
            }
            Some(_) => Ok(true),
        }
    }

    /// Like [`Control::try_finish`], with a timeout error if it does not complete.
    pub fn finish(&mut self, cmd: &PendingCmd, timeout: Duration) -> Result<()> {
        if self.try_finish(cmd, timeout)? {
            Ok(())
        } else {
            Err(Error::CtrlTimeout { cmd: cmd.0.name, dev: cmd.0.dev.clone(), secs: timeout.as_secs() })
        }
    }

    /// QUIESCE_DEV (UBLK_F_QUIESCE, 6.16+): waits up to `timeout` for the requests in
    /// flight to complete, then aborts the daemon's fetch commands (its queues see
    /// UBLK_IO_RES_ABORT and end); the device stays, QUIESCED, queueing new IO until a
    /// daemon recovers it. Any process may send it. EBUSY: IO was still outstanding at
    /// the timeout, and the daemon keeps serving.
    pub fn quiesce_dev(&mut self, dev_id: u32, timeout: Duration) -> Result<()> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut cmd = CtrlCmd { dev_id, queue_id: u16::MAX, data: [ms], ..Default::default() };
        let path = self.path_prefix(&mut cmd);
        let sub = self.submit(uapi::CMD_QUIESCE_DEV, "QUIESCE_DEV", cmd, path.as_deref())?;
        match self.wait(&sub, timeout + CMD_TIMEOUT)? {
            None => {
                Err(Error::CtrlTimeout { cmd: "QUIESCE_DEV", dev: sub.dev, secs: (timeout + CMD_TIMEOUT).as_secs() })
            }
            Some((res, _)) if res < 0 => {
                Err(Error::Ctrl { cmd: "QUIESCE_DEV", dev: sub.dev, cause: io::Error::from_raw_os_error(-res) })
            }
            Some(_) => Ok(()),
        }
    }

    /// UPDATE_SIZE (UBLK_F_UPDATE_SIZE, 6.16+): the disk's capacity becomes `bytes` (a
    /// multiple of 512) at once, and the kernel tells the block layer (a uevent, as
    /// for a disk that changed size). Sent only to a LIVE device: some kernels
    /// dereference a NULL disk when it arrives before START_DEV or after STOP_DEV. The
    /// target must already serve the new size; the queues accept requests past the
    /// size they started with once the kernel's capacity says so.
    pub fn update_size(&mut self, dev_id: u32, bytes: u64) -> Result<()> {
        self.check_update_size(dev_id)?;
        if bytes == 0 || !bytes.is_multiple_of(512) {
            return Err(Error::Config(format!("new size {bytes} bytes is not a positive multiple of 512")));
        }
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, data: [bytes >> 9], ..Default::default() };
        self.exec_dev(uapi::CMD_UPDATE_SIZE, "UPDATE_SIZE", cmd, None)?;
        Ok(())
    }

    /// REG_BUF (UBLK_F_SHMEM_ZC, 7.1+): registers `len` bytes of shared memory mapped at
    /// `addr` in this process with device `dev_id` (both page aligned, at most 4 GiB).
    /// The kernel pins the pages; requests whose data lies in them arrive marked
    /// UBLK_IO_F_SHMEM_ZC. Returns the buffer's index. `read_only`: pinned without write
    /// access, matched by writes only.
    pub fn reg_buf(&mut self, dev_id: u32, addr: *const u8, len: u64, read_only: bool) -> Result<u16> {
        let reg = uapi::ShmemBufReg {
            addr: addr as u64,
            len,
            flags: if read_only { uapi::SHMEM_BUF_READ_ONLY } else { 0 },
            reserved: 0,
        };
        let mut buf = struct_bytes(&reg);
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        let index = self.exec_dev(uapi::CMD_REG_BUF, "REG_BUF", cmd, Some(&mut buf))?;
        u16::try_from(index).map_err(|_| Error::Config(format!("REG_BUF returned buffer index {index}")))
    }

    /// TRY_STOP_DEV (UBLK_F_SAFE_STOP_DEV, 7.0+): STOP_DEV if nothing has the block device
    /// open, else EBUSY (the kernel refuses new opens while it decides, so nothing can
    /// slip in between the check and the stop).
    pub fn try_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        self.exec_dev(uapi::CMD_TRY_STOP_DEV, "TRY_STOP_DEV", cmd, None)?;
        Ok(())
    }

    /// Stops `dev_id` only if nothing has its block device open: TRY_STOP_DEV where the
    /// kernel has it (7.0+); else a look at who holds it ([`device_holders`]) and then
    /// STOP_DEV, which leaves a window in which something may open it. A device in use
    /// is refused in one line naming its users.
    ///
    /// [`device_holders`]: crate::device_holders
    pub fn safe_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let in_use = |who: String| Error::Config(format!("device {dev_id} is in use ({who}): not stopped"));
        let holders = crate::daemon::device_holders(dev_id);
        if !holders.is_empty() {
            return Err(in_use(holders.join(", ")));
        }
        // The kernel takes no TRY_STOP_DEV for an unprivileged device (EINVAL).
        if self.features()? & crate::sys::features::F_SAFE_STOP_DEV == 0 || self.is_unprivileged(dev_id) {
            return self.stop_dev(dev_id);
        }
        match self.try_stop_dev(dev_id) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(in_use("TRY_STOP_DEV: EBUSY".into())),
            r => r,
        }
    }

    /// Whether [`Control::update_size`] can be sent to `dev_id` now: the kernel has
    /// UPDATE_SIZE and the device is LIVE. The error is one line naming what is missing.
    pub fn check_update_size(&mut self, dev_id: u32) -> Result<()> {
        if self.features()? & crate::sys::features::F_UPDATE_SIZE == 0 {
            return Err(Error::Config(
                "resizing a device needs the ublk feature UPDATE_SIZE (Linux 6.16+), which this kernel does not offer"
                    .into(),
            ));
        }
        let info = self.dev_info(dev_id)?;
        if info.state != uapi::DEV_LIVE {
            return Err(Error::Config(format!(
                "device {dev_id} is {}, not live: only a device being served can be resized",
                info.state_name()
            )));
        }
        Ok(())
    }

    /// DEL_DEV: waits until `/dev/ublkcN` is closed by everyone.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        self.exec_dev(uapi::CMD_DEL_DEV, "DEL_DEV", cmd, None)?;
        self.unprivileged.remove(&dev_id);
        Ok(())
    }

    /// DEL_DEV_ASYNC (6.9+): deletes `dev_id` without waiting for its last user. What a
    /// device stopped while in use needs: DEL_DEV would wait until every opener of the
    /// (already dead) block device has closed it. The number stays taken until then.
    /// Kernels without it: DEL_DEV, which waits.
    pub fn del_dev_nowait(&mut self, dev_id: u32) -> Result<()> {
        if self.is_unprivileged(dev_id) {
            // Not a command an unprivileged device takes (EINVAL).
            return self.del_dev(dev_id);
        }
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() };
        match self.exec_dev(uapi::CMD_DEL_DEV_ASYNC, "DEL_DEV_ASYNC", cmd, None) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                tracing::warn!(dev_id, "no DEL_DEV_ASYNC (Linux 6.9+): DEL_DEV waits for the device's last user");
                self.del_dev(dev_id)
            }
            r => r.map(drop),
        }
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

/// The error for a command to another user's unprivileged device (EACCES: the kernel
/// found that the caller may not open its char device), naming the owner.
fn not_yours(dev_id: u32, cmd: &'static str, path: &str) -> Error {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(path).map(|m| format!("uid {}", m.uid())).unwrap_or_else(|_| "another user".into());
    Error::NotYours { cmd, dev_id, owner, path: path.into() }
}

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
