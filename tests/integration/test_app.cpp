// tcps_test_app: the programs the shim's promise tests run, one mode per behaviour. Some modes
// are the application under test (run with LD_PRELOAD=libtcps.so), others are its plain
// kernel-TCP peer (run without). The scripts next to this file start the engine, the peer and
// the application, and judge what they print and how they exit.
//
// Every mode bounds every wait (SO_RCVTIMEO/SO_SNDTIMEO or a deadline) and exits 1 with a line
// on stderr that says what went wrong; 0 means every check passed.
//
// Peers (plain):
//   echo PORTFILE                    echo server, a thread per connection
//   records-recv PORTFILE T N        one connection: T*N 1000-byte records, each whole, per-thread
//                                    in order
//   connect-many PORT N              N connections, each sends its id, then T sentinels
// Applications (preloaded):
//   hotpath PORT N                   N sends of 64 B and N recvs through an echo, between two
//                                    getppid() markers (strace counts what lies between)
//   idle-epoll PORTFILE FIFO         epoll_wait on an offloaded listener and a FIFO
//   idle-recv PORT                   blocks in recv until the peer closes
//   mt-echo PORT T ROUNDS            T threads, a connection each, ROUNDS round trips each
//   mt-send PORT T N                 T threads send N whole records each on one socket
//   mt-accept PORTFILE T N           T threads in accept() on one listener, N connections
//   pingpong N                       two threads, two offloaded sockets, N messages each way
//   stream MIB [RCVBUF]              two offloaded sockets, MIB MiB each way at once, sends
//                                    and receives of varying sizes and pauses, every byte checked;
//                                    RCVBUF: both ends' SO_RCVBUF (a small one keeps bytes sent
//                                    waiting in the sender's kernel socket, unacknowledged)
//   reset-asked                      a connection the engine asks back (tcpsd --handoff-load
//                                    0; the script says when, on stdin) is reset by its peer:
//                                    the first send must say ECONNRESET, as Linux's does
//   victim-recv PORT, victim-accept PORTFILE PORT, victim-epoll PORT
//                                    block, and check what the engine's end does to them
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kWaitSeconds = 20;  // the bound on any single blocking call

[[noreturn]] void die(const char *format, ...) __attribute__((format(printf, 1, 2)));
void die(const char *format, ...) {
    char line[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(line, sizeof(line), format, args);
    va_end(args);
    std::fprintf(stderr, "tcps_test_app: FAIL: %s\n", line);
    std::fflush(stderr);
    _exit(1);
}

void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
void say(const char *format, ...) {
    va_list args;
    va_start(args, format);
    std::vprintf(format, args);
    va_end(args);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

int to_int(const char *text) {
    char *end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (!*text || *end || value < 0 || value > 100'000'000) die("bad number '%s'", text);
    return static_cast<int>(value);
}

sockaddr_in loopback(uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    return addr;
}

void set_timeouts(int fd, int seconds) {
    const timeval limit{seconds, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit)) != 0)
        die("SO_RCVTIMEO/SO_SNDTIMEO: %s", std::strerror(errno));
}

int connect_to(uint16_t port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", std::strerror(errno));
    const sockaddr_in addr = loopback(port);
    if (connect(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr)) != 0)
        die("connect to port %u: %s", port, std::strerror(errno));
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    set_timeouts(fd, kWaitSeconds);
    return fd;
}

// A listener on 127.0.0.1 with a port the kernel picks, announced by writing it to `port_file`
// (written whole, then renamed, so a reader never sees half a number).
int listen_announced(const char *port_file, int backlog = 256) {
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

// An offloaded socket's fd is the shim's O_PATH placeholder of /dev/null; a kernel socket's
// is "socket:[inode]".
std::string fd_target(int fd) {
    char link[64];
    char target[256] = {};
    std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    const ssize_t n = readlink(link, target, sizeof(target) - 1);
    return n > 0 ? std::string(target, static_cast<size_t>(n)) : std::string("?");
}
bool is_offloaded(int fd) {
    return fd_target(fd) == "/dev/null";
}
void require_offloaded(int fd, const char *what) {
    if (!is_offloaded(fd))
        die("%s (fd %d) is not offloaded: %s (is the engine there?)", what, fd,
            fd_target(fd).c_str());
}

void send_all(int fd, const void *data, size_t len) {
    const auto *bytes = static_cast<const uint8_t *>(data);
    while (len > 0) {
        const ssize_t n = send(fd, bytes, len, MSG_NOSIGNAL);
        if (n <= 0) die("send: %s", n < 0 ? std::strerror(errno) : "returned 0");
        bytes += n;
        len -= static_cast<size_t>(n);
    }
}

// False on EOF before the first byte; dies on errors, timeouts and EOF mid-way.
bool recv_all(int fd, void *data, size_t len) {
    auto *bytes = static_cast<uint8_t *>(data);
    size_t got = 0;
    while (got < len) {
        const ssize_t n = recv(fd, bytes + got, len - got, 0);
        if (n == 0 && got == 0) return false;
        if (n == 0) die("EOF after %zu of %zu bytes", got, len);
        if (n < 0) die("recv (%zu of %zu bytes): %s", got, len, std::strerror(errno));
        got += static_cast<size_t>(n);
    }
    return true;
}

uint32_t fnv1a(const uint8_t *data, size_t len) {
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < len; ++i) hash = (hash ^ data[i]) * 16777619u;
    return hash;
}

