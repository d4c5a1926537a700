#!/usr/bin/env python3
"""Shared-memory zero copy from Python: write and read a ubd-engine device with O_DIRECT
from buffers inside the file the engine registered (`ubd-engine --shmem FILE ...`).

    shmem_io.py FILE DEVICE [OFFSET]

Maps FILE shared, fills its first MiB with a pattern, writes it to DEVICE at OFFSET
(default 0) with O_DIRECT from the mapping, reads it back into the mapping's second MiB,
and compares. Both transfers reach the engine with their data in the shared pages
(`ubd-engine stats ID` counts them). Exit 0 when the data read back is what was written.
"""
import mmap
import os
import sys

MIB = 1 << 20


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path, dev = sys.argv[1], sys.argv[2]
    offset = int(sys.argv[3]) if len(sys.argv) == 4 else 0
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    if size < 2 * MIB:
        print(f"{path}: {size} bytes, need 2 MiB", file=sys.stderr)
        return 1
    # MAP_SHARED: the very pages the engine mapped and the kernel pinned.
    mem = mmap.mmap(fd, 2 * MIB, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mem)
    pattern = os.urandom(MIB)
    view[:MIB] = pattern
    view[MIB:] = bytes(MIB)
    # O_DIRECT: the block layer uses the mapping's pages themselves (a buffered write
    # would copy into the page cache, whose pages are not the registered ones).
    dfd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        if os.pwritev(dfd, [view[:MIB]], offset) != MIB:
            print("short write", file=sys.stderr)
            return 1
        if os.preadv(dfd, [view[MIB:]], offset) != MIB:
            print("short read", file=sys.stderr)
            return 1
    finally:
        os.close(dfd)
    same = view[MIB:] == pattern
    view.release()
    mem.close()
    os.close(fd)
    print("ok: 1 MiB written and read back through shared memory" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
