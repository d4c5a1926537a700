//! Memory mappings: the kernel-written descriptor table and the IO buffer regions.
//!
//! [`IoDescTable`] is a `memmap2::MmapRaw`: a read-only shared mapping at an offset,
//! raw pointers only (never a `&[u8]` over memory the kernel writes), unmapped on drop.
//!
//! [`Region`] stays hand-written (its system calls through `rustix::mm`), because
//! memmap2 cannot do what its THP path needs: a 2 MiB-aligned range. mmap gives only
//! page alignment, so the region over-allocates by 2 MiB and unmaps the unaligned head
//! and tail; a memmap2 map cannot be trimmed (it unmaps its whole original range on
//! drop, and `remap` can shrink only the tail) nor placed at a chosen address, and
//! keeping the slack mapped would have `lock()` (whole-map mlock) pin 2 MiB more per
//! region. Hugetlb, `MADV_HUGEPAGE`, mlock and `MADV_POPULATE_WRITE` it could do.

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use memmap2::{MmapOptions, MmapRaw};
use rustix::mm::{self, Advice, MapFlags, ProtFlags};

use super::uapi::{IoDesc, io_desc_queue_offset};

/// One queue's `ublksrv_io_desc` array, mapped read-only from `/dev/ublkcN`.
///
/// The kernel writes these entries; we never form a reference to them and copy each
/// one out with a volatile read.
pub struct IoDescTable {
    map: MmapRaw,
    depth: u16,
}

impl IoDescTable {
    pub fn map(cdev: BorrowedFd<'_>, q_id: u16, depth: u16) -> io::Result<Self> {
        let ps = super::page_size();
        let map_len = (usize::from(depth) * size_of::<IoDesc>()).next_multiple_of(ps);
        let off = u64::try_from(io_desc_queue_offset(q_id, ps))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "queue offset overflow"))?;
        // PROT_READ, MAP_SHARED | MAP_POPULATE; `len` is given, so the char device is
        // not asked for its size.
        let map = MmapOptions::new().offset(off).len(map_len).populate().map_raw_read_only(&cdev)?;
        Ok(Self { map, depth })
    }

    /// Copies out the descriptor of `tag`.
    pub fn get(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth, "tag {tag} >= depth {}", self.depth);
        let base = self.map.as_ptr().cast::<IoDesc>();
        // SAFETY: tag < depth, and the mapping holds `depth` descriptors.
        let p = unsafe { base.add(usize::from(tag)) };
        // SAFETY: `p` is an aligned descriptor inside the live mapping (page-aligned
        // start, whole descriptors); the read is volatile because the kernel writes it.
        unsafe { p.read_volatile() }
    }
}

impl fmt::Debug for IoDescTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoDescTable").field("depth", &self.depth).finish()
    }
}

/// What kind of pages back the per-tag buffers.
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
        if let Err(e) = unsafe { mm::mlock(region.raw(), region.len) } {
            let e = io::Error::from(e);
            tracing::warn!("cannot lock {} bytes of IO buffers in memory ({e}); they may be swapped", region.len);
            // SAFETY: MADV_POPULATE_WRITE on our own mapping only faults pages in.
            if let Err(e) = unsafe { mm::madvise(region.raw(), region.len, Advice::LinuxPopulateWrite) } {
                tracing::debug!("MADV_POPULATE_WRITE failed: {}", io::Error::from(e));
            }
        }
        Ok(region)
    }

    fn raw(&self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }

    fn map(len: usize, allow_huge: bool) -> io::Result<Self> {
        if allow_huge {
            let huge_len = len.next_multiple_of(HUGE);
            if let Ok(ptr) = Self::mmap_anon(huge_len, MapFlags::HUGETLB) {
                return Ok(Self { ptr, len: huge_len, kind: PageKind::Hugetlb });
            }
            // THP: a 2 MiB-aligned range (over-allocate, trim), advised before any page
            // is touched, so that the first faults already allocate huge pages.
            if let Ok(raw) = Self::mmap_anon(huge_len + HUGE, MapFlags::empty()) {
                let start = raw.as_ptr() as usize;
                let aligned = start.next_multiple_of(HUGE);
                let (head, tail) = (aligned - start, HUGE - (aligned - start));
                if head > 0 {
                    // SAFETY: unmaps the part of the new mapping below `aligned`, which
                    // this Region does not keep. A failure only leaves it mapped.
                    let _ = unsafe { mm::munmap(raw.as_ptr().cast(), head) };
                }
                if tail > 0 {
                    // SAFETY: unmaps the part of the new mapping past aligned + huge_len.
                    let _ = unsafe { mm::munmap((aligned + huge_len) as *mut c_void, tail) };
                }
                let ptr = NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::other("null mapping"))?;
                // SAFETY: advice on the mapping we own, over exactly its length.
                let r = unsafe { mm::madvise(ptr.as_ptr().cast(), huge_len, Advice::LinuxHugepage) };
                let kind = if r.is_ok() { PageKind::Thp } else { PageKind::Small };
                return Ok(Self { ptr, len: huge_len, kind });
            }
        }
        let ptr = Self::mmap_anon(len, MapFlags::empty())?;
        Ok(Self { ptr, len, kind: PageKind::Small })
    }

    /// A private anonymous mapping; hugetlb ones are populated at once (so that a
    /// shortage of reserved pages fails here, not at first use).
    fn mmap_anon(len: usize, extra: MapFlags) -> io::Result<NonNull<u8>> {
        let populate = if extra.contains(MapFlags::HUGETLB) { MapFlags::POPULATE } else { MapFlags::empty() };
        // SAFETY: a fresh private anonymous mapping (no address hint); no existing
        // memory is affected.
        let p = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | populate | extra,
            )
        }?;
        NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
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
        let _ = unsafe { mm::munmap(self.raw(), self.len) };
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
    fn io_desc_table_maps_its_queue_at_the_offset_and_sees_later_writes() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        // A file stands in for /dev/ublkcN: queue 1's table starts at its offset.
        let path = std::env::temp_dir().join(format!("ubd-iodesc-test-{}", std::process::id()));
        let f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ps = crate::sys::page_size();
        let base = io_desc_queue_offset(1, ps) as u64;
        f.set_len(io_desc_queue_offset(2, ps) as u64).unwrap();
        let desc_bytes = |d: IoDesc| {
            let mut b = [0u8; 24];
            b[..4].copy_from_slice(&d.op_flags.to_ne_bytes());
            b[4..8].copy_from_slice(&d.nr_sectors.to_ne_bytes());
            b[8..16].copy_from_slice(&d.start_sector.to_ne_bytes());
            b[16..].copy_from_slice(&d.addr.to_ne_bytes());
            b
        };
        let d3 = IoDesc { op_flags: 1, nr_sectors: 8, start_sector: 4242, addr: 7 };
        f.write_all_at(&desc_bytes(d3), base + 3 * 24).unwrap();
        let table = IoDescTable::map(f.as_fd(), 1, 64).unwrap();
        assert_eq!(table.get(3), d3);
        assert_eq!(table.get(0), IoDesc::default());
        // Shared mapping: a write after mapping shows through (as the kernel's do).
        let d63 = IoDesc { op_flags: 0x102, nr_sectors: 1, start_sector: 9, addr: 0 };
        f.write_all_at(&desc_bytes(d63), base + 63 * 24).unwrap();
        assert_eq!(table.get(63), d63);
        std::panic::catch_unwind(|| table.get(64)).unwrap_err();
    }

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
