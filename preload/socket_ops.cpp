// Socket control operations: socket, bind, listen, connect, accept, shutdown, names, options,
// fcntl, ioctl, close and dup, with Linux's results for each case.
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "libc.hpp"
#include "ops.hpp"
#include "ring.hpp"

namespace tcps::shim {

// An O_PATH descriptor of /dev/null keeps the number of an offloaded socket: the kernel
// never reuses it behind us, and a call we do not intercept gets EBADF, never another
// object's data. openat directly: an interposed open() (fakeroot, say) has no business here.
int open_placeholder(bool cloexec) {
    const long fd = syscall(SYS_openat, AT_FDCWD, "/dev/null", O_PATH | (cloexec ? O_CLOEXEC : 0));
    return fd < 0 ? -errno : static_cast<int>(fd);
}

namespace {

// SO_RCVTIMEO_NEW/SO_SNDTIMEO_NEW (Linux 5.1): same 16-byte layout as timeval on 64-bit.
constexpr int kSoRcvTimeoNew = 66;
constexpr int kSoSndTimeoNew = 67;
constexpr socklen_t kMaxSockAddr = sizeof(sockaddr_storage);  // the kernel's limit

int copy_address(ipc::Request &req, const sockaddr *addr, socklen_t len) {
    if (len > kMaxSockAddr) return -EINVAL;
    if (len > 0 && !addr) return -EFAULT;
    const uint32_t n = std::min<uint32_t>(len, ipc::kSockAddrMax);
    if (n > 0) std::memcpy(req.addr, addr, n);
    req.addr_len = n;
    return 0;
}

// Copies an address record out as the kernel's move_addr_to_user() does: truncated to the
// caller's room, with the full length reported.
long give_address(const ipc::SockAddrRecord &record, sockaddr *addr, socklen_t *len) {
    if (!len) return -EFAULT;
    if (static_cast<int>(*len) < 0) return -EINVAL;
    const uint32_t full = std::min<uint32_t>(record.len, ipc::kSockAddrMax);
    const uint32_t n = std::min<uint32_t>(full, *len);
    if (n > 0) {
        if (!addr) return -EFAULT;
        std::memcpy(addr, record.bytes, n);
    }
    *len = full;
    return 0;
}

// A listener whose engine is gone gets no more connections. accept() says so once, with
// ECONNABORTED ("a connection was aborted before it was accepted"), which servers treat as
// transient: they log it and go on, rather than exit or retry in a loop. So does every call
// that was asleep in accept() when the engine went: none of them sleeps on a dead engine.
// After that the listener behaves as an idle one (EAGAIN, or a wait that only a signal or
// SO_RCVTIMEO ends), so that a server that retries accept() does not spin.
long accept_without_engine(Socket &listener, bool was_waiting, int64_t timeout_ns) {
    const bool first = !listener.end_reported.exchange(true);
    if (first || was_waiting) return -ECONNABORTED;
    if (timeout_ns == 0) return -EAGAIN;
    timespec ts{static_cast<time_t>(timeout_ns / 1'000'000'000),
                static_cast<long>(timeout_ns % 1'000'000'000)};
    const int rc = real(libc.ppoll)(nullptr, 0, timeout_ns < 0 ? nullptr : &ts, nullptr);
    return rc < 0 ? -errno : -EAGAIN;
}

ipc::Request make_request(ipc::Op op, int arg0 = 0, int arg1 = 0, int arg2 = 0) {
    ipc::Request req{};
    req.op = static_cast<uint32_t>(op);
    req.arg0 = arg0;
    req.arg1 = arg1;
    req.arg2 = arg2;
    return req;
}

uint32_t slot_flags(const SocketRef &ref) {
    return ref.shm->flags.load(std::memory_order_acquire);
}

// The kernel keeps socket timeouts in jiffies (CONFIG_HZ, invisible to user space): learn
// the tick once from a kernel socket, so our timeouts round and read back as Linux's do.
int64_t jiffy_ns() {
    static std::atomic<int64_t> cached{0};
    int64_t tick = cached.load(std::memory_order_relaxed);
    if (tick > 0) return tick;
    tick = 1000;  // no rounding if the kernel will not say
    const int probe = real(libc.socket)(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0) {
        timeval tv{0, 1};
        socklen_t len = sizeof(tv);
        if (real(libc.setsockopt)(probe, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0 &&
            real(libc.getsockopt)(probe, SOL_SOCKET, SO_RCVTIMEO, &tv, &len) == 0 &&
            tv.tv_sec == 0 && tv.tv_usec > 0)
            tick = static_cast<int64_t>(tv.tv_usec) * 1000;
        real(libc.close)(probe);
    }
    cached.store(tick, std::memory_order_relaxed);
    return tick;
}

int64_t timeval_to_timeout(const timeval &tv) {
    if (tv.tv_sec < 0) return -1;  // Linux: a zero timeout, i.e. never wait
    const int64_t ns = static_cast<int64_t>(tv.tv_sec) * 1'000'000'000 + tv.tv_usec * 1000;
    if (ns == 0) return 0;
    const int64_t tick = jiffy_ns();
    return (ns + tick - 1) / tick * tick;
}

timeval timeout_to_timeval(int64_t ns) {
    if (ns <= 0) return {0, 0};
    return {static_cast<time_t>(ns / 1'000'000'000),
            static_cast<suseconds_t>((ns % 1'000'000'000 + 999) / 1000)};
}

// Gives an int option back as Linux does: at most sizeof(int) bytes, length reported.
long give_int(int value, void *out, socklen_t *len) {
    if (!len) return -EFAULT;
    if (static_cast<int>(*len) < 0) return -EINVAL;
    const socklen_t n = std::min<socklen_t>(*len, sizeof(int));
    if (n > 0) {
        if (!out) return -EFAULT;
        std::memcpy(out, &value, n);
    }
    *len = n;
    return 0;
}

// One more fd names what `ref` names.
void retain_entry(FdRef ref) {
    if (ref.kind() == FdKind::kSocket)
        socket_state(ref.slot()).refs.fetch_add(1, std::memory_order_acq_rel);
    else if (ref.kind() == FdKind::kEpoll)
        epoll_retain(ref.id());
}

}  // namespace

// ---------------------------------------------------------------------------------------------

// Forgets whatever the table held for an fd after the kernel closed or replaced it.
void forget_entry(FdRef previous) {
    switch (previous.kind()) {
        case FdKind::kSocket: {
            Socket &sock = socket_state(previous.slot());
            if (sock.generation.load() == previous.generation() &&
                sock.refs.fetch_sub(1, std::memory_order_acq_rel) == 1)
                socket_release(previous.slot());
            break;
        }
        case FdKind::kEpoll:
            epoll_release(previous.id());
            break;
        default:
            break;
    }
}

// A relay session's socket(): the client claims a slot and asks the engine on it.
long relay_socket(int domain) {
    const int slot = claim_client_slot();
    if (slot < 0) return -EMFILE;  // the relay's session has all its 1,024 sockets
    const int rc = request(static_cast<uint32_t>(slot), make_request(ipc::Op::kSocket, domain));
    if (rc != 0) release_client_slot(static_cast<uint32_t>(slot));
    return rc == 0 ? slot : rc;
}

long op_socket(int domain, int type, int protocol) {
    // A socket() from a signal handler that interrupted this thread inside the session's setup
    // or a hold (the first socket(), a close) would wait for the interrupted code's mutex, that
    // is for itself: it gets a kernel socket, as a process without an engine does.
    if (in_vfork_child() || shim_locked_here() || !session_usable(true)) return kUseKernel;
    // The new fd first: without one, Linux's socket() fails (EMFILE/ENFILE) before anything.
    const int fd = open_placeholder(type & SOCK_CLOEXEC);
    if (fd < 0) return fd;
    if (static_cast<size_t>(fd) >= g_fds.size()) {
        real(libc.close)(fd);
        return -EMFILE;
    }
    (void)protocol;
    const long slot = claims_slots() ? relay_socket(domain) : new_socket(domain);
    if (slot < 0) {
        real(libc.close)(fd);
        // The engine went away meanwhile: new sockets are the kernel's from now on. Any other
        // refusal (the uid's share of the engine, the family's last slot) is the caller's.
        if (slot == -ECONNRESET || session_dead()) return kUseKernel;
        return slot;
    }
    Socket &sock = socket_state(static_cast<uint32_t>(slot));
    const uint32_t gen = sock.generation.load() + 1;
    sock.open(domain, type & SOCK_NONBLOCK, gen);
    hold_socket(static_cast<uint32_t>(slot));
    g_fds.set(fd, FdRef::socket(static_cast<uint32_t>(slot), gen));
    return fd;
}

long op_bind(SocketRef &ref, const sockaddr *addr, socklen_t len) {
    ipc::Request req = make_request(ipc::Op::kBind);
    if (const int rc = copy_address(req, addr, len); rc != 0) return rc;
    return request(ref.slot, req);
}

long op_listen(SocketRef &ref, int backlog) {
    Socket &sock = *ref.sock;
    if (session_dead()) {
        // The engine's kernel socket is gone with it: a listener or a bound socket is made
        // again in the kernel, as this listen() asks (nginx calls it on a reload that changes
        // a backlog).
        if (!(slot_flags(ref) & (ipc::kFlagBound | ipc::kFlagListening))) return -ECONNRESET;
        return recover_listener(ref, backlog);
    }
    const int rc = request(ref.slot, make_request(ipc::Op::kListen, backlog));
    if (rc == 0) {
        sock.listening.store(true);
        sock.shut_rd.store(false);
        sock.backlog.store(backlog);
    }
    return rc;
}

long op_connect(SocketRef &ref, const sockaddr *addr, socklen_t len) {
    Socket &sock = *ref.sock;
    ipc::Request req = make_request(ipc::Op::kConnect);
    if (const int rc = copy_address(req, addr, len); rc != 0) return rc;
    if (len < sizeof(sa_family_t)) return -EINVAL;
    if (sock.listening.load()) return -EISCONN;

    // __inet_stream_connect(): what the call says depends on the socket's state.
    long error;
    const int state = sock.connect_state.load();
    if (state == kConnected) return -EISCONN;
    if (state == kConnecting) {
        error = -EALREADY;
    } else {
        int rc = request(ref.slot, req);
        // After a failed attempt the engine's own socket is still "connecting" in its kernel
        // until a connect() collects the failure (ECONNABORTED, the error having gone to the
        // engine): that call resets it, and the next one starts the new attempt.
        if (rc == -ECONNABORTED && sock.disconnected.load()) rc = request(ref.slot, req);
        if (rc == 0) {
            sock.connect_state.store(kConnected);
            return 0;
        }
        if (rc != -EINPROGRESS) return rc;
        sock.disconnected.store(false);
        sock.connect_state.store(kConnecting);
        // A non-blocking connect that has just started says so, however fast the handshake
        // (or its failure) was: only a later call reports the outcome.
        if (effective_timeout(sock, sock.nonblocking.load(), false) == 0) return -EINPROGRESS;
        error = -EINPROGRESS;
    }

    auto settled = [&] {
        return (slot_flags(ref) & (ipc::kFlagConnected | ipc::kFlagReset)) || error_pending(ref) ||
               session_dead() || stale(ref);
    };
    if (!settled()) {
        const int64_t timeout = effective_timeout(sock, sock.nonblocking.load(), false);
        switch (wait_until(ref.slot, settled, timeout, socket_wait_interrupt(timeout, false))) {
            case WaitResult::kTimeout:
                return error;  // EINPROGRESS/EALREADY: still connecting
            case WaitResult::kInterrupted:
                return -EINTR;
            case WaitResult::kDead:
                return -ECONNREFUSED;
            case WaitResult::kReady:
                break;
        }
    }
    if (stale(ref)) return -EBADF;
    if (session_dead()) return -ECONNREFUSED;
    const uint32_t flags = slot_flags(ref);
    if ((flags & ipc::kFlagConnected) && !(flags & ipc::kFlagReset)) {
        sock.connect_state.store(kConnected);
        return 0;
    }
    // The attempt failed: report its error once; Linux then disconnects the socket, which
    // may connect again.
    const int failure = take_error(ref);
    sock.connect_state.store(kUnconnected);
    sock.disconnected.store(true);
    return -(failure ? failure : ECONNABORTED);
}

// A connection accept() took from a listener's twin: the kernel's, offloaded when the engine
// has room again (it is saturated now); from a listener served on demand, once it lives on.
namespace {
void note_from_twin(const ipc::SocketSlot &listener, int fd) {
    if (listener.flags.load() & ipc::kFlagAcceptOnDemand) {
        note_accepted_on_demand(fd);
    } else {
        note_kernel_served(fd, true);
    }
}
}  // namespace

long op_accept(SocketRef &ref, sockaddr *addr, socklen_t *len, int flags) {
    Socket &listener = *ref.sock;
    if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) return -EINVAL;
    if (!listener.listening.load()) return -EINVAL;
    if (addr && !len) return -EFAULT;
    if (addr && static_cast<int>(*len) < 0) return -EINVAL;

    ipc::SocketSlot &shm = *ref.shm;
    // A saturated engine sends new connections to the listener's twin (engine/twin.cpp): with
    // none in the accept ring, the kernel's own accept, under the number it picks.
    if (shm.acc_tail.load(std::memory_order_acquire) ==
            shm.acc_head.load(std::memory_order_relaxed) &&
        twin_ready(ref) && !stale(ref) && !session_dead()) {
        const long got = accept_from_twin(ref, -1, addr, len, flags);
        if (got >= 0) {
            // The kernel's, as one a saturated engine left to it at accept: offloaded again
            // when the engine has room (adopt.cpp); from an inherited listener, once it lives on.
            note_from_twin(shm, static_cast<int>(got));
            return got;
        }
        if (got != -EAGAIN) return got;
        report_twin_drained(ref);  // taken by another process: the engine watches again
    }
    // The new fd first: without one, Linux's accept fails and the connection stays queued.
    const int fd = open_placeholder(flags & SOCK_CLOEXEC);
    if (fd < 0) return fd;
    if (static_cast<size_t>(fd) >= g_fds.size()) {
        real(libc.close)(fd);
        return -EMFILE;
    }
    const int64_t timeout = effective_timeout(listener, listener.nonblocking.load(), true);
    uint32_t taken = ipc::kMaxSockets;
    long error = 0;
    bool waited = false;
    bool from_twin = false;
    listener.rx_lock.lock();
    while (taken == ipc::kMaxSockets) {
        if (stale(ref)) {
            // Closed under us, or made again in the kernel after the engine's end.
            error = session_dead() ? -ECONNABORTED : -EBADF;
            break;
        }
        if (!listener.listening.load()) {
            error = -EINVAL;
            break;
        }
        if (session_dead()) {
            error = accept_without_engine(listener, waited, timeout);
            break;
        }
        // The rx lock is the family's: acc_head is ours to move while we hold it.
        const uint32_t head = shm.acc_head.load(std::memory_order_relaxed);
        if (head != shm.acc_tail.load(std::memory_order_acquire)) {
            const uint32_t index = shm.accept_ring[head & (ipc::kAcceptRingEntries - 1)];
            shm.acc_head.store(head + 1, std::memory_order_release);
            // Our acc_head before our look at the flag; the engine sets it, then re-reads
            // acc_head (post_accept): one of us sees the other.
            std::atomic_thread_fence(std::memory_order_seq_cst);
            if (shm.flags.load(std::memory_order_relaxed) & ipc::kFlagAcceptPaused)
                notify_engine(ref.slot);
            // Engine-written: an index we cannot map is skipped, never used.
            if (index != ref.slot && map_slot(index)) taken = index;
            continue;
        }
        // Came to the twin while we waited.
        if (twin_ready(ref)) {
            const long got = accept_from_twin(ref, fd, addr, len, flags);
            if (got >= 0) {
                from_twin = true;
                break;
            }
            if (got != -EAGAIN) {
                error = got;
                break;
            }
            // Taken by another process, or never there: the engine clears the flag and
            // watches again.
            report_twin_drained(ref);
            continue;
        }
        // Connections wait in the kernel that the engine cannot take for us (the family has
        // all its slots, or our uid its share of the engine): Linux's accept() says EMFILE
        // while a connection waits and no descriptor is left; we say why, and do not wait.
        if (const int refused = shm.accept_error.load(std::memory_order_acquire); refused > 0) {
            error = -refused;
            break;
        }
        if (timeout == 0) {
            error = -EAGAIN;
            break;
        }
        listener.rx_lock.unlock();
        auto ready = [&] {
            return shm.acc_tail.load(std::memory_order_acquire) !=
                       shm.acc_head.load(std::memory_order_relaxed) ||
                   shm.accept_error.load(std::memory_order_relaxed) > 0 || twin_ready(ref) ||
                   !listener.listening.load() || stale(ref);
        };
        waited = true;
        const WaitResult result =
            wait_until(ref.slot, ready, timeout, socket_wait_interrupt(timeout, false));
        listener.rx_lock.lock();
        if (result == WaitResult::kTimeout) error = -EAGAIN;
        if (result == WaitResult::kInterrupted) error = -EINTR;
        if (error != 0) break;
    }
    listener.rx_lock.unlock();
    if (from_twin) {
        note_from_twin(shm, fd);
        return fd;
    }
    if (error != 0) {
        real(libc.close)(fd);
        // The process that is to remake the listener, told of the engine's end, makes it again
        // in the kernel: its next accept() takes kernel connections. Once: a call that finds it
        // stale was asleep in it when the engine went, and reports the end as the others do.
        if (error == -ECONNABORTED && session_dead() && !stale(ref) &&
            !listener.remake_tried.load() && remakes_listener(ref.slot) &&
            !listener.remake_tried.exchange(true))
            recover_listener(ref, listener.backlog.load());
        return error;
    }

    Socket &sock = socket_state(taken);
    const uint32_t gen = sock.generation.load() + 1;
    sock.open(listener.domain, flags & SOCK_NONBLOCK, gen);
    sock.connect_state.store(kConnected);
    // sk_clone_lock() copies these from the listener.
    sock.rcv_timeout_ns.store(listener.rcv_timeout_ns.load());
    sock.snd_timeout_ns.store(listener.snd_timeout_ns.load());
    sock.linger_reset.store(listener.linger_reset.load());
    sock.rcvlowat.store(listener.rcvlowat.load());
    hold_socket(taken);
    g_fds.set(fd, FdRef::socket(taken, gen));
    if (addr) give_address(region().slot(taken).peer_addr, addr, len);
    // The engine was saturated when it accepted this one (seed 003's handoff): it stays with
    // the kernel, and the engine has read nothing of it. Its kernel socket goes under fd; if
    // that fails, the engine serves it once we use it.
    if (region().slot(taken).flags.load(std::memory_order_acquire) & ipc::kFlagKernelServed) {
        SocketRef conn;
        if (find_socket(fd, conn)) hand_back(conn, 0);
        // Offloaded again when the engine has room (adopt.cpp).
        if (g_fds.get(fd).empty()) note_kernel_served(fd);
    }
    return fd;
}

namespace {

// After shutdown(SHUT_RD) of a listener the engine has reset the connections the application
// never took; Linux forgets them, so take them off the accept ring and release their slots.
void drop_unaccepted(SocketRef &ref) {
    Socket &listener = *ref.sock;
    ipc::SocketSlot &shm = *ref.shm;
    listener.rx_lock.lock();
    const uint32_t tail = shm.acc_tail.load(std::memory_order_acquire);
    uint32_t head = shm.acc_head.load(std::memory_order_relaxed);
    // Engine-written: at most one ring's worth, and only engine-range indices are closed.
    for (uint32_t n = 0; head != tail && n < ipc::kAcceptRingEntries; ++n, ++head) {
        const uint32_t index = shm.accept_ring[head & (ipc::kAcceptRingEntries - 1)];
        if (index != ref.slot && map_slot(index)) request_close(index, true);
    }
    shm.acc_head.store(head, std::memory_order_release);
    listener.rx_lock.unlock();
    notify_engine(ref.slot);
}

}  // namespace

long op_shutdown(SocketRef &ref, int how) {
    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) return -EINVAL;
    Socket &sock = *ref.sock;
    const bool listening = sock.listening.load();
    const uint32_t flags = slot_flags(ref);
    const bool connecting = sock.connect_state.load() == kConnecting &&
                            !(flags & (ipc::kFlagConnected | ipc::kFlagReset));
    // Both FINs sent and the peer's received: the kernel socket may be TCP_CLOSE by now, and
    // then Linux says ENOTCONN. Ask the engine.
    const bool both_fins =
        (flags & ipc::kFlagRxEof) && (sock.shut_wr.load() || (flags & ipc::kFlagTxShut));
    if (!listening && !connecting && (flags & ipc::kFlagConnected) && !(flags & ipc::kFlagReset) &&
        !both_fins && !session_dead()) {
        // Connected, not reset, not both FINs: Linux answers 0, so post it and go on; a
        // server's lingering close does this for every connection.
        const uint32_t bits =
            (how != SHUT_WR ? ipc::kPostedShutRd : 0u) | (how != SHUT_RD ? ipc::kPostedShutWr : 0u);
        if (how != SHUT_WR) sock.shut_rd.store(true);
        if (how != SHUT_RD) sock.shut_wr.store(true);
        if ((ref.shm->posted.fetch_or(bits, std::memory_order_release) & bits) != bits)
            notify_engine(ref.slot);
        return 0;
    }
    const int rc = request(ref.slot, make_request(ipc::Op::kShutdown, how));
    if (rc != 0 && rc != -ENOTCONN) return rc;
    // inet_shutdown(): a listener (for SHUT_RD/SHUT_RDWR) or a connecting socket (for any
    // `how`) is disconnected instead; any other socket records the shutdown, even when the
    // answer is ENOTCONN.
    if (listening || connecting) {
        if (connecting || how != SHUT_WR) {
            sock.listening.store(false);
            sock.connect_state.store(kUnconnected);
            sock.disconnected.store(true);
        }
        if (listening && how != SHUT_WR) drop_unaccepted(ref);
        return rc;
    }
    if (how != SHUT_WR) sock.shut_rd.store(true);
    if (how != SHUT_RD) sock.shut_wr.store(true);
    return rc;
}

long op_getsockname(SocketRef &ref, sockaddr *addr, socklen_t *len) {
    if (!len) return -EFAULT;
    if (ref.shm->local_addr.len == 0) request(ref.slot, make_request(ipc::Op::kGetSockName));
    ipc::SockAddrRecord record = ref.shm->local_addr;
    if (record.len == 0 || record.len > ipc::kSockAddrMax) {
        // Unbound: the wildcard address of the socket's family, port 0, as Linux reports it.
        std::memset(&record, 0, sizeof(record));
        const sa_family_t family = static_cast<sa_family_t>(ref.sock->domain);
        record.len = family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
        std::memcpy(record.bytes, &family, sizeof(family));
    }
    return give_address(record, addr, len);
}

long op_getpeername(SocketRef &ref, sockaddr *addr, socklen_t *len) {
    const uint32_t flags = slot_flags(ref);
    const ipc::SockAddrRecord record = ref.shm->peer_addr;
    if (!(flags & ipc::kFlagConnected) || (flags & ipc::kFlagReset) || record.len == 0 ||
        ref.sock->listening.load())
        return -ENOTCONN;
    return give_address(record, addr, len);
}

namespace {

// The bits of SocketSlot::posted that hold option `name`, for the options kept there.
struct TcpHintBits {
    uint32_t set = 0;
    uint32_t value = 0;
};

TcpHintBits tcp_hint_bits(int level, int name) {
    if (level != IPPROTO_TCP) return {};
    if (name == TCP_CORK) return {ipc::kPostedCorkSet, ipc::kPostedCork};
    if (name == TCP_NODELAY) return {ipc::kPostedNoDelaySet, ipc::kPostedNoDelay};
    return {};
}

}  // namespace

long op_getsockopt(SocketRef &ref, int level, int name, void *value, socklen_t *len) {
    if (!len) return -EFAULT;
    if (static_cast<int>(*len) < 0) return -EINVAL;
    Socket &sock = *ref.sock;
    if (const TcpHintBits bits = tcp_hint_bits(level, name); bits.set) {
        const uint32_t posted = ref.shm->posted.load(std::memory_order_acquire);
        if (posted & bits.set) return give_int((posted & bits.value) ? 1 : 0, value, len);
    }
    if (level == SOL_SOCKET) {
        switch (name) {
            case SO_RCVTIMEO:
            case SO_SNDTIMEO:
            case kSoRcvTimeoNew:
            case kSoSndTimeoNew: {
                const bool rcv = name == SO_RCVTIMEO || name == kSoRcvTimeoNew;
                const timeval tv = timeout_to_timeval(rcv ? sock.rcv_timeout_ns.load()
                                                          : sock.snd_timeout_ns.load());
                const socklen_t n = std::min<socklen_t>(*len, sizeof(tv));
                if (n > 0) {
                    if (!value) return -EFAULT;
                    std::memcpy(value, &tv, n);
                }
                *len = n;
                return 0;
            }
            case SO_ERROR:
                return give_int(take_error(ref), value, len);
            case SO_TYPE:
                return give_int(SOCK_STREAM, value, len);
            case SO_DOMAIN:
                return give_int(sock.domain, value, len);
            case SO_PROTOCOL:
                return give_int(IPPROTO_TCP, value, len);
            case SO_ACCEPTCONN:
                return give_int(sock.listening.load() ? 1 : 0, value, len);
            default:
                break;
        }
    }
    if (*len > 0 && !value) return -EFAULT;
    const socklen_t room = std::min<socklen_t>(*len, ipc::kOptMax);
    ipc::Request req = make_request(ipc::Op::kGetSockOpt, level, name, static_cast<int>(room));
    // Some options read their input from the buffer (TCP_ULP-style queries).
    if (room > 0) std::memcpy(req.opt, value, room);
    req.opt_len = room;
    ipc::Response response;
    const int rc = request(ref.slot, req, &response);
    if (rc < 0) return rc;
    const uint32_t n = std::min<uint32_t>(response.opt_len, room);
    if (n > 0) std::memcpy(value, response.opt, n);
    *len = n;
    return 0;
}

long op_setsockopt(SocketRef &ref, int level, int name, const void *value, socklen_t len) {
    if (static_cast<int>(len) < 0) return -EINVAL;
    if (len > 0 && !value) return -EFAULT;
    Socket &sock = *ref.sock;
    if (level == SOL_SOCKET && (name == SO_RCVTIMEO || name == SO_SNDTIMEO ||
                                name == kSoRcvTimeoNew || name == kSoSndTimeoNew)) {
        // Kept by the client: only it waits. sock_set_timeout()'s checks.
        timeval tv;
        if (len < sizeof(tv)) return -EINVAL;
        std::memcpy(&tv, value, sizeof(tv));
        if (tv.tv_usec < 0 || tv.tv_usec >= 1'000'000) return -EDOM;
        const int64_t timeout = timeval_to_timeout(tv);
        if (name == SO_RCVTIMEO || name == kSoRcvTimeoNew)
            sock.rcv_timeout_ns.store(timeout);
        else
            sock.snd_timeout_ns.store(timeout);
        return 0;
    }
    if (const TcpHintBits bits = tcp_hint_bits(level, name); bits.set) {
        // do_tcp_setsockopt(): an int, and any non-zero value means on.
        if (len < sizeof(int)) return -EINVAL;
        int on;
        std::memcpy(&on, value, sizeof(on));
        std::atomic<uint32_t> &posted = ref.shm->posted;
        uint32_t old = posted.load(std::memory_order_relaxed);
        uint32_t want;
        do {
            want = (old & ~bits.value) | bits.set | (on ? bits.value : 0);
            if (want == old) return 0;
        } while (!posted.compare_exchange_weak(old, want, std::memory_order_release,
                                               std::memory_order_relaxed));
        notify_engine(ref.slot);  // uncorking must push what is queued, as on Linux
        return 0;
    }
    if (level == SOL_SOCKET && name == SO_OOBINLINE) want_urgent(ref);
    ipc::Request req = make_request(ipc::Op::kSetSockOpt, level, name);
    req.opt_len = std::min<uint32_t>(len, ipc::kOptMax);
    if (req.opt_len > 0) std::memcpy(req.opt, value, req.opt_len);
    const int rc = request(ref.slot, req);
    // Kept for a listener to be made again in the kernel if the engine goes.
    if (rc == 0) sock.options.add(level, name, value, len);
    if (rc == 0 && level == SOL_SOCKET && name == SO_LINGER && len >= sizeof(linger)) {
        linger value_linger;
        std::memcpy(&value_linger, value, sizeof(value_linger));
        sock.linger_reset.store(value_linger.l_onoff && value_linger.l_linger == 0);
    }
    if (rc == 0 && level == SOL_SOCKET && name == SO_RCVLOWAT) {
        // The kernel normalises the value (0 means 1, negative means INT_MAX): ask it.
        ipc::Request query = make_request(ipc::Op::kGetSockOpt, SOL_SOCKET, SO_RCVLOWAT,
                                          static_cast<int>(sizeof(int)));
        query.opt_len = sizeof(int);
        ipc::Response response;
        if (request(ref.slot, query, &response) == 0 && response.opt_len >= sizeof(int)) {
            int lowat;
            std::memcpy(&lowat, response.opt, sizeof(lowat));
            sock.rcvlowat.store(std::max(lowat, 1));
        }
    }
    return rc;
}

long op_stat(SocketRef &ref, unsigned mask, int flags, struct statx &out) {
    ipc::Request req =
        make_request(ipc::Op::kStat, static_cast<int>(mask), flags & AT_STATX_SYNC_TYPE);
    ipc::Response response;
    const int rc = session_dead() ? -ECONNRESET : request(ref.slot, req, &response);
    if (rc == 0 && response.opt_len == sizeof(out)) {
        std::memcpy(&out, response.opt, sizeof(out));
        return 0;
    }
    if (rc < 0 && rc != -ECONNRESET && rc != -EPIPE) return rc;
    // The engine is gone (its socket with it): a socket still, as the descriptor is.
    out = {};
    out.stx_mask =
        STATX_TYPE | STATX_MODE | STATX_NLINK | STATX_UID | STATX_GID | STATX_SIZE | STATX_BLOCKS;
    out.stx_mode = S_IFSOCK | 0777;
    out.stx_nlink = 1;
    out.stx_uid = geteuid();
    out.stx_gid = getegid();
    out.stx_blksize = 4096;
    return 0;
}

long op_fcntl(SocketRef &ref, int cmd, unsigned long arg) {
    Socket &sock = *ref.sock;
    switch (cmd) {
        case F_GETFL:
            return O_RDWR | (sock.nonblocking.load() ? O_NONBLOCK : 0) | sock.file_flags.load();
        case F_SETFL:
            // O_NONBLOCK is ours to keep. O_APPEND and O_ASYNC are remembered as Linux does,
            // but SIGIO is not delivered.
            sock.nonblocking.store(arg & O_NONBLOCK);
            sock.file_flags.store(static_cast<int>(arg & (O_APPEND | O_ASYNC)));
            return 0;
        case F_DUPFD:
        case F_DUPFD_CLOEXEC:
            return op_dupfd(ref.fd, cmd, static_cast<int>(arg));
        case F_GETOWN:
        case F_SETOWN:
        case F_GETSIG:
        case F_SETSIG:
            return 0;
        default: {
            // F_GETFD/F_SETFD and the rest: the placeholder holds FD_CLOEXEC.
            const int rc = real(libc.fcntl)(ref.fd, cmd, arg);
            return rc < 0 ? -errno : rc;
        }
    }
}

long op_ioctl(SocketRef &ref, unsigned long request_code, void *arg) {
    Socket &sock = *ref.sock;
    switch (request_code) {
        case FIONBIO: {
            if (!arg) return -EFAULT;
            int on;
            std::memcpy(&on, arg, sizeof(on));
            sock.nonblocking.store(on != 0);
            return 0;
        }
        case FIONREAD: {  // SIOCINQ
            if (!arg) return -EFAULT;
            if (sock.listening.load()) return -EINVAL;
            // Bytes that wait in the engine's kernel socket for a direct receive count too.
            if (direct_bytes_wait(*ref.shm)) {
                ipc::Request leave{};
                leave.op = static_cast<uint32_t>(ipc::Op::kLeaveDirect);
                request(ref.slot, leave);
            }
            const int n = static_cast<int>(ref.shm->rx_tail.load(std::memory_order_acquire) -
                                           ref.shm->rx_head.load(std::memory_order_relaxed));
            std::memcpy(arg, &n, sizeof(n));
            // As a peek does (op_recv): a caller counting bytes wants what follows too.
            if (ref.shm->flags.load(std::memory_order_acquire) & ipc::kFlagRxPaused)
                notify_engine(ref.slot);
            return 0;
        }
        case SIOCOUTQ:
        case SIOCOUTQNSD: {
            if (!arg) return -EFAULT;
            if (sock.listening.load()) return -EINVAL;
            // The kernel's queue in the engine plus what still waits in our tx ring.
            const int in_kernel =
                request(ref.slot, make_request(ipc::Op::kIoctl, static_cast<int>(request_code)));
            if (in_kernel < 0) return in_kernel;
            const int n =
                in_kernel + static_cast<int>(ref.shm->tx_tail.load() - ref.shm->tx_head.load());
            std::memcpy(arg, &n, sizeof(n));
            return 0;
        }
        case SIOCATMARK: {
            if (!arg) return -EFAULT;
            want_urgent(ref);
            // At the mark: where the engine's receive stopped at it (the engine's kernel
            // socket has read on since), or, with nothing left in the ring, where the kernel
            // socket stands now.
            const uint32_t head = ref.shm->rx_head.load(std::memory_order_relaxed);
            int at_mark = 0;
            if ((slot_flags(ref) & ipc::kFlagUrgentMark) &&
                ref.shm->urgent_mark.load(std::memory_order_relaxed) == head) {
                at_mark = 1;
            } else {
                const int rc = request(ref.slot, make_request(ipc::Op::kIoctl, SIOCATMARK));
                if (rc < 0) return rc;
                at_mark = rc && ref.shm->rx_tail.load(std::memory_order_acquire) == head;
            }
            std::memcpy(arg, &at_mark, sizeof(at_mark));
            return 0;
        }
        case FIOASYNC:
            return 0;  // SIGIO is not supported: accepted and ignored
        default:
            break;
    }
    if (request_code >= 0x8910 && request_code <= 0x89ff) {
        // Interface and routing ioctls (SIOCGIFADDR...) do not concern this socket: any
        // socket of the family answers them.
        const int other = real(libc.socket)(sock.domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (other < 0) return -errno;
        const int rc = real(libc.ioctl)(other, request_code, arg);
        const int saved = errno;
        real(libc.close)(other);
        return rc < 0 ? -saved : rc;
    }
    return -ENOTTY;
}

// ---------------------------------------------------------------------------------------------

void socket_release(uint32_t slot) {
    Socket &sock = socket_state(slot);
    ipc::SocketSlot &shm = region().slot(slot);
    // Any thread still inside a call on this socket finds it stale and gives up.
    sock.generation.fetch_add(1, std::memory_order_acq_rel);
    // A listener's twin, as this process held it: the port goes with the last holder.
    close_internal(sock.twin_fd);
    // No engine: nothing to close there, and no hold that anyone counts any more.
    if (session_dead()) return;
    // Another process of the family (a forked child, its parent) may still hold it: then
    // only our hold goes, as the kernel closes a socket with its last reference.
    if (!unhold_socket(slot)) return;
    // Unread bytes make Linux reset instead of closing gracefully.
    const bool unread =
        shm.rx_tail.load(std::memory_order_acquire) != shm.rx_head.load(std::memory_order_relaxed);
    const bool reset = sock.linger_reset.load() || unread;
    // A socket that holds a port (a listener, or bound and not connected) is closed before we
    // return, so the port can be bound again at once, as on Linux; the engine answers then.
    // So is a reset: Linux's close() has sent the RST (and a peer on this host has seen it)
    // by the time it returns.
    const uint32_t flags = shm.flags.load(std::memory_order_acquire);
    const bool resets = reset && (flags & ipc::kFlagConnected) && !(flags & ipc::kFlagReset);
    if ((flags & ipc::kFlagListening) || resets ||
        ((flags & ipc::kFlagBound) && !(flags & ipc::kFlagConnected))) {
        request(slot, make_request(ipc::Op::kClose, reset ? 1 : 0));
        return;
    }
    request_close(slot, reset);
}

long op_close(int fd) {
    const FdRef ref = g_fds.get(fd);
    switch (ref.kind()) {
        case FdKind::kNone:
            return kUseKernel;
        case FdKind::kInternal:
            return -EBADF;  // ours: to the application it is not open
        case FdKind::kSocket:
        case FdKind::kEpoll:
            break;
    }
    if (in_vfork_child()) {
        // The kernel closes the child's copy; the table is the parent's (exec.cpp notes it).
        const int rc = real(libc.close)(fd);
        if (rc == 0) vfork_note(fd, FdRef{});
        return rc < 0 ? -errno : 0;
    }
    // The entry first, then the number (the kernel may hand it out again at once).
    if (!g_fds.take_if(fd, ref)) return kUseKernel;
    // Another thread is putting the kernel socket under this number (handoff.cpp): our
    // close() must come after, and close that, or the number would be taken again after it.
    if (ref.kind() == FdKind::kSocket)
        while (socket_state(ref.slot()).handing_back.load(std::memory_order_seq_cst)) sched_yield();
    const int rc = real(libc.close)(fd);
    const int saved = errno;
    forget_entry(ref);
    return rc < 0 ? -saved : 0;
}

long op_dup(int fd) {
    if (in_vfork_child()) {
        const FdRef ref = vfork_entry(fd);
        if (ref.kind() != FdKind::kSocket) return kUseKernel;
        const int copy = real(libc.dup)(fd);
        if (copy < 0) return -errno;
        vfork_note(copy, ref);
        return copy;
    }
    const FdRef ref = g_fds.get(fd);
    if (ref.kind() != FdKind::kSocket && ref.kind() != FdKind::kEpoll) return kUseKernel;
    const int copy = real(libc.dup)(fd);
    if (copy < 0) return -errno;
    retain_entry(ref);
    if (!g_fds.set(copy, ref)) {
        real(libc.close)(copy);
        forget_entry(ref);
        return -EMFILE;
    }
    return copy;
}

long op_dupfd(int fd, int cmd, int min_fd) {
    if (in_vfork_child()) {
        const FdRef ref = vfork_entry(fd);
        if (ref.kind() != FdKind::kSocket) return kUseKernel;
        const int copy = real(libc.fcntl)(fd, cmd, min_fd);
        if (copy < 0) return -errno;
        vfork_note(copy, ref);
        return copy;
    }
    const FdRef ref = g_fds.get(fd);
    if (ref.kind() != FdKind::kSocket && ref.kind() != FdKind::kEpoll) return kUseKernel;
    const int copy = real(libc.fcntl)(fd, cmd, min_fd);
    if (copy < 0) return -errno;
    retain_entry(ref);
    if (!g_fds.set(copy, ref)) {
        real(libc.close)(copy);
        forget_entry(ref);
        return -EMFILE;
    }
    return copy;
}

long op_dup3(int oldfd, int newfd, int flags, bool is_dup3) {
    if (in_vfork_child()) {
        // The child's own table changes; the shim's is the parent's (exec.cpp keeps the note).
        const FdRef source = vfork_entry(oldfd);
        const FdRef target = vfork_entry(newfd);
        if (source.kind() != FdKind::kSocket && target.kind() != FdKind::kSocket) return kUseKernel;
        const int rc =
            is_dup3 ? real(libc.dup3)(oldfd, newfd, flags) : real(libc.dup2)(oldfd, newfd);
        if (rc < 0) return -errno;
        if (oldfd != newfd) vfork_note(newfd, source.kind() == FdKind::kSocket ? source : FdRef{});
        return rc;
    }
    const FdRef old_ref = g_fds.get(oldfd);
    const FdRef new_ref = g_fds.get(newfd);
    const bool old_ours = old_ref.kind() == FdKind::kSocket || old_ref.kind() == FdKind::kEpoll;
    if (!old_ours && new_ref.empty()) return kUseKernel;
    if (old_ref.kind() == FdKind::kInternal) return -EBADF;
    if (oldfd == newfd) {
        if (is_dup3) return -EINVAL;
        return newfd;  // dup2(fd, fd) of an open fd
    }
    // The application wants the number of one of our descriptors: ours moves away.
    if (new_ref.kind() == FdKind::kInternal) relocate_internal(newfd);
    const int rc = is_dup3 ? real(libc.dup3)(oldfd, newfd, flags) : real(libc.dup2)(oldfd, newfd);
    if (rc < 0) return -errno;
    // The kernel closed what newfd held: forget it, as close() would.
    const FdRef previous = g_fds.take(newfd);
    if (previous.kind() != FdKind::kInternal) forget_entry(previous);
    if (old_ours) {
        retain_entry(old_ref);
        g_fds.set(newfd, old_ref);
    }
    return rc;
}

}  // namespace tcps::shim
