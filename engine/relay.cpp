#include "relay.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <vector>

#include "clock.hpp"
#include "control.hpp"
#include "control_listener.hpp"
#include "fabric.hpp"
#include "fence.hpp"
#include "link.hpp"
#include "log.hpp"
#include "mirror.hpp"
#include "ring.hpp"
#include "session.hpp"

namespace tcps::engine {

namespace {

constexpr uint64_t kHelloTimeoutNs = 2'000'000'000;
// The shim waits 2 s for its hello reply: the link to the engine must be up before that.
constexpr uint64_t kLinkTimeoutNs = 1'500'000'000;
// A client that is gone while the engine still drains its graceful closes (30 s at most).
constexpr uint64_t kOrphanTimeoutNs = 60'000'000'000ull;
// An ended session's last publishes: then its region is abandoned, never unmapped.
constexpr uint64_t kReleaseTimeoutNs = 5'000'000'000;
constexpr size_t kMaxPendingHellos = 1024;
constexpr uint32_t kQueueBatch = 64;
// While spinning, the descriptors (control messages, new clients) are looked at every this
// many rounds; the data path (work queues, fabric) every round.
constexpr unsigned kPollEvery = 16;

std::atomic<bool> g_stop{false};
int g_wake_fd = -1;

void on_signal(int) {
    const int saved_errno = errno;
    g_stop.store(true);
    const uint64_t one = 1;
    ssize_t ignored = write(g_wake_fd, &one, sizeof(one));
    (void)ignored;
    errno = saved_errno;
}

bool parse_number(const std::string &text, long min, long max, long &out) {
    if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos) return false;
    errno = 0;
    const long value = std::strtol(text.c_str(), nullptr, 10);
    if (errno != 0 || value < min || value > max) return false;
    out = value;
    return true;
}

// The address this host uses to reach `engine`: what our fabric endpoint should open on.
std::string route_to(const sockaddr_storage &engine, socklen_t len) {
    const int probe = socket(engine.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return {};
    sockaddr_storage local{};
    socklen_t local_len = sizeof(local);
    std::string host;
    if (connect(probe, reinterpret_cast<const sockaddr *>(&engine), len) == 0 &&
        getsockname(probe, reinterpret_cast<sockaddr *>(&local), &local_len) == 0)
        host = numeric_host(local, local_len);
    close(probe);
    return host;
}

void send_reply(int fd, ipc::ControlType type, int result, int32_t arg, uint32_t session_id) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(type);
    reply.version = ipc::kLayoutVersion;
    reply.result = result;
    reply.arg = arg;
    reply.session_id = session_id;
    ipc::send_control(fd, reply, nullptr, 0);
}

struct PendingHello {
    int fd = -1;
    uint64_t deadline_ns = 0;
    ClientCreds creds;
};

// What the engine's copy of a slot holds of the client's indices, as far as we published them.
struct ForwardedSlot {
    uint32_t tx_tail = 0;
    uint32_t req_seq = 0;
    uint32_t rx_head = 0;
    uint32_t acc_head = 0;
};

enum class Phase {
    kConnecting,  // the link's TCP connect is under way; the client waits for its hello reply
    kHello,       // our LinkHello is (being) sent; waiting for the engine's LinkReply
    kLinked,      // served: the client has its region
};

struct Client {
    std::unique_ptr<Session> session;  // the region, doorbell, waiters, member 0's connection
    Phase phase = Phase::kConnecting;
    int link_fd = -1;
    uint64_t deadline_ns = 0;  // linking: answer the hello by then; ending: see free_done()
    LinkHello hello{};
    size_t hello_sent = 0;
    LinkReply reply{};
    size_t reply_received = 0;
    bool registered = false;  // our copy is registered with the endpoint as `region`
    uint32_t region = 0;
    RegionPublisher publisher;
    std::unique_ptr<ForwardedSlot[]> slots{new ForwardedSlot[kRemoteSlots]};
    bool client_gone = false;  // its process (member 0) closed its control connection
    bool engine_gone = false;  // the engine ended the session, or the link failed
    bool peer_gone = false;    // the link or the fabric failed: nothing more will go out

    ~Client() {
        if (link_fd >= 0) close(link_fd);
    }
};

class Relay {
  public:
    explicit Relay(const RelayOptions &options) : options_(options) {}
    ~Relay();
    int run();

  private:
    bool open_fabric(std::string &error);
    void loop();

    // --- descriptors ---
    void poll_descriptors(int timeout_ms, bool with_fabric);
    void accept_clients();
    bool on_hello_readable(PendingHello &hello);
    void start_link(PendingHello &hello);
    void on_link_event(Client &c, short revents);
    void finish_link(Client &c);
    void fail_link(Client &c, int error, const char *why);
    void on_control(Client &c);
    void register_waiter(Client &c, int fd);
    void release_waiters(Client &c);
    void drain_doorbell(Client &c);

