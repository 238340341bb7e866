// scm_rights: an offloaded TCP socket passed to another process with SCM_RIGHTS, which then
// talks through it.
//
//   scm_rights sender ECHO_PORT PORTFILE   process A, the application (preloaded)
//   scm_rights receiver FD REST            process B after exec (A starts it)
//   scm_rights peer-echo PORTFILE          plain echo server (the peer of A's connections)
//   scm_rights peer-connect PORT N         plain: N connections to A's listener, each echoing
//   scm_rights pass-reset [--expect-offload]  connections reset by their peer, passed on; what
//                                          the receiver's calls say (the script diffs it
//                                          against a native run)
//
// A makes two kinds of socket: one connected to the plain echo server, one accepted from the
// plain peer-connect. For each it checks its own round trip, creates an AF_UNIX socketpair,
// starts B, sends B the socket over the pair with SCM_RIGHTS and closes its own copy. B streams
// 1 MiB through the socket while reading the echo back, checks every byte, half-closes and expects
// the peer's FIN, then reports "ok" over the pair. B is, in turn:
//   forked       a child of A that does not exec (it has A's shim state);
//   exec-kept    a child that execs this program with LD_PRELOAD kept;
//   exec-plain   a child that execs this program with LD_PRELOAD removed (no shim at all).
// Before passing it to a B that runs with tcps, A leaves bytes unread: it sends a 300 KB
// greeting, reads back its first 1,000 bytes only, and waits until at least 32 KiB more have
// arrived (offloaded: in its rx ring, where the kernel socket cannot take them back). B must read
// the rest of the greeting, every byte in order, before its own stream. A B without tcps gets
// a socket with nothing unread (its sender's engine could not give it the bytes).
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>

#include <string>
#include <thread>
#include <vector>

#include "servers_common.hpp"

extern char **environ;

using namespace tcps_test;

