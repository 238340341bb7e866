// engine_wake_cost: a measurement, not a test. What a session's waiters cost the engine:
// round-trip time and engine CPU per round trip of a 64-byte ping-pong through tcpsd (the
// client spins on its rx ring), with the session's 256 waiters in one of these states:
//   none            no waiter registered
//   registered      256 registered, none armed (waiters_armed == 0: no scan)
//   armed-one-idle  one armed on a slot that never changes (a full scan per flush)
//   armed-idle      all 256 armed on a slot that never changes
//   herdN           N threads armed on kWaitAnySlot, each re-arming as soon as it is woken,
//                   as poll/epoll threads do when the change was not theirs
// Built on request only: ninja -C <build> tests/engine/engine_wake_cost
//
//   engine_wake_cost /path/to/tcpsd MODE [tcpsd arguments...]
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <algorithm>
#include <string>
#include <thread>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

namespace {

constexpr int kTrips = 20000;
constexpr uint32_t kIdleSlot = 500;

// CPU time of every thread of `pid` (schedstat: nanoseconds on a CPU).
uint64_t cpu_ns(pid_t pid) {
    uint64_t total = 0;
    const std::string dir = "/proc/" + std::to_string(pid) + "/task";
    DIR *tasks = opendir(dir.c_str());
    if (!tasks) return 0;
    while (dirent *entry = readdir(tasks)) {
        if (entry->d_name[0] == '.') continue;
        FILE *file = std::fopen((dir + "/" + entry->d_name + "/schedstat").c_str(), "r");
        if (!file) continue;
        unsigned long long ns = 0;
        if (std::fscanf(file, "%llu", &ns) == 1) total += ns;
        std::fclose(file);
    }
    closedir(tasks);
    return total;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: engine_wake_cost /path/to/tcpsd MODE [tcpsd args...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const std::string mode = argv[2];
    const std::vector<std::string> engine_args(argv + 3, argv + argc);
    const ControlSocketDir socket_dir("tcps-wake-cost");
    const std::string path = socket_dir.path();
    EngineProcess engine;
    CHECK_OR_FAIL(engine.start(argv[1], path, engine_args), "tcpsd did not become ready");

    KernelEchoPeer echo_peer;
    const sockaddr_in addr = echo_peer.address();

    RawClient c;
    CHECK_OR_FAIL(c.connect(path) == 0, "hello");
    // 256 sleepers: more than any test needs, within the default limit of 1024 descriptors.
    const uint32_t waiters = mode == "none" ? 0 : std::min<uint32_t>(ipc::kMaxWaiters, 256);
    std::vector<int> read_ends(waiters, -1);
    for (uint32_t w = 0; w < waiters; ++w) {
        int fds[2];
        CHECK_OR_FAIL(pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0, "pipe");
        CHECK_OR_FAIL(c.register_waiter(int(w), fds[1]) == 0, "register waiter %u", w);
        close(fds[1]);
        read_ends[w] = fds[0];
    }
    ipc::RegionHeader &header = c.region().header();
    auto arm_idle = [&](uint32_t w) {
        c.region().waiter(w).slot.store(kIdleSlot);
        c.region().waiter(w).state.store(uint32_t(ipc::WaiterState::kArmed));
        header.waiters_armed.fetch_add(1);
    };
    int herd = 0;
    if (mode == "armed-idle") {
        for (uint32_t w = 0; w < waiters; ++w) arm_idle(w);
    } else if (mode == "armed-one-idle") {
        arm_idle(waiters - 1);
    } else if (mode.rfind("herd", 0) == 0) {
        herd = std::min(std::atoi(mode.c_str() + 4), int(waiters));
    } else if (mode != "none" && mode != "registered") {
        fail("unknown mode %s", mode.c_str());
    }
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> wakes{0};
    std::vector<std::thread> sleepers;
    for (int k = 0; k < herd; ++k) {
        sleepers.emplace_back([&, k] {
            ipc::Waiter &w = c.region().waiter(uint32_t(k));
            while (!stop.load()) {
                header.waiters_armed.fetch_add(1);
                w.slot.store(ipc::kWaitAnySlot);
                w.state.store(uint32_t(ipc::WaiterState::kArmed));
                full_fence();
                pollfd p{read_ends[size_t(k)], POLLIN, 0};
                if (poll(&p, 1, 100) == 1) {
                    char drained[64];
                    ssize_t ignored = read(read_ends[size_t(k)], drained, sizeof(drained));
                    (void)ignored;
                    wakes.fetch_add(1);
                }
                w.state.store(uint32_t(ipc::WaiterState::kIdle));
                header.waiters_armed.fetch_sub(1);
            }
        });
    }

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

    std::vector<double> micros;
    micros.reserve(kTrips);
    char message[64] = {}, reply[64];
    const uint64_t cpu_before = cpu_ns(engine.pid());
    const auto start = Clock::now();
    for (int trip = 0; trip < kTrips; ++trip) {
        const auto t0 = Clock::now();
        CHECK_OR_FAIL(c.send(slot, message, sizeof(message)) == sizeof(message), "tx ring full");
        size_t have = 0;
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              have += c.recv(slot, reply + have, sizeof(reply) - have);
                              return have == sizeof(reply);
                          },
                          3000),
                      "trip %d: no reply", trip);
        micros.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    const double wall_us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    const double engine_us = double(cpu_ns(engine.pid()) - cpu_before) / 1000.0;
    stop.store(true);
    for (std::thread &sleeper : sleepers) sleeper.join();
    std::sort(micros.begin(), micros.end());
    std::printf(
        "%-15s median %6.1f us  p99 %6.1f us  engine CPU %6.2f us/trip (%3.0f%%)  "
        "wakes/trip %.2f\n",
        mode.c_str(), micros[micros.size() / 2], micros[micros.size() * 99 / 100],
        engine_us / kTrips, 100.0 * engine_us / wall_us, double(wakes.load()) / kTrips);
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kClose)) == 0, "kClose");
    for (const int fd : read_ends) close(fd);
    CHECK_OR_FAIL(engine.stop(3000) == 0, "tcpsd did not exit 0");
    return 0;
}