    // --- data path ---
    bool drain_queue(Client &c);
    void forward(Client &c, uint32_t i, bool popped);
    bool poll_fabric();
    void on_tag(uint32_t region, uint32_t tag);
    void flush_wakes();
    void sleep_until_work();

    // --- lifetime ---
    void client_gone(Client &c, const char *why);
    void engine_gone(Client &c, const char *why);
    bool release_done(Client &c);
    void free_finished();
    void stop_all();

    RelayOptions options_;
    std::string path_;
    int listener_ = -1;
    ino_t inode_ = 0;
    sockaddr_storage engine_addr_{};
    socklen_t engine_addr_len_ = 0;
    std::unique_ptr<ipc::FabricEndpoint> fabric_;
    uint32_t next_session_id_ = 1;
    std::vector<PendingHello> hellos_;
    std::vector<std::unique_ptr<Client>> clients_;
    std::vector<Client *> by_region_;  // fabric region -> client
    std::vector<Client *> dirty_;
    std::vector<pollfd> fds_;
    unsigned rounds_ = 0;
};

Relay::~Relay() {
    for (PendingHello &hello : hellos_) close(hello.fd);
    // The endpoint first: nothing may land in a region after it is unmapped.
    fabric_.reset();
    clients_.clear();
    if (listener_ >= 0) close(listener_);
}

bool Relay::open_fabric(std::string &error) {
    ipc::FabricConfig config = ipc::FabricConfig::from_env();
    config.max_tag = kLinkMaxTag;
    config.node = options_.fabric_node.empty() ? route_to(engine_addr_, engine_addr_len_)
                                               : options_.fabric_node;
    const int rc = ipc::FabricEndpoint::open(config, fabric_);
    if (rc < 0) {
        error = "fabric endpoint (" + config.provider + " on " +
                (config.node.empty() ? std::string("any address") : config.node) +
                "): " + std::strerror(-rc);
        return false;
    }
    log_line("fabric endpoint: %s on %s", fabric_->provider_name(),
             config.node.empty() ? "any address" : config.node.c_str());
    return true;
}

int Relay::run() {
    signal(SIGPIPE, SIG_IGN);
    rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    if (!parse_link_address(options_.engine, engine_addr_, engine_addr_len_)) {
        log_line("--engine: '%s' is not HOST:PORT or [V6]:PORT", options_.engine.c_str());
        return 2;
    }
    g_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (g_wake_fd < 0) {
        log_line("eventfd: %s", std::strerror(errno));
        return 1;
    }
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGINT, &action, nullptr);

    std::string error;
    if (!open_fabric(error)) {
        log_line("%s", error.c_str());
        return 1;
    }
    path_ = options_.socket_path.empty() ? ipc::engine_socket_path() : options_.socket_path;
    if (open_control_socket(path_, listener_, inode_, error) != ListenResult::kOk) {
        log_line("%s", error.c_str());
        return 1;
    }
    log_line("relay listening on %s for the engine at %s", path_.c_str(), options_.engine.c_str());
    if (options_.ready_fd >= 0) {
        static const char kReady[] = "ready\n";
        ssize_t ignored = write(options_.ready_fd, kReady, sizeof(kReady) - 1);
        (void)ignored;
        close(options_.ready_fd);
    }
    loop();
    log_line("stopping");
    stop_all();
    struct stat st;
    if (lstat(path_.c_str(), &st) == 0 && st.st_ino == inode_) unlink(path_.c_str());
    return 0;
}

