// Readiness of an offloaded socket from its slot snapshot: each case is what Linux's
// tcp_poll() reports for the same state (measured natively on 6.x).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include "layout.hpp"
#include "readiness.hpp"

using namespace tcps;
using shim::poll_mask;
using shim::SocketSnapshot;

namespace {

constexpr uint32_t kIn = POLLIN | POLLRDNORM;
constexpr uint32_t kOut = POLLOUT | POLLWRNORM;

SocketSnapshot connected() {
    SocketSnapshot s;
    s.flags = ipc::kFlagConnected | ipc::kFlagBound;
    return s;
}

}  // namespace

TEST_CASE("a fresh socket is writable and hung up (POLLOUT|POLLHUP), as Linux says") {
    SocketSnapshot s;
    CHECK(poll_mask(s) == (kOut | POLLHUP));
}

TEST_CASE("a connecting socket reports nothing until the handshake ends") {
    SocketSnapshot s;
    s.flags = ipc::kFlagConnecting;
    CHECK(poll_mask(s) == 0);
    s.flags = 0;
    s.connect_started = true;  // before the engine has set its flag
    CHECK(poll_mask(s) == 0);
    // A pending error ends the attempt (a refused connect): IN|OUT|ERR|HUP|RDHUP.
    s.error_pending = true;
    CHECK(poll_mask(s) == (kIn | kOut | POLLERR | POLLHUP | POLLRDHUP));
}

TEST_CASE("a connected socket is writable while its tx ring has room") {
    SocketSnapshot s = connected();
    CHECK(poll_mask(s) == kOut);
    s.tx_room = 1;
    CHECK(poll_mask(s) == kOut);
    s.tx_room = 0;
    CHECK(poll_mask(s) == 0);
}

TEST_CASE("bytes in the rx ring make a socket readable") {
    SocketSnapshot s = connected();
    s.rx_available = 1;
    CHECK(poll_mask(s) == (kIn | kOut));
}

TEST_CASE("direct mode: bytes waiting in the engine's kernel socket make a socket readable") {
    SocketSnapshot s = connected();
    s.flags |= ipc::kFlagRxDirect;
    CHECK(poll_mask(s) == kOut);  // nothing waits there: not readable
    s.direct_readable = true;
    CHECK(poll_mask(s) == (kIn | kOut));
}

TEST_CASE("the peer's FIN: POLLIN|POLLRDHUP with POLLOUT still (0x2005 on Linux)") {
    SocketSnapshot s = connected();
    s.flags |= ipc::kFlagRxEof;
    CHECK(poll_mask(s) == (kIn | kOut | POLLRDHUP));
}

TEST_CASE("a reset connection with its error pending: IN|OUT|ERR|HUP|RDHUP (0x201d)") {
    SocketSnapshot s = connected();
    s.flags |= ipc::kFlagReset;
    s.error_pending = true;
    CHECK(poll_mask(s) == (kIn | kOut | POLLERR | POLLHUP | POLLRDHUP));
    s.error_pending = false;  // SO_ERROR consumed it
    CHECK(poll_mask(s) == (kIn | kOut | POLLHUP | POLLRDHUP));
}

TEST_CASE("a refused connect, once connect() reported it, is a fresh socket again (0x14)") {
    SocketSnapshot s;
    s.flags = ipc::kFlagReset | ipc::kFlagBound;
    s.disconnected = true;
    CHECK(poll_mask(s) == (kOut | POLLHUP));
}

TEST_CASE("shutdown(SHUT_WR) keeps POLLOUT, so a writer finds EPIPE") {
    SocketSnapshot s = connected();
    s.shut_wr = true;
    s.tx_room = 0;  // even with a full ring
    CHECK(poll_mask(s) == kOut);
}

TEST_CASE("shutdown(SHUT_RDWR): IN|OUT|HUP|RDHUP (0x2015)") {
    SocketSnapshot s = connected();
    s.shut_rd = true;
    s.shut_wr = true;
    CHECK(poll_mask(s) == (kIn | kOut | POLLHUP | POLLRDHUP));
}

TEST_CASE("shutdown(SHUT_RD) of a never-connected socket: IN|OUT|HUP|RDHUP") {
    SocketSnapshot s;
    s.shut_rd = true;
    CHECK(poll_mask(s) == (kIn | kOut | POLLHUP | POLLRDHUP));
}

TEST_CASE("a listener is readable only while a connection waits in its accept ring") {
    SocketSnapshot s;
    s.flags = ipc::kFlagListening | ipc::kFlagBound;
    s.listening = true;
    CHECK(poll_mask(s) == 0);
    s.accept_available = 3;
    CHECK(poll_mask(s) == kIn);
}

TEST_CASE("a listener shut down with SHUT_RD is a closed socket again: OUT|HUP (0x14)") {
    SocketSnapshot s;
    s.flags = ipc::kFlagListening | ipc::kFlagBound | ipc::kFlagRxShut | ipc::kFlagTxShut;
    s.disconnected = true;  // the engine's shutdown flags no longer count
    CHECK(poll_mask(s) == (kOut | POLLHUP));
}

TEST_CASE("a dead engine wakes every waiter with everything") {
    SocketSnapshot s = connected();
    s.dead = true;
    CHECK(poll_mask(s) == (kIn | kOut | POLLHUP | POLLERR | POLLRDHUP));
}

TEST_CASE("a listener without an engine is readable once, for the accept() that says so") {
    SocketSnapshot s;
    s.flags = ipc::kFlagListening | ipc::kFlagBound;
    s.listening = true;
    s.accept_available = 2;  // what the engine had queued is gone with it
    s.dead = true;
    s.end_unreported = true;
    CHECK(poll_mask(s) == kIn);
}

TEST_CASE("a listener without an engine is quiet once accept() reported its end") {
    SocketSnapshot s;
    s.flags = ipc::kFlagListening | ipc::kFlagBound;
    s.listening = true;
    s.accept_available = 2;
    s.dead = true;
    s.end_unreported = false;
    CHECK(poll_mask(s) == 0);
}

TEST_CASE("callers get what they asked for plus POLLERR and POLLHUP") {
    const uint32_t mask = kIn | kOut | POLLHUP | POLLERR | POLLRDHUP;
    CHECK(shim::reported_events(mask, POLLIN) == (POLLIN | POLLHUP | POLLERR));
    CHECK(shim::reported_events(mask, 0) == (POLLHUP | POLLERR));
    CHECK(shim::reported_events(mask, POLLIN | POLLRDHUP) ==
          (POLLIN | POLLRDHUP | POLLHUP | POLLERR));
}

TEST_CASE("select's sets follow fs/select.c: HUP reads, ERR reads and writes, PRI is exceptional") {
    CHECK(shim::select_readable(POLLHUP));
    CHECK(shim::select_readable(POLLERR));
    CHECK_FALSE(shim::select_readable(POLLOUT));
    CHECK(shim::select_writable(POLLERR));
    CHECK_FALSE(shim::select_writable(POLLHUP));
    CHECK(shim::select_exceptional(POLLPRI));
    CHECK_FALSE(shim::select_exceptional(POLLIN));
}