namespace {

constexpr size_t kStreamBytes = 1 << 20;
constexpr size_t kGreetingBytes = 300'000;
constexpr size_t kReadBeforePassing = 1000;
constexpr int kUnreadAtLeast = 32 * 1024;
constexpr uint32_t kGreetingSeed = 7;
const char *g_self = nullptr;

// --- SCM_RIGHTS ---

void send_fd(int channel, int fd) {
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
    if (sendmsg(channel, &msg, MSG_NOSIGNAL) != 1)
        die("sendmsg(SCM_RIGHTS) of fd %d: %s", fd, std::strerror(errno));
}

int receive_fd(int channel) {
    char byte = 0;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    wait_ready(channel, POLLIN, deadline, "waiting for the socket from A");
    const ssize_t n = recvmsg(channel, &msg, MSG_CMSG_CLOEXEC);
    if (n != 1) die("recvmsg: %s", n < 0 ? std::strerror(errno) : "no byte");
    if (msg.msg_flags & MSG_CTRUNC) die("recvmsg: the control data was truncated");
    cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (!cmsg || cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS ||
        cmsg->cmsg_len != CMSG_LEN(sizeof(int)))
        die("recvmsg: no SCM_RIGHTS descriptor came with the message");
    int fd = -1;
    std::memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
    return fd;
}

// --- B: the receiver ---

// Streams kStreamBytes through the echo while reading them back; then half-closes and expects
// the peer's FIN. Dies on any difference.
void talk_through(int sock, uint32_t seed) {
    set_timeouts(sock, kWaitSeconds);
    const std::string out = pattern(seed, kStreamBytes);
    std::thread writer([sock, &out] { send_all(sock, out.data(), out.size(), "B send"); });
    const std::string back = recv_exactly(sock, out.size(), "B recv");
    writer.join();
    if (back != out) {
        size_t at = 0;
        while (at < back.size() && back[at] == out[at]) ++at;
        die("B: the echo differs from byte %zu on", at);
    }
    if (shutdown(sock, SHUT_WR) != 0) die("B: shutdown(SHUT_WR): %s", std::strerror(errno));
    const std::string tail = recv_until_eof(sock, 1, "B waiting for the peer's FIN");
    if (!tail.empty()) die("B: %zu unexpected bytes before the FIN", tail.size());
}

// B: `rest` bytes of the greeting that A left unread come first.
[[noreturn]] void run_receiver(int channel, size_t rest) {
    const int sock = receive_fd(channel);
    std::printf("  B (pid %d): received fd %d (%s)\n", getpid(), sock, fd_target(sock).c_str());
    std::fflush(stdout);
    if (rest > 0) {
        set_timeouts(sock, kWaitSeconds);
        const std::string greeting = pattern(kGreetingSeed, kGreetingBytes);
        const std::string got = recv_exactly(sock, rest, "B reading what A left unread");
        const std::string want = greeting.substr(kGreetingBytes - rest);
        if (got != want) {
            size_t at = 0;
            while (at < got.size() && got[at] == want[at]) ++at;
            die("B: the greeting A left unread differs from its byte %zu on", at);
        }
        std::printf("  B (pid %d): the %zu greeting bytes A left unread came first, intact\n",
                    getpid(), rest);
        std::fflush(stdout);
    }
    talk_through(sock, static_cast<uint32_t>(getpid()));
    // With tcps, the socket was offloaded at its first use: the number holds a placeholder.
    std::printf("  B (pid %d): after use, fd %d is %s\n", getpid(), sock, fd_target(sock).c_str());
    std::fflush(stdout);
    close(sock);
    send_all(channel, "ok", 2, "B reporting");
    close(channel);
    _exit(0);
}

// --- A: the sender ---

// A's own round trip through the socket, before it hands it over.
void check_own_round_trip(int sock) {
    set_timeouts(sock, kWaitSeconds);
    const std::string hello = "hello from A\n";
    send_all(sock, hello.data(), hello.size(), "A send");
    if (recv_exactly(sock, hello.size(), "A recv") != hello) die("A: its own echo differs");
}

// A leaves the greeting's echo partly unread (see the top): returns how much.
size_t leave_unread(int sock) {
    const std::string greeting = pattern(kGreetingSeed, kGreetingBytes);
    send_all(sock, greeting.data(), greeting.size(), "A greeting");
    if (recv_exactly(sock, kReadBeforePassing, "A reading the greeting's start") !=
        greeting.substr(0, kReadBeforePassing))
        die("A: the greeting's echo differs");
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    int unread = 0;
    while (ioctl(sock, FIONREAD, &unread) == 0 && unread < kUnreadAtLeast) {
        if (Clock::now() >= deadline) die("A: only %d bytes of the echo arrived", unread);
        wait_ready(sock, POLLIN, deadline, "the greeting's echo");
        usleep(1000);  // more is on its way: poll() says readable at the first byte
    }
    std::printf("  A leaves %d bytes received and unread (%zu in all still to come)\n", unread,
                kGreetingBytes - kReadBeforePassing);
    return kGreetingBytes - kReadBeforePassing;
}

pid_t start_receiver(const std::string &how, int channel, int other_end, size_t rest) {
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0) die("fork: %s", std::strerror(errno));
    if (pid > 0) return pid;
    close(other_end);
    if (how == "forked") run_receiver(channel, rest);
    // exec: the channel survives it at its number; the environment says whether the shim does.
    const int flags = fcntl(channel, F_GETFD);
    fcntl(channel, F_SETFD, flags & ~FD_CLOEXEC);
    std::vector<char *> env;
    for (char **entry = environ; *entry; ++entry)
        if (how != "exec-plain" || std::strncmp(*entry, "LD_PRELOAD=", 11) != 0)
            env.push_back(*entry);
    env.push_back(nullptr);
    std::string fd_text = std::to_string(channel);
    std::string rest_text = std::to_string(rest);
    char *args[] = {const_cast<char *>(g_self), const_cast<char *>("receiver"), fd_text.data(),
                    rest_text.data(), nullptr};
    execve(g_self, args, env.data());
    die("execve %s: %s", g_self, std::strerror(errno));
}