void Relay::loop() {
    const uint64_t spin_ns = static_cast<uint64_t>(options_.spin_us) * 1000;
    uint64_t last_work = monotonic_ns();
    while (!g_stop.load(std::memory_order_relaxed)) {
        bool work = poll_fabric();
        for (size_t k = 0; k < clients_.size(); ++k) {
            Client &c = *clients_[k];
            if (c.phase == Phase::kLinked && !c.client_gone && !c.engine_gone)
                work |= drain_queue(c);
            if (c.registered && !c.publisher.drained()) c.publisher.flush();
            // The mirror is no longer exact (a refused or lost publish): this session is over.
            if (c.registered && c.publisher.error() != 0 && !c.engine_gone) {
                c.peer_gone = true;
                engine_gone(c, "its fabric publishes failed");
            }
        }
        flush_wakes();
        if (++rounds_ % kPollEvery == 0) poll_descriptors(0, false);
        free_finished();
        const uint64_t now = monotonic_ns();
        if (work) {
            last_work = now;
        } else if (!options_.busy_poll && now - last_work >= spin_ns) {
            sleep_until_work();
            last_work = monotonic_ns();
        } else {
            cpu_relax();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptors: new clients, their control connections and doorbells, the links

void Relay::poll_descriptors(int timeout_ms, bool with_fabric) {
    enum Kind : uint8_t { kWake, kListener, kHello, kControl, kLink, kDoorbell, kFabric };
    struct Ref {
        Kind kind;
        size_t index;
    };
    std::vector<Ref> refs;
    fds_.clear();
    auto add = [&](int fd, short events, Kind kind, size_t index) {
        fds_.push_back({fd, events, 0});
        refs.push_back({kind, index});
    };
    add(g_wake_fd, POLLIN, kWake, 0);
    add(listener_, POLLIN, kListener, 0);
    uint64_t next_deadline = UINT64_MAX;
    for (size_t k = 0; k < hellos_.size(); ++k) {
        add(hellos_[k].fd, POLLIN, kHello, k);
        next_deadline = std::min(next_deadline, hellos_[k].deadline_ns);
    }
    for (size_t k = 0; k < clients_.size(); ++k) {
        Client &c = *clients_[k];
        const int control = c.session->members[0].control_fd;
        if (control >= 0 && !c.client_gone) add(control, POLLIN, kControl, k);
        if (c.link_fd >= 0 && !c.engine_gone)
            add(c.link_fd, c.phase == Phase::kConnecting ? POLLOUT : POLLIN, kLink, k);
        if (c.phase == Phase::kLinked && !c.engine_gone)
            add(c.session->doorbell_fd, POLLIN, kDoorbell, k);
        if (c.phase != Phase::kLinked || c.client_gone || c.engine_gone)
            next_deadline = std::min(next_deadline, c.deadline_ns);
    }
    if (with_fabric && fabric_->wait_fd() >= 0) add(fabric_->wait_fd(), POLLIN, kFabric, 0);
    if (timeout_ms != 0 && next_deadline != UINT64_MAX) {
        const uint64_t now = monotonic_ns();
        const int until =
            next_deadline <= now ? 0 : static_cast<int>((next_deadline - now) / 1'000'000 + 1);
        timeout_ms = timeout_ms < 0 ? until : std::min(timeout_ms, until);
    }
    const int ready = poll(fds_.data(), fds_.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) log_line("poll: %s", std::strerror(errno));

    const uint64_t now = monotonic_ns();
    bool accept_ready = false;
    std::vector<PendingHello> still_waiting;
    for (size_t k = 0; k < fds_.size(); ++k) {
        const short revents = ready > 0 ? fds_[k].revents : 0;
        const Ref ref = refs[k];
        switch (ref.kind) {
            case kWake:
                if (revents & POLLIN) {
                    uint64_t drained;
                    ssize_t ignored = read(g_wake_fd, &drained, sizeof(drained));
                    (void)ignored;
                }
                break;
            case kListener:
                accept_ready = (revents & POLLIN) != 0;
                break;
            case kHello: {
                PendingHello &hello = hellos_[ref.index];
                bool keep = true;
                if (revents & (POLLIN | POLLHUP | POLLERR)) keep = on_hello_readable(hello);
                if (keep && now >= hello.deadline_ns) {
                    close(hello.fd);
                    keep = false;
                }
                if (keep) still_waiting.push_back(hello);
                break;
            }
            case kControl:
                if (revents & (POLLIN | POLLHUP | POLLERR)) on_control(*clients_[ref.index]);
                break;
            case kLink:
                if (revents) on_link_event(*clients_[ref.index], revents);
                break;
            case kDoorbell:
                if (revents & POLLIN) drain_doorbell(*clients_[ref.index]);
                break;
            case kFabric:
                break;  // the next round's progress() reads it
        }
    }
    hellos_.swap(still_waiting);
    for (auto &owned : clients_) {
        Client &c = *owned;
        if (c.phase != Phase::kLinked && now >= c.deadline_ns &&
            c.session->members[0].control_fd >= 0)
            fail_link(c, -ETIMEDOUT, "the engine did not answer in time");
    }
    if (accept_ready) accept_clients();
}

void Relay::accept_clients() {
    for (int k = 0; k < 64; ++k) {
        PendingHello hello;
        hello.fd = accept_control_client(listener_, hello.creds);
        if (hello.fd < 0) return;
        if (hellos_.size() >= kMaxPendingHellos) {
            close(hello.fd);
            continue;
        }
        hello.deadline_ns = monotonic_ns() + kHelloTimeoutNs;
        hellos_.push_back(hello);
    }
}

bool Relay::on_hello_readable(PendingHello &hello) {
    ipc::ControlMessage msg;
    int unused_fd = -1;
    const int rc = ipc::recv_control(hello.fd, msg, &unused_fd, 0, MSG_DONTWAIT);
    if (rc == -EAGAIN || rc == -EWOULDBLOCK) return true;
    if (rc == 0 && msg.type == static_cast<uint32_t>(ipc::ControlType::kJoin)) {
        // A forked child: the relay keeps no members (its parent's kReserveMember was refused
        // too, so a well-behaved child never asks).
        send_reply(hello.fd, ipc::ControlType::kJoinReply, -EOPNOTSUPP, msg.arg, msg.session_id);
        close(hello.fd);
        return false;
    }
    if (rc < 0 || msg.type != static_cast<uint32_t>(ipc::ControlType::kHello) ||
        msg.version != ipc::kLayoutVersion) {
        if (rc != -ECONNRESET)
            send_reply(hello.fd, ipc::ControlType::kHelloReply, -EPROTONOSUPPORT, 0, 0);
        close(hello.fd);
        return false;
    }
    start_link(hello);
    return false;
}

void Relay::start_link(PendingHello &hello) {
    auto owned = std::make_unique<Client>();
    Client &c = *owned;
    c.session = std::make_unique<Session>();
    Session &s = *c.session;
    s.creds = hello.creds;
    s.members[0].control_fd = hello.fd;  // answered once the link is up
    c.deadline_ns = monotonic_ns() + kLinkTimeoutNs;
    const uint32_t id = next_session_id_++;
    int rc = create_region(s, id, true);
    if (rc == 0) rc = fabric_->register_region(s.region.base, ipc::kRemoteRegionBytes, c.region);
    if (rc == 0) {
        c.registered = true;
        if (by_region_.size() <= c.region) by_region_.resize(c.region + 1, nullptr);
        by_region_[c.region] = &c;
        c.hello.magic = kLinkMagic;
        c.hello.version = kLinkVersion;
        c.hello.layout_version = ipc::kLayoutVersion;
        c.hello.region_bytes = ipc::kRemoteRegionBytes;
        c.hello.pid = s.creds.pid;
        c.hello.uid = s.creds.uid;
        c.hello.gid = s.creds.gid;
        c.hello.caps = s.creds.caps;
        rc = fabric_->bootstrap_info(c.region, c.hello.fabric);
    }
    if (rc == 0) {
        c.link_fd = socket(engine_addr_.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c.link_fd < 0) rc = -errno;
    }
    if (rc == 0) {
        tune_link_socket(c.link_fd);
        if (connect(c.link_fd, reinterpret_cast<const sockaddr *>(&engine_addr_),
                    engine_addr_len_) != 0 &&
            errno != EINPROGRESS)
            rc = -errno;
    }
    clients_.push_back(std::move(owned));
    if (rc != 0) return fail_link(c, rc, "cannot start the link");
    TCPS_LOG_VERBOSE("session %u: pid %d uid %u, linking to %s", id, s.creds.pid, s.creds.uid,
                     options_.engine.c_str());
}

void Relay::on_link_event(Client &c, short revents) {
    if (c.phase == Phase::kLinked) {
        // Nothing travels on the link once it is up: readable means the engine's end.
        char byte;
        const ssize_t n = recv(c.link_fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK);
        if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR))) return;
        c.peer_gone = true;
        return engine_gone(c, "the engine closed the link");
    }
    if (c.session->members[0].control_fd < 0) return;  // failed already
    if (c.phase == Phase::kConnecting) {
        int error = 0;
        socklen_t len = sizeof(error);
        if (getsockopt(c.link_fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
        if (error != 0) return fail_link(c, -error, "cannot reach the engine");
        if (!(revents & POLLOUT)) return;
        c.phase = Phase::kHello;
    }
    if (c.hello_sent < sizeof(c.hello)) {
        const ssize_t n =
            send(c.link_fd, reinterpret_cast<const uint8_t *>(&c.hello) + c.hello_sent,
                 sizeof(c.hello) - c.hello_sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return fail_link(c, -errno, "the link failed");
        if (n > 0) c.hello_sent += static_cast<size_t>(n);
        if (c.hello_sent < sizeof(c.hello)) {
            c.phase = Phase::kConnecting;  // wait for POLLOUT again
            return;
        }
    }
    if (!(revents & (POLLIN | POLLHUP | POLLERR))) return;
    const ssize_t n = recv(c.link_fd, reinterpret_cast<uint8_t *>(&c.reply) + c.reply_received,
                           sizeof(c.reply) - c.reply_received, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) return fail_link(c, n == 0 ? -ECONNRESET : -errno, "the engine closed the link");
    c.reply_received += static_cast<size_t>(n);
    if (c.reply_received == sizeof(c.reply)) finish_link(c);
}

void Relay::finish_link(Client &c) {
    Session &s = *c.session;
    if (c.reply.magic != kLinkMagic || c.reply.version != kLinkVersion)
        return fail_link(c, -EPROTO, "the engine's reply does not match this relay");
    if (c.reply.result != 0) return fail_link(c, c.reply.result, "the engine refused the session");
    const int rc = fabric_->connect_region(c.region, c.reply.fabric);
    if (rc != 0) return fail_link(c, rc, "cannot connect the region");
    c.publisher.attach(fabric_.get(), c.region, s.region.base);
    // Member 0 is the process that said hello, as the engine records it (adopt_pending).
    s.region.member(0).pid.store(s.creds.pid, std::memory_order_relaxed);
    s.region.member(0).state.store(static_cast<uint32_t>(ipc::MemberState::kLive),
                                   std::memory_order_release);
    s.members[0].state = ipc::MemberState::kLive;
    s.live_members = 1;
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kHelloReply);
    reply.version = ipc::kLayoutVersion;
    reply.session_id = s.id;
    const int fds[2] = {s.memfd, s.doorbell_fd};
    if (ipc::send_control(s.members[0].control_fd, reply, fds, 2) != 0) {
        c.phase = Phase::kLinked;
        return client_gone(c, "its hello reply failed");
    }
    c.phase = Phase::kLinked;
    TCPS_LOG_VERBOSE("session %u: linked (engine session %u)", s.id, c.reply.session_id);
}

void Relay::fail_link(Client &c, int error, const char *why) {
    Session &s = *c.session;
    log_line("session %u (pid %d): %s: %s; the client keeps its TCP in the kernel", s.id,
             s.creds.pid, why, std::strerror(error < 0 ? -error : error));
    int &control = s.members[0].control_fd;
    if (control >= 0) {
        send_reply(control, ipc::ControlType::kHelloReply, error < 0 ? error : -error, 0, 0);
        close(control);
        control = -1;
    }
    if (c.link_fd >= 0) close(c.link_fd);
    c.link_fd = -1;
    c.client_gone = true;
    c.engine_gone = true;
    c.deadline_ns = 0;  // nothing was published: free at once
}

void Relay::on_control(Client &c) {
    if (c.phase != Phase::kLinked) {
        // The client waits for its hello reply and sends nothing: this is its end, or a
        // protocol error.
        char byte;
        const ssize_t n = recv(c.session->members[0].control_fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK);
        if (n > 0) {
            fail_link(c, -EPROTO, "the client spoke before its hello was answered");
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            fail_link(c, -ECONNRESET, "the client left before its session was up");
        }
        return;
    }
    Session &s = *c.session;
    for (int k = 0; k < 16 && !c.client_gone; ++k) {
        const int control = s.members[0].control_fd;
        ipc::ControlMessage msg;
        int received = -1;
        const int rc = ipc::recv_control(control, msg, &received, 1, MSG_DONTWAIT);
        if (rc == -EAGAIN || rc == -EWOULDBLOCK) return;
        if (rc == -ECONNRESET) return client_gone(c, "the client closed its control socket");
        if (rc < 0) return client_gone(c, "its control socket failed");
        const auto type = static_cast<ipc::ControlType>(msg.type);
        if (type == ipc::ControlType::kRegisterWaiter) {
            register_waiter(c, received);
            continue;
        }
        if (received >= 0) close(received);
        switch (type) {
            case ipc::ControlType::kReleaseWaiters:
                release_waiters(c);
                break;
            case ipc::ControlType::kReserveMember:
                // A forked child gets no share of this session; its own sockets get a session
                // of their own (the shim's documented fallback).
                send_reply(control, ipc::ControlType::kReserveReply, -EOPNOTSUPP, -1, s.id);
                break;
            case ipc::ControlType::kHandoff:
                // The kernel socket is on the engine's host: it cannot be handed back here.
                send_reply(control, ipc::ControlType::kHandoffReply, -EOPNOTSUPP, 0, s.id);
                break;
            case ipc::ControlType::kAdoptSocket:
                // Nor can a kernel socket of this host be served from there: it stays here.
                send_reply(control, ipc::ControlType::kAdoptSocketReply, -EOPNOTSUPP, -1, s.id);
                break;
            default:
                return client_gone(c, "unexpected control message");
        }
    }
}

void Relay::register_waiter(Client &c, int fd) {
    Session &s = *c.session;
    int result = 0;
    int own = -1;
    struct stat st;
    const int flags = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode) || flags < 0 ||
        ((flags & O_ACCMODE) != O_WRONLY && (flags & O_ACCMODE) != O_RDWR)) {
        result = -EINVAL;
    } else {
        // Our own open file description, non-blocking whatever the client does to its own
        // (the engine's reason too: engine/worker.cpp register_waiter).
        char proc_path[64];
        std::snprintf(proc_path, sizeof(proc_path), "/proc/self/fd/%d", fd);
        own = open(proc_path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (own < 0) result = -EINVAL;
    }
    if (fd >= 0) close(fd);
    int32_t index = -1;
    for (uint32_t w = 0; result == 0 && w < ipc::kMaxWaiters; ++w) {
        if (s.waiter_fds[w] < 0) {
            index = static_cast<int32_t>(w);
            break;
        }
    }
    if (result == 0 && index < 0) {
        close(own);
        result = -ENOSPC;
    }
    if (result == 0) install_waiter(s, static_cast<uint32_t>(index), own, 0);
    send_reply(s.members[0].control_fd, ipc::ControlType::kWaiterReply, result, index, s.id);
}

void Relay::release_waiters(Client &c) {
    Session &s = *c.session;
    for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) {
        if (s.waiter_fds[w] >= 0) close(s.waiter_fds[w]);
        s.waiter_fds[w] = -1;
        s.waiter_owner[w] = kNoMember;
    }
}

