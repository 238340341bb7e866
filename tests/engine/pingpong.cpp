// engine_pingpong: small messages bounced off a kernel echo peer, with both sides sleeping
// between messages: the engine (run with --spin-us 0) in io_uring, the client on its waiter
// pipe. A lost wakeup on either side shows up as a message that never arrives.
//
//   engine_pingpong /path/to/tcpsd [round trips, default 5000] [tcpsd arguments...]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <string>
#include <thread>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: engine_pingpong /path/to/tcpsd [round trips] [args...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const int trips = argc > 2 ? std::atoi(argv[2]) : 5000;
    std::vector<std::string> engine_args(argv + std::min(argc, 3), argv + argc);
    if (engine_args.empty()) engine_args = {"--spin-us", "0"};
    if (!cores_available(engine_args)) {
        std::printf("SKIP: this machine lacks the CPUs named by --cores\n");
        return 77;
    }
    const ControlSocketDir socket_dir("tcps-pingpong");
    const std::string path = socket_dir.path();
    EngineProcess engine;
    CHECK_OR_FAIL(engine.start(argv[1], path, engine_args), "tcpsd did not become ready");

    KernelEchoPeer echo_peer;
    const sockaddr_in addr = echo_peer.address();

    RawClient c;
    CHECK_OR_FAIL(c.connect(path) == 0, "hello");
    int waiter_pipe[2];
    CHECK_OR_FAIL(pipe2(waiter_pipe, O_CLOEXEC) == 0, "pipe");
    CHECK_OR_FAIL(c.register_waiter(0, waiter_pipe[1]) == 0, "register waiter");
    close(waiter_pipe[1]);
    const uint32_t slot = open_socket(c, AF_INET, "client");
    const int one = 1;
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kSetSockOpt), IPPROTO_TCP, TCP_NODELAY,
                                   0, nullptr, 0, &one, sizeof(one)) == 0,
                  "TCP_NODELAY");
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kConnect), 0, 0, 0, &addr,
                                   sizeof(addr)) == -EINPROGRESS,
                  "kConnect");
    ipc::SocketSlot &s = c.slot(slot);
    CHECK_OR_FAIL(wait_until([&] { return (s.flags.load() & ipc::kFlagConnected) != 0; }, 3000),
                  "never connected");

    ipc::Waiter &w = c.region().waiter(0);
    ipc::RegionHeader &header = c.region().header();
    // Blocks like a shim thread would: arm, re-check, sleep on the pipe (bounded).
    auto wait_for_bytes = [&](uint32_t want) -> bool {
        for (;;) {
            if (s.rx_tail.load(std::memory_order_acquire) - s.rx_head.load() >= want) return true;
            header.waiters_armed.fetch_add(1, std::memory_order_seq_cst);
            w.slot.store(slot, std::memory_order_relaxed);
            w.state.store(uint32_t(ipc::WaiterState::kArmed), std::memory_order_seq_cst);
            full_fence();
            const bool ready = s.rx_tail.load(std::memory_order_acquire) - s.rx_head.load() >= want;
            bool woken = true;
            if (!ready) {
                pollfd p{waiter_pipe[0], POLLIN, 0};
                woken = poll(&p, 1, 3000) == 1;
                char drained[16];
                if (woken) {
                    ssize_t ignored = read(waiter_pipe[0], drained, sizeof(drained));
                    (void)ignored;
                }
            }
            w.state.store(uint32_t(ipc::WaiterState::kIdle), std::memory_order_seq_cst);
            header.waiters_armed.fetch_sub(1, std::memory_order_seq_cst);
            if (!woken) return false;
        }
    };

    std::vector<double> micros;
    micros.reserve(static_cast<size_t>(trips));
    char message[64], reply[64];
    for (int trip = 0; trip < trips; ++trip) {
        const int n = std::snprintf(message, sizeof(message), "ping %d", trip);
        const auto t0 = Clock::now();
        CHECK_OR_FAIL(c.send(slot, message, static_cast<size_t>(n)) == static_cast<size_t>(n),
                      "tx ring full");
        CHECK_OR_FAIL(wait_for_bytes(static_cast<uint32_t>(n)),
                      "trip %d: reply never woke the client (lost wakeup?)", trip);
        CHECK_OR_FAIL(c.recv(slot, reply, static_cast<size_t>(n)) == static_cast<size_t>(n) &&
                          std::memcmp(message, reply, static_cast<size_t>(n)) == 0,
                      "trip %d: wrong reply", trip);
        micros.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        CHECK_OR_FAIL(!(s.flags.load() & ipc::kFlagReset), "connection reset");
    }
    std::sort(micros.begin(), micros.end());
    std::printf("ok: %d round trips, median %.1f us, p99 %.1f us, max %.1f us\n", trips,
                micros[micros.size() / 2], micros[micros.size() * 99 / 100], micros.back());
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kClose)) == 0, "kClose");
    close(waiter_pipe[0]);
    CHECK_OR_FAIL(engine.stop(3000) == 0, "tcpsd did not exit 0");
    std::printf("PASS\n");
    return 0;
}
