// SCM_RIGHTS: an offloaded socket passed to another process goes back to the kernel.
//
// The receiver may be any process, with or without the shim, and only the kernel socket means
// the same thing everywhere. So when the application sends one of our descriptors over an
// AF_UNIX socket, the engine stops receiving on it, sends what its tx ring still holds, and
// gives us its kernel socket; we put that socket under every descriptor number the application
// has for it (dup3 over the placeholders) and the message then carries the real socket. From
// then on the kernel serves it, in the sender too. Bytes the engine had already received and
// the application had not read cannot be put back into the kernel socket: the engine keeps
// them for the socket's next owner (engine/parked.hpp). A receiver that runs with tcps offers
// each connected TCP socket it receives to the engine (adopt_received_sockets), which serves
// those bytes first and the rest of the stream after them: nothing is lost, and the socket is
// offloaded again. A receiver without tcps would not see them (the engine drops them after a
// minute and says so in its log). An exec of a program that will not load the shim (static,
// set-user-ID) hands its inherited sockets back the same way (exec.cpp), their unread bytes
// lost and said on stderr.
//
// After the engine's end, a listener takes the same path with a kernel socket of our own
// making (recover_listener()): the engine's kernel socket died with it, so its owner binds a
// new one to the same address.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>

#include "libc.hpp"
#include "ops.hpp"
#include "session.hpp"

