// Helpers shared by the fork/exec/SCM_RIGHTS test programs (fork_accept.cpp, scm_rights.cpp,
// inetd.cpp). Each program is both the application under test (preloaded) and its plain peer.
// Every wait is bounded: sockets get SO_RCVTIMEO/SO_SNDTIMEO, and the I/O helpers also poll
// non-blocking sockets against a deadline. A failure prints one line and exits 1.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace tcps_test {

using Clock = std::chrono::steady_clock;
inline constexpr int kWaitSeconds = 20;  // the bound on any single wait

inline const char *g_program = "test";

[[noreturn]] inline void die(const char *format, ...) __attribute__((format(printf, 1, 2)));
inline void die(const char *format, ...) {
    char line[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(line, sizeof(line), format, args);
    va_end(args);
    std::fprintf(stderr, "%s[%d]: FAIL: %s\n", g_program, getpid(), line);
    std::fflush(stderr);
    _exit(1);
}

inline void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
inline void say(const char *format, ...) {
    va_list args;
    va_start(args, format);
    std::vprintf(format, args);
    va_end(args);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

inline int to_int(const char *text) {
    char *end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (!*text || *end || value < 0 || value > 100'000'000) die("bad number '%s'", text);
    return static_cast<int>(value);
}

inline sockaddr_in loopback(uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    return addr;
}

inline void set_timeouts(int fd, int seconds) {
    const timeval limit{seconds, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit)) != 0)
        die("SO_RCVTIMEO/SO_SNDTIMEO on fd %d: %s", fd, std::strerror(errno));
}

inline int connect_to(uint16_t port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", std::strerror(errno));
    set_timeouts(fd, kWaitSeconds);  // SO_SNDTIMEO bounds connect() too
    const sockaddr_in addr = loopback(port);
    if (connect(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr)) != 0)
        die("connect to port %u: %s", port, std::strerror(errno));
    return fd;
}

// A listener on 127.0.0.1 with a port the kernel picks, announced by writing it to `port_file`
// (written whole, then renamed, so a reader never sees half a number).
inline int listen_announced(const char *port_file, int backlog = 128) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", std::strerror(errno));
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr = loopback(0);
    if (bind(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0 || listen(fd, backlog))
        die("bind/listen: %s", std::strerror(errno));
    socklen_t len = sizeof(addr);
    if (getsockname(fd, reinterpret_cast<sockaddr *>(&addr), &len) != 0)
        die("getsockname: %s", std::strerror(errno));
    const std::string temporary = std::string(port_file) + ".tmp";
    FILE *out = std::fopen(temporary.c_str(), "w");
    if (!out) die("cannot write %s", temporary.c_str());
    std::fprintf(out, "%u\n", ntohs(addr.sin_port));
    std::fclose(out);
    if (std::rename(temporary.c_str(), port_file) != 0) die("rename to %s", port_file);
    return fd;
}

// What fd points at: an offloaded socket's fd is the shim's O_PATH placeholder of /dev/null, a
// kernel socket's is "socket:[inode]".
inline std::string fd_target(int fd) {
    char link[64];
    char target[256] = {};
    std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    const ssize_t n = readlink(link, target, sizeof(target) - 1);
    return n > 0 ? std::string(target, static_cast<size_t>(n)) : std::string("?");
}

// Waits until fd is ready for `events` or the deadline passes (then dies, naming `what`).
inline void wait_ready(int fd, short events, Clock::time_point deadline, const char *what) {
    for (;;) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() <= 0) die("%s: timed out", what);
        pollfd entry{fd, events, 0};
        const int n = poll(&entry, 1, static_cast<int>(left.count()));
        if (n > 0) return;
        if (n < 0 && errno != EINTR) die("%s: poll: %s", what, std::strerror(errno));
    }
}

// Sends all of `data` on a blocking or non-blocking socket within kWaitSeconds.
inline void send_all(int fd, const void *data, size_t len, const char *what = "send") {
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    const auto *bytes = static_cast<const uint8_t *>(data);
    while (len > 0) {
        const ssize_t n = send(fd, bytes, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            wait_ready(fd, POLLOUT, deadline, what);
            continue;
        }
        if (n <= 0) die("%s: %s", what, n < 0 ? std::strerror(errno) : "send returned 0");
        bytes += n;
        len -= static_cast<size_t>(n);
    }
}

// Reads until the peer's FIN (at most `limit` bytes) within kWaitSeconds.
inline std::string recv_until_eof(int fd, size_t limit, const char *what = "recv") {
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    std::string data;
    char buffer[16384];
    for (;;) {
        const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
        if (n == 0) return data;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (Clock::now() >= deadline) die("%s: timed out after %zu bytes", what, data.size());
            wait_ready(fd, POLLIN, deadline, what);
            continue;
        }
        if (n < 0) die("%s: %s after %zu bytes", what, std::strerror(errno), data.size());
        data.append(buffer, static_cast<size_t>(n));
        if (data.size() > limit) die("%s: more than %zu bytes", what, limit);
    }
}

// Reads exactly `len` bytes within kWaitSeconds.
inline std::string recv_exactly(int fd, size_t len, const char *what = "recv") {
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    std::string data(len, '\0');
    size_t got = 0;
    while (got < len) {
        const ssize_t n = recv(fd, data.data() + got, len - got, 0);
        if (n == 0) die("%s: EOF after %zu of %zu bytes", what, got, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (Clock::now() >= deadline) die("%s: timed out after %zu bytes", what, got);
            wait_ready(fd, POLLIN, deadline, what);
            continue;
        }
        if (n < 0) die("%s: %s after %zu of %zu bytes", what, std::strerror(errno), got, len);
        got += static_cast<size_t>(n);
    }
    return data;
}

// A pause for the test script to look at sockets (ss) while a connection is surely open. With
// $TCPS_TEST_HOLD_DIR set, prints "holding NAME" and waits (kWaitSeconds at most) for the file
// NAME in that directory; without it, returns at once.
inline void hold_point(const char *name) {
    const char *dir = std::getenv("TCPS_TEST_HOLD_DIR");
    if (!dir || !*dir) return;
    const std::string path = std::string(dir) + "/" + name;
    std::printf("holding %s\n", name);
    std::fflush(stdout);
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    while (access(path.c_str(), F_OK) != 0) {
        if (Clock::now() >= deadline) die("nobody released the hold '%s'", name);
        usleep(10'000);
    }
}

// `len` bytes that depend on `seed`: a misplaced, repeated or foreign byte shows.
inline std::string pattern(uint32_t seed, size_t len) {
    std::string data(len, '\0');
    uint32_t x = seed * 2654435761u + 12345u;
    for (size_t i = 0; i < len; ++i) {
        x = x * 1103515245u + 12345u;
        data[i] = static_cast<char>(x >> 24);
    }
    return data;
}

}  // namespace tcps_test
