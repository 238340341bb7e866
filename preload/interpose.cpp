// The interposed entry points: the only symbols libtcps.so exports (libtcps.map).
//
// Every one has the same shape (Onload's): not initialised -> libc; the fd is an offloaded
// socket -> our operation; anything else -> libc, untouched. errno is left as it was on
// success and set from the operation's -errno on failure, exactly as the kernel would.
// Both fcntl and fcntl64 are defined here; with _FILE_OFFSET_BITS=64 glibc's headers would
// rename our fcntl to fcntl64 (__REDIRECT) and the two would clash.
#undef _FILE_OFFSET_BITS
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <new>

#include "libc.hpp"
#include "ops.hpp"

extern "C" [[noreturn]] void __chk_fail(void);

namespace tcps::shim {
// io_ops.cpp: a call's hold on its socket, as the kernel's fdget() holds the file.
}  // namespace tcps::shim

using namespace tcps::shim;

extern "C" {
// libc's syscall() once known: the trampoline below jumps straight to it.
__attribute__((visibility("hidden"))) long (*tcps_libc_syscall)(long, ...) = nullptr;
// The trampoline's slow path: SYS_close, SYS_close_range, and anything before libc is known.
__attribute__((visibility("hidden"), used)) long tcps_syscall_slow(long number, long a1, long a2,
                                                                   long a3, long a4, long a5,
                                                                   long a6);
}