namespace tcps::shim {

namespace {

// Puts `kernel_fd` under every descriptor number this process has for the socket of `ref`,
// each keeping its FD_CLOEXEC, and closes `kernel_fd`. Its epoll registrations move into the
// application's kernel epolls, and calls in flight on it find it stale.
void put_kernel_socket(const SocketRef &ref, int kernel_fd) {
    Socket &sock = *ref.sock;
    // O_NONBLOCK is the open file description's: the kernel socket's now.
    const int status = real(libc.fcntl)(kernel_fd, F_GETFL);
    if (status >= 0)
        real(libc.fcntl)(kernel_fd, F_SETFL,
                         sock.nonblocking.load() ? status | O_NONBLOCK : status & ~O_NONBLOCK);
    const FdRef entry = FdRef::socket(ref.slot, ref.generation);
    const int limit = g_fds.limit();
    for (int fd = 0; fd < limit; ++fd) {
        if (!(g_fds.get(fd) == entry)) continue;
        const int fd_flags = real(libc.fcntl)(fd, F_GETFD);
        if (real(libc.dup3)(kernel_fd, fd,
                            fd_flags > 0 && (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0)
            continue;
        if (g_fds.take_if(fd, entry)) sock.refs.fetch_sub(1, std::memory_order_acq_rel);
    }
    real(libc.close)(kernel_fd);
    epoll_hand_back(entry);  // its fd numbers are kernel sockets now
    sock.generation.fetch_add(1, std::memory_order_acq_rel);  // calls in flight find it stale
}

// SO_RCVTIMEO/SO_SNDTIMEO as the shim keeps them (Socket::rcv_timeout_ns) onto a kernel socket.
void set_timeout(int fd, int name, int64_t ns) {
    if (ns == 0) return;  // the default: wait for ever
    // A negative value stands for Linux's zero timeout (never wait), which only a negative
    // timeval sets.
    timeval tv{-1, 0};
    if (ns > 0)
        tv = {static_cast<time_t>(ns / 1'000'000'000),
              static_cast<suseconds_t>((ns % 1'000'000'000 + 999) / 1000)};
    real(libc.setsockopt)(fd, SOL_SOCKET, name, &tv, sizeof(tv));
}

// What the application set on the socket, onto `fd`: the options the engine accepted, in
// order, then those the shim keeps itself.
void apply_options(const SocketRef &ref, int fd) {
    const Socket &sock = *ref.sock;
    const uint32_t count =
        std::min(sock.options.claimed.load(std::memory_order_acquire), OptionLog::kEntries);
    for (uint32_t k = 0; k < count; ++k) {
        const OptionLog::Entry &entry = sock.options.entries[k];
        if (!entry.ready.load(std::memory_order_acquire)) continue;
        // As it was accepted before: what fails now (a capability dropped since) is left out.
        real(libc.setsockopt)(fd, entry.level, entry.name, entry.value, entry.len);
    }
    set_timeout(fd, SO_RCVTIMEO, sock.rcv_timeout_ns.load());
    set_timeout(fd, SO_SNDTIMEO, sock.snd_timeout_ns.load());
    const uint32_t posted = ref.shm->posted.load(std::memory_order_acquire);
    if (posted & ipc::kPostedNoDelaySet) {
        const int on = (posted & ipc::kPostedNoDelay) ? 1 : 0;
        real(libc.setsockopt)(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
    }
    if (posted & ipc::kPostedCorkSet) {
        const int on = (posted & ipc::kPostedCork) ? 1 : 0;
        real(libc.setsockopt)(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on));
    }
}

// bind() to `local`, waiting while the port is in use, for at most a second: the dead engine's
// kernel listener outlives its process for a few ms, held by the io_uring accept it had posted
// until the ring's asynchronous teardown cancels it (measured: 5-11 ms after SIGKILL). False
// with errno set if the port stays taken.
bool bind_when_free(int fd, const ipc::SockAddrRecord &local) {
    const auto *addr = reinterpret_cast<const sockaddr *>(local.bytes);
    const uint64_t deadline = now_ns() + 1'000'000'000;
    while (real(libc.bind)(fd, addr, local.len) != 0) {
        if (errno != EADDRINUSE || now_ns() >= deadline) return false;
        timespec pause{0, 1'000'000};
        nanosleep(&pause, nullptr);
    }
    return true;
}

}  // namespace

int recover_listener(const SocketRef &ref, int backlog) {
    // The address the engine's socket had (bind() and listen() refresh it), port included.
    const ipc::SockAddrRecord local = ref.shm->local_addr;
    if (local.len < sizeof(sa_family_t) || local.len > sizeof(local.bytes)) return -EINVAL;
    const int fd = real(libc.socket)(ref.sock->domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    apply_options(ref, fd);
    if (!bind_when_free(fd, local) || real(libc.listen)(fd, backlog) != 0) {
        const int error = errno;
        real(libc.close)(fd);
        return -error;
    }
    put_kernel_socket(ref, fd);
    // No hold to give back, no close to send: there is no engine to tell.
    return 0;
}

void recover_listeners() {
    const int limit = g_fds.limit();
    for (int fd = 0; fd < limit; ++fd) {
        SocketRef ref;
        if (!find_socket(fd, ref) || !ref.sock->listening.load() || ref.sock->remake_tried.load() ||
            !remakes_listener(ref.slot) || ref.sock->remake_tried.exchange(true))
            continue;
        recover_listener(ref, ref.sock->backlog.load());
    }
}

void hand_back(const SocketRef &ref, bool park) {
    Handoff handoff;
    if (request_handoff(ref.slot, park, handoff) != 0) return;
    put_kernel_socket(ref, handoff.kernel_fd);
    // The engine's descriptor goes too; the kernel socket lives on in ours.
    if (unhold_socket(ref.slot)) request_close(ref.slot, false);
    if (handoff.lost_bytes > 0 || handoff.lost_connections > 0) {
        char line[200];
        const int n = std::snprintf(
            line, sizeof(line),
            "tcps: pid %d: socket handed back to the kernel: %u received bytes and %u queued "
            "connections the application had not taken are lost\n",
            getpid(), handoff.lost_bytes, handoff.lost_connections);
        if (n > 0) {
            ssize_t ignored = real(libc.write)(2, line, static_cast<size_t>(n));
            (void)ignored;
        }
    }
}

namespace {

// Calls `each(fd)` for every descriptor an AF_UNIX message carries with SCM_RIGHTS.
template <class Each>
void for_each_passed_fd(const msghdr *msg, Each &&each) {
    if (!msg || !msg->msg_control || msg->msg_controllen < sizeof(cmsghdr)) return;
    for (cmsghdr *cmsg = CMSG_FIRSTHDR(const_cast<msghdr *>(msg)); cmsg;
         cmsg = CMSG_NXTHDR(const_cast<msghdr *>(msg), cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS ||
            cmsg->cmsg_len < CMSG_LEN(0))
            continue;
        const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t k = 0; k < count; ++k) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(cmsg) + k * sizeof(int), sizeof(fd));
            each(fd);
        }
    }
}

}  // namespace

void hand_back_passed_sockets(const msghdr *msg) {
    for_each_passed_fd(msg, [](int fd) {
        SocketRef ref;
        if (find_socket(fd, ref)) hand_back(ref, true);
    });
}

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
// engine checks the socket again, trusting nothing of ours.
void adopt_received(int fd) {
    if (fd < 0 || static_cast<size_t>(fd) >= g_fds.size() || !g_fds.get(fd).empty()) return;
    const int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN, -1);
    if (domain != AF_INET && domain != AF_INET6) return;  // closed and reused meanwhile
    // What the kernel socket holds that the shim keeps itself, before the engine changes it
    // (it keeps the low-water mark itself and puts the kernel socket's back to 1).
    const int status = real(libc.fcntl)(fd, F_GETFL);
    const int fd_flags = real(libc.fcntl)(fd, F_GETFD);
    if (status < 0 || fd_flags < 0) return;
    const int64_t rcv_timeout = kernel_timeout(fd, SO_RCVTIMEO);
    const int64_t snd_timeout = kernel_timeout(fd, SO_SNDTIMEO);
    const int rcvlowat = std::max(1, int_option(fd, SOL_SOCKET, SO_RCVLOWAT, 1));
    linger lg{};
    socklen_t lg_len = sizeof(lg);
    const bool linger_reset = real(libc.getsockopt)(fd, SOL_SOCKET, SO_LINGER, &lg, &lg_len) == 0 &&
                              lg.l_onoff && lg.l_linger == 0;
    const int placeholder = open_placeholder(fd_flags & FD_CLOEXEC);
    if (placeholder < 0) return;
    uint64_t parked = 0;
    const int slot = adopt_with_engine(fd, parked);
    if (slot < 0) {
        real(libc.close)(placeholder);
        return;
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
    // Nobody is inside a call on this number: this is the first call that uses it.
    if (real(libc.dup3)(placeholder, fd, (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
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
        return;
    }
    real(libc.close)(placeholder);
    g_fds.set(fd, FdRef::socket(static_cast<uint32_t>(slot), gen));
}

}  // namespace

namespace {

// Received sockets wait for their first use (adopt_pending) in a map indexed by fd number,
// as long as the fd table (anonymous memory: pages never touched cost nothing), made at the
// first one: kNoted, then kAdopting while a thread offers it. The count keeps every other
// lookup at one load.
enum : uint8_t { kNotNoted = 0, kNoted = 1, kAdopting = 2 };
std::atomic<std::atomic<uint8_t> *> g_pending{nullptr};
std::atomic<int> g_pending_count{0};
std::atomic<int> g_pending_limit{0};  // 1 + the highest fd ever noted: bounds scans
pthread_mutex_t g_pending_mutex = PTHREAD_MUTEX_INITIALIZER;

std::atomic<uint8_t> *pending_entry(int fd) {
    std::atomic<uint8_t> *map = g_pending.load(std::memory_order_acquire);
    if (!map || fd < 0 || static_cast<size_t>(fd) >= g_fds.size()) return nullptr;
    return &map[fd];
}

void note_pending(int fd) {
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
    if (!entry || !entry->compare_exchange_strong(expected, kNoted, std::memory_order_acq_rel))
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
            note_pending(fd);
    });
}

bool adopt_pending(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return false;
    std::atomic<uint8_t> *entry = pending_entry(fd);
    if (!entry || entry->load(std::memory_order_acquire) == kNotNoted) return false;
    if (in_vfork_child() || shim_locked_here()) return false;
    uint8_t expected = kNoted;
    if (entry->compare_exchange_strong(expected, kAdopting, std::memory_order_acq_rel)) {
        adopt_received(fd);
        unnote(*entry, kAdopting);
        return !g_fds.get(fd).empty();
    }
    // Another thread is adopting it (a round trip to the engine): its outcome is ours.
    while (entry->load(std::memory_order_acquire) == kAdopting) sched_yield();
    return !g_fds.get(fd).empty();
}

void forget_pending(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    if (std::atomic<uint8_t> *entry = pending_entry(fd)) unnote(*entry, kNoted);
}

void forget_pending_range(unsigned first, unsigned last) {
    if (g_pending_count.load(std::memory_order_acquire) == 0) return;
    const unsigned limit = static_cast<unsigned>(g_pending_limit.load(std::memory_order_acquire));
    for (unsigned fd = first; fd <= last && fd < limit; ++fd)
        if (std::atomic<uint8_t> *entry = pending_entry(static_cast<int>(fd)))
            unnote(*entry, kNoted);
}

void forget_all_pending() {
    // In a forked child: the map's pages are copies; a new one is made if need be.
    if (std::atomic<uint8_t> *map = g_pending.exchange(nullptr)) munmap(map, g_fds.size());
    g_pending_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_pending_limit.store(0, std::memory_order_relaxed);
    g_pending_count.store(0, std::memory_order_release);
}

}  // namespace tcps::shim
