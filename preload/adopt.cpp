// Adoption (issue 11, item 3): kernel TCP sockets of the application that the engine takes
// over, under the same descriptor numbers (kAdoptSocket, docs/architecture.md, "Adoption").
//
// Two kinds wait here for the moment they can move, each noted in a map by fd number:
//  * received: a socket another process passed with SCM_RIGHTS (adopt_received_sockets). At
//    its first use the engine takes it, with the bytes its sender's engine had received and
//    not read (engine/parked.hpp) queued first. If the engine has no room then (EBUSY), it
//    becomes a kernel-served one.
//  * kernel-served: a connection a saturated engine left to the kernel at accept (seed 003's
//    handoff), or asked back later (handoff.cpp, shed_to_kernel). When the engine has room
//    again it is offloaded again at a call that uses it, if that is safe: the process has one
//    thread (no other call can be inside one on it, or block in it), and its epoll
//    registrations can move (none is EPOLLONESHOT, whose fired state the kernel does not
//    tell). Its kernel epoll registrations are kept here as the application makes them, and
//    move into the shim's registries with it.
// A forked child forgets both kinds, and so does its parent for the kernel-served ones (either
// may be the one that uses such a socket from then on); so do close() and dup2() over it, and
// dup() of a kernel-served one (two numbers for one socket: it stays the kernel's).
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "libc.hpp"
#include "ops.hpp"
#include "session.hpp"

