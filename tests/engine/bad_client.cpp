// bad_client: a private tcpsd faces one good client and several broken or hostile ones.
// After each bad one, the engine must still run and the good client must still move data;
// a client that broke the protocol must see its own session ended (engine_alive == 0).
//
//   bad_client /path/to/tcpsd [tcpsd arguments...]
#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <string>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

namespace {

constexpr int kWaitMs = 3000;

uint16_t port_of(const ipc::SockAddrRecord &record) {
    sockaddr_in addr{};
    std::memcpy(&addr, record.bytes, std::min<size_t>(record.len, sizeof(addr)));
    return ntohs(addr.sin_port);
}

sockaddr_in loopback(uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

int kernel_connect(uint16_t port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_OR_FAIL(fd >= 0, "socket: %s", std::strerror(errno));
    const sockaddr_in addr = loopback(port);
    // The engine's kernel listener completes the handshake by itself: this does not block long.
    CHECK_OR_FAIL(connect(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr)) == 0,
                  "connect to 127.0.0.1:%u: %s", port, std::strerror(errno));
    return fd;
}

uint16_t local_port(int fd) {
    sockaddr_in addr{};
    socklen_t len = sizeof(addr);
    getsockname(fd, reinterpret_cast<sockaddr *>(&addr), &len);
    return ntohs(addr.sin_port);
}

// Reads exactly `len` bytes from a kernel socket within the deadline.
bool kernel_recv_exact(int fd, void *data, size_t len, int timeout_ms) {
    size_t done = 0;
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (done < len) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() <= 0) return false;
        pollfd p{fd, POLLIN, 0};
        if (poll(&p, 1, static_cast<int>(left.count())) != 1) return false;
        const ssize_t n = recv(fd, static_cast<char *>(data) + done, len - done, 0);
        if (n <= 0) return false;
        done += static_cast<size_t>(n);
    }
    return true;
}

// Whether the kernel peer sees the connection end (EOF or reset) within the deadline.
bool kernel_sees_end(int fd, int timeout_ms) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() <= 0) return false;
        pollfd p{fd, POLLIN, 0};
        if (poll(&p, 1, static_cast<int>(left.count())) != 1) return false;
        char buffer[256];
        const ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN)) return true;
    }
}

// Whether a control socket reaches EOF (the engine closed or shut it down) in time.
bool control_sees_eof(int fd, int timeout_ms) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() <= 0) return false;
        pollfd p{fd, POLLIN, 0};
        if (poll(&p, 1, static_cast<int>(left.count())) != 1) return false;
        char buffer[64];
        const ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN)) return true;
    }
}

int set_int_option(RawClient &c, uint32_t slot, int level, int optname, int value) {
    return c.request_result(slot, uint32_t(ipc::Op::kSetSockOpt), level, optname, 0, nullptr, 0,
                            &value, sizeof(value));
}

// A port nothing listens on (bound and released again).
uint16_t closed_port() {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr = loopback(0);
    bind(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr));
    const uint16_t port = local_port(fd);
    close(fd);
    return port;
}

