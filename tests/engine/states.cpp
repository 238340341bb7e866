// engine_states: how the engine publishes a socket's life beyond the data path, checked with
// a raw client against a private tcpsd and compared with what Linux does natively:
//   - a client that sees a new error_gen also sees kFlagReset
//   - an RST after the peer's FIN is reported at once, without waiting for a send
//   - connect() after a failed connect() starts a new attempt
//   - shutdown() of a listener and of a connecting socket does what inet_shutdown() does
//   - getsockopt(SO_RCVLOWAT) answers Linux's value
//
//   engine_states /path/to/tcpsd [case name...] [-- tcpsd arguments...]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <climits>
#include <string>
#include <thread>
#include <vector>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

namespace {

constexpr int kWaitMs = 3000;

using Op = ipc::Op;

sockaddr_in loopback(uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

uint16_t local_port(int fd) {
    sockaddr_in addr{};
    socklen_t len = sizeof(addr);
    getsockname(fd, reinterpret_cast<sockaddr *>(&addr), &len);
    return ntohs(addr.sin_port);
}

uint16_t port_of(const ipc::SockAddrRecord &record) {
    sockaddr_in addr{};
    std::memcpy(&addr, record.bytes, std::min<size_t>(record.len, sizeof(addr)));
    return ntohs(addr.sin_port);
}

// A kernel listener on 127.0.0.1, any port.
int kernel_listener(int backlog) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_OR_FAIL(fd >= 0, "socket: %s", std::strerror(errno));
    const sockaddr_in addr = loopback(0);
    CHECK_OR_FAIL(bind(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr)) == 0, "bind");
    CHECK_OR_FAIL(listen(fd, backlog) == 0, "listen");
    return fd;
}

// A port nothing listens on (bound and released again).
uint16_t closed_port() {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const sockaddr_in addr = loopback(0);
    bind(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr));
    const uint16_t port = local_port(fd);
    close(fd);
    return port;
}

// A non-blocking kernel connect; its outcome is not waited for.
int kernel_connect_nb(uint16_t port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    const sockaddr_in addr = loopback(port);
    const int rc = connect(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr));
    CHECK_OR_FAIL(rc == 0 || errno == EINPROGRESS, "kernel connect: %s", std::strerror(errno));
    return fd;
}

int accept_within(int listener, int timeout_ms) {
    pollfd p{listener, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return -1;
    return accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
}

// What a kernel socket's recv() says within the deadline: bytes, 0, or -errno.
ssize_t kernel_recv_within(int fd, void *data, size_t len, int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return -ETIMEDOUT;
    const ssize_t n = recv(fd, data, len, MSG_DONTWAIT);
    return n < 0 ? -errno : n;
}

uint32_t flags_of(RawClient &c, uint32_t slot) {
    return c.slot(slot).flags.load(std::memory_order_acquire);
}

bool wait_flags(RawClient &c, uint32_t slot, uint32_t all) {
    return wait_until([&] { return (flags_of(c, slot) & all) == all; }, kWaitMs);
}

// A new socket; `slot` becomes the one the engine picked.
void open_socket(RawClient &c, uint32_t &slot) {
    slot = open_socket(c, AF_INET, "kNewSocket");
}

int engine_connect(RawClient &c, uint32_t slot, uint16_t port) {
    const sockaddr_in addr = loopback(port);
    return c.request_result(slot, uint32_t(Op::kConnect), 0, 0, 0, &addr, sizeof(addr));
}

void close_socket(RawClient &c, uint32_t slot) {
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kClose)) == 0, "kClose slot %u", slot);
    CHECK_OR_FAIL(
        wait_until([&] { return c.slot(slot).state.load() == uint32_t(ipc::SlotState::kFree); },
                   kWaitMs),
        "slot %u never became free", slot);
}

// Slot `slot` connected through the engine to a kernel listener; returns the kernel's end.
int connect_pair(RawClient &c, uint32_t &slot, int listener) {
    open_socket(c, slot);
    const int rc = engine_connect(c, slot, local_port(listener));
    CHECK_OR_FAIL(rc == -EINPROGRESS || rc == 0, "kConnect answered %d", rc);
    const int peer = accept_within(listener, kWaitMs);
    CHECK_OR_FAIL(peer >= 0, "the kernel listener never saw the engine's connect");
    CHECK_OR_FAIL(wait_flags(c, slot, ipc::kFlagConnected), "slot %u never connected", slot);
    return peer;
}