namespace tcps::shim {

namespace {

// A timeout as Socket keeps it (0: wait for ever) from the kernel socket's SO_RCVTIMEO or
// SO_SNDTIMEO. Linux reports "never wait" (a negative timeval) as 0 too: taken as for ever.
int64_t kernel_timeout(int fd, int name) {
    timeval tv{};
    socklen_t len = sizeof(tv);
    if (real(libc.getsockopt)(fd, SOL_SOCKET, name, &tv, &len) != 0 || tv.tv_sec < 0) return 0;
    return static_cast<int64_t>(tv.tv_sec) * 1'000'000'000 + int64_t{tv.tv_usec} * 1000;
}

int int_option(int fd, int level, int name, int fallback) {
    int value = 0;
    socklen_t len = sizeof(value);
    return real(libc.getsockopt)(fd, level, name, &value, &len) == 0 ? value : fallback;
}

// Offloads the kernel socket at `fd` if the engine takes it; else leaves it untouched. The
// engine checks the socket again, trusting nothing of ours. 0, or -errno (-EBUSY: the engine
// is saturated now).
int adopt_socket(int fd) {
    if (fd < 0 || static_cast<size_t>(fd) >= g_fds.size() || !g_fds.get(fd).empty()) return -EBADF;
    const int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN, -1);
    if (domain != AF_INET && domain != AF_INET6) return -ENOTSOCK;  // closed, reused meanwhile
    // What the kernel socket holds that the shim keeps itself, before the engine changes it
    // (it keeps the low-water mark itself and puts the kernel socket's back to 1).
    const int status = real(libc.fcntl)(fd, F_GETFL);
    const int fd_flags = real(libc.fcntl)(fd, F_GETFD);
    if (status < 0 || fd_flags < 0) return -errno;
    const int64_t rcv_timeout = kernel_timeout(fd, SO_RCVTIMEO);
    const int64_t snd_timeout = kernel_timeout(fd, SO_SNDTIMEO);
    const int rcvlowat = std::max(1, int_option(fd, SOL_SOCKET, SO_RCVLOWAT, 1));
    linger lg{};
    socklen_t lg_len = sizeof(lg);
    const bool linger_reset = real(libc.getsockopt)(fd, SOL_SOCKET, SO_LINGER, &lg, &lg_len) == 0 &&
                              lg.l_onoff && lg.l_linger == 0;
    const int placeholder = open_placeholder(fd_flags & FD_CLOEXEC);
    if (placeholder < 0) return placeholder;
    uint64_t parked = 0;
    const int slot = adopt_with_engine(fd, parked);
    if (slot < 0) {
        real(libc.close)(placeholder);
        return slot;
    }
    Socket &sock = socket_state(static_cast<uint32_t>(slot));
    const uint32_t gen = sock.generation.load() + 1;
    sock.open(domain, status & O_NONBLOCK, gen);
    sock.connect_state.store(kConnected);
    sock.rcv_timeout_ns.store(rcv_timeout);
    sock.snd_timeout_ns.store(snd_timeout);
    sock.rcvlowat.store(rcvlowat);
    sock.linger_reset.store(linger_reset);
    hold_socket(static_cast<uint32_t>(slot));
    // Nobody else is inside a call on this number (adopt_pending).
    if (real(libc.dup3)(placeholder, fd, (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        const int error = errno;
        real(libc.close)(placeholder);
        // Still the kernel socket here: the engine lets go of its descriptor. Parked bytes it
        // had queued for us would be lost: say so.
        if (unhold_socket(static_cast<uint32_t>(slot)))
            request_close(static_cast<uint32_t>(slot), false);
        if (parked > 0) {
            char line[160];
            const int n = std::snprintf(line, sizeof(line),
                                        "tcps: pid %d: a received socket could not be offloaded: "
                                        "%llu bytes its sender had not read are lost\n",
                                        getpid(), static_cast<unsigned long long>(parked));
            if (n > 0) {
                ssize_t ignored = real(libc.write)(2, line, static_cast<size_t>(n));
                (void)ignored;
            }
        }
        return -error;
    }
    real(libc.close)(placeholder);
    g_fds.set(fd, FdRef::socket(static_cast<uint32_t>(slot), gen));
    return 0;
}

// The map: kNoted (received), kKernelServed, and kAdopting while a thread offers either.
// Anonymous memory as long as the fd table, made at the first note (pages never touched cost
// nothing). The count keeps every other lookup at one load.
enum : uint8_t { kNotNoted = 0, kNoted = 1, kAdopting = 2, kKernelServed = 3 };
std::atomic<std::atomic<uint8_t> *> g_pending{nullptr};
std::atomic<int> g_pending_count{0};
std::atomic<int> g_pending_limit{0};  // 1 + the highest fd ever noted: bounds scans
pthread_mutex_t g_pending_mutex = PTHREAD_MUTEX_INITIALIZER;
// When the next kernel-served socket may be offered (after the engine said it is saturated).
std::atomic<uint64_t> g_reoffload_after_ns{0};
constexpr uint64_t kReoffloadBackoffNs = 100'000'000;  // the engine's load window
constexpr uint64_t kThreadsBackoffNs = 1'000'000'000;  // after finding several threads

// No kernel-served socket is offered again for `ns`.
void back_off_reoffload(uint64_t ns) {
    g_reoffload_after_ns.store(now_ns() + ns, std::memory_order_relaxed);
}

// A kernel-served socket's registrations in the application's kernel epolls.
struct Registration {
    int fd;
    int epfd;
    epoll_event event;
};
pthread_mutex_t g_registrations_mutex = PTHREAD_MUTEX_INITIALIZER;
std::vector<Registration> g_registrations;
std::atomic<size_t> g_registration_count{0};  // its size, for a look without the mutex

void registrations_changed() {
    g_registration_count.store(g_registrations.size(), std::memory_order_release);
}

std::atomic<uint8_t> *pending_entry(int fd) {
    std::atomic<uint8_t> *map = g_pending.load(std::memory_order_acquire);
    if (!map || fd < 0 || static_cast<size_t>(fd) >= g_fds.size()) return nullptr;
    return &map[fd];
}

void note(int fd, uint8_t kind) {
    if (fd < 0 || static_cast<size_t>(fd) >= g_fds.size()) return;
    if (!g_pending.load(std::memory_order_acquire)) {
        pthread_mutex_lock(&g_pending_mutex);
        if (!g_pending.load(std::memory_order_relaxed)) {
            void *memory = mmap(nullptr, g_fds.size(), PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (memory != MAP_FAILED)
                g_pending.store(static_cast<std::atomic<uint8_t> *>(memory),
                                std::memory_order_release);
        }
        pthread_mutex_unlock(&g_pending_mutex);
    }
    std::atomic<uint8_t> *entry = pending_entry(fd);
    uint8_t expected = kNotNoted;
    if (!entry || !entry->compare_exchange_strong(expected, kind, std::memory_order_acq_rel))
        return;
    int limit = g_pending_limit.load(std::memory_order_relaxed);
    while (limit < fd + 1 && !g_pending_limit.compare_exchange_weak(limit, fd + 1)) {
    }
    g_pending_count.fetch_add(1, std::memory_order_release);
}

void unnote(std::atomic<uint8_t> &entry, uint8_t from) {
    uint8_t expected = from;
    if (entry.compare_exchange_strong(expected, kNotNoted, std::memory_order_acq_rel))
        g_pending_count.fetch_sub(1, std::memory_order_release);
}

// Drops the kept registrations of socket `fd`, and those in epoll `fd` (it is closing).
void drop_registrations(int fd) {
    if (g_registration_count.load(std::memory_order_acquire) == 0) return;  // every close
    pthread_mutex_lock(&g_registrations_mutex);
    std::erase_if(g_registrations,
                  [fd](const Registration &r) { return r.fd == fd || r.epfd == fd; });
    registrations_changed();
    pthread_mutex_unlock(&g_registrations_mutex);
}

}  // namespace

bool single_threaded() {
    const long file = syscall(SYS_openat, AT_FDCWD, "/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (file < 0) return false;
    char text[1024];
    const long n = syscall(SYS_read, file, text, sizeof(text) - 1);
    syscall(SYS_close, file);
    if (n <= 0) return false;
    text[n] = '\0';
    const char *at = std::strrchr(text, ')');  // the command name may hold anything
    if (!at) return false;
    // Fields 3 onwards follow ") "; num_threads is field 20.
    for (int field = 2; field < 20 && at; ++field) at = std::strchr(at + 1, ' ');
    return at && std::strtol(at + 1, nullptr, 10) == 1;
}

namespace {

// A kernel-served connection, offered to the engine again (see the top). True if `fd` is ours
// now. Called with the entry claimed (kAdopting); leaves it claimed.
bool reoffload(int fd, bool &keep) {
    keep = true;
    if (!single_threaded()) {
        // Looked at again in a second, not at every call (/proc costs three system calls).
        back_off_reoffload(kThreadsBackoffNs);
        return false;
    }
    pthread_mutex_lock(&g_registrations_mutex);
    std::vector<Registration> mine;
    for (const Registration &r : g_registrations)
        if (r.fd == fd) mine.push_back(r);
    pthread_mutex_unlock(&g_registrations_mutex);
    for (const Registration &r : mine) {
        if (r.event.events & EPOLLONESHOT) {
            keep = false;
            return false;
        }
    }
    // Out of the kernel epolls while the number still names the kernel socket: afterwards
    // the kernel could no longer find the items, which would report it for ever.
    for (Registration &r : mine) real(libc.epoll_ctl)(r.epfd, EPOLL_CTL_DEL, fd, nullptr);
    const int rc = adopt_socket(fd);
    SocketRef ref;
    if (rc == 0 && find_socket(fd, ref)) {
        for (Registration &r : mine) op_epoll_ctl(r.epfd, EPOLL_CTL_ADD, ref, &r.event);
        drop_registrations(fd);
        keep = false;
        return true;
    }
    for (Registration &r : mine) real(libc.epoll_ctl)(r.epfd, EPOLL_CTL_ADD, fd, &r.event);
    // Saturated, or out of room for a moment: later. Anything else (it was shut down, say):
    // it stays the kernel's.
    keep = rc == -EBUSY || rc == -ENOMEM || rc == -ENFILE || rc == -ENOBUFS || rc == -EMFILE;
    if (keep) back_off_reoffload(kReoffloadBackoffNs);
    return false;
}

// Whether `fd` could be a socket worth offering: TCP, AF_INET or AF_INET6, not a listener.
bool worth_offering(int fd) {
    const int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN, -1);
    return (domain == AF_INET || domain == AF_INET6) &&
           int_option(fd, SOL_SOCKET, SO_TYPE, -1) == SOCK_STREAM &&
           int_option(fd, SOL_SOCKET, SO_PROTOCOL, -1) == IPPROTO_TCP &&
           int_option(fd, SOL_SOCKET, SO_ACCEPTCONN, 1) == 0;
}

}  // namespace

void adopt_received_sockets(const msghdr *msg) {
    if (!msg || !msg->msg_control || msg->msg_controllen < sizeof(cmsghdr)) return;
    if (in_vfork_child() || g_fds.size() == 0 || !session_usable(true) || claims_slots()) return;
    for_each_passed_fd(msg, [](int fd) {
        if (fd >= 0 && static_cast<size_t>(fd) < g_fds.size() && g_fds.get(fd).empty() &&
            worth_offering(fd))
            note(fd, kNoted);
    });
}

void note_kernel_served(int fd) {
    note(fd, kKernelServed);
}

void note_shed(int fd) {
    note(fd, kKernelServed);
    // The engine that asked for it is saturated: no use offering it back at the next call.
    back_off_reoffload(kReoffloadBackoffNs);
}

bool adopt_pending(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return false;
    std::atomic<uint8_t> *entry = pending_entry(fd);
    if (!entry) return false;
    uint8_t kind = entry->load(std::memory_order_acquire);
    if (kind == kNotNoted) return false;
    if (in_vfork_child() || shim_locked_here()) return false;
    if (kind == kKernelServed && now_ns() < g_reoffload_after_ns.load(std::memory_order_relaxed))
        return false;
    if (kind != kAdopting &&
        entry->compare_exchange_strong(kind, kAdopting, std::memory_order_acq_rel)) {
        bool keep = false;
        bool ours = false;
        if (kind == kNoted) {
            const int rc = adopt_socket(fd);
            ours = rc == 0;
            // The engine has no room now: like a connection it left to the kernel at accept.
            if (rc == -EBUSY) {
                keep = true;
                back_off_reoffload(kReoffloadBackoffNs);
            }
        } else {
            ours = reoffload(fd, keep);
        }
        if (keep) {
            entry->store(kKernelServed, std::memory_order_release);
        } else {
            unnote(*entry, kAdopting);
        }
        return ours;
    }
    // Another thread is adopting it (a round trip to the engine): its outcome is ours.
    while (entry->load(std::memory_order_acquire) == kAdopting) sched_yield();
    return !g_fds.get(fd).empty();
}

void settle_pending_before_dup(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    std::atomic<uint8_t> *entry = pending_entry(fd);
    if (!entry) return;
    if (entry->load(std::memory_order_acquire) == kKernelServed) {
        // Two numbers for one kernel socket: it stays the kernel's.
        unnote(*entry, kKernelServed);
        drop_registrations(fd);
        return;
    }
    adopt_pending(fd);  // a received one: both numbers must be ours, or neither
}

void note_epoll_ctl(int epfd, int op, int fd, const epoll_event *event) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    std::atomic<uint8_t> *entry = pending_entry(fd);
    if (!entry || entry->load(std::memory_order_acquire) != kKernelServed) return;
    pthread_mutex_lock(&g_registrations_mutex);
    auto same = [&](const Registration &r) { return r.fd == fd && r.epfd == epfd; };
    std::erase_if(g_registrations, same);
    if ((op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && event)
        g_registrations.push_back({fd, epfd, *event});
    registrations_changed();
    pthread_mutex_unlock(&g_registrations_mutex);
}

void forget_pending(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    if (std::atomic<uint8_t> *entry = pending_entry(fd)) {
        unnote(*entry, kNoted);
        unnote(*entry, kKernelServed);
    }
    drop_registrations(fd);
}

void settle_pending_before_close(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    std::atomic<uint8_t> *entry = pending_entry(fd);
    // A received socket closed unused: through the engine, which holds the bytes its sender
    // left unread, so that the close resets the connection as Linux's would.
    if (entry && entry->load(std::memory_order_acquire) == kNoted && adopt_pending(fd)) return;
    forget_pending(fd);
}

void forget_pending_range(unsigned first, unsigned last) {
    if (g_pending_count.load(std::memory_order_acquire) == 0) return;
    const unsigned limit = static_cast<unsigned>(g_pending_limit.load(std::memory_order_acquire));
    for (unsigned fd = first; fd <= last && fd < limit; ++fd) forget_pending(static_cast<int>(fd));
}

void forget_kernel_served() {
    if (g_pending_count.load(std::memory_order_acquire) == 0) return;
    const int limit = g_pending_limit.load(std::memory_order_acquire);
    for (int fd = 0; fd < limit; ++fd)
        if (std::atomic<uint8_t> *entry = pending_entry(fd)) unnote(*entry, kKernelServed);
    pthread_mutex_lock(&g_registrations_mutex);
    g_registrations.clear();
    registrations_changed();
    pthread_mutex_unlock(&g_registrations_mutex);
}

void forget_all_pending() {
    // In a forked child: the map's pages are copies; a new one is made if need be.
    if (std::atomic<uint8_t> *map = g_pending.exchange(nullptr)) munmap(map, g_fds.size());
    g_pending_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_registrations_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_registrations.clear();
    registrations_changed();
    g_pending_limit.store(0, std::memory_order_relaxed);
    g_pending_count.store(0, std::memory_order_release);
}

}  // namespace tcps::shim
