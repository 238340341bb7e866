// engine_transfer: bulk data both ways between a raw client (through tcpsd's rings) and a
// plain kernel socket, every byte checked. The client connects through the engine (kConnect),
// sends N bytes and shuts down its side; the kernel peer sends N bytes back and closes.
// With several clients, each is its own process (its own session), all at once.
//
//   engine_transfer /path/to/tcpsd [megabytes, default 100] [clients, default 1]
//                   [tcpsd arguments...]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cinttypes>
#include <string>
#include <thread>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

namespace {

// A prime period, so an offset error anywhere shows up as a mismatch.
constexpr size_t kPatternBytes = 1'000'003;

struct Pattern {
    std::vector<uint8_t> bytes;
    explicit Pattern(uint64_t seed) : bytes(kPatternBytes) {
        uint64_t x = seed;
        for (auto &b : bytes) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b = static_cast<uint8_t>(x >> 32);
        }
    }
    // The longest run starting at stream offset `at` that is contiguous in the table.
    const uint8_t *at(uint64_t offset, size_t &run) const {
        const size_t index = offset % kPatternBytes;
        run = kPatternBytes - index;
        return bytes.data() + index;
    }
    bool matches(uint64_t offset, const uint8_t *data, size_t len) const {
        while (len > 0) {
            size_t run;
            const uint8_t *expected = at(offset, run);
            const size_t n = std::min(run, len);
            if (std::memcmp(expected, data, n) != 0) return false;
            offset += n;
            data += n;
            len -= n;
        }
        return true;
    }
};