// Runs `body` in a child process that has become uid/gid 65534 (so CapEff is empty), and
// waits for it (bounded). Returns the child's exit status, or -1.
int run_unprivileged(const std::function<void()> &body) {
    const pid_t child = fork();
    if (child == 0) {
        if (setgroups(0, nullptr) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(3);
        body();
        _exit(0);
    }
    int status = 0;
    const bool done = wait_until([&] { return waitpid(child, &status, WNOHANG) == child; }, 10000);
    if (!done) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

struct Good {
    RawClient client;
    uint32_t listener = 0;
    uint32_t conn = 0;
    int peer = -1;  // the kernel end of the connection
    int round = 0;
};

// A message each way between the good client (through the engine) and its kernel peer.
void round_trip(Good &good, const char *after) {
    ++good.round;
    const std::string ping = "ping " + std::to_string(good.round);
    CHECK_OR_FAIL(send(good.peer, ping.data(), ping.size(), MSG_NOSIGNAL) ==
                      static_cast<ssize_t>(ping.size()),
                  "kernel send: %s", std::strerror(errno));
    std::string got(ping.size(), '\0');
    size_t have = 0;
    const bool arrived = wait_until(
        [&] {
            have += good.client.recv(good.conn, got.data() + have, got.size() - have);
            return have == got.size();
        },
        kWaitMs);
    CHECK_OR_FAIL(arrived, "after %s: data from the kernel peer did not reach the rx ring", after);
    CHECK_OR_FAIL(got == ping, "after %s: rx ring holds '%s', expected '%s'", after, got.c_str(),
                  ping.c_str());

    const std::string pong = "pong " + std::to_string(good.round);
    CHECK_OR_FAIL(good.client.send(good.conn, pong.data(), pong.size()) == pong.size(),
                  "after %s: tx ring full", after);
    std::string back(pong.size(), '\0');
    CHECK_OR_FAIL(kernel_recv_exact(good.peer, back.data(), back.size(), kWaitMs),
                  "after %s: data from the tx ring did not reach the kernel peer", after);
    CHECK_OR_FAIL(back == pong, "after %s: kernel peer got '%s'", after, back.c_str());
}

// One control request of `type` (with `fd` if >= 0, `token`, and our credentials if `creds`),
// and its reply, which must come within kWaitMs and be of `reply_type`.
ipc::ControlMessage control_call(RawClient &c, ipc::ControlType type, ipc::ControlType reply_type,
                                 int fd, uint64_t token, bool creds, const char *what) {
    ipc::ControlMessage msg{};
    msg.type = uint32_t(type);
    msg.version = ipc::kLayoutVersion;
    msg.token = token;
    CHECK_OR_FAIL(ipc::send_control(c.control_fd(), msg, fd >= 0 ? &fd : nullptr, fd >= 0 ? 1 : 0,
                                    creds) == 0,
                  "%s: send", what);
    ipc::ControlMessage reply{};
    int none = -1;
    CHECK_OR_FAIL(recv_control_within(c.control_fd(), reply, &none, 0, kWaitMs) == 0 &&
                      reply.type == uint32_t(reply_type),
                  "%s: no reply", what);
    return reply;
}

void check_engine_ok(EngineProcess &engine, Good &good, const char *after) {
    CHECK_OR_FAIL(engine.running(), "tcpsd died after %s", after);
    CHECK_OR_FAIL(good.client.engine_alive(), "good session ended after %s", after);
    round_trip(good, after);
    std::printf("ok: %s\n", after);
}

void setup_good(Good &good, const std::string &path) {
    RawClient &c = good.client;
    CHECK_OR_FAIL(c.connect(path) == 0, "good client: hello failed");
    CHECK_OR_FAIL(c.engine_alive(), "good client: engine_alive is 0 after hello");
    good.listener = open_socket(c, AF_INET, "good listener");
    const uint32_t L = good.listener;
    const sockaddr_in any_port = loopback(0);
    CHECK_OR_FAIL(
        c.request_result(L, uint32_t(ipc::Op::kBind), 0, 0, 0, &any_port, sizeof(any_port)) == 0,
        "kBind 127.0.0.1:0");
    CHECK_OR_FAIL(c.slot(L).flags.load() & ipc::kFlagBound, "kFlagBound not set");
    const uint16_t port = port_of(c.slot(L).local_addr);
    CHECK_OR_FAIL(port != 0, "bind left no local port in local_addr");
    CHECK_OR_FAIL(c.request_result(L, uint32_t(ipc::Op::kListen), 16) == 0, "kListen");
    CHECK_OR_FAIL(c.slot(L).flags.load() & ipc::kFlagListening, "kFlagListening not set");

    good.peer = kernel_connect(port);
    int conn = -1;
    CHECK_OR_FAIL(wait_until([&] { return (conn = c.accept(L)) >= 0; }, kWaitMs),
                  "accepted connection never appeared in the accept ring");
    CHECK_OR_FAIL(conn >= 0 && conn < int(ipc::kMaxSockets) && uint32_t(conn) != L,
                  "accept ring holds slot %d, outside the engine's range", conn);
    good.conn = static_cast<uint32_t>(conn);
    ipc::SocketSlot &s = c.slot(good.conn);
    CHECK_OR_FAIL(s.state.load() == uint32_t(ipc::SlotState::kOpen), "accepted slot not open");
    CHECK_OR_FAIL(s.flags.load() & ipc::kFlagConnected, "accepted slot not connected");
    CHECK_OR_FAIL(port_of(s.peer_addr) == local_port(good.peer),
                  "accepted slot's peer_addr port %u, kernel client is on %u", port_of(s.peer_addr),
                  local_port(good.peer));
    CHECK_OR_FAIL(port_of(s.local_addr) == port, "accepted slot's local_addr port is wrong");
    round_trip(good, "setup");

    // A sleeping thread's pipe is written when its slot changes.
    int waiter[2];
    CHECK_OR_FAIL(pipe2(waiter, O_CLOEXEC) == 0, "pipe");
    CHECK_OR_FAIL(c.register_waiter(0, waiter[1]) == 0, "kRegisterWaiter refused");
    close(waiter[1]);
    ipc::Waiter &w = c.region().waiter(0);
    c.region().header().waiters_armed.fetch_add(1);
    w.slot.store(good.conn);
    w.state.store(uint32_t(ipc::WaiterState::kArmed));
    CHECK_OR_FAIL(send(good.peer, "x", 1, MSG_NOSIGNAL) == 1, "kernel send");
    pollfd p{waiter[0], POLLIN, 0};
    CHECK_OR_FAIL(poll(&p, 1, kWaitMs) == 1, "armed waiter was not woken by arriving data");
    CHECK_OR_FAIL(w.state.load() == uint32_t(ipc::WaiterState::kSignaled),
                  "woken waiter is not kSignaled");
    w.state.store(uint32_t(ipc::WaiterState::kIdle));
    c.region().header().waiters_armed.fetch_sub(1);
    char x;
    CHECK_OR_FAIL(wait_until([&] { return c.recv(good.conn, &x, 1) == 1; }, kWaitMs), "no x");
    char drained;
    CHECK_OR_FAIL(read(waiter[0], &drained, 1) == 1, "waiter pipe empty");
    close(waiter[0]);
    std::printf("ok: good client (accept ring, rx ring, tx ring, waiter)\n");
}

void expect_session_ended(RawClient &bad, const char *what) {
    CHECK_OR_FAIL(wait_until([&] { return !bad.engine_alive(); }, kWaitMs),
                  "%s: the bad session still has engine_alive == 1", what);
    CHECK_OR_FAIL(control_sees_eof(bad.control_fd(), kWaitMs),
                  "%s: the bad session's control socket was not closed", what);
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: bad_client /path/to/tcpsd [tcpsd arguments...]\n");
        return 2;
    }
    const std::vector<std::string> engine_args(argv + 2, argv + argc);
    // --cores naming more than one CPU ("0,1", "0-1"): every worker serves each family.
    bool several_workers = false;
    for (size_t k = 0; k + 1 < engine_args.size(); ++k)
        several_workers |= engine_args[k] == "--cores" &&
                           engine_args[k + 1].find_first_of(",-") != std::string::npos;
    if (!cores_available(engine_args)) {
        std::printf("SKIP: this machine lacks the CPUs named by --cores\n");
        return 77;
    }
    signal(SIGPIPE, SIG_IGN);
    const ControlSocketDir socket_dir("tcps-bad-client");
    const std::string path = socket_dir.path();

    EngineProcess engine;
    CHECK_OR_FAIL(engine.start(argv[1], path, engine_args), "tcpsd did not become ready");

    Good good;
    setup_good(good, path);

    {  // (b) an out-of-range slot index pushed into the work queue
        RawClient bad;
        CHECK_OR_FAIL(bad.connect(path) == 0, "bad client (b): hello");
        // Chunk 0's queue names a slot of chunk 1 (not even active).
        ipc::WorkEntry &entry = bad.region().work_entry(0, 0);
        entry.slot = 5000;
        entry.seq.store(1, std::memory_order_release);
        bad.region().chunk_header(0).wq_tail.store(1, std::memory_order_release);
        bad.kick(0);
        expect_session_ended(bad, "(b) slot index 5000 in the work queue");
        check_engine_ok(engine, good, "(b) out-of-range slot index in the work queue");
    }
    {  // (c) tx_tail far beyond the tx ring
        RawClient bad;
        CHECK_OR_FAIL(bad.connect(path) == 0, "bad client (c): hello");
        const uint32_t s = open_socket(bad, AF_INET, "(c)");
        bad.slot(s).tx_tail.store(1u << 30, std::memory_order_release);
        bad.ring(s);
        expect_session_ended(bad, "(c) tx_tail far beyond the ring");
        check_engine_ok(engine, good, "(c) tx_tail far beyond the tx ring");
    }
    {  // (c1) tx_tail far beyond the ring of an accepted connection: with two workers the
       // family's first accepted connection is the other worker's, whose violation must end
       // the family on both (ShardMessage::kEnd)
        RawClient bad;
        CHECK_OR_FAIL(bad.connect(path) == 0, "bad client (c1): hello");
        const uint32_t listener = open_loopback_listener(bad, 4, "(c1)");
        const int peer = kernel_connect(port_of(bad.slot(listener).local_addr));
        int conn = -1;
        CHECK_OR_FAIL(wait_until([&] { return (conn = bad.accept(listener)) >= 0; }, kWaitMs),
                      "(c1) no accepted connection");
        // The listener is in the home's chunk 0; with two workers the connection is not.
        CHECK_OR_FAIL((static_cast<uint32_t>(conn) >= ipc::kChunkSlots) == several_workers,
                      "(c1) accepted into slot %d with %s worker", conn,
                      several_workers ? "more than one" : "one");
        bad.slot(conn).tx_tail.store(1u << 30, std::memory_order_release);
        bad.ring(static_cast<uint32_t>(conn));
        expect_session_ended(bad, "(c1) an accepted connection's tx_tail far beyond the ring");
        check_engine_ok(engine, good, "(c1) an accepted connection's tx_tail far beyond the ring");
        // Its connection went with it, on whichever worker served it.
        pollfd ended{peer, POLLIN, 0};
        char byte;
        CHECK_OR_FAIL(poll(&ended, 1, kWaitMs) == 1 && recv(peer, &byte, 1, MSG_DONTWAIT) <= 0,
                      "(c1) the bad family's accepted connection is still open");
        close(peer);
    }
    {  // (c2) rx_head past rx_tail
        RawClient bad;
        CHECK_OR_FAIL(bad.connect(path) == 0, "bad client (c2): hello");
        const uint32_t s = open_socket(bad, AF_INET6, "(c2)");
        bad.slot(s).rx_head.store(12345, std::memory_order_release);
        bad.ring(s);
        expect_session_ended(bad, "(c2) rx_head past rx_tail");
        check_engine_ok(engine, good, "(c2) rx_head past rx_tail");
    }
    // (c3) a tx ring size no ring may have: not a power of two, or past the largest
    for (const uint32_t size : {3 * ipc::kRingBytes, 2 * ipc::kRingMaxBytes}) {
        RawClient bad;
        CHECK_OR_FAIL(bad.connect(path) == 0, "bad client (c3): hello");
        const uint32_t s = open_socket(bad, AF_INET, "(c3)");
        bad.slot(s).tx_ring_bytes.store(size, std::memory_order_relaxed);
        bad.slot(s).tx_tail.store(1, std::memory_order_release);
        bad.ring(s);
        expect_session_ended(bad, "(c3) a tx ring size no ring may have");
        check_engine_ok(engine, good, "(c3) a tx ring size no ring may have");
    }
    {  // (d) requests the engine refuses one by one: the session lives on
        RawClient odd;
        CHECK_OR_FAIL(odd.connect(path) == 0, "client (d): hello");
        RawClient::Reply reply = odd.request(0, 99);
        CHECK_OR_FAIL(reply.answered, "(d) unknown op not answered");
        CHECK_OR_FAIL(reply.result == -EINVAL, "(d) unknown op: %d, expected -EINVAL",
                      reply.result);
        CHECK_OR_FAIL(odd.request_result(0, 0) == -EINVAL, "(d) op kNone");
        const sockaddr_in addr = loopback(0);
        CHECK_OR_FAIL(
            odd.request_result(5, uint32_t(ipc::Op::kBind), 0, 0, 0, &addr, sizeof(addr)) == -EBADF,
            "(d) kBind on a free slot");
        // A local client's sockets come over its control connection, with its credentials.
        CHECK_OR_FAIL(odd.request_result(1, uint32_t(ipc::Op::kSocket), AF_INET) == -EBADF,
                      "(d) kSocket in a local session");
        CHECK_OR_FAIL(odd.new_socket(AF_UNIX) == -EAFNOSUPPORT, "(d) kNewSocket AF_UNIX");
        // Another process's pid (which only a privileged sender may claim): not the member's.
        const ucred other{getppid(), geteuid(), getegid()};
        if (geteuid() == 0)
            CHECK_OR_FAIL(odd.new_socket(AF_INET, &other) == -EPERM,
                          "(d) kNewSocket claiming another process");
        const uint32_t one_slot = open_socket(odd, AF_INET, "(d) after the refusals");
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kShutdown), 7) == -EINVAL,
                      "(d) kShutdown how=7");
        CHECK_OR_FAIL(
            odd.request_result(one_slot, uint32_t(ipc::Op::kShutdown), SHUT_WR) == -ENOTCONN,
            "(d) kShutdown on an unconnected socket");
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kIoctl), 0x5401) == -ENOTTY,
                      "(d) unknown ioctl");
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kSetSockOpt), SOL_SOCKET,
                                         SO_ATTACH_FILTER, 0, nullptr, 0, "xxxxxxxxxxxxxxxx",
                                         16) == -ENOPROTOOPT,
                      "(d) SO_ATTACH_FILTER must be refused");
        const int one = 1;
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kSetSockOpt), IPPROTO_TCP,
                                         TCP_NODELAY, 0, nullptr, 0, &one, sizeof(one)) == 0,
                      "(d) TCP_NODELAY");
        RawClient::Reply nodelay =
            odd.request(one_slot, uint32_t(ipc::Op::kGetSockOpt), IPPROTO_TCP, TCP_NODELAY, 4);
        CHECK_OR_FAIL(nodelay.answered && nodelay.result == 0 && nodelay.opt.size() == 4 &&
                          nodelay.opt[0] == 1,
                      "(d) getsockopt TCP_NODELAY");
        // kStat: the mask and the sync bits go to statx(), which refuses what Linux refuses;
        // the other bits of arg1 are dropped (statx() of a descriptor ignores them anyway).
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kStat), -1) == -EINVAL,
                      "(d) kStat with statx's reserved mask bit");
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kStat), STATX_BASIC_STATS,
                                         -1) == -EINVAL,
                      "(d) kStat with both sync flags");
        CHECK_OR_FAIL(odd.request_result(5, uint32_t(ipc::Op::kStat), STATX_BASIC_STATS) == -EBADF,
                      "(d) kStat on a free slot");
        RawClient::Reply stat =
            odd.request(one_slot, uint32_t(ipc::Op::kStat), STATX_BASIC_STATS, ~AT_STATX_SYNC_TYPE);
        struct statx seen {};
        if (stat.opt.size() == sizeof(seen)) std::memcpy(&seen, stat.opt.data(), sizeof(seen));
        CHECK_OR_FAIL(stat.answered && stat.result == 0 && stat.opt.size() == sizeof(seen) &&
                          S_ISSOCK(seen.stx_mode) && seen.stx_uid == geteuid(),
                      "(d) kStat with every other flag set: %d, %zu bytes, mode %o", stat.result,
                      stat.opt.size(), seen.stx_mode);
        int fds[2];
        CHECK_OR_FAIL(pipe2(fds, O_CLOEXEC) == 0, "pipe");
        CHECK_OR_FAIL(odd.register_waiter(0, fds[0]) == -EINVAL, "(d) read end as waiter");
        close(fds[0]);
        close(fds[1]);
        CHECK_OR_FAIL(odd.engine_alive(), "(d) the session ended: refusals must not end it");
        CHECK_OR_FAIL(odd.request_result(one_slot, uint32_t(ipc::Op::kClose)) == 0, "(d) kClose");
        CHECK_OR_FAIL(
            wait_until(
                [&] { return odd.slot(one_slot).state.load() == uint32_t(ipc::SlotState::kFree); },
                kWaitMs),
            "(d) closed slot never became free");
        check_engine_ok(engine, good, "(d) unknown op and refused requests");
    }
    {  // (i) MemNet: registrations and direct descriptors the engine refuses, one by one
        RawClient odd;
        CHECK_OR_FAIL(odd.connect(path) == 0, "(i) hello");
        auto register_fd = [&](int fd, uint64_t length, int32_t &id) {
            const ipc::ControlMessage reply =
                control_call(odd, ipc::ControlType::kRegisterMem,
                             ipc::ControlType::kRegisterMemReply, fd, length, false, "(i)");
            id = reply.arg;
            return reply.result;
        };
        int32_t id = -1;
        const int unsealed = memfd_create("bad", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        CHECK_OR_FAIL(unsealed >= 0 && ftruncate(unsealed, 8192) == 0, "(i) memfd");
        CHECK_OR_FAIL(register_fd(unsealed, 8192, id) == -EINVAL, "(i) an unsealed memfd");
        CHECK_OR_FAIL(fcntl(unsealed, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0, "(i) seal");
        CHECK_OR_FAIL(register_fd(unsealed, 1 << 20, id) == -EINVAL, "(i) longer than the memfd");
        int fds[2];
        CHECK_OR_FAIL(pipe2(fds, O_CLOEXEC) == 0, "(i) pipe");
        CHECK_OR_FAIL(register_fd(fds[0], 4096, id) == -EINVAL, "(i) a pipe as memory");
        close(fds[0]);
        close(fds[1]);
        CHECK_OR_FAIL(register_fd(unsealed, 8192, id) == 0 && id >= 0, "(i) a good registration");
        close(unsealed);
        const uint32_t s = open_socket(odd, AF_INET, "(i)");
        ipc::SocketSlot &slot = odd.slot(s);
        // Each refused descriptor is answered with its error; the session lives on.
        auto refused = [&](uint32_t op, uint32_t mem, uint32_t len, uint64_t offset) {
            const uint32_t at = slot.direct_tail.load();
            ipc::DirectDescriptor &d = slot.direct_queue[at % ipc::kDirectQueueEntries];
            d = ipc::DirectDescriptor{op, mem, len, slot.tx_tail.load(), offset, 0, 0};
            slot.direct_tail.store(at + 1, std::memory_order_release);
            odd.ring(s);
            CHECK_OR_FAIL(wait_until([&] { return slot.direct_done.load() == at + 1; }, kWaitMs),
                          "(i) descriptor %u not answered", at);
            return slot.direct_results[at % ipc::kDirectQueueEntries];
        };
        const uint32_t send = uint32_t(ipc::DirectOp::kSend);
        CHECK_OR_FAIL(refused(send, uint32_t(id) + 7, 10, 0) == -EINVAL, "(i) an unknown id");
        CHECK_OR_FAIL(refused(send, uint32_t(id), 10, 8190) == -EFAULT, "(i) past its end");
        CHECK_OR_FAIL(refused(send, uint32_t(id), 10, ~0ull - 4) == -EFAULT, "(i) offset wraps");
        CHECK_OR_FAIL(refused(99, uint32_t(id), 10, 0) == -EINVAL, "(i) an unknown op");
        CHECK_OR_FAIL(refused(send, uint32_t(id), 0, 0) == -EINVAL, "(i) length 0");
        CHECK_OR_FAIL(odd.engine_alive(), "(i) refusals must not end the session");
        // A queue index far ahead of what the engine took: a protocol violation.
        slot.direct_tail.store(slot.direct_tail.load() + 100, std::memory_order_release);
        odd.ring(s);
        expect_session_ended(odd, "(i) direct_tail past the queue");
        check_engine_ok(engine, good, "(i) bad MemNet registrations and descriptors");
    }
    {  // (k) kAdoptSocket: descriptors the engine refuses; a kernel socket it takes and serves;
       // unread bytes parked at a hand-back, which only that same socket's next adopter gets
        RawClient odd;
        CHECK_OR_FAIL(odd.connect(path) == 0, "(k) hello");
        auto adopt = [&](int fd, int32_t &slot, uint64_t &parked) {
            const ipc::ControlMessage reply =
                control_call(odd, ipc::ControlType::kAdoptSocket,
                             ipc::ControlType::kAdoptSocketReply, fd, 0, true, "(k) kAdoptSocket");
            slot = reply.arg;
            parked = reply.token;
            return reply.result;
        };
        auto tcp_pair = [](int &connecting, int &accepted) {
            KernelListener listener;
            connecting = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            CHECK_OR_FAIL(
                connecting >= 0 &&
                    connect(connecting, reinterpret_cast<const sockaddr *>(&listener.address()),
                            sizeof(sockaddr_in)) == 0,
                "(k) connect");
            accepted = accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC);
            CHECK_OR_FAIL(accepted >= 0, "(k) accept");
        };
        auto rx_bytes = [&](uint32_t i, size_t want) {
            std::string got(want, '\0');
            size_t have = 0;
            CHECK_OR_FAIL(wait_until(
                              [&] {
                                  have += odd.recv(i, got.data() + have, want - have);
                                  return have == want;
                              },
                              kWaitMs),
                          "(k) only %zu of %zu bytes arrived in slot %u", have, want, i);
            return got;
        };
        int32_t slot = -1;
        uint64_t parked = 0;
        int fds[2];
        CHECK_OR_FAIL(pipe2(fds, O_CLOEXEC) == 0, "(k) pipe");
        CHECK_OR_FAIL(adopt(fds[0], slot, parked) == -EOPNOTSUPP, "(k) a pipe");
        close(fds[0]);
        close(fds[1]);
        CHECK_OR_FAIL(adopt(-1, slot, parked) == -EBADF, "(k) no descriptor");
        const int udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        CHECK_OR_FAIL(adopt(udp, slot, parked) == -EOPNOTSUPP, "(k) a UDP socket");
        close(udp);
        CHECK_OR_FAIL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0, "(k) pair");
        CHECK_OR_FAIL(adopt(fds[0], slot, parked) == -EOPNOTSUPP, "(k) an AF_UNIX socket");
        close(fds[0]);
        close(fds[1]);
        CHECK_OR_FAIL(odd.engine_alive(), "(k) refusals must not end the session");

        // A connection of plain kernel sockets: the engine serves its accepted end.
        int peer = -1, mine = -1;
        tcp_pair(peer, mine);
        CHECK_OR_FAIL(adopt(mine, slot, parked) == 0 && slot >= 0 && parked == 0, "(k) adopt");
        close(mine);  // the engine's descriptor keeps it
        const auto first = static_cast<uint32_t>(slot);
        CHECK_OR_FAIL(send(peer, "0123456789", 10, MSG_NOSIGNAL) == 10, "(k) peer send");
        CHECK_OR_FAIL(rx_bytes(first, 4) == "0123", "(k) the first bytes through the engine");
        CHECK_OR_FAIL(odd.send(first, "pong", 4) == 4, "(k) send");
        char pong[4];
        CHECK_OR_FAIL(recv(peer, pong, 4, MSG_WAITALL) == 4 && std::memcmp(pong, "pong", 4) == 0,
                      "(k) the peer got what the client sent");
        // Six bytes received and not read. Handed back with kHandoffPark: they are parked.
        CHECK_OR_FAIL(wait_until([&] { return odd.slot(first).rx_tail.load() == 10; }, kWaitMs),
                      "(k) the rest never reached the ring");
        ipc::ControlMessage msg{};
        msg.type = uint32_t(ipc::ControlType::kHandoff);
        msg.version = ipc::kLayoutVersion;
        msg.arg = slot;
        msg.reserved = ipc::kHandoffPark;
        CHECK_OR_FAIL(ipc::send_control(odd.control_fd(), msg, nullptr, 0) == 0, "(k) kHandoff");
        ipc::ControlMessage reply{};
        int kernel = -1;
        CHECK_OR_FAIL(recv_control_within(odd.control_fd(), reply, &kernel, 1, kWaitMs) == 0 &&
                          reply.type == uint32_t(ipc::ControlType::kHandoffReply) &&
                          reply.result == 0 && kernel >= 0,
                      "(k) no kernel socket handed back");
        CHECK_OR_FAIL(reply.arg == 0 && reply.token == 6, "(k) %d bytes lost, %llu parked",
                      reply.arg, static_cast<unsigned long long>(reply.token));
        // Bytes that arrive now wait in the kernel socket, behind the parked ones.
        CHECK_OR_FAIL(send(peer, "ABC", 3, MSG_NOSIGNAL) == 3, "(k) peer send");
        // Another connection gets nothing of them.
        int other_peer = -1, other = -1;
        tcp_pair(other_peer, other);
        CHECK_OR_FAIL(adopt(other, slot, parked) == 0 && parked == 0,
                      "(k) another socket got %llu parked bytes",
                      static_cast<unsigned long long>(parked));
        close(other);
        close(other_peer);
        // The socket itself: the parked bytes first, then what the kernel socket holds.
        CHECK_OR_FAIL(adopt(kernel, slot, parked) == 0 && parked == 6, "(k) adopt again: %llu",
                      static_cast<unsigned long long>(parked));
        close(kernel);
        CHECK_OR_FAIL(rx_bytes(static_cast<uint32_t>(slot), 9) == "456789ABC",
                      "(k) the parked bytes did not come first");
        CHECK_OR_FAIL(odd.engine_alive(), "(k) the session ended");

        // A kernel listener: served with a slot of its own; another descriptor of it gets the
        // same slot (one accept ring for the one kernel queue).
        KernelListener listener;
        int32_t listener_slot = -1;
        CHECK_OR_FAIL(
            adopt(listener.fd(), listener_slot, parked) == 0 && listener_slot >= 0 && parked == 0,
            "(k) adopt a listener");
        const int listener_copy = fcntl(listener.fd(), F_DUPFD_CLOEXEC, 0);
        CHECK_OR_FAIL(adopt(listener_copy, slot, parked) == 0 && slot == listener_slot,
                      "(k) a second descriptor of the listener got slot %d, not %d", slot,
                      listener_slot);
        close(listener_copy);
        const auto l = static_cast<uint32_t>(listener_slot);
        int waiting[2];
        for (int &fd : waiting) {
            fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            CHECK_OR_FAIL(
                fd >= 0 && connect(fd, reinterpret_cast<const sockaddr *>(&listener.address()),
                                   sizeof(sockaddr_in)) == 0,
                "(k) connect to the adopted listener");
        }
        CHECK_OR_FAIL(wait_until([&] { return odd.slot(l).acc_tail.load() == 2; }, kWaitMs),
                      "(k) the engine did not accept on the adopted listener");
        // A hostile accept ring: its second entry names the first adopted connection, which
        // the listener never accepted. Passed on (kHandoffPark): the first waiting connection
        // is parked, the forged entry is ignored (that connection goes on working), nothing
        // is reset.
        ipc::SocketSlot &l_shm = odd.slot(l);
        const uint32_t forged_pos = l_shm.acc_head.load() + 1;
        const uint32_t displaced = l_shm.accept_ring[forged_pos & (ipc::kAcceptRingEntries - 1)];
        l_shm.accept_ring[forged_pos & (ipc::kAcceptRingEntries - 1)] = first;
        msg.arg = listener_slot;
        CHECK_OR_FAIL(ipc::send_control(odd.control_fd(), msg, nullptr, 0) == 0,
                      "(k) kHandoff of the listener");
        int kernel_listener = -1;
        CHECK_OR_FAIL(
            recv_control_within(odd.control_fd(), reply, &kernel_listener, 1, kWaitMs) == 0 &&
                reply.type == uint32_t(ipc::ControlType::kHandoffReply) && reply.result == 0 &&
                kernel_listener >= 0,
            "(k) no kernel listener handed back");
        CHECK_OR_FAIL(reply.reserved == 0, "(k) %u untaken connections lost", reply.reserved);
        CHECK_OR_FAIL(odd.send(first, "again", 5) == 5, "(k) send on the forged entry's slot");
        char again[5];
        CHECK_OR_FAIL(recv(peer, again, 5, MSG_WAITALL) == 5 && std::memcmp(again, "again", 5) == 0,
                      "(k) the connection a forged accept entry named stopped working");
        // The next owner of the listener gets the parked one first; the displaced connection
        // (its entry overwritten) stays the old slot's, closed with it.
        int32_t next_listener = -1;
        CHECK_OR_FAIL(
            adopt(kernel_listener, next_listener, parked) == 0 && next_listener >= 0 && parked == 1,
            "(k) the listener's next owner got %llu parked connections, not 1",
            static_cast<unsigned long long>(parked));
        close(kernel_listener);
        const int unparked = odd.accept(static_cast<uint32_t>(next_listener));
        CHECK_OR_FAIL(unparked >= 0 && static_cast<uint32_t>(unparked) != displaced,
                      "(k) no parked connection in the new accept ring");
        CHECK_OR_FAIL(send(waiting[0], "first", 5, MSG_NOSIGNAL) == 5, "(k) waiting client send");
        CHECK_OR_FAIL(rx_bytes(static_cast<uint32_t>(unparked), 5) == "first",
                      "(k) the parked connection's bytes did not arrive");
        for (const int fd : waiting) close(fd);
        close(peer);
        check_engine_ok(engine, good, "(k) adopted sockets");
    }
    {  // (l) seed 003's shed (kHandoffShed): refused (-EAGAIN) for a socket the engine did not
       // ask back, and for one with bytes received and not read, which then goes on working;
       // asked and idle, it is handed back with nothing lost. An engine of its own, always
       // saturated (--handoff-load 0), which asks back every connection it serves.
        const ControlSocketDir shed_dir("tcps-shed");
        std::vector<std::string> args = engine_args;
        args.insert(args.end(), {"--handoff-load", "0"});
        EngineProcess saturated;
        CHECK_OR_FAIL(saturated.start(argv[1], shed_dir.path(), args),
                      "(l) tcpsd --handoff-load 0 did not become ready");
        RawClient c;
        CHECK_OR_FAIL(c.connect(shed_dir.path()) == 0, "(l) hello");
        auto shed = [&](uint32_t i, int &kernel) {
            ipc::ControlMessage msg{};
            msg.type = uint32_t(ipc::ControlType::kHandoff);
            msg.version = ipc::kLayoutVersion;
            msg.arg = static_cast<int32_t>(i);
            msg.reserved = ipc::kHandoffShed;
            CHECK_OR_FAIL(ipc::send_control(c.control_fd(), msg, nullptr, 0) == 0, "(l) send");
            ipc::ControlMessage reply{};
            kernel = -1;
            CHECK_OR_FAIL(recv_control_within(c.control_fd(), reply, &kernel, 1, kWaitMs) == 0 &&
                              reply.type == uint32_t(ipc::ControlType::kHandoffReply),
                          "(l) no reply");
            return reply.result;
        };
        KernelListener listener;
        const uint32_t i = open_socket(c, AF_INET, "(l) socket");
        int kernel = -1;
        CHECK_OR_FAIL(shed(i, kernel) == -EAGAIN && kernel < 0, "(l) handed back unasked");
        sockaddr_in addr = listener.address();
        const int rc =
            c.request_result(i, uint32_t(ipc::Op::kConnect), 0, 0, 0, &addr, sizeof(addr));
        CHECK_OR_FAIL(rc == 0 || rc == -EINPROGRESS, "(l) kConnect: %d", rc);
        const int peer = accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC);
        CHECK_OR_FAIL(peer >= 0, "(l) accept");
        // The engine asks at the end of a load window; bytes from the peer (one per 10 ms)
        // keep its loop turning, and stay unread in the ring.
        size_t sent = 0;
        auto last = Clock::now() - std::chrono::seconds(1);
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              if (Clock::now() - last >= std::chrono::milliseconds(10)) {
                                  sent += send(peer, "x", 1, MSG_NOSIGNAL) == 1 ? 1 : 0;
                                  last = Clock::now();
                              }
                              return (c.slot(i).flags.load() & ipc::kFlagShed) != 0;
                          },
                          kWaitMs),
                      "(l) the saturated engine never asked for the connection");
        CHECK_OR_FAIL(
            wait_until([&] { return c.slot(i).rx_tail.load() == sent; }, kWaitMs) && sent > 0,
            "(l) the peer's %zu bytes did not reach the ring", sent);
        CHECK_OR_FAIL(shed(i, kernel) == -EAGAIN && kernel < 0,
                      "(l) handed back with %zu bytes unread", sent);
        // Still served: the bytes are read from the ring, one more comes through the engine.
        std::string got(sent + 1, '\0');
        CHECK_OR_FAIL(send(peer, "y", 1, MSG_NOSIGNAL) == 1, "(l) peer send");
        size_t have = 0;
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              have += c.recv(i, got.data() + have, got.size() - have);
                              return have == got.size();
                          },
                          kWaitMs),
                      "(l) only %zu of %zu bytes through the engine after the refusal", have,
                      got.size());
        CHECK_OR_FAIL(got == std::string(sent, 'x') + "y", "(l) the ring's bytes are wrong");
        // Both rings empty: handed back; what the peer sends now is the kernel socket's.
        CHECK_OR_FAIL(shed(i, kernel) == 0 && kernel >= 0, "(l) idle, asked, not handed back");
        CHECK_OR_FAIL(send(peer, "after", 5, MSG_NOSIGNAL) == 5, "(l) peer send");
        char after[5];
        CHECK_OR_FAIL(
            recv(kernel, after, 5, MSG_WAITALL) == 5 && std::memcmp(after, "after", 5) == 0,
            "(l) the kernel socket did not get what the peer sent");
        CHECK_OR_FAIL(send(kernel, "back", 4, MSG_NOSIGNAL) == 4, "(l) kernel send");
        char back[4];
        CHECK_OR_FAIL(recv(peer, back, 4, MSG_WAITALL) == 4 && std::memcmp(back, "back", 4) == 0,
                      "(l) the peer did not get what the kernel socket sent");
        close(kernel);
        close(peer);
        CHECK_OR_FAIL(c.engine_alive() && saturated.running(), "(l) the session or engine ended");
        check_engine_ok(engine, good, "(l) shed hand-backs");
    }
    {  // (m) a socket's lock words when its slot opens again: one a live process holds (a
       // thread that took it after the socket went away, about to find it stale and let it
       // go) stays its own; one a dead process left held is cleared.
        RawClient odd;
        CHECK_OR_FAIL(odd.connect(path) == 0, "(m) hello");
        const pid_t gone = fork();
        if (gone == 0) _exit(0);
        CHECK_OR_FAIL(gone > 0 && waitpid(gone, nullptr, 0) == gone, "(m) a pid that is gone");
        // Opens a socket, marks both its locks held by `owner`, closes it, and opens the next,
        // which takes the same slot (the last freed is reused first).
        auto reopen = [&](pid_t owner) {
            const int first = odd.new_socket(AF_INET);
            CHECK_OR_FAIL(first >= 0, "(m) socket: %d", first);
            ipc::SocketSlot &slot = odd.slot(static_cast<uint32_t>(first));
            slot.tx_lock.store(1);
            slot.tx_lock_owner.store(static_cast<uint32_t>(owner));
            slot.rx_lock.store(2);  // held, with sleepers
            slot.rx_lock_owner.store(static_cast<uint32_t>(owner));
            CHECK_OR_FAIL(
                odd.request_result(static_cast<uint32_t>(first), uint32_t(ipc::Op::kClose)) == 0,
                "(m) kClose");
            CHECK_OR_FAIL(
                wait_until([&] { return slot.state.load() == uint32_t(ipc::SlotState::kFree); },
                           kWaitMs),
                "(m) the closed slot never became free");
            const int again = odd.new_socket(AF_INET);
            CHECK_OR_FAIL(again == first, "(m) slot %d, not the freed %d", again, first);
            return static_cast<uint32_t>(again);
        };
        const uint32_t live = reopen(getpid());
        ipc::SocketSlot &kept = odd.slot(live);
        CHECK_OR_FAIL(kept.tx_lock.load() == 1 && kept.rx_lock.load() == 2 &&
                          kept.tx_lock_owner.load() == uint32_t(getpid()) &&
                          kept.rx_lock_owner.load() == uint32_t(getpid()),
                      "(m) the locks a live process held were cleared under it");
        kept.tx_lock.store(0);  // as its holder would
        kept.tx_lock_owner.store(0);
        kept.rx_lock.store(0);
        kept.rx_lock_owner.store(0);
        CHECK_OR_FAIL(odd.request_result(live, uint32_t(ipc::Op::kClose)) == 0, "(m) kClose");
        CHECK_OR_FAIL(
            wait_until([&] { return kept.state.load() == uint32_t(ipc::SlotState::kFree); },
                       kWaitMs),
            "(m) the closed slot never became free");
        const uint32_t dead = reopen(gone);
        ipc::SocketSlot &cleared = odd.slot(dead);
        CHECK_OR_FAIL(cleared.tx_lock.load() == 0 && cleared.rx_lock.load() == 0 &&
                          cleared.tx_lock_owner.load() == 0 && cleared.rx_lock_owner.load() == 0,
                      "(m) the locks a dead process left held were not cleared");
        CHECK_OR_FAIL(odd.engine_alive(), "(m) the session ended");
        check_engine_ok(engine, good, "(m) lock words at a slot's reuse");
    }
    {  // (e) a client that connects and says nothing: dropped after 2 s, nobody waits on it
        const int silent = connect_control(path);
        CHECK_OR_FAIL(silent >= 0, "(e) connect");
        round_trip(good, "(e) while a silent client is connected");
        CHECK_OR_FAIL(control_sees_eof(silent, 5000), "(e) silent client was never dropped");
        close(silent);
        check_engine_ok(engine, good, "(e) silent client");
    }
    {  // (e) garbage bytes instead of a hello
        const int garbage = connect_control(path);
        CHECK_OR_FAIL(garbage >= 0, "(e) connect");
        CHECK_OR_FAIL(send(garbage, "garbage", 7, MSG_NOSIGNAL) == 7, "(e) send");
        ipc::ControlMessage reply{};
        int fd = -1;
        const int rc = recv_control_within(garbage, reply, &fd, 1, kWaitMs);
        CHECK_OR_FAIL(rc == 0 || rc == -ECONNRESET, "(e) garbage hello: %d", rc);
        if (rc == 0)
            CHECK_OR_FAIL(reply.result == -EPROTONOSUPPORT, "(e) garbage hello answered %d",
                          reply.result);
        CHECK_OR_FAIL(control_sees_eof(garbage, kWaitMs), "(e) garbage client not dropped");
        close(garbage);
        check_engine_ok(engine, good, "(e) garbage bytes instead of a hello");
    }
    {  // (e) a hello of another layout version
        const int old = connect_control(path);
        ipc::ControlMessage hello{};
        hello.type = uint32_t(ipc::ControlType::kHello);
        hello.version = 999;
        CHECK_OR_FAIL(ipc::send_control(old, hello, nullptr, 0) == 0, "(e) send");
        ipc::ControlMessage reply{};
        int fd = -1;
        CHECK_OR_FAIL(recv_control_within(old, reply, &fd, 1, kWaitMs) == 0, "(e) no reply");
        CHECK_OR_FAIL(reply.result == -EPROTONOSUPPORT, "(e) version 999 answered %d",
                      reply.result);
        close(old);
        check_engine_ok(engine, good, "(e) hello with the wrong version");
    }
    {  // (e) garbage on the control socket of an established session
        RawClient bad;
        CHECK_OR_FAIL(bad.connect(path) == 0, "(e) hello");
        CHECK_OR_FAIL(send(bad.control_fd(), "junk", 4, MSG_NOSIGNAL) == 4, "(e) send");
        expect_session_ended(bad, "(e) garbage on a session's control socket");
        check_engine_ok(engine, good, "(e) garbage on a session's control socket");
    }
    {  // (f) a client that dies with an open connection: the engine closes it
        RawClient dying;
        CHECK_OR_FAIL(dying.connect(path) == 0, "(f) hello");
        const uint32_t l = open_loopback_listener(dying, 4, "(f)");
        const int peer = kernel_connect(port_of(dying.slot(l).local_addr));
        CHECK_OR_FAIL(wait_until([&] { return dying.slot(l).acc_tail.load() == 1; }, kWaitMs),
                      "(f) no accepted connection");
        dying.disconnect();
        CHECK_OR_FAIL(kernel_sees_end(peer, kWaitMs),
                      "(f) the dead client's connection was not closed");
        close(peer);
        check_engine_ok(engine, good, "(f) client died with an open connection");
    }

    {  // (g) connect errors: immediate ones answered, asynchronous ones in so_error
        RawClient c;
        CHECK_OR_FAIL(c.connect(path) == 0, "(g) hello");
        const uint32_t g = open_socket(c, AF_INET, "(g)");
        const sockaddr_in refused = loopback(closed_port());
        CHECK_OR_FAIL(
            c.request_result(g, uint32_t(ipc::Op::kConnect), 0, 0, 0, &refused, 4) == -EINVAL,
            "(g) connect with a 4-byte address");
        sockaddr_in6 v6{};
        v6.sin6_family = AF_INET6;
        v6.sin6_port = htons(9);
        v6.sin6_addr = in6addr_loopback;
        CHECK_OR_FAIL(c.request_result(g, uint32_t(ipc::Op::kConnect), 0, 0, 0, &v6, sizeof(v6)) ==
                          -EAFNOSUPPORT,
                      "(g) IPv6 address on an IPv4 socket");
        const int rc =
            c.request_result(g, uint32_t(ipc::Op::kConnect), 0, 0, 0, &refused, sizeof(refused));
        CHECK_OR_FAIL(rc == -EINPROGRESS, "(g) connect answered %d", rc);
        ipc::SocketSlot &s = c.slot(g);
        // kFlagReset is published last: once it is there, so_error and error_gen are too.
        CHECK_OR_FAIL(wait_until([&] { return (s.flags.load() & ipc::kFlagReset) != 0; }, kWaitMs),
                      "(g) refused connect never reported");
        CHECK_OR_FAIL(s.error_gen.load() != 0, "(g) kFlagReset without a new error_gen");
        CHECK_OR_FAIL(s.so_error.load() == ECONNREFUSED && s.error_gen.load() == 1,
                      "(g) so_error %d error_gen %u", s.so_error.load(), s.error_gen.load());
        CHECK_OR_FAIL(!(s.flags.load() & (ipc::kFlagConnected | ipc::kFlagConnecting)),
                      "(g) refused socket still connecting/connected");
        RawClient::Reply error =
            c.request(g, uint32_t(ipc::Op::kGetSockOpt), SOL_SOCKET, SO_ERROR, 4);
        int reported = 0;
        if (error.opt.size() == 4) std::memcpy(&reported, error.opt.data(), 4);
        CHECK_OR_FAIL(error.answered && error.result == 0 && reported == ECONNREFUSED,
                      "(g) getsockopt(SO_ERROR) gave %d", reported);
        CHECK_OR_FAIL(s.so_error.load() == 0, "(g) SO_ERROR did not clear so_error");
        check_engine_ok(engine, good, "(g) connect errors");
    }
    if (geteuid() == 0) {  // (h) the engine enforces an unprivileged client's rights itself
        CHECK_OR_FAIL(chmod(socket_dir.dir().c_str(), 0755) == 0, "chmod");
        RawClient owner;
        CHECK_OR_FAIL(owner.connect(path) == 0, "(h) hello");
        const uint32_t first = open_socket(owner, AF_INET, "(h)");
        CHECK_OR_FAIL(set_int_option(owner, first, SOL_SOCKET, SO_REUSEPORT, 1) == 0,
                      "(h) reuseport");
        const sockaddr_in any_port = loopback(0);
        CHECK_OR_FAIL(owner.request_result(first, uint32_t(ipc::Op::kBind), 0, 0, 0, &any_port,
                                           sizeof(any_port)) == 0,
                      "(h) bind");
        const uint16_t shared_port = port_of(owner.slot(first).local_addr);
        const sockaddr_in shared = loopback(shared_port);
        // Same uid: Linux lets it share the port, so does the engine.
        const uint32_t second = open_socket(owner, AF_INET, "(h)");
        CHECK_OR_FAIL(set_int_option(owner, second, SOL_SOCKET, SO_REUSEPORT, 1) == 0, "(h)");
        CHECK_OR_FAIL(owner.request_result(second, uint32_t(ipc::Op::kBind), 0, 0, 0, &shared,
                                           sizeof(shared)) == 0,
                      "(h) same-uid SO_REUSEPORT bind refused");
        const int status = run_unprivileged([&] {
            RawClient c;
            CHECK_OR_FAIL(c.connect(path) == 0, "(h) unprivileged hello");
            // The kernel refuses to carry credentials it does not hold: no root-owned socket.
            const ucred root{getpid(), 0, 0};
            CHECK_OR_FAIL(c.new_socket(AF_INET, &root) == -EPERM, "(h) claimed to be root");
            const uint32_t u = open_socket(c, AF_INET, "(h) unprivileged");
            const sockaddr_in port80 = loopback(80);
            int rc =
                c.request_result(u, uint32_t(ipc::Op::kBind), 0, 0, 0, &port80, sizeof(port80));
            CHECK_OR_FAIL(rc == -EACCES, "(h) unprivileged bind to port 80: %d", rc);
            rc = set_int_option(c, u, SOL_SOCKET, SO_MARK, 5);
            CHECK_OR_FAIL(rc == -EPERM, "(h) unprivileged SO_MARK: %d", rc);
            rc = set_int_option(c, u, SOL_SOCKET, SO_DEBUG, 1);
            CHECK_OR_FAIL(rc == -EACCES, "(h) unprivileged SO_DEBUG: %d", rc);
            rc = set_int_option(c, u, SOL_SOCKET, SO_PRIORITY, 7);
            CHECK_OR_FAIL(rc == -EPERM, "(h) unprivileged SO_PRIORITY 7: %d", rc);
            rc = set_int_option(c, u, SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20);
            CHECK_OR_FAIL(rc == -EPERM, "(h) unprivileged SO_RCVBUFFORCE: %d", rc);
            rc = set_int_option(c, u, IPPROTO_TCP, TCP_REPAIR, 1);
            CHECK_OR_FAIL(rc == -EPERM, "(h) unprivileged TCP_REPAIR: %d", rc);
            CHECK_OR_FAIL(set_int_option(c, u, SOL_SOCKET, SO_PRIORITY, 3) == 0, "(h) prio 3");
            CHECK_OR_FAIL(set_int_option(c, u, SOL_SOCKET, SO_REUSEPORT, 1) == 0, "(h)");
            rc = c.request_result(u, uint32_t(ipc::Op::kBind), 0, 0, 0, &shared, sizeof(shared));
            CHECK_OR_FAIL(rc == -EADDRINUSE, "(h) SO_REUSEPORT bind onto another uid's port: %d",
                          rc);
            const sockaddr_in high = loopback(0);
            CHECK_OR_FAIL(
                c.request_result(u, uint32_t(ipc::Op::kBind), 0, 0, 0, &high, sizeof(high)) == 0,
                "(h) unprivileged bind to an ephemeral port");
        });
        CHECK_OR_FAIL(status == 0, "(h) unprivileged client failed (status %d)", status);
        check_engine_ok(engine, good, "(h) unprivileged client's rights");

        // (h2) A user namespace's root has every capability there, and none in the host's
        // network namespace: binding port 80 there is EACCES, as Linux says; in a network
        // namespace its user namespace owns, it may.
        const int userns_status = run_unprivileged([&] {
            // setuid() made us non-dumpable, and our /proc files root's: take them back.
            prctl(PR_SET_DUMPABLE, 1);
            if (unshare(CLONE_NEWUSER) != 0) _exit(77);
            auto write_file = [](const char *file, const char *text) {
                const int fd = open(file, O_WRONLY | O_CLOEXEC);
                const bool ok = fd >= 0 && write(fd, text, strlen(text)) == ssize_t(strlen(text));
                if (fd >= 0) close(fd);
                return ok;
            };
            CHECK_OR_FAIL(write_file("/proc/self/setgroups", "deny") &&
                              write_file("/proc/self/uid_map", "0 65534 1") &&
                              write_file("/proc/self/gid_map", "0 65534 1"),
                          "(h2) id maps");
            RawClient c;
            CHECK_OR_FAIL(c.connect(path) == 0, "(h2) hello from a user namespace");
            const uint32_t host = open_socket(c, AF_INET, "(h2) host namespace");
            const sockaddr_in port80 = loopback(80);
            int rc =
                c.request_result(host, uint32_t(ipc::Op::kBind), 0, 0, 0, &port80, sizeof(port80));
            CHECK_OR_FAIL(rc == -EACCES, "(h2) port 80 of the host's namespace: %d", rc);
            CHECK_OR_FAIL(unshare(CLONE_NEWNET) == 0, "(h2) a network namespace of our own");
            const uint32_t own = open_socket(c, AF_INET, "(h2) own namespace");
            sockaddr_in any80 = loopback(80);
            any80.sin_addr.s_addr = htonl(INADDR_ANY);
            rc = c.request_result(own, uint32_t(ipc::Op::kBind), 0, 0, 0, &any80, sizeof(any80));
            CHECK_OR_FAIL(rc == 0, "(h2) port 80 of our own namespace: %d", rc);
        });
        if (userns_status == 77) {
            std::printf("skip: (h2) no user namespaces here\n");
        } else {
            CHECK_OR_FAIL(userns_status == 0, "(h2) user-namespace client failed (%d)",
                          userns_status);
            check_engine_ok(engine, good, "(h2) capabilities count only where they apply");
        }
    } else {
        std::printf("skip: (h) needs root to create an unprivileged client\n");
    }

    {  // (t) a listener's twin (engine/twin.cpp), with an engine of its own that is always
       // saturated (--handoff-load 0): twins asked for where there are none, twin_drained
       // written at will; the twin itself holds what the engine steered to it, and refuses
       // accept() once the listener is closed
        const ControlSocketDir twin_dir("tcps-bad-twin");
        const std::string twin_path = twin_dir.path();
        EngineProcess saturated;
        CHECK_OR_FAIL(saturated.start(argv[1], twin_path, {"--handoff-load", "0"}),
                      "(t) tcpsd --handoff-load 0 did not become ready");
        RawClient odd;
        CHECK_OR_FAIL(odd.connect(twin_path) == 0, "(t) hello");
        // kHandoff with kHandoffTwin for slot `slot`: the answer, and the descriptor if any.
        auto ask_twin = [&](int32_t slot, int &fd) {
            ipc::ControlMessage msg{};
            msg.type = uint32_t(ipc::ControlType::kHandoff);
            msg.version = ipc::kLayoutVersion;
            msg.arg = slot;
            msg.reserved = ipc::kHandoffTwin;
            CHECK_OR_FAIL(ipc::send_control(odd.control_fd(), msg, nullptr, 0) == 0, "(t) send");
            ipc::ControlMessage reply{};
            fd = -1;
            CHECK_OR_FAIL(recv_control_within(odd.control_fd(), reply, &fd, 1, kWaitMs) == 0 &&
                              reply.type == uint32_t(ipc::ControlType::kHandoffReply),
                          "(t) no reply");
            return reply.result;
        };
        const uint32_t plain = open_socket(odd, AF_INET, "(t)");
        int fd = -1;
        CHECK_OR_FAIL(ask_twin(static_cast<int32_t>(plain), fd) == -ENOENT && fd < 0,
                      "(t) a twin of a socket that is no listener");
        CHECK_OR_FAIL(ask_twin(-1, fd) == -ENOENT && fd < 0, "(t) a twin of slot -1");
        CHECK_OR_FAIL(ask_twin(int32_t(ipc::kMaxSockets) + 7, fd) == -ENOENT && fd < 0,
                      "(t) a twin of a slot past the last");
        const uint32_t listener = open_loopback_listener(odd, 4, "(t)");
        ipc::SocketSlot &shm = odd.slot(listener);
        const int peer = kernel_connect(port_of(shm.local_addr));
        CHECK_OR_FAIL(peer >= 0, "(t) connect");
        CHECK_OR_FAIL(
            wait_until([&] { return (shm.flags.load() & ipc::kFlagTwinReady) != 0; }, kWaitMs),
            "(t) the twin never said it holds the connection");
        CHECK_OR_FAIL(odd.accept(listener) < 0, "(t) the saturated engine accepted it itself");
        // Reports of an empty twin that is not: the engine looks again and says so again.
        for (int k = 0; k < 1000; ++k) {
            shm.twin_drained.store(static_cast<uint32_t>(k * 7919), std::memory_order_release);
            odd.ring(listener);
        }
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              return (shm.flags.load() & ipc::kFlagTwinReady) &&
                                     shm.twin_ready_at.load() == shm.twin_drained.load();
                          },
                          kWaitMs),
                      "(t) the flag did not come back for the connection still waiting");
        int twin = -1;
        CHECK_OR_FAIL(ask_twin(static_cast<int32_t>(listener), twin) == 0 && twin >= 0,
                      "(t) no twin for the listener");
        const int conn = accept4(twin, nullptr, nullptr, SOCK_CLOEXEC);
        CHECK_OR_FAIL(conn >= 0, "(t) accept from the twin: %s", std::strerror(errno));
        const char byte = 't';
        CHECK_OR_FAIL(write(peer, &byte, 1) == 1, "(t) write");
        char got = 0;
        CHECK_OR_FAIL(kernel_recv_exact(conn, &got, 1, kWaitMs) && got == 't',
                      "(t) the twin's connection does not carry the peer's byte");
        // Closed: the twin leaves with it, for every holder of a descriptor of it.
        CHECK_OR_FAIL(odd.request_result(listener, uint32_t(ipc::Op::kClose), 0) == 0, "(t) close");
        CHECK_OR_FAIL(accept4(twin, nullptr, nullptr, SOCK_NONBLOCK) < 0 && errno == EINVAL,
                      "(t) the twin still listens after its listener's close");
        close(conn);
        close(twin);
        close(peer);
        CHECK_OR_FAIL(saturated.running() && odd.engine_alive(), "(t) the engine or session ended");
        std::printf("ok: (t) a listener's twin under hostile requests\n");
    }

    // SIGTERM: every session sees engine_alive = 0, waiters wake, sockets close, exit 0.
    int waiter[2];
    CHECK_OR_FAIL(pipe2(waiter, O_CLOEXEC) == 0, "pipe");
    CHECK_OR_FAIL(good.client.register_waiter(1, waiter[1]) == 0, "register waiter 1");
    close(waiter[1]);
    const auto stop_started = Clock::now();
    const int status = engine.stop(2000);
    const auto stop_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - stop_started).count();
    CHECK_OR_FAIL(status == 0, "tcpsd did not exit 0 within 2 s of SIGTERM (status %d)", status);
    CHECK_OR_FAIL(!good.client.engine_alive(), "engine_alive still 1 after SIGTERM");
    pollfd p{waiter[0], POLLIN, 0};
    CHECK_OR_FAIL(poll(&p, 1, 0) == 1, "waiter pipe not woken at shutdown");
    CHECK_OR_FAIL(kernel_sees_end(good.peer, kWaitMs), "connection not closed at shutdown");
    struct stat st;
    CHECK_OR_FAIL(lstat(path.c_str(), &st) != 0, "control socket file left behind");
    close(waiter[0]);
    close(good.peer);
    std::printf("ok: SIGTERM shutdown in %lld ms\n", static_cast<long long>(stop_ms));
    std::printf("PASS\n");
    return 0;
}
