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
//    again it is offloaded again at a call that uses it, if that is safe: no other thread is
//    inside a kernel call on it (each one that moves bytes or changes its epoll registrations
//    is counted, KernelCall, and waits while it moves), and its epoll registrations can move
//    (none is EPOLLONESHOT, whose fired state the kernel does not tell). Its kernel epoll
//    registrations are kept here as the application makes them, and move into the shim's
//    registries with it.
// A connection accepted from a listener served on demand (an inherited one) is kernel-served
// from the start and offered at a call once it is kOnDemandOfferAgeNs old: its move costs a
// round trip with its descriptor, more than a short connection's whole life with the kernel
// (docs/performance.md, "Listeners inherited from outside the shim"), so only connections
// that live on are moved.
// A forked child forgets both kinds, and so does its parent for the kernel-served ones (either
// may be the one that uses such a socket from then on); so do close() and dup2() over it, and
// dup() of a kernel-served one (two numbers for one socket: it stays the kernel's).
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
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

// Listeners this image found open at its start that the shim did not make (socket activation:
// systemd, a supervisor, an inetd "wait" service), by number: others may accept from them too,
// so the engine serves them on demand (ipc::kAdoptOnDemand). Written at start-up only; an
// entry goes (-1) when its number is closed or replaced.
constexpr int kMaxInheritedListeners = 64;
std::atomic<int> g_inherited[kMaxInheritedListeners];
std::atomic<int> g_inherited_count{0};

bool inherited_listener(int fd) {
    const int count = g_inherited_count.load(std::memory_order_acquire);
    for (int k = 0; k < count; ++k)
        if (g_inherited[k].load(std::memory_order_relaxed) == fd) return true;
    return false;
}

void forget_inherited(int fd) {
    const int count = g_inherited_count.load(std::memory_order_acquire);
    for (int k = 0; k < count; ++k) {
        int expected = fd;
        g_inherited[k].compare_exchange_strong(expected, -1);
    }
}

// A received connection that cannot be served with the bytes its sender left unread
// (`error`: why the engine refused it): reset (connect(AF_UNSPEC) is tcp_disconnect(), which
// sends the peer an RST), so that neither side goes on with a stream missing them.
void lose_unread(int fd, uint64_t parked, int error) {
    sockaddr unspec{};
    unspec.sa_family = AF_UNSPEC;
    real(libc.connect)(fd, &unspec, sizeof(unspec));
    char line[200];
    const int n =
        std::snprintf(line, sizeof(line),
                      "tcps: pid %d: a received connection could not be offloaded "
                      "(%s): reset, since the %llu bytes its sender had not read "
                      "could not be delivered first\n",
                      getpid(), std::strerror(-error), static_cast<unsigned long long>(parked));
    if (n > 0) {
        ssize_t ignored = real(libc.write)(2, line, static_cast<size_t>(n));
        (void)ignored;
    }
}

