// End-to-end behaviour of TCP sockets as an application sees it. The same program runs twice:
// natively (the expectations are Linux's own) and under libtcps.so against a private tcpsd
// (the shim must give the same answers). Run with TCPS_TEST_ENGINE=<tcpsd> and
// TCPS_TEST_LIB=<libtcps.so> it starts the engine and re-runs itself preloaded.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kTimeoutMs = 5000;  // every wait in these tests is bounded by this

bool expect_offload() {
    return std::getenv("TCPS_EXPECT_OFFLOAD") != nullptr;
}

// An offloaded socket's fd is the shim's O_PATH placeholder of /dev/null.
bool is_offloaded(int fd) {
    char link[64];
    char target[256] = {};
    std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    const ssize_t n = readlink(link, target, sizeof(target) - 1);
    return n > 0 && std::string(target, static_cast<size_t>(n)) == "/dev/null";
}

void check_offloaded(int fd) {
    if (expect_offload()) CHECK(is_offloaded(fd));
}

class Fd {
  public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    ~Fd() { reset(); }
    Fd(Fd &&other) noexcept : fd_(other.release()) {}
    Fd &operator=(Fd &&other) noexcept {
        if (this != &other) {
            reset();
            fd_ = other.release();
        }
        return *this;
    }
    int get() const { return fd_; }
    int release() {
        const int fd = fd_;
        fd_ = -1;
        return fd;
    }
    void reset() {
        if (fd_ >= 0) close(fd_);
        fd_ = -1;
    }

  private:
    int fd_ = -1;
};

sockaddr_in loopback(uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    return addr;
}

uint16_t port_of(int fd) {
    sockaddr_in addr{};
    socklen_t len = sizeof(addr);
    REQUIRE(getsockname(fd, reinterpret_cast<sockaddr *>(&addr), &len) == 0);
    return ntohs(addr.sin_port);
}