void Relay::drain_doorbell(Client &c) {
    uint64_t value;
    ssize_t ignored = read(c.session->doorbell_fd, &value, sizeof(value));
    (void)ignored;
}

// ---------------------------------------------------------------------------------------------
// The data path

bool Relay::drain_queue(Client &c) {
    Session &s = *c.session;
    uint32_t n = 0;
    for (; n < kQueueBatch; ++n) {
        uint32_t slot;
        const ipc::PopResult result = ipc::work_queue_pop(s.region, 0, slot);
        if (result == ipc::PopResult::kEmpty) break;
        if (result == ipc::PopResult::kGarbage) {
            log_line("session %u (pid %d): protocol violation: a work queue entry out of range",
                     s.id, s.creds.pid);
            client_gone(c, "protocol violation");
            engine_gone(c, "protocol violation");
            return true;
        }
        forward(c, slot, true);
    }
    return n > 0;
}

void Relay::forward(Client &c, uint32_t i, bool popped) {
    ipc::SocketSlot &slot = c.session->region.slot(i);
    // As the engine does (process_slot): clear, then read, so a doorbell rung after this
    // point queues the slot again.
    if (popped) slot.doorbell_queued.exchange(0, std::memory_order_seq_cst);
    // `posted` first: a shutdown it holds then covers every byte queued before it.
    const uint32_t posted = slot.posted.load(std::memory_order_acquire);
    const uint32_t req_seq = slot.req_seq.load(std::memory_order_acquire);
    const uint32_t tx_tail = slot.tx_tail.load(std::memory_order_acquire);
    const uint32_t rx_head = slot.rx_head.load(std::memory_order_acquire);
    const uint32_t acc_head = slot.acc_head.load(std::memory_order_acquire);
    const uint32_t holders = slot.holders.load(std::memory_order_acquire);
    ForwardedSlot &forwarded = c.slots[i];
    RegionPublisher &out = c.publisher;
    // The bytes before the index that covers them. An index more than a ring ahead is the
    // client's garbage: passed on for the engine to judge, with no bytes.
    if (tx_tail != forwarded.tx_tail) {
        out.publish_ring(ipc::tx_ring_offset(i), ipc::kRingBytes, forwarded.tx_tail, tx_tail);
        forwarded.tx_tail = tx_tail;
    }
    if (req_seq != forwarded.req_seq) {
        // The request as it was when req_seq said it was complete: a snapshot of our own.
        ipc::Request request;
        std::memcpy(&request, &slot.request, sizeof(request));
        out.publish_copy(slot_field(i, offsetof(ipc::SocketSlot, request)), &request,
                         sizeof(request));
        forwarded.req_seq = req_seq;
    }
    const uint32_t indices[kClientIndicesBytes / 4] = {tx_tail, rx_head, req_seq, acc_head,
                                                       posted,  0,       0,       holders};
    out.publish_copy(slot_offset(i), indices, sizeof(indices), i);
    forwarded.rx_head = rx_head;
    forwarded.acc_head = acc_head;
}

