// The shim's operations on offloaded sockets, called by the interposed entry points
// (interpose.cpp) once they know the fd is ours. Each returns a result >= 0 or -errno, the
// way the kernel returns it; the entry point turns that into -1/errno for the application.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "session.hpp"

namespace tcps::shim {

// op_socket's answer when the call must go to the kernel (not TCP, no engine, no slot).
inline constexpr long kUseKernel = LONG_MIN;

// socket_ops.cpp
long op_socket(int domain, int type, int protocol);
long op_bind(SocketRef &ref, const sockaddr *addr, socklen_t len);
long op_listen(SocketRef &ref, int backlog);
long op_connect(SocketRef &ref, const sockaddr *addr, socklen_t len);
long op_accept(SocketRef &ref, sockaddr *addr, socklen_t *len, int flags);
long op_shutdown(SocketRef &ref, int how);
long op_getsockname(SocketRef &ref, sockaddr *addr, socklen_t *len);
long op_getpeername(SocketRef &ref, sockaddr *addr, socklen_t *len);
long op_getsockopt(SocketRef &ref, int level, int name, void *value, socklen_t *len);
long op_setsockopt(SocketRef &ref, int level, int name, const void *value, socklen_t len);
long op_fcntl(SocketRef &ref, int cmd, unsigned long arg);
// fstat()/statx() of the socket: the engine's kernel socket's (Op::kStat), with `mask` and
// the AT_STATX_SYNC_TYPE bits of `flags`. Without an engine, what Linux says of any socket
// but its inode and times (0).
long op_stat(SocketRef &ref, unsigned mask, int flags, struct statx &out);
long op_ioctl(SocketRef &ref, unsigned long request, void *arg);

// Descriptor bookkeeping for any fd the table knows (socket, epoll, internal). These also
// make the real call; they return kUseKernel when the fd is none of ours.
long op_close(int fd);
long op_dup(int fd);
long op_dup3(int oldfd, int newfd, int flags, bool is_dup3);
long op_dupfd(int fd, int cmd, int min_fd);

// io_ops.cpp
long op_send(SocketRef &ref, const iovec *iov, int iovcnt, int flags);
// `answered_before`: an earlier part of the same call has moved bytes (recvmmsg's later
// entries), so any interruption ends its wait, as one after bytes of its own would.
long op_recv(SocketRef &ref, const iovec *iov, int iovcnt, int flags, bool answered_before = false);
// Direct mode (ipc::kFlagRxDirect) with bytes waiting in the engine's kernel socket: a recv()
// would take them (it asks for the ring back).
bool direct_bytes_wait(const ipc::SocketSlot &shm);
// sendfile() to an offloaded socket: the file's bytes are read here and sent through the ring.
long op_sendfile(SocketRef &ref, int in_fd, off_t *offset, size_t count);
// splice() with an offloaded socket on one side (`socket_is_input`: it is fd_in) and, on the
// other, what must be a pipe, as tcp_splice_read() and splice_to_socket() behave.
long op_splice(SocketRef &ref, bool socket_is_input, int other_fd, bool other_offloaded,
               const loff_t *socket_offset, const loff_t *other_offset, size_t len,
               unsigned int flags);

// poll.cpp: poll/ppoll and select/pselect on a set that may hold offloaded fds.
// timeout_ns < 0: forever.
bool poll_has_offloaded(const pollfd *fds, nfds_t nfds);
long op_poll(pollfd *fds, nfds_t nfds, int64_t timeout_ns, const sigset_t *sigmask);
bool select_has_offloaded(int nfds, const fd_set *r, const fd_set *w, const fd_set *e);
long op_select(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t timeout_ns,
               const sigset_t *sigmask, int64_t *remaining_ns);

// epoll.cpp
long op_epoll_ctl(int epfd, int op, SocketRef &ref, epoll_event *event);
// True when epfd has offloaded members (op_epoll_wait must run) or is ours to check.
bool epoll_has_members(int epfd);
long op_epoll_wait(int epfd, epoll_event *events, int maxevents, int64_t timeout_ns,
                   const sigset_t *sigmask);
// After a real epoll_wait() on an fd that became one of ours while it slept: drops our
// wake-up events from its result. Returns the events left.
int epoll_strip_wake(int epfd, epoll_event *events, int n);
// The epoll registry `id` lost one fd that named it (close/dup2 over it).
void epoll_release(uint32_t id);
// Another fd now names registry `id` (dup of an epoll fd).
void epoll_retain(uint32_t id);
// The socket went back to the kernel (SCM_RIGHTS): its registrations move from our registries
// into the application's kernel epoll sets, under the same fd numbers, events and data.
void epoll_hand_back(FdRef socket);

// Calls `each(fd)` for every descriptor an AF_UNIX message carries with SCM_RIGHTS.
template <class Each>
inline void for_each_passed_fd(const msghdr *msg, Each &&each) {
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

// handoff.cpp: before an AF_UNIX sendmsg() carrying SCM_RIGHTS, every offloaded socket in it
// goes back to the kernel (in this process too), so the message carries real sockets; the
// bytes the engine received on them and the application did not read wait in the engine for
// the receiver.
void hand_back_passed_sockets(const msghdr *msg);
// One socket back to the kernel: every fd number of this process for it becomes the kernel
// socket. `how`: ipc::kHandoff* bits (request_handoff). With kHandoffPark, its unread bytes wait
// for the next owner (else they are lost, and said on stderr). Not in a vfork()ed child (it
// edits the shim's table). True if handed back. `before_close`, if given, runs once the kernel
// socket is in place, before the engine's slot is closed (and may serve another socket).
bool hand_back(const SocketRef &ref, uint32_t how, void (*before_close)(Socket &) = nullptr);
// A connection from listener `ref`'s twin (ipc::kFlagTwinReady; its descriptor asked for the
// first time): the kernel's accept4() with `flags`, the socket put under `placeholder` (if
// not -1: else its own number), which is returned. -EAGAIN if none waits there; else the
// kernel's error.
long accept_from_twin(const SocketRef &ref, int placeholder, sockaddr *addr, socklen_t *len,
                      int flags);
// The engine asked for this connection back (ipc::kFlagShed, seed 003): hands it to the kernel
// if that is safe now (both rings empty, one thread in the process), to be offloaded again once
// the engine has room (adopt.cpp). True if it is the kernel's now: the caller's call goes there.
bool shed_to_kernel(const SocketRef &ref);
// After an AF_UNIX recvmsg() that brought SCM_RIGHTS descriptors: each kernel TCP socket
// among them that is not a listener is noted, to be offloaded (kAdoptSocket) under the same
// number when the application first uses it (adopt_pending), with the bytes its sender's
// engine had received and not read queued first. Not at once: the application may look at the
// new descriptor with raw system calls first (libuv's fstat() of a received handle, to learn
// its type), which must see a socket, not our placeholder.
void adopt_received_sockets(const msghdr *msg);
// At start-up: each kernel TCP listener this image found open and did not get from an exec
// of ours (socket activation) is noted the same way, to be served on demand once offered: its
// connections are the kernel's to hand out among all who hold it (ipc::kAdoptOnDemand).
void note_inherited_listeners();
// The first interposed call that uses `fd` (a lookup of the table): a noted socket is offered
// to the engine now. True if `fd` is then one of ours. One load when none is noted.
bool adopt_pending(int fd);
// adopt.cpp: a connection the engine left to the kernel at accept (kFlagKernelServed),
// offloaded again at a later call when the engine has room and it is safe (see adopt.cpp).
// `engine_saturated`: known to be now (a connection from a listener's twin), so not offered
// back at the next call.
void note_kernel_served(int fd, bool engine_saturated = false);
// The same for a connection accepted from a listener served on demand (kFlagAcceptOnDemand):
// offered at a call once it is old enough to be worth the move (adopt.cpp).
void note_accepted_on_demand(int fd);
// The same for a live connection handed to the kernel because the engine asked (kFlagShed).
// Before the hand-back, so that the epoll registrations it moves into the kernel's are kept.
void note_shed(int fd);
// After its hand-back: how long it stays the kernel's, longer each time the same connection is
// asked back again soon (adopt.cpp, ShedHistory).
void hold_after_shed(int fd);
// A call that goes to the kernel on `fd` (not one of ours), for its whole length: while it is
// in flight, a kernel-served socket there is not offloaded (adopt_pending), and one that
// another thread is offloading is waited for. became_ours(): it was offloaded meanwhile, so
// the caller makes the shim's call instead. One load when no socket is noted.
class KernelCall {
  public:
    explicit KernelCall(int fd);
    ~KernelCall();
    KernelCall(const KernelCall &) = delete;
    KernelCall &operator=(const KernelCall &) = delete;
    bool became_ours() const { return became_ours_; }

  private:
    void *entry_ = nullptr;  // the counted entry of adopt.cpp's map
    bool became_ours_ = false;
};
// The same for a kernel poll()/select() that may sleep (KernelWaits, poll.cpp), fd by fd:
// begin_kernel_wait() returns 1 if a call on kernel-served `fd` is now counted (end it with
// end_kernel_wait()), 0 if `fd` is no kernel-served socket, -1 if it was offloaded meanwhile.
bool kernel_served_any();
int begin_kernel_wait(int fd);
void end_kernel_wait(int fd);
// poll.cpp: for the length of a kernel poll()/select() that may sleep, each kernel-served
// socket among its fds counts as a kernel call (KernelCall), so that it does not move to the
// engine under the sleeper: the engine would take the bytes the sleeper waits for, and its
// kernel socket would never wake it. became_ours(): one moved before it could be counted, so
// the caller looks again through the shim. Nothing to do (one load) when none is noted.
class KernelWaits {
  public:
    KernelWaits(const pollfd *fds, nfds_t nfds);
    KernelWaits(int nfds, const fd_set *r, const fd_set *w, const fd_set *e);
    ~KernelWaits();
    KernelWaits(const KernelWaits &) = delete;
    KernelWaits &operator=(const KernelWaits &) = delete;
    bool became_ours() const { return became_ours_; }

  private:
    void add(int fd);
    int inline_[8];
    int *counted_ = inline_;
    size_t capacity_ = 8;
    size_t count_ = 0;
    bool became_ours_ = false;
};
// Before dup() of `fd`: a received socket is adopted first; a kernel-served one stays the
// kernel's for good.
void settle_pending_before_dup(int fd);
// After the kernel accepted epoll_ctl(epfd, op, fd, event) for a kernel fd: a kernel-served
// socket's registrations are kept, to move with it.
void note_epoll_ctl(int epfd, int op, int fd, const epoll_event *event);
// In the parent after fork(): its kernel-served sockets stay the kernel's (the child may use
// them too).
void forget_kernel_served();
// `fd` is closed or replaced (close, dup2 over it): it is no longer a noted socket.
void forget_pending(int fd);
// Before close(fd): a received socket closed unused is adopted first, so that its close goes
// through the engine (which resets it if bytes its sender left unread wait there).
void settle_pending_before_close(int fd);
void forget_pending_range(unsigned first, unsigned last);
// In a forked child: its inherited noted sockets stay the kernel's (the parent may use them).
void forget_all_pending();
// A new placeholder descriptor (socket_ops.cpp), or -errno.
int open_placeholder(bool cloexec);
// After the engine's end (its kernel socket died with it): a listener, or a bound socket, made
// again in the kernel: a socket of its family with the options the application set on it,
// bound to its address, listening with `backlog`, under every descriptor number this process
// has for it, its epoll registrations moved along. 0, or the -errno of the kernel's refusal
// (the port taken meanwhile, say), which leaves the socket dead.
int recover_listener(const SocketRef &ref, int backlog);

// io_ops.cpp: a call that may sleep holds its socket for the whole call, as the kernel's
// fdget() holds the file: close() of the fd in another thread does not end the call.
bool socket_hold(const SocketRef &ref);
void socket_unhold(const SocketRef &ref);

// socket_ops.cpp: one fd fewer names what `previous` named (a socket or an epoll registry).
void forget_entry(FdRef previous);

// exec.cpp: whether this vfork()ed child noted `fd` as one of our sockets (cheap when it has
// noted nothing, which is always the case outside a vfork child).
bool vfork_overlay_knows(int fd);

// Final close of an offloaded socket (its last fd is gone).
void socket_release(uint32_t slot);

// Timeouts: SO_RCVTIMEO/SO_SNDTIMEO as wait_until() takes them.
inline int64_t effective_timeout(const Socket &sock, bool nonblocking, bool receive) {
    if (nonblocking) return 0;
    const int64_t t = receive ? sock.rcv_timeout_ns.load(std::memory_order_relaxed)
                              : sock.snd_timeout_ns.load(std::memory_order_relaxed);
    if (t < 0) return 0;  // a negative timeval: never wait
    return t == 0 ? -1 : t;
}

}  // namespace tcps::shim
