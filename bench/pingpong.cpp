// Round-trip latency over one TCP connection (experiment 2): the client sends SIZE bytes, the
// server echoes them, the client waits for all SIZE bytes back; COUNT times. The client prints
// p50/p99 of the round trips and its own CPU time per round trip.
//
// The same binary runs natively and under LD_PRELOAD=libtcps.so (client and server both);
// bench/latency.sh runs both alternately. It also has a helper mode that runs a command and
// reports the CPU time the kernel accounted to it (for iperf3 clients in bench/throughput.sh).
//
//   pingpong --server PORT_FILE                  listen on 127.0.0.1:0, write the port, echo
//   pingpong --client PORT SIZE COUNT            COUNT round trips of SIZE bytes, print a line
//   pingpong --measure OUT_FILE -- CMD [ARG...]  run CMD, write its cpu_ns to OUT_FILE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

using namespace tcps::bench;

// Echoes whatever arrives until the client closes. One connection at a time: the benchmark
// runs one client after another, and a single thread keeps the server's CPU easy to account.
void echo(int conn) {
    set_nodelay(conn);
    std::vector<char> buffer(64 * 1024);
    for (;;) {
        const ssize_t got = recv(conn, buffer.data(), buffer.size(), 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        ssize_t sent = 0;
        while (sent < got) {
            const ssize_t n =
                send(conn, buffer.data() + sent, static_cast<size_t>(got - sent), MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                close(conn);
                return;
            }
            sent += n;
        }
    }
    close(conn);
}

int run_server(const char *port_file) {
    const int listener = listen_loopback(port_file);
    for (;;) {
        const int conn = accept(listener, nullptr, nullptr);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("accept");
        }
        echo(conn);
    }
}

// Moves exactly `size` bytes; false on error or end of stream.
bool send_all(int fd, const char *data, size_t size) {
    while (size > 0) {
        const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        data += n;
        size -= static_cast<size_t>(n);
    }
    return true;
}

bool recv_all(int fd, char *data, size_t size) {
    while (size > 0) {
        const ssize_t n = recv(fd, data, size, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        data += n;
        size -= static_cast<size_t>(n);
    }
    return true;
}

int run_client(int port, size_t size, long count) {
    if (size == 0 || count <= 0) {
        std::fprintf(stderr, "pingpong: SIZE and COUNT must be positive\n");
        return 2;
    }
    const int fd = connect_loopback(port);

    std::vector<char> out(size, 'p');
    std::vector<char> in(size);
    auto round_trip = [&] {
        if (!send_all(fd, out.data(), size)) die("send");
        if (!recv_all(fd, in.data(), size)) die("recv");
    };
    for (long i = 0; i < count / 10 + 1; ++i) round_trip();  // warm up: rings, caches, windows

    std::vector<uint64_t> rtt_ns(static_cast<size_t>(count));
    // Process CPU, not thread CPU: under the shim, time its threads spend counts too.
    const uint64_t cpu0 = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
    const uint64_t wall0 = clock_ns(CLOCK_MONOTONIC);
    uint64_t previous = wall0;
    for (auto &sample : rtt_ns) {
        round_trip();
        const uint64_t now = clock_ns(CLOCK_MONOTONIC);
        sample = now - previous;
        previous = now;
    }
    const uint64_t cpu = clock_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    const uint64_t wall = previous - wall0;
    if (std::memcmp(out.data(), in.data(), size) != 0) {
        std::fprintf(stderr, "pingpong: the echo differs from what was sent\n");
        return 1;
    }
    close(fd);

    std::sort(rtt_ns.begin(), rtt_ns.end());
    auto percentile = [&](double p) {
        const size_t index = static_cast<size_t>(p * static_cast<double>(rtt_ns.size() - 1));
        return static_cast<double>(rtt_ns[index]) / 1000.0;
    };
    const double n = static_cast<double>(count);
    // One line, key=value, parsed by latency.sh.
    std::printf(
        "size=%zu round_trips=%ld p50_us=%.2f p99_us=%.2f mean_us=%.2f "
        "cpu_ns_per_rt=%.1f\n",
        size, count, percentile(0.50), percentile(0.99), static_cast<double>(wall) / n / 1000.0,
        static_cast<double>(cpu) / n);
    return 0;
}

// Runs argv as a child and writes the CPU time the kernel accounted to it (user + system, all
// its threads and waited-for children) to out_file. Exits with the child's status.
int run_measured(const char *out_file, char **argv) {
    const pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        execvp(argv[0], argv);
        std::fprintf(stderr, "pingpong: exec %s: %s\n", argv[0], std::strerror(errno));
        _exit(127);
    }
    int status = 0;
    rusage usage{};
    while (wait4(child, &status, 0, &usage) < 0) {
        if (errno != EINTR) die("wait4");
    }
    auto ns = [](const timeval &tv) {
        return static_cast<uint64_t>(tv.tv_sec) * 1000000000ull +
               static_cast<uint64_t>(tv.tv_usec) * 1000ull;
    };
    FILE *out = std::fopen(out_file, "w");
    if (!out) die("measure file");
    std::fprintf(out, "%llu\n",
                 static_cast<unsigned long long>(ns(usage.ru_utime) + ns(usage.ru_stime)));
    std::fclose(out);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

}  // namespace

int main(int argc, char **argv) {
    tcps::bench::program_name = "pingpong";
    if (argc == 3 && std::strcmp(argv[1], "--server") == 0) return run_server(argv[2]);
    if (argc == 5 && std::strcmp(argv[1], "--client") == 0)
        return run_client(std::atoi(argv[2]), std::strtoul(argv[3], nullptr, 10),
                          std::atol(argv[4]));
    if (argc >= 5 && std::strcmp(argv[1], "--measure") == 0 && std::strcmp(argv[3], "--") == 0)
        return run_measured(argv[2], argv + 4);
    std::fprintf(stderr,
                 "usage: pingpong --server PORT_FILE | pingpong --client PORT SIZE COUNT"
                 " | pingpong --measure OUT_FILE -- CMD [ARG...]\n");
    return 2;
}