bool Relay::poll_fabric() {
    bool work = false;
    for (int round = 0; round < 4; ++round) {
        const int n =
            fabric_->progress([this](uint32_t region, uint32_t tag) { on_tag(region, tag); });
        if (n < 0) {
            log_line("fabric completion queue: %s", std::strerror(-n));
            break;
        }
        if (n == 0) break;
        work = true;
    }
    return work;
}

void Relay::on_tag(uint32_t region, uint32_t tag) {
    if (region >= by_region_.size() || by_region_[region] == nullptr) return;
    Client &c = *by_region_[region];
    if (c.engine_gone) return;
    if (tag == ipc::kFabricRegionFailed) {
        c.peer_gone = true;
        return engine_gone(c, "the fabric link failed");
    }
    if (tag == kTagSessionEnd) return engine_gone(c, "the engine ended the session");
    if (tag >= kTagSlotInit && tag < kTagSlotInit + kRemoteSlots) {
        // A new socket in this slot: the engine reset its client indices in both copies.
        ForwardedSlot &forwarded = c.slots[tag - kTagSlotInit];
        forwarded.tx_tail = 0;
        forwarded.rx_head = 0;
        forwarded.acc_head = 0;
        return;
    }
    if (tag >= kRemoteSlots) return;
    Session &s = *c.session;
    if (!s.changed_test(tag)) {
        s.changed_bits[tag / 64] |= uint64_t{1} << (tag % 64);
        s.changed.push_back(tag);
    }
    if (!s.dirty) {
        s.dirty = true;
        dirty_.push_back(&c);
    }
}