namespace {

__attribute__((constructor)) void tcps_load() {
    shim_init();
    __atomic_store_n(&tcps_libc_syscall, real(libc.syscall), __ATOMIC_RELEASE);
}

template <class T>
T finish(long rc, int saved_errno) {
    if (rc < 0) {
        errno = static_cast<int>(-rc);
        return static_cast<T>(-1);
    }
    errno = saved_errno;
    return static_cast<T>(rc);
}

// The real call; ENOSYS if libc lacks it (the shim said so at start).
template <class Fn, class... Args>
auto pass(Fn &slot, Args... args) -> decltype(slot(args...)) {
    const Fn fn = real(slot);
    if (!fn) {
        errno = ENOSYS;
        return static_cast<decltype(slot(args...))>(-1);
    }
    return fn(args...);
}

// The call's socket went back to the kernel under it, before it moved a byte or changed
// anything (another thread handed it back, handoff.cpp): the kernel's call on the same number
// then, as if it had been that from the start (errno as the caller left it).
bool went_to_kernel(const SocketRef &ref, long rc, int saved) {
    if (rc != -EBADF || ref.sock->kernel_gen.load(std::memory_order_acquire) != ref.generation)
        return false;
    errno = saved;
    return true;
}

bool offloaded(int fd, SocketRef &ref) {
    return __builtin_expect(g_fds.size() != 0, 1) && find_socket(fd, ref);
}

// The same for a call that moves bytes. A saturated engine asked for this connection back
// (seed 003): the call goes to the kernel if it could be handed back now. Only these calls
// hand it back: the others (options, names, fcntl) would pay the round trip for nothing,
// and a connection in use makes such calls soon enough.
bool offloaded_io(int fd, SocketRef &ref) {
    if (!offloaded(fd, ref)) return false;
    if (__builtin_expect(ref.shm->flags.load(std::memory_order_relaxed) & tcps::ipc::kFlagShed,
                         0)) {
        const int saved = errno;
        const bool shed = shed_to_kernel(ref);
        errno = saved;
        return !shed;
    }
    return true;
}

// Whether a descriptor call on `fd` goes through the shim's op_* functions: the table knows the
// fd, or a vfork()ed child noted it. In a vfork child those functions change only the child's
// own descriptors and note the changes apart (exec.cpp), never the parent's table.
bool table_knows(int fd) {
    return g_fds.size() != 0 && (!g_fds.get(fd).empty() || vfork_overlay_knows(fd));
}

int64_t ms_to_ns(int timeout_ms) {
    return timeout_ms < 0 ? -1 : static_cast<int64_t>(timeout_ms) * 1'000'000;
}

// A caller's timespec as a timeout: -1 forever, or -EINVAL if malformed.
int64_t timespec_to_ns(const timespec *ts) {
    if (!ts) return -1;
    if (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= 1'000'000'000) return -EINVAL;
    if (ts->tv_sec > INT64_MAX / 1'000'000'000 - 1) return -1;
    return static_cast<int64_t>(ts->tv_sec) * 1'000'000'000 + ts->tv_nsec;
}

long send_one(SocketRef &ref, const void *buf, size_t len, int flags) {
    iovec iov{const_cast<void *>(buf), len};
    return op_send(ref, &iov, 1, flags);
}

long recv_one(SocketRef &ref, void *buf, size_t len, int flags) {
    iovec iov{buf, len};
    return op_recv(ref, &iov, 1, flags);
}

// recvfrom()/recvmsg() on TCP: no source address (length 0), no control data, no flags but
// MSG_OOB's. `answered_before`: op_recv's.
long recv_msg(SocketRef &ref, msghdr *msg, int flags, bool answered_before = false) {
    if (!msg) return -EFAULT;
    if (msg->msg_iovlen > IOV_MAX) return -EMSGSIZE;
    const long rc =
        op_recv(ref, msg->msg_iov, static_cast<int>(msg->msg_iovlen), flags, answered_before);
    if (rc >= 0) {
        msg->msg_namelen = 0;
        msg->msg_controllen = 0;
        msg->msg_flags = 0;
        // tcp_recv_urg(): the urgent byte says so, and MSG_TRUNC when there was no room for it.
        if (flags & MSG_OOB) {
            size_t room = 0;
            for (size_t k = 0; k < msg->msg_iovlen; ++k) room += msg->msg_iov[k].iov_len;
            msg->msg_flags = MSG_OOB | (room == 0 ? MSG_TRUNC : 0);
        }
    }
    return rc;
}

// sendmmsg()/recvmmsg() on TCP: one sendmsg()/recvmsg() per entry, as the kernel's loops do
// (net/socket.c), of at most UIO_MAXIOV entries. A send that leaves bytes of its entry unsent
// ends the loop; an error after the first entry is lost (sendmmsg) or left for the next call
// (recvmmsg, as sk_err; not EAGAIN); recvmmsg's timeout is looked at after each entry only,
// and what is left of it written back when any came. Any interruption ends a later entry's
// wait (the call has an answer, so the kernel does not restart it), and the error it leaves
// is the wait's own (a pending error is reported before anything is received): ERESTARTSYS (512,
// which then reaches the program as it is) without a receive timeout, EINTR with one
// (sock_intr_errno()); tests/semantics check_mmsg.
constexpr int kErestartsys = 512;
constexpr unsigned kMaxMessages = 1024;  // UIO_MAXIOV

long send_mmsg(SocketRef &ref, mmsghdr *msgs, unsigned vlen, int flags) {
    vlen = std::min(vlen, kMaxMessages);
    unsigned sent = 0;
    long rc = 0;
    while (sent < vlen) {
        if (!msgs) {
            rc = -EFAULT;
            break;
        }
        const msghdr &msg = msgs[sent].msg_hdr;
        if (msg.msg_iovlen > IOV_MAX) {
            rc = -EMSGSIZE;
            break;
        }
        rc = op_send(ref, msg.msg_iov, static_cast<int>(msg.msg_iovlen), flags);
        if (rc < 0) break;
        msgs[sent++].msg_len = static_cast<unsigned>(rc);
        size_t wanted = 0;
        for (size_t k = 0; k < msg.msg_iovlen; ++k) wanted += msg.msg_iov[k].iov_len;
        if (static_cast<size_t>(rc) < wanted) break;
        rc = 0;
    }
    return sent > 0 ? sent : rc;
}

long recv_mmsg(SocketRef &ref, mmsghdr *msgs, unsigned vlen, int flags, timespec *timeout) {
    const int64_t timeout_ns = timespec_to_ns(timeout);
    if (timeout && timeout_ns < 0) return -EINVAL;
    const uint64_t end_ns = timeout ? now_ns() + static_cast<uint64_t>(timeout_ns) : 0;
    // A pending error first, one a call before left included (do_recvmmsg()): ahead of any
    // bytes still there, unlike recvmsg().
    if (!(flags & MSG_ERRQUEUE))
        if (const int error = take_error(ref)) return -error;
    vlen = std::min(vlen, kMaxMessages);
    unsigned got = 0;
    long rc = 0;
    while (got < vlen) {
        if (!msgs) {
            rc = -EFAULT;
            break;
        }
        rc = recv_msg(ref, &msgs[got].msg_hdr, flags & ~MSG_WAITFORONE, got > 0);
        if (rc < 0) break;
        msgs[got++].msg_len = static_cast<unsigned>(rc);
        rc = 0;
        if (flags & MSG_WAITFORONE) flags |= MSG_DONTWAIT;
        if (timeout) {
            const uint64_t now = now_ns();
            const uint64_t left = now < end_ns ? end_ns - now : 0;
            timeout->tv_sec = static_cast<time_t>(left / 1'000'000'000);
            timeout->tv_nsec = static_cast<long>(left % 1'000'000'000);
            if (left == 0) break;
        }
        if (msgs[got - 1].msg_hdr.msg_flags & MSG_OOB) break;
    }
    if (rc == 0) return got;
    if (got == 0) return rc;
    if (rc == -EINTR && ref.sock->rcv_timeout_ns.load(std::memory_order_relaxed) == 0)
        rc = -kErestartsys;
    if (rc != -EAGAIN) ref.sock->deferred_error.store(static_cast<int>(-rc));
    return got;
}

// accept() and connect() may sleep: they hold the socket for the whole call (io_ops.cpp), so a
// close() of its fd in another thread does not end them, as on Linux.
template <class Call>
long held(SocketRef &ref, Call &&call) {
    if (!socket_hold(ref)) return -EBADF;
    const long rc = call();
    socket_unhold(ref);
    return rc;
}

long fcntl_common(int fd, int cmd, unsigned long arg, bool &handled) {
    handled = true;
    if (g_fds.get(fd).kind() == FdKind::kInternal) return -EBADF;  // not the application's
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) {
        settle_pending_before_dup(fd);
        const long rc = op_dupfd(fd, cmd, static_cast<int>(arg));
        if (rc != kUseKernel) return rc;
        handled = false;
        return 0;
    }
    // The descriptor's own flags are no use of the socket: a noted one (received, inherited) is
    // not offered for them. sd_listen_fds() sets FD_CLOEXEC on each inherited listener before
    // sd_is_socket() looks at it with fstat(), which must still see a socket.
    if ((cmd == F_GETFD || cmd == F_SETFD) && g_fds.get(fd).empty()) {
        handled = false;
        return 0;
    }
    SocketRef ref;
    if (offloaded(fd, ref)) return op_fcntl(ref, cmd, arg);
    handled = false;
    return 0;
}

long poll_common(pollfd *fds, nfds_t nfds, int64_t timeout_ns, const sigset_t *sigmask,
                 bool &handled) {
    handled = poll_has_offloaded(fds, nfds);
    if (!handled) return 0;
    return op_poll(fds, nfds, timeout_ns, sigmask);
}

// The real epoll_wait family for an epoll without offloaded members. If it gained some while
// the caller slept (another thread added one), the wake-up that told it so is ours, not the
// application's: it is removed, and the wait goes on in op_epoll_wait() for the time left.
template <class RealWait>
long epoll_wait_kernel(int epfd, epoll_event *events, int maxevents, int64_t timeout_ns,
                       const sigset_t *sigmask, RealWait &&real_wait) {
    const uint64_t start = timeout_ns > 0 ? now_ns() : 0;
    const int n = real_wait();
    if (n < 0) return -errno;
    if (n == 0 || !epoll_has_members(epfd)) return n;
    const int kept = epoll_strip_wake(epfd, events, n);
    if (kept > 0 || timeout_ns == 0) return kept;
    int64_t left = -1;
    if (timeout_ns > 0) {
        const auto spent = static_cast<int64_t>(now_ns() - start);
        left = spent >= timeout_ns ? 0 : timeout_ns - spent;
    }
    const long rc = op_epoll_wait(epfd, events, maxevents, left, sigmask);
    return rc == kUseKernel ? 0 : rc;
}

long epoll_wait_common(int epfd, epoll_event *events, int maxevents, int64_t timeout_ns,
                       const sigset_t *sigmask, bool &handled) {
    handled = false;
    if (g_fds.size() == 0) return 0;
    if (g_fds.get(epfd).kind() == FdKind::kSocket) {  // a socket is no epoll
        handled = true;
        return -EINVAL;
    }
    if (!epoll_has_members(epfd)) return 0;
    const long rc = op_epoll_wait(epfd, events, maxevents, timeout_ns, sigmask);
    handled = rc != kUseKernel;
    return rc;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// sockets

TCPS_EXPORT int socket(int domain, int type, int protocol) __THROW {
    const int saved = errno;
    if (g_fds.size() != 0 && (domain == AF_INET || domain == AF_INET6) &&
        (type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) == SOCK_STREAM &&
        (protocol == 0 || protocol == IPPROTO_TCP)) {
        const long rc = op_socket(domain, type, protocol);
        if (rc != kUseKernel) return finish<int>(rc, saved);
        errno = saved;
    }
    return pass(libc.socket, domain, type, protocol);
}

TCPS_EXPORT int bind(int fd, const sockaddr *addr, socklen_t len) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) return finish<int>(op_bind(ref, addr, len), saved);
    return pass(libc.bind, fd, addr, len);
}

TCPS_EXPORT int listen(int fd, int backlog) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) return finish<int>(op_listen(ref, backlog), saved);
    return pass(libc.listen, fd, backlog);
}

TCPS_EXPORT int accept(int fd, sockaddr *addr, socklen_t *len) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        // A listener passed on by another thread meanwhile: the kernel's accept() on it.
        const long rc = held(ref, [&] { return op_accept(ref, addr, len, 0); });
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.accept, fd, addr, len);
}

TCPS_EXPORT int accept4(int fd, sockaddr *addr, socklen_t *len, int flags) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = held(ref, [&] { return op_accept(ref, addr, len, flags); });
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.accept4, fd, addr, len, flags);
}

TCPS_EXPORT int connect(int fd, const sockaddr *addr, socklen_t len) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref))
        return finish<int>(held(ref, [&] { return op_connect(ref, addr, len); }), saved);
    return pass(libc.connect, fd, addr, len);
}

TCPS_EXPORT int shutdown(int fd, int how) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_shutdown(ref, how);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.shutdown, fd, how);
}

TCPS_EXPORT int getsockname(int fd, sockaddr *addr, socklen_t *len) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_getsockname(ref, addr, len);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.getsockname, fd, addr, len);
}