int get_int(RawClient &c, uint32_t slot, int level, int optname) {
    RawClient::Reply reply = c.request(slot, uint32_t(Op::kGetSockOpt), level, optname, 4);
    CHECK_OR_FAIL(reply.answered && reply.result == 0 && reply.opt.size() == 4,
                  "getsockopt(%d, %d) on slot %u: answered %d result %d size %zu", level, optname,
                  slot, reply.answered, reply.result, reply.opt.size());
    int value;
    std::memcpy(&value, reply.opt.data(), sizeof(value));
    return value;
}

int set_int(RawClient &c, uint32_t slot, int level, int optname, int value) {
    return c.request_result(slot, uint32_t(Op::kSetSockOpt), level, optname, 0, nullptr, 0, &value,
                            sizeof(value));
}

int native_get_int(int fd, int level, int optname) {
    int value = 0;
    socklen_t len = sizeof(value);
    getsockopt(fd, level, optname, &value, &len);
    return value;
}

// ---------------------------------------------------------------------------------------------

// record_error() publishes so_error and error_gen before kFlagReset, so a client that sees the
// reset always has its error to report (the shim counts a pending error as a reset, which
// covers the other order). An observer thread spins on the slot while the engine records the
// refusal; the main thread sleeps meanwhile, so that the observer has a CPU when the engine
// publishes.
void reset_implies_error(RawClient &c) {
    constexpr uint32_t kRounds = 200;
    std::vector<uint32_t> slots;
    constexpr uint32_t kNone = UINT32_MAX;
    std::atomic<uint32_t> current{kNone};
    std::atomic<uint32_t> checked{kNone};  // the last slot whose kFlagReset was looked at
    std::atomic<bool> stop{false};
    std::atomic<uint32_t> violations{0};
    std::thread observer([&] {
        while (!stop.load(std::memory_order_relaxed)) {
            const uint32_t slot = current.load(std::memory_order_acquire);
            if (slot == kNone || slot == checked.load(std::memory_order_relaxed)) continue;
            ipc::SocketSlot &s = c.slot(slot);
            if (!(s.flags.load(std::memory_order_acquire) & ipc::kFlagReset)) continue;
            if (s.error_gen.load(std::memory_order_acquire) == 0 ||
                s.so_error.load(std::memory_order_relaxed) == 0)
                violations.fetch_add(1, std::memory_order_relaxed);
            checked.store(slot, std::memory_order_release);
        }
    });
    const uint16_t refused = closed_port();
    const sockaddr_in addr = loopback(refused);
    for (uint32_t k = 0; k < kRounds; ++k) {
        uint32_t slot = 0;
        open_socket(c, slot);
        slots.push_back(slot);
        current.store(slot, std::memory_order_release);
        // The request by hand, so that this thread sleeps while it is handled.
        ipc::SocketSlot &s = c.slot(slot);
        s.request.op = uint32_t(Op::kConnect);
        s.request.addr_len = sizeof(addr);
        std::memcpy(s.request.addr, &addr, sizeof(addr));
        const uint32_t seq = s.req_seq.load() + 1;
        s.req_seq.store(seq, std::memory_order_release);
        c.ring(slot);
        const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
        while (checked.load(std::memory_order_acquire) != slot && Clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::microseconds(100));
        CHECK_OR_FAIL(checked.load() == slot, "round %u: kFlagReset never seen (flags %#x)", k,
                      flags_of(c, slot));
        CHECK_OR_FAIL(s.resp_seq.load() == seq &&
                          (s.response.result == -EINPROGRESS || s.response.result == -ECONNREFUSED),
                      "round %u: kConnect answered %d", k, s.response.result);
        CHECK_OR_FAIL(s.so_error.load() == ECONNREFUSED, "round %u: so_error %d", k,
                      s.so_error.load());
    }
    stop.store(true);
    observer.join();
    for (uint32_t slot : slots) close_socket(c, slot);
    CHECK_OR_FAIL(violations.load() == 0,
                  "in %u of %u refused connects, error_gen moved before kFlagReset was set",
                  violations.load(), kRounds);
    std::printf("ok: a client that sees a new error_gen also sees kFlagReset\n");
}