// ---------------------------------------------------------------------------------------------
// Peers

int mode_echo(const char *port_file) {
    const int listener = listen_announced(port_file);
    for (;;) {
        const int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("echo: accept: %s", std::strerror(errno));
        }
        std::thread([fd] {
            const int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            static thread_local uint8_t buffer[64 * 1024];
            for (;;) {
                const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
                if (n <= 0) break;
                ssize_t done = 0;
                while (done < n) {
                    const ssize_t m =
                        send(fd, buffer + done, static_cast<size_t>(n - done), MSG_NOSIGNAL);
                    if (m <= 0) break;
                    done += m;
                }
                if (done < n) break;
            }
            close(fd);
        }).detach();
    }
}

constexpr size_t kRecordBytes = 1000;

// thread id, sequence number, payload derived from both, FNV-1a of everything before it.
void make_record(uint8_t *record, uint32_t thread, uint32_t seq) {
    std::memcpy(record, &thread, 4);
    std::memcpy(record + 4, &seq, 4);
    for (size_t i = 8; i < kRecordBytes - 4; ++i)
        record[i] = static_cast<uint8_t>((thread * 131 + seq * 7 + i) & 0xff);
    const uint32_t sum = fnv1a(record, kRecordBytes - 4);
    std::memcpy(record + kRecordBytes - 4, &sum, 4);
}

int mode_records_recv(const char *port_file, int threads, int per_thread) {
    const int listener = listen_announced(port_file);
    set_timeouts(listener, kWaitSeconds);
    const int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) die("records-recv: accept: %s", std::strerror(errno));
    set_timeouts(fd, kWaitSeconds);
    std::vector<uint32_t> next(static_cast<size_t>(threads), 0);
    uint8_t record[kRecordBytes];
    const long total = static_cast<long>(threads) * per_thread;
    for (long i = 0; i < total; ++i) {
        if (!recv_all(fd, record, sizeof(record))) die("EOF after %ld of %ld records", i, total);
        uint32_t thread, seq, sum;
        std::memcpy(&thread, record, 4);
        std::memcpy(&seq, record + 4, 4);
        std::memcpy(&sum, record + kRecordBytes - 4, 4);
        if (sum != fnv1a(record, kRecordBytes - 4))
            die("record %ld is not whole (checksum): sends were interleaved or bytes lost", i);
        if (thread >= static_cast<uint32_t>(threads)) die("record %ld: thread %u", i, thread);
        if (seq != next[thread])
            die("record %ld: thread %u sequence %u, expected %u", i, thread, seq, next[thread]);
        ++next[thread];
    }
    char byte;
    if (recv(fd, &byte, 1, 0) != 0) die("more bytes than %ld records, or no EOF", total);
    say("records-recv: %ld records, all whole and in per-thread order", total);
    return 0;
}

