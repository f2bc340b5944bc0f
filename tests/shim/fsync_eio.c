/*
 * An LD_PRELOAD shim that makes fsync, fdatasync, syncfs and sync_file_range fail with
 * EIO once the file named by RATIFY_EIO_TRIGGER exists (the kernel here has no
 * dm-flakey or fault injection, see RELIABILITY.md). Before that, each call goes to the
 * real libc function. Built by tests/tests/storage_faults.rs with the system C compiler.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>
#include <fcntl.h>

static int triggered(void) {
    const char *path = getenv("RATIFY_EIO_TRIGGER");
    return path != NULL && access(path, F_OK) == 0;
}

#define FAIL_OR_FORWARD(name, ret, params, args)                    \
    ret name params {                                               \
        if (triggered()) {                                          \
            errno = EIO;                                            \
            return -1;                                              \
        }                                                           \
        ret (*real) params = (ret (*) params)dlsym(RTLD_NEXT, #name); \
        return real args;                                           \
    }

FAIL_OR_FORWARD(fsync, int, (int fd), (fd))
FAIL_OR_FORWARD(fdatasync, int, (int fd), (fd))
FAIL_OR_FORWARD(syncfs, int, (int fd), (fd))
FAIL_OR_FORWARD(sync_file_range, int, (int fd, off64_t offset, off64_t nbytes, unsigned int flags),
                (fd, offset, nbytes, flags))
