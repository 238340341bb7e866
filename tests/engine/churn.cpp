// engine_churn: many short connections through one session, so slots are reused all the time.
//  * accepted: kernel clients connect in bursts larger than the accept ring (the engine must
//    pause and resume accepting), send a line, get it echoed, then see a graceful close (FIN
//    after the echo, so the tx ring drains before the close);
//  * connected: the client connects out in bursts and closes with a reset (the kernel peer
//    must see ECONNRESET).
// Every slot must come back to kFree, and the engine must stay healthy throughout; once the
// load stops, the engine gives the freed slots' ring pages back (it keeps them a second, for
// reuse).
//
//   engine_churn /path/to/tcpsd [rounds, default 20]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <string>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

namespace {

constexpr int kWaitMs = 5000;
constexpr int kBurst = 100;  // > kAcceptRingEntries

sockaddr_in loopback(uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return addr;
}

uint16_t port_of(const ipc::SockAddrRecord &record) {
    sockaddr_in addr{};
    std::memcpy(&addr, record.bytes, std::min<size_t>(record.len, sizeof(addr)));
    return ntohs(addr.sin_port);
}

bool recv_exact(int fd, void *data, size_t len) {
    size_t done = 0;
    while (done < len) {
        pollfd p{fd, POLLIN, 0};
        if (poll(&p, 1, kWaitMs) != 1) return false;
        const ssize_t n = recv(fd, static_cast<char *>(data) + done, len - done, 0);
        if (n <= 0) return false;
        done += static_cast<size_t>(n);
    }
    return true;
}

// 0 after EOF, -errno after an error, 1 if data arrived instead, -ETIMEDOUT.
int recv_end(int fd) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, kWaitMs) != 1) return -ETIMEDOUT;
    char byte;
    const ssize_t n = recv(fd, &byte, 1, 0);
    if (n < 0) return -errno;
    return n == 0 ? 0 : 1;
}

// Bytes of the region that hold memory (it is a sparse memfd).
int64_t allocated_bytes(int memfd) {
    struct stat st {};
    return fstat(memfd, &st) == 0 ? int64_t(st.st_blocks) * 512 : -1;
}

