//! Memory mappings: the kernel-written descriptor table and the IO buffer regions.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use super::uapi::{IoDesc, io_desc_queue_offset};

/// One queue's `ublksrv_io_desc` array, mapped read-only from `/dev/ublkcN`.
///
/// The kernel writes these entries; we never form a reference to them and copy each
/// one out with a volatile read.
pub struct IoDescTable {
    ptr: NonNull<IoDesc>,
    depth: u16,
    map_len: usize,
}

// SAFETY: the mapping is plain shared memory; reads are volatile copies and the
// table is only read, so moving it to another thread is sound.
unsafe impl Send for IoDescTable {}

impl IoDescTable {
    pub fn map(cdev: BorrowedFd<'_>, q_id: u16, depth: u16) -> io::Result<Self> {
        let ps = super::page_size();
        let map_len = (usize::from(depth) * size_of::<IoDesc>()).next_multiple_of(ps);
        let off = libc::off_t::try_from(io_desc_queue_offset(q_id, ps))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "queue offset overflow"))?;
        // SAFETY: a fresh shared read-only mapping of the char device; no existing
        // memory is affected and the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<IoDesc>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, depth, map_len })
    }

    /// Copies out the descriptor of `tag`.
    pub fn get(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth, "tag {tag} >= depth {}", self.depth);
        // SAFETY: tag < depth, and the mapping holds `depth` descriptors.
        let p = unsafe { self.ptr.add(usize::from(tag)) };
        // SAFETY: `p` is an aligned descriptor inside the live mapping; the read is
        // volatile because the kernel writes this memory.
        unsafe { p.read_volatile() }
    }
}