// Returns false (after saying why) when B failed; the other cases still run.
bool hand_over(int sock, const std::string &origin, const std::string &how) {
    std::printf("case %s socket -> %s B: A's fd %d (%s)\n", origin.c_str(), how.c_str(), sock,
                fd_target(sock).c_str());
    check_own_round_trip(sock);
    if (how == "forked") hold_point(origin.c_str());  // "connected", then "accepted"
    const size_t rest = how == "exec-plain" ? 0 : leave_unread(sock);
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
        die("socketpair: %s", std::strerror(errno));
    const pid_t receiver = start_receiver(how, pair[1], pair[0], rest);
    std::printf("  receiver pid %d (%s)\n", receiver, how.c_str());
    std::fflush(stdout);
    close(pair[1]);
    send_fd(pair[0], sock);
    close(sock);  // B holds the only descriptor now: the connection must live on
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    std::string verdict;
    char buffer[16];
    while (verdict.size() < 2) {
        wait_ready(pair[0], POLLIN, deadline, "waiting for B's verdict");
        const ssize_t n = read(pair[0], buffer, sizeof(buffer));
        if (n <= 0) break;
        verdict.append(buffer, static_cast<size_t>(n));
    }
    close(pair[0]);
    int status = 0;
    for (;;) {
        const pid_t done = waitpid(receiver, &status, WNOHANG);
        if (done == receiver) break;
        if (Clock::now() >= deadline) {
            kill(receiver, SIGKILL);
            die("B (pid %d) did not exit", receiver);
        }
        usleep(5000);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || verdict != "ok") {
        std::printf("  FAILED: case %s socket -> %s B (B's wait status %d, verdict '%s')\n",
                    origin.c_str(), how.c_str(), status, verdict.c_str());
        std::fflush(stdout);
        return false;
    }
    std::printf("  ok: 1 MiB echoed byte for byte through the passed socket, then FIN\n");
    std::fflush(stdout);
    return true;
}

int mode_sender(uint16_t echo_port, const char *port_file) {
    const int listener = listen_announced(port_file);
    set_timeouts(listener, kWaitSeconds);
    // Nothing happens before the first connection is pending: until then the test can look at
    // the listener, whatever becomes of the cases.
    wait_ready(listener, POLLIN, Clock::now() + std::chrono::seconds(60), "the first connection");
    int failed = 0;
    for (const char *how : {"forked", "exec-kept", "exec-plain"}) {
        failed += !hand_over(connect_to(echo_port), "connected", how);
        const int accepted = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (accepted < 0) die("accept: %s", std::strerror(errno));
        failed += !hand_over(accepted, "accepted", how);
    }
    close(listener);
    if (failed) die("%d of 6 cases failed", failed);
    say("sender: all 6 cases passed");
    return 0;
}

// --- plain peers ---

// Echoes one connection until the peer's FIN, then closes.
void echo_connection(int fd) {
    set_timeouts(fd, kWaitSeconds);
    char buffer[65536];
    for (;;) {
        const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        send_all(fd, buffer, static_cast<size_t>(n), "echo send");
    }
    close(fd);
}

int mode_peer_echo(const char *port_file) {
    const int listener = listen_announced(port_file);
    for (;;) {
        const int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("peer-echo: accept: %s", std::strerror(errno));
        }
        std::thread(echo_connection, fd).detach();
    }
}

int mode_peer_connect(uint16_t port, int count) {
    for (int k = 0; k < count; ++k) echo_connection(connect_to(port));
    return 0;
}

// --- a connection reset before it is passed on ---

