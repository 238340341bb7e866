// One side of a cross-host channel scenario (scenarios.hpp) per process: the two-namespace test
// runs one side in each namespace, and the measurements run it on 127.0.0.1.
//
//   fabric_peer --role a|b --scenario basic|ordering|stream|latency
//               (--listen HOST:PORT | --connect HOST:PORT)   bootstrap over TCP
//               [--node ADDR] [--provider P] [--bytes N[K|M|G]] [--ring N[K|M]] [--count N]
//               [--spin] [--timeout-ms N]
//
// --ring: the stream's ring size (default: the layout's 64 KiB tx ring); both sides must agree.
//
// The side with --listen waits for one bootstrap connection; the other connects, retrying
// until the timeout. Prints one line: "ok ..." with the measurements, or "FAIL: why". Exits
// 0, 1 (failure) or 2 (usage).
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "scenarios.hpp"

using namespace tcps;
using namespace tcps::test;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
    Role role = Role::kA;
    bool role_set = false;
    std::string scenario;
    std::string listen;
    std::string connect;
    ipc::FabricConfig config = ipc::FabricConfig::from_env();
    uint64_t bytes = 64ull << 20;
    uint32_t ring_bytes = ipc::kRingBytes;
    uint32_t count = 1000;
    bool spin = false;
    int timeout_ms = 60000;
};

[[noreturn]] void usage(const char *why) {
    std::fprintf(stderr,
                 "fabric_peer: %s\nusage: fabric_peer --role a|b --scenario "
                 "basic|ordering|stream|latency (--listen HOST:PORT | --connect HOST:PORT) "
                 "[--node ADDR] [--provider P] [--bytes N[K|M|G]] [--ring N[K|M]] [--count N] "
                 "[--spin] [--timeout-ms N]\n",
                 why);
    std::exit(2);
}

uint64_t parse_size(const std::string &text) {
    char *end = nullptr;
    errno = 0;
    uint64_t value = std::strtoull(text.c_str(), &end, 10);
    if (errno != 0 || end == text.c_str()) usage("bad number");
    switch (*end) {
        case 'K':
            value <<= 10;
            ++end;
            break;
        case 'M':
            value <<= 20;
            ++end;
            break;
        case 'G':
            value <<= 30;
            ++end;
            break;
        default:
            break;
    }
    if (*end != '\0') usage("bad number");
    return value;
}

// "HOST:PORT" or "[V6]:PORT" to a resolved address (numeric only: no DNS in tests).
bool resolve(const std::string &text, bool passive, addrinfo *&out) {
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos) return false;
    std::string host = text.substr(0, colon);
    const std::string port = text.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    return getaddrinfo(host.c_str(), port.c_str(), &hints, &out) == 0;
}

