/*
 * Baseline for bench/ioctl.bench.ts: the cost of VFIO_DEVICE_FEATURE (GET MIGRATION)
 * issued from C on /dev/null, which fails with ENOTTY without needing a device.
 * Usage: ioctl-loop <iterations>; prints nanoseconds per call.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000000;
	int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	uint32_t buf[4] = { 16, 0x10001, 0, 0 };
	struct timespec a, b;
	long enotty = 0;

	if (fd < 0 || n <= 0)
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		buf[0] = 16;
		buf[1] = 0x10001;
		if (ioctl(fd, 0x3B75, buf) < 0 && errno == ENOTTY)
			enotty++;
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	if (enotty != n) {
		fprintf(stderr, "expected ENOTTY on every call, got %ld of %ld\n", enotty, n);
		return 1;
	}
	printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
