// many_connections N: one process opens N TCP connections to itself over four listeners on
// 127.0.0.1 (so 2N sockets: N connected, N accepted), sends each connection's number through
// it, checks that every accepted end got exactly one distinct number, and closes them all.
// Run under libtcps.so it proves that one process family is not limited below what Linux
// allows (issue 9: it stalled past 3,072 accepted connections and 1,024 sockets of its own).
// Raises RLIMIT_NOFILE to fit (needs root past the hard limit). Prints one line per phase;
// exits 1 with the reason on the first failure, 3 if its sockets were kernel sockets while
// --expect-offload was given.
//
//   many_connections N [--expect-offload [GO_FILE]]
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kListeners = 4;  // each (address, port) pair has ~28k ephemeral source ports
constexpr int kBatch = 256;

[[noreturn]] void die(const char *what) {
    std::fprintf(stderr, "many_connections: FAIL: %s (%s)\n", what, std::strerror(errno));
    std::exit(1);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The shim keeps an offloaded socket's number with an O_PATH descriptor of /dev/null.
bool offloaded(int fd) {
    char path[64], target[64] = {};
    std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return readlink(path, target, sizeof(target) - 1) > 0 && std::strcmp(target, "/dev/null") == 0;
}

bool send_all(int fd, const void *data, size_t len) {
    const char *p = static_cast<const char *>(data);
    while (len > 0) {
        const ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n <= 0) return false;
        p += n, len -= static_cast<size_t>(n);
    }
    return true;
}

bool recv_all(int fd, void *data, size_t len) {
    char *p = static_cast<char *>(data);
    while (len > 0) {
        const ssize_t n = recv(fd, p, len, 0);
        if (n <= 0) return false;
        p += n, len -= static_cast<size_t>(n);
    }
    return true;
}

}  // namespace

int main(int argc, char **argv) {
    const long n = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 100000;
    const bool expect_offload = argc > 2 && std::string(argv[2]) == "--expect-offload";
    // With a third argument: after connecting, wait (60 s at most) for that file to exist, so
    // that a script can look at the connections while they are all open.
    const char *go_file = argc > 3 ? argv[3] : nullptr;
    if (n <= 0 || n > 400000) die("N must be 1..400000");
    alarm(600);  // a bound on the whole run, whatever happens

    const rlim_t need = static_cast<rlim_t>(2 * n + 256);
    rlimit limit{};
    getrlimit(RLIMIT_NOFILE, &limit);
    if (limit.rlim_cur < need) {
        limit.rlim_cur = need;
        if (limit.rlim_max < need) limit.rlim_max = need;
        if (setrlimit(RLIMIT_NOFILE, &limit) != 0) die("setrlimit(RLIMIT_NOFILE) for 2N sockets");
    }

    const auto start = std::chrono::steady_clock::now();
    sockaddr_in addrs[kListeners];
    int listeners[kListeners];
    for (int k = 0; k < kListeners; ++k) {
        listeners[k] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (listeners[k] < 0) die("socket (listener)");
        sockaddr_in &a = addrs[k];
        a = sockaddr_in{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(listeners[k], reinterpret_cast<sockaddr *>(&a), sizeof(a)) != 0) die("bind");
        if (listen(listeners[k], 4096) != 0) die("listen");
        socklen_t len = sizeof(a);
        getsockname(listeners[k], reinterpret_cast<sockaddr *>(&a), &len);
    }
    if (expect_offload && !offloaded(listeners[0])) {
        std::fprintf(stderr, "many_connections: the listener is a kernel socket\n");
        return 3;
    }

    std::vector<int> clients, servers;
    clients.reserve(static_cast<size_t>(n));
    servers.reserve(static_cast<size_t>(n));
    auto accept_ready = [&] {
        for (int k = 0; k < kListeners; ++k) {
            for (;;) {
                const int fd = accept4(listeners[k], nullptr, nullptr, SOCK_CLOEXEC);
                if (fd >= 0) {
                    servers.push_back(fd);
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                die("accept4");
            }
        }
    };
    while (static_cast<long>(clients.size()) < n) {
        // A batch of connects, then take what arrived, so the backlogs never overflow.
        for (int b = 0; b < kBatch && static_cast<long>(clients.size()) < n; ++b) {
            const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) die("socket (client)");
            const sockaddr_in &to = addrs[clients.size() % kListeners];
            if (connect(fd, reinterpret_cast<const sockaddr *>(&to), sizeof(to)) != 0 &&
                errno != EINPROGRESS)
                die("connect");
            clients.push_back(fd);
        }
        accept_ready();
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (static_cast<long>(servers.size()) < n) {
        accept_ready();
        if (std::chrono::steady_clock::now() > deadline) {
            std::fprintf(stderr, "many_connections: FAIL: accepted %zu of %ld\n", servers.size(),
                         n);
            return 1;
        }
        usleep(1000);
    }
    std::printf("connected and accepted %ld connections (%ld sockets) in %.1f s\n", n, 2 * n,
                seconds_since(start));
    std::fflush(stdout);
    if (expect_offload && (!offloaded(clients.back()) || !offloaded(servers.back()))) {
        std::fprintf(stderr, "many_connections: the last connection's sockets are the kernel's\n");
        return 3;
    }

    if (go_file) {
        for (int k = 0; k < 6000 && access(go_file, F_OK) != 0; ++k) usleep(10'000);
        if (access(go_file, F_OK) != 0) die("the go file never appeared");
    }
    const auto exchange = std::chrono::steady_clock::now();
    for (size_t i = 0; i < clients.size(); ++i) {
        const int flags = fcntl(clients[i], F_GETFL);
        fcntl(clients[i], F_SETFL, flags & ~O_NONBLOCK);
        const uint32_t id = static_cast<uint32_t>(i);
        if (!send_all(clients[i], &id, sizeof(id))) die("send");
    }
    std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
    for (int fd : servers) {
        const int flags = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
        timeval tv{30, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        uint32_t id = 0;
        if (!recv_all(fd, &id, sizeof(id))) die("recv");
        if (id >= static_cast<uint32_t>(n) || seen[id]) {
            std::fprintf(stderr, "many_connections: FAIL: number %u twice or out of range\n", id);
            return 1;
        }
        seen[id] = 1;
    }
    std::printf("every connection carried its own number (%.1f s)\n", seconds_since(exchange));
    for (int fd : clients) close(fd);
    for (int fd : servers) close(fd);
    for (int fd : listeners) close(fd);
    std::printf("PASS: %ld connections in one process, %.1f s in all\n", n, seconds_since(start));
    return 0;
}
