//! `loop`: serves the device from a regular file or a block device, like the kernel
//! loop driver, with asynchronous IO on the queue's ring.
//!
//! READ/WRITE map to (fixed-buffer) reads and writes, retried on short transfers;
//! FUA writes use RWF_DSYNC; FLUSH is fdatasync; DISCARD punches a hole (file) or
//! issues BLKDISCARD (block device); WRITE_ZEROES uses fallocate ZERO_RANGE (or a hole
//! punch when the request allows unmapping, on files).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::TargetSpec;
use ubd_engine::Error;
use ubd_engine::{
    DiscardInfo, Disposition, FileSlot, IoCtx, IoRequest, Op, QueueSetup, QueueTarget, Target, TargetInfo,
};

/// Whether to open the backing with O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectIo {
    /// O_DIRECT when the backing allows it, buffered otherwise (and said so).
    #[default]
    Auto,
    /// O_DIRECT or fail.
    On,
    /// Buffered (page cache).
    Off,
}

/// `auto`, `on`, `off`.
#[cfg(feature = "clap")]
impl clap::ValueEnum for DirectIo {
    fn value_variants<'a>() -> &'a [Self] {
        &[DirectIo::Auto, DirectIo::On, DirectIo::Off]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(match self {
            DirectIo::Auto => "auto",
            DirectIo::On => "on",
            DirectIo::Off => "off",
        }))
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoopOptions {
    pub direct: DirectIo,
    /// Logical block size; default: the block device's, or 512 for a file (4096 when
    /// the file's O_DIRECT needs it).
    pub logical_block_size: Option<u32>,
    /// Open the backing read-only and serve a read-only device. Without it, a backing
    /// that can only be opened read-only (EACCES, EROFS, EPERM) gives a read-only device
    /// too (logged).
    pub read_only: bool,
    /// Serve only the first SIZE bytes of the backing (a device `resize`d below its
    /// block device's size). None: all of it.
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    File,
    BlockDevice,
}

#[derive(Debug)]
pub struct LoopTarget {
    file: Arc<File>,
    path: PathBuf,
    backing: Backing,
    direct: bool,
    /// `--read-only` was asked for (rather than found).
    asked_read_only: bool,
    /// [`LoopOptions::size`].
    size_limit: Option<u64>,
    info: TargetInfo,
}

const COOKIE_RW: u16 = 0;
const COOKIE_FLUSH: u16 = 1;
const COOKIE_FALLOCATE: u16 = 2;

impl LoopTarget {
    pub fn open(path: &Path, opts: &LoopOptions) -> ubd_engine::Result<Self> {
        let open_err = |source: io::Error| Error::Open { path: path.into(), cause: source };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let backing = if meta.file_type().is_block_device() {
            Backing::BlockDevice
        } else if meta.file_type().is_file() {
            Backing::File
        } else {
            return Err(Error::Config(format!("{} is not a regular file or a block device", path.display())));
        };
        // Read-write unless asked not to; a backing that refuses writers is served read-only.
        let mut read_only = opts.read_only;
        if !read_only && let Err(e) = OpenOptions::new().read(true).write(true).open(path) {
            match e.raw_os_error() {
                Some(libc::EACCES | libc::EROFS | libc::EPERM) if OpenOptions::new().read(true).open(path).is_ok() => {
                    tracing::warn!("{} can only be opened read-only ({e}): serving a read-only device", path.display());
                    read_only = true;
                }
                _ => return Err(open_err(e)),
            }
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match opts.direct {
            DirectIo::Off => (open(false).map_err(open_err)?, false),
            DirectIo::On => (open(true).map_err(open_err)?, true),
            DirectIo::Auto => match open(true) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!("{} does not support O_DIRECT; using buffered IO (page cache)", path.display());
                    (open(false).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            },
        };
        let (size, mut lbs, pbs, discard) = match backing {
            Backing::BlockDevice => {
                let size = ubd_engine::os::blk_size_bytes(file.as_fd())
                    .map_err(|e| Error::io(format!("BLKGETSIZE64 on {}", path.display()), e))?;
                let blksz = |e: rustix::io::Errno| Error::io(format!("BLKSSZGET on {}", path.display()), e.into());
                let l = rustix::fs::ioctl_blksszget(&file).map_err(blksz)?;
                let p = rustix::fs::ioctl_blkpbszget(&file).map_err(blksz)?;
                (size, l, p, !read_only && blockdev_discards(&meta))
            }
            Backing::File => {
                use rustix::fs::FallocateFlags;
                let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                let discard = !read_only && rustix::fs::fallocate(&file, punch, meta.len(), 4096).is_ok();
                (meta.len(), 512, 4096, discard)
            }
        };
        let size = match opts.size {
            Some(limit) if limit > size => {
                return Err(Error::Config(format!(
                    "{} holds {size} bytes, less than the {limit} bytes the device has",
                    path.display()
                )));
            }
            Some(limit) => limit,
            None => size,
        };
        let mut direct = direct;
        if let Some(l) = opts.logical_block_size {
            lbs = l;
        } else if backing == Backing::File && direct && size >= 4096 {
            // Find the smallest block size O_DIRECT accepts on this filesystem.
            lbs = match [512u32, 4096].into_iter().find(|&bs| dio_probe(&file, bs)) {
                Some(bs) => bs,
                None if opts.direct == DirectIo::Auto => {
                    tracing::warn!("{}: O_DIRECT reads fail; using buffered IO (page cache)", path.display());
                    direct = false;
                    512
                }
                None => {
                    return Err(Error::Config(format!("{}: O_DIRECT reads fail on this file", path.display())));
                }
            };
        }
        // The O_DIRECT probe failed: reopen through the page cache.
        let file = if direct || opts.direct == DirectIo::Off { file } else { open(false).map_err(open_err)? };
        if size == 0 {
            return Err(Error::Config(format!("{} is empty (0 bytes): nothing to serve", path.display())));
        }
        if !lbs.is_power_of_two() || lbs < 512 {
            return Err(Error::Config(format!("block size {lbs} is not a power of two of at least 512")));
        }
        if !size.is_multiple_of(u64::from(lbs)) {
            return Err(Error::Config(format!(
                "size of {} ({size} bytes) is not a multiple of the {lbs}-byte block size",
                path.display()
            )));
        }
        let discard = discard.then(|| DiscardInfo {
            granularity: pbs.max(lbs),
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
        });
        Ok(Self {
            file: Arc::new(file),
            path: path.into(),
            backing,
            direct,
            asked_read_only: opts.read_only,
            size_limit: opts.size,
            info: TargetInfo {
                dev_size: size,
                logical_block_size: lbs,
                physical_block_size: pbs.max(lbs),
                read_only,
                rotational: false,
                volatile_cache: true,
                discard,
                zoned: None,
            },
        })
    }

    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// What re-opens this target as it is served: the same path, O_DIRECT on or off
    /// as it turned out, the same block size.
    pub fn spec(&self) -> TargetSpec {
        TargetSpec::Loop {
            path: self.path.clone(),
            direct: if self.direct { DirectIo::On } else { DirectIo::Off },
            logical_block_size: Some(self.info.logical_block_size),
            read_only: self.asked_read_only,
            size: self.size_limit,
        }
    }
}

/// Does an O_DIRECT read of `bs` bytes at offset 0 work?
fn dio_probe(file: &File, bs: u32) -> bool {
    // An aligned window inside a plain Vec: O_DIRECT wants 4 KiB-aligned memory.
    let mut v = vec![0u8; 8192 + bs as usize];
    let skip = v.as_ptr().align_offset(4096);
    file.read_at(&mut v[skip..skip + bs as usize], 0).is_ok()
}

/// Does the block device accept discards (from sysfs)?
fn blockdev_discards(meta: &std::fs::Metadata) -> bool {
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/discard_max_bytes"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

impl Target for LoopTarget {
    fn name(&self) -> &'static str {
        "loop"
    }
    fn info(&self) -> &TargetInfo {
        &self.info
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "backing": match self.backing { Backing::File => "file", Backing::BlockDevice => "block-device" },
            "direct_io": self.direct,
            "size": self.info.dev_size,
            "logical_block_size": self.info.logical_block_size,
            "discard": self.info.discard.is_some(),
            "read_only": self.info.read_only,
        })
    }
    fn open_queue(&self, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        let slot = setup.add_file(self.file.as_fd());
        let progress = vec![0; usize::from(setup.depth())];
        Ok(Box::new(LoopQueue { file: Arc::clone(&self.file), slot, backing: self.backing, progress }))
    }
}