// Linux keeps a reset connection's error in the socket until a call reports it, whichever
// process makes that call. One that the engine served had its error taken by the engine's
// receive: the receiver must still be told (the engine parks it with the unread bytes). Each
// case: a connection (offloaded) whose peer, this process's kernel socket, sends `greeting`
// and resets it; the connection sees the reset (POLLHUP), `report_first` reports it here or
// not, then it goes over an AF_UNIX pair to this same process, which uses it.
void pass_reset_case(const char *name, int listener, uint16_t port, const std::string &greeting,
                     bool report_first, bool expect_offload) {
    const int conn = connect_to(port);
    const int peer = accept(listener, nullptr, nullptr);
    if (peer < 0) die("accept: %s", std::strerror(errno));
    if (expect_offload && fd_target(conn) != "/dev/null") die("%s: not offloaded", name);
    if (!greeting.empty()) send_all(peer, greeting.data(), greeting.size());
    const linger reset{1, 0};
    setsockopt(peer, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
    close(peer);
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    for (pollfd entry{conn, POLLIN, 0}; !(entry.revents & POLLHUP);) {
        if (Clock::now() > deadline) die("%s: no POLLHUP after the reset", name);
        if (poll(&entry, 1, 100) < 0 && errno != EINTR) die("poll: %s", std::strerror(errno));
    }
    char buf[64];
    auto said = [](ssize_t n) {
        return n >= 0 ? std::to_string(n) : std::string("-1 ") + strerrorname_np(errno);
    };
    if (report_first) say("%s: before passing, recv=%s", name, said(recv(conn, buf, 0, 0)).c_str());
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
    send_fd(pair[0], conn);
    close(conn);
    const int got = receive_fd(pair[1]);
    close(pair[0]);
    close(pair[1]);
    errno = 0;
    ssize_t n = recv(got, buf, sizeof(buf), 0);
    std::string first = said(n);
    if (n > 0) first += " '" + std::string(buf, static_cast<size_t>(n)) + "'";
    say("%s: received, recv=%s", name, first.c_str());
    say("%s: then recv=%s", name, said(recv(got, buf, sizeof(buf), 0)).c_str());
    say("%s: then send=%s", name, said(send(got, "x", 1, MSG_NOSIGNAL)).c_str());
    // One whose reset was reported has nothing left for the engine: it stays the kernel's.
    if (expect_offload && !report_first && fd_target(got) != "/dev/null")
        die("%s: the receiver did not offload it: %s", name, fd_target(got).c_str());
    close(got);
}

int mode_pass_reset(bool expect_offload) {
    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr = loopback(0);
    socklen_t len = sizeof(addr);
    if (bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0 ||
        listen(listener, 4) != 0 ||
        getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len) != 0)
        die("listener: %s", std::strerror(errno));
    set_timeouts(listener, kWaitSeconds);
    const uint16_t port = ntohs(addr.sin_port);
    pass_reset_case("unreported", listener, port, "", false, expect_offload);
    pass_reset_case("reported", listener, port, "", true, expect_offload);
    pass_reset_case("bytes unread", listener, port, "hello", false, expect_offload);
    close(listener);
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    g_program = "scm_rights";
    g_self = "/proc/self/exe";
    signal(SIGPIPE, SIG_IGN);
    // The path of this program, for exec (from /proc/self/exe, whatever argv[0] was).
    static char self[4096];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) g_self = self;
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "sender" && argc == 4)
        return mode_sender(static_cast<uint16_t>(to_int(argv[2])), argv[3]);
    if (mode == "receiver" && argc == 4)
        run_receiver(to_int(argv[2]), static_cast<size_t>(to_int(argv[3])));
    if (mode == "peer-echo" && argc == 3) return mode_peer_echo(argv[2]);
    if (mode == "pass-reset" &&
        (argc == 2 || (argc == 3 && argv[2] == std::string("--expect-offload"))))
        return mode_pass_reset(argc == 3);
    if (mode == "peer-connect" && argc == 4)
        return mode_peer_connect(static_cast<uint16_t>(to_int(argv[2])), to_int(argv[3]));
    std::fprintf(
        stderr,
        "usage: scm_rights sender ECHO_PORT PORTFILE | receiver FD REST | peer-echo PORTFILE |"
        " peer-connect PORT N | pass-reset [--expect-offload]\n");
    return 2;
}