// After the FIN no recv is posted; the RST that follows must still reach the slot.
void rst_after_fin(RawClient &c) {
    uint32_t slot = 0;
    const int listener = kernel_listener(4);
    const int peer = connect_pair(c, slot, listener);
    auto S = [&]() -> ipc::SocketSlot & { return c.slot(slot); };
    CHECK_OR_FAIL(shutdown(peer, SHUT_WR) == 0, "kernel shutdown");
    CHECK_OR_FAIL(wait_flags(c, slot, ipc::kFlagRxEof), "the peer's FIN never set kFlagRxEof");
    CHECK_OR_FAIL(!(flags_of(c, slot) & ipc::kFlagReset), "reset before any RST");

    // A thread sleeping on this slot must be woken by the reset.
    int waiter[2];
    CHECK_OR_FAIL(pipe2(waiter, O_CLOEXEC | O_NONBLOCK) == 0, "pipe");
    CHECK_OR_FAIL(c.register_waiter(0, waiter[1]) == 0, "register waiter");
    close(waiter[1]);
    ipc::Waiter &w = c.region().waiter(0);
    w.slot.store(slot);
    w.state.store(uint32_t(ipc::WaiterState::kArmed));
    c.region().header().waiters_armed.fetch_add(1);
    const uint32_t events = S().event_gen.load();

    const linger abortive{1, 0};
    CHECK_OR_FAIL(setsockopt(peer, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive)) == 0,
                  "SO_LINGER");
    close(peer);  // RST
    // kFlagReset is the engine's last store: once it is set, so_error and error_gen are there.
    CHECK_OR_FAIL(wait_until([&] { return (flags_of(c, slot) & ipc::kFlagReset) != 0; }, kWaitMs),
                  "an RST after the peer's FIN was not reported (no send was made)");
    CHECK_OR_FAIL(S().error_gen.load() != 0, "kFlagReset set, error_gen not moved");
    // tcp_reset() in CLOSE_WAIT: Linux says EPIPE, and poll() POLLERR|POLLHUP.
    CHECK_OR_FAIL(S().so_error.load() == EPIPE && S().error_gen.load() == 1,
                  "so_error %d error_gen %u, expected EPIPE and 1", S().so_error.load(),
                  S().error_gen.load());
    const uint32_t mask = S().kernel_mask.load();
    CHECK_OR_FAIL((mask & (POLLERR | POLLHUP)) == (POLLERR | POLLHUP), "kernel_mask %#x", mask);
    CHECK_OR_FAIL(S().event_gen.load() != events, "event_gen did not move");
    pollfd p{waiter[0], POLLIN, 0};
    CHECK_OR_FAIL(poll(&p, 1, kWaitMs) == 1, "the waiter on the slot was not woken");
    CHECK_OR_FAIL(w.state.load() == uint32_t(ipc::WaiterState::kSignaled), "waiter not signaled");
    w.state.store(uint32_t(ipc::WaiterState::kIdle));
    c.region().header().waiters_armed.fetch_sub(1);
    close(waiter[0]);
    close_socket(c, slot);

    // Our FIN and theirs, no RST: the watch sees POLLHUP alone, which is no error.
    const int peer2 = connect_pair(c, slot, listener);
    CHECK_OR_FAIL(shutdown(peer2, SHUT_WR) == 0, "kernel shutdown");
    CHECK_OR_FAIL(wait_flags(c, slot, ipc::kFlagRxEof), "FIN never set kFlagRxEof");
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kShutdown), SHUT_WR) == 0, "kShutdown");
    CHECK_OR_FAIL(wait_flags(c, slot, ipc::kFlagTxShut), "kFlagTxShut never set");
    CHECK_OR_FAIL(wait_until([&] { return (S().kernel_mask.load() & POLLHUP) != 0; }, kWaitMs),
                  "both directions shut, but kernel_mask %#x lacks POLLHUP",
                  S().kernel_mask.load());
    char byte;
    CHECK_OR_FAIL(kernel_recv_within(peer2, &byte, 1, kWaitMs) == 0, "peer saw no FIN");
    CHECK_OR_FAIL(!(flags_of(c, slot) & ipc::kFlagReset) && S().error_gen.load() == 0,
                  "an orderly close was reported as an error (so_error %d)", S().so_error.load());
    close(peer2);
    close_socket(c, slot);
    close(listener);
    std::printf("ok: an RST after the peer's FIN is reported without a send (EPIPE)\n");
}

