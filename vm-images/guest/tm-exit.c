/*
 * tm-exit BYTE: write BYTE to qemu's isa-debug-exit port (0xf4), which makes
 * qemu exit at once with status (BYTE << 1) | 1. The guest's /init reports
 * its verdict this way (0x10 = pass → 33, 0x11 = fail → 35). The -cloud
 * kernel has no /dev/port, hence this helper (static, built with musl-gcc
 * by vm-images/build-vm).
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	unsigned long v;
	char *end;

	if (argc != 2) {
		fputs("usage: tm-exit BYTE\n", stderr);
		return 2;
	}
	v = strtoul(argv[1], &end, 0);
	if (*argv[1] == '\0' || *end != '\0' || v > 255) {
		fprintf(stderr, "tm-exit: %s is not a byte\n", argv[1]);
		return 2;
	}
	if (ioperm(0xf4, 1, 1) != 0) {
		perror("tm-exit: ioperm(0xf4)");
		return 1;
	}
	outb((unsigned char)v, 0xf4);
	sleep(3); /* qemu exits asynchronously */
	fputs("tm-exit: still running: no isa-debug-exit device at 0xf4?\n", stderr);
	return 1;
}
