// Socket semantics as an application sees them, on 127.0.0.1 and ::1.
//
// One line per observation, with content that does not depend on the run: no ports, addresses
// that vary, timings or buffer sizes; errno names, return values, byte counts and poll masks as
// names. run.sh runs this natively and under libtcps.so and diffs the two outputs, so every
// line is a statement about Linux's behaviour that the offloaded sockets must reproduce.
//
// Every wait is bounded: a wait that expires prints TIMEOUT into the line (and so into the diff).
//
// --expect-offload: at the end, the TCP descriptors kept open since the start must not be kernel
// sockets (their /proc/self/fd link is not "socket:[...]"); if they are, the shim silently fell
// back to the kernel, which is reported on stderr with exit status 3.
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
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
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kWaitMs = 5000;  // the bound on every wait for something that must happen

// ---------------------------------------------------------------------------------------------
// Output

std::string g_prefix;

void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
void say(const char *format, ...) {
    char line[1024];
    va_list args;
    va_start(args, format);
    std::vsnprintf(line, sizeof(line), format, args);
    va_end(args);
    std::printf("%s%s\n", g_prefix.c_str(), line);
}

std::string err_name(int error) {
    const char *name = strerrorname_np(error);
    return name ? name : "E" + std::to_string(error);
}

// "5" for a success, "-1 EAGAIN" for a failure (errno read at once).
std::string rc(long value) {
    if (value >= 0) return std::to_string(value);
    return std::to_string(value) + " " + err_name(errno);
}

const char *yes(bool value) {
    return value ? "yes" : "no";
}

std::string poll_names(int mask) {
    static const std::pair<int, const char *> kNames[] = {
        {POLLIN, "POLLIN"},         {POLLPRI, "POLLPRI"},       {POLLOUT, "POLLOUT"},
        {POLLRDNORM, "POLLRDNORM"}, {POLLRDBAND, "POLLRDBAND"}, {POLLWRNORM, "POLLWRNORM"},
        {POLLWRBAND, "POLLWRBAND"}, {POLLERR, "POLLERR"},       {POLLHUP, "POLLHUP"},
        {POLLRDHUP, "POLLRDHUP"},   {POLLNVAL, "POLLNVAL"}};
    std::string out;
    for (auto [bit, name] : kNames) {
        if (!(mask & bit)) continue;
        if (!out.empty()) out += "|";
        out += name;
        mask &= ~bit;
    }
    if (mask) out += (out.empty() ? "" : "|") + std::to_string(mask);
    return out.empty() ? "none" : out;
}

std::string epoll_names(uint32_t mask) {
    static const std::pair<uint32_t, const char *> kNames[] = {
        {EPOLLIN, "EPOLLIN"},         {EPOLLPRI, "EPOLLPRI"},      {EPOLLOUT, "EPOLLOUT"},
        {EPOLLERR, "EPOLLERR"},       {EPOLLHUP, "EPOLLHUP"},      {EPOLLRDHUP, "EPOLLRDHUP"},
        {EPOLLRDNORM, "EPOLLRDNORM"}, {EPOLLWRNORM, "EPOLLWRNORM"}};
    std::string out;
    for (auto [bit, name] : kNames) {
        if (!(mask & bit)) continue;
        if (!out.empty()) out += "|";
        out += name;
        mask &= ~bit;
    }
    if (mask) out += (out.empty() ? "" : "|") + std::to_string(mask);
    return out.empty() ? "none" : out;
}

// ---------------------------------------------------------------------------------------------
// Addresses and sockets

struct Family {
    int af;
    const char *tag;
};
constexpr Family kV4{AF_INET, "v4"};
constexpr Family kV6{AF_INET6, "v6"};

struct Address {
    sockaddr_storage storage{};
    socklen_t len = 0;
    sockaddr *get() { return reinterpret_cast<sockaddr *>(&storage); }
    const sockaddr *get() const { return reinterpret_cast<const sockaddr *>(&storage); }
};

Address loopback(int af, uint16_t port) {
    Address address;
    if (af == AF_INET) {
        auto *in = reinterpret_cast<sockaddr_in *>(&address.storage);
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        address.len = sizeof(sockaddr_in);
    } else {
        auto *in6 = reinterpret_cast<sockaddr_in6 *>(&address.storage);
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        in6->sin6_addr = in6addr_loopback;
        address.len = sizeof(sockaddr_in6);
    }
    return address;
}

Address any_v6(uint16_t port) {
    Address address;
    auto *in6 = reinterpret_cast<sockaddr_in6 *>(&address.storage);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    in6->sin6_addr = in6addr_any;
    address.len = sizeof(sockaddr_in6);
    return address;
}

uint16_t port_of(const sockaddr_storage &storage) {
    if (storage.ss_family == AF_INET)
        return ntohs(reinterpret_cast<const sockaddr_in *>(&storage)->sin_port);
    if (storage.ss_family == AF_INET6)
        return ntohs(reinterpret_cast<const sockaddr_in6 *>(&storage)->sin6_port);
    return 0;
}

std::string family_name(int af) {
    switch (af) {
        case AF_INET:
            return "AF_INET";
        case AF_INET6:
            return "AF_INET6";
        case AF_UNIX:
            return "AF_UNIX";
        case AF_UNSPEC:
            return "AF_UNSPEC";
        default:
            return "AF_" + std::to_string(af);
    }
}

std::string host_of(const sockaddr_storage &storage) {
    char text[INET6_ADDRSTRLEN] = "?";
    if (storage.ss_family == AF_INET)
        inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in *>(&storage)->sin_addr, text,
                  sizeof(text));
    else if (storage.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6 *>(&storage)->sin6_addr, text,
                  sizeof(text));
    return text;
}

Address local_of(int fd) {
    Address address;
    address.len = sizeof(address.storage);
    if (getsockname(fd, address.get(), &address.len) != 0) address.len = 0;
    return address;
}

Address peer_of(int fd) {
    Address address;
    address.len = sizeof(address.storage);
    if (getpeername(fd, address.get(), &address.len) != 0) address.len = 0;
    return address;
}

uint16_t local_port(int fd) {
    return port_of(local_of(fd).storage);
}

int tcp_socket(int af, int flags = 0) {
    int fd = socket(af, SOCK_STREAM | flags, 0);
    if (fd < 0) {
        std::fprintf(stderr, "semantics: socket: %s\n", std::strerror(errno));
        std::exit(2);
    }
    return fd;
}

void set_int(int fd, int level, int name, int value) {
    if (setsockopt(fd, level, name, &value, sizeof(value)) != 0)
        std::fprintf(stderr, "semantics: setsockopt(%d, %d): %s\n", level, name,
                     std::strerror(errno));
}

int get_int(int fd, int level, int name) {
    int value = -12345;
    socklen_t len = sizeof(value);
    if (getsockopt(fd, level, name, &value, &len) != 0) return -errno;
    return value;
}

// getsockopt's own result for an int option: "0" or "-1 ENOPROTOOPT".
std::string get_rc(int fd, int level, int name) {
    int value = 0;
    socklen_t len = sizeof(value);
    return rc(getsockopt(fd, level, name, &value, &len));
}

// A listener on the family's loopback address and a kernel-chosen port.
int listener(const Family &family, int backlog = 16) {
    int fd = tcp_socket(family.af);
    Address address = loopback(family.af, 0);
    if (bind(fd, address.get(), address.len) != 0 || listen(fd, backlog) != 0) {
        std::fprintf(stderr, "semantics: listener: %s\n", std::strerror(errno));
        std::exit(2);
    }
    return fd;
}

int connect_to(const Family &family, uint16_t port) {
    int fd = tcp_socket(family.af);
    Address address = loopback(family.af, port);
    if (connect(fd, address.get(), address.len) != 0) {
        std::fprintf(stderr, "semantics: connect: %s\n", std::strerror(errno));
        std::exit(2);
    }
    return fd;
}

struct Pair {
    int client = -1;
    int server = -1;
    void close_both() {
        if (client >= 0) close(client);
        if (server >= 0) close(server);
        client = server = -1;
    }
};

Pair connected_pair(const Family &family) {
    int lfd = listener(family);
    Pair pair;
    pair.client = connect_to(family, local_port(lfd));
    pair.server = accept(lfd, nullptr, nullptr);
    if (pair.server < 0) {
        std::fprintf(stderr, "semantics: accept: %s\n", std::strerror(errno));
        std::exit(2);
    }
    close(lfd);
    return pair;
}

// A port on which nothing listens: a socket bound to it (not listening) keeps anyone else from
// taking it while the test connects there.
struct ClosedPort {
    int holder = -1;
    uint16_t port = 0;
    explicit ClosedPort(const Family &family) {
        holder = tcp_socket(family.af);
        Address address = loopback(family.af, 0);
        if (bind(holder, address.get(), address.len) != 0) std::exit(2);
        port = local_port(holder);
    }
    ~ClosedPort() { close(holder); }
};

void reset_close(int fd) {
    linger option{1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &option, sizeof(option));
    close(fd);
}

bool is_nonblocking(int fd) {
    return (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
}
bool is_cloexec(int fd) {
    return (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
}

void set_nonblocking(int fd, bool on) {
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

// ---------------------------------------------------------------------------------------------
// Bounded waits

int ms_left(Clock::time_point deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

// poll() for `events` until any is reported or the bound passes. Returns revents (0: timeout).
int wait_events(int fd, short events, int timeout_ms = kWaitMs) {
    pollfd entry{fd, events, 0};
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
        int n = poll(&entry, 1, ms_left(deadline));
        if (n > 0) return entry.revents;
        if (n == 0 || errno != EINTR) return 0;
    }
}

// Waits until `bits` all show in poll's revents (other bits may show first).
int wait_bits(int fd, short events, int bits) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    for (;;) {
        pollfd entry{fd, events, 0};
        int n = poll(&entry, 1, 0);
        if (n > 0 && (entry.revents & bits) == bits) return entry.revents;
        if (ms_left(deadline) == 0) return 0;
        // The bits wanted are not up yet; the ones that are would make poll() return at once,
        // so re-check at a short interval until the deadline.
        usleep(1000);
    }
}

// Run with --expect-offload: the engine serves the sockets.
bool offloaded_run = false;

// Waits until `done` says yes of the socket's TCP_INFO, or the bound passes.
template <typename Done>
void wait_tcp_info(int fd, Done done) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    for (;;) {
        tcp_info info{};
        socklen_t len = sizeof(info);
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0 || done(info) ||
            ms_left(deadline) == 0)
            return;
        usleep(1000);
    }
}

// Waits until the connection's TCP state (TCP_INFO) is `state`, or the bound passes.
void wait_tcp_state(int fd, int state) {
    wait_tcp_info(fd, [&](const tcp_info &info) { return info.tcpi_state == state; });
}

// Waits until at least `n` bytes can be read, without consuming them (MSG_PEEK).
bool wait_available(int fd, size_t n) {
    std::vector<char> buf(n);
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    for (;;) {
        ssize_t got = recv(fd, buf.data(), n, MSG_PEEK | MSG_DONTWAIT);
        if (got >= static_cast<ssize_t>(n)) return true;
        if (got == 0) return false;  // EOF: it will never come
        if (ms_left(deadline) == 0) return false;
        if (got < 0)  // short slices: under SO_RCVLOWAT, POLLIN waits for more than n bytes
            wait_events(fd, POLLIN, std::min(ms_left(deadline), 10));
        else
            usleep(1000);  // some bytes are there (poll would not block); the rest are coming
    }
}

// Reads exactly n bytes (blocking socket or not), bounded.
ssize_t read_exact(int fd, void *buf, size_t n) {
    size_t done = 0;
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    while (done < n) {
        if (!(wait_events(fd, POLLIN, ms_left(deadline)) & (POLLIN | POLLHUP | POLLERR))) break;
        ssize_t got = recv(fd, static_cast<char *>(buf) + done, n - done, MSG_DONTWAIT);
        if (got == 0) break;
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            break;
        }
        done += static_cast<size_t>(got);
    }
    return static_cast<ssize_t>(done);
}

std::string read_text(int fd, size_t n) {
    std::string text(n, '\0');
    ssize_t got = read_exact(fd, text.data(), n);
    text.resize(got > 0 ? static_cast<size_t>(got) : 0);
    return text;
}

bool send_all(int fd, const void *buf, size_t n) {
    size_t done = 0;
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    while (done < n) {
        ssize_t sent =
            send(fd, static_cast<const char *>(buf) + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent > 0) {
            done += static_cast<size_t>(sent);
            continue;
        }
        if (sent < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (!wait_events(fd, POLLOUT, ms_left(deadline))) return false;
            continue;
        }
        return false;
    }
    return true;
}

bool send_text(int fd, const std::string &text) {
    return send_all(fd, text.data(), text.size());
}

// ---------------------------------------------------------------------------------------------
// Signals

std::atomic<int> g_sigpipe_count{0};
std::atomic<int> g_sigusr1_count{0};
std::atomic<int> g_sigusr2_count{0};

void count_sigpipe(int) {
    g_sigpipe_count.fetch_add(1);
}
void count_sigusr1(int) {
    g_sigusr1_count.fetch_add(1);
}
void count_sigusr2(int) {
    g_sigusr2_count.fetch_add(1);
}

void install(int sig, void (*handler)(int), bool restart) {
    struct sigaction action {};
    action.sa_handler = handler;
    action.sa_flags = restart ? SA_RESTART : 0;
    sigemptyset(&action.sa_mask);
    sigaction(sig, &action, nullptr);
}

// The state letter of thread `tid` of process `pid` ('S' while it sleeps in a blocking call,
// 'T' while stopped).
char task_state(pid_t pid, pid_t tid) {
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", static_cast<int>(pid),
                  static_cast<int>(tid));
    FILE *file = std::fopen(path, "r");
    if (!file) return '?';
    char buf[512] = {};
    size_t n = std::fread(buf, 1, sizeof(buf) - 1, file);
    std::fclose(file);
    buf[n] = '\0';
    const char *paren = std::strrchr(buf, ')');
    return paren && paren[1] == ' ' ? paren[2] : '?';
}

char thread_state(pid_t tid) {
    return task_state(getpid(), tid);
}

bool wait_thread_sleeping(pid_t tid) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    while (ms_left(deadline) > 0) {
        if (thread_state(tid) == 'S') return true;
        usleep(1000);
    }
    return false;
}

// A process cannot continue itself once stopped: a helper forked at the start (before any TCP
// socket, while this process has one thread) stops it with SIGSTOP and, once its main thread
// shows it is stopped, continues it with SIGCONT, on request.
struct Stopper {
    int command = -1;
    int done = -1;
    pid_t pid = -1;
};
Stopper g_stopper;

void start_stopper() {
    int command[2], done[2];
    if (pipe2(command, O_CLOEXEC) != 0 || pipe2(done, O_CLOEXEC) != 0) std::exit(2);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) std::exit(2);
    if (pid == 0) {
        close(command[1]);
        close(done[0]);
        char byte;
        while (read(command[0], &byte, 1) == 1) {
            kill(parent, SIGSTOP);
            const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
            while (task_state(parent, parent) != 'T' && ms_left(deadline) > 0) usleep(1000);
            kill(parent, SIGCONT);
            if (write(done[1], &byte, 1) != 1) break;
        }
        _exit(0);
    }
    close(command[0]);
    close(done[1]);
    g_stopper = {command[1], done[0], pid};
}

void end_stopper() {
    close(g_stopper.command);  // EOF: it exits
    close(g_stopper.done);
    waitpid(g_stopper.pid, nullptr, 0);
}

// SIGSTOP, then SIGCONT once the main thread is stopped. Called from a helper thread: it
// stops too, and goes on after SIGCONT.
void stop_and_continue() {
    char byte = 's';
    if (write(g_stopper.command, &byte, 1) != 1) return;
    pollfd entry{g_stopper.done, POLLIN, 0};
    if (poll(&entry, 1, kWaitMs) == 1) (void)!read(g_stopper.done, &byte, 1);
}

// How often a helper interrupts a call: once (the call must go on, restarted), or each time
// it finds the call asleep until the call returns (within kWaitMs). The shim sees an
// interruption only while the thread sleeps in the kernel, and a call that moves bytes wakes
// now and then to move more: it is asleep again within moments (docs/architecture.md,
// "Waiting and waking"). Linux's first interruption ends such a call.
enum class Times { kOnce, kUntilReturned };

bool wait_returned(const std::atomic<bool> &returned, int timeout_ms) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!returned.load() && ms_left(deadline) > 0) usleep(1000);
    return returned.load();
}

// Runs `call` on this thread while a helper thread waits until this one sleeps in it, runs
// `interrupt` (`times`), then `after(returned, tid)`, which must see that the call ends.
// Returns what the call returned, with its errno.
template <class Call, class Interrupt, class After>
long run_interrupted(Times times, Call &&call, Interrupt &&interrupt, After &&after) {
    const pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
    std::atomic<bool> returned{false};
    std::thread helper([&] {
        if (times == Times::kOnce) {
            if (wait_thread_sleeping(tid) && !returned.load()) interrupt();
        } else {
            const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
            while (!returned.load() && ms_left(deadline) > 0) {
                if (thread_state(tid) == 'S' && !returned.load()) {
                    interrupt();
                    wait_returned(returned, 100);
                } else {
                    usleep(1000);
                }
            }
        }
        after(returned, tid);
    });
    const long n = call();
    const int error = errno;
    returned = true;
    helper.join();
    errno = error;
    return n;
}

// For a call that the interruption must end: if it is still running kWaitMs later, SIGUSR2
// (a handler without SA_RESTART) ends it, and g_sigusr2_count says that it took that.
void end_if_stuck(const std::atomic<bool> &returned, pthread_t thread) {
    if (wait_returned(returned, kWaitMs)) return;
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    while (!returned.load() && ms_left(deadline) > 0) {
        pthread_kill(thread, SIGUSR2);
        wait_returned(returned, 100);
    }
}

// For a call that the interruption must not end: once it sleeps again (restarted), `unblock`.
template <class Unblock>
void after_restart(const std::atomic<bool> &returned, pid_t tid, Unblock &&unblock) {
    if (wait_thread_sleeping(tid) && !returned.load()) unblock();
    wait_returned(returned, kWaitMs);
}

// ---------------------------------------------------------------------------------------------
// Checksums and data

uint64_t fnv1a(uint64_t hash, const uint8_t *data, size_t len) {
    for (size_t i = 0; i < len; ++i) {
        hash ^= data[i];
        hash *= 1099511628211ull;
    }
    return hash;
}
constexpr uint64_t kFnvBasis = 14695981039346656037ull;

struct XorShift {
    uint64_t state;
    uint64_t next() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state;
    }
};

std::vector<uint8_t> deterministic_bytes(size_t len, uint64_t seed) {
    std::vector<uint8_t> bytes(len);
    XorShift rng{seed};
    for (auto &byte : bytes) byte = static_cast<uint8_t>(rng.next() >> 24);
    return bytes;
}

// ---------------------------------------------------------------------------------------------
// The checks, one function per behaviour.

void check_blocking_basics(const Family &family) {
    Pair pair = connected_pair(family);
    say("blocking: send=%s", rc(send(pair.client, "hello", 5, 0)).c_str());
    char buf[16] = {};
    say("blocking: recv=%s data=%s", rc(recv(pair.server, buf, sizeof(buf), 0)).c_str(), buf);
    say("blocking: reply send=%s", rc(send(pair.server, "world!", 6, 0)).c_str());
    std::memset(buf, 0, sizeof(buf));
    say("blocking: reply recv=%s data=%s", rc(read_exact(pair.client, buf, 6)).c_str(), buf);
    pair.close_both();
}