// Linux: after a failed connect the socket is TCP_CLOSE and may connect again.
void connect_after_failure(RawClient &c) {
    uint32_t slot = 0;
    const int listener = kernel_listener(4);
    auto S = [&]() -> ipc::SocketSlot & { return c.slot(slot); };
    for (const bool bound : {false, true}) {
        open_socket(c, slot);
        uint16_t bound_port = 0;
        if (bound) {
            // A named port: Linux keeps it across the disconnect (SOCK_BINDPORT_LOCK), while
            // a port picked by bind(port 0) is given back when the attempt fails.
            const sockaddr_in named = loopback(closed_port());
            CHECK_OR_FAIL(
                c.request_result(slot, uint32_t(Op::kBind), 0, 0, 0, &named, sizeof(named)) == 0,
                "kBind");
            bound_port = port_of(S().local_addr);
        }
        int rc = engine_connect(c, slot, closed_port());
        CHECK_OR_FAIL(rc == -EINPROGRESS, "first kConnect answered %d", rc);
        // kFlagReset is published last (after so_error and error_gen).
        CHECK_OR_FAIL(
            wait_until([&] { return (flags_of(c, slot) & ipc::kFlagReset) != 0; }, kWaitMs),
            "refused connect never reported");
        CHECK_OR_FAIL((flags_of(c, slot) & ipc::kFlagReset) && S().so_error.load() == ECONNREFUSED,
                      "flags %#x so_error %d", flags_of(c, slot), S().so_error.load());

        rc = engine_connect(c, slot, local_port(listener));
        CHECK_OR_FAIL(rc == -EINPROGRESS || rc == 0,
                      "kConnect after a refused one answered %d (%s), expected -EINPROGRESS", rc,
                      std::strerror(-rc));
        const int peer = accept_within(listener, kWaitMs);
        CHECK_OR_FAIL(peer >= 0, "the second attempt never reached the listener");
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              const uint32_t f = flags_of(c, slot);
                              return (f & ipc::kFlagConnected) && !(f & ipc::kFlagReset);
                          },
                          kWaitMs),
                      "the second attempt never connected (flags %#x)", flags_of(c, slot));
        CHECK_OR_FAIL(S().error_gen.load() == 1, "error_gen %u after a good connect",
                      S().error_gen.load());
        if (bound) {
            sockaddr_in from{};
            socklen_t len = sizeof(from);
            getpeername(peer, reinterpret_cast<sockaddr *>(&from), &len);
            CHECK_OR_FAIL(ntohs(from.sin_port) == bound_port,
                          "the retry came from port %u, the socket was bound to %u",
                          ntohs(from.sin_port), bound_port);
        }
        CHECK_OR_FAIL(c.send(slot, "hi", 2) == 2, "tx ring");
        char got[2];
        CHECK_OR_FAIL(kernel_recv_within(peer, got, 2, kWaitMs) == 2 && got[0] == 'h',
                      "bytes of the second attempt never arrived");
        close(peer);
        close_socket(c, slot);
    }
    close(listener);
    std::printf("ok: connect() again after a refused connect() starts a new attempt\n");
}

