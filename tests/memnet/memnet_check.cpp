// memnet_check [--expect-offload]: the MemNet API (tcps_memnet.h) over a loopback connection
// to itself. Direct and asynchronous sends and receives from a registered buffer that is not
// page-aligned, in order with the socket's ordinary send() bytes, every byte checked; the
// errors of bad ranges, a busy registration and a job that times out; the buffer's pages keep
// their contents through register and deregister. Natively it uses the kernel; under
// libtcps.so with --expect-offload it also checks that the sockets are the engine's and that
// the registration is shared with it (the buffer's pages are a memfd). Prints one line per
// check; exits 1 on the first failure.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "tcps_memnet.h"

namespace {

[[noreturn]] void fail(const char *what) {
    std::fprintf(stderr, "memnet_check: FAIL: %s (%s)\n", what, std::strerror(errno));
    std::exit(1);
}

void check(bool ok, const char *what) {
    if (!ok) fail(what);
    std::printf("ok: %s\n", what);
}

uint8_t pattern(size_t k, uint32_t seed) {
    return static_cast<uint8_t>((k * 2654435761u + seed) >> 13);
}

bool offloaded(int fd) {
    char path[64], target[64] = {};
    std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return readlink(path, target, sizeof(target) - 1) > 0 && std::strcmp(target, "/dev/null") == 0;
}

bool shared_with_engine(const void *at) {
    std::ifstream maps("/proc/self/maps");
    const auto address = reinterpret_cast<uintptr_t>(at);
    for (std::string line; std::getline(maps, line);) {
        unsigned long from = 0, to = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx", &from, &to) != 2) continue;
        if (address >= from && address < to)
            return line.find("memfd:tcps-memnet") != std::string::npos;
    }
    return false;
}

bool read_exact(int fd, uint8_t *out, size_t n) {
    size_t got = 0;
    while (got < n) {
        const ssize_t r = recv(fd, out + got, n - got, 0);
        if (r <= 0) return false;
        got += static_cast<size_t>(r);
    }
    return true;
}

bool send_all(int fd, const uint8_t *data, size_t n) {
    size_t sent = 0;
    while (sent < n) {
        const ssize_t r = send(fd, data + sent, n - sent, MSG_NOSIGNAL);
        if (r <= 0) return false;
        sent += static_cast<size_t>(r);
    }
    return true;
}

// --accepted-end: the checks use the accepted end of each pair and the connecting end as its
// peer, instead of the other way round (over two engine workers, the accepted end is the other
// worker's).
bool g_accepted_end = false;

void connected_pair(int &a, int &b) {
    const int listener = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (listener < 0 || bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0 ||
        listen(listener, 4) != 0 ||
        getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len) != 0)
        fail("listener");
    a = socket(AF_INET, SOCK_STREAM, 0);
    if (a < 0 || connect(a, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0)
        fail("connect");
    b = accept(listener, nullptr, nullptr);
    if (b < 0) fail("accept");
    close(listener);
    if (g_accepted_end) std::swap(a, b);
}

// Through the engine only: once it has ended (the test stops it when we say "ready"), the
// MemNet calls fail as send() and recv() then do.
int after_engine_death() {
    signal(SIGPIPE, SIG_IGN);
    std::vector<uint8_t> buffer(65536);
    memnet_mem_t mem = nullptr;
    check(memnet_register_mem(buffer.data(), buffer.size(), &mem) == 0, "register_mem");
    int client = -1, server = -1;
    connected_pair(client, server);
    check(offloaded(client), "the socket is the engine's");
    std::printf("ready\n");
    std::fflush(stdout);
    char line[16];
    if (!std::fgets(line, sizeof(line), stdin)) fail("the test did not say the engine is gone");
    check(send(client, "x", 1, 0) == -1 && errno == EPIPE, "send() after the engine's end: EPIPE");
    check(memnet_send_direct(client, mem, 0, 100) == -1 && errno == EPIPE,
          "send_direct after the engine's end: EPIPE, as send()");
    memnet_job_t job;
    check(memnet_async_send(client, mem, 0, 100, &job) == -1 && errno == EPIPE,
          "async_send after the engine's end: EPIPE");
    check(recv(client, line, 1, 0) == -1 && errno == ECONNRESET,
          "recv() after the engine's end: ECONNRESET");
    check(memnet_recv_direct(client, mem, 0, 100) == -1 && errno == ECONNRESET,
          "recv_direct after the engine's end: ECONNRESET, as recv()");
    check(memnet_deregister_mem(mem) == 0, "deregister_mem after the engine's end");
    std::printf("PASS\n");
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc > 1 && std::string(argv[1]) == "--after-engine-death") return after_engine_death();
    bool expect_offload = false;
    for (int k = 1; k < argc; ++k) {
        expect_offload |= std::string(argv[k]) == "--expect-offload";
        g_accepted_end |= std::string(argv[k]) == "--accepted-end";
    }
    constexpr size_t kBytes = (1u << 20) + 123;
    constexpr size_t kSkew = 77;  // not page-aligned, with neighbours in its first page
    std::vector<uint8_t> storage(kBytes + 2 * 4096);
    uint8_t *buffer = storage.data() + kSkew;
    for (size_t k = 0; k < storage.size(); ++k) storage[k] = pattern(k, 1);