int mode_connect_many(uint16_t port, int count, int sentinels) {
    std::vector<int> fds;
    for (int i = 0; i < count + sentinels; ++i) {
        const int fd = connect_to(port);
        const uint32_t id = i < count ? static_cast<uint32_t>(i) : 0xffffffffu;
        send_all(fd, &id, sizeof(id));
        fds.push_back(fd);
    }
    // Hold them until the acceptor closes each one: it has read the id by then.
    for (int fd : fds) {
        char byte;
        // 0, or ECONNRESET when the acceptor closed without reading everything.
        if (recv(fd, &byte, 1, 0) < 0 && errno != ECONNRESET)
            die("connect-many: recv: %s", std::strerror(errno));
        close(fd);
    }
    say("connect-many: %d connections and %d sentinels", count, sentinels);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Applications

// N sends of 64 B and N recvs of 64 B through an echo peer, kWindow messages ahead, so that
// the replies are mostly in the rx ring before recv() asks. getppid() marks the loop.
int mode_hotpath(uint16_t port, int count) {
    constexpr size_t kMessage = 64;
    constexpr int kWindow = 512;
    const int fd = connect_to(port);
    require_offloaded(fd, "the hot-path socket");
    uint8_t out[kMessage], in[kMessage];
    // Warm up: first-touch page faults of the rings and the first waiter, outside the loop.
    for (int i = 0; i < 2 * kWindow; ++i) {
        std::memset(out, i & 0xff, sizeof(out));
        send_all(fd, out, sizeof(out));
        if (!recv_all(fd, in, sizeof(in)) || std::memcmp(in, out, sizeof(in)) != 0)
            die("warm-up echo %d differs", i);
    }
    say("hotpath: fd %d", fd);
    long recv_calls = 0;
    bool mismatch = false;
    auto fill = [&](uint8_t *message, int i) {
        std::memcpy(message, &i, sizeof(i));
        for (size_t k = sizeof(i); k < kMessage; ++k)
            message[k] = static_cast<uint8_t>((i * 31 + static_cast<int>(k)) & 0xff);
    };
    auto take = [&](int i) {
        size_t got = 0;
        while (got < kMessage) {
            const ssize_t n = recv(fd, in + got, kMessage - got, 0);
            ++recv_calls;
            if (n <= 0) return false;
            got += static_cast<size_t>(n);
        }
        uint8_t expected[kMessage];
        fill(expected, i);
        if (std::memcmp(in, expected, kMessage) != 0) mismatch = true;
        return true;
    };
    const auto start = Clock::now();
    (void)getppid();  // marker: the loop starts
    bool ok = true;
    for (int i = 0; i < count && ok; ++i) {
        fill(out, i);
        ok = send(fd, out, kMessage, MSG_NOSIGNAL) == static_cast<ssize_t>(kMessage);
        if (ok && i >= kWindow) ok = take(i - kWindow);
    }
    for (int i = std::max(0, count - kWindow); i < count && ok; ++i) ok = take(i);
    (void)getppid();  // marker: the loop ended
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    if (!ok) die("hotpath: a send or recv failed: %s", std::strerror(errno));
    if (mismatch) die("hotpath: an echoed message differs from what was sent");
    say("hotpath: %d sends, %d messages received in %ld recv calls, %.0f us", count, count,
        recv_calls, us);
    close(fd);
    return 0;
}

int mode_idle_epoll(const char *port_file, const char *fifo) {
    const int listener = listen_announced(port_file);
    require_offloaded(listener, "the listener");
    const int pipe_fd = open(fifo, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (pipe_fd < 0) die("open %s: %s", fifo, std::strerror(errno));
    const int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = listener;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, listener, &event) != 0) die("epoll_ctl listener");
    event.data.fd = pipe_fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, pipe_fd, &event) != 0) die("epoll_ctl fifo");
    say("idle-epoll: waiting");
    bool pipe_seen = false, accepted = false;
    while (!pipe_seen || !accepted) {
        epoll_event events[4];
        const int n = epoll_wait(ep, events, 4, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("epoll_wait returned %d: %s", n, std::strerror(errno));
        for (int i = 0; i < n; ++i) {
            if (events[i].data.fd == pipe_fd) {
                char buffer[64];
                if (read(pipe_fd, buffer, sizeof(buffer)) <= 0) die("the FIFO was not readable");
                if (!pipe_seen) say("idle-epoll: woke for the pipe");
                pipe_seen = true;
            } else if (events[i].data.fd == listener) {
                const int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) die("accept after EPOLLIN: %s", std::strerror(errno));
                require_offloaded(fd, "the accepted connection");
                close(fd);
                say("idle-epoll: woke for a connection");
                accepted = true;
            }
        }
    }
    return 0;
}

int mode_idle_recv(uint16_t port) {
    const int fd = connect_to(port);
    require_offloaded(fd, "the connection");
    const timeval forever{0, 0};  // blocks until the peer closes, however idle the test is
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof(forever));
    say("idle-recv: waiting");
    char byte;
    const ssize_t n = recv(fd, &byte, 1, 0);
    if (n != 0) die("recv returned %zd (%s), expected the peer's EOF", n, std::strerror(errno));
    say("idle-recv: woke for the peer's EOF");
    return 0;
}

int mode_mt_echo(uint16_t port, int threads, int rounds) {
    std::atomic<long> done{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            const int fd = connect_to(port);
            require_offloaded(fd, "a thread's connection");
            uint8_t request[48], reply[48];
            for (int r = 0; r < rounds; ++r) {
                // Sizes vary so that replies straddle ring positions differently.
                const size_t len = 8 + static_cast<size_t>((r * 7 + t) % 40);
                const uint32_t id = static_cast<uint32_t>(t), seq = static_cast<uint32_t>(r);
                std::memcpy(request, &id, 4);
                std::memcpy(request + 4, &seq, 4);
                for (size_t k = 8; k < len; ++k)
                    request[k] = static_cast<uint8_t>((t * 17 + r + static_cast<int>(k)) & 0xff);
                send_all(fd, request, len);
                if (!recv_all(fd, reply, len)) die("thread %d: EOF at round %d", t, r);
                if (std::memcmp(request, reply, len) != 0)
                    die("thread %d: round %d came back different", t, r);
                done.fetch_add(1);
            }
            close(fd);
        });
    for (auto &worker : workers) worker.join();
    if (done.load() != static_cast<long>(threads) * rounds)
        die("%ld of %d round trips", done.load(), threads * rounds);
    say("mt-echo: %d threads x %d round trips, every byte checked", threads, rounds);
    return 0;
}

