/* LD_PRELOAD fault injector for the fault tests (tests/test_faults.py), test-only.
 *
 * While the file named by $AIID_FAULT_FLAG exists, every write/pwrite/writev/fsync/fdatasync
 * on a file descriptor whose path contains $AIID_FAULT_MATCH fails with errno
 * $AIID_FAULT_ERRNO (default EIO). Remove the flag file and I/O works again.
 * Build: cc -shared -fPIC -O2 -o faultfs.so faultfs.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int fault_errno(int fd) {
    const char *flag = getenv("AIID_FAULT_FLAG");
    const char *match = getenv("AIID_FAULT_MATCH");
    const char *code = getenv("AIID_FAULT_ERRNO");
    char link[64], path[4096];
    ssize_t n;
    if (!flag || !match || access(flag, F_OK) != 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    if (strstr(path, match) == NULL) return 0;
    return code ? atoi(code) : EIO;
}

#define NEXT(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)
#define FAIL_IF_FAULTY(fd) do { int e_ = fault_errno(fd); if (e_) { errno = e_; return -1; } } while (0)

ssize_t write(int fd, const void *buf, size_t count) {
    NEXT(write); FAIL_IF_FAULTY(fd); return real(fd, buf, count);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    NEXT(pwrite); FAIL_IF_FAULTY(fd); return real(fd, buf, count, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    NEXT(pwrite64); FAIL_IF_FAULTY(fd); return real(fd, buf, count, off);
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    NEXT(writev); FAIL_IF_FAULTY(fd); return real(fd, iov, cnt);
}
int fsync(int fd) {
    NEXT(fsync); FAIL_IF_FAULTY(fd); return real(fd);
}
int fdatasync(int fd) {
    NEXT(fdatasync); FAIL_IF_FAULTY(fd); return real(fd);
}