int bootstrap_socket(const Options &options, std::string &error) {
    addrinfo *address = nullptr;
    const std::string &where = options.listen.empty() ? options.connect : options.listen;
    if (!resolve(where, !options.listen.empty(), address)) {
        error = "cannot parse " + where;
        return -1;
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(options.timeout_ms);
    int fd = -1;
    if (!options.listen.empty()) {
        const int listener = socket(address->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        const int one = 1;
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (listener < 0 || bind(listener, address->ai_addr, address->ai_addrlen) != 0 ||
            listen(listener, 1) != 0) {
            error = std::string("bootstrap listen: ") + std::strerror(errno);
        } else {
            pollfd pfd{listener, POLLIN, 0};
            if (poll(&pfd, 1, options.timeout_ms) == 1)
                fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
            if (fd < 0) error = "no bootstrap connection in time";
        }
        if (listener >= 0) close(listener);
    } else {
        // The listener may not be up yet: retry, bounded by the timeout.
        while (fd < 0 && Clock::now() < deadline) {
            fd = socket(address->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd >= 0 && connect(fd, address->ai_addr, address->ai_addrlen) == 0) break;
            if (fd >= 0) close(fd);
            fd = -1;
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        if (fd < 0) error = "cannot connect to " + options.connect;
    }
    freeaddrinfo(address);
    return fd;
}

Options parse(int argc, char **argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(("missing value for " + arg).c_str());
            return argv[++i];
        };
        if (arg == "--role") {
            const std::string role = value();
            if (role != "a" && role != "b") usage("role is a or b");
            options.role = role == "a" ? Role::kA : Role::kB;
            options.role_set = true;
        } else if (arg == "--scenario") {
            options.scenario = value();
        } else if (arg == "--listen") {
            options.listen = value();
        } else if (arg == "--connect") {
            options.connect = value();
        } else if (arg == "--node") {
            options.config.node = value();
        } else if (arg == "--provider") {
            options.config.provider = value();
        } else if (arg == "--bytes") {
            options.bytes = parse_size(value());
        } else if (arg == "--ring") {
            options.ring_bytes = static_cast<uint32_t>(parse_size(value()));
            if (options.ring_bytes < 4096 || (options.ring_bytes & (options.ring_bytes - 1)))
                usage("--ring is a power of two of at least 4K");
        } else if (arg == "--count") {
            options.count = static_cast<uint32_t>(parse_size(value()));
        } else if (arg == "--spin") {
            options.spin = true;
        } else if (arg == "--timeout-ms") {
            options.timeout_ms = static_cast<int>(parse_size(value()));
        } else {
            usage(("unknown argument " + arg).c_str());
        }
    }
    if (!options.role_set || options.scenario.empty()) usage("--role and --scenario are needed");
    if (options.listen.empty() == options.connect.empty())
        usage("exactly one of --listen and --connect");
    return options;
}

}  // namespace

int main(int argc, char **argv) {
    const Options options = parse(argc, argv);
    const char *name = options.role == Role::kA ? "A" : "B";

    std::string error;
    Side side;
    side.sleep_when_idle = !options.spin;
    const size_t len = mirror_bytes(options.ring_bytes);
    if (open_side(options.config, options.role, len, len, side, error) != 0) {
        std::printf("FAIL %s: %s\n", name, error.c_str());
        return 1;
    }
    const int fd = bootstrap_socket(options, error);
    if (fd < 0) {
        std::printf("FAIL %s: %s\n", name, error.c_str());
        return 1;
    }
    const int ret = side.endpoint->exchange_bootstrap(fd, side.region, options.timeout_ms);
    close(fd);
    if (ret < 0) {
        std::printf("FAIL %s: bootstrap: %s\n", name, std::strerror(-ret));
        return 1;
    }

    Outcome outcome;
    if (options.scenario == "basic") {
        outcome = run_basic(side, options.timeout_ms);
    } else if (options.scenario == "ordering") {
        outcome = run_ordering(side, options.count, options.timeout_ms);
    } else if (options.scenario == "stream") {
        outcome = run_stream(side, options.bytes, options.timeout_ms, options.ring_bytes);
    } else if (options.scenario == "latency") {
        outcome = run_latency(side, options.count, options.timeout_ms);
    } else {
        usage("unknown scenario");
    }
    if (!outcome.ok) {
        std::printf("FAIL %s: %s\n", name, outcome.error.c_str());
        return 1;
    }
    std::printf("ok %s scenario=%s provider=%s wait_fd=%s delivery_complete=%s", name,
                options.scenario.c_str(), side.endpoint->provider_name(),
                side.endpoint->wait_fd() >= 0 ? "yes" : "no",
                side.endpoint->delivery_complete() ? "yes" : "no");
    if (options.scenario == "stream")
        std::printf(
            " ring=%u bytes=%llu seconds=%.3f MB/s=%.1f checksum=%016llx", options.ring_bytes,
            static_cast<unsigned long long>(outcome.bytes), outcome.seconds,
            outcome.seconds > 0 ? static_cast<double>(outcome.bytes) / outcome.seconds / 1e6 : 0.0,
            static_cast<unsigned long long>(outcome.checksum));
    if (options.scenario == "latency" && options.role == Role::kA)
        std::printf(" one_way_median_us=%.2f one_way_p99_us=%.2f", outcome.median_us,
                    outcome.p99_us);
    std::printf("\n");
    return 0;
}
