// The cost of one send() or recv() on the application's side (MemNet's Figure 5): CPU time of
// the calling thread per call, for a given message size, against a peer that drains (send) or
// streams (recv) as fast as it can.
//
// The same binary runs natively and under LD_PRELOAD=libtcps.so; bench/op_cost.sh runs both,
// alternately, and reports ratios. The peer is `op_cost --peer`, never preloaded.
//
//   op_cost --peer PORT_FILE                 listen on 127.0.0.1:0, write the port, then serve
//   op_cost --send|--recv PORT SIZE COUNT    connect, run COUNT calls of SIZE bytes, print a line
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

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

int run_client(bool sending, int port, size_t size, long count) {
    const int fd = connect_loopback(port);
    const char mode = sending ? 'S' : 'R';
    if (send(fd, &mode, 1, 0) != 1) die("send mode");

    std::vector<char> buffer(size, 'a');
    auto one_call = [&] {
        // A blocking call moves all `size` bytes for send; recv may return fewer, as an
        // application's recv would: that is the call being measured.
        const ssize_t n =
            sending ? send(fd, buffer.data(), size, 0) : recv(fd, buffer.data(), size, 0);
        if (n <= 0) die(sending ? "send" : "recv");
        return static_cast<uint64_t>(n);
    };
    for (long i = 0; i < count / 10 + 1; ++i) one_call();  // warm up: rings, caches, windows

    const uint64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    const uint64_t wall0 = clock_ns(CLOCK_MONOTONIC);
    uint64_t bytes = 0;
    for (long i = 0; i < count; ++i) bytes += one_call();
    const uint64_t cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    const uint64_t wall = clock_ns(CLOCK_MONOTONIC) - wall0;
    close(fd);
    // One line, key=value, parsed by op_cost.sh.
    std::printf("op=%s size=%zu calls=%ld bytes=%llu cpu_ns_per_call=%.1f wall_ns_per_call=%.1f\n",
                sending ? "send" : "recv", size, count, static_cast<unsigned long long>(bytes),
                static_cast<double>(cpu) / static_cast<double>(count),
                static_cast<double>(wall) / static_cast<double>(count));
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    tcps::bench::program_name = "op_cost";
    if (argc == 3 && std::strcmp(argv[1], "--peer") == 0) return run_peer(argv[2]);
    if (argc == 5 && (std::strcmp(argv[1], "--send") == 0 || std::strcmp(argv[1], "--recv") == 0))
        return run_client(std::strcmp(argv[1], "--send") == 0, std::atoi(argv[2]),
                          std::strtoul(argv[3], nullptr, 10), std::atol(argv[4]));
    std::fprintf(stderr,
                 "usage: op_cost --peer PORT_FILE | op_cost --send|--recv PORT SIZE COUNT\n");
    return 2;
}