TCPS_EXPORT int getpeername(int fd, sockaddr *addr, socklen_t *len) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_getpeername(ref, addr, len);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.getpeername, fd, addr, len);
}

TCPS_EXPORT int getsockopt(int fd, int level, int name, void *value, socklen_t *len) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_getsockopt(ref, level, name, value, len);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.getsockopt, fd, level, name, value, len);
}

TCPS_EXPORT int setsockopt(int fd, int level, int name, const void *value, socklen_t len) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_setsockopt(ref, level, name, value, len);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.setsockopt, fd, level, name, value, len);
}

// ---------------------------------------------------------------------------------------------
// data

TCPS_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = send_one(ref, buf, len, flags);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return send(fd, buf, len, flags);
    return pass(libc.send, fd, buf, len, flags);
}

TCPS_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags, const sockaddr *addr,
                           socklen_t addr_len) {
    SocketRef ref;
    const int saved = errno;
    // TCP ignores the address (tcp_sendmsg never looks at msg_name).
    if (offloaded_io(fd, ref)) {
        const long rc = send_one(ref, buf, len, flags);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return sendto(fd, buf, len, flags, addr, addr_len);
    return pass(libc.sendto, fd, buf, len, flags, addr, addr_len);
}

TCPS_EXPORT ssize_t sendmsg(int fd, const msghdr *msg, int flags) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        if (!msg) return finish<ssize_t>(-EFAULT, saved);
        if (msg->msg_iovlen > IOV_MAX) return finish<ssize_t>(-EMSGSIZE, saved);
        const long rc = op_send(ref, msg->msg_iov, static_cast<int>(msg->msg_iovlen), flags);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return sendmsg(fd, msg, flags);
    if (msg && msg->msg_controllen > 0) hand_back_passed_sockets(msg);
    return pass(libc.sendmsg, fd, msg, flags);
}

TCPS_EXPORT ssize_t write(int fd, const void *buf, size_t len) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = send_one(ref, buf, len, 0);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return write(fd, buf, len);
    return pass(libc.write, fd, buf, len);
}

TCPS_EXPORT ssize_t writev(int fd, const iovec *iov, int iovcnt) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = op_send(ref, iov, iovcnt, 0);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return writev(fd, iov, iovcnt);
    return pass(libc.writev, fd, iov, iovcnt);
}

TCPS_EXPORT ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(out_fd, ref))
        return finish<ssize_t>(op_sendfile(ref, in_fd, offset, count), saved);
    const KernelCall kernel_call(out_fd);
    if (kernel_call.became_ours()) return sendfile(out_fd, in_fd, offset, count);
    return pass(libc.sendfile, out_fd, in_fd, offset, count);
}

TCPS_EXPORT ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len,
                           unsigned int flags) {
    SocketRef in_ref, out_ref;
    const int saved = errno;
    const bool in_offloaded = offloaded_io(fd_in, in_ref);
    const bool out_offloaded = offloaded_io(fd_out, out_ref);
    if (in_offloaded)
        return finish<ssize_t>(
            op_splice(in_ref, true, fd_out, out_offloaded, off_in, off_out, len, flags), saved);
    if (out_offloaded)
        return finish<ssize_t>(op_splice(out_ref, false, fd_in, false, off_out, off_in, len, flags),
                               saved);
    const KernelCall in_call(fd_in), out_call(fd_out);
    if (in_call.became_ours() || out_call.became_ours())
        return splice(fd_in, off_in, fd_out, off_out, len, flags);
    return pass(libc.splice, fd_in, off_in, fd_out, off_out, len, flags);
}

TCPS_EXPORT ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count) __THROW {
    static_assert(sizeof(off64_t) == sizeof(off_t), "64-bit targets only: one offset type");
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(out_fd, ref))
        return finish<ssize_t>(op_sendfile(ref, in_fd, reinterpret_cast<off_t *>(offset), count),
                               saved);
    const KernelCall kernel_call(out_fd);
    if (kernel_call.became_ours()) return sendfile64(out_fd, in_fd, offset, count);
    if (!real(libc.sendfile64))
        return pass(libc.sendfile, out_fd, in_fd, reinterpret_cast<off_t *>(offset), count);
    return pass(libc.sendfile64, out_fd, in_fd, offset, count);
}

TCPS_EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = recv_one(ref, buf, len, flags);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return recv(fd, buf, len, flags);
    return pass(libc.recv, fd, buf, len, flags);
}

TCPS_EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, sockaddr *addr,
                             socklen_t *addr_len) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = recv_one(ref, buf, len, flags);
        if (rc >= 0 && addr && addr_len) *addr_len = 0;  // TCP has no source address to give
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return recvfrom(fd, buf, len, flags, addr, addr_len);
    return pass(libc.recvfrom, fd, buf, len, flags, addr, addr_len);
}

TCPS_EXPORT ssize_t recvmsg(int fd, msghdr *msg, int flags) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = recv_msg(ref, msg, flags);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return recvmsg(fd, msg, flags);
    const ssize_t n = pass(libc.recvmsg, fd, msg, flags);
    // Sockets that came with it (AF_UNIX SCM_RIGHTS) are offloaded, if the engine takes them.
    if (n >= 0 && msg && msg->msg_controllen > 0) {
        const int errno_after = errno;
        adopt_received_sockets(msg);
        errno = errno_after;
    }
    return n;
}

TCPS_EXPORT int sendmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = send_mmsg(ref, msgs, vlen, flags);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return sendmmsg(fd, msgs, vlen, flags);
    for (unsigned k = 0; msgs && k < std::min(vlen, kMaxMessages); ++k)
        if (msgs[k].msg_hdr.msg_controllen > 0) hand_back_passed_sockets(&msgs[k].msg_hdr);
    return pass(libc.sendmmsg, fd, msgs, vlen, flags);
}

TCPS_EXPORT int recvmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags, timespec *timeout) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = recv_mmsg(ref, msgs, vlen, flags, timeout);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return recvmmsg(fd, msgs, vlen, flags, timeout);
    const int n = pass(libc.recvmmsg, fd, msgs, vlen, flags, timeout);
    // Sockets that came with them (AF_UNIX SCM_RIGHTS), as for recvmsg().
    if (n > 0) {
        const int errno_after = errno;
        for (int k = 0; k < n; ++k)
            if (msgs[k].msg_hdr.msg_controllen > 0) adopt_received_sockets(&msgs[k].msg_hdr);
        errno = errno_after;
    }
    return n;
}

TCPS_EXPORT ssize_t read(int fd, void *buf, size_t len) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        if (len == 0) return 0;  // sock_read_iter(): "Match SYS5 behaviour"
        const long rc = recv_one(ref, buf, len, 0);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return read(fd, buf, len);
    return pass(libc.read, fd, buf, len);
}

TCPS_EXPORT ssize_t readv(int fd, const iovec *iov, int iovcnt) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        if (iovcnt >= 0 && iovcnt <= IOV_MAX) {
            size_t total = 0;
            for (int i = 0; iov && i < iovcnt; ++i) total += iov[i].iov_len;
            if (total == 0) return 0;  // as read() of nothing
        }
        const long rc = op_recv(ref, iov, iovcnt, 0);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return readv(fd, iov, iovcnt);
    return pass(libc.readv, fd, iov, iovcnt);
}

// ---------------------------------------------------------------------------------------------
// descriptors

