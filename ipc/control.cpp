#include "control.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace tcps::ipc {

std::string default_engine_socket_path() {
    const uid_t uid = getuid();
    if (uid == 0) return "/run/tcps/engine.sock";
    if (const char *xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg)
        return std::string(xdg) + "/tcps/engine.sock";
    return "/tmp/tcps-" + std::to_string(uid) + "/engine.sock";
}

std::string engine_socket_path() {
    if (const char *env = std::getenv(kEngineSocketEnv); env && *env) return env;
    return default_engine_socket_path();
}

int check_engine_identity(int sock, const char *path, char *why, size_t why_size) {
    const uid_t self = geteuid();
    const auto trusted = [self](uid_t uid) { return uid == 0 || uid == self; };
    ucred peer{};
    socklen_t len = sizeof(peer);
    // Raw: inside libtcps.so, ::getsockopt is the shim's own.
    if (syscall(SYS_getsockopt, sock, SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0) {
        std::snprintf(why, why_size, "SO_PEERCRED: %s", std::strerror(errno));
        return -EPERM;
    }
    if (!trusted(peer.uid)) {
        std::snprintf(why, why_size, "the engine on %s runs as uid %u, not root or uid %u", path,
                      peer.uid, self);
        return -EPERM;
    }
    struct stat st {};
    if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode) || !trusted(st.st_uid)) {
        std::snprintf(why, why_size, "%s is not a socket owned by root or uid %u", path, self);
        return -EPERM;
    }
    char dir[4096];
    const char *slash = std::strrchr(path, '/');
    size_t dir_len = slash ? static_cast<size_t>(slash - path) : 0;
    if (!slash) {
        dir[0] = '.', dir_len = 1;
    } else if (dir_len == 0) {
        dir[0] = '/', dir_len = 1;
    } else if (dir_len < sizeof(dir)) {
        std::memcpy(dir, path, dir_len);
    } else {
        std::snprintf(why, why_size, "socket path too long");
        return -EPERM;
    }
    dir[dir_len] = '\0';
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || !trusted(st.st_uid) ||
        ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))) {
        std::snprintf(why, why_size,
                      "%s is not a directory of root or uid %u that only they can change", dir,
                      self);
        return -EPERM;
    }
    return 0;
}

// Raw syscalls: inside libtcps.so, ::sendmsg/::recvmsg would be the shim's own interposers.
static ssize_t raw_sendmsg(int sock, const msghdr *msg, int flags) {
    return syscall(SYS_sendmsg, sock, msg, flags);
}
static ssize_t raw_recvmsg(int sock, msghdr *msg, int flags) {
    return syscall(SYS_recvmsg, sock, msg, flags);
}

int send_control(int sock, const ControlMessage &msg, const int *fds, int nfds, bool with_creds) {
    if (nfds < 0 || nfds > kMaxControlFds) return -EINVAL;
    iovec iov{const_cast<ControlMessage *>(&msg), sizeof(msg)};
    alignas(cmsghdr) char
        control[CMSG_SPACE(sizeof(int) * kMaxControlFds) + CMSG_SPACE(sizeof(ucred))] = {};
    msghdr header{};
    header.msg_iov = &iov;
    header.msg_iovlen = 1;
    if (nfds > 0 || with_creds) {
        header.msg_control = control;
        header.msg_controllen = (nfds > 0 ? CMSG_SPACE(sizeof(int) * nfds) : 0) +
                                (with_creds ? CMSG_SPACE(sizeof(ucred)) : 0);
    }
    cmsghdr *cmsg = header.msg_control ? CMSG_FIRSTHDR(&header) : nullptr;
    if (nfds > 0) {
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        std::memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
        cmsg = CMSG_NXTHDR(&header, cmsg);
    }
    if (with_creds) {
        // Raw syscalls: in a vfork()ed child getpid() may be glibc's cached parent pid.
        const ucred creds{static_cast<pid_t>(syscall(SYS_getpid)),
                          static_cast<uid_t>(syscall(SYS_geteuid)),
                          static_cast<gid_t>(syscall(SYS_getegid))};
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_CREDENTIALS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(ucred));
        std::memcpy(CMSG_DATA(cmsg), &creds, sizeof(creds));
    }
    for (;;) {
        ssize_t n = raw_sendmsg(sock, &header, MSG_NOSIGNAL);
        if (n == static_cast<ssize_t>(sizeof(msg))) return 0;
        if (n >= 0) return -EPROTO;
        if (errno != EINTR) return -errno;
    }
}

int recv_control(int sock, ControlMessage &msg, int *fds, int max_fds, int flags,
                 ControlCreds *creds) {
    for (int i = 0; i < max_fds; ++i) fds[i] = -1;
    if (creds) *creds = ControlCreds{};
    iovec iov{&msg, sizeof(msg)};
    // Room for our descriptors and for the credentials SO_PASSCRED adds to every message.
    alignas(cmsghdr) char
        control[CMSG_SPACE(sizeof(int) * kMaxControlFds) + CMSG_SPACE(sizeof(ucred))] = {};
    msghdr header{};
    header.msg_iov = &iov;
    header.msg_iovlen = 1;
    header.msg_control = control;
    header.msg_controllen = sizeof(control);
    ssize_t n;
    do {
        n = raw_recvmsg(sock, &header, flags | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    if (n == 0) return -ECONNRESET;

    int received = 0;
    bool excess = false;
    for (cmsghdr *cmsg = CMSG_FIRSTHDR(&header); cmsg; cmsg = CMSG_NXTHDR(&header, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_CREDENTIALS &&
            cmsg->cmsg_len >= CMSG_LEN(sizeof(ucred))) {
            ucred sender;
            std::memcpy(&sender, CMSG_DATA(cmsg), sizeof(sender));
            if (creds) *creds = {true, sender.pid, sender.uid, sender.gid};
            continue;
        }
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
            if (received < max_fds) {
                fds[received++] = fd;
            } else {
                close(fd);
                excess = true;
            }
        }
    }
    if (excess || (header.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) ||
        n != static_cast<ssize_t>(sizeof(msg))) {
        for (int i = 0; i < received; ++i) {
            close(fds[i]);
            fds[i] = -1;
        }
        return -EPROTO;
    }
    return 0;
}

}  // namespace tcps::ipc
