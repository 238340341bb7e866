// A minimal client of tcpsd for tests: speaks the control protocol and drives the region
// directly, without the shim. Also starts and stops a private engine process.
// Every wait has a deadline.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "control.hpp"
#include "layout.hpp"
#include "ring.hpp"

namespace tcps::test {

using Clock = std::chrono::steady_clock;

// Full barrier between publishing and reading the engine's flags (see engine/fence.hpp for
// why sanitizer builds use an RMW).
inline void full_fence() {
#if defined(__SANITIZE_THREAD__)
    static std::atomic<unsigned> barrier{0};
    barrier.fetch_add(0, std::memory_order_seq_cst);
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// Polls `done` until it holds or `timeout_ms` passes; between polls the thread yields and
// then sleeps briefly (bounded: the deadline ends the wait).
inline bool wait_until(const std::function<bool()> &done, int timeout_ms) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (unsigned spins = 0;; ++spins) {
        if (done()) return true;
        if (Clock::now() >= deadline) return done();
        if (spins < 1000) {
            std::this_thread::yield();
        } else {
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
    }
}

[[noreturn]] inline void fail(const char *format, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    std::fprintf(stderr, "FAIL: ");
    std::vfprintf(stderr, format, args);
    std::fprintf(stderr, "\n");
    va_end(args);
    std::exit(1);
}

#define CHECK_OR_FAIL(cond, ...)                      \
    do {                                              \
        if (!(cond)) ::tcps::test::fail(__VA_ARGS__); \
    } while (0)

// Engines still running when the test exits: fail() calls exit(), which skips the
// destructors of main()'s locals, and an engine left behind would hold the test's output pipe.
inline std::vector<pid_t> &live_engines() {
    static std::vector<pid_t> pids;
    return pids;
}

inline pid_t &engines_owner() {
    static pid_t owner = 0;
    return owner;
}

inline void kill_live_engines() {
    if (getpid() != engines_owner()) return;  // a forked child of the test is exiting
    for (const pid_t pid : live_engines()) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
    }
    live_engines().clear();
}

// A tcpsd child process on a private socket.
class EngineProcess {
  public:
    ~EngineProcess() { kill_hard(); }

    // Starts `binary` and waits (bounded) for its "ready" line.
    bool start(const std::string &binary, const std::string &socket_path,
               const std::vector<std::string> &extra = {}) {
        socket_path_ = socket_path;
        int ready[2];
        if (pipe2(ready, O_CLOEXEC) != 0) return false;
        pid_ = fork();
        if (pid_ < 0) return false;
        if (pid_ == 0) {
            dup2(ready[1], 3);  // keeps fd 3 open across exec (dup2 clears close-on-exec)
            std::vector<std::string> args = {binary, "--socket", socket_path, "--ready-fd", "3"};
            for (const auto &arg : extra) args.push_back(arg);
            std::vector<char *> argv;
            for (auto &arg : args) argv.push_back(arg.data());
            argv.push_back(nullptr);
            execv(binary.c_str(), argv.data());
            _exit(127);
        }
        close(ready[1]);
        if (engines_owner() == 0) {
            engines_owner() = getpid();
            live_engines();  // constructed first, so destroyed only after the handler has run
            std::atexit(kill_live_engines);
        }
        live_engines().push_back(pid_);
        pollfd p{ready[0], POLLIN, 0};
        char buffer[16] = {};
        bool ok = poll(&p, 1, 10000) == 1 && read(ready[0], buffer, sizeof(buffer)) > 0 &&
                  std::strncmp(buffer, "ready", 5) == 0;
        close(ready[0]);
        return ok;
    }

    bool running() {
        if (pid_ <= 0) return false;
        int status;
        const pid_t r = waitpid(pid_, &status, WNOHANG);
        if (r == pid_) {
            status_ = status;
            forget(pid_);
            pid_ = -1;
            return false;
        }
        return true;
    }

    // SIGTERM, then waits up to `timeout_ms`. Returns the exit status or -1.
    int stop(int timeout_ms) {
        if (pid_ <= 0) return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
        kill(pid_, SIGTERM);
        const bool exited = wait_until([&] { return !running(); }, timeout_ms);
        if (!exited) return -1;
        return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
    }