// ---------------------------------------------------------------------------------------------
// what the descriptor is: fstat() and friends see the engine's kernel socket (op_stat), so a
// program that checks for a socket (S_ISSOCK: sd_is_socket(), os.fstat()) finds one rather
// than our placeholder; isatty() says ENOTTY, as for any socket. Paths (stat() of
// /proc/self/fd/N) still lead to the placeholder.

// Whether `p` is null, for a parameter glibc declares nonnull, where the kernel answers EFAULT
// (out of line, so that the compiler cannot assume the answer from the declaration).
[[gnu::noinline]] bool is_null(const void *p) {
    return p == nullptr;
}

template <class Stat>
long stat_offloaded(SocketRef &ref, Stat *st) {
    if (is_null(st)) return -EFAULT;
    struct statx x {};
    if (const long rc = op_stat(ref, STATX_BASIC_STATS, 0, x); rc != 0) return rc;
    *st = Stat{};
    st->st_dev = makedev(x.stx_dev_major, x.stx_dev_minor);
    st->st_ino = x.stx_ino;
    st->st_nlink = x.stx_nlink;
    st->st_mode = x.stx_mode;
    st->st_uid = x.stx_uid;
    st->st_gid = x.stx_gid;
    st->st_rdev = makedev(x.stx_rdev_major, x.stx_rdev_minor);
    st->st_size = static_cast<off_t>(x.stx_size);
    st->st_blksize = x.stx_blksize;
    st->st_blocks = static_cast<blkcnt_t>(x.stx_blocks);
    st->st_atim = {x.stx_atime.tv_sec, x.stx_atime.tv_nsec};
    st->st_mtim = {x.stx_mtime.tv_sec, x.stx_mtime.tv_nsec};
    st->st_ctim = {x.stx_ctime.tv_sec, x.stx_ctime.tv_nsec};
    return 0;
}

// A look at `dirfd` itself: an empty path with AT_EMPTY_PATH (NULL too, as Linux 6.11 takes
// it), and only flags the kernel accepts (else its EINVAL). newfstatat() ignores unknown
// flags (tests/semantics check_stat); statx() refuses them.
bool at_descriptor(const char *path, int flags, int allowed) {
    return (flags & AT_EMPTY_PATH) && !(flags & ~allowed) && (is_null(path) || path[0] == '\0');
}
constexpr int kFstatatFlags = ~0;
constexpr int kStatxFlags =
    AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_EMPTY_PATH | AT_STATX_SYNC_TYPE;

// The fstat() family: `fd` (or fstatat()'s `dirfd` with an empty path) answered through the
// engine if it is ours, else the real call with `args`.
template <class Stat, class Fn, class... Args>
int fstat_common(int fd, Stat *st, Fn &slot, Args... args) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) return finish<int>(stat_offloaded(ref, st), saved);
    return pass(slot, args...);
}

template <class Stat, class Fn, class... Args>
int fstatat_common(int dirfd, const char *path, Stat *st, int flags, Fn &slot, Args... args) {
    SocketRef ref;
    const int saved = errno;
    if (at_descriptor(path, flags, kFstatatFlags) && offloaded(dirfd, ref))
        return finish<int>(stat_offloaded(ref, st), saved);
    return pass(slot, args...);
}

TCPS_EXPORT int fstat(int fd, struct stat *st) __THROW {
    return fstat_common(fd, st, libc.fstat, fd, st);
}

TCPS_EXPORT int fstat64(int fd, struct stat64 *st) __THROW {
    return fstat_common(fd, st, libc.fstat64, fd, st);
}

TCPS_EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags) __THROW {
    return fstatat_common(dirfd, path, st, flags, libc.fstatat, dirfd, path, st, flags);
}

TCPS_EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags) __THROW {
    return fstatat_common(dirfd, path, st, flags, libc.fstatat64, dirfd, path, st, flags);
}

// Binaries built before glibc 2.33 call these (`version` is x86-64's one struct stat).
TCPS_EXPORT int __fxstat(int version, int fd, struct stat *st) __THROW {
    return fstat_common(fd, st, libc.__fxstat, version, fd, st);
}

TCPS_EXPORT int __fxstat64(int version, int fd, struct stat64 *st) __THROW {
    return fstat_common(fd, st, libc.__fxstat64, version, fd, st);
}

TCPS_EXPORT int __fxstatat(int version, int dirfd, const char *path, struct stat *st,
                           int flags) __THROW {
    return fstatat_common(dirfd, path, st, flags, libc.__fxstatat, version, dirfd, path, st, flags);
}

TCPS_EXPORT int __fxstatat64(int version, int dirfd, const char *path, struct stat64 *st,
                             int flags) __THROW {
    return fstatat_common(dirfd, path, st, flags, libc.__fxstatat64, version, dirfd, path, st,
                          flags);
}

TCPS_EXPORT int statx(int dirfd, const char *path, int flags, unsigned int mask,
                      struct statx *out) __THROW {
    SocketRef ref;
    const int saved = errno;
    const bool valid =
        !(mask & STATX__RESERVED) && (flags & AT_STATX_SYNC_TYPE) != AT_STATX_SYNC_TYPE;
    if (valid && at_descriptor(path, flags, kStatxFlags) && offloaded(dirfd, ref)) {
        if (is_null(out)) return finish<int>(-EFAULT, saved);
        return finish<int>(op_stat(ref, mask, flags, *out), saved);
    }
    return pass(libc.statx, dirfd, path, flags, mask, out);
}

TCPS_EXPORT int isatty(int fd) __THROW {
    SocketRef ref;
    if (offloaded(fd, ref)) {
        errno = ENOTTY;
        return 0;
    }
    return pass(libc.isatty, fd);
}

// glibc's calls its own ioctl() inside, which the shim cannot see: the same through ours.
TCPS_EXPORT int sockatmark(int fd) __THROW {
    int answer = 0;
    if (ioctl(fd, SIOCATMARK, &answer) < 0) return -1;
    return answer;
}

// ---------------------------------------------------------------------------------------------
// calls for files, which a socket answers with an error: ESPIPE for positions, EINVAL for
// sync and truncate, ENOTTY for terminals (the placeholder would say EBADF); preadv2() and
// pwritev2() at offset -1 are readv() and writev() with their flags. tests/semantics
// check_file_calls compares them with Linux.

// The socket's answer `rc` if `fd` is ours, else the real call.
template <class R, class Fn, class... Args>
R file_only(int fd, long rc, Fn &slot, Args... args) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) return finish<R>(rc, saved);
    return pass(slot, args...);
}

constexpr int kSeekMax = SEEK_HOLE;
long position_answer(long long offset) {
    return offset < 0 ? -EINVAL : -ESPIPE;  // a negative offset is refused first
}

TCPS_EXPORT off_t lseek(int fd, off_t offset, int whence) __THROW {
    return file_only<off_t>(fd, whence > kSeekMax ? -EINVAL : -ESPIPE, libc.lseek, fd, offset,
                            whence);
}
TCPS_EXPORT off64_t lseek64(int fd, off64_t offset, int whence) __THROW {
    return file_only<off64_t>(fd, whence > kSeekMax ? -EINVAL : -ESPIPE, libc.lseek64, fd, offset,
                              whence);
}
TCPS_EXPORT ssize_t pread(int fd, void *buf, size_t len, off_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.pread, fd, buf, len, offset);
}
TCPS_EXPORT ssize_t pread64(int fd, void *buf, size_t len, off64_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.pread64, fd, buf, len, offset);
}
TCPS_EXPORT ssize_t pwrite(int fd, const void *buf, size_t len, off_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.pwrite, fd, buf, len, offset);
}
TCPS_EXPORT ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.pwrite64, fd, buf, len, offset);
}
TCPS_EXPORT ssize_t preadv(int fd, const iovec *iov, int iovcnt, off_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.preadv, fd, iov, iovcnt, offset);
}
TCPS_EXPORT ssize_t preadv64(int fd, const iovec *iov, int iovcnt, off64_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.preadv64, fd, iov, iovcnt, offset);
}
TCPS_EXPORT ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.pwritev, fd, iov, iovcnt, offset);
}
TCPS_EXPORT ssize_t pwritev64(int fd, const iovec *iov, int iovcnt, off64_t offset) {
    return file_only<ssize_t>(fd, position_answer(offset), libc.pwritev64, fd, iov, iovcnt, offset);
}

