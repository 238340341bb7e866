// SCM_RIGHTS: an offloaded socket passed to another process goes back to the kernel.
//
// The receiver may be any process, with or without the shim, and only the kernel socket means
// the same thing everywhere. So when the application sends one of our descriptors over an
// AF_UNIX socket, the engine stops receiving on it, sends what its tx ring still holds, and
// gives us its kernel socket; we put that socket under every descriptor number the application
// has for it (dup3 over the placeholders) and the message then carries the real socket. From
// then on the kernel serves it, in the sender too. Bytes the engine had already received and
// the application had not read cannot be put back into the kernel socket: that loss is said on
// stderr (applications pass sockets before reading from them, or listeners). An exec of a
// program that will not load the shim (static, set-user-ID) hands its inherited sockets back
// the same way (exec.cpp).
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "libc.hpp"
#include "ops.hpp"
#include "session.hpp"

namespace tcps::shim {

void hand_back(const SocketRef &ref) {
    int kernel_fd = -1;
    uint32_t lost_bytes = 0, lost_connections = 0;
    if (request_handoff(ref.slot, kernel_fd, lost_bytes, lost_connections) != 0) return;
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
    // The engine's descriptor goes too; the kernel socket lives on in ours.
    if (unhold_socket(ref.slot)) request_close(ref.slot, false);
    if (lost_bytes > 0 || lost_connections > 0) {
        char line[200];
        const int n = std::snprintf(
            line, sizeof(line),
            "tcps: pid %d: socket passed with SCM_RIGHTS: %u received bytes and %u queued "
            "connections the application had not taken are lost\n",
            getpid(), lost_bytes, lost_connections);
        if (n > 0) {
            ssize_t ignored = real(libc.write)(2, line, static_cast<size_t>(n));
            (void)ignored;
        }
    }
}

void hand_back_passed_sockets(const msghdr *msg) {
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
            SocketRef ref;
            if (find_socket(fd, ref)) hand_back(ref);
        }
    }
}

}  // namespace tcps::shim
