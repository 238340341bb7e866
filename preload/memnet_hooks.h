/* Between libtcps_memnet.so (the MemNet API, tcps_memnet.h) and libtcps.so (the shim): when the
 * shim is loaded, the API finds these with dlsym(RTLD_DEFAULT, "tcps_memnet_hooks_v1") and
 * sends and receives on offloaded sockets through the engine; otherwise it uses the kernel. */
#ifndef TCPS_MEMNET_HOOKS_H
#define TCPS_MEMNET_HOOKS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A direct transfer asks the engine for at most this much at a time. */
#define TCPS_MEMNET_MAX_REQUEST (1u << 30)

struct tcps_memnet_ticket {
    uint32_t slot;
    uint32_t generation;
    uint32_t seq;
    uint32_t recv;
    void *local; /* the buffer's address in this process */
    uint64_t len;
    /* The engine's answer, written by whichever call of this process takes it (a later
     * request on the socket may, before the job's owner asks): answered is set last. */
    uint32_t answered;
    int32_t result;
    uint32_t hint;
    uint32_t queued; /* 1: in the socket's direct queue, at position seq */
};

struct tcps_memnet_hooks {
    /* Registers `length` bytes of `memfd` (sealed against shrinking) with the engine: 0 and
     * the id, -ENOSYS when no engine serves this process, or -errno. */
    int (*register_mem)(int memfd, uint64_t length, uint32_t *id);
    int (*deregister_mem)(uint32_t id);
    /* 1 when `fd` is an offloaded socket, with *result the transfer's (bytes or -errno);
     * 0 when it is not (the caller uses the kernel). `local` is the same bytes in this
     * process (for the rx ring's bytes, which are copied). */
    int (*direct)(int fd, int recv, uint32_t id, uint64_t offset, void *local, size_t len,
                  long *result);
    /* Async: 1 posted (*ticket), 0 not offloaded, -errno. len <= TCPS_MEMNET_MAX_REQUEST. */
    int (*post)(int fd, int recv, uint32_t id, uint64_t offset, void *local, size_t len,
                struct tcps_memnet_ticket *ticket);
    /* 1 done (*result), 0 not within timeout_ms (0: only look, -1: wait). */
    int (*complete)(struct tcps_memnet_ticket *ticket, int timeout_ms, long *result);
};

typedef const struct tcps_memnet_hooks *(*tcps_memnet_hooks_fn)(void);

#ifdef __cplusplus
}
#endif

#endif