void Relay::flush_wakes() {
    if (dirty_.empty()) return;
    // What progress() applied before our loads of the waiters and of the client's heads: pairs
    // with the client's arm-then-recheck and its store-then-look-at-the-pause-flags.
    ipc::full_fence();
    for (Client *c : dirty_) {
        Session &s = *c->session;
        s.dirty = false;
        if (c->engine_gone || c->client_gone) {
            wake_changed_waiters(s, false);
            continue;
        }
        // The engine paused a slot (rx ring or accept ring full) and waits for the client's
        // head: if the client moved it without seeing the flag, it did not ring, and only we
        // can see that now (the engine's copy is stale). The engine's own re-check, done here.
        for (uint16_t i : s.changed) {
            const ipc::SocketSlot &slot = s.region.slot(i);
            const uint32_t flags = slot.flags.load(std::memory_order_acquire);
            if (!(flags & (ipc::kFlagRxPaused | ipc::kFlagAcceptPaused)) ||
                slot.state.load(std::memory_order_acquire) !=
                    static_cast<uint32_t>(ipc::SlotState::kOpen))
                continue;
            if (slot.rx_head.load(std::memory_order_acquire) != c->slots[i].rx_head ||
                slot.acc_head.load(std::memory_order_acquire) != c->slots[i].acc_head)
                forward(*c, i, false);
        }
        wake_changed_waiters(s);
    }
    dirty_.clear();
}