    void kill_hard() {
        if (pid_ > 0) {
            kill(pid_, SIGKILL);
            waitpid(pid_, nullptr, 0);
            forget(pid_);
            pid_ = -1;
        }
    }

    pid_t pid() const { return pid_; }
    const std::string &socket_path() const { return socket_path_; }

  private:
    static void forget(pid_t pid) {
        std::vector<pid_t> &pids = live_engines();
        for (size_t k = 0; k < pids.size(); ++k) {
            if (pids[k] == pid) {
                pids[k] = pids.back();
                pids.pop_back();
                break;
            }
        }
    }

    pid_t pid_ = -1;
    int status_ = 0;
    std::string socket_path_;
};

// Whether every CPU of a "--cores LIST" among `args` is online here (a test that names two
// cores skips on a one-CPU machine). Understands the "0,1" and "2-3" forms.
inline bool cores_available(const std::vector<std::string> &args) {
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    for (size_t i = 0; i + 1 < args.size(); ++i) {
        if (args[i] != "--cores") continue;
        const std::string &list = args[i + 1];
        long highest = 0, value = 0;
        for (char c : list) {
            if (c >= '0' && c <= '9') {
                value = value * 10 + (c - '0');
                highest = std::max(highest, value);
            } else {
                value = 0;
            }
        }
        if (highest >= online) return false;
    }
    return true;
}

inline int connect_control(const std::string &path) {
    const int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
    if (connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

// Waits up to `timeout_ms` for one control message. 0, -ETIMEDOUT or recv_control's error.
inline int recv_control_within(int fd, ipc::ControlMessage &msg, int *fds, int max_fds,
                               int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return -ETIMEDOUT;
    return ipc::recv_control(fd, msg, fds, max_fds, MSG_DONTWAIT);
}

class RawClient;
inline uint32_t open_socket(RawClient &c, int family, const char *what);

class RawClient {
  public:
    static constexpr uint32_t kMappedChunks = 4;
    static constexpr size_t kMappedBytes = ipc::kChunksOffset + kMappedChunks * ipc::kChunkBytes;

    RawClient() = default;
    RawClient(const RawClient &) = delete;
    RawClient &operator=(const RawClient &) = delete;
    ~RawClient() { disconnect(); }

    // Connects and says hello. 0 or -errno (the engine's result or a local error).
    int connect(const std::string &path) {
        control_ = connect_control(path);
        if (control_ < 0) return -errno;
        ipc::ControlMessage hello{};
        hello.type = static_cast<uint32_t>(ipc::ControlType::kHello);
        hello.version = ipc::kLayoutVersion;
        int rc = ipc::send_control(control_, hello, nullptr, 0);
        if (rc != 0) return rc;
        ipc::ControlMessage reply{};
        int fds[2] = {-1, -1};
        rc = recv_control_within(control_, reply, fds, 2, 5000);
        if (rc != 0) return rc;
        if (reply.type != static_cast<uint32_t>(ipc::ControlType::kHelloReply)) return -EPROTO;
        if (reply.result != 0) return reply.result;
        if (fds[0] < 0 || fds[1] < 0) return -EPROTO;
        memfd_ = fds[0];
        doorbell_ = fds[1];
        session_id_ = reply.session_id;
        // The control part and the first chunks, bulk rings included, in one sparse mapping:
        // the chunks these tests' engines activate (one per worker). Not the whole region: at
        // 16.5 GiB a chunk, a few hundred sessions of it would take all of the address space.
        void *base = mmap(nullptr, kMappedBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                          memfd_, 0);
        if (base == MAP_FAILED) return -errno;
        region_.map_contiguous(static_cast<uint8_t *>(base), kMappedChunks, true);
        if (region_.header().magic != ipc::kRegionMagic ||
            region_.header().version != ipc::kLayoutVersion)
            return -EPROTO;
        return 0;
    }

    // Closes the control socket: to the engine this client has died.
    void close_control() {
        if (control_ >= 0) close(control_);
        control_ = -1;
    }

    void disconnect() {
        close_control();
        if (region_.base) munmap(region_.base, kMappedBytes);
        region_.map_contiguous(nullptr, 0);
        for (int *fd : {&memfd_, &doorbell_}) {
            if (*fd >= 0) close(*fd);
            *fd = -1;
        }
    }

    const ipc::RegionView &region() const { return region_; }
    ipc::SocketSlot &slot(uint32_t i) const { return region_.slot(i); }
    int control_fd() const { return control_; }
    int memfd() const { return memfd_; }
    uint32_t session_id() const { return session_id_; }
    bool engine_alive() const {
        return region_.header().engine_alive.load(std::memory_order_acquire) != 0;
    }

    // Writes the doorbell if the worker serving slot i sleeps (the store before it is the
    // caller's).
    void kick(uint32_t i) {
        full_fence();
        if (region_.chunk_header(i >> ipc::kChunkShift)
                .engine_sleeping.load(std::memory_order_seq_cst) != 0) {
            const uint64_t one = 1;
            ssize_t ignored = write(doorbell_, &one, sizeof(one));
            (void)ignored;
        }
    }

    void ring(uint32_t i) {
        ipc::ring_doorbell(region_, i);
        kick(i);
    }

    struct Reply {
        bool answered = false;
        int result = 0;
        std::vector<uint8_t> opt;
    };

    // Writes a request into slot `i`, rings, and waits up to `timeout_ms` for the answer.
    Reply request(uint32_t i, uint32_t op, int32_t arg0 = 0, int32_t arg1 = 0, int32_t arg2 = 0,
                  const void *addr = nullptr, uint32_t addr_len = 0, const void *opt = nullptr,
                  uint32_t opt_len = 0, int timeout_ms = 3000) {
        ipc::SocketSlot &s = slot(i);
        ipc::Request &req = s.request;
        req.op = op;
        req.arg0 = arg0;
        req.arg1 = arg1;
        req.arg2 = arg2;
        req.addr_len = addr_len;
        req.opt_len = opt_len;
        if (addr && addr_len)
            std::memcpy(req.addr, addr, std::min<uint32_t>(addr_len, ipc::kSockAddrMax));
        if (opt && opt_len) std::memcpy(req.opt, opt, std::min<uint32_t>(opt_len, ipc::kOptMax));
        const uint32_t seq = s.req_seq.load(std::memory_order_relaxed) + 1;
        s.req_seq.store(seq, std::memory_order_release);
        ring(i);
        Reply reply;
        reply.answered = wait_until(
            [&] { return s.resp_seq.load(std::memory_order_acquire) == seq; }, timeout_ms);
        if (reply.answered) {
            reply.result = s.response.result;
            const uint32_t n = std::min<uint32_t>(s.response.opt_len, ipc::kOptMax);
            reply.opt.assign(s.response.opt, s.response.opt + n);
        }
        return reply;
    }

    // kNewSocket over the control connection, with our credentials, or with `claimed` ones
    // (which the kernel lets only a privileged sender claim): the slot the engine picked
    // (>= 0), or -errno.
    int new_socket(int family, const ucred *claimed = nullptr, int timeout_ms = 3000) {
        ipc::ControlMessage msg{};
        msg.type = static_cast<uint32_t>(ipc::ControlType::kNewSocket);
        msg.version = ipc::kLayoutVersion;
        msg.arg = family;
        int rc = 0;
        if (claimed) {
            iovec iov{&msg, sizeof(msg)};
            alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred))] = {};
            msghdr header{};
            header.msg_iov = &iov;
            header.msg_iovlen = 1;
            header.msg_control = control;
            header.msg_controllen = sizeof(control);
            cmsghdr *cmsg = CMSG_FIRSTHDR(&header);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_CREDENTIALS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(ucred));
            std::memcpy(CMSG_DATA(cmsg), claimed, sizeof(ucred));
            if (sendmsg(control_, &header, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(msg)))
                return -errno;
        } else {
            rc = ipc::send_control(control_, msg, nullptr, 0, true);
        }
        if (rc != 0) return rc;
        ipc::ControlMessage reply{};
        int none = -1;
        rc = recv_control_within(control_, reply, &none, 0, timeout_ms);
        if (rc != 0) return rc;
        if (reply.type != static_cast<uint32_t>(ipc::ControlType::kNewSocketReply)) return -EPROTO;
        return reply.result != 0 ? reply.result : reply.arg;
    }

    int request_result(uint32_t i, uint32_t op, int32_t arg0 = 0, int32_t arg1 = 0,
                       int32_t arg2 = 0, const void *addr = nullptr, uint32_t addr_len = 0,
                       const void *opt = nullptr, uint32_t opt_len = 0) {
        Reply reply = request(i, op, arg0, arg1, arg2, addr, addr_len, opt, opt_len);
        return reply.answered ? reply.result : -ETIMEDOUT;
    }

    // Copies what fits into the tx ring and publishes it. Returns the bytes queued.
    size_t send(uint32_t i, const void *data, size_t len) {
        ipc::SocketSlot &s = slot(i);
        const uint32_t tail = s.tx_tail.load(std::memory_order_relaxed);
        const uint32_t head = s.tx_head.load(std::memory_order_acquire);
        const size_t space = ipc::kRingBytes - (tail - head);  // this client never grows it
        const size_t n = std::min(space, len);
        if (n == 0) return 0;
        ipc::ring_copy_in(region_.tx_ring(i, ipc::kRingBytes), ipc::kRingBytes, tail, data, n);
        s.tx_tail.store(tail + static_cast<uint32_t>(n), std::memory_order_release);
        ring(i);
        return n;
    }

    // Takes what is in the rx ring (up to `len`). Returns the bytes copied.
    size_t recv(uint32_t i, void *data, size_t len) {
        ipc::SocketSlot &s = slot(i);
        const uint32_t head = s.rx_head.load(std::memory_order_relaxed);
        const uint32_t tail = s.rx_tail.load(std::memory_order_acquire);
        // After rx_tail: the engine stores a grown ring's size before a tail past its bytes.
        const uint32_t bytes = ipc::ring_bytes(s.rx_ring_bytes.load(std::memory_order_acquire));
        const size_t n = std::min<size_t>(tail - head, len);
        if (n == 0) return 0;
        ipc::ring_copy_out(region_.rx_ring(i, bytes), bytes, head, data, n);
        s.rx_head.store(head + static_cast<uint32_t>(n), std::memory_order_release);
        full_fence();
        if (s.flags.load(std::memory_order_seq_cst) & ipc::kFlagRxPaused) ring(i);
        return n;
    }

    // Takes one accepted connection from listener `i`: its slot index, or -1 if none waits.
    int accept(uint32_t i) {
        ipc::SocketSlot &s = slot(i);
        const uint32_t head = s.acc_head.load(std::memory_order_relaxed);
        const uint32_t tail = s.acc_tail.load(std::memory_order_acquire);
        if (head == tail) return -1;
        const uint32_t conn = s.accept_ring[head & (ipc::kAcceptRingEntries - 1)];
        s.acc_head.store(head + 1, std::memory_order_release);
        full_fence();
        if (s.flags.load(std::memory_order_seq_cst) & ipc::kFlagAcceptPaused) ring(i);
        return static_cast<int>(conn);
    }

    // Registers `pipe_write_end` as a waiter; the engine picks the lowest free index, which
    // must be `index`. The engine's result, or -errno (-EPROTO: another index).
    int register_waiter(int index, int pipe_write_end) {
        ipc::ControlMessage msg{};
        msg.type = static_cast<uint32_t>(ipc::ControlType::kRegisterWaiter);
        msg.version = ipc::kLayoutVersion;
        msg.arg = index;
        int rc = ipc::send_control(control_, msg, &pipe_write_end, 1);
        if (rc != 0) return rc;
        ipc::ControlMessage reply{};
        int fd = -1;
        rc = recv_control_within(control_, reply, &fd, 1, 3000);
        if (rc != 0) return rc;
        if (reply.type != static_cast<uint32_t>(ipc::ControlType::kWaiterReply)) return -EPROTO;
        if (reply.result == 0 && reply.arg != index) return -EPROTO;
        return reply.result;
    }

  private:
    int control_ = -1;
    int memfd_ = -1;
    int doorbell_ = -1;
    uint32_t session_id_ = 0;
    ipc::RegionView region_;
};