void check_nonblocking(const Family &family) {
    Pair pair = connected_pair(family);
    set_nonblocking(pair.client, true);
    char buf[16];
    say("nonblocking: recv with no data=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("nonblocking: read with no data=%s", rc(read(pair.client, buf, sizeof(buf))).c_str());
    say("nonblocking: send=%s", rc(send(pair.client, "abc", 3, 0)).c_str());
    say("nonblocking: peer got=%s", read_text(pair.server, 3).c_str());

    int lfd = listener(family);
    set_nonblocking(lfd, true);
    say("nonblocking: accept with none pending=%s", rc(accept(lfd, nullptr, nullptr)).c_str());
    int client = connect_to(family, local_port(lfd));
    say("nonblocking: listener readable after connect=%s",
        poll_names(wait_events(lfd, POLLIN)).c_str());
    int accepted = accept(lfd, nullptr, nullptr);
    say("nonblocking: accept after connect ok=%s, accepted socket nonblocking=%s",
        yes(accepted >= 0), yes(accepted >= 0 && is_nonblocking(accepted)));
    close(accepted);
    close(client);
    close(lfd);
    pair.close_both();
}

void check_nonblocking_connect(const Family &family) {
    int lfd = listener(family);
    int fd = tcp_socket(family.af, SOCK_NONBLOCK);
    Address address = loopback(family.af, local_port(lfd));
    say("nonblocking connect: connect=%s", rc(connect(fd, address.get(), address.len)).c_str());
    say("nonblocking connect: poll=%s", poll_names(wait_events(fd, POLLOUT)).c_str());
    say("nonblocking connect: poll in|out=%s",
        poll_names(wait_events(fd, POLLIN | POLLOUT, 0)).c_str());
    say("nonblocking connect: SO_ERROR=%d", get_int(fd, SOL_SOCKET, SO_ERROR));
    // The first connect() after the outcome reports it (0); only the next one is EISCONN.
    say("nonblocking connect: connect again=%s",
        rc(connect(fd, address.get(), address.len)).c_str());
    say("nonblocking connect: and again=%s", rc(connect(fd, address.get(), address.len)).c_str());
    int accepted = accept(lfd, nullptr, nullptr);
    say("nonblocking connect: accepted=%s", yes(accepted >= 0));
    say("nonblocking connect: send=%s", rc(send(fd, "x", 1, 0)).c_str());
    say("nonblocking connect: peer got=%s", read_text(accepted, 1).c_str());
    close(accepted);
    close(fd);
    close(lfd);
}

void check_connect_refused(const Family &family) {
    ClosedPort closed(family);
    Address address = loopback(family.af, closed.port);
    int fd = tcp_socket(family.af);
    say("refused: blocking connect=%s", rc(connect(fd, address.get(), address.len)).c_str());
    say("refused: SO_ERROR after blocking connect=%d", get_int(fd, SOL_SOCKET, SO_ERROR));
    close(fd);

    fd = tcp_socket(family.af, SOCK_NONBLOCK);
    say("refused: nonblocking connect=%s", rc(connect(fd, address.get(), address.len)).c_str());
    // Wait for the outcome (POLLERR), then look at the whole mask once it has settled.
    wait_bits(fd, POLLIN | POLLOUT, POLLERR | POLLHUP);
    say("refused: poll=%s", poll_names(wait_events(fd, POLLIN | POLLOUT, 0)).c_str());
    int error = get_int(fd, SOL_SOCKET, SO_ERROR);
    say("refused: SO_ERROR=%s",
        error > 0 ? err_name(error).c_str() : std::to_string(error).c_str());
    say("refused: SO_ERROR again=%d", get_int(fd, SOL_SOCKET, SO_ERROR));
    say("refused: poll after SO_ERROR=%s",
        poll_names(wait_events(fd, POLLIN | POLLOUT, 0)).c_str());
    close(fd);

    // The error also arrives through a recv() on the failed socket, once.
    fd = tcp_socket(family.af, SOCK_NONBLOCK);
    connect(fd, address.get(), address.len);
    wait_bits(fd, POLLIN | POLLOUT, POLLERR);
    char byte;
    say("refused: recv after failed connect=%s", rc(recv(fd, &byte, 1, 0)).c_str());
    say("refused: recv again=%s", rc(recv(fd, &byte, 1, 0)).c_str());
    close(fd);
}

void check_bind(const Family &family) {
    int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    Address address = loopback(family.af, port);

    int fd = tcp_socket(family.af);
    say("bind: same port as a listener=%s", rc(bind(fd, address.get(), address.len)).c_str());
    close(fd);
    fd = tcp_socket(family.af);
    set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    say("bind: same port as a listener with SO_REUSEADDR=%s",
        rc(bind(fd, address.get(), address.len)).c_str());
    close(fd);
    close(lfd);

    fd = tcp_socket(family.af);
    Address any_port = loopback(family.af, 0);
    const std::string bound = rc(bind(fd, any_port.get(), any_port.len));
    say("bind: port 0=%s, port chosen=%s", bound.c_str(), yes(local_port(fd) != 0));
    say("bind: again on a bound socket=%s", rc(bind(fd, any_port.get(), any_port.len)).c_str());
    close(fd);

    // Two sockets with SO_REUSEPORT share a listening port.
    int first = tcp_socket(family.af), second = tcp_socket(family.af);
    set_int(first, SOL_SOCKET, SO_REUSEPORT, 1);
    set_int(second, SOL_SOCKET, SO_REUSEPORT, 1);
    bind(first, any_port.get(), any_port.len);
    listen(first, 4);
    Address shared = loopback(family.af, local_port(first));
    const std::string second_bind = rc(bind(second, shared.get(), shared.len));
    say("bind: SO_REUSEPORT second bind=%s listen=%s", second_bind.c_str(),
        rc(listen(second, 4)).c_str());
    close(first);
    close(second);

    // SO_REUSEADDR: rebinding a port whose server side closed first (TIME_WAIT).
    lfd = tcp_socket(family.af);
    set_int(lfd, SOL_SOCKET, SO_REUSEADDR, 1);
    bind(lfd, any_port.get(), any_port.len);
    listen(lfd, 4);
    Address reuse = loopback(family.af, local_port(lfd));
    int client = connect_to(family, local_port(lfd));
    int accepted = accept(lfd, nullptr, nullptr);
    close(lfd);
    close(accepted);  // the server closes first: its side ends in TIME_WAIT
    char byte;
    wait_events(client, POLLIN);
    say("bind: client sees the server's FIN, recv=%s", rc(recv(client, &byte, 1, 0)).c_str());
    close(client);
    fd = tcp_socket(family.af);
    say("bind: port in TIME_WAIT without SO_REUSEADDR=%s",
        rc(bind(fd, reuse.get(), reuse.len)).c_str());
    close(fd);
    fd = tcp_socket(family.af);
    set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    const std::string rebind = rc(bind(fd, reuse.get(), reuse.len));
    say("bind: port in TIME_WAIT with SO_REUSEADDR=%s listen=%s", rebind.c_str(),
        rc(listen(fd, 4)).c_str());
    close(fd);
}

void check_fill_and_drain(const Family &family) {
    Pair pair = connected_pair(family);
    set_nonblocking(pair.client, true);
    std::vector<uint8_t> chunk(16384);
    uint64_t sent = 0, sent_hash = kFnvBasis;
    bool eagain = false;
    ssize_t n = 0;
    while (sent < (256u << 20)) {
        for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<uint8_t>((sent + i) % 251);
        n = send(pair.client, chunk.data(), chunk.size(), 0);
        if (n < 0) {
            eagain = errno == EAGAIN;
            break;
        }
        sent_hash = fnv1a(sent_hash, chunk.data(), static_cast<size_t>(n));
        sent += static_cast<uint64_t>(n);
    }
    say("fill: a non-blocking sender with a reader that does not read reaches EAGAIN=%s",
        yes(eagain));
    uint64_t received = 0, received_hash = kFnvBasis;
    std::vector<uint8_t> buf(65536);
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 4);
    while (received < sent && ms_left(deadline) > 0) {
        if (!wait_events(pair.server, POLLIN, ms_left(deadline))) break;
        ssize_t got = recv(pair.server, buf.data(), buf.size(), MSG_DONTWAIT);
        if (got <= 0) continue;
        received_hash = fnv1a(received_hash, buf.data(), static_cast<size_t>(got));
        received += static_cast<uint64_t>(got);
    }
    say("fill: the reader drains every byte sent=%s, content intact=%s", yes(received == sent),
        yes(received_hash == sent_hash));
    say("fill: sender writable again=%s", poll_names(wait_events(pair.client, POLLOUT)).c_str());
    pair.close_both();
}

void check_partial_reads(const Family &family) {
    Pair pair = connected_pair(family);
    std::string hundred(100, 'p');
    send_text(pair.client, hundred);
    wait_available(pair.server, 100);
    char buf[4096];
    say("partial read: recv(4096) with 100 available=%s",
        rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());
    send_text(pair.client, hundred);
    wait_available(pair.server, 100);
    say("partial read: recv(30)=%s", rc(recv(pair.server, buf, 30, 0)).c_str());
    say("partial read: then recv(4096)=%s", rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());
    say("partial read: recv(0)=%s", rc(recv(pair.server, buf, 0, MSG_DONTWAIT)).c_str());
    pair.close_both();
}