void Relay::sleep_until_work() {
    auto set_sleeping = [this](uint32_t value) {
        for (auto &c : clients_)
            if (c->phase == Phase::kLinked && !c->engine_gone)
                c->session->region.chunk_header(0).engine_sleeping.store(value,
                                                                         std::memory_order_seq_cst);
    };
    set_sleeping(1);
    // engine_sleeping before the last look at the queues: a client that pushed before seeing
    // it is caught here, one that pushed after it writes the doorbell (the engine's rule).
    ipc::full_fence();
    bool busy = g_stop.load() || !fabric_->ready_to_sleep();
    for (size_t k = 0; k < clients_.size() && !busy; ++k) {
        const Client &c = *clients_[k];
        if (c.phase != Phase::kLinked || c.engine_gone || c.client_gone) continue;
        busy = ipc::work_queue_ready(c.session->region, 0);
    }
    if (!busy) poll_descriptors(-1, true);
    set_sleeping(0);
}

// ---------------------------------------------------------------------------------------------
// Lifetime

void Relay::client_gone(Client &c, const char *why) {
    if (c.client_gone) return;
    c.client_gone = true;
    Session &s = *c.session;
    TCPS_LOG_VERBOSE("session %u (pid %d): client gone: %s", s.id, s.creds.pid, why);
    int &control = s.members[0].control_fd;
    if (control >= 0) close(control);
    control = -1;
    release_waiters(c);
    c.deadline_ns = monotonic_ns() + kOrphanTimeoutNs;
    if (c.engine_gone || c.phase != Phase::kLinked) return;
    // What it wrote before it went, then its holds, then the news: the engine drops each hold
    // as for a dead member, sending what the process wrote before closing.
    drain_queue(c);
    uint64_t held[kRemoteSlots / 64];
    for (uint32_t word = 0; word < kRemoteSlots / 64; ++word) {
        held[word] = s.region.held_word(0, word * 64).load(std::memory_order_acquire);
        for (uint64_t bits = held[word]; bits != 0; bits &= bits - 1)
            forward(c, word * 64 + static_cast<uint32_t>(__builtin_ctzll(bits)), false);
    }
    c.publisher.publish_copy(member_held_offset(0), held, sizeof(held));
    c.publisher.notify(kTagMemberGone);
}

void Relay::engine_gone(Client &c, const char *why) {
    if (c.engine_gone) return;
    c.engine_gone = true;
    Session &s = *c.session;
    if (!c.client_gone) log_line("session %u (pid %d): %s", s.id, s.creds.pid, why);
    // As a local engine ends a session: the client falls back, and every waiter gets a byte and
    // then EOF, so no thread sleeps on us.
    announce_engine_gone(s);
    release_waiters(c);
    if (s.members[0].control_fd >= 0) shutdown(s.members[0].control_fd, SHUT_RDWR);
    if (c.link_fd >= 0) shutdown(c.link_fd, SHUT_RDWR);
    c.deadline_ns = monotonic_ns() + kReleaseTimeoutNs;
}

