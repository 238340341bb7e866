// What the benchmark programs share: fatal errors, clocks, and the loopback plumbing between a
// measuring client and its (never preloaded) peer.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace tcps::bench {

// Set by each program's main() so that messages name it.
inline const char *program_name = "bench";

[[noreturn]] inline void die(const char *what) {
    std::fprintf(stderr, "%s: %s: %s\n", program_name, what, std::strerror(errno));
    std::exit(1);
}

inline uint64_t clock_ns(clockid_t clock) {
    timespec ts;
    clock_gettime(clock, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

inline void set_nodelay(int fd) {
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Listens on 127.0.0.1 with a port the kernel picks and writes that port to `port_file`
// (through a temporary name and a rename, so a reader never sees half a number).
inline int listen_loopback(const char *port_file) {
    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) die("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) < 0) die("bind");
    if (listen(listener, 16) < 0) die("listen");
    socklen_t len = sizeof(addr);
    if (getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len) < 0) die("getsockname");
    const std::string tmp = std::string(port_file) + ".tmp";
    FILE *out = std::fopen(tmp.c_str(), "w");
    if (!out) die("port file");
    std::fprintf(out, "%d\n", ntohs(addr.sin_port));
    std::fclose(out);
    if (std::rename(tmp.c_str(), port_file) < 0) die("rename port file");
    return listener;
}

// A connected TCP socket to 127.0.0.1:port, with TCP_NODELAY.
inline int connect_loopback(int port) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) < 0) die("connect");
    set_nodelay(fd);
    return fd;
}

}  // namespace tcps::bench