std::string line_for(int round, int k) {
    char text[32];
    std::snprintf(text, sizeof(text), "r%03d-c%03d-payload!", round, k);
    return text;  // 18 bytes
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: engine_churn /path/to/tcpsd [rounds]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const int rounds = argc > 2 ? std::atoi(argv[2]) : 20;
    const ControlSocketDir socket_dir("tcps-churn");
    const std::string path = socket_dir.path();
    EngineProcess engine;
    const std::vector<std::string> engine_args(argv + std::min(argc, 3), argv + argc);
    CHECK_OR_FAIL(engine.start(argv[1], path, engine_args), "tcpsd did not become ready");

    RawClient c;
    CHECK_OR_FAIL(c.connect(path) == 0, "hello");
    const uint32_t L = open_loopback_listener(c, 512, "listener");
    const uint16_t port = port_of(c.slot(L).local_addr);

    // Kernel listener for the client's outgoing connections.
    const int kernel_listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in kaddr = loopback(0);
    CHECK_OR_FAIL(bind(kernel_listener, reinterpret_cast<sockaddr *>(&kaddr), sizeof(kaddr)) == 0,
                  "bind");
    CHECK_OR_FAIL(listen(kernel_listener, 512) == 0, "listen");
    socklen_t klen = sizeof(kaddr);
    getsockname(kernel_listener, reinterpret_cast<sockaddr *>(&kaddr), &klen);

    {  // A full tx ring, then a graceful close at once: every byte still arrives, then FIN.
        const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        const sockaddr_in to = loopback(port);
        CHECK_OR_FAIL(connect(fd, reinterpret_cast<const sockaddr *>(&to), sizeof(to)) == 0,
                      "connect");
        int conn = -1;
        CHECK_OR_FAIL(wait_until([&] { return (conn = c.accept(L)) >= 0; }, kWaitMs), "accept");
        std::vector<uint8_t> block(ipc::kRingBytes);
        for (size_t k = 0; k < block.size(); ++k) block[k] = static_cast<uint8_t>(k * 7 + 3);
        CHECK_OR_FAIL(c.send(uint32_t(conn), block.data(), block.size()) == block.size(),
                      "fill the tx ring");
        CHECK_OR_FAIL(c.request_result(uint32_t(conn), uint32_t(ipc::Op::kClose), 0) == 0, "close");
        std::vector<uint8_t> got(block.size());
        CHECK_OR_FAIL(recv_exact(fd, got.data(), got.size()), "drained bytes missing");
        CHECK_OR_FAIL(got == block, "drained bytes differ");
        CHECK_OR_FAIL(recv_end(fd) == 0, "no FIN after the drained bytes");
        close(fd);
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              return c.slot(uint32_t(conn)).state.load() ==
                                     uint32_t(ipc::SlotState::kFree);
                          },
                          kWaitMs),
                      "drained slot never freed");
        std::printf("ok: a full tx ring drains before the FIN of a graceful close\n");
    }

    bool saw_pause = false;
    uint32_t highest_slot = 0;
    const auto started = Clock::now();
    for (int round = 0; round < rounds; ++round) {
        // --- accepted connections ---
        std::vector<int> peers;
        for (int k = 0; k < kBurst; ++k) {
            const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            const sockaddr_in to = loopback(port);
            CHECK_OR_FAIL(connect(fd, reinterpret_cast<const sockaddr *>(&to), sizeof(to)) == 0,
                          "round %d: connect %d: %s", round, k, std::strerror(errno));
            const std::string line = line_for(round, k);
            CHECK_OR_FAIL(send(fd, line.data(), line.size(), MSG_NOSIGNAL) == ssize_t(line.size()),
                          "send");
            peers.push_back(fd);
        }
        std::vector<uint32_t> conns;
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              saw_pause |= (c.slot(L).flags.load() & ipc::kFlagAcceptPaused) != 0;
                              for (int j; (j = c.accept(L)) >= 0;) conns.push_back(uint32_t(j));
                              return conns.size() == size_t(kBurst);
                          },
                          kWaitMs),
                      "round %d: accepted %zu of %d", round, conns.size(), kBurst);
        // Echo each line back and close gracefully (the echo must still arrive).
        std::vector<std::string> got(conns.size());
        const size_t line_len = line_for(0, 0).size();
        CHECK_OR_FAIL(wait_until(
                          [&] {
                              bool all = true;
                              for (size_t k = 0; k < conns.size(); ++k) {
                                  char buffer[64];
                                  const size_t want = line_len - got[k].size();
                                  const size_t n = c.recv(conns[k], buffer, want);
                                  got[k].append(buffer, n);
                                  all &= got[k].size() == line_len;
                              }
                              return all;
                          },
                          kWaitMs),
                      "round %d: lines did not arrive", round);
        // Each of these connections has a page of its rx ring in use now.
        const int64_t in_use = allocated_bytes(c.memfd());
        for (size_t k = 0; k < conns.size(); ++k) {
            highest_slot = std::max(highest_slot, conns[k]);
            CHECK_OR_FAIL(c.send(conns[k], got[k].data(), got[k].size()) == got[k].size(), "echo");
            CHECK_OR_FAIL(c.request_result(conns[k], uint32_t(ipc::Op::kClose), 0) == 0, "close");
        }
        // Each peer gets its own line back on its own connection, then EOF.
        for (size_t k = 0; k < peers.size(); ++k) {
            char buffer[64] = {};
            CHECK_OR_FAIL(recv_exact(peers[k], buffer, line_len), "round %d: echo %zu missing",
                          round, k);
            CHECK_OR_FAIL(std::string(buffer, line_len) == line_for(round, int(k)),
                          "round %d: peer %zu got '%s'", round, k, buffer);
            CHECK_OR_FAIL(recv_end(peers[k]) == 0, "round %d: peer %zu saw no FIN", round, k);
            close(peers[k]);
        }
        for (uint32_t conn : conns)
            CHECK_OR_FAIL(
                wait_until(
                    [&] { return c.slot(conn).state.load() == uint32_t(ipc::SlotState::kFree); },
                    kWaitMs),
                "round %d: slot %u never freed", round, conn);

        // --- outgoing connections, closed with a reset ---
        std::vector<uint32_t> outs;
        for (int k = 0; k < kBurst / 2; ++k) {
            const uint32_t slot = open_socket(c, AF_INET, "outgoing");
            highest_slot = std::max(highest_slot, slot);
            CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kConnect), 0, 0, 0, &kaddr,
                                           sizeof(kaddr)) == -EINPROGRESS,
                          "kConnect");
            outs.push_back(slot);
        }
        std::vector<int> accepted;
        for (size_t k = 0; k < outs.size(); ++k) {
            pollfd p{kernel_listener, POLLIN, 0};
            CHECK_OR_FAIL(poll(&p, 1, kWaitMs) == 1, "round %d: connect %zu never arrived", round,
                          k);
            accepted.push_back(accept4(kernel_listener, nullptr, nullptr, SOCK_CLOEXEC));
        }
        for (uint32_t slot : outs) {
            CHECK_OR_FAIL(
                wait_until([&] { return (c.slot(slot).flags.load() & ipc::kFlagConnected) != 0; },
                           kWaitMs),
                "slot %u never connected", slot);
            CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kClose), 1) == 0, "close");
        }
        for (int fd : accepted) {
            const int end = recv_end(fd);
            CHECK_OR_FAIL(end == -ECONNRESET, "round %d: reset close gave %d", round, end);
            close(fd);
        }
        for (uint32_t slot : outs)
            CHECK_OR_FAIL(
                wait_until(
                    [&] { return c.slot(slot).state.load() == uint32_t(ipc::SlotState::kFree); },
                    kWaitMs),
                "client slot %u never freed", slot);
        CHECK_OR_FAIL(engine.running() && c.engine_alive(), "engine gone in round %d", round);
        if (round == rounds - 1) {
            // All of them closed: their rx pages go back within a second or two.
            const int64_t expected_drop = int64_t(conns.size()) * 4096;
            int64_t now = in_use;
            CHECK_OR_FAIL(wait_until(
                              [&] {
                                  now = allocated_bytes(c.memfd());
                                  return now >= 0 && in_use - now >= expected_drop;
                              },
                              kWaitMs),
                          "ring pages not given back: %lld bytes allocated with %zu connections "
                          "open, %lld after they closed",
                          static_cast<long long>(in_use), conns.size(),
                          static_cast<long long>(now));
            std::printf("ok: freed slots\' ring pages given back (%lld -> %lld bytes)\n",
                        static_cast<long long>(in_use), static_cast<long long>(now));
        }
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
    CHECK_OR_FAIL(saw_pause, "the accept ring never filled (kFlagAcceptPaused never seen)");
    // Freed slots are reused: a burst never needs more than a burst of slots (and the
    // listener's).
    CHECK_OR_FAIL(highest_slot < 2 * kBurst + 1, "slots not reused (highest %u)", highest_slot);
    std::printf("ok: %d accepted + %d connected sockets in %.2f s\n", rounds * kBurst,
                rounds * kBurst / 2, seconds);
    close(kernel_listener);
    CHECK_OR_FAIL(engine.stop(3000) == 0, "tcpsd did not exit 0");
    std::printf("PASS\n");
    return 0;
}