int mode_mt_send(uint16_t port, int threads, int per_thread) {
    const int fd = connect_to(port);
    require_offloaded(fd, "the shared socket");
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            uint8_t record[kRecordBytes];
            for (int i = 0; i < per_thread; ++i) {
                make_record(record, static_cast<uint32_t>(t), static_cast<uint32_t>(i));
                // One send() per record: a blocking TCP socket takes it whole.
                const ssize_t n = send(fd, record, sizeof(record), MSG_NOSIGNAL);
                if (n != static_cast<ssize_t>(sizeof(record)))
                    die("thread %d record %d: send returned %zd (%s)", t, i, n,
                        std::strerror(errno));
            }
        });
    for (auto &worker : workers) worker.join();
    if (shutdown(fd, SHUT_WR) != 0) die("shutdown: %s", std::strerror(errno));
    char byte;
    const ssize_t n = recv(fd, &byte, 1, 0);  // the receiver closes once it has checked all
    if (n != 0) die("waiting for the receiver's EOF: %zd (%s)", n, std::strerror(errno));
    close(fd);
    say("mt-send: %d threads x %d records sent", threads, per_thread);
    return 0;
}

int mode_mt_accept(const char *port_file, int threads, int count) {
    const int listener = listen_announced(port_file, 512);
    require_offloaded(listener, "the listener");
    set_timeouts(listener, kWaitSeconds);  // accept() gives up if connections stop coming
    std::mutex mutex;
    std::vector<int> seen(static_cast<size_t>(count), 0);
    std::vector<int> per_thread(static_cast<size_t>(threads), 0);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            for (;;) {
                const int fd = accept(listener, nullptr, nullptr);
                if (fd < 0) die("thread %d: accept: %s", t, std::strerror(errno));
                require_offloaded(fd, "an accepted connection");
                uint32_t id;
                if (!recv_all(fd, &id, sizeof(id))) die("thread %d: EOF before the id", t);
                close(fd);
                if (id == 0xffffffffu) return;  // each thread stops at its first sentinel
                if (id >= static_cast<uint32_t>(count)) die("thread %d: id %u", t, id);
                std::lock_guard<std::mutex> lock(mutex);
                ++seen[id];
                ++per_thread[static_cast<size_t>(t)];
            }
        });
    for (auto &worker : workers) worker.join();
    for (int i = 0; i < count; ++i)
        if (seen[static_cast<size_t>(i)] != 1)
            die("connection %d was accepted %d times", i, seen[static_cast<size_t>(i)]);
    std::string spread;
    for (int n : per_thread) spread += " " + std::to_string(n);
    say("mt-accept: %d connections, each accepted once; per thread:%s", count, spread.c_str());
    return 0;
}

// A listener on 127.0.0.1 at a port the kernel picks (`port`), with bounded accepts.
int loopback_listener(uint16_t &port) {
    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr = loopback(0);
    socklen_t len = sizeof(addr);
    if (bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0 ||
        listen(listener, 8) != 0 ||
        getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len) != 0)
        die("listener: %s", std::strerror(errno));
    set_timeouts(listener, kWaitSeconds);
    port = ntohs(addr.sin_port);
    return listener;
}

// Both ends of one loopback connection in this process, all of it offloaded.
struct Connection {
    int listener, client, server;
};
Connection offloaded_connection() {
    uint16_t port;
    const int listener = loopback_listener(port);
    require_offloaded(listener, "the listener");
    const int client = connect_to(port);
    const int server = accept(listener, nullptr, nullptr);
    if (server < 0) die("accept: %s", std::strerror(errno));
    require_offloaded(client, "the client socket");
    require_offloaded(server, "the server socket");
    return {listener, client, server};
}