    memnet_mem_t mem = nullptr;
    check(memnet_register_mem(buffer, kBytes, &mem) == 0, "register_mem");
    bool intact = true;
    for (size_t k = 0; k < storage.size(); ++k) intact &= storage[k] == pattern(k, 1);
    check(intact, "the buffer and its neighbours keep their bytes through register_mem");

    int client = -1, server = -1;
    connected_pair(client, server);
    if (expect_offload) {
        check(offloaded(client) && offloaded(server), "the sockets are the engine's");
        check(shared_with_engine(buffer), "the registration is shared with the engine (memfd)");
    }

    // send_direct, between ordinary send()s: head, the buffer, tail, in that order.
    for (size_t k = 0; k < kBytes; ++k) buffer[k] = pattern(k, 2);
    std::vector<uint8_t> got(kBytes + 8);
    std::thread reader([&] { intact = read_exact(server, got.data(), kBytes + 8); });
    const bool head = send(client, "head", 4, 0) == 4;
    const ssize_t sent = memnet_send_direct(client, mem, 0, kBytes);
    const bool tail = send(client, "tail", 4, 0) == 4;
    reader.join();
    check(head && tail && sent == static_cast<ssize_t>(kBytes), "send_direct sends all of it");
    bool same = intact && std::memcmp(got.data(), "head", 4) == 0 &&
                std::memcmp(got.data() + 4 + kBytes, "tail", 4) == 0;
    for (size_t k = 0; same && k < kBytes; ++k) same = got[4 + k] == pattern(k, 2);
    check(same, "the peer got head, every byte of the buffer, tail, in order");

    // recv_direct: what the peer sends lands in the buffer.
    std::vector<uint8_t> out(kBytes);
    for (size_t k = 0; k < kBytes; ++k) out[k] = pattern(k, 3);
    std::thread writer([&] { intact = send_all(server, out.data(), kBytes); });
    size_t received = 0;
    while (received < kBytes) {
        const ssize_t r = memnet_recv_direct(client, mem, received, kBytes - received);
        if (r <= 0) fail("recv_direct");
        received += static_cast<size_t>(r);
    }
    writer.join();
    same = intact;
    for (size_t k = 0; same && k < kBytes; ++k) same = buffer[k] == pattern(k, 3);
    check(same, "recv_direct received every byte into the buffer");

    // async_send: four jobs on one socket complete in order.
    for (size_t k = 0; k < kBytes; ++k) buffer[k] = pattern(k, 4);
    constexpr size_t kPart = kBytes / 4;
    memnet_job_t jobs[4];
    std::thread reader2([&] { intact = read_exact(server, got.data(), 4 * kPart); });
    bool posted = true;
    for (int j = 0; j < 4; ++j)
        posted &= memnet_async_send(client, mem, j * kPart, kPart, &jobs[j]) == 0;
    check(posted, "async_send posts four jobs");
    // Through the engine the jobs are in progress until waited for; the kernel's are done.
    if (expect_offload)
        check(memnet_deregister_mem(mem) == -1 && errno == EBUSY,
              "deregister_mem while a job is not done: EBUSY");
    bool all = true;
    for (int j = 0; j < 4; ++j)
        all &= memnet_job_wait(&jobs[j], 10000) == static_cast<ssize_t>(kPart);
    reader2.join();
    check(all, "job_wait gives each job's byte count");
    same = intact;
    for (size_t k = 0; same && k < 4 * kPart; ++k) same = got[k] == pattern(k, 4);
    check(same, "the peer got the four jobs' bytes in order");
    check(memnet_job_done(&jobs[0]) == 1, "job_done of a finished job");

    // async_recv: nothing there yet, then the peer sends.
    memnet_job_t job;
    check(memnet_async_recv(client, mem, 100, 5, &job) == 0, "async_recv posts");
    check(memnet_job_wait(&job, 50) == -1 && errno == ETIMEDOUT,
          "job_wait before any byte came: ETIMEDOUT");
    check(send(server, "hello", 5, 0) == 5, "the peer sends");
    check(memnet_job_wait(&job, 10000) == 5 && std::memcmp(buffer + 100, "hello", 5) == 0,
          "async_recv received the peer's bytes into the buffer");

