/*
 * Shared-memory zero copy from C: O_DIRECT IO to a ubd-engine device from buffers
 * inside the file the engine registered (`ubd-engine --shmem FILE ...`).
 *
 *     cc -O2 -o shmem_io shmem_io.c && ./shmem_io /mnt/huge/buf /dev/ublkb0
 *
 * Maps FILE MAP_SHARED (the pages the engine mapped and the kernel pinned), writes its
 * first MiB to the device at offset 0 with O_DIRECT, reads it back into its second MiB
 * and compares. Both requests reach the engine with their data in the shared pages: no
 * copy in the kernel, none in the engine.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MIB (1 << 20)

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s SHMEM_FILE DEVICE\n", argv[0]);
		return 2;
	}
	int fd = open(argv[1], O_RDWR);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	char *mem = mmap(NULL, 2 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (int i = 0; i < MIB; i++)
		mem[i] = (char)(i * 7 + 3);
	memset(mem + MIB, 0, MIB);
	int dev = open(argv[2], O_RDWR | O_DIRECT);
	if (dev < 0) {
		perror(argv[2]);
		return 1;
	}
	if (pwrite(dev, mem, MIB, 0) != MIB || pread(dev, mem + MIB, MIB, 0) != MIB) {
		perror("O_DIRECT IO");
		return 1;
	}
	int same = memcmp(mem, mem + MIB, MIB) == 0;
	printf("%s\n", same ? "ok: 1 MiB written and read back through shared memory" : "MISMATCH");
	close(dev);
	munmap(mem, 2 * MIB);
	close(fd);
	return same ? 0 : 1;
}