// Two threads bounce a counter through two offloaded sockets, every message a sleep and a
// wake-up when the engine and the threads do not spin. A lost wake-up is a recv that times out.
int mode_pingpong(int count) {
    const auto [listener, client, server] = offloaded_connection();
    const timeval limit{5, 0};  // a message takes microseconds; 5 s means it was lost
    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    setsockopt(server, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    const auto start = Clock::now();
    std::thread responder([&] {
        for (int i = 0; i < count; ++i) {
            uint64_t value;
            const ssize_t n = recv(server, &value, sizeof(value), MSG_WAITALL);
            if (n != sizeof(value))
                die("responder: message %d: recv %zd (%s): a lost wake-up?", i, n,
                    std::strerror(errno));
            if (value != static_cast<uint64_t>(2 * i)) die("responder: got %lu", value);
            ++value;
            if (send(server, &value, sizeof(value), MSG_NOSIGNAL) != sizeof(value))
                die("responder: send: %s", std::strerror(errno));
        }
    });
    for (int i = 0; i < count; ++i) {
        uint64_t value = static_cast<uint64_t>(2 * i);
        if (send(client, &value, sizeof(value), MSG_NOSIGNAL) != sizeof(value))
            die("initiator: send: %s", std::strerror(errno));
        const ssize_t n = recv(client, &value, sizeof(value), MSG_WAITALL);
        if (n != sizeof(value))
            die("initiator: message %d: recv %zd (%s): a lost wake-up?", i, n,
                std::strerror(errno));
        if (value != static_cast<uint64_t>(2 * i + 1)) die("initiator: got %lu", value);
    }
    responder.join();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    say("pingpong: %d round trips in %.0f ms (%.1f us each)", count, ms, ms * 1000 / count);
    return 0;
}

// --- the engine's end, seen by programs blocked on offloaded sockets ---

std::atomic<int> g_sigpipes{0};

void count_sigpipe(int) {
    g_sigpipes.fetch_add(1);
}

const char *errno_name(int error) {
    switch (error) {
        case 0:
            return "0";
        case ECONNRESET:
            return "ECONNRESET";
        case ECONNABORTED:
            return "ECONNABORTED";
        case EPIPE:
            return "EPIPE";
        case EAGAIN:
            return "EAGAIN";
        case EINVAL:
            return "EINVAL";
        case EBADF:
            return "EBADF";
        case ENOTCONN:
            return "ENOTCONN";
        case EINTR:
            return "EINTR";
        default:
            return "other";
    }
}

// The engine asks a saturated worker's connections back at the application's next call on
// them (seed 003). One reset by its peer meanwhile is no longer the kernel's to report: the
// engine's receive took the kernel socket's error. The shim and engine keep it offloaded, and
// the first call reports the reset as Linux would (before: handed back, send said EPIPE).
// The engine asks at the end of a load window, which only a worker with work ends: a second
// connection, half closed (never asked back), gets a byte every 20 ms meanwhile.
int mode_reset_asked() {
    uint16_t port;
    const int listener = loopback_listener(port);
    auto connected_pair = [&] {
        const int client = connect_to(port);
        const int server = accept(listener, nullptr, nullptr);
        if (server < 0) die("accept: %s", std::strerror(errno));
        require_offloaded(client, "the client socket");
        return std::pair{client, server};
    };
    auto go_ahead = [] {  // the script's newline on stdin
        pollfd in{0, POLLIN, 0};
        char newline;
        if (poll(&in, 1, kWaitSeconds * 1000) != 1 || read(0, &newline, 1) != 1)
            die("no go-ahead on stdin");
    };
    const auto [ticked, ticker] = connected_pair();
    shutdown(ticked, SHUT_WR);
    char byte;
    if (recv(ticker, &byte, 1, 0) != 0) die("the half-closed connection's FIN did not come");
    std::atomic<bool> stop{false};
    std::thread ticks([&, ticker = ticker] {
        const auto end = Clock::now() + std::chrono::seconds(kWaitSeconds);
        while (!stop.load() && Clock::now() < end && send(ticker, "t", 1, MSG_NOSIGNAL) == 1)
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
    });
    say("reset-asked: ticking");
    go_ahead();  // the script has counted the engine's asks so far
    const auto [client, server] = connected_pair();
    say("reset-asked: connected");
    go_ahead();  // the engine has asked for it
    const linger reset{1, 0};
    if (setsockopt(server, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset)) != 0 || close(server) != 0)
        die("reset close: %s", std::strerror(errno));
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    pollfd p{client, POLLIN, 0};
    while (!(p.revents & POLLHUP)) {
        if (Clock::now() > deadline) die("no POLLHUP after the peer's reset");
        if (poll(&p, 1, 100) < 0) die("poll: %s", std::strerror(errno));
    }
    errno = 0;
    const ssize_t sent = send(client, "x", 1, MSG_NOSIGNAL);
    const int send_error = errno;
    errno = 0;
    const ssize_t got = recv(client, &byte, 1, 0);
    say("reset-asked: send=%zd %s, then recv=%zd %s, %s", sent, errno_name(send_error), got,
        errno_name(errno), is_offloaded(client) ? "offloaded" : "the kernel's");
    stop.store(true);
    ticks.join();
    if (sent != -1 || send_error != ECONNRESET)
        die("the first send after the reset did not say ECONNRESET");
    if (got != 0) die("recv after the reported reset did not say 0 (EOF)");
    for (const int fd : {client, ticked, ticker, listener}) close(fd);
    return 0;
}