// RWF_* flags a socket takes (and ignores, but RWF_NOWAIT): RWF_HIPRI, RWF_DSYNC, RWF_SYNC,
// RWF_NOWAIT, RWF_APPEND, RWF_NOAPPEND (Linux 6.9). RWF_ATOMIC and RWF_DONTCACHE need a file
// that supports them, and unknown ones are refused: EOPNOTSUPP.
constexpr int kRwfNoAppend = 0x20;
constexpr int kRwfForSockets =
    RWF_HIPRI | RWF_DSYNC | RWF_SYNC | RWF_NOWAIT | RWF_APPEND | kRwfNoAppend;

// preadv2()/pwritev2() on one of ours: at offset -1 the stream call, after the checks
// do_iter_readv_writev() makes (the iovec count, then the flags).
long rw2(SocketRef &ref, const iovec *iov, int iovcnt, long long offset, int flags, bool write) {
    if (offset != -1) return position_answer(offset);
    if (iovcnt < 0 || iovcnt > IOV_MAX) return -EINVAL;
    if (flags & ~kRwfForSockets) return -EOPNOTSUPP;
    const int msg_flags = (flags & RWF_NOWAIT) ? MSG_DONTWAIT : 0;
    if (write) return op_send(ref, iov, iovcnt, msg_flags);
    size_t total = 0;
    for (int i = 0; iov && i < iovcnt; ++i) total += iov[i].iov_len;
    if (total == 0) return 0;  // as readv() of nothing
    return op_recv(ref, iov, iovcnt, msg_flags);
}

template <class Fn, class Offset>
ssize_t rw2_common(int fd, const iovec *iov, int iovcnt, Offset offset, int flags, bool write,
                   Fn &slot) {
    SocketRef ref;
    const int saved = errno;
    if (offloaded_io(fd, ref)) {
        const long rc = rw2(ref, iov, iovcnt, offset, flags, write);
        if (!went_to_kernel(ref, rc, saved)) return finish<ssize_t>(rc, saved);
    }
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return rw2_common(fd, iov, iovcnt, offset, flags, write, slot);
    return pass(slot, fd, iov, iovcnt, offset, flags);
}

TCPS_EXPORT ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags) {
    return rw2_common(fd, iov, iovcnt, offset, flags, false, libc.preadv2);
}
TCPS_EXPORT ssize_t preadv64v2(int fd, const iovec *iov, int iovcnt, off64_t offset, int flags) {
    return rw2_common(fd, iov, iovcnt, offset, flags, false, libc.preadv64v2);
}
TCPS_EXPORT ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags) {
    return rw2_common(fd, iov, iovcnt, offset, flags, true, libc.pwritev2);
}
TCPS_EXPORT ssize_t pwritev64v2(int fd, const iovec *iov, int iovcnt, off64_t offset, int flags) {
    return rw2_common(fd, iov, iovcnt, offset, flags, true, libc.pwritev64v2);
}

TCPS_EXPORT int fsync(int fd) {
    return file_only<int>(fd, -EINVAL, libc.fsync, fd);
}
TCPS_EXPORT int fdatasync(int fd) {
    return file_only<int>(fd, -EINVAL, libc.fdatasync, fd);
}
TCPS_EXPORT int ftruncate(int fd, off_t length) __THROW {
    return file_only<int>(fd, -EINVAL, libc.ftruncate, fd, length);
}
TCPS_EXPORT int ftruncate64(int fd, off64_t length) __THROW {
    return file_only<int>(fd, -EINVAL, libc.ftruncate64, fd, length);
}

// generic_fadvise() for a file without a backing device: a known advice over a length that is
// not negative is accepted and ignored. It answers with the error number, not errno.
int fadvise_answer(long long length, int advice) {
    return length < 0 || advice < POSIX_FADV_NORMAL || advice > POSIX_FADV_NOREUSE ? EINVAL : 0;
}
TCPS_EXPORT int posix_fadvise(int fd, off_t offset, off_t length, int advice) __THROW {
    SocketRef ref;
    if (offloaded(fd, ref)) return fadvise_answer(length, advice);
    return pass(libc.posix_fadvise, fd, offset, length, advice);
}
TCPS_EXPORT int posix_fadvise64(int fd, off64_t offset, off64_t length, int advice) __THROW {
    SocketRef ref;
    if (offloaded(fd, ref)) return fadvise_answer(length, advice);
    return pass(libc.posix_fadvise64, fd, offset, length, advice);
}

TCPS_EXPORT int tcgetattr(int fd, termios *tio) __THROW {
    return file_only<int>(fd, -ENOTTY, libc.tcgetattr, fd, tio);
}
// glibc's ttyname() and ttyname_r() look with their internal tcgetattr().
TCPS_EXPORT int ttyname_r(int fd, char *buf, size_t len) __THROW {
    SocketRef ref;
    if (offloaded(fd, ref)) return ENOTTY;
    return pass(libc.ttyname_r, fd, buf, len);
}
TCPS_EXPORT char *ttyname(int fd) __THROW {
    SocketRef ref;
    if (offloaded(fd, ref)) {
        errno = ENOTTY;
        return nullptr;
    }
    const auto real_ttyname = real(libc.ttyname);
    return real_ttyname ? real_ttyname(fd) : nullptr;
}

TCPS_EXPORT int close(int fd) {
    const int saved = errno;
    settle_pending_before_close(fd);
    if (table_knows(fd)) {
        const long rc = op_close(fd);
        if (rc != kUseKernel) return finish<int>(rc, saved);
    }
    return pass(libc.close, fd);
}

TCPS_EXPORT int fcntl(int fd, int cmd, ...) {
    va_list args;
    va_start(args, cmd);
    const unsigned long arg = va_arg(args, unsigned long);
    va_end(args);
    const int saved = errno;
    if (g_fds.size() != 0) {
        bool handled;
        const long rc = fcntl_common(fd, cmd, arg, handled);
        if (handled) return finish<int>(rc, saved);
    }
    // A kernel-served socket's O_NONBLOCK is read when it is offloaded again: not while this
    // changes it (KernelCall); one offloaded meanwhile takes it through the shim.
    const KernelCall kernel_call(cmd == F_SETFL ? fd : -1);
    if (kernel_call.became_ours()) return fcntl(fd, cmd, arg);
    return pass(libc.fcntl, fd, cmd, arg);
}