Fd make_listener(uint16_t &port, int backlog = 64) {
    Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd.get() >= 0);
    const int one = 1;
    REQUIRE(setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0);
    sockaddr_in addr = loopback(0);
    REQUIRE(bind(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    REQUIRE(listen(fd.get(), backlog) == 0);
    port = port_of(fd.get());
    return fd;
}

Fd connect_to(uint16_t port) {
    Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd.get() >= 0);
    sockaddr_in addr = loopback(port);
    REQUIRE(connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    return fd;
}

struct Pair {
    Fd listener, client, server;
};

Pair make_pair() {
    Pair p;
    uint16_t port;
    p.listener = make_listener(port);
    p.client = connect_to(port);
    p.server = Fd(accept(p.listener.get(), nullptr, nullptr));
    REQUIRE(p.server.get() >= 0);
    return p;
}

// A port nobody listens on (as far as one can tell without racing every other process).
uint16_t closed_port() {
    Fd fd(socket(AF_INET, SOCK_STREAM, 0));
    sockaddr_in addr = loopback(0);
    REQUIRE(bind(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    return port_of(fd.get());
}

short wait_events(int fd, short events, int timeout_ms = kTimeoutMs) {
    pollfd p{fd, events, 0};
    const int n = poll(&p, 1, timeout_ms);
    return n > 0 ? p.revents : 0;
}

void send_all(int fd, const void *data, size_t len) {
    const auto *bytes = static_cast<const char *>(data);
    while (len > 0) {
        const ssize_t n = send(fd, bytes, len, MSG_NOSIGNAL);
        REQUIRE(n > 0);
        bytes += n;
        len -= static_cast<size_t>(n);
    }
}

std::string recv_exactly(int fd, size_t len) {
    std::string out(len, '\0');
    size_t got = 0;
    while (got < len) {
        if (!(wait_events(fd, POLLIN) & (POLLIN | POLLHUP | POLLERR))) break;
        const ssize_t n = recv(fd, out.data() + got, len - got, MSG_DONTWAIT);
        if (n <= 0) break;
        got += static_cast<size_t>(n);
    }
    out.resize(got);
    return out;
}

int error_of(int fd) {
    int error = -1;
    socklen_t len = sizeof(error);
    REQUIRE(getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0);
    return error;
}

std::atomic<int> g_sigpipes{0};
std::atomic<int> g_sigusr1{0};

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("a connection between an offloaded client and server carries bytes both ways") {
    Pair p = make_pair();
    check_offloaded(p.listener.get());
    check_offloaded(p.client.get());
    check_offloaded(p.server.get());
    send_all(p.client.get(), "ping", 4);
    CHECK(recv_exactly(p.server.get(), 4) == "ping");
    send_all(p.server.get(), "pong!", 5);
    CHECK(recv_exactly(p.client.get(), 5) == "pong!");

    sockaddr_in local{}, peer{};
    socklen_t len = sizeof(local);
    REQUIRE(getsockname(p.client.get(), reinterpret_cast<sockaddr *>(&local), &len) == 0);
    len = sizeof(peer);
    REQUIRE(getpeername(p.server.get(), reinterpret_cast<sockaddr *>(&peer), &len) == 0);
    CHECK(len == sizeof(sockaddr_in));
    CHECK(local.sin_port == peer.sin_port);
    CHECK(peer.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
}

TEST_CASE("accept fills the peer address, truncated to the caller's room with the full length") {
    uint16_t port;
    Fd listener = make_listener(port);
    Fd client = connect_to(port);
    char small[4];
    socklen_t len = sizeof(small);
    Fd server(accept4(listener.get(), reinterpret_cast<sockaddr *>(small), &len, SOCK_NONBLOCK));
    REQUIRE(server.get() >= 0);
    CHECK(len == sizeof(sockaddr_in));
    CHECK((fcntl(server.get(), F_GETFL) & O_NONBLOCK) != 0);
    CHECK((fcntl(client.get(), F_GETFL) & O_NONBLOCK) == 0);
}

TEST_CASE("recv returns 0 after the peer's FIN, and poll says POLLIN|POLLRDHUP") {
    Pair p = make_pair();
    send_all(p.client.get(), "bye", 3);
    REQUIRE(shutdown(p.client.get(), SHUT_WR) == 0);
    CHECK(recv_exactly(p.server.get(), 3) == "bye");
    const short events = wait_events(p.server.get(), POLLIN | POLLRDHUP);
    CHECK((events & POLLRDHUP) != 0);
    char byte;
    CHECK(recv(p.server.get(), &byte, 1, 0) == 0);
    CHECK(recv(p.server.get(), &byte, 1, 0) == 0);
    // Our side still sends: the peer only shut its writing half.
    send_all(p.server.get(), "ok", 2);
    CHECK(recv_exactly(p.client.get(), 2) == "ok");
}

TEST_CASE("shutdown(SHUT_WR) then send fails with EPIPE") {
    Pair p = make_pair();
    REQUIRE(shutdown(p.client.get(), SHUT_WR) == 0);
    errno = 0;
    CHECK(send(p.client.get(), "x", 1, MSG_NOSIGNAL) == -1);
    CHECK(errno == EPIPE);
    char byte;
    CHECK(recv(p.server.get(), &byte, 1, 0) == 0);
}

TEST_CASE("a non-blocking recv on an empty socket says EAGAIN, errno untouched on success") {
    Pair p = make_pair();
    char buf[8];
    errno = 0;
    CHECK(recv(p.server.get(), buf, sizeof(buf), MSG_DONTWAIT) == -1);
    CHECK(errno == EAGAIN);
    send_all(p.client.get(), "a", 1);
    REQUIRE((wait_events(p.server.get(), POLLIN) & POLLIN) != 0);
    errno = 12345;
    CHECK(recv(p.server.get(), buf, sizeof(buf), MSG_DONTWAIT) == 1);
    CHECK(errno == 12345);
}

TEST_CASE("SO_RCVTIMEO makes a blocking recv give up with EAGAIN") {
    Pair p = make_pair();
    timeval tv{0, 100'000};
    REQUIRE(setsockopt(p.server.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
    timeval back{};
    socklen_t len = sizeof(back);
    REQUIRE(getsockopt(p.server.get(), SOL_SOCKET, SO_RCVTIMEO, &back, &len) == 0);
    CHECK(back.tv_sec == 0);
    CHECK(back.tv_usec == 100'000);
    char byte;
    const auto start = Clock::now();
    errno = 0;
    CHECK(recv(p.server.get(), &byte, 1, 0) == -1);
    CHECK(errno == EAGAIN);
    const auto elapsed = Clock::now() - start;
    CHECK(elapsed >= std::chrono::milliseconds(90));
    CHECK(elapsed < std::chrono::milliseconds(kTimeoutMs));
    tv = {0, 1'000'000};
    errno = 0;
    CHECK(setsockopt(p.server.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == -1);
    CHECK(errno == EDOM);
}

TEST_CASE("MSG_PEEK leaves the bytes; MSG_WAITALL waits for the whole buffer") {
    Pair p = make_pair();
    send_all(p.client.get(), "abc", 3);
    REQUIRE((wait_events(p.server.get(), POLLIN) & POLLIN) != 0);
    char buf[16] = {};
    CHECK(recv(p.server.get(), buf, sizeof(buf), MSG_PEEK) == 3);
    CHECK(std::string(buf, 3) == "abc");
    int available = -1;
    REQUIRE(ioctl(p.server.get(), FIONREAD, &available) == 0);
    CHECK(available == 3);
    std::thread writer([&] {
        // After the reader is (most likely) waiting: the bytes arrive in a second piece.
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        send(p.client.get(), "def", 3, MSG_NOSIGNAL);
    });
    std::memset(buf, 0, sizeof(buf));
    const ssize_t n = recv(p.server.get(), buf, 6, MSG_WAITALL);
    writer.join();
    CHECK(n == 6);
    CHECK(std::string(buf, 6) == "abcdef");
}

TEST_CASE("8 MiB cross the connection intact while both sides block") {
    Pair p = make_pair();
    constexpr size_t kBytes = 8u << 20;
    std::thread writer([&] {
        std::vector<unsigned char> chunk(100'003);
        size_t sent = 0;
        while (sent < kBytes) {
            const size_t n = std::min(chunk.size(), kBytes - sent);
            for (size_t i = 0; i < n; ++i) chunk[i] = static_cast<unsigned char>((sent + i) * 7);
            const ssize_t rc = send(p.client.get(), chunk.data(), n, MSG_NOSIGNAL);
            if (rc <= 0) break;
            sent += static_cast<size_t>(rc);
        }
        shutdown(p.client.get(), SHUT_WR);
    });
    const timeval limit{kTimeoutMs / 1000, 0};  // a stall ends the test, not the run
    REQUIRE(setsockopt(p.server.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit)) == 0);
    std::vector<unsigned char> buf(65'536);
    size_t got = 0;
    bool intact = true;
    for (;;) {
        const ssize_t n = read(p.server.get(), buf.data(), buf.size());
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; ++i)
            intact &= buf[static_cast<size_t>(i)] == static_cast<unsigned char>((got + i) * 7);
        got += static_cast<size_t>(n);
    }
    writer.join();
    CHECK(got == kBytes);
    CHECK(intact);
}

TEST_CASE("a non-blocking connect completes through poll(POLLOUT) with SO_ERROR 0") {
    uint16_t port;
    Fd listener = make_listener(port);
    Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
    check_offloaded(fd.get());
    sockaddr_in addr = loopback(port);
    const int rc = connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr));
    CHECK((rc == 0 || errno == EINPROGRESS));
    CHECK((wait_events(fd.get(), POLLOUT) & POLLOUT) != 0);
    CHECK(error_of(fd.get()) == 0);
    errno = 0;
    const int again = connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr));
    CHECK((again == 0 || errno == EISCONN));
    errno = 0;
    CHECK(connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == -1);
    CHECK(errno == EISCONN);
}

TEST_CASE("connect to a closed port: ECONNREFUSED, blocking or through SO_ERROR") {
    const uint16_t port = closed_port();
    sockaddr_in addr = loopback(port);
    Fd blocking(socket(AF_INET, SOCK_STREAM, 0));
    errno = 0;
    CHECK(connect(blocking.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == -1);
    CHECK(errno == ECONNREFUSED);

    Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
    const int rc = connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr));
    REQUIRE(rc == -1);
    if (errno == EINPROGRESS) {
        const short events = wait_events(fd.get(), POLLOUT);
        CHECK((events & POLLERR) != 0);
        CHECK((events & POLLHUP) != 0);
        CHECK(error_of(fd.get()) == ECONNREFUSED);
        CHECK(error_of(fd.get()) == 0);  // reported once
    } else {
        CHECK(errno == ECONNREFUSED);
    }
}

TEST_CASE("a never-connected socket: send says EPIPE (and SIGPIPE), recv says ENOTCONN") {
    struct sigaction action {
    }, old{};
    action.sa_handler = [](int) { ++g_sigpipes; };
    sigemptyset(&action.sa_mask);
    REQUIRE(sigaction(SIGPIPE, &action, &old) == 0);
    Fd fd(socket(AF_INET, SOCK_STREAM, 0));
    check_offloaded(fd.get());
    const int before = g_sigpipes.load();
    errno = 0;
    CHECK(send(fd.get(), "x", 1, 0) == -1);
    CHECK(errno == EPIPE);
    CHECK(g_sigpipes.load() == before + 1);
    errno = 0;
    CHECK(send(fd.get(), "x", 1, MSG_NOSIGNAL) == -1);
    CHECK(errno == EPIPE);
    CHECK(g_sigpipes.load() == before + 1);
    char byte;
    errno = 0;
    CHECK(recv(fd.get(), &byte, 1, 0) == -1);
    CHECK(errno == ENOTCONN);
    sockaddr_in peer{};
    socklen_t len = sizeof(peer);
    errno = 0;
    CHECK(getpeername(fd.get(), reinterpret_cast<sockaddr *>(&peer), &len) == -1);
    CHECK(errno == ENOTCONN);
    const short events = wait_events(fd.get(), POLLIN | POLLOUT, 0);
    CHECK(events == (POLLOUT | POLLHUP));
    sigaction(SIGPIPE, &old, nullptr);
}

TEST_CASE("fcntl(O_NONBLOCK) and ioctl(FIONBIO) switch blocking; F_GETFL says O_RDWR") {
    Pair p = make_pair();
    const int fd = p.server.get();
    CHECK(fcntl(fd, F_GETFL) == O_RDWR);
    REQUIRE(fcntl(fd, F_SETFL, O_NONBLOCK) == 0);
    CHECK(fcntl(fd, F_GETFL) == (O_RDWR | O_NONBLOCK));
    char byte;
    errno = 0;
    CHECK(read(fd, &byte, 1) == -1);
    CHECK(errno == EAGAIN);
    int off = 0;
    REQUIRE(ioctl(fd, FIONBIO, &off) == 0);
    CHECK(fcntl(fd, F_GETFL) == O_RDWR);
    CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) == 0);
    REQUIRE(fcntl(fd, F_SETFD, FD_CLOEXEC) == 0);
    CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
}

TEST_CASE("options reach the socket: TCP_NODELAY, SO_KEEPALIVE, SO_TYPE, SO_ERROR") {
    Pair p = make_pair();
    const int one = 1;
    REQUIRE(setsockopt(p.client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0);
    REQUIRE(setsockopt(p.client.get(), SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) == 0);
    int value = 0;
    socklen_t len = sizeof(value);
    REQUIRE(getsockopt(p.client.get(), IPPROTO_TCP, TCP_NODELAY, &value, &len) == 0);
    CHECK(value != 0);
    CHECK(len == sizeof(int));
    len = sizeof(value);
    REQUIRE(getsockopt(p.client.get(), SOL_SOCKET, SO_TYPE, &value, &len) == 0);
    CHECK(value == SOCK_STREAM);
    CHECK(error_of(p.client.get()) == 0);
    tcp_info info{};
    len = sizeof(info);
    REQUIRE(getsockopt(p.client.get(), IPPROTO_TCP, TCP_INFO, &info, &len) == 0);
    CHECK(info.tcpi_state == 1);  // TCP_ESTABLISHED
}

TEST_CASE("poll on an offloaded socket and a pipe wakes for whichever is ready") {
    Pair p = make_pair();
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    Fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
    std::thread writer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        ssize_t ignored = write(pipe_write.get(), "p", 1);
        (void)ignored;
    });
    pollfd fds[2] = {{p.server.get(), POLLIN, 0}, {pipe_read.get(), POLLIN, 0}};
    CHECK(poll(fds, 2, kTimeoutMs) == 1);
    CHECK(fds[0].revents == 0);
    CHECK(fds[1].revents == POLLIN);
    writer.join();
    char byte;
    REQUIRE(read(pipe_read.get(), &byte, 1) == 1);

    std::thread sender([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        send(p.client.get(), "s", 1, MSG_NOSIGNAL);
    });
    fds[0].revents = fds[1].revents = 0;
    CHECK(poll(fds, 2, kTimeoutMs) == 1);
    CHECK(fds[0].revents == POLLIN);
    CHECK(fds[1].revents == 0);
    sender.join();
    CHECK(poll(fds, 2, 50) == 1);  // level-triggered: still readable
}

TEST_CASE("select reports an offloaded socket readable and writable, and times out") {
    Pair p = make_pair();
    fd_set readable, writable;
    FD_ZERO(&readable);
    FD_ZERO(&writable);
    FD_SET(p.server.get(), &readable);
    timeval tv{0, 20'000};
    CHECK(select(p.server.get() + 1, &readable, nullptr, nullptr, &tv) == 0);
    CHECK(!FD_ISSET(p.server.get(), &readable));

    send_all(p.client.get(), "x", 1);
    REQUIRE((wait_events(p.server.get(), POLLIN) & POLLIN) != 0);  // arrived (not instant here)
    FD_SET(p.server.get(), &readable);
    FD_SET(p.server.get(), &writable);
    tv = {5, 0};
    CHECK(select(p.server.get() + 1, &readable, &writable, nullptr, &tv) == 2);
    CHECK(FD_ISSET(p.server.get(), &readable));
    CHECK(FD_ISSET(p.server.get(), &writable));
}

TEST_CASE("epoll level-triggered reports until drained") {
    Pair p = make_pair();
    Fd ep(epoll_create1(EPOLL_CLOEXEC));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 42;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == 0);
    errno = 0;
    CHECK(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == -1);
    CHECK(errno == EEXIST);
    epoll_event out[4];
    CHECK(epoll_wait(ep.get(), out, 4, 0) == 0);
    send_all(p.client.get(), "abc", 3);
    REQUIRE(epoll_wait(ep.get(), out, 4, kTimeoutMs) == 1);
    CHECK(out[0].events == EPOLLIN);
    CHECK(out[0].data.u64 == 42);
    CHECK(epoll_wait(ep.get(), out, 4, 0) == 1);
    char buf[8];
    REQUIRE(recv(p.server.get(), buf, sizeof(buf), 0) == 3);
    CHECK(epoll_wait(ep.get(), out, 4, 0) == 0);
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_DEL, p.server.get(), nullptr) == 0);
    errno = 0;
    CHECK(epoll_ctl(ep.get(), EPOLL_CTL_DEL, p.server.get(), nullptr) == -1);
    CHECK(errno == ENOENT);
    errno = 0;
    CHECK(epoll_ctl(ep.get(), EPOLL_CTL_MOD, p.server.get(), &ev) == -1);
    CHECK(errno == ENOENT);
}

