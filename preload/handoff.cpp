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
// each TCP socket it receives to the engine at its first use (adopt.cpp), which serves those
// bytes first and the rest of the stream after them: nothing is lost, and the socket is
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
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "control.hpp"
#include "libc.hpp"
#include "ops.hpp"
#include "session.hpp"

namespace tcps::shim {

namespace {

// shed_to_kernel: when to look again after the engine refused (bytes raced the hand-back).
std::atomic<uint64_t> g_shed_after_ns{0};
constexpr uint64_t kShedRetryNs = 1'000'000;

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
    close_internal(sock.twin_fd);  // a listener's: the kernel listener is the one now
    // A close() that takes one of the numbers meanwhile waits for us (op_close), and then
    // closes what we put there.
    sock.handing_back.store(true, std::memory_order_seq_cst);
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
    // Calls in flight find it stale, and go on as the kernel's calls (went_to_kernel).
    sock.kernel_gen.store(ref.generation, std::memory_order_release);
    sock.generation.fetch_add(1, std::memory_order_acq_rel);
    sock.handing_back.store(false, std::memory_order_release);
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
    // A twin we hold (engine/twin.cpp) is a listener on the address already, with the
    // application's options, and the connections the engine sent it: it becomes the listener.
    if (const int twin = ref.sock->twin_fd.load(); twin >= 0) {
        int listening = 0;
        socklen_t size = sizeof(listening);
        const int copy = real(libc.fcntl)(twin, F_DUPFD_CLOEXEC, 0);
        if (copy >= 0 &&
            real(libc.getsockopt)(copy, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) == 0 &&
            listening) {
            const int off = 0;
            real(libc.setsockopt)(copy, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, nullptr, 0);
            real(libc.setsockopt)(copy, SOL_SOCKET, SO_REUSEPORT, &off, sizeof(off));
            real(libc.listen)(copy, backlog);
            put_kernel_socket(ref, copy);
            return 0;
        }
        if (copy >= 0) real(libc.close)(copy);
    }
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

long accept_from_twin(const SocketRef &ref, int placeholder, sockaddr *addr, socklen_t *len,
                      int flags) {
    Socket &sock = *ref.sock;
    int twin = sock.twin_fd.load(std::memory_order_acquire);
    if (twin < 0) {
        Handoff handoff;
        const int rc = request_handoff(ref.slot, ipc::kHandoffTwin, handoff);
        // No descriptor left for it (the kernel drops an SCM_RIGHTS descriptor it cannot
        // install): what Linux's accept() says without one.
        if (rc == -EPROTO || rc == -EMFILE || rc == -ENFILE) return rc == -EPROTO ? -EMFILE : rc;
        // Retired meanwhile (-ENOENT), or no engine to ask: nothing to take there now.
        if (rc != 0) return -EAGAIN;
        twin = move_high_internal(handoff.kernel_fd);
        int none = -1;
        if (!sock.twin_fd.compare_exchange_strong(none, twin)) {
            // Another thread of ours asked too: one descriptor is enough.
            g_fds.take_if(twin, FdRef::internal());
            real(libc.close)(twin);
            twin = none;
        }
    }
    // The twin's file is non-blocking (the engine's making): this never sleeps.
    const int conn = real(libc.accept4)(
        twin, addr, len, placeholder < 0 ? flags : (flags & SOCK_NONBLOCK) | SOCK_CLOEXEC);
    if (conn < 0) {
        const int error = errno;
        if (error == EAGAIN || error == EWOULDBLOCK) return -EAGAIN;
        // Retired (shut down: EINVAL), or our descriptor is not what it was: none waits there.
        if (error == EINVAL || error == EBADF || error == ENOTSOCK) {
            close_internal(sock.twin_fd);
            return -EAGAIN;
        }
        return -error;
    }
    // What the kernel's accept() copies from its listener: the timeouts the shim keeps.
    set_timeout(conn, SO_RCVTIMEO, sock.rcv_timeout_ns.load());
    set_timeout(conn, SO_SNDTIMEO, sock.snd_timeout_ns.load());
    if (placeholder < 0) return conn;
    // Under the number accept() reserved (the lowest free one when it was called).
    if (real(libc.dup3)(conn, placeholder, (flags & SOCK_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        const int error = errno;
        real(libc.close)(conn);
        return -error;
    }
    real(libc.close)(conn);
    return placeholder;
}

bool hand_back(const SocketRef &ref, uint32_t how, void (*before_close)(Socket &)) {
    Handoff handoff;
    if (request_handoff(ref.slot, how, handoff) != 0) return false;
    // The timeouts the shim kept are the socket's, as in Linux: they go with it.
    set_timeout(handoff.kernel_fd, SO_RCVTIMEO, ref.sock->rcv_timeout_ns.load());
    set_timeout(handoff.kernel_fd, SO_SNDTIMEO, ref.sock->snd_timeout_ns.load());
    put_kernel_socket(ref, handoff.kernel_fd);
    if (before_close) before_close(*ref.sock);
    // The engine's descriptor goes too; the kernel socket lives on in ours. (After this the
    // slot may serve another socket at once: nothing of it is ours to touch.)
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
    return true;
}

bool shed_to_kernel(const SocketRef &ref) {
    const ipc::SocketSlot &shm = *ref.shm;
    Socket &sock = *ref.sock;
    // Nothing received and not read, nothing written and not sent: no byte can be lost or
    // overtaken (the engine checks again, and refuses with -EAGAIN if it sees any).
    auto idle = [&] {
        return shm.rx_tail.load(std::memory_order_acquire) ==
                   shm.rx_head.load(std::memory_order_relaxed) &&
               shm.tx_head.load(std::memory_order_acquire) ==
                   shm.tx_tail.load(std::memory_order_relaxed);
    };
    if (!idle()) return false;
    // Past the peer's FIN or a reset the connection's end is the engine's to report: the
    // kernel socket no longer has the error the engine took (the engine refuses too).
    if (shm.flags.load(std::memory_order_acquire) & (ipc::kFlagRxEof | ipc::kFlagReset))
        return false;
    // Another process of the family holding it (fork) would keep using the engine's slot.
    if (in_vfork_child() || shim_locked_here() || claims_slots() || sock.listening.load() ||
        sock.shut_rd.load() || sock.shut_wr.load() || session_dead() ||
        shm.holders.load(std::memory_order_acquire) != 1)
        return false;
    const uint64_t now = now_ns();
    if (now < g_shed_after_ns.load(std::memory_order_relaxed)) return false;
    // Other threads: none is inside a send or a receive on it while we hold both its locks;
    // one that takes a lock after us finds the socket the kernel's and makes the kernel's call
    // (went_to_kernel); one asleep in a receive, with no lock held, is woken by the engine's
    // close of the slot and does the same.
    if (!sock.tx_lock.try_lock()) return false;
    if (!sock.rx_lock.try_lock()) {
        sock.tx_lock.unlock();
        return false;
    }
    bool handed = false;
    if (idle()) {
        // Offloaded again later if it has one number (kAdoptSocket takes one socket at one
        // number) and no other call sleeps in it now (refs counts those too, and cannot tell
        // them from numbers): others stay the kernel's.
        const int fd = ref.fd;
        const bool noted = sock.refs.load(std::memory_order_acquire) == 1;
        if (noted) note_shed(fd);
        // The locks before the engine's close: the slot's lock words are the next socket's.
        handed = hand_back(ref, ipc::kHandoffShed, [](Socket &handed_sock) {
            handed_sock.rx_lock.unlock();
            handed_sock.tx_lock.unlock();
        });
        if (handed) {
            if (noted) hold_after_shed(fd);
            return true;
        }
        // Bytes came meanwhile, or the engine has room again: it stays ours.
        forget_pending(ref.fd);
    }
    sock.rx_lock.unlock();
    sock.tx_lock.unlock();
    g_shed_after_ns.store(now + kShedRetryNs, std::memory_order_relaxed);
    return false;
}

void hand_back_passed_sockets(const msghdr *msg) {
    for_each_passed_fd(msg, [](int fd) {
        forget_pending(fd);  // the receiver is the one to offload it again
        SocketRef ref;
        if (!find_socket(fd, ref)) return;
        if (!ref.sock->listening.load()) {
            // A reset this process has not reported goes to the receiver's first call, as the
            // kernel socket's pending error would (the engine took it from the socket).
            hand_back(ref,
                      ipc::kHandoffPark | (reset_pending(ref) ? ipc::kHandoffErrorPending : 0));
            return;
        }
        // A listener: the engine parks the connections it accepted and nobody took
        // (engine/parked.hpp). accept() moves acc_head under the listener's rx lock, so none
        // is taken here (any thread, any process of the family) while it does.
        ref.sock->rx_lock.lock();
        if (!hand_back(ref, ipc::kHandoffPark, [](Socket &listener) { listener.rx_lock.unlock(); }))
            ref.sock->rx_lock.unlock();
    });
}

}  // namespace tcps::shim
