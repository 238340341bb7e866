// libtcps_memnet.so: the MemNet API (tcps_memnet.h). Through the engine when libtcps.so is
// loaded and the socket is offloaded (memnet_hooks.h), through the kernel otherwise.
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <deque>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "memnet_hooks.h"
#include "tcps_memnet.h"

#define MEMNET_EXPORT extern "C" __attribute__((visibility("default")))

struct memnet_mem {
    uint8_t *buffer = nullptr;
    size_t length = 0;
    uint8_t *span = nullptr;  // the whole pages holding the buffer
    size_t span_length = 0;
    int64_t engine_id = -1;  // the engine's registration, or -1: kernel calls only
    std::atomic<uint32_t> jobs{0};
};

namespace {

constexpr uintptr_t kPage = 4096;

// kKernelRecv: a receive on a kernel socket that had nothing yet (ticket.slot is the fd).
enum JobPhase : uint64_t { kIdle = 0, kEngine = 1, kDone = 2, kKernelRecv = 3 };

// The job's opaque words.
struct Job {
    uint64_t phase;
    int64_t result;
    memnet_mem *mem;
    tcps_memnet_ticket ticket;
};
static_assert(sizeof(Job) <= sizeof(memnet_job_t), "a job fits its public record");

Job &job_of(memnet_job_t *job) {
    return *reinterpret_cast<Job *>(job->state);
}

// Each socket's kernel receives still waiting, oldest first: their bytes come in the order they
// were posted, as the engine's do, so a receive posted while an earlier one waits waits too.
std::mutex g_waiting_mutex;
std::unordered_map<int, std::deque<Job *>> g_waiting;

// Under g_waiting_mutex: `job`, the oldest waiting receive of its socket, takes what the
// socket has. True once it is done (then it no longer waits).
bool take_kernel_bytes(Job &job) {
    const int fd = static_cast<int>(job.ticket.slot);
    const ssize_t n = ::recv(fd, job.ticket.local, job.ticket.len, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return false;
    job.result = n < 0 ? -errno : n;
    job.phase = kDone;
    auto found = g_waiting.find(fd);
    found->second.pop_front();
    if (found->second.empty()) g_waiting.erase(found);
    return true;
}

const tcps_memnet_hooks *hooks() {
    static const tcps_memnet_hooks *found = [] {
        auto fn =
            reinterpret_cast<tcps_memnet_hooks_fn>(dlsym(RTLD_DEFAULT, "tcps_memnet_hooks_v1"));
        return fn ? fn() : nullptr;
    }();
    return found;
}

long fail(int error) {
    errno = error;
    return -1;
}

long finish(long result) {
    return result < 0 ? fail(static_cast<int>(-result)) : result;
}

// Moves the pages [span, span + length) to a memfd mapped shared at the same address, with
// their contents. The memfd, or -errno.
int share_pages(uint8_t *span, size_t length) {
    const int fd = memfd_create("tcps-memnet", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -errno;
    int error = 0;
    void *copy = MAP_FAILED;
    if (ftruncate(fd, static_cast<off_t>(length)) != 0 ||
        (copy = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        error = errno;
    } else {
        std::memcpy(copy, span, length);
        if (mmap(span, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED)
            error = errno;
        munmap(copy, length);
    }
    // Sealed: the engine maps only a memfd that cannot shrink under it.
    if (!error && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
        error = errno;
    if (error) {
        close(fd);
        return -error;
    }
    return fd;
}

// Makes the pages private anonymous memory again, with their contents.
int unshare_pages(uint8_t *span, size_t length) {
    void *copy = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (copy == MAP_FAILED) return -errno;
    std::memcpy(copy, span, length);
    if (mremap(copy, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, span) == MAP_FAILED) {
        const int error = errno;
        munmap(copy, length);
        return -error;
    }
    return 0;
}

bool in_range(const memnet_mem *mem, size_t offset, size_t length) {
    return offset <= mem->length && length <= mem->length - offset;
}

// The kernel's send(), until all is sent, as the engine's send_direct.
long kernel_send_all(int socket, const uint8_t *at, size_t length) {
    size_t sent = 0;
    while (sent < length) {
        const ssize_t n = send(socket, at + sent, length - sent, 0);
        if (n < 0) {
            if (errno == EINTR && sent == 0) continue;
            return sent > 0 ? static_cast<long>(sent) : -errno;
        }
        sent += static_cast<size_t>(n);
    }
    return static_cast<long>(sent);
}

long kernel_recv(int socket, uint8_t *at, size_t length) {
    const ssize_t n = recv(socket, at, length, 0);
    return n < 0 ? -errno : n;
}

long transfer(int socket, memnet_mem_t mem, size_t offset, size_t length, bool recv) {
    if (!mem) return -EINVAL;
    if (!in_range(mem, offset, length)) return -EFAULT;
    uint8_t *at = mem->buffer + offset;
    long result = 0;
    const tcps_memnet_hooks *h = hooks();
    if (mem->engine_id >= 0 && h &&
        h->direct(socket, recv, static_cast<uint32_t>(mem->engine_id),
                  static_cast<uint64_t>(at - mem->span), at, length, &result))
        return result;
    return recv ? kernel_recv(socket, at, length) : kernel_send_all(socket, at, length);
}

int start_job(int socket, memnet_mem_t mem, size_t offset, size_t length, memnet_job_t *out,
              bool recv) {
    if (!out || !mem) return static_cast<int>(fail(EINVAL));
    if (!in_range(mem, offset, length)) return static_cast<int>(fail(EFAULT));
    if (length > TCPS_MEMNET_MAX_REQUEST) return static_cast<int>(fail(EINVAL));
    Job &job = job_of(out);
    std::memset(out, 0, sizeof(*out));
    job.mem = mem;
    uint8_t *at = mem->buffer + offset;
    const tcps_memnet_hooks *h = hooks();
    if (mem->engine_id >= 0 && h && length > 0) {
        const int posted = h->post(socket, recv, static_cast<uint32_t>(mem->engine_id),
                                   static_cast<uint64_t>(at - mem->span), at, length, &job.ticket);
        if (posted < 0) return static_cast<int>(fail(-posted));
        if (posted == 1) {
            mem->jobs.fetch_add(1, std::memory_order_relaxed);
            job.phase = kEngine;
            return 0;
        }
    }
    // The kernel's socket: a send is done before returning (the kernel has no asynchronous
    // send()); a receive takes what is there, or waits in job_wait/job_done, behind the
    // socket's receives that wait already.
    if (recv) {
        std::lock_guard<std::mutex> lock(g_waiting_mutex);
        const bool behind = g_waiting.count(socket) != 0;
        const ssize_t n = behind ? -1 : ::recv(socket, at, length, MSG_DONTWAIT);
        if (behind || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && length > 0 &&
                       !(fcntl(socket, F_GETFL) & O_NONBLOCK))) {
            job.phase = kKernelRecv;
            job.ticket.slot = static_cast<uint32_t>(socket);
            job.ticket.local = at;
            job.ticket.len = length;
            g_waiting[socket].push_back(&job);
            return 0;
        }
        job.result = n < 0 ? -errno : n;
    } else {
        job.result = kernel_send_all(socket, at, length);
    }
    job.phase = kDone;
    return 0;
}

uint64_t now_ms() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1'000'000;
}

// 1 done, 0 not within timeout_ms. A kernel receive takes its bytes only once the receives
// posted before it on its socket have theirs (they are taken first, into their own buffers).
int settle(Job &job, int timeout_ms) {
    if (job.phase == kKernelRecv) {
        const int fd = static_cast<int>(job.ticket.slot);
        const uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : now_ms() + timeout_ms;
        for (;;) {
            {
                std::lock_guard<std::mutex> lock(g_waiting_mutex);
                if (job.phase == kDone) return 1;
                auto found = g_waiting.find(fd);
                if (found == g_waiting.end()) return -EINVAL;  // cannot be: it waits in it
                const bool front_done = take_kernel_bytes(*found->second.front());
                if (job.phase == kDone) return 1;
                if (front_done) continue;  // an earlier one had its turn; ours may be next
            }
            const uint64_t now = now_ms();
            if (now >= deadline) return 0;
            pollfd ready{fd, POLLIN, 0};
            const int wait_ms = deadline == UINT64_MAX ? -1 : static_cast<int>(deadline - now);
            if (poll(&ready, 1, wait_ms) == 0) return 0;
        }
    }
    if (job.phase == kDone) return 1;
    if (job.phase != kEngine) return -EINVAL;
    long result = 0;
    if (!hooks()->complete(&job.ticket, timeout_ms, &result)) return 0;
    job.result = result;
    job.phase = kDone;
    job.mem->jobs.fetch_sub(1, std::memory_order_release);
    return 1;
}

// Whether every page of [span, span + length) is mapped: mincore() says ENOMEM otherwise.
bool mapped(uint8_t *span, size_t length) {
    std::vector<unsigned char> pages(length / kPage);
    return mincore(span, length, pages.data()) == 0;
}

}  // namespace

MEMNET_EXPORT int memnet_register_mem(void *buffer, size_t length, memnet_mem_t *out) {
    if (!buffer || length == 0 || !out) return static_cast<int>(fail(EINVAL));
    const auto begin = reinterpret_cast<uintptr_t>(buffer);
    if (begin + length < begin) return static_cast<int>(fail(EINVAL));
    // Memory that is not there is EFAULT, as the socket calls say, never a crash here.
    auto *const first_page = reinterpret_cast<uint8_t *>(begin & ~(kPage - 1));
    const size_t span_length =
        ((begin + length + kPage - 1) & ~(kPage - 1)) - (begin & ~(kPage - 1));
    if (!mapped(first_page, span_length)) return static_cast<int>(fail(EFAULT));
    auto *mem = new (std::nothrow) memnet_mem;
    if (!mem) return static_cast<int>(fail(ENOMEM));
    mem->buffer = static_cast<uint8_t *>(buffer);
    mem->length = length;
    mem->span = first_page;
    mem->span_length = span_length;
    if (const tcps_memnet_hooks *h = hooks()) {
        const int memfd = share_pages(mem->span, mem->span_length);
        if (memfd < 0) {
            delete mem;
            return static_cast<int>(fail(-memfd));
        }
        uint32_t id = 0;
        const int rc = h->register_mem(memfd, mem->span_length, &id);
        close(memfd);  // the mapping keeps it, and the engine has its own
        if (rc == 0) {
            mem->engine_id = id;
        } else {
            unshare_pages(mem->span, mem->span_length);
            if (rc != -ENOSYS) {  // no engine here: the kernel's calls
                delete mem;
                return static_cast<int>(fail(-rc));
            }
        }
    }
    *out = mem;
    return 0;
}

MEMNET_EXPORT int memnet_deregister_mem(memnet_mem_t mem) {
    if (!mem) return static_cast<int>(fail(EINVAL));
    if (mem->jobs.load(std::memory_order_acquire) != 0) return static_cast<int>(fail(EBUSY));
    if (mem->engine_id >= 0) {
        hooks()->deregister_mem(static_cast<uint32_t>(mem->engine_id));
        const int rc = unshare_pages(mem->span, mem->span_length);
        if (rc != 0) return static_cast<int>(fail(-rc));
    }
    delete mem;
    return 0;
}

MEMNET_EXPORT ssize_t memnet_send_direct(int socket, memnet_mem_t mem, size_t offset,
                                         size_t length) {
    return finish(transfer(socket, mem, offset, length, false));
}

MEMNET_EXPORT ssize_t memnet_recv_direct(int socket, memnet_mem_t mem, size_t offset,
                                         size_t length) {
    return finish(transfer(socket, mem, offset, length, true));
}

MEMNET_EXPORT int memnet_async_send(int socket, memnet_mem_t mem, size_t offset, size_t length,
                                    memnet_job_t *job) {
    return start_job(socket, mem, offset, length, job, false);
}

MEMNET_EXPORT int memnet_async_recv(int socket, memnet_mem_t mem, size_t offset, size_t length,
                                    memnet_job_t *job) {
    return start_job(socket, mem, offset, length, job, true);
}

MEMNET_EXPORT ssize_t memnet_job_wait(memnet_job_t *out, int timeout_ms) {
    if (!out) return fail(EINVAL);
    Job &job = job_of(out);
    const int done = settle(job, timeout_ms);
    if (done < 0) return fail(-done);
    if (!done) return fail(ETIMEDOUT);
    return finish(job.result);
}

MEMNET_EXPORT int memnet_job_done(memnet_job_t *out) {
    if (!out) return static_cast<int>(fail(EINVAL));
    const int done = settle(job_of(out), 0);
    if (done < 0) return static_cast<int>(fail(-done));
    return done;
}
