// attacker: a hostile client of tcpsd that tries to take all of it, speaking the protocol
// directly (tests/engine/raw_client.hpp). It takes what the engine gives until the engine
// refuses, prints one line saying how much it got and how it was refused, then holds it all
// until SIGTERM, so that the script can check that other users are still served.
//
//   attacker waiters PATH   sessions, each with as many waiter pipes as it gets
//   attacker sessions PATH  sessions (hello) until refused
//   attacker hellos PATH    control connections that never say hello, until refused
//
// Exit 0 after SIGTERM if the engine refused in time (a clear error), 1 if it never did.
#include <signal.h>
#include <sys/resource.h>

#include <memory>

#include "raw_client.hpp"

using namespace tcps;
using namespace tcps::test;

namespace {

constexpr size_t kGiveUpAfter = 200'000;  // more than any share the test's engine allows

volatile sig_atomic_t g_stop = 0;
void on_term(int) {
    g_stop = 1;
}

void hold_until_term() {
    while (!g_stop) pause();
}

const char *name_of(int error) {
    switch (error) {
        case ENFILE:
            return "ENFILE";
        case ENOBUFS:
            return "ENOBUFS";
        case EMFILE:
            return "EMFILE";
        case EAGAIN:
            return "EAGAIN";
        case ECONNRESET:
            return "ECONNRESET";
        case ENOSPC:
            return "ENOSPC";
        default:
            return strerror(error);
    }
}

// Registers waiter pipes on `c` until refused; returns how many it got, `error` the refusal.
size_t take_waiters(RawClient &c, int &error) {
    size_t got = 0;
    for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) != 0) {
            error = errno;
            return got;
        }
        const int rc = c.register_waiter(static_cast<int>(w), fds[1]);
        close(fds[1]);
        if (rc != 0) {
            close(fds[0]);
            error = -rc;
            return got;
        }
        ++got;  // fds[0] stays open: the pipe lives as long as the engine's end
    }
    error = 0;
    return got;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) fail("usage: attacker waiters|sessions|hellos PATH");
    const std::string mode = argv[1], path = argv[2];
    signal(SIGTERM, on_term);
    rlimit limit{};
    getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);

    std::vector<std::unique_ptr<RawClient>> sessions;
    std::vector<int> silent;
    size_t taken = 0;
    int refusal = 0;
    if (mode == "waiters" || mode == "sessions") {
        while (taken < kGiveUpAfter && refusal == 0) {
            auto c = std::make_unique<RawClient>();
            const int rc = c->connect(path);
            if (rc != 0) {
                refusal = -rc;
                break;
            }
            if (mode == "sessions") {
                ++taken;
            } else {
                taken += take_waiters(*c, refusal);
                if (refusal == ENOSPC) refusal = 0;  // this session is full: another one
            }
            sessions.push_back(std::move(c));
        }
    } else if (mode == "hellos") {
        // In bursts, faster than the engine's 2 s hello timeout frees them.
        while (taken < kGiveUpAfter && refusal == 0) {
            std::vector<int> burst;
            for (int k = 0; k < 64; ++k) {
                const int fd = connect_control(path);
                if (fd < 0) {
                    refusal = errno;
                    break;
                }
                burst.push_back(fd);
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            // A refused connection is answered (and closed) at once; a pending one is not.
            for (const int fd : burst) {
                pollfd p{fd, POLLIN, 0};
                if (refusal == 0 && poll(&p, 1, 0) == 1) {
                    ipc::ControlMessage reply{};
                    int none = -1;
                    const int rc = ipc::recv_control(fd, reply, &none, 0, MSG_DONTWAIT);
                    refusal = rc == 0 && reply.result < 0 ? -reply.result : ECONNRESET;
                }
                silent.push_back(fd);
                if (refusal == 0) ++taken;
            }
        }
    } else {
        fail("unknown mode %s", mode.c_str());
    }
    std::printf("took %zu %s in %zu sessions, then %s\n", taken, mode.c_str(), sessions.size(),
                refusal ? name_of(refusal) : "nothing refused");
    std::fflush(stdout);
    hold_until_term();
    return refusal != 0 ? 0 : 1;
}