// How long the blocked call took to return after the engine went: the script reads it.
struct Blocked {
    Clock::time_point since = Clock::now();
    double seconds() const { return std::chrono::duration<double>(Clock::now() - since).count(); }
};

// After the engine is gone: send says EPIPE with SIGPIPE (none with MSG_NOSIGNAL).
void check_send_after_end(int fd) {
    struct sigaction action {};
    action.sa_handler = count_sigpipe;
    sigaction(SIGPIPE, &action, nullptr);
    errno = 0;
    ssize_t n = send(fd, "x", 1, MSG_NOSIGNAL);
    if (n != -1 || errno != EPIPE)
        die("send(MSG_NOSIGNAL) after the engine's end: %zd %s", n, errno_name(errno));
    if (g_sigpipes.load() != 0) die("SIGPIPE despite MSG_NOSIGNAL");
    errno = 0;
    n = send(fd, "x", 1, 0);
    if (n != -1 || errno != EPIPE) die("send after the engine's end: %zd %s", n, errno_name(errno));
    if (g_sigpipes.load() != 1) die("send said EPIPE but %d SIGPIPEs came", g_sigpipes.load());
    say("after: send EPIPE, SIGPIPE once (none with MSG_NOSIGNAL)");
}

// A new socket is a kernel socket now, and works: an echo through the plain peer.
void check_fallback(uint16_t echo_port) {
    const int fd = connect_to(echo_port);
    const std::string target = fd_target(fd);
    if (target.rfind("socket:", 0) != 0)
        die("a socket made after the engine's end is not a kernel socket: %s", target.c_str());
    send_all(fd, "fallback", 8);
    char reply[8];
    if (!recv_all(fd, reply, sizeof(reply)) || std::memcmp(reply, "fallback", 8) != 0)
        die("the kernel socket's echo differs");
    close(fd);
    say("after: a new socket is a kernel socket and works");
}

int mode_victim_recv(uint16_t echo_port) {
    const int fd = connect_to(echo_port);
    require_offloaded(fd, "the connection");
    const timeval forever{0, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof(forever));
    say("victim-recv: waiting");
    Blocked blocked;
    char byte;
    errno = 0;
    const ssize_t n = recv(fd, &byte, 1, 0);
    const int error = errno;
    say("victim-recv: recv returned %zd %s after %.2f s", n, n < 0 ? errno_name(error) : "",
        blocked.seconds());
    if (!(n == 0 || (n == -1 && error == ECONNRESET)))
        die("recv should say ECONNRESET or 0, said %zd %s", n, errno_name(error));
    check_send_after_end(fd);
    check_fallback(echo_port);
    // A child forked after the end has the socket as its parent has it, dead, not EBADF, and
    // its own new sockets are kernel sockets too.
    std::fflush(stdout);
    const pid_t child = fork();
    if (child < 0) die("fork: %s", std::strerror(errno));
    if (child == 0) {
        errno = 0;
        const ssize_t got = recv(fd, &byte, 1, MSG_DONTWAIT);
        if (!(got == 0 || (got == -1 && errno == ECONNRESET)))
            die("in a child forked after the end, recv should say ECONNRESET or 0, said %zd %s",
                got, errno_name(errno));
        say("after: a child forked after the end: recv on the inherited socket says %s",
            got == 0 ? "0" : errno_name(ECONNRESET));
        check_fallback(echo_port);
        std::fflush(stdout);
        _exit(0);
    }
    int status = 0;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("the child forked after the end failed (status 0x%x)", status);
    close(fd);
    return 0;
}

int mode_victim_accept(const char *port_file, uint16_t echo_port) {
    const int listener = listen_announced(port_file);
    require_offloaded(listener, "the listener");
    say("victim-accept: waiting");
    Blocked blocked;
    errno = 0;
    int fd = accept(listener, nullptr, nullptr);
    const int error = errno;
    say("victim-accept: accept returned %d %s after %.2f s", fd, fd < 0 ? errno_name(error) : "",
        blocked.seconds());
    if (fd != -1 || error != ECONNABORTED)
        die("accept should say ECONNABORTED, said %d %s", fd, errno_name(error));
    // Reported once: then the listener is quiet, as an idle one is.
    pollfd p{listener, POLLIN, 0};
    if (poll(&p, 1, 0) != 0) die("the dead listener still polls ready (0x%x)", p.revents);
    const int flags = fcntl(listener, F_GETFL);
    fcntl(listener, F_SETFL, flags | O_NONBLOCK);
    fd = accept(listener, nullptr, nullptr);
    if (fd != -1 || errno != EAGAIN)
        die("a second accept (O_NONBLOCK) should say EAGAIN, said %d %s", fd, errno_name(errno));
    say("after: the listener is quiet (poll 0, accept EAGAIN)");
    // This process is the only one holding it: the accept() that reported the end made it
    // again in the kernel, on the same port, and it takes connections.
    const std::string target = fd_target(listener);
    if (target.rfind("socket:", 0) != 0)
        die("the listener was not made again in the kernel: %s", target.c_str());
    sockaddr_in addr{};
    socklen_t len = sizeof(addr);
    if (getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len) != 0)
        die("getsockname on the remade listener: %s", std::strerror(errno));
    const int client = connect_to(ntohs(addr.sin_port));
    pollfd ready{listener, POLLIN, 0};
    if (poll(&ready, 1, kWaitSeconds * 1000) != 1) die("the remade listener reports no connection");
    fd = accept(listener, nullptr, nullptr);
    if (fd < 0) die("accept on the remade listener: %s", std::strerror(errno));
    close(fd);
    close(client);
    say("after: the listener is a kernel socket again on its port and accepts");
    check_fallback(echo_port);
    close(listener);
    return 0;
}