TCPS_EXPORT int fcntl64(int fd, int cmd, ...) {
    va_list args;
    va_start(args, cmd);
    const unsigned long arg = va_arg(args, unsigned long);
    va_end(args);
    const int saved = errno;
    if (g_fds.size() != 0) {
        bool handled;
        const long rc = fcntl_common(fd, cmd, arg, handled);
        if (handled) return finish<int>(rc, saved);
    }
    const KernelCall kernel_call(cmd == F_SETFL ? fd : -1);
    if (kernel_call.became_ours()) return fcntl64(fd, cmd, arg);
    if (!real(libc.fcntl64)) return pass(libc.fcntl, fd, cmd, arg);
    return pass(libc.fcntl64, fd, cmd, arg);
}

TCPS_EXPORT int ioctl(int fd, unsigned long request, ...) __THROW {
    va_list args;
    va_start(args, request);
    void *arg = va_arg(args, void *);
    va_end(args);
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_ioctl(ref, request, arg);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    return pass(libc.ioctl, fd, request, arg);
}

TCPS_EXPORT int dup(int fd) __THROW {
    const int saved = errno;
    settle_pending_before_dup(fd);
    if (table_knows(fd)) {
        if (g_fds.get(fd).kind() == FdKind::kInternal) return finish<int>(-EBADF, saved);
        const long rc = op_dup(fd);
        if (rc != kUseKernel) return finish<int>(rc, saved);
    }
    return pass(libc.dup, fd);
}

TCPS_EXPORT int dup2(int oldfd, int newfd) __THROW {
    const int saved = errno;
    settle_pending_before_dup(oldfd);
    if (oldfd != newfd) forget_pending(newfd);
    if (table_knows(oldfd) || table_knows(newfd)) {
        const long rc = op_dup3(oldfd, newfd, 0, false);
        if (rc != kUseKernel) return finish<int>(rc, saved);
    }
    return pass(libc.dup2, oldfd, newfd);
}

TCPS_EXPORT int dup3(int oldfd, int newfd, int flags) __THROW {
    const int saved = errno;
    settle_pending_before_dup(oldfd);
    if (oldfd != newfd) forget_pending(newfd);
    if (table_knows(oldfd) || table_knows(newfd)) {
        const long rc = op_dup3(oldfd, newfd, flags, true);
        if (rc != kUseKernel) return finish<int>(rc, saved);
    }
    return pass(libc.dup3, oldfd, newfd, flags);
}

// ---------------------------------------------------------------------------------------------
// Closes that do not go through close(): close_range, closefrom, fclose, syscall(SYS_close...).

namespace {

// One fd fewer names what `ref` names (socket_ops.cpp's close bookkeeping, for a number that
// the caller is about to close itself).
// The close bookkeeping of `fd` without closing the number, which the caller closes right
// after: until then it still holds our placeholder, so the kernel cannot hand it out.
void forget_fd(int fd) {
    const FdRef ref = g_fds.get(fd);
    if (ref.kind() != FdKind::kSocket && ref.kind() != FdKind::kEpoll) return;
    if (g_fds.take_if(fd, ref)) forget_entry(ref);
}

long kernel_close_range(unsigned first, unsigned last, int flags) {
    int rc;
    if (real(libc.close_range)) {
        rc = libc.close_range(first, last, flags);
    } else {
        const auto raw = real(libc.syscall);  // never our own syscall(): it would come back here
        if (!raw) return -ENOSYS;
        rc = static_cast<int>(raw(SYS_close_range, first, last, flags));
    }
    if (rc == 0) return 0;
    if (errno != ENOSYS || (flags & ~CLOSE_RANGE_UNSHARE)) return -errno;
    // Before Linux 5.9: one close() per number, up to the descriptor limit.
    rlimit limit{};
    const rlim_t cap = getrlimit(RLIMIT_NOFILE, &limit) == 0 ? limit.rlim_cur : 1024;
    for (rlim_t fd = first; fd <= last && fd < cap; ++fd) real(libc.close)(static_cast<int>(fd));
    return 0;
}

// close_range(2) as the application sees it: its own descriptors close (each socket and epoll
// fd through the close bookkeeping), the shim's own are not its to close and stay open.
long close_range_common(unsigned first, unsigned last, int flags) {
    if (flags & ~static_cast<int>(CLOSE_RANGE_UNSHARE | CLOSE_RANGE_CLOEXEC)) return -EINVAL;
    if (first > last) return -EINVAL;
    if (!(flags & CLOSE_RANGE_CLOEXEC)) forget_pending_range(first, last);
    // Marking close-on-exec closes nothing: the shim's descriptors carry the flag already, and
    // a socket's placeholder takes it as the socket's own fd would.
    // In a vfork()ed child the loop below still keeps the shim's descriptors open (an exec
    // hands them on), and op_close() closes the child's sockets without touching the table.
    if (g_fds.size() == 0 || (flags & CLOSE_RANGE_CLOEXEC))
        return kernel_close_range(first, last, flags);
    // The kernel closes the stretches between the numbers the table knows; ours are handled
    // one by one (entry first, then the number, as close() does).
    const unsigned limit = static_cast<unsigned>(g_fds.limit());
    unsigned stretch = first;
    for (unsigned fd = first; fd <= last && fd < limit; ++fd) {
        const FdKind kind = g_fds.get(static_cast<int>(fd)).kind();
        if (kind == FdKind::kNone) continue;
        if (fd > stretch) {
            if (const long rc = kernel_close_range(stretch, fd - 1, flags); rc != 0) return rc;
        }
        stretch = fd + 1;
        if (kind != FdKind::kInternal) op_close(static_cast<int>(fd));
    }
    if (stretch > last) return 0;
    return kernel_close_range(stretch, last, flags);
}

// fdopen() of an offloaded socket. glibc's own would look at our placeholder with its
// internal fcntl and lseek (not ours to intercept) and fail with EINVAL, and its reads and
// writes would go to the placeholder too. So the stream is a cookie stream whose reads, writes
// and close go through the shim, and whose fileno() is the socket's fd.
struct SocketStream {
    int fd;
    FILE *file;
    SocketStream *next;
};

pthread_mutex_t g_streams_mutex = PTHREAD_MUTEX_INITIALIZER;
SocketStream *g_streams = nullptr;
std::atomic<int> g_stream_count{0};

ssize_t stream_read(void *cookie, char *buf, size_t len) {
    return read(static_cast<SocketStream *>(cookie)->fd, buf, len);
}

// glibc takes a short write of a cookie stream as an error, as its file streams take a
// failed write(): write all, stopping only at an error, as _IO_new_file_write() does.
ssize_t stream_write(void *cookie, const char *buf, size_t len) {
    const int fd = static_cast<SocketStream *>(cookie)->fd;
    size_t done = 0;
    while (done < len) {
        const ssize_t n = write(fd, buf + done, len - done);
        if (n < 0) return done > 0 ? static_cast<ssize_t>(done) : -1;
        done += static_cast<size_t>(n);
    }
    return static_cast<ssize_t>(done);
}

int stream_seek(void *, off64_t *, int) {
    errno = ESPIPE;  // as lseek() on a socket
    return -1;
}

// glibc calls this from fclose(), and from freopen() or fcloseall() too: the stream leaves the
// registry here.
int stream_close(void *cookie) {
    auto *stream = static_cast<SocketStream *>(cookie);
    pthread_mutex_lock(&g_streams_mutex);
    for (SocketStream **link = &g_streams; *link; link = &(*link)->next) {
        if (*link != stream) continue;
        *link = stream->next;
        g_stream_count.fetch_sub(1, std::memory_order_release);
        break;
    }
    pthread_mutex_unlock(&g_streams_mutex);
    const int rc = close(stream->fd);
    delete stream;
    return rc;
}

// Whether `file` is one of our socket streams (which close through stream_close()).
bool is_socket_stream(FILE *file) {
    if (g_stream_count.load(std::memory_order_acquire) == 0) return false;
    bool found = false;
    pthread_mutex_lock(&g_streams_mutex);
    for (SocketStream *stream = g_streams; stream && !found; stream = stream->next)
        found = stream->file == file;
    pthread_mutex_unlock(&g_streams_mutex);
    return found;
}

FILE *socket_stream(SocketRef &ref, const char *mode) {
    if (!mode || (mode[0] != 'r' && mode[0] != 'w' && mode[0] != 'a')) {
        errno = EINVAL;
        return nullptr;
    }
    if (mode[0] == 'a') {  // glibc's fdopen() sets O_APPEND for "a"
        const long flags = op_fcntl(ref, F_GETFL, 0);
        if (flags >= 0 && !(flags & O_APPEND))
            op_fcntl(ref, F_SETFL, static_cast<unsigned long>(flags | O_APPEND));
    }
    auto *stream = new (std::nothrow) SocketStream{ref.fd, nullptr, nullptr};
    if (!stream) {
        errno = ENOMEM;
        return nullptr;
    }
    FILE *file = fopencookie(stream, mode, {stream_read, stream_write, stream_seek, stream_close});
    if (!file) {
        delete stream;
        return nullptr;
    }
    // fileno() names the socket, as for any fdopen()ed stream; glibc does a cookie stream's
    // I/O through the functions above, never through this number.
    file->_fileno = ref.fd;
    stream->file = file;
    pthread_mutex_lock(&g_streams_mutex);
    stream->next = g_streams;
    g_streams = stream;
    g_stream_count.fetch_add(1, std::memory_order_release);
    pthread_mutex_unlock(&g_streams_mutex);
    return file;
}

}  // namespace