TEST_CASE("epoll edge-triggered reports each arrival once") {
    Pair p = make_pair();
    Fd ep(epoll_create1(0));
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLET;
    ev.data.fd = p.server.get();
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == 0);
    epoll_event out[4];
    send_all(p.client.get(), "a", 1);
    REQUIRE(epoll_wait(ep.get(), out, 4, kTimeoutMs) == 1);
    CHECK(out[0].events == EPOLLIN);
    CHECK(epoll_wait(ep.get(), out, 4, 0) == 0);  // no new edge, although still readable
    send_all(p.client.get(), "b", 1);
    CHECK(epoll_wait(ep.get(), out, 4, kTimeoutMs) == 1);
}

TEST_CASE("epoll one-shot reports once until EPOLL_CTL_MOD re-arms it") {
    Pair p = make_pair();
    Fd ep(epoll_create1(0));
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLONESHOT;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == 0);
    epoll_event out[4];
    send_all(p.client.get(), "a", 1);
    REQUIRE(epoll_wait(ep.get(), out, 4, kTimeoutMs) == 1);
    CHECK(epoll_wait(ep.get(), out, 4, 0) == 0);
    send_all(p.client.get(), "b", 1);
    CHECK(epoll_wait(ep.get(), out, 4, 20) == 0);
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_MOD, p.server.get(), &ev) == 0);
    CHECK(epoll_wait(ep.get(), out, 4, kTimeoutMs) == 1);
}