void shutdown_listener(RawClient &c) {
    uint32_t slot = 0;
    auto S = [&]() -> ipc::SocketSlot & { return c.slot(slot); };
    open_socket(c, slot);
    // A named port, which Linux keeps when the listener is disconnected (one picked by
    // bind(port 0) is given back, and listen() again picks another).
    const sockaddr_in named = loopback(closed_port());
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kBind), 0, 0, 0, &named, sizeof(named)) == 0,
                  "kBind");
    const uint16_t port = port_of(S().local_addr);
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kListen), 8) == 0, "kListen");

    // SHUT_WR: nothing changes, the listener still accepts.
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kShutdown), SHUT_WR) == 0, "SHUT_WR");
    uint32_t flags = flags_of(c, slot);
    CHECK_OR_FAIL((flags & ipc::kFlagListening) && !(flags & ipc::kFlagTxShut),
                  "listener after SHUT_WR: flags %#x", flags);
    const int kept = kernel_connect_nb(port);
    CHECK_OR_FAIL(wait_until([&] { return S().acc_tail.load() == 1; }, kWaitMs),
                  "a listener shut for writing stopped accepting");

    // SHUT_RD: the listener is disconnected; the connection in its ring is reset.
    const int rc = c.request_result(slot, uint32_t(Op::kShutdown), SHUT_RD);
    CHECK_OR_FAIL(rc == 0, "SHUT_RD on a listener answered %d", rc);
    flags = flags_of(c, slot);
    CHECK_OR_FAIL(!(flags & (ipc::kFlagListening | ipc::kFlagRxShut | ipc::kFlagTxShut)),
                  "listener after SHUT_RD: flags %#x (not listening, nothing shut expected)",
                  flags);
    const uint32_t mask = S().kernel_mask.load();
    CHECK_OR_FAIL((mask & (POLLHUP | POLLOUT)) == (POLLHUP | POLLOUT) && !(mask & POLLERR),
                  "listener after SHUT_RD: kernel_mask %#x, Linux says POLLOUT|POLLHUP", mask);
    char byte;
    const ssize_t got = kernel_recv_within(kept, &byte, 1, kWaitMs);
    CHECK_OR_FAIL(got == -ECONNRESET, "the unaccepted connection's peer got %zd, not ECONNRESET",
                  got);
    close(kept);
    const uint32_t untaken = S().accept_ring[0];
    CHECK_OR_FAIL(untaken < ipc::kMaxSockets && untaken != slot, "ring entry %u", untaken);
    // Another worker's connection (two workers) is reset by its own worker, told by the
    // listener's: its peer may see the RST a moment before the slot says so.
    CHECK_OR_FAIL(wait_until(
                      [&] {
                          return (flags_of(c, untaken) & ipc::kFlagReset) &&
                                 c.slot(untaken).so_error.load() == ECONNRESET;
                      },
                      kWaitMs),
                  "the unaccepted connection's slot is not reset");
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kShutdown), SHUT_RD) == -ENOTCONN,
                  "a second SHUT_RD: Linux says ENOTCONN");
    const int refused = kernel_connect_nb(port);
    pollfd p{refused, POLLOUT, 0};
    CHECK_OR_FAIL(
        poll(&p, 1, kWaitMs) == 1 && native_get_int(refused, SOL_SOCKET, SO_ERROR) == ECONNREFUSED,
        "a connect to the shut listener's port was not refused");
    close(refused);

    // listen() again works, on the same port.
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kListen), 8) == 0, "kListen again");
    CHECK_OR_FAIL(flags_of(c, slot) & ipc::kFlagListening, "not listening again");
    CHECK_OR_FAIL(port_of(S().local_addr) == port, "the port changed");
    const int again = kernel_connect_nb(port);
    CHECK_OR_FAIL(wait_until([&] { return S().acc_tail.load() == 2; }, kWaitMs),
                  "the listener does not accept after listen() again");
    CHECK_OR_FAIL(c.accept(slot) == int(untaken), "ring order");
    const int fresh = c.accept(slot);
    CHECK_OR_FAIL(fresh >= 0 && !(flags_of(c, fresh) & ipc::kFlagReset),
                  "the new connection is not usable");
    close(again);
    close_socket(c, untaken);
    close_socket(c, uint32_t(fresh));
    close_socket(c, slot);
    std::printf("ok: shutdown() of a listener: SHUT_WR changes nothing, SHUT_RD stops it\n");
}