// Offloads the kernel socket at `fd` if the engine takes it; else leaves it untouched. The
// engine checks the socket again, trusting nothing of ours. 0, or -errno (-EBUSY: the engine
// is saturated now).
int adopt_socket(int fd) {
    if (fd < 0 || static_cast<size_t>(fd) >= g_fds.size() || !g_fds.get(fd).empty()) return -EBADF;
    const int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN, -1);
    if (domain != AF_INET && domain != AF_INET6) return -ENOTSOCK;  // closed, reused meanwhile
    const bool listening = int_option(fd, SOL_SOCKET, SO_ACCEPTCONN, 0) == 1;
    // A listener's backlog, to make it again should the engine end (TCP_INFO tells it).
    tcp_info info{};
    socklen_t info_len = sizeof(info);
    const int backlog =
        listening && real(libc.getsockopt)(fd, IPPROTO_TCP, TCP_INFO, &info, &info_len) == 0
            ? static_cast<int>(info.tcpi_sacked)
            : SOMAXCONN;
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
    const int slot = adopt_with_engine(fd, parked, listening && inherited_listener(fd));
    if (slot < 0) {
        real(libc.close)(placeholder);
        // Refused (no slot, the uid's share used up) while bytes its sender's engine had
        // received wait there for it: served from its kernel socket, the stream would go on
        // without them. It is reset instead (a clear end for both sides, said on stderr).
        if (parked > 0 && !listening) lose_unread(fd, parked, slot);
        return slot;
    }
    Socket &sock = socket_state(static_cast<uint32_t>(slot));
    uint32_t gen = sock.generation.load();
    bool took_hold = false;
    const bool joined =
        listening && holds_socket(static_cast<uint32_t>(slot)) && sock.refs.load() > 0;
    if (joined) {
        // A listener this process has already under another number (the engine serves one
        // kernel listener with one slot): this number is a dup of that one.
        sock.refs.fetch_add(1);
    } else {
        gen += 1;
        sock.open(domain, status & O_NONBLOCK, gen);
        if (listening) {
            sock.listening.store(true);
            sock.backlog.store(backlog);
        } else {
            sock.connect_state.store(kConnected);
        }
        sock.rcv_timeout_ns.store(rcv_timeout);
        sock.snd_timeout_ns.store(snd_timeout);
        sock.rcvlowat.store(rcvlowat);
        sock.linger_reset.store(linger_reset);
        if (!holds_socket(static_cast<uint32_t>(slot))) {
            hold_socket(static_cast<uint32_t>(slot));
            took_hold = true;
        }
    }
    // Nobody else is inside a call on this number (adopt_pending).
    if (real(libc.dup3)(placeholder, fd, (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        const int error = errno;
        real(libc.close)(placeholder);
        // Still the kernel socket here: the engine lets go of its descriptor (not of a
        // listener this process holds under another number). Parked bytes it had claimed for
        // us go with it: reset, as for a refusal.
        if (joined) {
            sock.refs.fetch_sub(1);
        } else if (took_hold && unhold_socket(static_cast<uint32_t>(slot))) {
            request_close(static_cast<uint32_t>(slot), false);
        }
        if (parked > 0 && !listening) lose_unread(fd, parked, -error);
        return -error;
    }
    real(libc.close)(placeholder);
    g_fds.set(fd, FdRef::socket(static_cast<uint32_t>(slot), gen));
    return 0;
}

// The map: kNoted (received), kKernelServed, and kAdopting while a thread offers either, in
// the low bits of each fd's word; above them, the kernel calls in flight on the number
// (KernelCall), which a kernel-served socket must have none of to move: the kind and the count
// in one word, so that one compare-and-swap both sees no call in flight and keeps new ones
// out. Anonymous memory as long as the fd table, made at the first note (pages never touched
// cost nothing). The count of noted entries keeps every other lookup at one load.
enum : uint32_t { kNotNoted = 0, kNoted = 1, kAdopting = 2, kKernelServed = 3 };
constexpr uint32_t kKindMask = 3;
constexpr uint32_t kOneCall = 4;
using Entry = std::atomic<uint32_t>;
std::atomic<Entry *> g_pending{nullptr};
std::atomic<int> g_pending_count{0};
std::atomic<int> g_pending_limit{0};  // 1 + the highest fd ever noted: bounds scans
pthread_mutex_t g_pending_mutex = PTHREAD_MUTEX_INITIALIZER;
// Where each entry keeps when it may be offered first (kOnDemandOfferAgeNs): the map's second
// half, the same index. CLOCK_MONOTONIC in ms, wrapping; 0 for no such time.
Entry &offer_at(Entry &entry) {
    return (&entry)[g_fds.size()];
}
size_t map_bytes() {
    return 2 * g_fds.size() * sizeof(Entry);
}
constexpr uint64_t kOnDemandOfferAgeNs = 10'000'000;
// When the next kernel-served socket may be offered (after the engine said it is saturated).
std::atomic<uint64_t> g_reoffload_after_ns{0};
constexpr uint64_t kReoffloadBackoffNs = 100'000'000;  // the engine's load window

// Connections asked back lately (shed), by their kernel socket's inode: the same socket
// moves each way. One asked back again soon after its last move is one whose own load
// saturates whichever worker takes it (a bulk stream): offered back after the load window,
// it would saturate the worker with room that takes it and be asked back again, over and over.
// So each time it is shed within kShedMemoryNs of the last, it stays the kernel's twice as
// long before it is offered again, up to 6.4 s: its moves thin out.
class ShedHistory {
  public:
    // How long the socket with inode `ino`, shed at `now`, stays the kernel's.
    uint64_t hold(uint64_t ino, uint64_t now) {
        Record *slot = &records_[0];
        for (Record &r : records_) {
            if (r.ino == ino) {
                slot = &r;
                break;
            }
            if (r.last_ns < slot->last_ns) slot = &r;  // else the one shed longest ago
        }
        if (slot->ino != ino || now - slot->last_ns > kShedMemoryNs) *slot = Record{ino, 0, 0};
        slot->last_ns = now;
        const uint32_t doublings = std::min<uint32_t>(slot->times++, kMaxDoublings);
        return kReoffloadBackoffNs << doublings;
    }

  private:
    static constexpr uint64_t kShedMemoryNs = 30'000'000'000;
    static constexpr uint32_t kMaxDoublings = 6;  // 100 ms << 6
    struct Record {
        uint64_t ino;
        uint32_t times;
        uint64_t last_ns;
    };
    Record records_[32] = {};
};
ShedHistory g_shed_history;  // under g_pending_mutex

// A call that KernelCall sent back to the shim (became_ours) is being made again.
TCPS_TLS bool tl_retrying = false;

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

Entry *pending_entry(int fd) {
    Entry *map = g_pending.load(std::memory_order_acquire);
    if (!map || fd < 0 || static_cast<size_t>(fd) >= g_fds.size()) return nullptr;
    return &map[fd];
}

uint32_t kind_of(uint32_t word) {
    return word & kKindMask;
}

// Changes the entry's kind from `from` to `to`, keeping its count of calls. False if it was
// not `from`.
bool change_kind(Entry &entry, uint32_t from, uint32_t to) {
    uint32_t word = entry.load(std::memory_order_acquire);
    do {
        if (kind_of(word) != from) return false;
    } while (
        !entry.compare_exchange_weak(word, (word & ~kKindMask) | to, std::memory_order_acq_rel));
    return true;
}

// Waits while another thread offers the socket at `entry` to the engine (a round trip).
void wait_while_adopting(Entry &entry) {
    while (kind_of(entry.load(std::memory_order_acquire)) == kAdopting) sched_yield();
}

// Whether `entry` may not be offered yet at `now` (ns).
bool too_young(Entry &entry, uint64_t now) {
    const uint32_t at = offer_at(entry).load(std::memory_order_relaxed);
    return at != 0 && static_cast<int32_t>(at - static_cast<uint32_t>(now / 1'000'000)) > 0;
}

void note(int fd, uint32_t kind, uint64_t offer_after_ns = 0) {
    if (fd < 0 || static_cast<size_t>(fd) >= g_fds.size()) return;
    if (!g_pending.load(std::memory_order_acquire)) {
        pthread_mutex_lock(&g_pending_mutex);
        if (!g_pending.load(std::memory_order_relaxed)) {
            void *memory = mmap(nullptr, map_bytes(), PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (memory != MAP_FAILED)
                g_pending.store(static_cast<Entry *>(memory), std::memory_order_release);
        }
        pthread_mutex_unlock(&g_pending_mutex);
    }
    Entry *entry = pending_entry(fd);
    if (!entry || kind_of(entry->load(std::memory_order_acquire)) != kNotNoted) return;
    // Before the kind: a thread that sees the kind sees the time (one that only now learns
    // the number; the caller has not returned it yet).
    const uint32_t at_ms = static_cast<uint32_t>(offer_after_ns / 1'000'000);
    offer_at(*entry).store(offer_after_ns == 0 ? 0 : std::max<uint32_t>(at_ms, 1),
                           std::memory_order_relaxed);
    if (!change_kind(*entry, kNotNoted, kind)) return;
    int limit = g_pending_limit.load(std::memory_order_relaxed);
    while (limit < fd + 1 && !g_pending_limit.compare_exchange_weak(limit, fd + 1)) {
    }
    g_pending_count.fetch_add(1, std::memory_order_release);
}

void unnote(Entry &entry, uint32_t from) {
    if (change_kind(entry, from, kNotNoted))
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

// A kernel-served connection, offered to the engine again (see the top). True if `fd` is ours
// now. Called with the entry claimed (kAdopting); leaves it claimed.
bool reoffload(int fd, bool &keep) {
    keep = true;
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

// Whether `fd` could be a socket worth offering: TCP, AF_INET or AF_INET6 (a listener too:
// connections its sender's engine had accepted wait for it, engine/parked.hpp).
bool worth_offering(int fd) {
    const int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN, -1);
    return (domain == AF_INET || domain == AF_INET6) &&
           int_option(fd, SOL_SOCKET, SO_TYPE, -1) == SOCK_STREAM &&
           int_option(fd, SOL_SOCKET, SO_PROTOCOL, -1) == IPPROTO_TCP;
}

bool is_listener(int fd) {
    return int_option(fd, SOL_SOCKET, SO_ACCEPTCONN, 0) == 1;
}

}  // namespace

void note_inherited_listeners() {
    // No session yet (it comes at the first use): a relay's refuses the offer then.
    if (in_vfork_child() || g_fds.size() == 0) return;
    // What is open: /proc/self/fd, read with the raw syscall (no allocation); without /proc,
    // the first numbers.
    int found[kMaxInheritedListeners];
    int count = 0;
    auto consider = [&](int fd) {
        if (count == kMaxInheritedListeners || fd < 0 || static_cast<size_t>(fd) >= g_fds.size() ||
            !g_fds.get(fd).empty() || !is_listener(fd) || !worth_offering(fd))
            return;
        found[count++] = fd;
    };
    const int dir = static_cast<int>(
        syscall(SYS_openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir >= 0) {
        alignas(8) char buffer[4096];
        for (;;) {
            const long n = syscall(SYS_getdents64, dir, buffer, sizeof(buffer));
            if (n <= 0) break;
            for (long at = 0; at < n;) {
                const auto *entry = reinterpret_cast<const dirent64 *>(buffer + at);
                at += entry->d_reclen;
                char *end = nullptr;
                const long fd = std::strtol(entry->d_name, &end, 10);
                if (end != entry->d_name && *end == '\0' && fd != dir)
                    consider(static_cast<int>(fd));
            }
        }
        real(libc.close)(dir);
    } else {
        for (int fd = 0; fd < 1024; ++fd) consider(fd);
    }
    for (int k = 0; k < count; ++k) g_inherited[k].store(found[k], std::memory_order_relaxed);
    g_inherited_count.store(count, std::memory_order_release);
    // Offered at their first use, as received ones are.
    for (int k = 0; k < count; ++k) note(found[k], kNoted);
}

void adopt_received_sockets(const msghdr *msg) {
    if (!msg || !msg->msg_control || msg->msg_controllen < sizeof(cmsghdr)) return;
    if (in_vfork_child() || g_fds.size() == 0 || !session_usable(true) || claims_slots()) return;
    for_each_passed_fd(msg, [](int fd) {
        if (fd >= 0 && static_cast<size_t>(fd) < g_fds.size() && g_fds.get(fd).empty() &&
            worth_offering(fd))
            note(fd, kNoted);
    });
}

void note_kernel_served(int fd, bool engine_saturated) {
    note(fd, kKernelServed);
    if (engine_saturated) back_off_reoffload(kReoffloadBackoffNs);
}

void note_accepted_on_demand(int fd) {
    note(fd, kKernelServed, now_ns() + kOnDemandOfferAgeNs);
}

void note_shed(int fd) {
    note(fd, kKernelServed);
    // The engine that asked for it is saturated: no use offering it back at the next call.
    back_off_reoffload(kReoffloadBackoffNs);
}

void hold_after_shed(int fd) {
    Entry *entry = pending_entry(fd);
    struct stat st {};
    if (!entry || kind_of(entry->load(std::memory_order_acquire)) != kKernelServed ||
        real(libc.fstat)(fd, &st) != 0)
        return;
    const uint64_t now = now_ns();
    pthread_mutex_lock(&g_pending_mutex);
    const uint64_t hold = g_shed_history.hold(static_cast<uint64_t>(st.st_ino), now);
    pthread_mutex_unlock(&g_pending_mutex);
    offer_at(*entry).store(std::max<uint32_t>(static_cast<uint32_t>((now + hold) / 1'000'000), 1),
                           std::memory_order_relaxed);
}

bool adopt_pending(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return false;
    Entry *entry = pending_entry(fd);
    if (!entry) return false;
    uint32_t word = entry->load(std::memory_order_acquire);
    const uint32_t kind = kind_of(word);
    if (kind == kNotNoted) return false;
    // Backing off (a clock read) before the syscall that in_vfork_child() is: while the
    // engine is saturated every call on a kernel-served connection passes here.
    if (kind == kKernelServed) {
        const uint64_t now = now_ns();
        if (now < g_reoffload_after_ns.load(std::memory_order_relaxed) || too_young(*entry, now))
            return false;
    }
    if (in_vfork_child() || shim_locked_here()) return false;
    if (kind == kKernelServed) {
        // Not while another thread is inside a kernel call on it: one asleep in a receive
        // would take bytes meant for the engine's, one in a send would put its bytes among
        // the ring's. Such calls wait while we hold kAdopting (KernelCall).
        if (word != kKernelServed) return false;
    }
    if (kind == kAdopting || !entry->compare_exchange_strong(word, (word & ~kKindMask) | kAdopting,
                                                             std::memory_order_acq_rel)) {
        // Another thread is adopting it (a round trip to the engine): its outcome is ours.
        // Or a kernel call came first: this one goes to the kernel too.
        wait_while_adopting(*entry);
        return !g_fds.get(fd).empty();
    }
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
        change_kind(*entry, kAdopting, kKernelServed);
    } else {
        unnote(*entry, kAdopting);
    }
    return ours;
}

// Counts a kernel call on `fd` if it is a kernel-served socket (waiting out a move another
// thread makes of it): the counted entry, or null.
Entry *count_kernel_call(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return nullptr;
    Entry *entry = pending_entry(fd);
    if (!entry) return nullptr;
    uint32_t word = entry->load(std::memory_order_acquire);
    for (;;) {
        const uint32_t kind = kind_of(word);
        if (kind == kAdopting) {
            // A signal handler's call in the middle of our own move (the control round trip):
            // the kernel's, as it is still, rather than wait for ever.
            if (shim_locked_here()) return nullptr;
            // After the move the call goes where the number is then.
            wait_while_adopting(*entry);
            word = entry->load(std::memory_order_acquire);
            continue;
        }
        if (kind != kKernelServed) return nullptr;  // a received one is adopted at its first call
        if (entry->compare_exchange_weak(word, word + kOneCall, std::memory_order_acq_rel))
            return entry;
    }
}

KernelCall::KernelCall(int fd) {
    entry_ = count_kernel_call(fd);
    // Offloaded by another thread between the caller's look at the table and here: the
    // shim's call, then (the number names our placeholder now). Once per call: the retry
    // makes the kernel's call whatever it finds (an entry being closed, say), so that no
    // table entry can make a call go round for ever.
    if (tl_retrying || __builtin_expect(g_fds.get(fd).kind() != FdKind::kSocket, 1)) return;
    became_ours_ = true;
    tl_retrying = true;
    if (entry_) static_cast<Entry *>(entry_)->fetch_sub(kOneCall, std::memory_order_acq_rel);
    entry_ = nullptr;
}

bool kernel_served_any() {
    return g_pending_count.load(std::memory_order_acquire) != 0;
}

int begin_kernel_wait(int fd) {
    Entry *entry = count_kernel_call(fd);
    if (g_fds.get(fd).kind() != FdKind::kSocket) return entry ? 1 : 0;
    if (entry) entry->fetch_sub(kOneCall, std::memory_order_acq_rel);
    return -1;  // ours meanwhile
}

void end_kernel_wait(int fd) {
    if (Entry *entry = pending_entry(fd)) entry->fetch_sub(kOneCall, std::memory_order_acq_rel);
}

KernelCall::~KernelCall() {
    if (became_ours_) tl_retrying = false;
    if (entry_) static_cast<Entry *>(entry_)->fetch_sub(kOneCall, std::memory_order_acq_rel);
}

void settle_pending_before_dup(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    Entry *entry = pending_entry(fd);
    if (!entry) return;
    if (kind_of(entry->load(std::memory_order_acquire)) == kKernelServed) {
        // Two numbers for one kernel socket: it stays the kernel's.
        unnote(*entry, kKernelServed);
        drop_registrations(fd);
        return;
    }
    adopt_pending(fd);  // a received one: both numbers must be ours, or neither
}

void note_epoll_ctl(int epfd, int op, int fd, const epoll_event *event) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    Entry *entry = pending_entry(fd);
    if (!entry || kind_of(entry->load(std::memory_order_acquire)) != kKernelServed) return;
    pthread_mutex_lock(&g_registrations_mutex);
    auto same = [&](const Registration &r) { return r.fd == fd && r.epfd == epfd; };
    std::erase_if(g_registrations, same);
    if ((op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && event)
        g_registrations.push_back({fd, epfd, *event});
    registrations_changed();
    pthread_mutex_unlock(&g_registrations_mutex);
}

void forget_pending(int fd) {
    forget_inherited(fd);  // one load when nothing was inherited
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    if (Entry *entry = pending_entry(fd)) {
        // A close or dup2 over a number another thread is moving: after the move, so that
        // it closes what the number is then.
        wait_while_adopting(*entry);
        unnote(*entry, kNoted);
        unnote(*entry, kKernelServed);
    }
    drop_registrations(fd);
}

void settle_pending_before_close(int fd) {
    if (__builtin_expect(g_pending_count.load(std::memory_order_acquire) == 0, 1)) return;
    Entry *entry = pending_entry(fd);
    // A received socket closed unused: through the engine, which holds the bytes its sender
    // left unread, so that the close resets the connection as Linux's would.
    if (entry && kind_of(entry->load(std::memory_order_acquire)) == kNoted && adopt_pending(fd))
        return;
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
        if (Entry *entry = pending_entry(fd)) unnote(*entry, kKernelServed);
    pthread_mutex_lock(&g_registrations_mutex);
    g_registrations.clear();
    registrations_changed();
    pthread_mutex_unlock(&g_registrations_mutex);
}

void forget_all_pending() {
    // In a forked child: the map's pages are copies; a new one is made if need be. Received
    // listeners stay noted: a listener is shared by design (a master receives it, its forked
    // workers accept), and whichever first uses it offers it for the family, once (the engine
    // serves one kernel listener with one slot).
    std::vector<int> listeners;
    if (Entry *map = g_pending.load(std::memory_order_acquire)) {
        const int limit = g_pending_limit.load(std::memory_order_relaxed);
        for (int fd = 0; fd < limit; ++fd)
            if (kind_of(map[fd].load(std::memory_order_relaxed)) == kNoted && is_listener(fd))
                listeners.push_back(fd);
    }
    if (Entry *map = g_pending.exchange(nullptr)) munmap(map, map_bytes());
    g_pending_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_registrations_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_registrations.clear();
    registrations_changed();
    g_pending_limit.store(0, std::memory_order_relaxed);
    g_pending_count.store(0, std::memory_order_release);
    for (const int fd : listeners) note(fd, kNoted);
}

}  // namespace tcps::shim
