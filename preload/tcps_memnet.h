/* The MemNet API (seed 004, Rangarajan et al.): sends and receives straight from and into
 * memory the application registered, and asynchronous ones it can overlap with its work.
 *
 * Link with -ltcps_memnet. Under LD_PRELOAD=libtcps.so, on a socket the engine serves, the
 * engine sends from and receives into the registered memory itself: the application's core
 * copies nothing and makes no system call but the wait for the answer. Anywhere else (no
 * engine, a kernel socket) the same calls use the kernel's send() and recv().
 *
 * Errors are returned as the socket calls return them: -1 with errno.
 *
 * Registration shares the pages that hold the buffer with the engine: they are moved, with
 * their contents, to a shared mapping at the same address (no other thread may write to those
 * pages during memnet_register_mem), and a fork()ed child shares them with its parent instead
 * of copying them, until memnet_deregister_mem. */
#ifndef TCPS_MEMNET_H
#define TCPS_MEMNET_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct memnet_mem *memnet_mem_t;

/* An asynchronous send or receive in progress (memnet_async_send/recv), until job_wait or
 * job_done says it is done. */
typedef struct memnet_job {
    uint64_t state[12];
} memnet_job_t;

/* Registers [buffer, buffer + length) for direct and asynchronous transfers. 0 and *mem, or
 * -1: EINVAL (length 0), EFAULT (not all of it is mapped), ENOMEM (the family's 1024 registrations,
 * or the uid's share of the engine's memory, are used up), or what mmap() says. */
int memnet_register_mem(void *buffer, size_t length, memnet_mem_t *mem);
/* 0, or -1: EBUSY while an asynchronous transfer on it is not done, EINVAL. The memory stays
 * where it is, with its contents, private again. */
int memnet_deregister_mem(memnet_mem_t mem);

/* send(socket, buffer + offset, length, 0) that returns once all of it is sent (a
 * non-blocking socket: what the kernel takes at once, or EAGAIN). EFAULT if the range is not
 * inside the registration. Not interrupted by signals; SO_SNDTIMEO does not apply. */
ssize_t memnet_send_direct(int socket, memnet_mem_t mem, size_t offset, size_t length);
/* recv(socket, buffer + offset, length, 0): what is there, at least one byte, 0 at EOF. */
ssize_t memnet_recv_direct(int socket, memnet_mem_t mem, size_t offset, size_t length);

/* Start the same transfer and return at once (length at most 1 GiB). The memory must not be
 * changed (send) or read (receive) until the job is done; each job must be waited for or
 * polled to the end, and its record must stay where it is until then (the library keeps its
 * address). Transfers on one socket complete in the order they were started. */
int memnet_async_send(int socket, memnet_mem_t mem, size_t offset, size_t length,
                      memnet_job_t *job);
int memnet_async_recv(int socket, memnet_mem_t mem, size_t offset, size_t length,
                      memnet_job_t *job);

/* Waits up to timeout_ms (-1: for ever) for the job: its result (bytes, as
 * send_direct/recv_direct return them), or -1 with errno (ETIMEDOUT: not done yet). */
ssize_t memnet_job_wait(memnet_job_t *job, int timeout_ms);
/* 1 if the job is done (then memnet_job_wait returns its result at once), 0 if not. */
int memnet_job_done(memnet_job_t *job);

#ifdef __cplusplus
}
#endif

#endif