void shutdown_connecting(RawClient &c) {
    uint32_t slot = 0;
    auto S = [&]() -> ipc::SocketSlot & { return c.slot(slot); };
    // A full accept queue drops SYNs: the engine's connect stays in SYN_SENT.
    const int full = kernel_listener(0);
    const uint16_t port = local_port(full);
    const int filler1 = kernel_connect_nb(port);
    pollfd p{filler1, POLLOUT, 0};
    CHECK_OR_FAIL(poll(&p, 1, kWaitMs) == 1, "the first filler never connected");
    const int filler2 = kernel_connect_nb(port);
    const int good = kernel_listener(4);
    for (const int how : {SHUT_RD, SHUT_WR, SHUT_RDWR}) {
        open_socket(c, slot);
        int rc = engine_connect(c, slot, port);
        CHECK_OR_FAIL(rc == -EINPROGRESS, "kConnect answered %d", rc);
        RawClient::Reply info =
            c.request(slot, uint32_t(Op::kGetSockOpt), IPPROTO_TCP, TCP_INFO, sizeof(tcp_info));
        CHECK_OR_FAIL(info.answered && info.result == 0 && !info.opt.empty(), "TCP_INFO");
        CHECK_OR_FAIL(info.opt[0] == TCP_SYN_SENT, "the connect is in state %u, not SYN_SENT",
                      info.opt[0]);
        rc = c.request_result(slot, uint32_t(Op::kShutdown), how);
        CHECK_OR_FAIL(rc == 0, "shutdown(%d) while connecting answered %d", how, rc);
        const uint32_t flags = flags_of(c, slot);
        CHECK_OR_FAIL(
            (flags & ipc::kFlagReset) && !(flags & (ipc::kFlagConnecting | ipc::kFlagConnected |
                                                    ipc::kFlagRxShut | ipc::kFlagTxShut)),
            "shutdown(%d) while connecting: flags %#x, expected the attempt reset", how, flags);
        CHECK_OR_FAIL(S().so_error.load() == ECONNRESET && S().error_gen.load() == 1,
                      "shutdown(%d) while connecting: so_error %d error_gen %u", how,
                      S().so_error.load(), S().error_gen.load());
        // The socket may connect again.
        rc = engine_connect(c, slot, local_port(good));
        CHECK_OR_FAIL(rc == -EINPROGRESS || rc == 0, "kConnect after the shutdown answered %d", rc);
        const int peer = accept_within(good, kWaitMs);
        CHECK_OR_FAIL(peer >= 0, "the new attempt never arrived");
        CHECK_OR_FAIL(wait_flags(c, slot, ipc::kFlagConnected), "the new attempt never connected");
        close(peer);
        close_socket(c, slot);
    }
    close(filler1);
    close(filler2);
    close(full);
    close(good);
    std::printf("ok: shutdown() of a connecting socket aborts the attempt (ECONNRESET)\n");
}

void rcvlowat(RawClient &c) {
    uint32_t slot = 0;
    for (const bool small_buffer : {false, true}) {
        for (const int value : {-1, 0, 5, 1 << 20, 100 << 20, INT_MAX}) {
            open_socket(c, slot);
            const int native = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (small_buffer) {
                const int bytes = 64 * 1024;
                CHECK_OR_FAIL(set_int(c, slot, SOL_SOCKET, SO_RCVBUF, bytes) == 0, "SO_RCVBUF");
                setsockopt(native, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
            }
            CHECK_OR_FAIL(set_int(c, slot, SOL_SOCKET, SO_RCVLOWAT, value) == 0, "SO_RCVLOWAT %d",
                          value);
            setsockopt(native, SOL_SOCKET, SO_RCVLOWAT, &value, sizeof(value));
            const int ours = get_int(c, slot, SOL_SOCKET, SO_RCVLOWAT);
            const int linux_says = native_get_int(native, SOL_SOCKET, SO_RCVLOWAT);
            CHECK_OR_FAIL(ours == linux_says, "SO_RCVLOWAT %d%s: engine says %d, Linux %d", value,
                          small_buffer ? " after SO_RCVBUF 64K" : "", ours, linux_says);
            const int buffer = get_int(c, slot, SOL_SOCKET, SO_RCVBUF);
            const int native_buffer = native_get_int(native, SOL_SOCKET, SO_RCVBUF);
            CHECK_OR_FAIL(buffer == native_buffer,
                          "SO_RCVBUF after SO_RCVLOWAT %d: engine says %d, Linux %d", value, buffer,
                          native_buffer);
            close(native);
            close_socket(c, slot);
        }
    }
    // Accepted connections inherit the listener's value, as sk_clone_lock() copies it.
    open_socket(c, slot);
    const sockaddr_in any = loopback(0);
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kBind), 0, 0, 0, &any, sizeof(any)) == 0,
                  "kBind");
    CHECK_OR_FAIL(set_int(c, slot, SOL_SOCKET, SO_RCVLOWAT, 7) == 0, "SO_RCVLOWAT 7");
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(Op::kListen), 4) == 0, "kListen");
    const int client = kernel_connect_nb(port_of(c.slot(slot).local_addr));
    int conn = -1;
    CHECK_OR_FAIL(wait_until([&] { return (conn = c.accept(slot)) >= 0; }, kWaitMs), "accept");
    CHECK_OR_FAIL(get_int(c, uint32_t(conn), SOL_SOCKET, SO_RCVLOWAT) == 7,
                  "an accepted connection did not inherit SO_RCVLOWAT");
    close(client);
    close_socket(c, uint32_t(conn));
    close_socket(c, slot);

    // The low-water mark is the application's: the engine still lands every byte at once.
    const int listener = kernel_listener(4);
    const int peer = connect_pair(c, slot, listener);
    CHECK_OR_FAIL(set_int(c, slot, SOL_SOCKET, SO_RCVLOWAT, 100) == 0, "SO_RCVLOWAT 100");
    CHECK_OR_FAIL(send(peer, "x", 1, MSG_NOSIGNAL) == 1, "kernel send");
    CHECK_OR_FAIL(wait_until([&] { return c.slot(slot).rx_tail.load() == 1; }, kWaitMs),
                  "one byte below SO_RCVLOWAT never reached the rx ring");
    CHECK_OR_FAIL(get_int(c, slot, SOL_SOCKET, SO_RCVLOWAT) == 100, "SO_RCVLOWAT lost");
    close(peer);
    close_socket(c, slot);
    close(listener);
    std::printf("ok: getsockopt(SO_RCVLOWAT) answers Linux's value\n");
}