// A new socket (kNewSocket) that must succeed: its slot.
inline uint32_t open_socket(RawClient &c, int family, const char *what) {
    const int slot = c.new_socket(family);
    CHECK_OR_FAIL(slot >= 0, "%s: kNewSocket: %s", what, std::strerror(-slot));
    CHECK_OR_FAIL(
        c.slot(static_cast<uint32_t>(slot)).state.load() == uint32_t(ipc::SlotState::kOpen),
        "%s: slot %d not open", what, slot);
    return static_cast<uint32_t>(slot);
}

// A socket listening on 127.0.0.1, on a port the kernel picks (its local_addr says which).
inline uint32_t open_loopback_listener(RawClient &c, int backlog, const char *what) {
    const uint32_t slot = open_socket(c, AF_INET, what);
    sockaddr_in any{};
    any.sin_family = AF_INET;
    any.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kBind), 0, 0, 0, &any, sizeof(any)) == 0,
                  "%s: kBind", what);
    CHECK_OR_FAIL(c.request_result(slot, uint32_t(ipc::Op::kListen), backlog) == 0, "%s: kListen",
                  what);
    return slot;
}

// A fresh directory for a private engine's control socket, removed with what is left in it.
class ControlSocketDir {
  public:
    explicit ControlSocketDir(const char *prefix) {
        std::string pattern = std::string("/tmp/") + prefix + "-XXXXXX";
        if (!mkdtemp(pattern.data())) fail("mkdtemp: %s", std::strerror(errno));
        dir_ = pattern;
    }
    ~ControlSocketDir() {
        unlink(path().c_str());
        rmdir(dir_.c_str());
    }
    ControlSocketDir(const ControlSocketDir &) = delete;
    ControlSocketDir &operator=(const ControlSocketDir &) = delete;

