//! Shared memory for UBLK_F_SHMEM_ZC: a file (on hugetlbfs, tmpfs, or a memfd reached
//! through `/proc/PID/fd/N`) mapped `MAP_SHARED`, so that the engine and the
//! applications doing IO see the same pages. The kernel pins those pages when the
//! mapping is registered (REG_BUF) and recognises requests whose data lies in them.
//!
//! The mapping is a `memmap2::MmapRaw` (raw pointers only: clients and the kernel write
//! these pages while we hold them), unmapped on drop.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

/// `statfs.f_type` of hugetlbfs and tmpfs.
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// What kind of file backs a shared mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShmemKind {
    /// A hugetlbfs file: huge pages, sizes in multiples of the huge page.
    Hugetlbfs,
    /// tmpfs (`/dev/shm`) or a memfd.
    Tmpfs,
    /// Any other file system: its pages are page cache, pinned while registered.
    Other,
}

/// A file mapped shared, read-write (or read-only).
pub struct SharedMap {
    map: MmapRaw,
    path: PathBuf,
    kind: ShmemKind,
    read_only: bool,
    /// The file's device and inode, to recognise it again (recovery).
    dev_ino: (u64, u64),
}

impl std::fmt::Debug for SharedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMap")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("kind", &self.kind)
            .field("read_only", &self.read_only)
            .finish()
    }
}

// SAFETY: the mapping is shared memory reached only through raw pointers (no references
// are formed to it); moving the handle between threads moves no data.
unsafe impl Send for SharedMap {}
// SAFETY: as above: &SharedMap hands out only the base pointer and the length.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Opens `path` (creating it if missing and `size` is given; growing it to `size`
    /// if it is smaller) and maps all of it shared. `read_only` opens and maps it
    /// read-only (a write-sealed memfd). Sizes must be whole pages (huge pages on
    /// hugetlbfs) and at most `max` bytes. Errors are one line naming the file.
    pub fn open(path: &Path, size: Option<u64>, read_only: bool, max: u64) -> Result<Self, String> {
        let shown = path.display();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!read_only && size.is_some())
            .truncate(false)
            .open(path)
            .map_err(|e| format!("opening shared memory {shown}: {e}"))?;
        let st = rustix::fs::fstatfs(&file).map_err(|e| format!("statfs of {shown}: {}", io::Error::from(e)))?;
        #[allow(clippy::useless_conversion, reason = "f_type is i64 on some targets")]
        let fs_type = i64::from(st.f_type) as u64;
        let kind = match fs_type {
            HUGETLBFS_MAGIC => ShmemKind::Hugetlbfs,
            TMPFS_MAGIC => ShmemKind::Tmpfs,
            _ => ShmemKind::Other,
        };
        // The unit the mapping's length must be a multiple of.
        let unit = match kind {
            ShmemKind::Hugetlbfs => u64::try_from(st.f_bsize).unwrap_or(2 << 20),
            _ => super::page_size() as u64,
        };
        let meta = file.metadata().map_err(|e| format!("stat of {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("shared memory {shown} is not a regular file"));
        }
        let len = size.unwrap_or(meta.len());
        if len == 0 {
            return Err(format!("shared memory {shown} is empty: give it a size (--shmem {shown},size=SIZE)"));
        }
        if !len.is_multiple_of(unit) {
            return Err(format!(
                "shared memory {shown}: {len} bytes is not a multiple of {unit} (the {} size there)",
                if kind == ShmemKind::Hugetlbfs { "huge page" } else { "page" }
            ));
        }
        if len > max {
            return Err(format!("shared memory {shown}: {len} bytes is more than the {max} one buffer may have"));
        }
        if len > meta.len() {
            if read_only {
                return Err(format!(
                    "shared memory {shown} has {} bytes, fewer than size={len}, and ro cannot grow it",
                    meta.len()
                ));
            }
            file.set_len(len).map_err(|e| format!("growing shared memory {shown} to {len} bytes: {e}"))?;
        }
        let n = usize::try_from(len).map_err(|_| format!("shared memory {shown} is too large"))?;
        let opts = {
            let mut o = MmapOptions::new();
            o.len(n).populate();
            o
        };
        let map = if read_only { opts.map_raw_read_only(&file) } else { opts.map_raw(&file) }
            .map_err(|e| format!("mapping shared memory {shown} ({len} bytes): {e}"))?;
        Ok(Self { map, path: path.to_path_buf(), kind, read_only, dev_ino: (meta.dev(), meta.ino()) })
    }

    /// The start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Bytes mapped.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> ShmemKind {
        self.kind
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The file's (device, inode).
    pub fn dev_ino(&self) -> (u64, u64) {
        self.dev_ino
    }
}

/// A [`SharedMap`] registered with a device (REG_BUF) under `index`: what the queues
/// need to find a SHMEM_ZC request's data.
#[derive(Debug)]
pub struct ShmemBuf {
    pub map: SharedMap,
    pub index: u16,
}

impl ShmemBuf {
    /// The range `off..off + len` of the buffer, if it lies inside it.
    pub fn range(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        if end > self.map.size() {
            return None;
        }
        Some(self.map.as_ptr().wrapping_add(usize::try_from(off).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_tmp_file_shared() {
        let dir = std::env::temp_dir().join(format!("ubd-shmem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("buf");
        let ps = super::super::page_size() as u64;
        let m = SharedMap::open(&path, Some(4 * ps), false, 1 << 30).unwrap();
        assert_eq!(m.size(), 4 * ps);
        let at = m.as_ptr().wrapping_add(100);
        // SAFETY: `at` is inside the live mapping; nothing else uses this file.
        unsafe { at.write(0xab) };
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 4 * ps);
        assert_eq!(bytes[100], 0xab, "MAP_SHARED: the write is in the file");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.dev(), meta.ino()), m.dev_ino());
        drop(m);
        // The size is the file's when not given; odd sizes and empty files are refused.
        assert_eq!(SharedMap::open(&path, None, true, 1 << 30).unwrap().size(), 4 * ps);
        let e = SharedMap::open(&path, Some(4 * ps + 1), false, 1 << 30).unwrap_err();
        assert!(e.contains("not a multiple of"), "{e}");
        let e = SharedMap::open(&path, None, false, ps).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = SharedMap::open(&empty, None, false, 1 << 30).unwrap_err();
        assert!(e.contains("is empty"), "{e}");
        let e = SharedMap::open(&dir.join("missing"), None, false, 1 << 30).unwrap_err();
        assert!(e.starts_with("opening shared memory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