// True once the client's region may go: nothing of it in flight on the fabric any more.
bool Relay::release_done(Client &c) {
    if (!c.registered) return true;
    const bool late = monotonic_ns() >= c.deadline_ns;
    if (c.peer_gone || late) {
        c.publisher.discard();
    } else if (fabric_->region_outstanding(c.region) > 0 || !c.publisher.drained()) {
        return false;  // our last publishes (the client's end) go out first
    }
    // Drops what the provider has not taken; busy while it still has some of it.
    if (fabric_->unregister_region(c.region) == -EBUSY) {
        if (!late) return false;
        // The provider may still use it: never unmap it, never reuse its index.
        log_line("session %u: the engine stopped answering; its region stays mapped",
                 c.session->id);
        c.session->region.base = nullptr;
    }
    by_region_[c.region] = nullptr;
    c.registered = false;
    return true;
}

void Relay::free_finished() {
    const uint64_t now = monotonic_ns();
    for (size_t k = 0; k < clients_.size();) {
        Client &c = *clients_[k];
        // A client gone long ago whose engine never ended the session: end it ourselves.
        if (c.client_gone && !c.engine_gone && now >= c.deadline_ns)
            engine_gone(c, "the engine did not end a finished session");
        if (!(c.client_gone && c.engine_gone) || !release_done(c)) {
            ++k;
            continue;
        }
        TCPS_LOG_VERBOSE("session %u: freed", c.session->id);
        for (size_t d = 0; d < dirty_.size(); ++d) {
            if (dirty_[d] == &c) {
                dirty_[d] = dirty_.back();
                dirty_.pop_back();
                break;
            }
        }
        clients_[k] = std::move(clients_.back());
        clients_.pop_back();
    }
}

void Relay::stop_all() {
    for (auto &c : clients_) {
        client_gone(*c, "the relay stops");
        engine_gone(*c, "the relay stops");
    }
    // Let the last publishes go, briefly; what the engine misses it learns from the links.
    const uint64_t deadline = monotonic_ns() + 500'000'000;
    while (monotonic_ns() < deadline) {
        poll_fabric();
        bool busy = false;
        for (auto &c : clients_)
            busy |= c->registered && fabric_->region_outstanding(c->region) > 0;
        if (!busy) break;
        fabric_->wait(10);
    }
    for (auto &c : clients_) c->deadline_ns = 0;
    free_finished();
}

}  // namespace

const char *relay_usage_text() {
    return "usage: tcps-relay --engine ADDR:PORT [--socket PATH] [--fabric-node ADDR] "
           "[--spin-us N] [--busy-poll] [--ready-fd FD] [--verbose]\n"
           "  --engine ADDR:PORT  the remote tcpsd's --fabric-listen address ([V6]:PORT for IPv6)\n"
           "  --socket PATH  control socket the shim connects to (default: $TCPS_ENGINE_SOCKET or\n"
           "                 the per-user path, as tcpsd)\n"
           "  --fabric-node ADDR  our fabric endpoint's address (default: the one routed to the\n"
           "                 engine)\n"
           "  --spin-us N    spin this long without work before sleeping (default 50)\n"
           "  --busy-poll    never sleep\n"
           "  --ready-fd FD  write \"ready\\n\" to FD once listening, then close it\n"
           "  --verbose      log every session\n"
           "Environment: TCPS_FABRIC_PROVIDER (default tcp;ofi_rxm), as tcpsd's.\n";
}

bool parse_relay_options(int argc, char **argv, RelayOptions &options, std::string &error) {
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        std::string name = arg;
        std::string value;
        bool has_value = false;
        const size_t eq = arg.find('=');
        if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
            name = arg.substr(0, eq);
            value = arg.substr(eq + 1);
            has_value = true;
        }
        auto take_value = [&]() -> bool {
            if (!has_value) {
                if (i + 1 >= argc) {
                    error = name + " needs a value";
                    return false;
                }
                value = argv[++i];
            }
            if (value.empty()) error = name + " needs a value";
            return !value.empty();
        };
        long number = 0;
        if (name == "--engine" || name == "--socket" || name == "--fabric-node") {
            if (!take_value()) return false;
            (name == "--engine"   ? options.engine
             : name == "--socket" ? options.socket_path
                                  : options.fabric_node) = value;
        } else if (name == "--spin-us" || name == "--ready-fd") {
            if (!take_value()) return false;
            const bool spin = name == "--spin-us";
            if (!parse_number(value, 0, spin ? 10'000'000 : 1 << 20, number)) {
                error = "invalid " + name + " '" + value + "'";
                return false;
            }
            (spin ? options.spin_us : options.ready_fd) = static_cast<int>(number);
        } else if (name == "--busy-poll" && !has_value) {
            options.busy_poll = true;
        } else if (name == "--verbose" && !has_value) {
            options.verbose = true;
        } else if ((name == "--help" || name == "-h") && !has_value) {
            options.help = true;
        } else {
            error = "unknown argument '" + arg + "'";
            return false;
        }
    }
    if (!options.help && options.engine.empty()) {
        error = "--engine is required";
        return false;
    }
    return true;
}

int run_relay(const RelayOptions &options) {
    Relay relay(options);
    return relay.run();
}

}  // namespace tcps::engine