    const std::string &dir() const { return dir_; }
    std::string path() const { return dir_ + "/engine.sock"; }

  private:
    std::string dir_;
};

// A plain kernel TCP listener on 127.0.0.1 (an ephemeral port), closed with the object.
class KernelListener {
  public:
    KernelListener() {
        fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        addr_.sin_family = AF_INET;
        addr_.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof(addr_);
        if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr *>(&addr_), sizeof(addr_)) ||
            listen(fd_, 4) || getsockname(fd_, reinterpret_cast<sockaddr *>(&addr_), &len))
            fail("kernel listener: %s", std::strerror(errno));
    }
    ~KernelListener() { close(fd_); }
    KernelListener(const KernelListener &) = delete;
    KernelListener &operator=(const KernelListener &) = delete;

    int fd() const { return fd_; }
    const sockaddr_in &address() const { return addr_; }

  private:
    int fd_ = -1;
    sockaddr_in addr_{};
};

// A plain kernel TCP peer on 127.0.0.1 (not offloaded) that echoes one connection back, with
// TCP_NODELAY, until it closes or stays silent for 10 s.
class KernelEchoPeer {
  public:
    KernelEchoPeer() : thread_([this] { serve(); }) {}
    ~KernelEchoPeer() {
        if (thread_.joinable()) thread_.join();
    }
    KernelEchoPeer(const KernelEchoPeer &) = delete;
    KernelEchoPeer &operator=(const KernelEchoPeer &) = delete;

    const sockaddr_in &address() const { return listener_.address(); }

  private:
    void serve() {
        pollfd p{listener_.fd(), POLLIN, 0};
        if (poll(&p, 1, 5000) != 1) return;
        const int fd = accept4(listener_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) return;
        const int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        char buffer[4096];
        for (;;) {
            pollfd q{fd, POLLIN, 0};
            if (poll(&q, 1, 10000) != 1) break;
            const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
            if (n <= 0 || send(fd, buffer, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
        }
        close(fd);
    }

    KernelListener listener_;  // first: made before the thread that serves it starts
    std::thread thread_;
};

}  // namespace tcps::test