struct Case {
    const char *name;
    void (*run)(RawClient &);
};
// Linux: on loopback a connect's handshake is through before the server can accept the
// connection, so a client is connected by the time the server's accept() returns. The engine
// accepts and connects on its own schedule; it must still never publish the accepted end of
// a connection before the connecting end it also serves.
void connected_before_accepted(RawClient &c) {
    uint32_t listener = 0;
    open_socket(c, listener);
    const sockaddr_in any = loopback(0);
    CHECK_OR_FAIL(c.request_result(listener, uint32_t(Op::kBind), 0, 0, 0, &any, sizeof(any)) == 0,
                  "kBind");
    CHECK_OR_FAIL(c.request_result(listener, uint32_t(Op::kListen), 64) == 0, "kListen");
    const uint16_t port = port_of(c.slot(listener).local_addr);
    constexpr int kRounds = 200;
    int late = 0;
    for (int round = 0; round < kRounds; ++round) {
        uint32_t client = 0;
        open_socket(c, client);
        const int rc = engine_connect(c, client, port);
        CHECK_OR_FAIL(rc == -EINPROGRESS || rc == 0, "kConnect answered %d", rc);
        int accepted = -1;
        CHECK_OR_FAIL(wait_until([&] { return (accepted = c.accept(listener)) >= 0; }, kWaitMs),
                      "round %d: never accepted", round);
        // The accept ring entry was published after (release) the client's flags.
        if (!(flags_of(c, client) & ipc::kFlagConnected)) ++late;
        close_socket(c, uint32_t(accepted));
        close_socket(c, client);
    }
    close_socket(c, listener);
    CHECK_OR_FAIL(late == 0, "in %d of %d connects the accepted end came before the connected one",
                  late, kRounds);
    std::printf("ok: a connection is connected before its accepted end is published\n");
}

constexpr Case kCases[] = {
    {"connected-before-accepted", connected_before_accepted},
    {"reset-implies-error", reset_implies_error},
    {"rst-after-fin", rst_after_fin},
    {"connect-again", connect_after_failure},
    {"shutdown-listener", shutdown_listener},
    {"shutdown-connecting", shutdown_connecting},
    {"rcvlowat", rcvlowat},
};

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: engine_states /path/to/tcpsd [case...] [-- args...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::vector<std::string> selected, engine_args;
    bool after_dashes = false;
    for (int k = 2; k < argc; ++k) {
        if (!after_dashes && std::strcmp(argv[k], "--") == 0) {
            after_dashes = true;
        } else {
            (after_dashes ? engine_args : selected).push_back(argv[k]);
        }
    }
    if (!cores_available(engine_args)) {
        std::printf("SKIP: this machine lacks the CPUs named by --cores\n");
        return 77;
    }
    const ControlSocketDir socket_dir("tcps-states");
    const std::string path = socket_dir.path();
    EngineProcess engine;
    CHECK_OR_FAIL(engine.start(argv[1], path, engine_args), "tcpsd did not become ready");
    RawClient c;
    CHECK_OR_FAIL(c.connect(path) == 0, "hello");
    for (const Case &item : kCases) {
        bool wanted = selected.empty();
        for (const std::string &name : selected) wanted |= name == item.name;
        if (!wanted) continue;
        item.run(c);
        CHECK_OR_FAIL(engine.running() && c.engine_alive(), "the engine or session died");
    }
    c.disconnect();
    CHECK_OR_FAIL(engine.stop(5000) == 0, "tcpsd did not exit 0 after SIGTERM");
    unlink(path.c_str());
    std::printf("PASS\n");
    return 0;
}