// One client's whole transfer; exits the process with a message on failure.
void run_transfer(const std::string &path, uint64_t total) {
    // Kernel listener for the engine's connection.
    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_OR_FAIL(bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0, "bind");
    CHECK_OR_FAIL(listen(listener, 4) == 0, "listen");
    socklen_t len = sizeof(addr);
    getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len);

    RawClient client;
    CHECK_OR_FAIL(client.connect(path) == 0, "hello");
    const uint32_t slot = open_socket(client, AF_INET, "client");
    const int rc =
        client.request_result(slot, uint32_t(ipc::Op::kConnect), 0, 0, 0, &addr, sizeof(addr));
    CHECK_OR_FAIL(rc == -EINPROGRESS, "kConnect answered %d, expected -EINPROGRESS", rc);
    pollfd p{listener, POLLIN, 0};
    CHECK_OR_FAIL(poll(&p, 1, 3000) == 1, "the engine's connect never arrived");
    const int peer = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    CHECK_OR_FAIL(peer >= 0, "accept");
    ipc::SocketSlot &s = client.slot(slot);
    CHECK_OR_FAIL(wait_until([&] { return (s.flags.load() & ipc::kFlagConnected) != 0; }, 3000),
                  "kFlagConnected never set");

    const Pattern up(0x1234567), down(0x89abcdef);
    std::atomic<bool> reader_ok{false};
    std::atomic<uint64_t> reader_bytes{0};
    std::thread reader([&] {
        std::vector<uint8_t> buffer(256 * 1024);
        uint64_t offset = 0;
        for (;;) {
            pollfd rp{peer, POLLIN, 0};
            if (poll(&rp, 1, 30000) != 1) return;
            const ssize_t n = recv(peer, buffer.data(), buffer.size(), 0);
            if (n < 0) return;
            if (n == 0) break;
            if (!up.matches(offset, buffer.data(), static_cast<size_t>(n))) {
                std::fprintf(stderr, "kernel peer: mismatch at offset %" PRIu64 "\n", offset);
                return;
            }
            offset += static_cast<uint64_t>(n);
            reader_bytes.store(offset);
        }
        reader_ok.store(offset == total);
    });
    std::atomic<bool> writer_ok{false};
    std::thread writer([&] {
        uint64_t offset = 0;
        while (offset < total) {
            size_t run;
            const uint8_t *data = down.at(offset, run);
            const size_t n = std::min<uint64_t>({run, total - offset, 256 * 1024});
            pollfd wp{peer, POLLOUT, 0};
            if (poll(&wp, 1, 30000) != 1) return;
            const ssize_t sent = send(peer, data, n, MSG_NOSIGNAL);
            if (sent <= 0) return;
            offset += static_cast<uint64_t>(sent);
        }
        shutdown(peer, SHUT_WR);
        writer_ok.store(true);
    });

    const auto started = Clock::now();
    const auto deadline = started + std::chrono::seconds(60);
    uint64_t sent = 0, received = 0;
    bool shut = false;
    std::vector<uint8_t> buffer(ipc::kRingMaxBytes);
    bool mismatch = false;
    while (Clock::now() < deadline) {
        bool progress = false;
        if (sent < total) {
            size_t run;
            const uint8_t *data = up.at(sent, run);
            const size_t n = client.send(slot, data, std::min<uint64_t>(run, total - sent));
            sent += n;
            progress |= n > 0;
        } else if (!shut) {
            CHECK_OR_FAIL(client.request_result(slot, uint32_t(ipc::Op::kShutdown), SHUT_WR) == 0,
                          "kShutdown SHUT_WR");
            shut = true;
        }
        const size_t got = client.recv(slot, buffer.data(), buffer.size());
        if (got > 0) {
            if (!down.matches(received, buffer.data(), got)) {
                mismatch = true;
                break;
            }
            received += got;
            progress = true;
        }
        const uint32_t flags = s.flags.load(std::memory_order_acquire);
        CHECK_OR_FAIL(!(flags & ipc::kFlagReset), "connection reset (so_error %d)",
                      s.so_error.load());
        const bool eof = (flags & ipc::kFlagRxEof) &&
                         s.rx_tail.load(std::memory_order_acquire) == s.rx_head.load();
        if (shut && eof && reader_bytes.load() == total) break;
        if (!progress) std::this_thread::yield();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
    writer.join();
    reader.join();
    CHECK_OR_FAIL(!mismatch, "client: received bytes differ from what the peer sent at %" PRIu64,
                  received);
    CHECK_OR_FAIL(received == total, "client received %" PRIu64 " of %" PRIu64, received, total);
    CHECK_OR_FAIL(writer_ok.load(), "kernel peer could not send everything");
    CHECK_OR_FAIL(reader_ok.load(),
                  "kernel peer got %" PRIu64 " of %" PRIu64 " bytes (or bad data)",
                  reader_bytes.load(), total);
    // The kernel peer can read the last bytes before the engine has reaped their send's
    // completion, which is when it applies the shutdown queued behind them and says so.
    CHECK_OR_FAIL(wait_until([&] { return (s.flags.load() & ipc::kFlagTxShut) != 0; }, 5000),
                  "kFlagTxShut not set within 5 s of the peer reading every byte");

    CHECK_OR_FAIL(client.request_result(slot, uint32_t(ipc::Op::kClose)) == 0, "kClose");
    CHECK_OR_FAIL(
        wait_until([&] { return s.state.load() == uint32_t(ipc::SlotState::kFree); }, 3000),
        "slot not freed after kClose");
    close(peer);
    close(listener);
    std::printf("ok: %" PRIu64 " MiB each way, checked, in %.2f s (%.0f MiB/s each way)\n",
                total >> 20, seconds, static_cast<double>(total >> 20) / seconds);
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr,
                     "usage: engine_transfer /path/to/tcpsd [megabytes] [clients] [args...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const uint64_t total = (argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 100) << 20;
    const int clients = argc > 3 ? std::max(1, std::atoi(argv[3])) : 1;
    const std::vector<std::string> engine_args(argv + std::min(argc, 4), argv + argc);
    if (!cores_available(engine_args)) {
        std::printf("SKIP: this machine lacks the CPUs named by --cores\n");
        return 77;
    }
    const ControlSocketDir socket_dir("tcps-transfer");
    const std::string path = socket_dir.path();
    EngineProcess engine;
    CHECK_OR_FAIL(engine.start(argv[1], path, engine_args), "tcpsd did not become ready");
    if (clients == 1) {
        run_transfer(path, total);
    } else {
        std::vector<pid_t> children;
        for (int k = 0; k < clients; ++k) {
            const pid_t child = fork();
            CHECK_OR_FAIL(child >= 0, "fork");
            if (child == 0) {
                run_transfer(path, total);
                std::fflush(stdout);
                _exit(0);
            }
            children.push_back(child);
        }
        int failed = 0;
        for (pid_t child : children) {
            int status = -1;
            const bool done =
                wait_until([&] { return waitpid(child, &status, WNOHANG) == child; }, 100000);
            if (!done) {
                kill(child, SIGKILL);
                waitpid(child, &status, 0);
            }
            if (!done || !WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failed;
        }
        CHECK_OR_FAIL(failed == 0, "%d of %d clients failed", failed, clients);
        CHECK_OR_FAIL(engine.running(), "tcpsd died");
    }
    CHECK_OR_FAIL(engine.stop(3000) == 0, "tcpsd did not exit 0 on SIGTERM");
    std::printf("PASS\n");
    return 0;
}