TEST_CASE("epoll reports offloaded and kernel members together") {
    Pair p = make_pair();
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    Fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
    Fd ep(epoll_create1(0));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = 1;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == 0);
    ev.data.u32 = 2;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, pipe_read.get(), &ev) == 0);
    std::thread writer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        ssize_t ignored = write(pipe_write.get(), "p", 1);
        (void)ignored;
    });
    epoll_event out[4];
    REQUIRE(epoll_wait(ep.get(), out, 4, kTimeoutMs) == 1);
    CHECK(out[0].data.u32 == 2);
    writer.join();
    send_all(p.client.get(), "s", 1);
    const auto deadline = Clock::now() + std::chrono::milliseconds(kTimeoutMs);
    int n = 0;
    while (n < 2 && Clock::now() < deadline) n = epoll_wait(ep.get(), out, 4, 100);
    CHECK(n == 2);
    CHECK(epoll_wait(ep.get(), out, 1, 0) == 1);  // maxevents is respected
}

TEST_CASE("an epoll_wait sleeper wakes when another thread adds a ready socket") {
    Pair idle = make_pair();
    Pair busy = make_pair();
    Fd ep(epoll_create1(0));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = 1;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, idle.server.get(), &ev) == 0);
    send_all(busy.client.get(), "x", 1);
    REQUIRE((wait_events(busy.server.get(), POLLIN) & POLLIN) != 0);
    std::atomic<int> result{-2};
    epoll_event out[4];
    std::thread sleeper([&] { result = epoll_wait(ep.get(), out, 4, kTimeoutMs); });
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ev.data.u32 = 7;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, busy.server.get(), &ev) == 0);
    const auto start = Clock::now();
    sleeper.join();
    CHECK(result.load() == 1);
    CHECK(out[0].data.u32 == 7);
    CHECK(Clock::now() - start < std::chrono::milliseconds(kTimeoutMs / 2));
}

TEST_CASE("an epoll_wait sleeper with only kernel members wakes for an added ready socket") {
    Pair busy = make_pair();
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    Fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
    Fd ep(epoll_create1(0));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = 1;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, pipe_read.get(), &ev) == 0);
    send_all(busy.client.get(), "x", 1);
    REQUIRE((wait_events(busy.server.get(), POLLIN) & POLLIN) != 0);
    std::atomic<int> result{-2};
    epoll_event out[4] = {};
    std::thread sleeper([&] { result = epoll_wait(ep.get(), out, 4, kTimeoutMs); });
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ev.data.u32 = 9;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, busy.server.get(), &ev) == 0);
    const auto start = Clock::now();
    sleeper.join();
    CHECK(result.load() == 1);
    CHECK(out[0].data.u32 == 9);
    CHECK(out[0].events == EPOLLIN);
    CHECK(Clock::now() - start < std::chrono::milliseconds(kTimeoutMs / 2));
    // Nothing of the shim's own shows up afterwards either.
    CHECK(epoll_wait(ep.get(), out, 4, 0) == 1);
    CHECK(out[0].data.u32 == 9);
}

TEST_CASE("a closed fd leaves the epoll set; its number can be added again") {
    Fd ep(epoll_create1(0));
    Pair p = make_pair();
    epoll_event ev{};
    ev.events = EPOLLIN;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == 0);
    const int number = p.server.get();
    p.server.reset();
    Fd again(socket(AF_INET, SOCK_STREAM, 0));
    CHECK(again.get() == number);  // the lowest free number, as always
    CHECK(epoll_ctl(ep.get(), EPOLL_CTL_ADD, again.get(), &ev) == 0);
    epoll_event out[2];
    const int n = epoll_wait(ep.get(), out, 2, 0);
    CHECK(n == 1);  // the fresh socket: EPOLLOUT|EPOLLHUP is not asked, EPOLLHUP always is
    if (n == 1) CHECK(out[0].events == EPOLLHUP);
}