impl Drop for IoDescTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`; nothing borrows it.
        // A failure here cannot be acted upon, so it is ignored.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

impl fmt::Debug for IoDescTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoDescTable").field("depth", &self.depth).finish()
    }
}

/// What kind of pages back a [`Region`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PageKind {
    /// Reserved 2 MiB hugetlb pages (`MAP_HUGETLB`).
    Hugetlb,
    /// Ordinary mapping aligned to 2 MiB with `MADV_HUGEPAGE` (transparent huge pages).
    Thp,
    /// Plain 4 KiB pages.
    Small,
}

impl fmt::Display for PageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageKind::Hugetlb => "hugetlb",
            PageKind::Thp => "thp",
            PageKind::Small => "4k",
        })
    }
}

const HUGE: usize = 2 << 20;

/// An anonymous, page-aligned, zero-filled memory region owned by the engine.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    kind: PageKind,
}

// SAFETY: the region is exclusively owned memory; access goes through &/&mut self.
unsafe impl Send for Region {}

impl Region {
    /// Maps `len` bytes, trying hugetlb, then THP, then small pages (`allow_huge` false
    /// goes straight to small pages), populated and locked in memory (mlock) so that
    /// request data never waits on a page fault or swap. If locking is refused (a
    /// memlock limit), the pages are populated anyway and a warning says so.
    pub fn new(len: usize, allow_huge: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero-length region"));
        }
        let region = Self::map(len, allow_huge)?;
        // SAFETY: locks exactly the mapping we own; mlock faults its pages in (with
        // MADV_HUGEPAGE already set, as huge pages where the kernel can).
        if unsafe { libc::mlock(region.ptr.as_ptr().cast(), region.len) } != 0 {
            let e = io::Error::last_os_error();
            tracing::warn!("cannot lock {} bytes of IO buffers in memory ({e}); they may be swapped", region.len);
            // SAFETY: MADV_POPULATE_WRITE on our own mapping only faults pages in.
            if unsafe { libc::madvise(region.ptr.as_ptr().cast(), region.len, libc::MADV_POPULATE_WRITE) } != 0 {
                tracing::debug!("MADV_POPULATE_WRITE failed: {}", io::Error::last_os_error());
            }
        }
        Ok(region)
    }

    fn map(len: usize, allow_huge: bool) -> io::Result<Self> {
        if allow_huge {
            let huge_len = len.next_multiple_of(HUGE);
            if let Ok(ptr) = Self::mmap_anon(huge_len, libc::MAP_HUGETLB) {
                return Ok(Self { ptr, len: huge_len, kind: PageKind::Hugetlb });
            }
            // THP: a 2 MiB-aligned range (over-allocate, trim), advised before any page
            // is touched, so that the first faults already allocate huge pages.
            if let Ok(raw) = Self::mmap_anon(huge_len + HUGE, 0) {
                let start = raw.as_ptr() as usize;
                let aligned = start.next_multiple_of(HUGE);
                let (head, tail) = (aligned - start, HUGE - (aligned - start));
                if head > 0 {
                    // SAFETY: unmaps the part of the new mapping below `aligned`, which
                    // this Region does not keep.
                    unsafe { libc::munmap(raw.as_ptr().cast(), head) };
                }
                if tail > 0 {
                    // SAFETY: unmaps the part of the new mapping past aligned + huge_len.
                    unsafe { libc::munmap((aligned + huge_len) as *mut libc::c_void, tail) };
                }
                let ptr = NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::other("null mapping"))?;
                // SAFETY: advice on the mapping we own, over exactly its length.
                let r = unsafe { libc::madvise(ptr.as_ptr().cast(), huge_len, libc::MADV_HUGEPAGE) };
                let kind = if r == 0 { PageKind::Thp } else { PageKind::Small };
                return Ok(Self { ptr, len: huge_len, kind });
            }
        }
        let ptr = Self::mmap_anon(len, 0)?;
        Ok(Self { ptr, len, kind: PageKind::Small })
    }

    /// A private anonymous mapping; hugetlb ones are populated at once (so that a
    /// shortage of reserved pages fails here, not at first use).
    fn mmap_anon(len: usize, extra: libc::c_int) -> io::Result<NonNull<u8>> {
        let populate = if extra & libc::MAP_HUGETLB != 0 { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected
        // and the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | populate | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn kind(&self) -> PageKind {
        self.kind
    }

    /// Reads the `T` at byte `off` (volatile: the kernel may write this memory).
    /// Panics if it is out of bounds or misaligned.
    pub fn load<T: Word>(&self, off: usize) -> T {
        let p = self.word_ptr::<T>(off);
        // SAFETY: `p` is an aligned T inside the live mapping (checked); any bit pattern
        // is a valid T (a plain integer); no reference to the memory is formed.
        unsafe { p.read_volatile() }
    }

    /// Writes `v` at byte `off` (volatile: the kernel may read this memory).
    /// Panics if it is out of bounds or misaligned.
    pub fn store<T: Word>(&mut self, off: usize, v: T) {
        let p = self.word_ptr::<T>(off);
        // SAFETY: `p` is an aligned T inside the live mapping (checked), and the mapping
        // is writable; no reference to the memory is formed.
        unsafe { p.write_volatile(v) }
    }

    fn word_ptr<T: Word>(&self, off: usize) -> *mut T {
        assert!(
            off.checked_add(size_of::<T>()).is_some_and(|end| end <= self.len) && off.is_multiple_of(align_of::<T>()),
            "{} bytes at {off} are outside the {}-byte region or misaligned",
            size_of::<T>(),
            self.len
        );
        self.ptr.as_ptr().wrapping_add(off).cast()
    }
}

/// Plain integers: any bit pattern is valid, so they may be read from memory the
/// kernel writes ([`Region::load`]).
pub trait Word: Copy + sealed::Sealed {}
impl Word for u16 {}
impl Word for u32 {}
impl Word for u64 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; users of the memory
        // (ring registrations, in-flight IO) are torn down before the region by
        // field order in the queue. Errors cannot be acted upon here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region").field("len", &self.len).field("kind", &self.kind).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_small_is_zeroed_and_writable() {
        let mut r = Region::new(3 * 4096 + 1, false).unwrap();
        assert_eq!(r.kind(), PageKind::Small);
        assert!(r.len() > 3 * 4096);
        assert!((0..r.len() / 8 * 8).step_by(8).all(|off| r.load::<u64>(off) == 0));
        r.store(6, 7u16);
        assert_eq!((r.load::<u16>(6), r.load::<u64>(0)), (7, 7 << 48));
        assert!((r.as_ptr() as usize).is_multiple_of(4096));
    }

    #[test]
    fn region_huge_falls_back_and_reports() {
        let mut r = Region::new(1 << 20, true).unwrap();
        // Whatever we got, the length covers a whole 2 MiB unit and is usable.
        assert_eq!(r.len(), 2 << 20);
        let last = r.len() - 8;
        r.store(last, 1u64);
        assert_eq!(r.load::<u64>(last), 1);
        assert!(matches!(r.kind(), PageKind::Hugetlb | PageKind::Thp | PageKind::Small));
        if r.kind() != PageKind::Small {
            assert!((r.as_ptr() as usize).is_multiple_of(HUGE), "huge-page region not 2 MiB aligned");
        }
        Region::new(0, true).unwrap_err();
    }

    #[test]
    #[should_panic(expected = "outside the")]
    fn region_refuses_out_of_bounds_words() {
        let r = Region::new(4096, false).unwrap();
        let _: u16 = r.load(r.len() - 1);
    }
}
