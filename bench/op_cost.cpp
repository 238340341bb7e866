// The cost of one send() or recv() on the application's side (MemNet's Figure 5): CPU time of
// the calling thread per call, for a given message size, against a peer that drains (send) or
// streams (recv) as fast as it can.
//
// The same binary runs natively and under LD_PRELOAD=libtcps.so; bench/op_cost.sh runs both,
// alternately, and reports ratios. The peer is `op_cost --peer`, never preloaded.
//
// With the MemNet API (preload/tcps_memnet.h), the calls are memnet_send_direct,
// memnet_recv_direct, or memnet_async_send/memnet_async_recv with up to kAsyncDepth jobs in
// flight (each call's CPU includes the job_wait of the job whose buffer it reuses), from and
// into a registered buffer.
//
//   op_cost --peer PORT_FILE                 listen on 127.0.0.1:0, write the port, then serve
//   op_cost --send|--recv PORT SIZE COUNT    connect, run COUNT calls of SIZE bytes, print a line
//   op_cost --send-direct|--recv-direct|--async-send|--async-recv PORT SIZE COUNT
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"
#include "tcps_memnet.h"

namespace {

using namespace tcps::bench;

// The peer: each connection first says what it wants in one byte: 'S' (the client sends,
// we drain) or 'R' (the client receives, we stream until it closes).
void serve(int conn) {
    char mode = 0;
    if (recv(conn, &mode, 1, MSG_WAITALL) != 1) {
        close(conn);
        return;
    }
    std::vector<char> buffer(1 << 20, 'x');
    if (mode == 'S') {
        while (recv(conn, buffer.data(), buffer.size(), 0) > 0) {
        }
    } else {
        while (send(conn, buffer.data(), buffer.size(), MSG_NOSIGNAL) > 0) {
        }
    }
    close(conn);
}

int run_peer(const char *port_file) {
    const int listener = listen_loopback(port_file);
    for (;;) {
        const int conn = accept(listener, nullptr, nullptr);
        if (conn < 0) {
            if (errno == EINTR) continue;
            die("accept");
        }
        std::thread(serve, conn).detach();
    }
}

enum class Call { kSend, kRecv, kSendDirect, kRecvDirect, kAsyncSend, kAsyncRecv };
constexpr int kAsyncDepth = 8;

const char *call_name(Call call) {
    switch (call) {
        case Call::kSend:
            return "send";
        case Call::kRecv:
            return "recv";
        case Call::kSendDirect:
            return "send_direct";
        case Call::kRecvDirect:
            return "recv_direct";
        case Call::kAsyncSend:
            return "async_send";
        case Call::kAsyncRecv:
            return "async_recv";
    }
    return "?";
}

int run_client(Call call, int port, size_t size, long count) {
    const bool sending =
        call == Call::kSend || call == Call::kSendDirect || call == Call::kAsyncSend;
    const int fd = connect_loopback(port);
    const char mode = sending ? 'S' : 'R';
    if (send(fd, &mode, 1, 0) != 1) die("send mode");

    std::vector<char> buffer(size * kAsyncDepth, 'a');
    memnet_mem_t mem = nullptr;
    if (call != Call::kSend && call != Call::kRecv &&
        memnet_register_mem(buffer.data(), buffer.size(), &mem) != 0)
        die("memnet_register_mem");
    memnet_job_t jobs[kAsyncDepth];
    bool in_flight[kAsyncDepth] = {};
    uint64_t post_ns = 0;   // async_send/recv: wall time inside memnet_async_* itself
    uint64_t received = 0;  // async_recv: what the jobs waited for brought
    long next = 0;
    auto one_call = [&] {
        // A blocking call moves all `size` bytes for send; recv may return fewer, as an
        // application's recv would: that is the call being measured.
        ssize_t n = 0;
        switch (call) {
            case Call::kSend:
                n = send(fd, buffer.data(), size, 0);
                break;
            case Call::kRecv:
                n = recv(fd, buffer.data(), size, 0);
                break;
            case Call::kSendDirect:
                n = memnet_send_direct(fd, mem, 0, size);
                break;
            case Call::kRecvDirect:
                n = memnet_recv_direct(fd, mem, 0, size);
                break;
            case Call::kAsyncSend: {
                const int k = static_cast<int>(next++ % kAsyncDepth);
                if (in_flight[k] && memnet_job_wait(&jobs[k], -1) != static_cast<ssize_t>(size))
                    die("memnet_job_wait");
                const uint64_t posting = clock_ns(CLOCK_MONOTONIC);
                in_flight[k] = memnet_async_send(fd, mem, k * size, size, &jobs[k]) == 0;
                post_ns += clock_ns(CLOCK_MONOTONIC) - posting;
                n = in_flight[k] ? static_cast<ssize_t>(size) : -1;
                break;
            }
            case Call::kAsyncRecv: {
                // As a receive may, each job can bring fewer than `size` bytes.
                const int k = static_cast<int>(next++ % kAsyncDepth);
                if (in_flight[k]) {
                    const ssize_t got = memnet_job_wait(&jobs[k], -1);
                    if (got <= 0) die("memnet_job_wait");
                    received += static_cast<uint64_t>(got);
                }
                const uint64_t posting = clock_ns(CLOCK_MONOTONIC);
                in_flight[k] = memnet_async_recv(fd, mem, k * size, size, &jobs[k]) == 0;
                post_ns += clock_ns(CLOCK_MONOTONIC) - posting;
                n = in_flight[k] ? 1 : -1;
                break;
            }
        }
        if (n <= 0) die(call_name(call));
        return static_cast<uint64_t>(n);
    };
    auto drain_jobs = [&] {
        for (int k = 0; k < kAsyncDepth; ++k) {
            if (!in_flight[k]) continue;
            const ssize_t got = memnet_job_wait(&jobs[k], -1);
            if (got <= 0 || (call == Call::kAsyncSend && got != static_cast<ssize_t>(size)))
                die("memnet_job_wait");
            received += static_cast<uint64_t>(got);
        }
        std::fill(std::begin(in_flight), std::end(in_flight), false);
    };
    for (long i = 0; i < count / 10 + 1; ++i) one_call();  // warm up: rings, caches, windows
    drain_jobs();
    post_ns = 0;
    received = 0;

    const uint64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    const uint64_t wall0 = clock_ns(CLOCK_MONOTONIC);
    uint64_t bytes = 0;
    for (long i = 0; i < count; ++i) bytes += one_call();
    drain_jobs();  // every job done: its cost counted
    if (call == Call::kAsyncRecv) bytes = received;
    const uint64_t cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    const uint64_t wall = clock_ns(CLOCK_MONOTONIC) - wall0;
    if (mem && memnet_deregister_mem(mem) != 0) die("memnet_deregister_mem");
    close(fd);
    // One line, key=value, parsed by op_cost.sh.
    std::printf(
        "op=%s size=%zu calls=%ld bytes=%llu cpu_ns_per_call=%.1f wall_ns_per_call=%.1f "
        "post_ns_per_call=%.1f\n",
        call_name(call), size, count, static_cast<unsigned long long>(bytes),
        static_cast<double>(cpu) / static_cast<double>(count),
        static_cast<double>(wall) / static_cast<double>(count),
        static_cast<double>(post_ns) / static_cast<double>(count));
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    tcps::bench::program_name = "op_cost";
    if (argc == 3 && std::strcmp(argv[1], "--peer") == 0) return run_peer(argv[2]);
    const struct {
        const char *flag;
        Call call;
    } calls[] = {{"--send", Call::kSend},
                 {"--recv", Call::kRecv},
                 {"--send-direct", Call::kSendDirect},
                 {"--recv-direct", Call::kRecvDirect},
                 {"--async-send", Call::kAsyncSend},
                 {"--async-recv", Call::kAsyncRecv}};
    for (const auto &entry : calls)
        if (argc == 5 && std::strcmp(argv[1], entry.flag) == 0)
            return run_client(entry.call, std::atoi(argv[2]), std::strtoul(argv[3], nullptr, 10),
                              std::atol(argv[4]));
    std::fprintf(stderr,
                 "usage: op_cost --peer PORT_FILE | op_cost --send|--recv|--send-direct|"
                 "--recv-direct|--async-send|--async-recv PORT SIZE COUNT\n");
    return 2;
}