    // async_recv with bytes already there: they are the job's (through the engine, read from
    // the rx ring, which holds them first).
    check(send(server, "xyz", 3, 0) == 3, "the peer sends again");
    pollfd readable{client, POLLIN, 0};
    check(poll(&readable, 1, 10000) == 1, "the bytes arrived");
    check(memnet_async_recv(client, mem, 200, 5, &job) == 0 && memnet_job_wait(&job, 10000) == 3 &&
              std::memcmp(buffer + 200, "xyz", 3) == 0,
          "async_recv takes bytes that were there first");

    // A stream received with receives posted ahead (async_recv, four jobs of 64 KiB): through
    // the engine, once the first is queued the engine stops filling the rx ring, so the rest
    // lands in the buffer straight from the kernel socket (memnet.sh counts it in the engine's
    // direct bytes). The jobs ask for no more than the stream has left, so none stays posted.
    // A connection of its own, whose rx ring is still its first 64 KiB (memnet.sh's bound).
    int stream_client = -1, stream_server = -1;
    connected_pair(stream_client, stream_server);
    constexpr size_t kStream = 4u << 20;
    constexpr size_t kJobBytes = 64 * 1024;
    constexpr int kAhead = 4;
    std::vector<uint8_t> stream(kStream);
    for (size_t k = 0; k < kStream; ++k) stream[k] = pattern(k, 6);
    std::thread streamer([&] { intact = send_all(stream_server, stream.data(), kStream); });
    memnet_job_t ahead[kAhead];
    size_t ahead_len[kAhead] = {};
    size_t promised = 0;  // the lengths of the jobs posted and not yet waited for
    received = 0;
    auto post_ahead = [&](int j) {
        ahead_len[j] = std::min(kJobBytes, kStream - received - promised);
        promised += ahead_len[j];
        return ahead_len[j] == 0 ||
               memnet_async_recv(stream_client, mem, j * kJobBytes, ahead_len[j], &ahead[j]) == 0;
    };
    bool ok = true;
    same = true;
    for (int j = 0; j < kAhead; ++j) ok &= post_ahead(j);
    for (int j = 0; ok && same && received < kStream; j = (j + 1) % kAhead) {
        if (ahead_len[j] == 0) {  // in posting order: it goes behind those posted before it
            ok &= post_ahead(j);
            continue;
        }
        const ssize_t r = memnet_job_wait(&ahead[j], 10000);
        if (r <= 0 || static_cast<size_t>(r) > ahead_len[j]) {
            ok = false;
            break;
        }
        promised -= ahead_len[j];
        for (ssize_t k = 0; same && k < r; ++k)
            same = buffer[j * kJobBytes + k] == pattern(received + k, 6);
        received += static_cast<size_t>(r);
        ok &= post_ahead(j);
    }
    streamer.join();
    check(ok && intact && same && promised == 0,
          "async_recv ahead received a 4 MiB stream, every byte in order");
    close(stream_client);
    close(stream_server);

    // Receives posted ahead while bytes wait to be read, then more bytes, and the jobs waited
    // for last first: the waiting bytes go to the first jobs and what comes after them to the
    // later ones, in posting order (through the engine: the rx ring's bytes to the first ones,
    // the kernel socket's, taken straight, to the others).
    {
        constexpr size_t kFirst = 20000;
        constexpr size_t kJob = 16384;
        constexpr size_t kTotal = 4 * kJob;
        std::vector<uint8_t> sent(kTotal);
        for (size_t k = 0; k < kTotal; ++k) sent[k] = pattern(k, 7);
        bool fine = send_all(server, sent.data(), kFirst);
        int waiting = 0;
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (fine && waiting < static_cast<int>(kFirst) &&
               std::chrono::steady_clock::now() < deadline) {
            pollfd in{client, POLLIN, 0};
            fine = poll(&in, 1, 1000) >= 0 && ioctl(client, FIONREAD, &waiting) == 0;
        }
        fine &= waiting >= static_cast<int>(kFirst);
        memnet_job_t posted[4];
        for (size_t j = 0; j < 4; ++j)
            fine &= memnet_async_recv(client, mem, j * kJob, kJob, &posted[j]) == 0;
        fine &= send_all(server, sent.data() + kFirst, kTotal - kFirst);
        ssize_t got[4] = {};
        for (size_t j = 4; j-- > 0;) got[j] = memnet_job_wait(&posted[j], 10000);
        size_t at = 0;
        for (size_t j = 0; j < 4 && fine; ++j) {
            fine = got[j] > 0 && static_cast<size_t>(got[j]) <= kJob &&
                   std::memcmp(buffer + j * kJob, sent.data() + at, got[j]) == 0;
            at += fine ? static_cast<size_t>(got[j]) : 0;
        }
        std::vector<uint8_t> rest(kTotal);
        fine = fine && read_exact(client, rest.data(), kTotal - at) &&
               std::memcmp(rest.data(), sent.data() + at, kTotal - at) == 0;
        check(fine, "receives posted ahead of waiting bytes, waited for last first: in order");
    }