int mode_victim_epoll(uint16_t echo_port) {
    const int fd = connect_to(echo_port);
    require_offloaded(fd, "the connection");
    const int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_event event{};
    event.events = EPOLLIN | EPOLLRDHUP | EPOLLET;  // an edge-triggered server (nginx's way)
    event.data.fd = fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &event) != 0) die("epoll_ctl: %s", std::strerror(errno));
    // Edges reported and consumed first (the echo of "hello", read until EAGAIN each time):
    // the engine's end must still make a new one.
    epoll_event events[4];
    send_all(fd, "hello", 5);
    size_t echoed = 0;
    while (echoed < 5) {
        if (epoll_wait(ep, events, 4, kWaitSeconds * 1000) != 1 || !(events[0].events & EPOLLIN))
            die("the echo was not reported after %zu bytes", echoed);
        char buffer[8];
        ssize_t got;
        while ((got = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT)) > 0)
            echoed += static_cast<size_t>(got);
        if (got == 0 || errno != EAGAIN) die("reading the echo: %s", std::strerror(errno));
    }
    if (echoed != 5) die("the echo was %zu bytes", echoed);
    int n;
    say("victim-epoll: waiting");
    Blocked blocked;
    do {
        n = epoll_wait(ep, events, 4, -1);
    } while (n < 0 && errno == EINTR);
    say("victim-epoll: epoll_wait returned %d (events 0x%x) after %.2f s", n,
        n > 0 ? events[0].events : 0u, blocked.seconds());
    if (n != 1 || events[0].data.fd != fd) die("epoll_wait should report the socket");
    if (!(events[0].events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)))
        die("the event should say the connection ended: 0x%x", events[0].events);
    char byte;
    errno = 0;
    const ssize_t got = recv(fd, &byte, 1, MSG_DONTWAIT);
    const int error = errno;
    if (!(got == 0 || (got == -1 && error == ECONNRESET)))
        die("recv should say ECONNRESET or 0, said %zd %s", got, errno_name(error));
    check_send_after_end(fd);
    check_fallback(echo_port);
    close(fd);
    close(ep);
    return 0;
}

uint16_t to_port(const char *text) {
    const int port = to_int(text);
    if (port <= 0 || port > 65535) die("bad port '%s'", text);
    return static_cast<uint16_t>(port);
}

}  // namespace

// The byte at position `pos` of direction `dir`'s stream. It differs from the bytes a whole
// ring (any power of two) before and after it, so a stale byte from one ring earlier or a byte
// written one ring too soon is caught.
uint8_t stream_byte(int dir, uint64_t pos) {
    const uint64_t mixed = (pos * 131) ^ (pos >> 8) ^ (pos >> 16) ^ (pos >> 24) ^ (pos >> 32);
    return static_cast<uint8_t>((mixed + static_cast<uint64_t>(dir) * 7) & 0xff);
}