TEST_CASE("a blocking recv: EINTR without SA_RESTART, restarted with it") {
    Pair p = make_pair();
    struct sigaction action {
    }, old{};
    action.sa_handler = [](int) { ++g_sigusr1; };
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;
    REQUIRE(sigaction(SIGUSR1, &action, &old) == 0);

    std::atomic<bool> done{false};
    std::atomic<ssize_t> result{0};
    std::atomic<int> error{0};
    std::thread reader([&] {
        char byte;
        result = recv(p.server.get(), &byte, 1, 0);
        error = errno;
        done = true;
    });
    const pthread_t thread = reader.native_handle();
    const auto deadline = Clock::now() + std::chrono::milliseconds(kTimeoutMs);
    while (!done && Clock::now() < deadline) {
        pthread_kill(thread, SIGUSR1);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    reader.join();
    CHECK(result.load() == -1);
    CHECK(error.load() == EINTR);

    action.sa_flags = SA_RESTART;
    REQUIRE(sigaction(SIGUSR1, &action, nullptr) == 0);
    done = false;
    std::thread restarted([&] {
        char byte;
        result = recv(p.server.get(), &byte, 1, 0);
        done = true;
    });
    const int before = g_sigusr1.load();
    for (int i = 0; i < 10 && g_sigusr1.load() < before + 3; ++i) {
        pthread_kill(restarted.native_handle(), SIGUSR1);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    CHECK_FALSE(done.load());
    send_all(p.client.get(), "z", 1);
    restarted.join();
    CHECK(result.load() == 1);
    sigaction(SIGUSR1, &old, nullptr);
}

namespace {

// The child of the case below (--socket-in-handler REPORT_FD): its first TCP socket() sets up
// a session with the engine that TCPS_ENGINE_SOCKET names, and SIGUSR1's handler opens another
// socket. It reports on REPORT_FD: 'h' when the handler's socket() returned a descriptor ('H'
// when it failed), then 'm' for the first socket() ('M').
int g_report_fd = -1;

int socket_in_handler_child(int report_fd) {
    g_report_fd = report_fd;
    struct sigaction action {};
    action.sa_handler = [](int) {
        const int saved = errno;
        const int fd = socket(AF_INET, SOCK_STREAM, 0);
        const char word = fd >= 0 ? 'h' : 'H';
        if (write(g_report_fd, &word, 1) != 1) _exit(3);
        if (fd >= 0) close(fd);
        errno = saved;
    };
    sigemptyset(&action.sa_mask);
    sigaction(SIGUSR1, &action, nullptr);
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    const char word = fd >= 0 ? 'm' : 'M';
    return write(report_fd, &word, 1) == 1 ? 0 : 3;
}

// One byte from `fd` within the bound, or 0.
char read_word(int fd) {
    char word = 0;
    if (!(wait_events(fd, POLLIN) & POLLIN) || read(fd, &word, 1) != 1) return 0;
    return word;
}

}  // namespace

TEST_CASE("socket() in a handler that interrupts the first socket()'s engine setup returns") {
    // Natively there is no setup to interrupt.
    if (!expect_offload()) return;
    // A stand-in engine: it takes the child's hello and signals the child while the child waits
    // for the reply inside its first socket(), holding the setup lock; then it hangs up, so
    // that the first socket() too ends up in the kernel.
    char dir[] = "/tmp/tcps-e2e-setup-XXXXXX";
    REQUIRE(mkdtemp(dir) != nullptr);
    const std::string path = std::string(dir) + "/engine.sock";
    Fd engine(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
    REQUIRE(bind(engine.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    REQUIRE(listen(engine.get(), 1) == 0);

    int report[2];
    REQUIRE(pipe2(report, O_CLOEXEC) == 0);
    Fd report_read(report[0]);
    const int child_end = fcntl(report[1], F_DUPFD, 10);  // inherited: no FD_CLOEXEC
    close(report[1]);
    REQUIRE(child_end >= 0);
    const std::string report_arg = std::to_string(child_end);
    const std::string engine_var = "TCPS_ENGINE_SOCKET=" + path;
    std::vector<char *> env;
    for (char **var = environ; *var; ++var)
        if (std::strncmp(*var, "TCPS_ENGINE_SOCKET=", 19) != 0) env.push_back(*var);
    env.push_back(const_cast<char *>(engine_var.c_str()));
    env.push_back(nullptr);
    char *argv[] = {const_cast<char *>("/proc/self/exe"), const_cast<char *>("--socket-in-handler"),
                    const_cast<char *>(report_arg.c_str()), nullptr};
    pid_t pid = -1;
    REQUIRE(posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, env.data()) == 0);
    close(child_end);

    REQUIRE((wait_events(engine.get(), POLLIN) & POLLIN) != 0);
    Fd control(accept4(engine.get(), nullptr, nullptr, SOCK_CLOEXEC));
    REQUIRE(control.get() >= 0);
    char hello[512];
    REQUIRE((wait_events(control.get(), POLLIN) & POLLIN) != 0);
    CHECK(recv(control.get(), hello, sizeof(hello), 0) > 0);
    kill(pid, SIGUSR1);
    // The handler's socket() returns while the setup it interrupted still waits for us.
    const char handler = read_word(report_read.get());
    CHECK(handler == 'h');
    control.reset();
    const char first = handler ? read_word(report_read.get()) : 0;
    CHECK(first == 'm');

    int status = -1;
    const auto deadline = Clock::now() + std::chrono::milliseconds(kTimeoutMs);
    while (waitpid(pid, &status, WNOHANG) == 0) {
        if (Clock::now() >= deadline) {  // stuck: in the deadlock this case is about
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    unlink(path.c_str());
    rmdir(dir);
}

TEST_CASE("a dup'ed fd shares the socket; the connection ends with the last close") {
    Pair p = make_pair();
    Fd copy(dup(p.server.get()));
    REQUIRE(copy.get() >= 0);
    check_offloaded(copy.get());
    REQUIRE(fcntl(copy.get(), F_SETFL, O_NONBLOCK) == 0);
    CHECK((fcntl(p.server.get(), F_GETFL) & O_NONBLOCK) != 0);  // one open file description
    p.server.reset();
    send_all(p.client.get(), "still", 5);
    CHECK(recv_exactly(copy.get(), 5) == "still");
    copy.reset();
    char byte;
    REQUIRE((wait_events(p.client.get(), POLLIN) & POLLIN) != 0);
    CHECK(recv(p.client.get(), &byte, 1, 0) == 0);
}

TEST_CASE("dup2 over an offloaded fd closes that socket") {
    Pair p = make_pair();
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    Fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
    REQUIRE(dup2(pipe_read.get(), p.server.get()) == p.server.get());
    CHECK_FALSE(is_offloaded(p.server.get()));
    char byte;
    REQUIRE((wait_events(p.client.get(), POLLIN) & POLLIN) != 0);
    CHECK(recv(p.client.get(), &byte, 1, 0) == 0);
    ssize_t ignored = write(pipe_write.get(), "q", 1);
    (void)ignored;
    CHECK(read(p.server.get(), &byte, 1) == 1);  // now the pipe
    CHECK(byte == 'q');

    Pair q = make_pair();
    const int target = 900;
    REQUIRE(dup2(q.server.get(), target) == target);
    Fd moved(target);
    check_offloaded(target);
    send_all(q.client.get(), "m", 1);
    CHECK(recv_exactly(moved.get(), 1) == "m");
}

TEST_CASE("two threads accepting on one listener each get distinct connections") {
    uint16_t port;
    Fd listener = make_listener(port);
    // Non-blocking: both threads may see it readable for one connection (as in the kernel).
    REQUIRE(fcntl(listener.get(), F_SETFL, O_NONBLOCK) == 0);
    const auto deadline = Clock::now() + std::chrono::milliseconds(kTimeoutMs);
    constexpr int kConnections = 16;
    std::atomic<int> accepted{0};
    std::vector<int> fds[2];
    std::thread threads[2];
    for (int t = 0; t < 2; ++t)
        threads[t] = std::thread([&, t] {
            while (accepted.load() < kConnections && Clock::now() < deadline) {
                pollfd pfd{listener.get(), POLLIN, 0};
                if (poll(&pfd, 1, 50) <= 0) continue;
                const int fd = accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK);
                if (fd < 0) continue;
                fds[t].push_back(fd);
                ++accepted;
            }
        });
    std::vector<Fd> clients;
    for (int i = 0; i < kConnections; ++i) clients.push_back(connect_to(port));
    for (auto &thread : threads) thread.join();
    CHECK(accepted.load() == kConnections);
    std::vector<int> all(fds[0]);
    all.insert(all.end(), fds[1].begin(), fds[1].end());
    std::sort(all.begin(), all.end());
    CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
    for (int fd : all) close(fd);
}

TEST_CASE("after fork the child uses inherited offloaded fds and makes its own") {
    uint16_t port;
    Fd listener = make_listener(port);
    Pair p = make_pair();
    const timeval limit{kTimeoutMs / 1000, 0};  // accept() gives up if the child never comes
    REQUIRE(setsockopt(listener.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit)) == 0);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int status = 0;
        char byte;
        // The inherited connection is the parent's socket: nothing to read yet, and what the
        // child sends reaches the peer.
        if (!(recv(p.server.get(), &byte, 1, MSG_DONTWAIT) == -1 && errno == EAGAIN)) status |= 1;
        if (expect_offload() && !is_offloaded(p.server.get())) status |= 16;
        if (send(p.server.get(), "inherited", 9, MSG_NOSIGNAL) != 9) status |= 32;
        const int fd = socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in addr = loopback(port);
        if (fd < 0 || connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0)
            status |= 2;
        if (expect_offload() && !is_offloaded(fd)) status |= 4;
        if (send(fd, "child", 5, MSG_NOSIGNAL) != 5) status |= 8;
        close(fd);
        _exit(status);
    }
    Fd from_child(accept(listener.get(), nullptr, nullptr));
    REQUIRE(from_child.get() >= 0);
    CHECK(recv_exactly(from_child.get(), 5) == "child");
    CHECK(recv_exactly(p.client.get(), 9) == "inherited");
    int status = -1;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    // The parent's connection is untouched by the child.
    send_all(p.client.get(), "parent", 6);
    CHECK(recv_exactly(p.server.get(), 6) == "parent");
}

TEST_CASE(
    "a forked child that dropped root cannot bind a privileged port; parent and child "
    "close the shared socket only together") {
    if (geteuid() != 0) return;  // the privilege rule needs root to start from
    Pair p = make_pair();
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int status = 0;
        if (setuid(65534) != 0) _exit(100);
        const int fd = socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in addr = loopback(1001);
        if (!(bind(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == -1 && errno == EACCES))
            status |= 1;
        // The inherited connection: the parent has closed its copy by now (it waits for our
        // byte after closing), yet ours still works.
        char byte;
        if (recv(p.server.get(), &byte, 1, 0) != 1 || byte != 'p') status |= 2;
        if (send(p.server.get(), "c", 1, MSG_NOSIGNAL) != 1) status |= 4;
        _exit(status);
    }
    p.server.reset();  // the child still holds the connection: no FIN yet
    send_all(p.client.get(), "p", 1);
    CHECK(recv_exactly(p.client.get(), 1) == "c");
    int status = -1;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    // The child's exit closed the last copy: EOF now.
    char byte;
    CHECK(recv(p.client.get(), &byte, 1, 0) == 0);
}

TEST_CASE("vfork, posix_spawn and daemon-style double fork leave the parent's sockets intact") {
    Pair p = make_pair();
    // vfork: the child shares our memory and must not disturb the shim's state, even when it
    // rearranges and closes descriptors before exec, as Python's subprocess does.
    const pid_t vforked = vfork();
    if (vforked == 0) {
        dup2(p.server.get(), 100);
        close(p.server.get());
        close(p.client.get());
        syscall(SYS_close_range, 3u, ~0u, 0);
        _exit(7);
    }
    REQUIRE(vforked > 0);
    int status = -1;
    REQUIRE(waitpid(vforked, &status, 0) == vforked);
    CHECK(WEXITSTATUS(status) == 7);
    // posix_spawn: glibc's clone(CLONE_VM|CLONE_VFORK) and exec, no fork handlers.
    pid_t spawned = -1;
    char arg0[] = "true";
    char *argv[] = {arg0, nullptr};
    REQUIRE(posix_spawnp(&spawned, "true", nullptr, nullptr, argv, environ) == 0);
    REQUIRE(waitpid(spawned, &status, 0) == spawned);
    CHECK(WEXITSTATUS(status) == 0);
    // daemon(): a child that forks again and exits at once; the grandchild uses the socket.
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        if (fork() == 0) {
            const bool ok = send(p.server.get(), "g", 1, MSG_NOSIGNAL) == 1;
            _exit(ok ? 0 : 1);
        }
        _exit(0);
    }
    REQUIRE(waitpid(child, &status, 0) == child);
    CHECK(recv_exactly(p.client.get(), 1) == "g");
    // The parent's own connection still works both ways.
    send_all(p.client.get(), "to-parent", 9);
    CHECK(recv_exactly(p.server.get(), 9) == "to-parent");
    send_all(p.server.get(), "from-parent", 11);
    CHECK(recv_exactly(p.client.get(), 11) == "from-parent");
}

TEST_CASE("closing a listener frees its port before close() returns") {
    for (int round = 0; round < 20; ++round) {
        uint16_t port;
        Fd listener = make_listener(port);
        listener.reset();
        // Connecting is refused at once and the port can be bound again, as on Linux.
        Fd probe(socket(AF_INET, SOCK_STREAM, 0));
        sockaddr_in addr = loopback(port);
        CHECK(connect(probe.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == -1);
        CHECK(errno == ECONNREFUSED);
        Fd again(socket(AF_INET, SOCK_STREAM, 0));
        const int one = 1;
        setsockopt(again.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        CHECK(bind(again.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    }
}

// Sends one byte and `fd` over the AF_UNIX socket `over` (SCM_RIGHTS).
bool send_fd(int over, int fd) {
    char byte = 'F';
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    return sendmsg(over, &msg, MSG_NOSIGNAL) == 1;
}

TEST_CASE("a socket passed with SCM_RIGHTS becomes a kernel socket that stays in its epoll set") {
    Pair p = make_pair();
    Fd ep(epoll_create1(EPOLL_CLOEXEC));
    REQUIRE(ep.get() >= 0);
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.u64 = 42;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &event) == 0);
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    Fd sender(pair[0]), receiver(pair[1]);
    REQUIRE(send_fd(sender.get(), p.server.get()));
    // Ours is the kernel socket now, as the receiver's is.
    CHECK_FALSE(is_offloaded(p.server.get()));
    send_all(p.client.get(), "after", 5);
    epoll_event ready{};
    REQUIRE(epoll_wait(ep.get(), &ready, 1, kTimeoutMs) == 1);
    CHECK(ready.data.u64 == 42);
    CHECK((ready.events & EPOLLIN) != 0);
    CHECK(recv_exactly(p.server.get(), 5) == "after");
    char byte;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char in_control[CMSG_SPACE(sizeof(int))] = {};
    msghdr in{};
    in.msg_iov = &iov;
    in.msg_iovlen = 1;
    in.msg_control = in_control;
    in.msg_controllen = sizeof(in_control);
    REQUIRE(recvmsg(receiver.get(), &in, MSG_CMSG_CLOEXEC) == 1);
    int received = -1;
    std::memcpy(&received, CMSG_DATA(CMSG_FIRSTHDR(&in)), sizeof(int));
    Fd copy(received);
    send_all(copy.get(), "via-copy", 8);
    CHECK(recv_exactly(p.client.get(), 8) == "via-copy");
}

TEST_CASE(
    "bytes, TCP_CORK and shutdown posted just before SCM_RIGHTS all reach the kernel socket") {
    // The shim answers TCP_CORK and a connected socket's shutdown() itself and the engine
    // applies them later: the hand-back to the kernel must apply them first.
    Pair p = make_pair();
    const int on = 1;
    REQUIRE(setsockopt(p.server.get(), IPPROTO_TCP, TCP_CORK, &on, sizeof(on)) == 0);
    std::string payload(100000, 'x');
    for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>('a' + i % 26);
    send_all(p.server.get(), payload.data(), payload.size());
    REQUIRE(shutdown(p.server.get(), SHUT_WR) == 0);
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    Fd sender(pair[0]), receiver(pair[1]);
    REQUIRE(send_fd(sender.get(), p.server.get()));
    CHECK_FALSE(is_offloaded(p.server.get()));
    // The kernel socket holds what was posted: the cork and the shutdown.
    int cork = -1;
    socklen_t len = sizeof(cork);
    REQUIRE(getsockopt(p.server.get(), IPPROTO_TCP, TCP_CORK, &cork, &len) == 0);
    CHECK(cork == 1);
    CHECK(send(p.server.get(), "z", 1, MSG_NOSIGNAL) == -1);
    CHECK(errno == EPIPE);
    // Every byte, then EOF.
    CHECK(recv_exactly(p.client.get(), payload.size()) == payload);
    char end;
    CHECK(recv(p.client.get(), &end, 1, 0) == 0);
}

// Receives one byte and a descriptor sent by send_fd(); the descriptor, or -1.
int recv_fd(int over) {
    char byte;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    if (recvmsg(over, &msg, MSG_CMSG_CLOEXEC) != 1) return -1;
    const cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (!cmsg || cmsg->cmsg_type != SCM_RIGHTS) return -1;
    int fd = -1;
    std::memcpy(&fd, CMSG_DATA(cmsg), sizeof(fd));
    return fd;
}

TEST_CASE("a connection passed with SCM_RIGHTS before its first read keeps every byte that came") {
    // Node's cluster (round-robin): the primary accepts and passes each connection on to a
    // worker without reading. The request has arrived by then, in two parts here, each seen
    // as its own edge by an edge-triggered epoll, as Linux reports them.
    Pair p = make_pair();
    Fd ep(epoll_create1(EPOLL_CLOEXEC));
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLET;
    REQUIRE(epoll_ctl(ep.get(), EPOLL_CTL_ADD, p.server.get(), &ev) == 0);
    epoll_event out[2];
    send_all(p.client.get(), "GET / HTTP/1.1\r\n", 16);
    REQUIRE(epoll_wait(ep.get(), out, 2, kTimeoutMs) == 1);
    send_all(p.client.get(), "Host: x\r\n\r\n", 11);
    REQUIRE(epoll_wait(ep.get(), out, 2, kTimeoutMs) == 1);
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    Fd sender(pair[0]), receiver(pair[1]);
    REQUIRE(send_fd(sender.get(), p.server.get()));
    p.server.reset();  // the primary's copy goes; the worker's is the connection now
    Fd worker(recv_fd(receiver.get()));
    REQUIRE(worker.get() >= 0);
    CHECK(recv_exactly(worker.get(), 27) == "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    send_all(worker.get(), "HTTP/1.1 200 OK\r\n", 17);
    CHECK(recv_exactly(p.client.get(), 17) == "HTTP/1.1 200 OK\r\n");
}

// Passes `socket` to this very process with SCM_RIGHTS and closes it: the descriptor received.
Fd pass_to_self(Fd &socket) {
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    Fd sender(pair[0]), receiver(pair[1]);
    REQUIRE(send_fd(sender.get(), socket.get()));
    socket.reset();
    Fd received(recv_fd(receiver.get()));
    REQUIRE(received.get() >= 0);
    return received;
}

TEST_CASE("a received socket is offloaded again at its first use, unread bytes first") {
    // The sender read part of what came and passed the socket on: the rest, which its engine
    // had received, comes first to the receiver, then what follows. dup() is the first use
    // here: both numbers must then be the same offloaded socket.
    Pair p = make_pair();
    send_all(p.client.get(), "0123456789", 10);
    CHECK(recv_exactly(p.server.get(), 3) == "012");
    if (expect_offload()) {
        // The other seven in the engine's ring before the socket is passed.
        const auto deadline = Clock::now() + std::chrono::milliseconds(kTimeoutMs);
        int unread = 0;
        while (ioctl(p.server.get(), FIONREAD, &unread) == 0 && unread < 7 &&
               Clock::now() < deadline)
            std::this_thread::yield();
        REQUIRE(unread == 7);
    }
    Fd received = pass_to_self(p.server);
    CHECK_FALSE(is_offloaded(received.get()));  // not before its first use
    Fd copy(dup(received.get()));
    REQUIRE(copy.get() >= 0);
    check_offloaded(received.get());
    check_offloaded(copy.get());
    CHECK(recv_exactly(copy.get(), 7) == "3456789");
    send_all(p.client.get(), "abc", 3);
    CHECK(recv_exactly(received.get(), 3) == "abc");
    send_all(received.get(), "back", 4);
    CHECK(recv_exactly(p.client.get(), 4) == "back");
}

TEST_CASE("closing a received socket unused, with bytes its sender left unread, resets it") {
    // Linux's close() of a socket with unread bytes sends an RST, whichever process had read
    // part of the stream before.
    Pair p = make_pair();
    send_all(p.client.get(), "0123456789", 10);
    CHECK(recv_exactly(p.server.get(), 3) == "012");
    const auto deadline = Clock::now() + std::chrono::milliseconds(kTimeoutMs);
    int unread = 0;
    while (ioctl(p.server.get(), FIONREAD, &unread) == 0 && unread < 7 && Clock::now() < deadline)
        std::this_thread::yield();
    REQUIRE(unread == 7);
    Fd received = pass_to_self(p.server);
    received.reset();
    char byte;
    pollfd pfd{p.client.get(), POLLIN, 0};
    REQUIRE(poll(&pfd, 1, kTimeoutMs) == 1);
    CHECK(recv(p.client.get(), &byte, 1, 0) == -1);
    CHECK(errno == ECONNRESET);
}

TEST_CASE("a received socket stays the kernel's in a child forked before its first use") {
    Pair p = make_pair();
    Fd received = pass_to_self(p.server);
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        // Either process may use it from now on: in the child it stays a kernel socket.
        int type = 0;
        socklen_t len = sizeof(type);
        const bool ok = getsockopt(received.get(), SOL_SOCKET, SO_TYPE, &type, &len) == 0 &&
                        type == SOCK_STREAM && !is_offloaded(received.get());
        _exit(ok ? 0 : 1);
    }
    int status = -1;
    REQUIRE(waitpid(child, &status, 0) == child);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    // The parent noted it before the fork and may offload it.
    send_all(p.client.get(), "hello", 5);
    CHECK(recv_exactly(received.get(), 5) == "hello");
    check_offloaded(received.get());
}

TEST_CASE("SO_RCVLOWAT goes with a socket passed with SCM_RIGHTS") {
    Pair p = make_pair();
    const int lowat = 7;
    REQUIRE(setsockopt(p.server.get(), SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof(lowat)) == 0);
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    Fd sender(pair[0]), receiver(pair[1]);
    REQUIRE(send_fd(sender.get(), p.server.get()));
    Fd copy(recv_fd(receiver.get()));
    REQUIRE(copy.get() >= 0);
    int value = -1;
    socklen_t len = sizeof(value);
    REQUIRE(getsockopt(copy.get(), SOL_SOCKET, SO_RCVLOWAT, &value, &len) == 0);
    CHECK(value == 7);
}

TEST_CASE("a FIN behind a new connection's unread bytes shows before they are read") {
    Pair p = make_pair();
    send_all(p.client.get(), "bye", 3);
    REQUIRE(shutdown(p.client.get(), SHUT_WR) == 0);
    // POLLRDHUP alone: poll returns once the FIN is seen (or after the bound, with 0).
    CHECK((wait_events(p.server.get(), POLLRDHUP) & POLLRDHUP) != 0);
    CHECK((wait_events(p.server.get(), POLLIN, 0) & POLLIN) != 0);
    CHECK(recv_exactly(p.server.get(), 3) == "bye");
    char byte;
    CHECK(recv(p.server.get(), &byte, 1, MSG_DONTWAIT) == 0);
}

TEST_CASE("exec keeps sockets that are not close-on-exec and closes those that are") {
    Pair kept = make_pair();
    Pair dropped = make_pair();
    REQUIRE(fcntl(dropped.server.get(), F_SETFD, FD_CLOEXEC) == 0);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        dup2(kept.server.get(), 0);
        dup2(kept.server.get(), 1);
        execl("/bin/sh", "sh", "-c", "read line; echo got:$line", static_cast<char *>(nullptr));
        _exit(127);
    }
    kept.server.reset();  // the exec'd shell holds the only copies now
    dropped.server.reset();
    // The close-on-exec socket vanished with the exec: its peer sees EOF while the shell lives.
    char byte;
    CHECK(recv(dropped.client.get(), &byte, 1, 0) == 0);
    send_all(kept.client.get(), "hi\n", 3);
    CHECK(recv_exactly(kept.client.get(), 7) == "got:hi\n");
    CHECK(recv(kept.client.get(), &byte, 1, 0) == 0);  // the shell exited: the last copy
    int status = -1;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("exec of a static program hands it kernel sockets it can use") {
    const char *program = std::getenv("TCPS_STATIC_ECHO");
    if (!program) return;  // built by meson next to this program
    Pair p = make_pair();
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        dup2(p.server.get(), 0);
        dup2(p.server.get(), 1);
        execl(program, "static_echo", static_cast<char *>(nullptr));
        _exit(127);
    }
    p.server.reset();
    // Bytes the engine had received before the hand-back could not be returned to the kernel
    // socket (docs/architecture.md), so the peer speaks once the program has.
    CHECK(recv_exactly(p.client.get(), 13) == "static:ready\n");
    send_all(p.client.get(), "line\n", 5);
    CHECK(recv_exactly(p.client.get(), 12) == "static:line\n");
    char byte;
    CHECK(recv(p.client.get(), &byte, 1, 0) == 0);  // it exited: its copies were the last
    int status = -1;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("kernel descriptors pass straight through: pipes, UDP, AF_UNIX") {
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    Fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
    REQUIRE(write(pipe_write.get(), "pipe", 4) == 4);
    char buf[8] = {};
    CHECK(read(pipe_read.get(), buf, sizeof(buf)) == 4);

    Fd udp(socket(AF_INET, SOCK_DGRAM, 0));
    CHECK_FALSE(is_offloaded(udp.get()));
    sockaddr_in addr = loopback(0);
    REQUIRE(bind(udp.get(), reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    addr.sin_port = htons(port_of(udp.get()));
    REQUIRE(sendto(udp.get(), "dgram", 5, 0, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) ==
            5);
    CHECK(recv(udp.get(), buf, sizeof(buf), 0) == 5);

    int unix_fds[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, unix_fds) == 0);
    Fd a(unix_fds[0]), b(unix_fds[1]);
    CHECK(send(a.get(), "unix", 4, 0) == 4);
    CHECK(recv(b.get(), buf, sizeof(buf), 0) == 4);
    errno = 0;
    CHECK(close(-1) == -1);
    CHECK(errno == EBADF);
}

// ---------------------------------------------------------------------------------------------

namespace {

// Starts a private tcpsd, then runs this program again under libtcps.so against it.
int run_offloaded(const char *engine, const char *lib, char **argv) {
    char dir[] = "/tmp/tcps-shim-e2e-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    const std::string sock = std::string(dir) + "/engine.sock";
    int ready[2];
    if (pipe(ready) != 0) return 1;
    const pid_t engine_pid = fork();
    if (engine_pid == 0) {
        close(ready[0]);
        const std::string fd = std::to_string(ready[1]);
        execl(engine, engine, "--socket", sock.c_str(), "--ready-fd", fd.c_str(),
              static_cast<char *>(nullptr));
        _exit(127);
    }
    close(ready[1]);
    pollfd p{ready[0], POLLIN, 0};
    char word[16] = {};
    const bool up = poll(&p, 1, 10'000) == 1 && read(ready[0], word, sizeof(word)) > 0;
    close(ready[0]);
    int status = 1;
    if (!up) {
        std::fprintf(stderr, "tcpsd did not start\n");
    } else {
        const pid_t child = fork();
        if (child == 0) {
            setenv("LD_PRELOAD", lib, 1);
            setenv("TCPS_ENGINE_SOCKET", sock.c_str(), 1);
            setenv("TCPS_EXPECT_OFFLOAD", "1", 1);
            setenv("TCPS_TEST_CHILD", "1", 1);
            execv("/proc/self/exe", argv);
            _exit(127);
        }
        int child_status = 0;
        waitpid(child, &child_status, 0);
        status = WIFEXITED(child_status) ? WEXITSTATUS(child_status) : 128 + WTERMSIG(child_status);
    }
    kill(engine_pid, SIGTERM);
    waitpid(engine_pid, nullptr, 0);
    unlink(sock.c_str());
    rmdir(dir);
    return status;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc == 3 && std::strcmp(argv[1], "--socket-in-handler") == 0)
        return socket_in_handler_child(std::atoi(argv[2]));
    const char *engine = std::getenv("TCPS_TEST_ENGINE");
    const char *lib = std::getenv("TCPS_TEST_LIB");
    if (engine && lib && !std::getenv("TCPS_TEST_CHILD")) return run_offloaded(engine, lib, argv);
    (void)argc;
    return Catch::Session().run(argc, argv);
}