TCPS_EXPORT int close_range(unsigned int first, unsigned int last, int flags) __THROW {
    const int saved = errno;
    return finish<int>(close_range_common(first, last, flags), saved);
}

TCPS_EXPORT void closefrom(int lowfd) __THROW {
    // glibc's closefrom() never fails (it aborts if it cannot close); nor does this.
    close_range_common(lowfd < 0 ? 0u : static_cast<unsigned>(lowfd), ~0u, 0);
}

TCPS_EXPORT FILE *fdopen(int fd, const char *mode) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        FILE *file = socket_stream(ref, mode);
        if (file) errno = saved;
        return file;
    }
    const auto real_fdopen = real(libc.fdopen);
    if (!real_fdopen) {
        errno = ENOSYS;
        return nullptr;
    }
    return real_fdopen(fd, mode);
}

// glibc's fclose() closes its fd with an internal call the shim cannot see: the bookkeeping
// happens here, first, while the number still holds our placeholder. Our own socket streams
// close through stream_close() instead.
TCPS_EXPORT int fclose(FILE *stream) {
    if (g_fds.size() != 0 && stream && !is_socket_stream(stream)) {
        const int fd = fileno(stream);
        if (fd >= 0 && table_knows(fd)) forget_fd(fd);
    }
    return pass(libc.fclose, stream);
}

// syscall() is variadic, so it cannot be forwarded from C. An assembly trampoline compares the
// number and jumps, with every register and the stack untouched, either to libc's syscall()
// (everything else: clone, vfork and the rest behave exactly as without the shim) or to
// tcps_syscall_slow() for SYS_close and SYS_close_range. The x86-64 calling convention passes
// a variadic call's integer arguments exactly as a plain call's, so the slow path reads them as
// seven longs, as libc's own syscall() does.
#define TCPS_STR2(x) #x
#define TCPS_STR(x) TCPS_STR2(x)
#if defined(__x86_64__)
asm(".pushsection .text\n"
    ".globl syscall\n"
    ".type syscall, @function\n"
    ".p2align 4\n"
    "syscall:\n"
#ifdef __CET__
    "    endbr64\n"
#endif
    "    cmpq $" TCPS_STR(SYS_close) ", %rdi\n"
    "    je 1f\n"
    "    cmpq $" TCPS_STR(SYS_close_range) ", %rdi\n"
    "    je 1f\n"
    "    movq tcps_libc_syscall(%rip), %rax\n"
    "    testq %rax, %rax\n"
    "    jz 1f\n"
    "    jmp *%rax\n"
    "1:\n"
    "    jmp tcps_syscall_slow\n"
    ".size syscall, .-syscall\n"
    ".popsection\n");
