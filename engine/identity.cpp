#include "identity.hpp"

#include <fcntl.h>
#include <linux/nsfs.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace tcps::engine {

namespace {

// The inode of a namespace file (/proc/PID/ns/net and friends), 0 if it cannot be read.
ino_t ns_inode(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? st.st_ino : 0;
}

ino_t fd_inode(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

// Runs `body` with this thread in the network namespace `target` (an nsfs fd), then puts the
// thread back. False (body not run) if the namespace cannot be entered.
template <class Body>
bool in_netns(int target, Body &&body) {
    const int own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (own < 0) return false;
    if (setns(target, CLONE_NEWNET) != 0) {
        close(own);
        return false;
    }
    body();
    // Back home: failing here would leave a worker in a client's namespace for good.
    if (setns(own, CLONE_NEWNET) != 0) abort();
    close(own);
    return true;
}

int read_port_start_here() {
    const int fd = open("/proc/sys/net/ipv4/ip_unprivileged_port_start", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1024;
    char buffer[32] = {};
    const ssize_t n = read(fd, buffer, sizeof(buffer) - 1);
    close(fd);
    if (n <= 0) return 1024;
    char *end = nullptr;
    const long value = std::strtol(buffer, &end, 10);
    if (end == buffer || value < 0 || value > 65536) return 1024;
    return static_cast<int>(value);
}

}  // namespace

namespace {

// A non-blocking TCP socket owned by uid/gid, in the network namespace `netns` (an nsfs fd; -1:
// this thread's own).
int create_socket_in(int netns, int family, uid_t uid, gid_t gid) {
    // fsuid/fsgid become the socket inode's owner (sock_alloc) and the file's credentials.
    // Raw syscalls: glibc's setfsuid() is per thread too, but say so plainly.
    const long old_uid = syscall(SYS_setfsuid, uid);
    const long old_gid = syscall(SYS_setfsgid, gid);
    int fd = -1, error = 0;
    auto make = [&] {
        fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) error = errno;
    };
    bool entered = true;
    if (netns >= 0)
        entered = in_netns(netns, make);
    else
        make();
    syscall(SYS_setfsgid, old_gid);
    syscall(SYS_setfsuid, old_uid);
    if (!entered) return -EPERM;
    return fd >= 0 ? fd : -error;
}

}  // namespace

int create_socket_as(int family, uid_t uid, gid_t gid, pid_t pid) {
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/ns/net", pid);
    const ino_t theirs = ns_inode(path);
    if (theirs == 0) return -ESRCH;
    int netns = -1;
    if (theirs != ns_inode("/proc/thread-self/ns/net")) {
        netns = open(path, O_RDONLY | O_CLOEXEC);
        if (netns < 0) return -ESRCH;
    }
    const int fd = create_socket_in(netns, family, uid, gid);
    if (netns >= 0) close(netns);
    return fd;
}

int create_socket_like(int fd, int family) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    int netns = ioctl(fd, SIOCGSKNS);
    if (netns < 0) return -errno;
    if (fd_inode(netns) == ns_inode("/proc/thread-self/ns/net")) {
        close(netns);
        netns = -1;
    }
    const int made = create_socket_in(netns, family, st.st_uid, st.st_gid);
    if (netns >= 0) close(netns);
    return made;
}

int unprivileged_port_start_of(int fd) {
    const int netns = ioctl(fd, SIOCGSKNS);
    if (netns < 0) return read_port_start_here();
    int value = 1024;
    if (fd_inode(netns) == ns_inode("/proc/thread-self/ns/net")) {
        value = read_port_start_here();
    } else if (!in_netns(netns, [&] { value = read_port_start_here(); })) {
        // Not ours to enter (an engine without CAP_SYS_ADMIN): judge by our own namespace's.
        value = read_port_start_here();
    }
    close(netns);
    return value;
}

bool caps_count_in_netns_of(int fd, pid_t pid) {
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/ns/user", pid);
    const ino_t theirs = ns_inode(path);
    if (theirs == 0) return false;
    const int netns = ioctl(fd, SIOCGSKNS);
    if (netns < 0) return false;
    int userns = ioctl(netns, NS_GET_USERNS);
    close(netns);
    // From the namespace's owner up to the root: the client's capabilities count if its own
    // user namespace is on that path.
    bool counts = false;
    for (int depth = 0; userns >= 0 && depth < 64; ++depth) {
        if (fd_inode(userns) == theirs) {
            counts = true;
            break;
        }
        const int parent = ioctl(userns, NS_GET_PARENT);
        close(userns);
        userns = parent;
    }
    if (userns >= 0) close(userns);
    return counts;
}

}  // namespace tcps::engine