void check_msg_flags(const Family &family) {
    Pair pair = connected_pair(family);
    char buf[64] = {};
    send_text(pair.client, "abcdef");
    wait_available(pair.server, 6);
    ssize_t n = recv(pair.server, buf, 3, MSG_PEEK);
    say("MSG_PEEK: peek 3=%s data=%.3s", rc(n).c_str(), buf);
    n = recv(pair.server, buf, sizeof(buf), MSG_PEEK);
    say("MSG_PEEK: peek all=%s data=%.6s", rc(n).c_str(), buf);
    std::memset(buf, 0, sizeof(buf));
    n = recv(pair.server, buf, sizeof(buf), 0);
    say("MSG_PEEK: then recv=%s data=%.6s", rc(n).c_str(), buf);

    say("MSG_DONTWAIT: recv on a blocking socket with no data=%s",
        rc(recv(pair.server, buf, sizeof(buf), MSG_DONTWAIT)).c_str());
    say("MSG_DONTWAIT: socket still blocking=%s", yes(!is_nonblocking(pair.server)));
    say("MSG_DONTWAIT: send=%s", rc(send(pair.client, "dw", 2, MSG_DONTWAIT)).c_str());
    say("MSG_DONTWAIT: peer got=%s", read_text(pair.server, 2).c_str());

    // MSG_WAITALL: four pieces arrive 20 ms apart; one recv returns them all.
    std::thread sender([fd = pair.client] {
        std::string piece(250, 'w');
        for (int i = 0; i < 4; ++i) {
            send_text(fd, piece);
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    });
    std::vector<char> big(1000);
    n = recv(pair.server, big.data(), big.size(), MSG_WAITALL);
    sender.join();
    say("MSG_WAITALL: recv(1000) of 4 x 250 bytes sent apart=%s", rc(n).c_str());

    // MSG_WAITALL stops early at EOF.
    send_text(pair.client, "0123456789");
    shutdown(pair.client, SHUT_WR);
    n = recv(pair.server, big.data(), 100, MSG_WAITALL);
    say("MSG_WAITALL: recv(100) when the peer sends 10 then FIN=%s", rc(n).c_str());
    pair.close_both();
}

void check_sigpipe(const Family &family) {
    Pair pair = connected_pair(family);
    shutdown(pair.client, SHUT_WR);
    const int before = g_sigpipe_count.load();
    // The result first, then the count: say()'s arguments are evaluated in no fixed order.
    auto report = [&](const char *call, long result) {
        const std::string text = rc(result);
        say("SIGPIPE: %s after SHUT_WR=%s, SIGPIPEs=%d", call, text.c_str(),
            g_sigpipe_count.load() - before);
    };
    report("send", send(pair.client, "x", 1, 0));
    report("send(MSG_NOSIGNAL)", send(pair.client, "x", 1, MSG_NOSIGNAL));
    report("write", write(pair.client, "x", 1));
    iovec iov{const_cast<char *>("x"), 1};
    report("writev", writev(pair.client, &iov, 1));
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    report("sendmsg(MSG_NOSIGNAL)", sendmsg(pair.client, &msg, MSG_NOSIGNAL));
    report("sendmsg", sendmsg(pair.client, &msg, 0));
    char byte;
    say("SIGPIPE: the peer reads EOF=%s", rc(recv(pair.server, &byte, 1, 0)).c_str());
    pair.close_both();
}

void check_eof(const Family &family) {
    Pair pair = connected_pair(family);
    send_text(pair.server, "last");
    close(pair.server);
    pair.server = -1;
    char buf[16] = {};
    wait_available(pair.client, 4);
    say("EOF: data before the FIN=%s data=%.4s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str(),
        buf);
    say("EOF: recv after FIN=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("EOF: recv again=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("EOF: read=%s", rc(read(pair.client, buf, sizeof(buf))).c_str());
    say("EOF: poll=%s", poll_names(wait_events(pair.client, POLLIN | POLLRDHUP, 0)).c_str());
    pair.close_both();
}

void check_reset(const Family &family) {
    Pair pair = connected_pair(family);
    reset_close(pair.server);  // SO_LINGER {1, 0}: close sends RST
    pair.server = -1;
    wait_bits(pair.client, POLLIN, POLLHUP);
    say("RST: poll=%s",
        poll_names(wait_events(pair.client, POLLIN | POLLOUT | POLLRDHUP, 0)).c_str());
    char buf[16];
    say("RST: recv=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("RST: recv again=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("RST: poll after the error was reported=%s",
        poll_names(wait_events(pair.client, POLLIN | POLLOUT | POLLRDHUP, 0)).c_str());
    say("RST: send=%s", rc(send(pair.client, "x", 1, MSG_NOSIGNAL)).c_str());
    say("RST: SO_ERROR=%d", get_int(pair.client, SOL_SOCKET, SO_ERROR));
    pair.close_both();

    // The error goes to the first call that looks: here send, not recv.
    pair = connected_pair(family);
    reset_close(pair.server);
    pair.server = -1;
    wait_bits(pair.client, POLLIN, POLLHUP);
    say("RST: send first=%s", rc(send(pair.client, "x", 1, MSG_NOSIGNAL)).c_str());
    say("RST: then recv=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    pair.close_both();

    // A FIN, then an RST: recv keeps reporting the EOF (tcp_recvmsg checks SOCK_DONE before
    // sk_err) and the error goes to the next send.
    pair = connected_pair(family);
    shutdown(pair.server, SHUT_WR);
    wait_bits(pair.client, POLLIN | POLLRDHUP, POLLRDHUP);
    reset_close(pair.server);
    pair.server = -1;
    wait_bits(pair.client, POLLIN, POLLHUP);
    say("FIN then RST: recv=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("FIN then RST: send=%s", rc(send(pair.client, "x", 1, MSG_NOSIGNAL)).c_str());
    say("FIN then RST: recv after send=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    say("FIN then RST: SO_ERROR=%d", get_int(pair.client, SOL_SOCKET, SO_ERROR));
    pair.close_both();

    // Closing with unread data in the receive queue also resets the connection (RFC 2525).
    pair = connected_pair(family);
    send_text(pair.client, "unread");
    wait_available(pair.server, 6);
    close(pair.server);
    pair.server = -1;
    wait_bits(pair.client, POLLIN, POLLHUP);
    say("RST: after the peer closed with unread data, recv=%s",
        rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());
    pair.close_both();

    // SO_LINGER round trip.
    pair = connected_pair(family);
    linger option{1, 5}, got{};
    socklen_t len = sizeof(got);
    setsockopt(pair.client, SOL_SOCKET, SO_LINGER, &option, sizeof(option));
    getsockopt(pair.client, SOL_SOCKET, SO_LINGER, &got, &len);
    say("SO_LINGER: set {1,5} reads back {%d,%d} len=%u", got.l_onoff, got.l_linger, len);
    pair.close_both();
}

void check_half_close(const Family &family) {
    Pair pair = connected_pair(family);
    send_text(pair.client, "request");
    say("half-close: shutdown(SHUT_WR)=%s", rc(shutdown(pair.client, SHUT_WR)).c_str());
    say("half-close: peer poll=%s",
        poll_names(wait_bits(pair.server, POLLIN | POLLRDHUP, POLLRDHUP)).c_str());
    const std::string request = read_text(pair.server, 7);
    char rest[8];
    say("half-close: peer reads=%s then recv=%s", request.c_str(),
        rc(recv(pair.server, rest, sizeof(rest), 0)).c_str());
    say("half-close: peer sends back=%s", rc(send(pair.server, "response", 8, 0)).c_str());
    say("half-close: the half-closed side still reads=%s", read_text(pair.client, 8).c_str());
    say("half-close: poll on the half-closed side=%s",
        poll_names(wait_events(pair.client, POLLIN | POLLOUT | POLLRDHUP, 0)).c_str());
    say("half-close: shutdown(SHUT_WR) again=%s", rc(shutdown(pair.client, SHUT_WR)).c_str());
    close(pair.server);
    pair.server = -1;
    char byte;
    wait_events(pair.client, POLLIN);
    say("half-close: EOF after the peer closes=%s", rc(recv(pair.client, &byte, 1, 0)).c_str());
    pair.close_both();

    pair = connected_pair(family);
    say("half-close: shutdown(SHUT_RDWR)=%s", rc(shutdown(pair.client, SHUT_RDWR)).c_str());
    wait_events(pair.server, POLLIN);
    say("half-close: peer of SHUT_RDWR reads=%s", rc(recv(pair.server, &byte, 1, 0)).c_str());
    say("half-close: recv after own SHUT_RDWR=%s", rc(recv(pair.client, &byte, 1, 0)).c_str());
    say("half-close: shutdown(99)=%s", rc(shutdown(pair.client, 99)).c_str());
    pair.close_both();
}

// shutdown() of a connected socket answers without waiting for the engine: the bytes queued
// before it must still all arrive, and only then EOF; states where Linux may refuse are asked.
void check_shutdown_after_data(const Family &family) {
    constexpr size_t kBytes = 1 << 20;
    std::vector<uint8_t> data(kBytes);
    XorShift random{0x5eed5eedull};
    for (auto &byte : data) byte = static_cast<uint8_t>(random.next());
    for (int how : {SHUT_WR, SHUT_RDWR}) {
        Pair pair = connected_pair(family);
        uint64_t total = 0, hash = kFnvBasis;
        bool eof = false;
        std::thread reader([&, fd = pair.server] {
            std::vector<uint8_t> buf(65536);
            const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 6);
            while (ms_left(deadline) > 0) {
                if (!wait_events(fd, POLLIN, ms_left(deadline))) break;
                ssize_t n = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
                if (n == 0) {
                    eof = true;
                    break;
                }
                if (n < 0) continue;
                hash = fnv1a(hash, buf.data(), static_cast<size_t>(n));
                total += static_cast<uint64_t>(n);
            }
        });
        const bool sent = send_all(pair.client, data.data(), data.size());
        const std::string shut = rc(shutdown(pair.client, how));
        reader.join();
        say("shutdown after 1 MB (%s): sent all=%s shutdown=%s peer got bytes=%llu checksum %s "
            "then EOF=%s",
            how == SHUT_WR ? "SHUT_WR" : "SHUT_RDWR", yes(sent), shut.c_str(),
            static_cast<unsigned long long>(total),
            hash == fnv1a(kFnvBasis, data.data(), data.size()) ? "ok" : "BAD", yes(eof));
        pair.close_both();
    }
    // After the peer's FIN (CLOSE_WAIT): still connected, so 0.
    Pair pair = connected_pair(family);
    close(pair.server);
    pair.server = -1;
    wait_bits(pair.client, POLLIN | POLLRDHUP, POLLRDHUP);
    const std::string after_fin_wr = rc(shutdown(pair.client, SHUT_WR));
    // Both FINs through once the peer acknowledged ours (TCP_CLOSE): on loopback at once,
    // unless the peer's socket was locked by its own close on another core at that moment
    // (then a moment later, on Linux as with an engine whose workers serve the two ends).
    wait_tcp_state(pair.client, TCP_CLOSE);
    const std::string after_fin_rd = rc(shutdown(pair.client, SHUT_RD));
    say("shutdown after the peer's FIN: SHUT_WR=%s SHUT_RD=%s", after_fin_wr.c_str(),
        after_fin_rd.c_str());
    pair.close_both();
    // After the peer's RST: the kernel socket is closed, so ENOTCONN.
    pair = connected_pair(family);
    reset_close(pair.server);
    pair.server = -1;
    wait_bits(pair.client, POLLIN, POLLERR);
    const std::string after_reset = rc(shutdown(pair.client, SHUT_WR));
    say("shutdown after the peer's RST: SHUT_WR=%s", after_reset.c_str());
    pair.close_both();
}

void check_names(const Family &family) {
    int fresh = tcp_socket(family.af);
    Address address = local_of(fresh);
    say("names: unbound getsockname family=%s host=%s port=%u len=%u",
        family_name(address.storage.ss_family).c_str(), host_of(address.storage).c_str(),
        port_of(address.storage), address.len);
    Address none;
    none.len = sizeof(none.storage);
    say("names: unconnected getpeername=%s", rc(getpeername(fresh, none.get(), &none.len)).c_str());
    close(fresh);

    int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    Address listen_address = local_of(lfd);
    say("names: listener family=%s host=%s port chosen=%s",
        family_name(listen_address.storage.ss_family).c_str(),
        host_of(listen_address.storage).c_str(), yes(port != 0));
    int client = connect_to(family, port);
    Address peer{};
    peer.len = sizeof(peer.storage);
    int server = accept(lfd, peer.get(), &peer.len);
    Address client_local = local_of(client), client_peer = peer_of(client);
    Address server_local = local_of(server), server_peer = peer_of(server);
    say("names: client local family=%s host=%s ephemeral port=%s len=%u",
        family_name(client_local.storage.ss_family).c_str(), host_of(client_local.storage).c_str(),
        yes(port_of(client_local.storage) != 0), client_local.len);
    say("names: client peer host=%s port is the listener's=%s",
        host_of(client_peer.storage).c_str(), yes(port_of(client_peer.storage) == port));
    say("names: accepted local host=%s port is the listener's=%s",
        host_of(server_local.storage).c_str(), yes(port_of(server_local.storage) == port));
    say("names: accepted peer host=%s port is the client's=%s, accept's address agrees=%s",
        host_of(server_peer.storage).c_str(),
        yes(port_of(server_peer.storage) == port_of(client_local.storage)),
        yes(peer.len == server_peer.len && port_of(peer.storage) == port_of(server_peer.storage)));

    // A buffer too small for the address: truncated, and the length says the full size.
    sockaddr_storage small{};
    socklen_t small_len = 4;
    const std::string truncated =
        rc(getsockname(client, reinterpret_cast<sockaddr *>(&small), &small_len));
    say("names: getsockname into 4 bytes=%s len=%u", truncated.c_str(), small_len);
    close(server);
    close(client);
    close(lfd);
}

void check_timeouts(const Family &family) {
    Pair pair = connected_pair(family);
    timeval timeout{0, 100'000}, got{};
    socklen_t len = sizeof(got);
    setsockopt(pair.client, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    getsockopt(pair.client, SOL_SOCKET, SO_RCVTIMEO, &got, &len);
    say("SO_RCVTIMEO: reads back %ld.%06ld", static_cast<long>(got.tv_sec),
        static_cast<long>(got.tv_usec));
    char buf[16];
    auto start = Clock::now();
    ssize_t n = recv(pair.client, buf, sizeof(buf), 0);
    auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
    say("SO_RCVTIMEO: recv=%s after >= 90 ms=%s", rc(n).c_str(), yes(elapsed.count() >= 90));
    send_text(pair.server, "t");
    say("SO_RCVTIMEO: recv with data=%s", rc(recv(pair.client, buf, sizeof(buf), 0)).c_str());

    // SO_SNDTIMEO: fill until nothing more is taken, then a blocking send times out.
    setsockopt(pair.client, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    std::vector<char> chunk(65536, 's');
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 4);
    for (bool took_more = true; took_more && ms_left(deadline) > 0;) {
        took_more = false;
        while (send(pair.client, chunk.data(), chunk.size(), MSG_DONTWAIT) > 0) took_more = true;
        if (wait_events(pair.client, POLLOUT, 200) & POLLOUT) took_more = true;
    }
    start = Clock::now();
    n = send(pair.client, chunk.data(), chunk.size(), 0);
    elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
    say("SO_SNDTIMEO: send on a full socket=%s after >= 90 ms=%s",
        n < 0 ? rc(n).c_str() : "partial", yes(elapsed.count() >= 90));
    pair.close_both();
}

void check_eintr(const Family &family) {
    const pid_t main_tid = static_cast<pid_t>(syscall(SYS_gettid));
    const pthread_t main_thread = pthread_self();
    Pair pair = connected_pair(family);
    char buf[16] = {};

    // Without SA_RESTART a signal ends the blocking recv with EINTR.
    install(SIGUSR1, count_sigusr1, false);
    g_sigusr1_count = 0;
    std::atomic<bool> returned{false};
    std::thread signaller([&] {
        const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
        while (!returned.load() && ms_left(deadline) > 0) {
            if (wait_thread_sleeping(main_tid)) pthread_kill(main_thread, SIGUSR1);
            for (int i = 0; i < 100 && !returned.load(); ++i) usleep(1000);
        }
        if (!returned.load()) send_text(pair.server, "unblock");  // never leave recv hanging
    });
    ssize_t n = recv(pair.client, buf, sizeof(buf), 0);
    returned = true;
    signaller.join();
    say("EINTR: blocking recv interrupted by a handler without SA_RESTART=%s, handler ran=%s",
        rc(n).c_str(), yes(g_sigusr1_count.load() > 0));

    // With SA_RESTART the call goes on and gets the data sent after the signal.
    install(SIGUSR1, count_sigusr1, true);
    g_sigusr1_count = 0;
    std::thread late_sender([&] {
        if (wait_thread_sleeping(main_tid)) pthread_kill(main_thread, SIGUSR1);
        const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
        while (g_sigusr1_count.load() == 0 && ms_left(deadline) > 0) usleep(1000);
        wait_thread_sleeping(main_tid);  // back in the restarted call
        send_text(pair.server, "late");
    });
    std::memset(buf, 0, sizeof(buf));
    n = recv(pair.client, buf, sizeof(buf), 0);
    late_sender.join();
    say("EINTR: with SA_RESTART recv=%s data=%s, handler ran=%s", rc(n).c_str(), buf,
        yes(g_sigusr1_count.load() > 0));
    install(SIGUSR1, SIG_DFL, false);
    pair.close_both();
}

// What the peer of a connection receives until EOF (bounded), in bytes.
size_t count_until_eof(int fd) {
    std::vector<char> buf(1 << 16);
    size_t total = 0;
    const auto deadline = Clock::now() + std::chrono::milliseconds(4 * kWaitMs);
    while (ms_left(deadline) > 0) {
        if (!(wait_events(fd, POLLIN, ms_left(deadline)) & (POLLIN | POLLHUP | POLLERR))) break;
        const ssize_t got = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
        if (got == 0) break;
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            break;
        }
        total += static_cast<size_t>(got);
    }
    return total;
}

// Reads what is there on `fd` until `returned` (bounded), in bytes.
size_t drain_until(int fd, const std::atomic<bool> &returned) {
    std::vector<char> buf(1 << 16);
    size_t total = 0;
    const auto deadline = Clock::now() + std::chrono::milliseconds(4 * kWaitMs);
    while (!returned.load() && ms_left(deadline) > 0) {
        const ssize_t got = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
        if (got > 0)
            total += static_cast<size_t>(got);
        else if (got == 0)
            break;
        else
            wait_events(fd, POLLIN, 10);
    }
    return total;
}

// Queues bytes on `fd` until the connection takes no more: send() says EAGAIN for every size
// down to one byte, and no room appears within 200 ms.
void fill_until_full(int fd) {
    std::vector<char> chunk(65536, 'f');
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 4);
    for (bool took_more = true; took_more && ms_left(deadline) > 0;) {
        took_more = false;
        for (size_t size : {size_t{65536}, size_t{4096}, size_t{256}, size_t{16}, size_t{1}})
            while (send(fd, chunk.data(), size, MSG_DONTWAIT | MSG_NOSIGNAL) > 0) took_more = true;
        if (wait_events(fd, POLLOUT, 200) & POLLOUT) took_more = true;
    }
}

std::string send_outcome(long n, size_t asked) {
    if (n < 0) return rc(n);
    return static_cast<size_t>(n) == asked ? "all" : n > 0 ? "partial" : "0";
}

// A blocking send of more than the connection takes, interrupted while it waits for room: Linux
// returns the count queued so far whatever the handler's SA_RESTART and SO_SNDTIMEO say
// (sk_stream_wait_memory(), then "copied" wins), and EINTR only when nothing was queued, where
// SA_RESTART restarts the call unless SO_SNDTIMEO is set.
void check_interrupted_send(const Family &family) {
    const pthread_t self = pthread_self();
    const size_t big = 64u << 20;  // far more than both ends' buffers (and the rings) hold
    static const std::vector<char> data(big, 'b');
    install(SIGUSR2, count_sigusr2, false);
    struct Case {
        const char *name;
        bool restart;
        bool sndtimeo;
    };
    for (const Case &c : {Case{"handler with SA_RESTART", true, false},
                          Case{"handler without SA_RESTART", false, false},
                          Case{"handler with SA_RESTART, SO_SNDTIMEO 60 s", true, true}}) {
        install(SIGUSR1, count_sigusr1, c.restart);
        Pair pair = connected_pair(family);
        timeval minute{60, 0};
        if (c.sndtimeo) setsockopt(pair.client, SOL_SOCKET, SO_SNDTIMEO, &minute, sizeof(minute));
        g_sigusr1_count = 0;
        size_t drained = 0;
        // The peer reads only if the call goes on for kWaitMs: then it completes ("all").
        const long n = run_interrupted(
            Times::kUntilReturned,
            [&] { return static_cast<long>(send(pair.client, data.data(), big, 0)); },
            [&] { pthread_kill(self, SIGUSR1); },
            [&](const std::atomic<bool> &returned, pid_t) {
                if (!wait_returned(returned, kWaitMs)) drained = drain_until(pair.server, returned);
            });
        const int error = errno;
        shutdown(pair.client, SHUT_WR);
        const size_t received = drained + count_until_eof(pair.server);
        errno = error;
        say("interrupted send of 64 MiB, %s: send=%s, the peer gets the bytes it counted=%s, "
            "handler ran=%s",
            c.name, send_outcome(n, big).c_str(), yes(n >= 0 && received == static_cast<size_t>(n)),
            yes(g_sigusr1_count.load() > 0));
        pair.close_both();
    }

    // Nothing queued yet: a one-byte send on a connection that takes nothing more.
    for (const Case &c : {Case{"handler with SA_RESTART", true, false},
                          Case{"handler without SA_RESTART", false, false},
                          Case{"handler with SA_RESTART, SO_SNDTIMEO 60 s", true, true}}) {
        install(SIGUSR1, count_sigusr1, c.restart);
        Pair pair = connected_pair(family);
        timeval minute{60, 0};
        if (c.sndtimeo) setsockopt(pair.client, SOL_SOCKET, SO_SNDTIMEO, &minute, sizeof(minute));
        long n = 0;
        // A send that found room after all did not wait: fill again (a few times at most).
        for (int attempt = 0; attempt < 5; ++attempt) {
            fill_until_full(pair.client);
            g_sigusr1_count = 0;
            g_sigusr2_count = 0;
            n = run_interrupted(
                c.restart && !c.sndtimeo ? Times::kOnce : Times::kUntilReturned,
                [&] { return static_cast<long>(send(pair.client, "x", 1, 0)); },
                [&] { pthread_kill(self, SIGUSR1); },
                [&](const std::atomic<bool> &returned, pid_t tid) {
                    if (!c.restart || c.sndtimeo) return end_if_stuck(returned, self);
                    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
                    while (g_sigusr1_count.load() == 0 && !returned.load() && ms_left(deadline) > 0)
                        usleep(1000);
                    after_restart(returned, tid, [&] { drain_until(pair.server, returned); });
                });
            if (g_sigusr1_count.load() > 0) break;
        }
        say("interrupted one-byte send with nothing queued, %s: send=%s, handler ran=%s, "
            "needed another signal=%s",
            c.name, rc(n).c_str(), yes(g_sigusr1_count.load() > 0),
            yes(g_sigusr2_count.load() > 0));
        pair.close_both();
    }
    install(SIGUSR1, SIG_DFL, false);
    install(SIGUSR2, SIG_DFL, false);
}

// A process stopped (SIGSTOP) and continued (SIGCONT), with no handler for either: Linux
// restarts most sleeping calls unseen, but not epoll_wait() and not socket calls under
// SO_RCVTIMEO/SO_SNDTIMEO (EINTR), and a call that has moved bytes returns their count
// (signal(7), "Interruption of system calls and library functions by stop signals").
void check_stop_and_continue(const Family &family) {
    const pthread_t self = pthread_self();
    install(SIGUSR2, count_sigusr2, false);
    Pair pair = connected_pair(family);
    char buf[16] = {};
    auto stuck = [&](const std::atomic<bool> &returned, pid_t) { end_if_stuck(returned, self); };
    auto report = [&](const char *what, long n) {
        say("stop and SIGCONT: %s=%s, needed another signal=%s", what, rc(n).c_str(),
            yes(g_sigusr2_count.load() > 0));
        g_sigusr2_count = 0;
    };
    g_sigusr2_count = 0;

    long n = run_interrupted(
        Times::kOnce, [&] { return static_cast<long>(recv(pair.client, buf, sizeof(buf), 0)); },
        stop_and_continue,
        [&](const std::atomic<bool> &returned, pid_t tid) {
            after_restart(returned, tid, [&] { send_text(pair.server, "r"); });
        });
    report("blocking recv (data sent after the restart)", n);

    timeval minute{60, 0}, zero{0, 0};
    setsockopt(pair.client, SOL_SOCKET, SO_RCVTIMEO, &minute, sizeof(minute));
    n = run_interrupted(
        Times::kUntilReturned,
        [&] { return static_cast<long>(recv(pair.client, buf, sizeof(buf), 0)); },
        stop_and_continue, stuck);
    report("recv under SO_RCVTIMEO 60 s", n);
    setsockopt(pair.client, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof(zero));

    send_text(pair.server, "ab");
    wait_available(pair.client, 2);
    n = run_interrupted(
        Times::kUntilReturned,
        [&] { return static_cast<long>(recv(pair.client, buf, sizeof(buf), MSG_WAITALL)); },
        stop_and_continue, stuck);
    report("recv(MSG_WAITALL) of 16 with 2 bytes in", n);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_event event{};
    event.events = EPOLLIN;
    epoll_ctl(ep, EPOLL_CTL_ADD, pair.client, &event);
    n = run_interrupted(
        Times::kUntilReturned, [&] { return static_cast<long>(epoll_wait(ep, &event, 1, -1)); },
        stop_and_continue, stuck);
    report("epoll_wait(-1) on an idle socket", n);
    n = run_interrupted(
        Times::kUntilReturned, [&] { return static_cast<long>(epoll_wait(ep, &event, 1, 60'000)); },
        stop_and_continue, stuck);
    report("epoll_wait(60 s) on an idle socket", n);
    // An epoll fd that holds an offloaded socket is one of the shim's entries, not a socket:
    // a byte call on it is the kernel's (EINVAL), not one retried through the shim.
    char none[1] = {0};
    say("read() of an epoll fd with a socket in it=%s", rc(read(ep, none, sizeof(none))).c_str());
    say("write() to it=%s", rc(write(ep, none, sizeof(none))).c_str());
    close(ep);

    pollfd entry{pair.client, POLLIN, 0};
    n = run_interrupted(
        Times::kOnce, [&] { return static_cast<long>(poll(&entry, 1, -1)); }, stop_and_continue,
        [&](const std::atomic<bool> &returned, pid_t tid) {
            after_restart(returned, tid, [&] { send_text(pair.server, "p"); });
        });
    report("poll(-1) (data sent after the restart)", n);
    recv(pair.client, buf, sizeof(buf), MSG_DONTWAIT);

    const int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    int late = -1;
    n = run_interrupted(
        Times::kOnce, [&] { return static_cast<long>(accept(lfd, nullptr, nullptr)); },
        stop_and_continue,
        [&](const std::atomic<bool> &returned, pid_t tid) {
            after_restart(returned, tid, [&] { late = connect_to(family, port); });
        });
    say("stop and SIGCONT: blocking accept (a connection made after the restart)=%s",
        n >= 0 ? "a connection" : rc(n).c_str());
    if (n >= 0) close(static_cast<int>(n));
    if (late >= 0) close(late);
    setsockopt(lfd, SOL_SOCKET, SO_RCVTIMEO, &minute, sizeof(minute));
    n = run_interrupted(
        Times::kUntilReturned, [&] { return static_cast<long>(accept(lfd, nullptr, nullptr)); },
        stop_and_continue, stuck);
    report("accept under SO_RCVTIMEO 60 s", n);
    close(lfd);
    pair.close_both();

    // Sends: bytes queued make the call return their count; with none, a restart, unless
    // SO_SNDTIMEO is set.
    const size_t big = 64u << 20;
    static const std::vector<char> data(big, 'c');
    pair = connected_pair(family);
    size_t drained = 0;
    n = run_interrupted(
        Times::kUntilReturned,
        [&] { return static_cast<long>(send(pair.client, data.data(), big, 0)); },
        stop_and_continue,
        [&](const std::atomic<bool> &returned, pid_t) {
            if (!wait_returned(returned, kWaitMs)) drained = drain_until(pair.server, returned);
        });
    shutdown(pair.client, SHUT_WR);
    const size_t received = drained + count_until_eof(pair.server);
    say("stop and SIGCONT: send of 64 MiB=%s, the peer gets the bytes it counted=%s",
        send_outcome(n, big).c_str(), yes(n >= 0 && received == static_cast<size_t>(n)));
    pair.close_both();

    for (bool sndtimeo : {false, true}) {
        pair = connected_pair(family);
        if (sndtimeo) setsockopt(pair.client, SOL_SOCKET, SO_SNDTIMEO, &minute, sizeof(minute));
        std::atomic<bool> stopped{false};
        for (int attempt = 0; attempt < 5 && !stopped.load(); ++attempt) {
            fill_until_full(pair.client);
            g_sigusr2_count = 0;
            n = run_interrupted(
                sndtimeo ? Times::kUntilReturned : Times::kOnce,
                [&] { return static_cast<long>(send(pair.client, "x", 1, 0)); },
                [&] {
                    stop_and_continue();
                    stopped = true;
                },
                [&](const std::atomic<bool> &returned, pid_t tid) {
                    if (!stopped.load()) return;
                    if (sndtimeo) return end_if_stuck(returned, self);
                    after_restart(returned, tid, [&] { drain_until(pair.server, returned); });
                });
        }
        report(sndtimeo ? "one-byte send with nothing queued, SO_SNDTIMEO 60 s"
                        : "one-byte send with nothing queued (the peer reads after the restart)",
               n);
        pair.close_both();
    }
    install(SIGUSR2, SIG_DFL, false);
}

void check_options(const Family &family) {
    Pair pair = connected_pair(family);
    const int fd = pair.client;
    struct IntOption {
        const char *name;
        int level, optname, value;
    };
    const IntOption options[] = {
        {"SO_REUSEADDR", SOL_SOCKET, SO_REUSEADDR, 1},
        {"SO_REUSEPORT", SOL_SOCKET, SO_REUSEPORT, 1},
        {"SO_KEEPALIVE", SOL_SOCKET, SO_KEEPALIVE, 1},
        {"TCP_NODELAY", IPPROTO_TCP, TCP_NODELAY, 1},
        {"TCP_KEEPIDLE", IPPROTO_TCP, TCP_KEEPIDLE, 30},
        {"TCP_KEEPINTVL", IPPROTO_TCP, TCP_KEEPINTVL, 5},
        {"TCP_KEEPCNT", IPPROTO_TCP, TCP_KEEPCNT, 3},
        {"SO_OOBINLINE", SOL_SOCKET, SO_OOBINLINE, 1},
    };
    for (const auto &option : options) {
        const int before = get_int(fd, option.level, option.optname);
        const int value = option.value;
        int set = setsockopt(fd, option.level, option.optname, &value, sizeof(value));
        say("options: %s default=%d set %d=%s reads back %d", option.name, before, value,
            rc(set).c_str(), get_int(fd, option.level, option.optname));
    }
    set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 0);
    say("options: SO_KEEPALIVE cleared reads back %d", get_int(fd, SOL_SOCKET, SO_KEEPALIVE));
    const int size = 65536;
    say("options: SO_RCVBUF set=%s SO_SNDBUF set=%s (values not printed: the kernel doubles them)",
        rc(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size))).c_str(),
        rc(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size))).c_str());
    say("options: SO_RCVBUF reads back more than requested=%s",
        yes(get_int(fd, SOL_SOCKET, SO_RCVBUF) >= size));
    say("options: SO_ERROR=%d SO_TYPE=%s SO_DOMAIN=%s SO_PROTOCOL=%s SO_ACCEPTCONN=%d",
        get_int(fd, SOL_SOCKET, SO_ERROR),
        get_int(fd, SOL_SOCKET, SO_TYPE) == SOCK_STREAM ? "SOCK_STREAM" : "?",
        family_name(get_int(fd, SOL_SOCKET, SO_DOMAIN)).c_str(),
        get_int(fd, SOL_SOCKET, SO_PROTOCOL) == IPPROTO_TCP ? "IPPROTO_TCP" : "?",
        get_int(fd, SOL_SOCKET, SO_ACCEPTCONN));

    tcp_info info{};
    socklen_t len = sizeof(info);
    int got = getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len);
    say("options: TCP_INFO=%s tcpi_state=%s", rc(got).c_str(),
        info.tcpi_state == 1 ? "ESTABLISHED" : std::to_string(info.tcpi_state).c_str());
    char congestion[32] = {};
    len = sizeof(congestion);
    got = getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, congestion, &len);
    say("options: TCP_CONGESTION=%s algorithm named=%s", rc(got).c_str(), yes(congestion[0] != 0));

    int lfd = listener(family);
    len = sizeof(info);
    std::memset(&info, 0, sizeof(info));
    getsockopt(lfd, IPPROTO_TCP, TCP_INFO, &info, &len);
    say("options: listener SO_ACCEPTCONN=%d tcpi_state=%s", get_int(lfd, SOL_SOCKET, SO_ACCEPTCONN),
        info.tcpi_state == 10 ? "LISTEN" : std::to_string(info.tcpi_state).c_str());
    close(lfd);

    if (family.af == AF_INET6) {
        int v6 = tcp_socket(AF_INET6);
        set_int(v6, IPPROTO_IPV6, IPV6_V6ONLY, 1);
        say("options: IPV6_V6ONLY set 1 reads back %d", get_int(v6, IPPROTO_IPV6, IPV6_V6ONLY));
        close(v6);
    }

    // Errors the kernel gives for options it does not know or lengths that are wrong.
    int value = 1;
    say("options: unknown SOL_SOCKET option set=%s get=%s",
        rc(setsockopt(fd, SOL_SOCKET, 9999, &value, sizeof(value))).c_str(),
        get_rc(fd, SOL_SOCKET, 9999).c_str());
    say("options: TCP_NODELAY with optlen 2=%s",
        rc(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &value, 2)).c_str());
    say("options: unknown level set=%s",
        rc(setsockopt(fd, 12345, 1, &value, sizeof(value))).c_str());
    pair.close_both();
}