    // Between direct receives, what arrives is readable for poll() and FIONREAD, and recv()
    // takes it (through the engine it waited in the kernel socket).
    check(send(server, "abc", 3, 0) == 3, "the peer sends while no receive is posted");
    readable = {client, POLLIN, 0};
    check(poll(&readable, 1, 10000) == 1 && (readable.revents & POLLIN), "poll: readable");
    int queued = 0;
    check(ioctl(client, FIONREAD, &queued) == 0 && queued == 3, "FIONREAD counts the 3 bytes");
    char small[8] = {};
    check(recv(client, small, sizeof(small), 0) == 3 && std::memcmp(small, "abc", 3) == 0,
          "recv() takes the bytes that came between direct receives");
    check(send(server, "de", 2, 0) == 2 && memnet_recv_direct(client, mem, 0, 2) == 2 &&
              std::memcmp(buffer, "de", 2) == 0,
          "recv_direct again");
    // Direct mode again (a large receive posted ahead), then bytes with none posted: an
    // edge-triggered epoll sees them.
    memnet_job_t big;
    check(memnet_async_recv(client, mem, 0, 16384, &big) == 0 && send(server, "ij", 2, 0) == 2 &&
              memnet_job_wait(&big, 10000) == 2 && std::memcmp(buffer, "ij", 2) == 0,
          "async_recv of 16 KiB posted ahead takes the peer's next bytes");
    check(send(server, "kl", 2, 0) == 2, "the peer sends with no receive posted");
    {
        const int ep = epoll_create1(EPOLL_CLOEXEC);
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLET;
        ev.data.fd = client;
        epoll_event got_event{};
        check(ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, client, &ev) == 0 &&
                  epoll_wait(ep, &got_event, 1, 10000) == 1 && (got_event.events & EPOLLIN),
              "epoll (edge-triggered): readable");
        close(ep);
    }
    check(recv(client, small, sizeof(small), 0) == 2 && std::memcmp(small, "kl", 2) == 0,
          "recv() takes them");
    check(send(server, "fgh", 3, 0) == 3, "the peer sends once more");
    check(recv(client, small, sizeof(small), MSG_PEEK) == 3 && std::memcmp(small, "fgh", 3) == 0,
          "recv(MSG_PEEK) sees them");
    check(recv(client, small, sizeof(small), MSG_DONTWAIT) == 3, "recv(MSG_DONTWAIT) takes them");

    // Errors, as the socket calls give them.
    check(memnet_send_direct(client, mem, kBytes - 1, 2) == -1 && errno == EFAULT,
          "a range past the registration: EFAULT");
    check(memnet_send_direct(-1, mem, 0, 1) == -1 && errno == EBADF, "a bad socket: EBADF");
    check(memnet_register_mem(buffer, 0, &mem) == -1 && errno == EINVAL, "length 0: EINVAL");
    void *hole = mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(static_cast<uint8_t *>(hole) + 4096, 4096);  // its second page is not mapped
    memnet_mem_t bad = nullptr;
    check(memnet_register_mem(hole, 8192, &bad) == -1 && errno == EFAULT,
          "memory not all mapped: EFAULT");
    munmap(hole, 4096);

    // EOF: the peer closes.
    close(server);
    check(memnet_recv_direct(client, mem, 0, 10) == 0, "recv_direct at EOF: 0");

    for (size_t k = 0; k < kBytes; ++k) buffer[k] = pattern(k, 5);
    check(memnet_deregister_mem(mem) == 0, "deregister_mem");
    intact = true;
    for (size_t k = 0; k < kBytes; ++k) intact &= buffer[k] == pattern(k, 5);
    for (size_t k = 0; k < kSkew; ++k) intact &= storage[k] == pattern(k, 1);
    check(intact, "the buffer keeps its bytes through deregister_mem");
    if (expect_offload) check(!shared_with_engine(buffer), "the pages are private again");
    close(client);
    std::printf("PASS\n");
    return 0;
}