// Both directions of one connection stream `mib` MiB at once: each sender writes pieces of
// 1 B to 300 KiB, each receiver reads pieces of varying sizes (some with readv into two
// buffers) and now and then stops for a moment, so the rings fill, grow and drain in every
// order. Every byte is checked against its position in the stream.
int mode_stream(int mib, int rcvbuf) {
    const auto [listener, client, server] = offloaded_connection();
    for (int fd : {client, server})
        if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)) != 0)
            die("setsockopt(SO_RCVBUF): %s", std::strerror(errno));
    set_timeouts(client, kWaitSeconds);
    set_timeouts(server, kWaitSeconds);
    const uint64_t total = static_cast<uint64_t>(mib) << 20;
    auto sender = [&](int fd, int dir) {
        std::vector<uint8_t> piece(300 * 1024);
        uint64_t pos = 0, lcg = 12345 + static_cast<uint64_t>(dir);
        while (pos < total) {
            lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
            const size_t want = std::min<uint64_t>(1 + (lcg >> 33) % piece.size(), total - pos);
            for (size_t k = 0; k < want; ++k) piece[k] = stream_byte(dir, pos + k);
            size_t done = 0;
            while (done < want) {
                const ssize_t n = send(fd, piece.data() + done, want - done, MSG_NOSIGNAL);
                if (n <= 0)
                    die("stream %d: send at %lu: %s", dir, pos + done, std::strerror(errno));
                done += static_cast<size_t>(n);
            }
            pos += want;
        }
    };
    auto receiver = [&](int fd, int dir) {
        std::vector<uint8_t> buffer(300 * 1024);
        // With a small receive buffer, shorter and more frequent stops.
        const uint64_t pause_every = rcvbuf > 0 ? 1 << 20 : 8 << 20;
        const auto pause = std::chrono::milliseconds(rcvbuf > 0 ? 5 : 20);
        uint64_t pos = 0, lcg = 777 + static_cast<uint64_t>(dir), next_pause = pause_every;
        while (pos < total) {
            lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
            const size_t want = 1 + (lcg >> 33) % buffer.size();
            ssize_t n;
            if (lcg & 1) {
                const size_t first = want / 2;
                iovec parts[2] = {{buffer.data(), first}, {buffer.data() + first, want - first}};
                n = readv(fd, parts, 2);
            } else {
                n = recv(fd, buffer.data(), want, 0);
            }
            if (n <= 0) die("stream %d: recv at %lu: %zd (%s)", dir, pos, n, std::strerror(errno));
            for (ssize_t k = 0; k < n; ++k)
                if (buffer[static_cast<size_t>(k)] !=
                    stream_byte(dir, pos + static_cast<uint64_t>(k)))
                    die("stream %d: byte %lu is %u, not %u", dir, pos + static_cast<uint64_t>(k),
                        buffer[static_cast<size_t>(k)],
                        stream_byte(dir, pos + static_cast<uint64_t>(k)));
            pos += static_cast<uint64_t>(n);
            if (pos >= next_pause) {  // a reader that stops: the sender fills the rings
                next_pause += pause_every;
                std::this_thread::sleep_for(pause);
            }
        }
    };
    const auto start = Clock::now();
    std::thread a_to_b(sender, client, 0), b_to_a(sender, server, 1);
    std::thread b_reads(receiver, server, 0), a_reads(receiver, client, 1);
    for (std::thread *t : {&a_to_b, &b_to_a, &b_reads, &a_reads}) t->join();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    close(client);
    close(server);
    close(listener);
    say("stream: %d MiB each way, every byte checked, in %.2f s", mib, seconds);
    return 0;
}

int main(int argc, char **argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    const int given = argc - 2;
    auto wants = [&](const char *name, int count) {
        if (mode != name) return false;
        if (given != count) die("%s takes %d arguments, not %d", name, count, given);
        return true;
    };
    signal(SIGPIPE, SIG_IGN);
    if (wants("echo", 1)) return mode_echo(argv[2]);
    if (wants("records-recv", 3))
        return mode_records_recv(argv[2], to_int(argv[3]), to_int(argv[4]));
    if (wants("connect-many", 3))
        return mode_connect_many(to_port(argv[2]), to_int(argv[3]), to_int(argv[4]));
    if (wants("hotpath", 2)) return mode_hotpath(to_port(argv[2]), to_int(argv[3]));
    if (wants("idle-epoll", 2)) return mode_idle_epoll(argv[2], argv[3]);
    if (wants("idle-recv", 1)) return mode_idle_recv(to_port(argv[2]));
    if (wants("mt-echo", 3))
        return mode_mt_echo(to_port(argv[2]), to_int(argv[3]), to_int(argv[4]));
    if (wants("mt-send", 3))
        return mode_mt_send(to_port(argv[2]), to_int(argv[3]), to_int(argv[4]));
    if (wants("mt-accept", 3)) return mode_mt_accept(argv[2], to_int(argv[3]), to_int(argv[4]));
    if (wants("pingpong", 1)) return mode_pingpong(to_int(argv[2]));
    if (mode == "stream" && given == 2) return mode_stream(to_int(argv[2]), to_int(argv[3]));
    if (wants("stream", 1)) return mode_stream(to_int(argv[2]), 0);
    if (wants("reset-asked", 0)) return mode_reset_asked();
    if (wants("victim-recv", 1)) return mode_victim_recv(to_port(argv[2]));
    if (wants("victim-accept", 2)) return mode_victim_accept(argv[2], to_port(argv[3]));
    if (wants("victim-epoll", 1)) return mode_victim_epoll(to_port(argv[2]));
    die("unknown mode '%s' (see the comment at the top of test_app.cpp)", mode.c_str());
}