void check_ioctls_and_fcntl(const Family &family) {
    Pair pair = connected_pair(family);
    int available = -1;
    const std::string result_empty = rc(ioctl(pair.server, FIONREAD, &available));
    say("FIONREAD: with nothing sent=%s value=%d", result_empty.c_str(), available);
    std::string payload(1234, 'f');
    send_text(pair.client, payload);
    wait_available(pair.server, payload.size());
    available = -1;
    ioctl(pair.server, FIONREAD, &available);
    int inq = -1;
    ioctl(pair.server, SIOCINQ, &inq);
    say("FIONREAD: after the peer sent 1234 bytes=%d SIOCINQ=%d", available, inq);
    read_text(pair.server, payload.size());
    available = -1;
    ioctl(pair.server, FIONREAD, &available);
    say("FIONREAD: after reading them=%d", available);

    int on = 1, off = 0;
    std::string result = rc(ioctl(pair.server, FIONBIO, &on));
    say("FIONBIO: set=%s nonblocking=%s", result.c_str(), yes(is_nonblocking(pair.server)));
    char byte;
    say("FIONBIO: recv=%s", rc(recv(pair.server, &byte, 1, 0)).c_str());
    result = rc(ioctl(pair.server, FIONBIO, &off));
    say("FIONBIO: clear=%s nonblocking=%s", result.c_str(), yes(is_nonblocking(pair.server)));

    const int flags = fcntl(pair.client, F_GETFL);
    say("fcntl: F_GETFL access mode=%s nonblocking=%s",
        (flags & O_ACCMODE) == O_RDWR ? "O_RDWR" : std::to_string(flags & O_ACCMODE).c_str(),
        yes(flags & O_NONBLOCK));
    result = rc(fcntl(pair.client, F_SETFL, flags | O_NONBLOCK));
    say("fcntl: F_SETFL O_NONBLOCK=%s nonblocking=%s", result.c_str(),
        yes(is_nonblocking(pair.client)));
    say("fcntl: recv=%s", rc(recv(pair.client, &byte, 1, 0)).c_str());
    result = rc(fcntl(pair.client, F_SETFL, flags));
    say("fcntl: F_SETFL back=%s nonblocking=%s", result.c_str(), yes(is_nonblocking(pair.client)));
    result = rc(fcntl(pair.client, F_SETFD, FD_CLOEXEC));
    say("fcntl: F_SETFD FD_CLOEXEC=%s cloexec=%s", result.c_str(), yes(is_cloexec(pair.client)));
    fcntl(pair.client, F_SETFD, 0);
    say("fcntl: cleared cloexec=%s", yes(is_cloexec(pair.client)));
    int created = tcp_socket(family.af, SOCK_NONBLOCK | SOCK_CLOEXEC);
    say("fcntl: socket(SOCK_NONBLOCK|SOCK_CLOEXEC) nonblocking=%s cloexec=%s",
        yes(is_nonblocking(created)), yes(is_cloexec(created)));
    close(created);

    int lfd = listener(family);
    say("FIONREAD: on a listener=%s", rc(ioctl(lfd, FIONREAD, &available)).c_str());
    close(lfd);
    pair.close_both();
}

void check_poll_and_select(const Family &family) {
    int fresh = tcp_socket(family.af);
    say("readiness: fresh socket poll=%s",
        poll_names(wait_events(fresh, POLLIN | POLLOUT, 0)).c_str());
    close(fresh);

    int lfd = listener(family);
    say("readiness: idle listener poll=%s",
        poll_names(wait_events(lfd, POLLIN | POLLOUT, 0)).c_str());
    int client = connect_to(family, local_port(lfd));
    say("readiness: listener with a pending connection poll=%s",
        poll_names(wait_events(lfd, POLLIN)).c_str());
    int server = accept(lfd, nullptr, nullptr);
    say("readiness: connected, no data poll=%s",
        poll_names(wait_events(server, POLLIN | POLLOUT, 0)).c_str());

    fd_set readable, writable;
    FD_ZERO(&readable);
    FD_ZERO(&writable);
    FD_SET(server, &readable);
    FD_SET(server, &writable);
    timeval zero{0, 0};
    int n = select(server + 1, &readable, &writable, nullptr, &zero);
    say("select: no data=%d readable=%s writable=%s", n, yes(FD_ISSET(server, &readable)),
        yes(FD_ISSET(server, &writable)));

    send_text(client, "data");
    say("readiness: after the peer sent poll=%s",
        poll_names(wait_bits(server, POLLIN | POLLOUT, POLLIN)).c_str());
    FD_ZERO(&readable);
    FD_SET(server, &readable);
    timeval bound{5, 0};
    n = select(server + 1, &readable, nullptr, nullptr, &bound);
    say("select: with data=%d readable=%s", n, yes(FD_ISSET(server, &readable)));
    read_text(server, 4);

    // select() with a timeout on a quiet socket returns 0.
    FD_ZERO(&readable);
    FD_SET(server, &readable);
    timeval short_wait{0, 50'000};
    say("select: quiet socket with 50 ms timeout=%d",
        select(server + 1, &readable, nullptr, nullptr, &short_wait));

    // poll() on several descriptors, one of them a pipe (a kernel fd).
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    (void)!write(pipe_fds[1], "p", 1);
    pollfd entries[2] = {{server, POLLIN, 0}, {pipe_fds[0], POLLIN, 0}};
    n = poll(entries, 2, kWaitMs);
    say("poll: socket and pipe, pipe ready=%d socket=%s pipe=%s", n,
        poll_names(entries[0].revents).c_str(), poll_names(entries[1].revents).c_str());
    send_text(client, "z");
    wait_available(server, 1);
    n = poll(entries, 2, kWaitMs);
    say("poll: socket and pipe, both ready=%d socket=%s pipe=%s", n,
        poll_names(entries[0].revents).c_str(), poll_names(entries[1].revents).c_str());
    read_text(server, 1);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    pollfd negative{-1, POLLIN, 0};
    say("poll: a negative fd is ignored=%d", poll(&negative, 1, 0));
    close(server);
    close(client);
    close(lfd);
}

int epoll_count(int ep, epoll_event *events, int max, int timeout_ms) {
    for (;;) {
        int n = epoll_wait(ep, events, max, timeout_ms);
        if (n >= 0 || errno != EINTR) return n;
    }
}

std::string epoll_once(int ep, int timeout_ms) {
    epoll_event events[4];
    int n = epoll_count(ep, events, 4, timeout_ms);
    if (n <= 0) return std::to_string(n);
    std::string out = std::to_string(n);
    for (int i = 0; i < n; ++i) out += " " + epoll_names(events[i].events);
    return out;
}

void check_epoll(const Family &family) {
    Pair pair = connected_pair(family);
    int ep = epoll_create1(EPOLL_CLOEXEC);

    // Level-triggered: reported as long as data is there.
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = pair.server;
    say("epoll LT: add=%s", rc(epoll_ctl(ep, EPOLL_CTL_ADD, pair.server, &event)).c_str());
    say("epoll LT: add again=%s", rc(epoll_ctl(ep, EPOLL_CTL_ADD, pair.server, &event)).c_str());
    say("epoll LT: no data=%s", epoll_once(ep, 0).c_str());
    send_text(pair.client, "lt");
    say("epoll LT: data=%s", epoll_once(ep, kWaitMs).c_str());
    wait_available(pair.server, 2);
    say("epoll LT: data still there=%s", epoll_once(ep, kWaitMs).c_str());
    read_text(pair.server, 2);
    say("epoll LT: after reading=%s", epoll_once(ep, 0).c_str());

    // Edge-triggered: once per arrival of new data.
    event.events = EPOLLIN | EPOLLET;
    say("epoll ET: mod=%s", rc(epoll_ctl(ep, EPOLL_CTL_MOD, pair.server, &event)).c_str());
    send_text(pair.client, "a");
    say("epoll ET: first data=%s", epoll_once(ep, kWaitMs).c_str());
    say("epoll ET: no new data=%s", epoll_once(ep, 50).c_str());
    send_text(pair.client, "b");
    say("epoll ET: more data=%s", epoll_once(ep, kWaitMs).c_str());
    say("epoll ET: quiet again=%s", epoll_once(ep, 50).c_str());
    read_text(pair.server, 2);

    // Edge-triggered EPOLLOUT: one report for a writable socket.
    int ep_out = epoll_create1(EPOLL_CLOEXEC);
    epoll_event out_event{};
    out_event.events = EPOLLOUT | EPOLLET;
    out_event.data.fd = pair.client;
    epoll_ctl(ep_out, EPOLL_CTL_ADD, pair.client, &out_event);
    say("epoll ET: EPOLLOUT on a writable socket=%s", epoll_once(ep_out, kWaitMs).c_str());
    say("epoll ET: EPOLLOUT reported again=%s", epoll_once(ep_out, 50).c_str());
    close(ep_out);

    // One-shot: disarmed after one report until EPOLL_CTL_MOD re-arms it.
    event.events = EPOLLIN | EPOLLONESHOT;
    epoll_ctl(ep, EPOLL_CTL_MOD, pair.server, &event);
    send_text(pair.client, "1");
    say("epoll ONESHOT: first data=%s", epoll_once(ep, kWaitMs).c_str());
    send_text(pair.client, "2");
    wait_available(pair.server, 2);
    say("epoll ONESHOT: disarmed=%s", epoll_once(ep, 50).c_str());
    say("epoll ONESHOT: re-arm=%s", rc(epoll_ctl(ep, EPOLL_CTL_MOD, pair.server, &event)).c_str());
    say("epoll ONESHOT: after re-arm=%s", epoll_once(ep, kWaitMs).c_str());
    read_text(pair.server, 2);

    // The peer's shutdown(SHUT_WR): EPOLLRDHUP.
    event.events = EPOLLIN | EPOLLRDHUP;
    epoll_ctl(ep, EPOLL_CTL_MOD, pair.server, &event);
    shutdown(pair.client, SHUT_WR);
    wait_bits(pair.server, POLLIN | POLLRDHUP, POLLRDHUP);
    say("epoll RDHUP: after the peer's SHUT_WR=%s", epoll_once(ep, kWaitMs).c_str());
    say("epoll: del=%s", rc(epoll_ctl(ep, EPOLL_CTL_DEL, pair.server, nullptr)).c_str());
    say("epoll: del again=%s", rc(epoll_ctl(ep, EPOLL_CTL_DEL, pair.server, nullptr)).c_str());
    say("epoll: after del=%s", epoll_once(ep, 0).c_str());
    pair.close_both();

    // RST: EPOLLHUP and EPOLLERR.
    pair = connected_pair(family);
    event.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    event.data.fd = pair.client;
    epoll_ctl(ep, EPOLL_CTL_ADD, pair.client, &event);
    say("epoll: connected=%s", epoll_once(ep, kWaitMs).c_str());
    reset_close(pair.server);
    pair.server = -1;
    wait_bits(pair.client, POLLIN, POLLHUP | POLLERR);
    say("epoll: after RST=%s", epoll_once(ep, kWaitMs).c_str());
    pair.close_both();

    // A listener reports EPOLLIN for a pending connection.
    int lfd = listener(family);
    event.events = EPOLLIN;
    event.data.fd = lfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &event);
    say("epoll: idle listener=%s", epoll_once(ep, 0).c_str());
    int client = connect_to(family, local_port(lfd));
    say("epoll: listener with a pending connection=%s", epoll_once(ep, kWaitMs).c_str());
    int accepted = accept(lfd, nullptr, nullptr);
    say("epoll: listener after accept=%s", epoll_once(ep, 0).c_str());
    close(accepted);
    close(client);
    epoll_ctl(ep, EPOLL_CTL_DEL, lfd, nullptr);
    close(lfd);

    // A socket and a pipe in one set: each reported with its own data.
    pair = connected_pair(family);
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    epoll_event tagged{};
    tagged.events = EPOLLIN;
    tagged.data.u64 = 1;
    epoll_ctl(ep, EPOLL_CTL_ADD, pair.server, &tagged);
    tagged.data.u64 = 2;
    epoll_ctl(ep, EPOLL_CTL_ADD, pipe_fds[0], &tagged);
    (void)!write(pipe_fds[1], "p", 1);
    epoll_event events[4];
    int n = epoll_count(ep, events, 4, kWaitMs);
    say("epoll: mixed set, pipe written=%d tag=%llu", n,
        n > 0 ? static_cast<unsigned long long>(events[0].data.u64) : 0ull);
    char byte;
    (void)!read(pipe_fds[0], &byte, 1);
    send_text(pair.client, "s");
    n = epoll_count(ep, events, 4, kWaitMs);
    say("epoll: mixed set, socket written=%d tag=%llu", n,
        n > 0 ? static_cast<unsigned long long>(events[0].data.u64) : 0ull);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    pair.close_both();
    close(ep);
}