#else
// Elsewhere: read six arguments (what libc's syscall() passes on) and call through.
TCPS_EXPORT long syscall(long number, ...) __THROW {
    va_list args;
    va_start(args, number);
    long a[6];
    for (long &value : a) value = va_arg(args, long);
    va_end(args);
    return tcps_syscall_slow(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
#endif

namespace {

// The system call itself, for a syscall() made while libc's cannot be looked up yet (from an
// allocator that dlsym() itself called, say).
long direct_syscall(long number, long a1, long a2, long a3, long a4, long a5, long a6) {
#if defined(__x86_64__)
    long result;
    register long r10 asm("r10") = a4;
    register long r8 asm("r8") = a5;
    register long r9 asm("r9") = a6;
    asm volatile("syscall"
                 : "=a"(result)
                 : "a"(number), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                 : "rcx", "r11", "memory");
    if (result < 0 && result > -4096) {
        errno = static_cast<int>(-result);
        return -1;
    }
    return result;
#else
    (void)number, (void)a1, (void)a2, (void)a3, (void)a4, (void)a5, (void)a6;
    errno = ENOSYS;
    return -1;
#endif
}

}  // namespace

long tcps_syscall_slow(long number, long a1, long a2, long a3, long a4, long a5, long a6) {
    // The kernel reads these as unsigned ints: the low 32 bits of each register.
    if (number == SYS_close) return close(static_cast<int>(a1));
    if (number == SYS_close_range)
        return close_range(static_cast<unsigned>(a1), static_cast<unsigned>(a2),
                           static_cast<int>(a3));
    const auto libc_syscall = real(libc.syscall);
    if (!libc_syscall) return direct_syscall(number, a1, a2, a3, a4, a5, a6);
    __atomic_store_n(&tcps_libc_syscall, libc_syscall, __ATOMIC_RELEASE);
    return libc_syscall(number, a1, a2, a3, a4, a5, a6);
}

// ---------------------------------------------------------------------------------------------
// readiness

// glibc declares poll()'s array write-only (__attr_access): it is read as well, here as in
// the kernel, so GCC's "may be used uninitialized" about it is wrong.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

TCPS_EXPORT int poll(pollfd *fds, nfds_t nfds, int timeout) {
    const int saved = errno;
    bool handled;
    const long rc = poll_common(fds, nfds, ms_to_ns(timeout), nullptr, handled);
    if (handled) return finish<int>(rc, saved);
    if (timeout == 0) return pass(libc.poll, fds, nfds, timeout);
    const KernelWaits waits(fds, nfds);
    if (waits.became_ours()) return poll(fds, nfds, timeout);
    return pass(libc.poll, fds, nfds, timeout);
}

TCPS_EXPORT int ppoll(pollfd *fds, nfds_t nfds, const timespec *timeout, const sigset_t *sigmask) {
    const int saved = errno;
    if (poll_has_offloaded(fds, nfds)) {
        const int64_t timeout_ns = timespec_to_ns(timeout);
        if (timeout && timeout_ns < 0) return finish<int>(-EINVAL, saved);
        return finish<int>(op_poll(fds, nfds, timeout_ns, sigmask), saved);
    }
    const KernelWaits waits(fds, nfds);
    if (waits.became_ours()) return ppoll(fds, nfds, timeout, sigmask);
    return pass(libc.ppoll, fds, nfds, timeout, sigmask);
}

TCPS_EXPORT int __poll_chk(pollfd *fds, nfds_t nfds, int timeout, size_t fdslen) {
    if (fdslen / sizeof(*fds) < nfds) __chk_fail();
    return poll(fds, nfds, timeout);
}

TCPS_EXPORT int __ppoll_chk(pollfd *fds, nfds_t nfds, const timespec *timeout,
                            const sigset_t *sigmask, size_t fdslen) {
    if (fdslen / sizeof(*fds) < nfds) __chk_fail();
    return ppoll(fds, nfds, timeout, sigmask);
}

#pragma GCC diagnostic pop

TCPS_EXPORT int select(int nfds, fd_set *r, fd_set *w, fd_set *e, timeval *timeout) {
    const int saved = errno;
    if (select_has_offloaded(nfds, r, w, e)) {
        int64_t timeout_ns = -1;
        if (timeout) {
            if (timeout->tv_sec < 0 || timeout->tv_usec < 0) return finish<int>(-EINVAL, saved);
            timeout_ns = static_cast<int64_t>(timeout->tv_sec) * 1'000'000'000 +
                         static_cast<int64_t>(timeout->tv_usec) * 1000;
        }
        int64_t remaining = 0;
        const long rc = op_select(nfds, r, w, e, timeout_ns, nullptr, &remaining);
        if (timeout) {  // Linux's select() reports the time left
            timeout->tv_sec = static_cast<time_t>(remaining / 1'000'000'000);
            timeout->tv_usec = static_cast<suseconds_t>(remaining % 1'000'000'000 / 1000);
        }
        return finish<int>(rc, saved);
    }
    const KernelWaits waits(nfds, r, w, e);
    if (waits.became_ours()) return select(nfds, r, w, e, timeout);
    return pass(libc.select, nfds, r, w, e, timeout);
}

TCPS_EXPORT int pselect(int nfds, fd_set *r, fd_set *w, fd_set *e, const timespec *timeout,
                        const sigset_t *sigmask) {
    const int saved = errno;
    if (select_has_offloaded(nfds, r, w, e)) {
        const int64_t timeout_ns = timespec_to_ns(timeout);
        if (timeout && timeout_ns < 0) return finish<int>(-EINVAL, saved);
        return finish<int>(op_select(nfds, r, w, e, timeout_ns, sigmask, nullptr), saved);
    }
    const KernelWaits waits(nfds, r, w, e);
    if (waits.became_ours()) return pselect(nfds, r, w, e, timeout, sigmask);
    return pass(libc.pselect, nfds, r, w, e, timeout, sigmask);
}

TCPS_EXPORT int epoll_create(int size) __THROW {
    return pass(libc.epoll_create, size);
}

TCPS_EXPORT int epoll_create1(int flags) __THROW {
    return pass(libc.epoll_create1, flags);
}

TCPS_EXPORT int epoll_ctl(int epfd, int op, int fd, epoll_event *event) __THROW {
    SocketRef ref;
    const int saved = errno;
    if (offloaded(fd, ref)) {
        const long rc = op_epoll_ctl(epfd, op, ref, event);
        if (!went_to_kernel(ref, rc, saved)) return finish<int>(rc, saved);
    }
    if (g_fds.size() != 0 && g_fds.get(epfd).kind() == FdKind::kSocket) {
        // A socket is no epoll (the kernel would see our O_PATH placeholder and say EBADF).
        if ((op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && !event)
            return finish<int>(-EFAULT, saved);
        return finish<int>(real(libc.fcntl)(fd, F_GETFD) < 0 ? -EBADF : -EINVAL, saved);
    }
    // Counted: a kernel-served socket's registrations move with it, so none may change
    // while it moves.
    const KernelCall kernel_call(fd);
    if (kernel_call.became_ours()) return epoll_ctl(epfd, op, fd, event);
    const int rc = pass(libc.epoll_ctl, epfd, op, fd, event);
    if (rc == 0) note_epoll_ctl(epfd, op, fd, event);  // a kernel-served socket's, kept
    return rc;
}

TCPS_EXPORT int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout) {
    const int saved = errno;
    bool handled;
    const long rc = epoll_wait_common(epfd, events, maxevents, ms_to_ns(timeout), nullptr, handled);
    if (handled) return finish<int>(rc, saved);
    if (g_fds.size() == 0) return pass(libc.epoll_wait, epfd, events, maxevents, timeout);
    auto wait = [&] { return pass(libc.epoll_wait, epfd, events, maxevents, timeout); };
    return finish<int>(epoll_wait_kernel(epfd, events, maxevents, ms_to_ns(timeout), nullptr, wait),
                       saved);
}

TCPS_EXPORT int epoll_pwait(int epfd, epoll_event *events, int maxevents, int timeout,
                            const sigset_t *sigmask) {
    const int saved = errno;
    bool handled;
    const long rc = epoll_wait_common(epfd, events, maxevents, ms_to_ns(timeout), sigmask, handled);
    if (handled) return finish<int>(rc, saved);
    if (g_fds.size() == 0) return pass(libc.epoll_pwait, epfd, events, maxevents, timeout, sigmask);
    auto wait = [&] { return pass(libc.epoll_pwait, epfd, events, maxevents, timeout, sigmask); };
    return finish<int>(epoll_wait_kernel(epfd, events, maxevents, ms_to_ns(timeout), sigmask, wait),
                       saved);
}

TCPS_EXPORT int epoll_pwait2(int epfd, epoll_event *events, int maxevents, const timespec *timeout,
                             const sigset_t *sigmask) {
    const int saved = errno;
    if (g_fds.size() != 0 &&
        (epoll_has_members(epfd) || g_fds.get(epfd).kind() == FdKind::kSocket)) {
        const int64_t timeout_ns = timespec_to_ns(timeout);
        if (timeout && timeout_ns < 0) return finish<int>(-EINVAL, saved);
        bool handled;
        const long rc = epoll_wait_common(epfd, events, maxevents, timeout_ns, sigmask, handled);
        if (handled) return finish<int>(rc, saved);
    }
    const int64_t timeout_ns = timespec_to_ns(timeout);
    if (g_fds.size() == 0 || (timeout && timeout_ns < 0))
        return pass(libc.epoll_pwait2, epfd, events, maxevents, timeout, sigmask);
    auto wait = [&] { return pass(libc.epoll_pwait2, epfd, events, maxevents, timeout, sigmask); };
    return finish<int>(epoll_wait_kernel(epfd, events, maxevents, timeout_ns, sigmask, wait),
                       saved);
}

// ---------------------------------------------------------------------------------------------
// _FORTIFY_SOURCE variants: the buffer check, then the plain call.

TCPS_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags) {
    if (len > buflen) __chk_fail();
    return recv(fd, buf, len, flags);
}

TCPS_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                                   sockaddr *addr, socklen_t *addr_len) {
    if (len > buflen) __chk_fail();
    return recvfrom(fd, buf, len, flags, addr, addr_len);
}

TCPS_EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen) {
    if (len > buflen) __chk_fail();
    return read(fd, buf, len);
}