struct LoopQueue {
    file: Arc<File>,
    slot: FileSlot,
    backing: Backing,
    /// Bytes already transferred, per tag (for short reads/writes).
    progress: Vec<u32>,
}

impl LoopQueue {
    fn done_so_far(&mut self, tag: u16) -> &mut u32 {
        // Sized to the queue depth at open: every tag is below it.
        &mut self.progress[usize::from(tag)]
    }

    /// Pushes the (rest of the) transfer for `req` from byte `done`.
    fn push_rw(&self, req: &IoRequest, done: u32, io: &mut IoCtx<'_>) -> Result<(), i32> {
        let len = u32::try_from(req.len).map_err(|_| -libc::EIO)?;
        let off = req.offset + u64::from(done);
        match req.op {
            Op::Read => io.read(self.slot, done, len - done, off, COOKIE_RW),
            _ => io.write(self.slot, done, len - done, off, req.fua(), COOKIE_RW),
        }
    }
}

fn pending_or(r: Result<(), i32>) -> Disposition {
    match r {
        Ok(()) => Disposition::Pending,
        Err(e) => Disposition::Done(e),
    }
}

impl QueueTarget for LoopQueue {
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition {
        match req.op {
            Op::Read | Op::Write => {
                *self.done_so_far(req.tag) = 0;
                pending_or(self.push_rw(req, 0, io))
            }
            Op::Flush => pending_or(io.fsync(self.slot, true, COOKIE_FLUSH)),
            Op::Discard => match self.backing {
                Backing::File => pending_or(io.fallocate(
                    self.slot,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    req.offset,
                    req.len,
                    COOKIE_FALLOCATE,
                )),
                // No io_uring opcode for a block discard on older kernels: the ioctl is
                // synchronous, but discards are rare and cheap on the devices that take them.
                Backing::BlockDevice => match ubd_engine::os::blk_discard(self.file.as_fd(), req.offset, req.len) {
                    Ok(()) => Disposition::Done(0),
                    Err(e) => Disposition::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
                },
            },
            Op::WriteZeroes => {
                let mode = if self.backing == Backing::File && !req.no_unmap() {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                pending_or(io.fallocate(self.slot, mode, req.offset, req.len, COOKIE_FALLOCATE))
            }
            // Zone operations: a loop device is not zoned.
            _ => Disposition::Done(-libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition {
        if res < 0 {
            return Disposition::Done(res);
        }
        if cookie != COOKIE_RW {
            return Disposition::Done(0);
        }
        let total = u32::try_from(req.len).unwrap_or(u32::MAX);
        let done = self.done_so_far(req.tag);
        *done += res.cast_unsigned();
        let done = *done;
        if done >= total {
            return Disposition::Done(i32::try_from(total).unwrap_or(-libc::EIO));
        }
        if res == 0 {
            // No progress: the backing shrank under us, or the write cannot proceed.
            return Disposition::Done(-libc::EIO);
        }
        pending_or(self.push_rw(req, done, io))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `len` bytes in `dir` (a temporary directory, removed with it).
    fn temp_file(dir: &tempfile::TempDir, name: &str, len: u64) -> PathBuf {
        let p = dir.path().join(name);
        let mut f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        f.flush().unwrap();
        p
    }

    #[test]
    fn opens_a_file_and_reports_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let p = temp_file(&dir, "ok.img", 1 << 20);
        let t = LoopTarget::open(&p, &LoopOptions::default()).unwrap();
        assert_eq!(t.info().dev_size, 1 << 20);
        assert!(t.info().logical_block_size == 512 || t.info().logical_block_size == 4096);
        assert!(t.info().volatile_cache);
        assert_eq!(t.describe()["backing"], "file");
        let b = LoopTarget::open(
            &p,
            &LoopOptions { direct: DirectIo::Off, logical_block_size: Some(4096), ..Default::default() },
        )
        .unwrap();
        assert!(!b.direct_io());
        assert_eq!(b.info().logical_block_size, 4096);
    }

    #[test]
    fn read_only_opens_the_backing_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = temp_file(&dir, "ro.img", 1 << 20);
        let t = LoopTarget::open(&p, &LoopOptions { read_only: true, ..Default::default() }).unwrap();
        assert!(t.info().read_only);
        assert!(t.info().discard.is_none());
        assert_eq!(t.describe()["read_only"], true);
        // The descriptor cannot write: nothing can reach the backing through it.
        assert_eq!(t.file.write_at(b"x", 0).unwrap_err().raw_os_error(), Some(libc::EBADF));
        let TargetSpec::Loop { read_only, .. } = t.spec() else { panic!() };
        assert!(read_only);
        assert!(!LoopTarget::open(&p, &LoopOptions::default()).unwrap().info().read_only);
    }

    #[test]
    fn clear_errors_for_bad_backing() {
        let missing = LoopTarget::open(Path::new("/nonexistent/disk.img"), &LoopOptions::default()).unwrap_err();
        assert_eq!(missing.to_string(), "cannot open /nonexistent/disk.img: No such file or directory (os error 2)");
        let dir = tempfile::tempdir().unwrap();
        let odd = temp_file(&dir, "odd.img", 1000);
        let e = LoopTarget::open(
            &odd,
            &LoopOptions { direct: DirectIo::Off, logical_block_size: None, ..Default::default() },
        )
        .unwrap_err();
        assert!(e.to_string().contains("(1000 bytes) is not a multiple of the 512-byte block size"), "{e}");
        let empty = temp_file(&dir, "empty.img", 0);
        assert!(LoopTarget::open(&empty, &LoopOptions::default()).unwrap_err().to_string().contains("is empty"));
        let dir = std::env::temp_dir();
        assert!(
            LoopTarget::open(&dir, &LoopOptions::default()).unwrap_err().to_string().contains("not a regular file")
        );
    }
}