void check_accept4(const Family &family) {
    int lfd = listener(family);
    int client = connect_to(family, local_port(lfd));
    Address peer;
    peer.len = sizeof(peer.storage);
    int accepted = accept4(lfd, peer.get(), &peer.len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    say("accept4: SOCK_NONBLOCK|SOCK_CLOEXEC ok=%s nonblocking=%s cloexec=%s peer=%s %s",
        yes(accepted >= 0), yes(is_nonblocking(accepted)), yes(is_cloexec(accepted)),
        family_name(peer.storage.ss_family).c_str(), host_of(peer.storage).c_str());
    close(accepted);
    close(client);
    client = connect_to(family, local_port(lfd));
    accepted = accept(lfd, nullptr, nullptr);
    say("accept: plain nonblocking=%s cloexec=%s", yes(is_nonblocking(accepted)),
        yes(is_cloexec(accepted)));
    close(accepted);
    close(client);
    say("accept4: bad flags=%s", rc(accept4(lfd, nullptr, nullptr, 0x4)).c_str());
    close(lfd);

    int unlistened = tcp_socket(family.af);
    say("accept: on a socket that is not listening=%s",
        rc(accept(unlistened, nullptr, nullptr)).c_str());
    close(unlistened);
}

void check_unconnected(const Family &family) {
    int fd = tcp_socket(family.af);
    char buf[8];
    const int before = g_sigpipe_count.load();
    say("unconnected: send(MSG_NOSIGNAL)=%s", rc(send(fd, "x", 1, MSG_NOSIGNAL)).c_str());
    const std::string sent = rc(send(fd, "x", 1, 0));
    say("unconnected: send=%s SIGPIPEs=%d", sent.c_str(), g_sigpipe_count.load() - before);
    say("unconnected: recv=%s", rc(recv(fd, buf, sizeof(buf), 0)).c_str());
    say("unconnected: read=%s", rc(read(fd, buf, sizeof(buf))).c_str());
    say("unconnected: shutdown=%s", rc(shutdown(fd, SHUT_RDWR)).c_str());
    close(fd);

    int lfd = listener(family);
    say("listener: recv=%s", rc(recv(lfd, buf, sizeof(buf), 0)).c_str());
    say("listener: send(MSG_NOSIGNAL)=%s", rc(send(lfd, "x", 1, MSG_NOSIGNAL)).c_str());
    Address address = loopback(family.af, local_port(lfd));
    say("listener: connect=%s", rc(connect(lfd, address.get(), address.len)).c_str());
    say("listener: listen again=%s", rc(listen(lfd, 8)).c_str());
    close(lfd);
}

void check_vector_io(const Family &family) {
    Pair pair = connected_pair(family);
    char part1[] = "ab", part2[] = "cde", part3[] = "f";
    iovec out[3] = {{part1, 2}, {part2, 3}, {part3, 1}};
    say("writev: 3 iovecs=%s", rc(writev(pair.client, out, 3)).c_str());
    wait_available(pair.server, 6);
    char in1[4] = {}, in2[4] = {};
    iovec in[2] = {{in1, 3}, {in2, 3}};
    say("readv: 2 x 3=%s data=%s|%s", rc(readv(pair.server, in, 2)).c_str(), in1, in2);

    char m1[] = "hello ", m2[] = "msg";
    iovec parts[2] = {{m1, 6}, {m2, 3}};
    msghdr msg{};
    msg.msg_iov = parts;
    msg.msg_iovlen = 2;
    say("sendmsg: 2 iovecs=%s", rc(sendmsg(pair.client, &msg, 0)).c_str());
    wait_available(pair.server, 9);
    char got[16] = {};
    sockaddr_storage from{};
    iovec into{got, sizeof(got) - 1};
    msghdr rmsg{};
    rmsg.msg_name = &from;
    rmsg.msg_namelen = sizeof(from);
    rmsg.msg_iov = &into;
    rmsg.msg_iovlen = 1;
    say("recvmsg: MSG_PEEK=%s", rc(recvmsg(pair.server, &rmsg, MSG_PEEK)).c_str());
    rmsg.msg_namelen = sizeof(from);
    std::memset(got, 0, sizeof(got));
    ssize_t n = recvmsg(pair.server, &rmsg, 0);
    say("recvmsg: =%s data=%s namelen=%u flags=%d", rc(n).c_str(), got, rmsg.msg_namelen,
        rmsg.msg_flags);

    say("write: =%s", rc(write(pair.client, "plain", 5)).c_str());
    wait_available(pair.server, 5);
    std::memset(got, 0, sizeof(got));
    say("read: =%s data=%s", rc(read(pair.server, got, sizeof(got))).c_str(), got);

    say("sendto: no address=%s", rc(sendto(pair.client, "to", 2, 0, nullptr, 0)).c_str());
    wait_available(pair.server, 2);
    socklen_t from_len = sizeof(from);
    std::memset(got, 0, sizeof(got));
    n = recvfrom(pair.server, got, sizeof(got), 0, reinterpret_cast<sockaddr *>(&from), &from_len);
    say("recvfrom: =%s data=%s addrlen=%u", rc(n).c_str(), got, from_len);

    iovec empty{nullptr, 0};
    say("writev: zero-length=%s", rc(writev(pair.client, &empty, 1)).c_str());
    volatile int negative_count = -1;  // volatile: the compiler rightly warns about a constant
    say("writev: iovcnt -1=%s", rc(writev(pair.client, out, negative_count)).c_str());
    pair.close_both();
}

// sendmmsg()/recvmmsg() on TCP: the kernel's loop of sendmsg()/recvmsg() (net/socket.c).
void check_mmsg(const Family &family) {
    Pair pair = connected_pair(family);
    char a[] = "abc", b[] = "defgh";
    iovec out[2] = {{a, 3}, {b, 5}};
    mmsghdr sends[2]{};
    for (int k = 0; k < 2; ++k) {
        sends[k].msg_hdr.msg_iov = &out[k];
        sends[k].msg_hdr.msg_iovlen = 1;
    }
    std::string got = rc(sendmmsg(pair.client, sends, 2, 0));
    say("sendmmsg: 2 messages=%s lens=%u,%u", got.c_str(), sends[0].msg_len, sends[1].msg_len);
    wait_available(pair.server, 8);
    char in1[2], in2[16];
    iovec in[2] = {{in1, sizeof(in1)}, {in2, sizeof(in2)}};
    mmsghdr recvs[2]{};
    auto clear = [&] {
        std::memset(in1, 0, sizeof(in1));
        std::memset(in2, 0, sizeof(in2));
        for (int k = 0; k < 2; ++k) {
            recvs[k] = mmsghdr{};
            recvs[k].msg_hdr.msg_iov = &in[k];
            recvs[k].msg_hdr.msg_iovlen = 1;
            recvs[k].msg_len = 99;
        }
    };
    clear();
    got = rc(recvmmsg(pair.server, recvs, 2, MSG_DONTWAIT, nullptr));
    say("recvmmsg: 2 entries=%s lens=%u,%u data=%.2s|%.6s", got.c_str(), recvs[0].msg_len,
        recvs[1].msg_len, in1, in2);
    clear();
    say("recvmmsg: nothing waiting=%s",
        rc(recvmmsg(pair.server, recvs, 2, MSG_DONTWAIT, nullptr)).c_str());
    say("recvmmsg: no entries=%s", rc(recvmmsg(pair.server, recvs, 0, 0, nullptr)).c_str());
    say("recvmmsg: bad fd=%s", rc(recvmmsg(-1, recvs, 2, MSG_DONTWAIT, nullptr)).c_str());

    // MSG_WAITFORONE: waits for the first entry only.
    send_text(pair.client, "xy");
    wait_available(pair.server, 2);
    clear();
    got = rc(recvmmsg(pair.server, recvs, 2, MSG_WAITFORONE, nullptr));
    say("recvmmsg: MSG_WAITFORONE=%s lens=%u,%u", got.c_str(), recvs[0].msg_len, recvs[1].msg_len);

    // A timeout is looked at after each entry: a zero one ends the call after the first, and
    // what is left is written back.
    send_text(pair.client, "tm");
    wait_available(pair.server, 2);
    clear();
    timespec zero{0, 0};
    got = rc(recvmmsg(pair.server, recvs, 2, 0, &zero));
    say("recvmmsg: zero timeout=%s lens=%u,%u left=%ld.%09ld", got.c_str(), recvs[0].msg_len,
        recvs[1].msg_len, static_cast<long>(zero.tv_sec), zero.tv_nsec);
    timespec bad{0, 2'000'000'000};
    say("recvmmsg: malformed timeout=%s",
        rc(recvmmsg(pair.server, recvs, 2, MSG_DONTWAIT, &bad)).c_str());

    // A message past IOV_MAX iovecs: the ones before it are sent, its error is lost.
    std::vector<iovec> many(IOV_MAX + 1, iovec{a, 1});
    sends[1].msg_hdr.msg_iov = many.data();
    sends[1].msg_hdr.msg_iovlen = many.size();
    sends[0].msg_len = sends[1].msg_len = 99;
    got = rc(sendmmsg(pair.client, sends, 2, 0));
    say("sendmmsg: second past IOV_MAX=%s lens=%u,%u", got.c_str(), sends[0].msg_len,
        sends[1].msg_len);
    sends[0].msg_hdr.msg_iov = many.data();
    sends[0].msg_hdr.msg_iovlen = many.size();
    say("sendmmsg: first past IOV_MAX=%s", rc(sendmmsg(pair.client, sends, 2, 0)).c_str());
    wait_available(pair.server, 3);
    say("sendmmsg: the first arrived=%s", rc(recv(pair.server, in2, sizeof(in2), 0)).c_str());

    // The socket's receive timeout ends the second entry's wait: EAGAIN, not left for later.
    timeval brief{0, 50'000};
    setsockopt(pair.server, SOL_SOCKET, SO_RCVTIMEO, &brief, sizeof(brief));
    send_text(pair.client, "to");
    wait_available(pair.server, 2);
    clear();
    got = rc(recvmmsg(pair.server, recvs, 2, 0, nullptr));
    say("recvmmsg: SO_RCVTIMEO on the second=%s lens=%u,%u, then recv=%s", got.c_str(),
        recvs[0].msg_len, recvs[1].msg_len,
        rc(recv(pair.server, in2, sizeof(in2), MSG_DONTWAIT)).c_str());
    timeval forever{0, 0};
    setsockopt(pair.server, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof(forever));

    // A signal ends the second entry's wait, SA_RESTART or not: the call returns the first,
    // and the wait's error is left as the socket's for the next call that looks (Linux's
    // sk_err): ERESTARTSYS (512, which reaches the program as it is) without a receive
    // timeout, EINTR with one.
    const pid_t main_tid = static_cast<pid_t>(syscall(SYS_gettid));
    const pthread_t main_thread = pthread_self();
    struct SignalCase {
        const char *name;
        bool restart;
        bool timeout;
        bool so_error;
    };
    for (const SignalCase &c : {SignalCase{"no SA_RESTART", false, false, true},
                                SignalCase{"no SA_RESTART", false, false, false},
                                SignalCase{"SA_RESTART", true, false, false},
                                SignalCase{"SO_RCVTIMEO", false, true, true}}) {
        install(SIGUSR1, count_sigusr1, c.restart);
        timeval limit{c.timeout ? 30 : 0, 0};
        setsockopt(pair.server, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
        send_text(pair.client, "in");
        wait_available(pair.server, 2);
        clear();
        std::atomic<bool> returned{false};
        std::thread signaller([&] {
            const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
            while (!returned.load() && ms_left(deadline) > 0) {
                if (wait_thread_sleeping(main_tid)) pthread_kill(main_thread, SIGUSR1);
                for (int i = 0; i < 100 && !returned.load(); ++i) usleep(1000);
            }
            if (!returned.load()) send_text(pair.client, "unblock");
        });
        got = rc(recvmmsg(pair.server, recvs, 2, 0, nullptr));
        returned = true;
        signaller.join();
        say("recvmmsg: signal (%s) in the second=%s lens=%u,%u, then poll=%s", c.name, got.c_str(),
            recvs[0].msg_len, recvs[1].msg_len,
            poll_names(wait_events(pair.server, POLLIN | POLLOUT | POLLRDHUP, 0)).c_str());
        if (c.so_error)
            say("recvmmsg: the left error to SO_ERROR=%d",
                get_int(pair.server, SOL_SOCKET, SO_ERROR));
        else
            say("recvmmsg: the left error to recv=%s",
                rc(recv(pair.server, in2, sizeof(in2), MSG_DONTWAIT)).c_str());
        say("recvmmsg: then recv=%s",
            rc(recv(pair.server, in2, sizeof(in2), MSG_DONTWAIT)).c_str());
    }
    install(SIGUSR1, SIG_DFL, false);
    setsockopt(pair.server, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof(forever));

    // At EOF every entry is a 0-byte message.
    shutdown(pair.client, SHUT_WR);
    wait_bits(pair.server, POLLIN | POLLRDHUP, POLLRDHUP);
    clear();
    got = rc(recvmmsg(pair.server, recvs, 2, MSG_DONTWAIT, nullptr));
    say("recvmmsg: at EOF=%s lens=%u,%u", got.c_str(), recvs[0].msg_len, recvs[1].msg_len);
    pair.close_both();

    // An RST behind the data: Linux reports it before the data.
    pair = connected_pair(family);
    send_text(pair.client, "end");
    wait_available(pair.server, 3);
    reset_close(pair.client);
    pair.client = -1;
    wait_bits(pair.server, POLLIN, POLLHUP);
    clear();
    got = rc(recvmmsg(pair.server, recvs, 2, MSG_DONTWAIT, nullptr));
    say("recvmmsg: data then RST=%s lens=%u,%u", got.c_str(), recvs[0].msg_len, recvs[1].msg_len);
    say("recvmmsg: then poll=%s",
        poll_names(wait_events(pair.server, POLLIN | POLLOUT | POLLRDHUP, 0)).c_str());
    say("recvmmsg: then SO_ERROR=%d", get_int(pair.server, SOL_SOCKET, SO_ERROR));
    char buf[8];
    say("recvmmsg: then recv=%s", rc(recv(pair.server, buf, sizeof(buf), MSG_DONTWAIT)).c_str());
    say("recvmmsg: then recv again=%s",
        rc(recv(pair.server, buf, sizeof(buf), MSG_DONTWAIT)).c_str());
    pair.close_both();
}

// Whether /proc/net/tcp(6) lists a socket with local port `port` and inode `ino`.
bool listed_with_inode(const Family &family, uint16_t port, unsigned long ino) {
    FILE *table = std::fopen(family.af == AF_INET ? "/proc/net/tcp" : "/proc/net/tcp6", "r");
    if (!table) return false;
    char line[512];
    bool found = false;
    char local_port[8];
    std::snprintf(local_port, sizeof(local_port), ":%04X ", port);
    while (std::fgets(line, sizeof(line), table)) {
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        char local[64];
        unsigned long inode = 0;
        if (std::sscanf(line, "%*s %63s %*s %*s %*s %*s %*s %*s %*s %lu", local, &inode) != 2)
            continue;
        std::string at = std::string(local) + " ";
        if (at.find(local_port) != std::string::npos && inode == ino) found = true;
    }
    std::fclose(table);
    return found;
}

// What the descriptor is: fstat() and friends, isatty(), sockatmark().
void check_stat(const Family &family) {
    Pair pair = connected_pair(family);
    struct stat st {};
    std::string got = rc(fstat(pair.server, &st));
    say("fstat: =%s socket=%s mode=%o nlink=%lu own uid=%s own gid=%s size=%ld blksize=%ld "
        "blocks=%ld rdev=%lu",
        got.c_str(), yes(S_ISSOCK(st.st_mode)), static_cast<unsigned>(st.st_mode & 07777),
        static_cast<unsigned long>(st.st_nlink), yes(st.st_uid == geteuid()),
        yes(st.st_gid == getegid()), static_cast<long>(st.st_size),
        static_cast<long>(st.st_blksize), static_cast<long>(st.st_blocks),
        static_cast<unsigned long>(st.st_rdev));
    struct stat other {};
    fstat(pair.client, &other);
    say("fstat: the same device for every socket=%s, another socket another inode=%s",
        yes(st.st_dev == other.st_dev), yes(st.st_ino != other.st_ino));
    say("fstat: its inode is the one /proc/net lists for its port=%s",
        yes(listed_with_inode(family, local_port(pair.server), st.st_ino)));
    const int copy = dup(pair.server);
    struct stat of_copy {};
    fstat(copy, &of_copy);
    say("fstat: a dup has its inode=%s", yes(of_copy.st_ino == st.st_ino));
    close(copy);
    struct stat at {};
    got = rc(fstatat(pair.server, "", &at, AT_EMPTY_PATH));
    say("fstatat: AT_EMPTY_PATH=%s same inode=%s", got.c_str(), yes(at.st_ino == st.st_ino));
    say("fstatat: empty path without AT_EMPTY_PATH=%s",
        rc(fstatat(pair.server, "", &at, 0)).c_str());
    say("fstatat: a path under it=%s", rc(fstatat(pair.server, "x", &at, 0)).c_str());
    for (int flag : {0x1, 0x10000000}) {
        at = {};
        got = rc(fstatat(pair.server, "", &at, AT_EMPTY_PATH | flag));
        say("fstatat: flag %#x=%s socket=%s", flag, got.c_str(), yes(S_ISSOCK(at.st_mode)));
    }
    struct statx x {};
    got = rc(statx(pair.server, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &x));
    say("statx: =%s basic stats=%s socket=%s same inode=%s", got.c_str(),
        yes((x.stx_mask & STATX_BASIC_STATS) == STATX_BASIC_STATS), yes(S_ISSOCK(x.stx_mode)),
        yes(x.stx_ino == st.st_ino));
    say("statx: reserved mask bit=%s",
        rc(statx(pair.server, "", AT_EMPTY_PATH, STATX__RESERVED, &x)).c_str());
    errno = 0;
    const int tty = isatty(pair.server);
    const int tty_errno = errno;
    say("isatty: =%d errno=%s", tty, err_name(tty_errno).c_str());
    say("sockatmark: =%d", sockatmark(pair.server));
    pair.close_both();
}

// Calls for files only: on a socket Linux answers ESPIPE for positions, EINVAL for sync and
// truncate, ENOTTY for terminal calls; preadv2()/pwritev2() at offset -1 are readv()/writev().
void check_file_calls(const Family &family) {
    Pair pair = connected_pair(family);
    char buf[8];
    iovec iov{buf, sizeof(buf)};
    say("file calls: lseek=%s", rc(lseek(pair.server, 0, SEEK_CUR)).c_str());
    say("file calls: lseek bad whence=%s", rc(lseek(pair.server, 0, 99)).c_str());
    say("file calls: pread=%s", rc(pread(pair.server, buf, sizeof(buf), 0)).c_str());
    say("file calls: pread at -1=%s", rc(pread(pair.server, buf, sizeof(buf), -1)).c_str());
    say("file calls: pwrite=%s", rc(pwrite(pair.server, "x", 1, 0)).c_str());
    say("file calls: preadv=%s", rc(preadv(pair.server, &iov, 1, 0)).c_str());
    say("file calls: pwritev=%s", rc(pwritev(pair.server, &iov, 1, 0)).c_str());
    say("file calls: preadv2 at 0=%s", rc(preadv2(pair.server, &iov, 1, 0, 0)).c_str());
    say("file calls: preadv2 at -1, RWF_NOWAIT, nothing there=%s",
        rc(preadv2(pair.server, &iov, 1, -1, RWF_NOWAIT)).c_str());
    say("file calls: preadv2 unknown flag=%s",
        rc(preadv2(pair.server, &iov, 1, -1, 0x40000000)).c_str());
    iovec out{const_cast<char *>("pv2"), 3};
    say("file calls: pwritev2 at -1=%s", rc(pwritev2(pair.client, &out, 1, -1, 0)).c_str());
    wait_available(pair.server, 3);
    std::memset(buf, 0, sizeof(buf));
    const std::string got = rc(preadv2(pair.server, &iov, 1, -1, 0));
    say("file calls: preadv2 at -1=%s data=%s", got.c_str(), buf);
    say("file calls: fsync=%s", rc(fsync(pair.server)).c_str());
    say("file calls: fdatasync=%s", rc(fdatasync(pair.server)).c_str());
    say("file calls: ftruncate=%s", rc(ftruncate(pair.server, 0)).c_str());
    termios tio{};
    say("file calls: tcgetattr=%s", rc(tcgetattr(pair.server, &tio)).c_str());
    char name[64];
    say("file calls: ttyname_r=%s", err_name(ttyname_r(pair.server, name, sizeof(name))).c_str());
    errno = 0;
    const bool no_name = ttyname(pair.server) == nullptr;
    const int ttyname_errno = errno;
    say("file calls: ttyname null=%s errno=%s", yes(no_name), err_name(ttyname_errno).c_str());
    say("file calls: posix_fadvise=%d", posix_fadvise(pair.server, 0, 0, POSIX_FADV_SEQUENTIAL));
    pair.close_both();
}

void check_bulk(const Family &family) {
    constexpr size_t kBytes = 1 << 20;
    Pair pair = connected_pair(family);
    const std::vector<uint8_t> up = deterministic_bytes(kBytes, 0x1234567);
    const std::vector<uint8_t> down = deterministic_bytes(kBytes, 0x7654321);
    // Sends in chunks of varying sizes (blocking sockets), both directions at once.
    auto sender = [](int fd, const std::vector<uint8_t> &data, uint64_t seed) {
        XorShift rng{seed};
        size_t done = 0;
        while (done < data.size()) {
            size_t len = 1 + rng.next() % 65536;
            if (len > data.size() - done) len = data.size() - done;
            ssize_t n = send(fd, data.data() + done, len, MSG_NOSIGNAL);
            if (n <= 0) return;
            done += static_cast<size_t>(n);
        }
    };
    auto receiver = [](int fd, uint64_t &total, uint64_t &hash) {
        std::vector<uint8_t> buf(40000);
        total = 0;
        hash = kFnvBasis;
        const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 6);
        while (total < kBytes && ms_left(deadline) > 0) {
            if (!wait_events(fd, POLLIN, ms_left(deadline))) break;
            ssize_t n = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
            if (n == 0) break;
            if (n < 0) continue;
            hash = fnv1a(hash, buf.data(), static_cast<size_t>(n));
            total += static_cast<uint64_t>(n);
        }
    };
    uint64_t up_total = 0, up_hash = 0, down_total = 0, down_hash = 0;
    std::thread up_sender(sender, pair.client, std::cref(up), 11);
    std::thread down_sender(sender, pair.server, std::cref(down), 22);
    std::thread down_receiver(receiver, pair.client, std::ref(down_total), std::ref(down_hash));
    receiver(pair.server, up_total, up_hash);
    down_receiver.join();
    up_sender.join();
    down_sender.join();
    say("1 MB: client to server bytes=%llu checksum %s", static_cast<unsigned long long>(up_total),
        up_hash == fnv1a(kFnvBasis, up.data(), up.size()) ? "ok" : "BAD");
    say("1 MB: server to client bytes=%llu checksum %s",
        static_cast<unsigned long long>(down_total),
        down_hash == fnv1a(kFnvBasis, down.data(), down.size()) ? "ok" : "BAD");
    pair.close_both();
}

// SO_RCVLOWAT: readiness needs that many bytes; a blocking recv waits for min(len, lowat).
void check_rcvlowat(const Family &family) {
    Pair pair = connected_pair(family);
    set_int(pair.server, SOL_SOCKET, SO_RCVLOWAT, 10);
    say("SO_RCVLOWAT: set 10, get=%d", get_int(pair.server, SOL_SOCKET, SO_RCVLOWAT));
    char buf[64];
    send_text(pair.client, "12345");
    wait_available(pair.server, 5);
    say("SO_RCVLOWAT: 5 of 10 bytes, poll(100 ms)=%s",
        poll_names(wait_events(pair.server, POLLIN, 100)).c_str());
    int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = pair.server;
    epoll_ctl(ep, EPOLL_CTL_ADD, pair.server, &event);
    epoll_event got[4];
    say("SO_RCVLOWAT: 5 of 10 bytes, epoll_wait=%d", epoll_wait(ep, got, 4, 0));
    fd_set readable;
    FD_ZERO(&readable);
    FD_SET(pair.server, &readable);
    timeval zero{0, 0};
    say("SO_RCVLOWAT: 5 of 10 bytes, select=%d",
        select(pair.server + 1, &readable, nullptr, nullptr, &zero));
    say("SO_RCVLOWAT: 5 of 10 bytes, recv(MSG_PEEK|MSG_DONTWAIT)=%s",
        rc(recv(pair.server, buf, sizeof(buf), MSG_PEEK | MSG_DONTWAIT)).c_str());
    say("SO_RCVLOWAT: 5 of 10 bytes, recv(len 3)=%s", rc(recv(pair.server, buf, 3, 0)).c_str());
    send_text(pair.client, "abcdefgh");
    wait_available(pair.server, 10);
    say("SO_RCVLOWAT: 10 of 10 bytes, poll=%s",
        poll_names(wait_events(pair.server, POLLIN, 0)).c_str());
    say("SO_RCVLOWAT: 10 of 10 bytes, epoll_wait=%d", epoll_wait(ep, got, 4, 0));
    say("SO_RCVLOWAT: 10 of 10 bytes, recv=%s", rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());

    // Below the mark: a non-blocking recv takes what there is; a blocking one with a receive
    // timeout takes it too, once the timeout expires.
    send_text(pair.client, "12345");
    wait_available(pair.server, 5);
    say("SO_RCVLOWAT: 5 of 10 bytes, recv(MSG_DONTWAIT)=%s",
        rc(recv(pair.server, buf, sizeof(buf), MSG_DONTWAIT)).c_str());
    send_text(pair.client, "12345");
    wait_available(pair.server, 5);
    timeval short_wait{0, 100'000};
    setsockopt(pair.server, SOL_SOCKET, SO_RCVTIMEO, &short_wait, sizeof(short_wait));
    say("SO_RCVLOWAT: 5 of 10 bytes, recv with a 100 ms timeout=%s",
        rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());
    timeval forever{0, 0};
    setsockopt(pair.server, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof(forever));

    // A blocking recv sleeps until the mark is reached (Linux wakes a sleeping reader only then,
    // counting none of the bytes it already took: hence one send of all ten).
    std::thread later([&] {
        usleep(100'000);
        send_text(pair.client, "1234567890");
    });
    say("SO_RCVLOWAT: blocking recv, 10 bytes later=%s",
        rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());
    later.join();

    // 0 means 1.
    set_int(pair.server, SOL_SOCKET, SO_RCVLOWAT, 0);
    say("SO_RCVLOWAT: set 0, get=%d", get_int(pair.server, SOL_SOCKET, SO_RCVLOWAT));
    send_text(pair.client, "1");
    say("SO_RCVLOWAT: 1 byte at mark 1, poll=%s",
        poll_names(wait_events(pair.server, POLLIN)).c_str());
    say("SO_RCVLOWAT: recv=%s", rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());

    // The peer's FIN makes the socket readable below the mark.
    set_int(pair.server, SOL_SOCKET, SO_RCVLOWAT, 10);
    send_text(pair.client, "123");
    shutdown(pair.client, SHUT_WR);
    say("SO_RCVLOWAT: 3 bytes then FIN, poll=%s",
        poll_names(wait_bits(pair.server, POLLIN | POLLRDHUP, POLLRDHUP)).c_str());
    say("SO_RCVLOWAT: 3 bytes then FIN, recv=%s",
        rc(recv(pair.server, buf, sizeof(buf), 0)).c_str());
    close(ep);
    pair.close_both();

    // An accepted socket inherits the listener's mark.
    int lfd = listener(family);
    set_int(lfd, SOL_SOCKET, SO_RCVLOWAT, 8);
    int client = connect_to(family, local_port(lfd));
    int server = accept(lfd, nullptr, nullptr);
    say("SO_RCVLOWAT: accepted from a listener at 8, get=%d",
        get_int(server, SOL_SOCKET, SO_RCVLOWAT));
    send_text(client, "1234");
    wait_available(server, 4);
    say("SO_RCVLOWAT: accepted, 4 of 8 bytes, poll(100 ms)=%s",
        poll_names(wait_events(server, POLLIN, 100)).c_str());
    send_text(client, "5678");
    say("SO_RCVLOWAT: accepted, 8 of 8 bytes, poll=%s",
        poll_names(wait_events(server, POLLIN)).c_str());
    close(server);
    close(client);
    close(lfd);
}

// shutdown(SHUT_RD) of a listener drops the connections waiting to be accepted.
void check_listener_shutdown(const Family &family) {
    int lfd = listener(family);
    int client = connect_to(family, local_port(lfd));
    say("listener shutdown: pending connection poll=%s",
        poll_names(wait_events(lfd, POLLIN)).c_str());
    say("listener shutdown: shutdown(SHUT_RD)=%s", rc(shutdown(lfd, SHUT_RD)).c_str());
    // On loopback the RST is through when shutdown() returns (with several engine workers,
    // from the one that holds the accepted connection too).
    pollfd at_once{client, POLLIN, 0};
    say("listener shutdown: old client reset at once=%s",
        yes(poll(&at_once, 1, 0) == 1 && (at_once.revents & POLLERR)));
    say("listener shutdown: listen again=%s", rc(listen(lfd, 16)).c_str());
    set_nonblocking(lfd, true);
    say("listener shutdown: accept after listen again=%s",
        rc(accept(lfd, nullptr, nullptr)).c_str());
    const int seen = wait_events(client, POLLIN);
    char buf[8];
    say("listener shutdown: old client readable=%s recv=%s", yes(seen & POLLIN),
        rc(recv(client, buf, sizeof(buf), MSG_DONTWAIT)).c_str());
    close(client);
    int fresh = connect_to(family, local_port(lfd));
    say("listener shutdown: new connection poll=%s", poll_names(wait_events(lfd, POLLIN)).c_str());
    int accepted = accept(lfd, nullptr, nullptr);
    say("listener shutdown: new connection accepted=%s", yes(accepted >= 0));
    if (accepted >= 0) close(accepted);
    close(fresh);
    close(lfd);
}

// close() of a listener resets the connections waiting to be accepted before it returns: on
// loopback, their clients see the RST at once (with several engine workers, those placed on
// another worker too).
void check_listener_close(const Family &family) {
    int lfd = listener(family);
    int clients[4];
    for (int &client : clients) client = connect_to(family, local_port(lfd));
    say("listener close: pending connections poll=%s",
        poll_names(wait_events(lfd, POLLIN)).c_str());
    // Offloaded, the engine takes them from its kernel listener's queue ahead (into the accept
    // ring); the case is about those, so it waits until it has taken all four. Natively they
    // are in the kernel's queue from the start.
    if (offloaded_run)
        wait_tcp_info(lfd, [](const tcp_info &info) { return info.tcpi_unacked == 0; });
    say("listener close: close=%s", rc(close(lfd)).c_str());
    int reset_at_once = 0;
    for (int client : clients) {
        pollfd p{client, POLLIN, 0};
        if (poll(&p, 1, 0) == 1 && (p.revents & POLLERR)) ++reset_at_once;
    }
    char buf[8];
    say("listener close: clients reset at once=%d of 4, recv=%s", reset_at_once,
        rc(recv(clients[0], buf, sizeof(buf), MSG_DONTWAIT)).c_str());
    for (int client : clients) close(client);
}

void check_bad_input(const Family &family) {
    int spare = dup(0);
    close(spare);  // a descriptor number that is not open
    char buf[8];
    say("bad fd: recv=%s send=%s", rc(recv(spare, buf, 1, 0)).c_str(),
        rc(send(spare, "x", 1, MSG_NOSIGNAL)).c_str());
    say("bad fd: getsockopt=%s close=%s", get_rc(spare, SOL_SOCKET, SO_ERROR).c_str(),
        rc(close(spare)).c_str());
    Address somewhere = loopback(family.af, 1);
    say("bad fd: -1 connect=%s", rc(connect(-1, somewhere.get(), somewhere.len)).c_str());
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    Address name;
    name.len = sizeof(name.storage);
    say("not a socket: recv on a pipe=%s getsockname=%s",
        rc(recv(pipe_fds[0], buf, 1, MSG_DONTWAIT)).c_str(),
        rc(getsockname(pipe_fds[0], name.get(), &name.len)).c_str());
    close(pipe_fds[0]);
    close(pipe_fds[1]);

    int fd = tcp_socket(family.af);
    Address address = loopback(family.af, 1);
    say("bad length: connect addrlen 3=%s", rc(connect(fd, address.get(), 3)).c_str());
    say("bad length: bind addrlen 3=%s", rc(bind(fd, address.get(), 3)).c_str());
    Address wrong = loopback(family.af == AF_INET ? AF_INET6 : AF_INET, 1);
    say("bad family: connect with the other family's address=%s",
        rc(connect(fd, wrong.get(), wrong.len)).c_str());
    Address unspecified = loopback(family.af, 0);
    unspecified.storage.ss_family = AF_UNIX;
    say("bad family: bind an AF_UNIX family address=%s",
        rc(bind(fd, unspecified.get(), unspecified.len)).c_str());
    Address foreign;
    if (family.af == AF_INET) {
        foreign = loopback(AF_INET, 0);
        inet_pton(AF_INET, "192.0.2.1",
                  &reinterpret_cast<sockaddr_in *>(&foreign.storage)->sin_addr);
    } else {
        foreign = loopback(AF_INET6, 0);
        inet_pton(AF_INET6, "2001:db8::1",
                  &reinterpret_cast<sockaddr_in6 *>(&foreign.storage)->sin6_addr);
    }
    say("bad address: bind to an address not on this host=%s",
        rc(bind(fd, foreign.get(), foreign.len)).c_str());
    close(fd);

    Pair pair = connected_pair(family);
    say("connected: listen=%s", rc(listen(pair.client, 4)).c_str());
    Address elsewhere = loopback(family.af, local_port(pair.server));
    say("connected: connect again=%s",
        rc(connect(pair.client, elsewhere.get(), elsewhere.len)).c_str());
    say("bad pointer: setsockopt NULL optval=%s",
        rc(setsockopt(pair.client, SOL_SOCKET, SO_KEEPALIVE, nullptr, sizeof(int))).c_str());
    pair.close_both();

    say("bad protocol: socket(SOCK_STREAM, IPPROTO_UDP)=%s",
        rc(socket(family.af, SOCK_STREAM, IPPROTO_UDP)).c_str());
}

void check_v4_mapped() {
    int lfd = tcp_socket(AF_INET6);
    set_int(lfd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
    Address any = any_v6(0);
    bind(lfd, any.get(), any.len);
    listen(lfd, 4);
    const uint16_t port = local_port(lfd);
    int client = connect_to(kV4, port);
    Address peer;
    peer.len = sizeof(peer.storage);
    int accepted = accept(lfd, peer.get(), &peer.len);
    say("v4-mapped: IPv6 listener on :: accepts from 127.0.0.1, peer family=%s host=%s",
        family_name(peer.storage.ss_family).c_str(), host_of(peer.storage).c_str());
    Address local = local_of(accepted);
    say("v4-mapped: accepted local host=%s", host_of(local.storage).c_str());
    Address client_peer = peer_of(client);
    say("v4-mapped: the IPv4 client sees family=%s host=%s",
        family_name(client_peer.storage.ss_family).c_str(), host_of(client_peer.storage).c_str());
    send_text(client, "mapped");
    say("v4-mapped: data=%s", read_text(accepted, 6).c_str());
    close(accepted);
    close(client);
    close(lfd);

    // An IPv6 client can reach an IPv4 listener through ::ffff:127.0.0.1.
    lfd = listener(kV4);
    int v6 = tcp_socket(AF_INET6);
    Address mapped = loopback(AF_INET6, local_port(lfd));
    inet_pton(AF_INET6, "::ffff:127.0.0.1",
              &reinterpret_cast<sockaddr_in6 *>(&mapped.storage)->sin6_addr);
    say("v4-mapped: IPv6 socket connects to ::ffff:127.0.0.1=%s",
        rc(connect(v6, mapped.get(), mapped.len)).c_str());
    Address v6_peer = peer_of(v6), v6_local = local_of(v6);
    say("v4-mapped: its peer=%s local=%s", host_of(v6_peer.storage).c_str(),
        host_of(v6_local.storage).c_str());
    peer.len = sizeof(peer.storage);
    accepted = accept(lfd, peer.get(), &peer.len);
    say("v4-mapped: the IPv4 listener sees family=%s host=%s",
        family_name(peer.storage.ss_family).c_str(), host_of(peer.storage).c_str());
    close(accepted);
    close(v6);
    close(lfd);

    // IPV6_V6ONLY listener: IPv4 connections are refused.
    lfd = tcp_socket(AF_INET6);
    set_int(lfd, IPPROTO_IPV6, IPV6_V6ONLY, 1);
    bind(lfd, any.get(), any.len);
    listen(lfd, 4);
    int v4 = tcp_socket(AF_INET);
    Address target = loopback(AF_INET, local_port(lfd));
    say("v6only: IPv4 connect to an IPV6_V6ONLY listener=%s",
        rc(connect(v4, target.get(), target.len)).c_str());
    close(v4);
    close(lfd);
}

void check_passthrough() {
    int pair[2];
    say("AF_UNIX: socketpair(SOCK_STREAM)=%s",
        rc(socketpair(AF_UNIX, SOCK_STREAM, 0, pair)).c_str());
    say("AF_UNIX: send=%s", rc(send(pair[0], "unix", 4, 0)).c_str());
    char buf[16] = {};
    say("AF_UNIX: recv=%s data=%s", rc(recv(pair[1], buf, sizeof(buf), 0)).c_str(), buf);
    int available = -1;
    (void)!write(pair[0], "abc", 3);
    wait_events(pair[1], POLLIN);
    ioctl(pair[1], FIONREAD, &available);
    say("AF_UNIX: FIONREAD=%d poll=%s", available,
        poll_names(wait_events(pair[1], POLLIN | POLLOUT, 0)).c_str());
    char link[64] = {};
    std::snprintf(buf, sizeof(buf), "%d", pair[0]);
    (void)!readlink(("/proc/self/fd/" + std::string(buf)).c_str(), link, sizeof(link) - 1);
    say("AF_UNIX: is a kernel socket=%s", yes(std::strncmp(link, "socket:", 7) == 0));
    close(pair[0]);
    close(pair[1]);

    for (const Family &family : {kV4, kV6}) {
        int a = socket(family.af, SOCK_DGRAM, 0), b = socket(family.af, SOCK_DGRAM, 0);
        Address any_port = loopback(family.af, 0);
        bind(a, any_port.get(), any_port.len);
        bind(b, any_port.get(), any_port.len);
        Address to = loopback(family.af, local_port(b));
        say("UDP %s: sendto=%s", family.tag,
            rc(sendto(a, "dgram", 5, 0, to.get(), to.len)).c_str());
        wait_events(b, POLLIN);
        Address from;
        from.len = sizeof(from.storage);
        std::memset(buf, 0, sizeof(buf));
        ssize_t n = recvfrom(b, buf, sizeof(buf), 0, from.get(), &from.len);
        say("UDP %s: recvfrom=%s data=%s from the sender=%s", family.tag, rc(n).c_str(), buf,
            yes(port_of(from.storage) == local_port(a)));
        std::memset(link, 0, sizeof(link));
        (void)!readlink(("/proc/self/fd/" + std::to_string(a)).c_str(), link, sizeof(link) - 1);
        say("UDP %s: is a kernel socket=%s", family.tag,
            yes(std::strncmp(link, "socket:", 7) == 0));
        close(a);
        close(b);
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptors: dup and friends, every way of closing, epoll items across fd reuse, many iovecs,
// MSG_MORE/TCP_CORK, sendfile.

bool is_open(int fd) {
    return fcntl(fd, F_GETFD) >= 0;
}

// The number the next new descriptor gets (the lowest free one).
int lowest_free() {
    const int probe = dup(0);
    close(probe);
    return probe;
}

// Moves a descriptor to number `to` (free) and returns `to`.
int move_to(int fd, int to) {
    if (dup2(fd, to) != to) {
        std::fprintf(stderr, "semantics: dup2 to %d: %s\n", to, std::strerror(errno));
        std::exit(2);
    }
    close(fd);
    return to;
}

// What the peer end `fd` of a connection sees next: "EOF", "data N", an errno name, or
// "nothing" within `timeout_ms`.
std::string peer_sees(int fd, int timeout_ms = kWaitMs) {
    if (!wait_events(fd, POLLIN, timeout_ms)) return "nothing";
    char buf[256];
    const ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n == 0) return "EOF";
    if (n < 0) return err_name(errno);
    return "data " + std::to_string(n);
}

// What a pipe's read end sees next: "EOF", "data N" or "nothing".
std::string pipe_sees(int fd) {
    if (!wait_events(fd, POLLIN)) return "nothing";
    char buf[64];
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n == 0) return "EOF";
    if (n < 0) return err_name(errno);
    return "data " + std::to_string(n);
}

// Connects to `port` until the connection is refused: a listener closed by the last reference
// to it stops accepting. Bounded. Linux refuses at once; the shim closes sockets in the engine
// asynchronously, so a connect may still land in the closing listener (and succeed, or be
// reset) for a moment. Returns the errno name, or "still accepting".
std::string connect_until_refused(const Family &family, uint16_t port) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
    Address address = loopback(family.af, port);
    while (ms_left(deadline) > 0) {
        const int fd = tcp_socket(family.af);
        const int result = connect(fd, address.get(), address.len);
        const int error = errno;
        close(fd);
        if (result != 0 && error != ECONNRESET) return err_name(error);
        usleep(1000);
    }
    return "still accepting";
}

void check_dup(const Family &family) {
    Pair pair = connected_pair(family);
    const int lowest = lowest_free();
    int copy = dup(pair.client);
    say("dup: lowest free number=%s cloexec=%s nonblocking=%s", yes(copy == lowest),
        yes(is_cloexec(copy)), yes(is_nonblocking(copy)));
    say("dup: the copy names the same socket=%s", yes(local_port(copy) == local_port(pair.client)));
    const std::string sent = rc(send(copy, "c1", 2, 0));
    say("dup: send through the copy=%s peer got=%s", sent.c_str(),
        read_text(pair.server, 2).c_str());
    set_nonblocking(copy, true);
    say("dup: O_NONBLOCK set through the copy shows on the original=%s",
        yes(is_nonblocking(pair.client)));
    set_nonblocking(copy, false);
    fcntl(copy, F_SETFD, FD_CLOEXEC);
    say("dup: FD_CLOEXEC is per descriptor: copy=%s original=%s", yes(is_cloexec(copy)),
        yes(is_cloexec(pair.client)));
    const std::string closed = rc(close(pair.client));
    say("dup: close the original=%s, the peer sees=%s", closed.c_str(),
        peer_sees(pair.server, 100).c_str());
    pair.client = copy;
    const std::string again = rc(send(copy, "c2", 2, 0));
    say("dup: the copy still sends=%s peer got=%s", again.c_str(),
        read_text(pair.server, 2).c_str());
    const int second = dup(copy);
    const std::string shut = rc(shutdown(second, SHUT_WR));
    say("dup: shutdown(SHUT_WR) through another copy=%s, the peer sees=%s", shut.c_str(),
        peer_sees(pair.server).c_str());
    close(second);
    say("dup: send through the first copy after that=%s",
        rc(send(copy, "x", 1, MSG_NOSIGNAL)).c_str());
    pair.close_both();

    // fcntl(F_DUPFD/F_DUPFD_CLOEXEC): the lowest free number from the minimum up.
    pair = connected_pair(family);
    const int at100 = fcntl(pair.client, F_DUPFD, 100);
    const int next = fcntl(pair.client, F_DUPFD_CLOEXEC, 100);
    say("F_DUPFD: minimum 100 gives 100=%s cloexec=%s; F_DUPFD_CLOEXEC gives 101=%s cloexec=%s",
        yes(at100 == 100), yes(is_cloexec(at100)), yes(next == 101), yes(is_cloexec(next)));
    const std::string through = rc(send(at100, "dd", 2, 0));
    say("F_DUPFD: send through it=%s peer got=%s", through.c_str(),
        read_text(pair.server, 2).c_str());
    say("F_DUPFD: minimum -1=%s, of a closed fd=%s", rc(fcntl(pair.client, F_DUPFD, -1)).c_str(),
        rc(fcntl(lowest_free(), F_DUPFD, 0)).c_str());
    close(at100);
    close(next);

    // dup3 and dup2 details.
    const int with_flag = dup3(pair.client, 150, O_CLOEXEC);
    say("dup3: O_CLOEXEC=%s cloexec=%s", rc(with_flag).c_str(), yes(is_cloexec(150)));
    const int without = dup3(pair.client, 151, 0);
    say("dup3: no flags=%s cloexec=%s", rc(without).c_str(), yes(is_cloexec(151)));
    say("dup3: onto itself=%s, bad flags=%s (target opened=%s)",
        rc(dup3(pair.client, pair.client, 0)).c_str(), rc(dup3(pair.client, 152, 1)).c_str(),
        yes(is_open(152)));
    close(150);
    close(151);
    say("dup2: onto itself returns it=%s, onto -1=%s",
        yes(dup2(pair.client, pair.client) == pair.client), rc(dup2(pair.client, -1)).c_str());
    const std::string bad_source = rc(dup2(lowest_free(), pair.client));
    say("dup2: a closed fd onto a socket=%s, the socket still sends=%s", bad_source.c_str(),
        rc(send(pair.client, "ok", 2, 0)).c_str());
    read_text(pair.server, 2);

    // dup2 of a socket onto another connection's fd: that connection is closed.
    Pair other = connected_pair(family);
    const std::string over = yes(dup2(pair.client, other.client) == other.client);
    say("dup2: a socket onto another socket's fd ok=%s, the other's peer sees=%s", over.c_str(),
        peer_sees(other.server).c_str());
    const std::string moved = rc(send(other.client, "d2", 2, 0));
    say("dup2: send through the replaced fd=%s reaches the first peer=%s", moved.c_str(),
        read_text(pair.server, 2).c_str());
    close(other.client);
    other.client = -1;
    say("dup2: closing the replaced fd, the first peer sees=%s",
        peer_sees(pair.server, 100).c_str());
    other.close_both();

    // dup2 of a kernel fd onto a socket: the socket is closed, the number is the pipe's.
    Pair third = connected_pair(family);
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    const std::string pipe_over = yes(dup2(pipe_fds[0], third.client) == third.client);
    say("dup2: a pipe onto a socket's fd ok=%s, the socket's peer sees=%s", pipe_over.c_str(),
        peer_sees(third.server).c_str());
    (void)!write(pipe_fds[1], "pp", 2);
    char buf[8] = {};
    const std::string got = rc(read(third.client, buf, sizeof(buf)));
    say("dup2: read from that fd=%s data=%s, SO_TYPE=%s", got.c_str(), buf,
        get_rc(third.client, SOL_SOCKET, SO_TYPE).c_str());
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    third.close_both();

    // dup2 of a socket onto a kernel fd: the pipe end is closed, the number is the socket's.
    if (pipe(pipe_fds) != 0) std::exit(2);
    const std::string onto_pipe = yes(dup2(pair.client, pipe_fds[1]) == pipe_fds[1]);
    say("dup2: a socket onto a pipe's write end ok=%s, the pipe's reader sees=%s",
        onto_pipe.c_str(), pipe_sees(pipe_fds[0]).c_str());
    const std::string via_pipe_number = rc(send(pipe_fds[1], "qq", 2, 0));
    say("dup2: send through that fd=%s peer got=%s", via_pipe_number.c_str(),
        read_text(pair.server, 2).c_str());
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    pair.close_both();

    // A listener's copy accepts; the listener lives while a copy does.
    int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    int listen_copy = dup(lfd);
    close(lfd);
    int client = connect_to(family, port);
    int accepted = accept(listen_copy, nullptr, nullptr);
    say("dup: a listener's copy accepts after the original is closed=%s", yes(accepted >= 0));
    close(accepted);
    close(client);
    close(listen_copy);
    say("dup: after the copy is closed too, connect=%s",
        connect_until_refused(family, port).c_str());
}

void check_close_paths(const Family &family) {
    Pair pair = connected_pair(family);
    const std::string shut = rc(shutdown(pair.client, SHUT_RDWR));
    const std::string closed = rc(close(pair.client));
    say("close: after shutdown(SHUT_RDWR)=%s close=%s, the peer sees=%s", shut.c_str(),
        closed.c_str(), peer_sees(pair.server).c_str());
    say("close: again=%s", rc(close(pair.client)).c_str());
    pair.client = -1;
    pair.close_both();

    // close_range over two connections, a listener and a pipe end moved to 200-203.
    Pair a = connected_pair(family), b = connected_pair(family);
    int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    move_to(a.client, 200);
    move_to(b.client, 201);
    move_to(lfd, 202);
    move_to(pipe_fds[1], 203);
    say("close_range(200, 210, 0)=%s", rc(close_range(200, 210, 0)).c_str());
    say("close_range: all closed=%s, the peers see=%s and %s, the pipe reader sees=%s",
        yes(!is_open(200) && !is_open(201) && !is_open(202) && !is_open(203)),
        peer_sees(a.server).c_str(), peer_sees(b.server).c_str(), pipe_sees(pipe_fds[0]).c_str());
    say("close_range: connect to the closed listener=%s",
        connect_until_refused(family, port).c_str());
    close(pipe_fds[0]);
    close(a.server);
    close(b.server);

    // CLOSE_RANGE_CLOEXEC closes nothing.
    Pair c = connected_pair(family);
    c.client = move_to(c.client, 220);
    const std::string cloexec = rc(close_range(220, 230, CLOSE_RANGE_CLOEXEC));
    const std::string still = rc(send(c.client, "ce", 2, 0));
    say("close_range(CLOSE_RANGE_CLOEXEC)=%s open=%s cloexec=%s send=%s peer got=%s",
        cloexec.c_str(), yes(is_open(220)), yes(is_cloexec(220)), still.c_str(),
        read_text(c.server, 2).c_str());
    say("close_range: first > last=%s, unknown flag=%s", rc(close_range(230, 220, 0)).c_str(),
        rc(close_range(220, 230, 1u << 5)).c_str());
    c.close_both();

    // closefrom: everything from 240 up, and the process goes on.
    Pair d = connected_pair(family), e = connected_pair(family);
    move_to(d.client, 240);
    move_to(e.client, 250);
    closefrom(240);
    int open_above = 0;
    for (int fd = 240; fd < 65536; ++fd) open_above += is_open(fd) ? 1 : 0;
    say("closefrom(240): descriptors open from 240 up=%d, the peers see=%s and %s", open_above,
        peer_sees(d.server).c_str(), peer_sees(e.server).c_str());
    close(d.server);
    close(e.server);
    Pair after = connected_pair(family);
    const std::string works = rc(send(after.client, "af", 2, 0));
    say("closefrom: a new connection afterwards sends=%s peer got=%s", works.c_str(),
        read_text(after.server, 2).c_str());
    after.close_both();

    // syscall() with the close numbers, and another number passing through.
    Pair f = connected_pair(family);
    const long direct = syscall(SYS_close, f.client);
    say("syscall(SYS_close)=%ld, the peer sees=%s, again=%s", direct, peer_sees(f.server).c_str(),
        rc(syscall(SYS_close, f.client)).c_str());
    f.client = -1;
    f.close_both();
    Pair g = connected_pair(family), h = connected_pair(family);
    move_to(g.client, 260);
    move_to(h.client, 261);
    const long ranged = syscall(SYS_close_range, 260, 261, 0);
    say("syscall(SYS_close_range)=%ld, the peers see=%s and %s", ranged,
        peer_sees(g.server).c_str(), peer_sees(h.server).c_str());
    close(g.server);
    close(h.server);
    say("syscall(SYS_getpid) is getpid()=%s, syscall(SYS_close) of a closed fd=%s",
        yes(syscall(SYS_getpid) == getpid()), rc(syscall(SYS_close, lowest_free())).c_str());
    // Six arguments, the last one passed on the stack.
    void *page = reinterpret_cast<void *>(syscall(SYS_mmap, nullptr, 4096, PROT_READ | PROT_WRITE,
                                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    say("syscall(SYS_mmap) with six arguments maps a page=%s", yes(page != MAP_FAILED));
    if (page != MAP_FAILED) munmap(page, 4096);

    // A vfork()ed child's dups and closes act on its own descriptor table only.
    Pair v = connected_pair(family);
    const pid_t child = vfork();
    if (child == 0) {
        dup2(v.client, 300);
        (void)!dup(v.client);
        close(v.client);
        close_range(3, ~0u, 0);
        _exit(0);
    }
    int status = -1;
    if (child > 0) waitpid(child, &status, 0);
    const std::string parent_sends = rc(send(v.client, "vf", 2, 0));
    say("vfork: the child dup2'ed, closed and close_range'd; the parent's socket sends=%s peer "
        "got=%s, fd 300 open in the parent=%s",
        parent_sends.c_str(), read_text(v.server, 2).c_str(), yes(is_open(300)));
    if (pipe(pipe_fds) != 0) std::exit(2);
    move_to(pipe_fds[0], 300);
    (void)!write(pipe_fds[1], "p3", 2);
    say("vfork: then a pipe moved to 300 reads=%s", pipe_sees(300).c_str());
    close(300);
    close(pipe_fds[1]);
    v.close_both();

    // fdopen + stdio + fclose.
    Pair s = connected_pair(family);
    FILE *file = fdopen(s.client, "r+");
    say("fdopen(r+): ok=%s fileno is the fd=%s", yes(file != nullptr),
        yes(file && fileno(file) == s.client));
    if (file) {
        std::fputs("stdio\n", file);
        const int flushed = std::fflush(file);
        say("fdopen: fputs+fflush=%d peer got=%s", flushed, read_text(s.server, 5).c_str());
        read_text(s.server, 1);
        send_text(s.server, "reply line\n");
        char line[64] = {};
        const bool read_line = std::fgets(line, sizeof(line), file) != nullptr;
        line[std::strcspn(line, "\n")] = '\0';
        say("fdopen: fgets=%s line=%s", yes(read_line), line);
        say("fdopen: fseek=%s", rc(std::fseek(file, 0, SEEK_SET)).c_str());
        const std::string fclosed = rc(std::fclose(file));
        say("fclose=%s, the peer sees=%s, the fd is open=%s", fclosed.c_str(),
            peer_sees(s.server).c_str(), yes(is_open(s.client)));
    }
    s.client = -1;
    s.close_both();
    s = connected_pair(family);
    file = fdopen(s.client, "r");
    const std::string read_only = yes(file != nullptr);
    const std::string fclosed = file ? rc(std::fclose(file)) : "none";
    say("fdopen(r)=%s fclose=%s, the peer sees=%s", read_only.c_str(), fclosed.c_str(),
        peer_sees(s.server).c_str());
    s.client = -1;
    s.close_both();
    s = connected_pair(family);
    file = fdopen(s.client, "q");
    say("fdopen with a bad mode=%s %s", file ? "stream" : "NULL", err_name(errno).c_str());
    s.close_both();
}

// A thread blocked in a call on a socket while another thread closes the socket's fd.
struct BlockedCall {
    std::atomic<pid_t> tid{0};
    std::atomic<bool> done{false};
    long result = 0;
    int error = 0;
    std::thread thread;

    template <class Call>
    void start(Call call) {
        thread = std::thread([this, call] {
            tid = static_cast<pid_t>(syscall(SYS_gettid));
            result = call();
            error = errno;
            done = true;
        });
        const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
        while (tid.load() == 0 && ms_left(deadline) > 0) usleep(1000);
        wait_thread_sleeping(tid.load());
    }
    bool wait(int timeout_ms) {
        const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
        while (!done.load() && ms_left(deadline) > 0) usleep(1000);
        return done.load();
    }
    // Bounded: a call still blocked after the bound is interrupted (SIGUSR1, no SA_RESTART).
    void finish() {
        for (int i = 0; i < 50 && !wait(100); ++i) pthread_kill(thread.native_handle(), SIGUSR1);
        thread.join();
    }
    std::string outcome() const {
        if (!done.load()) return "TIMEOUT";
        if (result >= 0) return std::to_string(result);
        return std::to_string(result) + " " + err_name(error);
    }
};

void check_close_while_blocked(const Family &family) {
    install(SIGUSR1, count_sigusr1, false);
    Pair pair = connected_pair(family);
    {
        BlockedCall call;
        char buf[16];
        call.start([fd = pair.server, &buf] { return recv(fd, buf, sizeof(buf), 0); });
        say("close while blocked: close(fd) under a blocked recv=%s",
            rc(close(pair.server)).c_str());
        // Linux neither wakes the call nor closes the socket: the call holds it.
        say("close while blocked: recv still blocked 200 ms later=%s", yes(!call.wait(200)));
        send_text(pair.client, "wake");
        call.wait(kWaitMs);
        call.finish();
        say("close while blocked: recv after the peer sent=%s", call.outcome().c_str());
        say("close while blocked: when recv returned, the peer sees=%s",
            peer_sees(pair.client).c_str());
    }
    pair.server = -1;
    pair.close_both();

    int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    {
        BlockedCall call;
        call.start([lfd] { return static_cast<long>(accept(lfd, nullptr, nullptr)); });
        say("close while blocked: close(fd) under a blocked accept=%s", rc(close(lfd)).c_str());
        say("close while blocked: accept still blocked 200 ms later=%s", yes(!call.wait(200)));
        int client = tcp_socket(family.af);
        Address address = loopback(family.af, port);
        const std::string connected = rc(connect(client, address.get(), address.len));
        call.wait(kWaitMs);
        call.finish();
        say("close while blocked: connect=%s, accept returned a connection=%s", connected.c_str(),
            yes(call.done.load() && call.result >= 0));
        if (call.done.load() && call.result >= 0) close(static_cast<int>(call.result));
        close(client);
        say("close while blocked: when accept returned, connect=%s",
            connect_until_refused(family, port).c_str());
    }

    // A send that sleeps for room in a full socket.
    pair = connected_pair(family);
    std::vector<char> chunk(65536, 'f');
    uint64_t queued = 0;
    const auto fill_deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 4);
    for (bool took_more = true; took_more && ms_left(fill_deadline) > 0;) {
        took_more = false;
        for (ssize_t n; (n = send(pair.client, chunk.data(), chunk.size(), MSG_DONTWAIT)) > 0;) {
            queued += static_cast<uint64_t>(n);
            took_more = true;
        }
        if (wait_events(pair.client, POLLOUT, 200) & POLLOUT) took_more = true;
    }
    {
        BlockedCall call;
        call.start([fd = pair.client, &chunk] {
            return send(fd, chunk.data(), chunk.size(), MSG_NOSIGNAL);
        });
        say("close while blocked: close(fd) under a blocked send=%s",
            rc(close(pair.client)).c_str());
        say("close while blocked: send still blocked 200 ms later=%s", yes(!call.wait(200)));
        // The peer drains everything: the send completes, and then the connection ends.
        uint64_t drained = 0;
        bool eof = false;
        std::vector<char> buf(65536);
        const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs * 2);
        while (!eof && ms_left(deadline) > 0) {
            if (!wait_events(pair.server, POLLIN, ms_left(deadline))) break;
            const ssize_t n = recv(pair.server, buf.data(), buf.size(), MSG_DONTWAIT);
            if (n == 0) eof = true;
            if (n > 0) drained += static_cast<uint64_t>(n);
        }
        call.finish();
        say("close while blocked: send after the peer drained=%s, the peer got every byte=%s "
            "then EOF=%s",
            call.outcome().c_str(), yes(drained == queued + chunk.size()), yes(eof));
    }
    pair.client = -1;
    pair.close_both();
    install(SIGUSR1, SIG_DFL, false);
}

// epoll_wait's events, sorted by their data (the order is not part of Linux's contract).
std::string epoll_tags(int ep, int timeout_ms) {
    epoll_event events[8];
    const int n = epoll_count(ep, events, 8, timeout_ms);
    if (n <= 0) return std::to_string(n);
    for (int i = 1; i < n; ++i)  // insertion sort: a handful of events
        for (int j = i; j > 0 && events[j - 1].data.u64 > events[j].data.u64; --j)
            std::swap(events[j - 1], events[j]);
    std::string out = std::to_string(n) + ":";
    for (int i = 0; i < n; ++i)
        out += " tag " + std::to_string(events[i].data.u64) + " " + epoll_names(events[i].events);
    return out;
}

int epoll_add(int ep, int fd, uint64_t tag) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.u64 = tag;
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &event);
}

// EPOLL_CTL_ADD, then what epoll_wait reports: "0, then 1: tag 2 EPOLLIN".
std::string add_and_wait(int ep, int fd, uint64_t tag) {
    const std::string added = rc(epoll_add(ep, fd, tag));
    return added + ", then " + epoll_tags(ep, kWaitMs);
}

void check_epoll_reuse(const Family &family) {
    const int ep = epoll_create1(EPOLL_CLOEXEC);
    int lfd = listener(family);
    const uint16_t port = local_port(lfd);

    // A member closed (its last fd): a new socket that gets its number is not a member.
    int client1 = connect_to(family, port);
    int server1 = accept(lfd, nullptr, nullptr);
    epoll_add(ep, server1, 1);
    int client2 = connect_to(family, port);
    const int number = server1;
    close(server1);
    int server2 = accept(lfd, nullptr, nullptr);
    say("epoll reuse: a new socket got a closed member's number=%s", yes(server2 == number));
    send_text(client2, "n");
    wait_available(server2, 1);
    say("epoll reuse: data on the new socket, not added=%s", epoll_tags(ep, 100).c_str());
    say("epoll reuse: add it=%s", add_and_wait(ep, server2, 2).c_str());

    // The same with a pipe taking the number.
    const int number2 = server2;
    close(server2);
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    say("epoll reuse: a pipe got a closed member's number=%s", yes(pipe_fds[0] == number2));
    (void)!write(pipe_fds[1], "p", 1);
    say("epoll reuse: data in the pipe, not added=%s", epoll_tags(ep, 100).c_str());
    say("epoll reuse: add it=%s", add_and_wait(ep, pipe_fds[0], 3).c_str());
    close(pipe_fds[0]);
    close(pipe_fds[1]);

    // A pipe member closed: a socket that gets its number is not a member.
    if (pipe(pipe_fds) != 0) std::exit(2);
    epoll_add(ep, pipe_fds[0], 4);
    const int pipe_number = pipe_fds[0];
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    int client3 = connect_to(family, port);
    int server3 = accept(lfd, nullptr, nullptr);
    say("epoll reuse: a socket got a closed pipe member's number=%s", yes(client3 == pipe_number));
    send_text(server3, "s");
    wait_available(client3, 1);
    say("epoll reuse: data on that socket, not added=%s", epoll_tags(ep, 100).c_str());
    say("epoll reuse: add it=%s", add_and_wait(ep, client3, 5).c_str());
    epoll_ctl(ep, EPOLL_CTL_DEL, client3, nullptr);
    read_text(client3, 1);

    // A member whose fd is closed while a dup keeps the socket: still reported, under the
    // closed fd's registration, and out of reach of EPOLL_CTL_DEL.
    epoll_add(ep, server3, 6);
    const int kept = dup(server3);
    const int number3 = server3;
    close(server3);
    send_text(client3, "z");
    wait_available(kept, 1);
    say("epoll dup: the closed fd's registration still reports=%s",
        epoll_tags(ep, kWaitMs).c_str());
    say("epoll dup: EPOLL_CTL_DEL by the closed number=%s, by the copy=%s",
        rc(epoll_ctl(ep, EPOLL_CTL_DEL, number3, nullptr)).c_str(),
        rc(epoll_ctl(ep, EPOLL_CTL_DEL, kept, nullptr)).c_str());
    int client4 = connect_to(family, port);
    int server4 = accept(lfd, nullptr, nullptr);
    say("epoll dup: a new socket got the closed number=%s, add it=%s", yes(client4 == number3),
        rc(epoll_add(ep, client4, 7)).c_str());
    send_text(server4, "y");
    wait_available(client4, 1);
    say("epoll dup: both registrations report=%s", epoll_tags(ep, kWaitMs).c_str());
    close(kept);
    say("epoll dup: after the copy is closed=%s", epoll_tags(ep, kWaitMs).c_str());

    // dup2 of a pipe over a member: the socket leaves the set; the pipe is not in it.
    if (pipe(pipe_fds) != 0) std::exit(2);
    dup2(pipe_fds[0], client4);
    (void)!write(pipe_fds[1], "w", 1);
    wait_events(client4, POLLIN);
    say("epoll dup2: a pipe over a member's fd, data in the pipe=%s", epoll_tags(ep, 100).c_str());
    say("epoll dup2: add it=%s", add_and_wait(ep, client4, 8).c_str());
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    close(client4);
    close(server4);
    close(client3);
    close(client2);
    close(client1);
    close(lfd);
    close(ep);
}

void check_many_iovecs(const Family &family) {
    Pair pair = connected_pair(family);
    const std::vector<uint8_t> pattern = deterministic_bytes(IOV_MAX, 0x10f);
    std::vector<uint8_t> landing(IOV_MAX + 1);
    std::vector<iovec> out(IOV_MAX + 1), in(IOV_MAX + 1);
    for (size_t i = 0; i <= IOV_MAX; ++i) {
        out[i] = {const_cast<uint8_t *>(&pattern[i % IOV_MAX]), 1};
        in[i] = {&landing[i], 1};
    }
    std::vector<uint8_t> got(IOV_MAX);
    auto arrived_intact = [&] {
        return read_exact(pair.server, got.data(), got.size()) == IOV_MAX && got == pattern;
    };
    const std::string full = rc(writev(pair.client, out.data(), IOV_MAX));
    say("iovecs: writev of IOV_MAX 1-byte iovecs=%s, intact=%s", full.c_str(),
        yes(arrived_intact()));
    say("iovecs: writev of IOV_MAX + 1=%s",
        rc(writev(pair.client, out.data(), IOV_MAX + 1)).c_str());
    msghdr msg{};
    msg.msg_iov = out.data();
    msg.msg_iovlen = IOV_MAX;
    const std::string via_msg = rc(sendmsg(pair.client, &msg, 0));
    say("iovecs: sendmsg of IOV_MAX=%s, intact=%s", via_msg.c_str(), yes(arrived_intact()));
    msg.msg_iovlen = IOV_MAX + 1;
    say("iovecs: sendmsg of IOV_MAX + 1=%s", rc(sendmsg(pair.client, &msg, 0)).c_str());

    send_all(pair.server, pattern.data(), pattern.size());
    wait_available(pair.client, IOV_MAX);
    const std::string scattered = rc(readv(pair.client, in.data(), IOV_MAX));
    say("iovecs: readv into IOV_MAX 1-byte iovecs=%s, intact=%s", scattered.c_str(),
        yes(std::equal(pattern.begin(), pattern.end(), landing.begin())));
    say("iovecs: readv of IOV_MAX + 1=%s", rc(readv(pair.client, in.data(), IOV_MAX + 1)).c_str());
    msghdr rmsg{};
    rmsg.msg_iov = in.data();
    rmsg.msg_iovlen = IOV_MAX + 1;
    say("iovecs: recvmsg of IOV_MAX + 1=%s", rc(recvmsg(pair.client, &rmsg, MSG_DONTWAIT)).c_str());

    // Every other iovec empty.
    for (size_t i = 0; i < IOV_MAX; i += 2) out[i].iov_len = 0;
    const std::string sparse = rc(writev(pair.client, out.data(), IOV_MAX));
    say("iovecs: writev of IOV_MAX with half of them empty=%s peer got=%zd", sparse.c_str(),
        read_exact(pair.server, got.data(), IOV_MAX / 2));

    // MSG_MORE and TCP_CORK: the bytes arrive all the same.
    const std::string more = rc(send(pair.client, "ab", 2, MSG_MORE));
    const std::string rest = rc(send(pair.client, "cd", 2, 0));
    say("MSG_MORE: send(MSG_MORE)=%s then send=%s, peer got=%s", more.c_str(), rest.c_str(),
        read_text(pair.server, 4).c_str());
    const std::string alone = rc(send(pair.client, "ef", 2, MSG_MORE));
    say("MSG_MORE: a last send(MSG_MORE)=%s, peer gets it anyway=%s", alone.c_str(),
        read_text(pair.server, 2).c_str());
    const int before = get_int(pair.client, IPPROTO_TCP, TCP_CORK);
    int on = 1;
    const std::string corked = rc(setsockopt(pair.client, IPPROTO_TCP, TCP_CORK, &on, sizeof(on)));
    say("TCP_CORK: default=%d set=%s reads back %d", before, corked.c_str(),
        get_int(pair.client, IPPROTO_TCP, TCP_CORK));
    const std::string while_corked = rc(send(pair.client, "gh", 2, 0));
    int off = 0;
    const std::string uncorked =
        rc(setsockopt(pair.client, IPPROTO_TCP, TCP_CORK, &off, sizeof(off)));
    say("TCP_CORK: send while corked=%s, uncork=%s, peer got=%s", while_corked.c_str(),
        uncorked.c_str(), read_text(pair.server, 2).c_str());
    pair.close_both();
}

// TCP_CORK and TCP_NODELAY: the shim answers them itself and the engine applies them later, so
// check what reads back (values, lengths, inheritance by accepted sockets) and that a cork set
// before connect() really holds a partial segment back until it is cleared.
void check_cork_and_nodelay(const Family &family) {
    int lfd = tcp_socket(family.af);
    set_int(lfd, IPPROTO_TCP, TCP_NODELAY, 1);
    set_int(lfd, IPPROTO_TCP, TCP_CORK, 1);
    Address address = loopback(family.af, 0);
    if (bind(lfd, address.get(), address.len) != 0 || listen(lfd, 4) != 0) std::exit(2);
    int client = tcp_socket(family.af);
    for (int value : {7, -1, 0, 1}) {
        const std::string set =
            rc(setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &value, sizeof(value)));
        say("cork/nodelay: unconnected TCP_NODELAY set %d=%s reads back %d", value, set.c_str(),
            get_int(client, IPPROTO_TCP, TCP_NODELAY));
    }
    int on = 1;
    const std::string corked = rc(setsockopt(client, IPPROTO_TCP, TCP_CORK, &on, sizeof(on)));
    const int reads_back = get_int(client, IPPROTO_TCP, TCP_CORK);
    const std::string short_len = rc(setsockopt(client, IPPROTO_TCP, TCP_CORK, &on, 3));
    say("cork/nodelay: unconnected TCP_CORK set 1=%s reads back %d, short optlen=%s",
        corked.c_str(), reads_back, short_len.c_str());
    for (socklen_t room : {socklen_t{0}, socklen_t{2}, socklen_t{8}}) {
        unsigned char bytes[8];
        std::memset(bytes, 0xee, sizeof(bytes));
        socklen_t len = room;
        const std::string got = rc(getsockopt(client, IPPROTO_TCP, TCP_CORK, bytes, &len));
        say("cork/nodelay: TCP_CORK get with optlen %u=%s optlen now %u first byte %u",
            unsigned(room), got.c_str(), unsigned(len), unsigned(bytes[0]));
    }
    Address to = loopback(family.af, local_port(lfd));
    if (connect(client, to.get(), to.len) != 0) std::exit(2);
    int server = accept(lfd, nullptr, nullptr);
    say("cork/nodelay: accepted from a listener with both set: TCP_NODELAY=%d TCP_CORK=%d",
        get_int(server, IPPROTO_TCP, TCP_NODELAY), get_int(server, IPPROTO_TCP, TCP_CORK));
    // A 2-byte segment under a cork waits for the uncork (or Linux's 200 ms cork timer).
    const std::string sent = rc(send(client, "ij", 2, 0));
    const bool early = wait_events(server, POLLIN, 50) != 0;
    int off = 0;
    const std::string uncorked = rc(setsockopt(client, IPPROTO_TCP, TCP_CORK, &off, sizeof(off)));
    say("cork/nodelay: send while corked=%s arrived within 50 ms=%s, uncork=%s, peer got=%s",
        sent.c_str(), yes(early), uncorked.c_str(), read_text(server, 2).c_str());
    close(server);
    close(client);
    close(lfd);
}

void check_accept4_flags(const Family &family) {
    int lfd = listener(family);
    const uint16_t port = local_port(lfd);
    struct Case {
        const char *name;
        int flags;
    };
    for (const Case &c :
         {Case{"SOCK_CLOEXEC", SOCK_CLOEXEC}, Case{"SOCK_NONBLOCK", SOCK_NONBLOCK}, Case{"0", 0}}) {
        int client = connect_to(family, port);
        int accepted = accept4(lfd, nullptr, nullptr, c.flags);
        const int fl = fcntl(accepted, F_GETFL);
        say("accept4(%s): F_GETFL is O_RDWR%s=%s, FD_CLOEXEC=%s", c.name,
            (c.flags & SOCK_NONBLOCK) ? "|O_NONBLOCK" : "",
            yes(fl == (O_RDWR | ((c.flags & SOCK_NONBLOCK) ? O_NONBLOCK : 0))),
            yes(is_cloexec(accepted)));
        close(accepted);
        close(client);
    }
    // A non-blocking listener's accepted sockets are blocking, unless asked.
    set_nonblocking(lfd, true);
    int client = connect_to(family, port);
    wait_events(lfd, POLLIN);
    int accepted = accept4(lfd, nullptr, nullptr, 0);
    say("accept4: from a non-blocking listener, flags 0: nonblocking=%s",
        yes(is_nonblocking(accepted)));
    close(accepted);
    close(client);
    close(lfd);
}

// A reset by a socket of this host is seen by its peer by the time the close() that sent it
// returns (TLS servers and CPython's tests look right after it).
void check_reset_seen(const Family &family) {
    for (int round = 0; round < 3; ++round) {
        Pair pair = connected_pair(family);
        reset_close(pair.server);
        sockaddr_storage peer{};
        socklen_t len = sizeof(peer);
        say("reset seen: getpeername right after the peer's reset=%s",
            rc(getpeername(pair.client, reinterpret_cast<sockaddr *>(&peer), &len)).c_str());
        say("reset seen: poll=%s",
            poll_names(wait_events(pair.client, POLLIN | POLLOUT, 0)).c_str());
        char byte;
        say("reset seen: recv=%s", rc(recv(pair.client, &byte, 1, MSG_DONTWAIT)).c_str());
        close(pair.client);
    }
}

// Urgent data (MSG_OOB): ftplib's abort sends it, asyncore's handle_expt waits for it.
void check_urgent(const Family &family) {
    for (const int inline_oob : {0, 1}) {
        Pair pair = connected_pair(family);
        set_int(pair.server, SOL_SOCKET, SO_OOBINLINE, inline_oob);
        const char *how = inline_oob ? "urgent inline" : "urgent";
        char byte = 0;
        int mark = -1;
        say("%s: recv(MSG_OOB) with none=%s", how,
            rc(recv(pair.server, &byte, 1, MSG_OOB)).c_str());
        ioctl(pair.server, SIOCATMARK, &mark);
        say("%s: SIOCATMARK with none=%d", how, mark);
        send(pair.client, "hello", 5, 0);
        say("%s: send(MSG_OOB)=%s", how, rc(send(pair.client, "!", 1, MSG_OOB)).c_str());
        send(pair.client, "world", 5, 0);
        const int mask = wait_bits(pair.server, POLLIN | POLLPRI, POLLIN | POLLPRI);
        say("%s: poll=%s", how, poll_names(mask).c_str());
        fd_set except;
        FD_ZERO(&except);
        FD_SET(pair.server, &except);
        timeval none{0, 0};
        say("%s: select exceptfds=%s", how,
            rc(select(pair.server + 1, nullptr, nullptr, &except, &none)).c_str());
        ioctl(pair.server, SIOCATMARK, &mark);
        say("%s: SIOCATMARK before reading=%d", how, mark);
        char buf[64] = {};
        // The first read stops at the mark, whatever is behind it.
        say("%s: recv=%s data=%s", how, rc(recv(pair.server, buf, sizeof(buf), 0)).c_str(), buf);
        ioctl(pair.server, SIOCATMARK, &mark);
        say("%s: SIOCATMARK at the mark=%d", how, mark);
        byte = 0;
        const long peeked = recv(pair.server, &byte, 1, MSG_OOB | MSG_PEEK);
        say("%s: recv(MSG_OOB|MSG_PEEK)=%s byte=%c", how, rc(peeked).c_str(), byte ? byte : '-');
        msghdr msg{};
        iovec iov{&byte, 1};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        byte = 0;
        const long taken = recvmsg(pair.server, &msg, MSG_OOB);
        say("%s: recvmsg(MSG_OOB)=%s byte=%c MSG_OOB in msg_flags=%s", how, rc(taken).c_str(),
            byte ? byte : '-', yes(taken >= 0 && (msg.msg_flags & MSG_OOB)));
        say("%s: recv(MSG_OOB) again=%s", how, rc(recv(pair.server, &byte, 1, MSG_OOB)).c_str());
        say("%s: POLLPRI after=%s", how, yes(wait_events(pair.server, POLLPRI, 0) & POLLPRI));
        const size_t rest = inline_oob ? 6 : 5;
        std::memset(buf, 0, sizeof(buf));
        say("%s: the rest=%s data=%s", how, rc(read_exact(pair.server, buf, rest)).c_str(), buf);
        ioctl(pair.server, SIOCATMARK, &mark);
        say("%s: SIOCATMARK past the mark=%d", how, mark);
        pair.close_both();
    }
    // asyncore's handle_expt: the interest (EPOLLPRI, POLLPRI) comes first, on a socket with
    // nothing to read, and the urgent byte comes alone afterwards.
    Pair pair = connected_pair(family);
    const int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_event interest{};
    interest.events = EPOLLIN | EPOLLPRI;
    interest.data.fd = pair.server;
    epoll_ctl(ep, EPOLL_CTL_ADD, pair.server, &interest);
    say("urgent later: poll before=%s",
        poll_names(wait_events(pair.server, POLLIN | POLLPRI, 0)).c_str());
    say("urgent later: send(MSG_OOB)=%s", rc(send(pair.client, "!", 1, MSG_OOB)).c_str());
    say("urgent later: poll=%s",
        poll_names(wait_bits(pair.server, POLLIN | POLLPRI | POLLOUT, POLLPRI)).c_str());
    epoll_event got{};
    const int ready = epoll_wait(ep, &got, 1, kWaitMs);
    say("urgent later: epoll_wait=%d events=%s", ready,
        ready == 1 ? epoll_names(got.events).c_str() : "-");
    char byte = 0;
    const long taken = recv(pair.server, &byte, 1, MSG_OOB);
    say("urgent later: recv(MSG_OOB)=%s byte=%c", rc(taken).c_str(), byte ? byte : '-');
    say("urgent later: poll after=%s",
        poll_names(wait_events(pair.server, POLLIN | POLLPRI, 0)).c_str());
    close(ep);
    pair.close_both();
}

// splice() between a socket and a pipe (HAProxy's splice-auto forwards this way): every byte
// through, in order, both ways; the pipe's room honoured; the errors of bad ends.
void check_splice(const Family &family) {
    constexpr size_t kBytes = 300000;  // several rings and several pipes' worth
    const std::vector<uint8_t> content = deterministic_bytes(kBytes, 0x5711ce);
    Pair pair = connected_pair(family);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) std::exit(2);
    // The pipe's ends, blocking: the other side always comes (a thread of ours).
    auto pipe_read = [](int fd, void *buf, size_t n) {
        size_t done = 0;
        while (done < n) {
            const ssize_t got = read(fd, static_cast<char *>(buf) + done, n - done);
            if (got <= 0) break;
            done += static_cast<size_t>(got);
        }
        return static_cast<ssize_t>(done);
    };
    auto write_all = [](int fd, const void *buf, size_t n) {
        size_t done = 0;
        while (done < n) {
            const ssize_t put = write(fd, static_cast<const char *>(buf) + done, n - done);
            if (put <= 0) break;
            done += static_cast<size_t>(put);
        }
    };
    // Socket to pipe: the client sends, splice moves to the pipe, we drain the pipe.
    std::thread sender([&] { send_all(pair.client, content.data(), kBytes); });
    std::vector<uint8_t> got;
    bool moved_ok = true;
    while (got.size() < kBytes) {
        const ssize_t n = splice(pair.server, nullptr, pipe_fds[1], nullptr, 70000, 0);
        if (n <= 0) {
            moved_ok = false;
            break;
        }
        std::vector<uint8_t> chunk(static_cast<size_t>(n));
        if (pipe_read(pipe_fds[0], chunk.data(), chunk.size()) != n) moved_ok = false;
        got.insert(got.end(), chunk.begin(), chunk.end());
    }
    sender.join();
    say("splice socket->pipe: all bytes in order=%s",
        yes(moved_ok && got.size() == kBytes &&
            std::equal(got.begin(), got.end(), content.begin())));
    // A full pipe: non-blocking splice says EAGAIN, and no byte is lost.
    const int pipe_size = fcntl(pipe_fds[1], F_GETPIPE_SZ);
    std::vector<uint8_t> filler(static_cast<size_t>(pipe_size), 'f');
    say("splice: fill the pipe=%s", rc(write(pipe_fds[1], filler.data(), filler.size())).c_str());
    send_all(pair.client, "abc", 3);
    wait_available(pair.server, 3);
    say("splice socket->full pipe, SPLICE_F_NONBLOCK=%s",
        rc(splice(pair.server, nullptr, pipe_fds[1], nullptr, 100, SPLICE_F_NONBLOCK)).c_str());
    std::vector<uint8_t> drain(filler.size());
    pipe_read(pipe_fds[0], drain.data(), drain.size());
    char abc[4] = {};
    say("splice: the bytes stayed in the socket: recv=%s data=%s",
        rc(recv(pair.server, abc, 3, 0)).c_str(), abc);
    // The socket's O_NONBLOCK is the socket's; SPLICE_F_NONBLOCK is the pipe's.
    fcntl(pair.server, F_SETFL, O_NONBLOCK);
    say("splice socket (O_NONBLOCK)->pipe with nothing to read=%s",
        rc(splice(pair.server, nullptr, pipe_fds[1], nullptr, 100, 0)).c_str());
    fcntl(pair.server, F_SETFL, 0);
    // Pipe to socket: we fill the pipe, splice moves it to the socket, the peer reads.
    got.assign(kBytes, 0);
    ssize_t received = 0;
    std::thread reader([&] { received = read_exact(pair.client, got.data(), kBytes); });
    size_t written = 0;
    moved_ok = true;
    while (written < kBytes && moved_ok) {
        const size_t piece = std::min<size_t>(kBytes - written, 50000);
        std::thread writer([&] { write_all(pipe_fds[1], content.data() + written, piece); });
        size_t spliced = 0;
        while (spliced < piece) {
            const ssize_t n =
                splice(pipe_fds[0], nullptr, pair.server, nullptr, piece - spliced, 0);
            if (n <= 0) {
                moved_ok = false;
                break;
            }
            spliced += static_cast<size_t>(n);
        }
        writer.join();
        written += spliced;
    }
    reader.join();
    say("splice pipe->socket: all bytes in order=%s",
        yes(moved_ok && received == static_cast<ssize_t>(kBytes) &&
            std::equal(got.begin(), got.end(), content.begin())));
    say("splice empty pipe->socket, SPLICE_F_NONBLOCK=%s",
        rc(splice(pipe_fds[0], nullptr, pair.server, nullptr, 100, SPLICE_F_NONBLOCK)).c_str());
    // Bad ends.
    loff_t offset = 0;
    say("splice with an offset on the socket=%s",
        rc(splice(pair.server, &offset, pipe_fds[1], nullptr, 10, 0)).c_str());
    say("splice socket->socket=%s",
        rc(splice(pair.server, nullptr, pair.client, nullptr, 10, 0)).c_str());
    say("splice socket->the pipe's read end=%s",
        rc(splice(pair.server, nullptr, pipe_fds[0], nullptr, 10, 0)).c_str());
    say("splice length 0=%s", rc(splice(pair.server, nullptr, pipe_fds[1], nullptr, 0, 0)).c_str());
    close(pipe_fds[1]);
    say("splice pipe without writers->socket=%s",
        rc(splice(pipe_fds[0], nullptr, pair.server, nullptr, 10, 0)).c_str());
    close(pipe_fds[0]);
    pair.close_both();
}

void check_sendfile(const Family &family) {
    constexpr size_t kFileBytes = 200000;  // three rings and a bit: the copy wraps
    const char *dir = std::getenv("TMPDIR");
    std::string path = std::string(dir && *dir ? dir : "/tmp") + "/tcps-semantics-XXXXXX";
    const int file = mkstemp(path.data());
    if (file < 0) std::exit(2);
    unlink(path.c_str());
    const std::vector<uint8_t> content = deterministic_bytes(kFileBytes, 0x5e9df11e);
    if (write(file, content.data(), content.size()) != static_cast<ssize_t>(kFileBytes))
        std::exit(2);
    auto range_hash = [&](size_t from, size_t n) {
        return fnv1a(kFnvBasis, content.data() + from, n);
    };
    Pair pair = connected_pair(family);
    // Sends `count` with a reader draining the peer at the same time (for the `expect` bytes
    // that the file has from `expect_from`); says what arrived.
    auto send_and_read = [&](off_t *offset, size_t count, size_t expect_from, size_t expect) {
        std::vector<uint8_t> got(expect);
        ssize_t received = 0;
        std::thread reader([&] { received = read_exact(pair.server, got.data(), expect); });
        const ssize_t n = sendfile(pair.client, file, offset, count);
        const std::string result = rc(n);
        reader.join();
        const bool intact = n > 0 && received == n &&
                            fnv1a(kFnvBasis, got.data(), static_cast<size_t>(n)) ==
                                range_hash(expect_from, static_cast<size_t>(n));
        return result + ", the peer got the file's bytes=" + yes(intact);
    };

    lseek(file, 0, SEEK_SET);
    off_t offset = 1000;
    std::string sent = send_and_read(&offset, 150000, 1000, 150000);
    say("sendfile: 150000 from offset 1000=%s; offset now %lld, file position %lld", sent.c_str(),
        static_cast<long long>(offset), static_cast<long long>(lseek(file, 0, SEEK_CUR)));
    lseek(file, 5000, SEEK_SET);
    sent = send_and_read(nullptr, 10000, 5000, 10000);
    say("sendfile: 10000 without an offset from position 5000=%s; position now %lld", sent.c_str(),
        static_cast<long long>(lseek(file, 0, SEEK_CUR)));
    offset = 0;
    sent = send_and_read(&offset, kFileBytes, 0, kFileBytes);
    say("sendfile: the whole file=%s", sent.c_str());
    offset = 199000;
    sent = send_and_read(&offset, 5000, 199000, 1000);
    say("sendfile: 5000 from 1000 before the end=%s; offset now %lld", sent.c_str(),
        static_cast<long long>(offset));

    offset = 0;
    say("sendfile: count 0=%s offset %lld", rc(sendfile(pair.client, file, &offset, 0)).c_str(),
        static_cast<long long>(offset));
    offset = kFileBytes;
    say("sendfile: at the end=%s", rc(sendfile(pair.client, file, &offset, 100)).c_str());
    offset = 3 * kFileBytes;
    say("sendfile: past the end=%s offset %lld",
        rc(sendfile(pair.client, file, &offset, 100)).c_str(), static_cast<long long>(offset));
    lseek(file, 0, SEEK_END);
    say("sendfile: no offset, position at the end=%s",
        rc(sendfile(pair.client, file, nullptr, 100)).c_str());
    offset = -1;
    say("sendfile: negative offset=%s", rc(sendfile(pair.client, file, &offset, 100)).c_str());

    const int write_only = open(("/proc/self/fd/" + std::to_string(file)).c_str(), O_WRONLY);
    offset = 0;
    say("sendfile: from a write-only fd=%s, count 0=%s",
        rc(sendfile(pair.client, write_only, &offset, 100)).c_str(),
        rc(sendfile(pair.client, write_only, &offset, 0)).c_str());
    close(write_only);
    say("sendfile: from a closed fd=%s",
        rc(sendfile(pair.client, lowest_free(), &offset, 100)).c_str());
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) std::exit(2);
    (void)!write(pipe_fds[1], "pipe", 4);
    say("sendfile: from a pipe=%s, with an offset=%s",
        rc(sendfile(pair.client, pipe_fds[0], nullptr, 4)).c_str(),
        rc(sendfile(pair.client, pipe_fds[0], &offset, 4)).c_str());
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    say("sendfile: from a socket=%s, with an offset=%s",
        rc(sendfile(pair.client, pair.server, nullptr, 4)).c_str(),
        rc(sendfile(pair.client, pair.server, &offset, 4)).c_str());
    const int directory = open("/", O_RDONLY | O_DIRECTORY);
    say("sendfile: from a directory=%s", rc(sendfile(pair.client, directory, nullptr, 4)).c_str());
    close(directory);

    fcntl(pair.client, F_SETFL, fcntl(pair.client, F_GETFL) | O_APPEND);
    offset = 0;
    say("sendfile: to a socket with O_APPEND=%s",
        rc(sendfile(pair.client, file, &offset, 100)).c_str());
    fcntl(pair.client, F_SETFL, fcntl(pair.client, F_GETFL) & ~O_APPEND);

    set_nonblocking(pair.client, true);
    offset = 0;
    sent = rc(sendfile(pair.client, file, &offset, 100));
    say("sendfile: 100 bytes, non-blocking socket with room=%s peer got=%zd", sent.c_str(),
        read_text(pair.server, 100).size());
    set_nonblocking(pair.client, false);
    shutdown(pair.client, SHUT_WR);
    const int pipes_before = g_sigpipe_count.load();
    sent = rc(sendfile(pair.client, file, &offset, 100));
    say("sendfile: after SHUT_WR=%s SIGPIPEs=%d", sent.c_str(),
        g_sigpipe_count.load() - pipes_before);
    pair.close_both();
    close(file);
}

bool ipv6_available() {
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd < 0) return false;
    Address address = loopback(AF_INET6, 0);
    const bool ok = bind(fd, address.get(), address.len) == 0;
    close(fd);
    return ok;
}

// TCP sockets opened at the start and kept until the end: a listener, a client and the
// connection it accepted. --expect-offload checks that none of them is a kernel socket.
struct Keepers {
    int lfd = -1;
    Pair pair;
    std::vector<int> fds() const { return {lfd, pair.client, pair.server}; }
};

Keepers open_keepers() {
    Keepers keepers;
    keepers.lfd = listener(kV4);
    keepers.pair.client = connect_to(kV4, local_port(keepers.lfd));
    keepers.pair.server = accept(keepers.lfd, nullptr, nullptr);
    return keepers;
}

int check_keepers(const Keepers &keepers, bool expect_offload) {
    g_prefix = "";
    send_text(keepers.pair.client, "still here");
    say("end: the connection opened first still works=%s",
        yes(read_text(keepers.pair.server, 10) == "still here"));
    int kernel_sockets = 0;
    for (int fd : keepers.fds()) {
        char link[128] = {};
        (void)!readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), link, sizeof(link) - 1);
        if (std::strncmp(link, "socket:", 7) == 0) {
            ++kernel_sockets;
            if (expect_offload)
                std::fprintf(stderr, "semantics: fd %d is a kernel socket (%s): not offloaded\n",
                             fd, link);
        }
    }
    if (expect_offload && kernel_sockets > 0) {
        std::fprintf(stderr,
                     "semantics: --expect-offload: %d of %zu TCP descriptors are kernel sockets: "
                     "the shim fell back to the kernel\n",
                     kernel_sockets, keepers.fds().size());
        return 3;
    }
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--expect-offload") == 0) {
            offloaded_run = true;
        } else {
            std::fprintf(stderr, "usage: %s [--expect-offload]\n", argv[0]);
            return 2;
        }
    }
    setvbuf(stdout, nullptr, _IOLBF, 0);
    install(SIGPIPE, count_sigpipe, true);
    start_stopper();  // while this process has one thread

    // A stuck call must not hang the test run: give up loudly after two minutes.
    std::thread([] {
        std::this_thread::sleep_for(std::chrono::seconds(120));
        std::fprintf(stderr, "semantics: watchdog: still running after 120 s, giving up\n");
        std::fflush(stdout);
        _exit(4);
    }).detach();

    Keepers keepers = open_keepers();

    std::vector<Family> families = {kV4};
    if (ipv6_available())
        families.push_back(kV6);
    else
        say("[v6] unavailable on this host: IPv6 checks skipped");

    for (const Family &family : families) {
        g_prefix = std::string("[") + family.tag + "] ";
        check_blocking_basics(family);
        check_nonblocking(family);
        check_nonblocking_connect(family);
        check_connect_refused(family);
        check_bind(family);
        check_fill_and_drain(family);
        check_partial_reads(family);
        check_msg_flags(family);
        check_sigpipe(family);
        check_eof(family);
        check_reset(family);
        check_half_close(family);
        check_shutdown_after_data(family);
        check_names(family);
        check_timeouts(family);
        check_eintr(family);
        check_interrupted_send(family);
        check_stop_and_continue(family);
        check_options(family);
        check_cork_and_nodelay(family);
        check_ioctls_and_fcntl(family);
        check_poll_and_select(family);
        check_epoll(family);
        check_accept4(family);
        check_unconnected(family);
        check_vector_io(family);
        check_mmsg(family);
        check_stat(family);
        check_file_calls(family);
        check_bulk(family);
        check_bad_input(family);
        check_rcvlowat(family);
        check_listener_shutdown(family);
        check_listener_close(family);
        check_dup(family);
        check_close_paths(family);
        check_close_while_blocked(family);
        check_epoll_reuse(family);
        check_many_iovecs(family);
        check_accept4_flags(family);
        check_sendfile(family);
        check_splice(family);
        check_urgent(family);
        check_reset_seen(family);
    }
    g_prefix = "[mixed] ";
    if (families.size() > 1) check_v4_mapped();
    g_prefix = "[passthrough] ";
    check_passthrough();

    const int status = check_keepers(keepers, offloaded_run);
    end_stopper();
    std::fflush(stdout);
    return status;
}
