#include "engine.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "clock.hpp"
#include "control.hpp"
#include "control_listener.hpp"
#include "log.hpp"
#include "parked.hpp"
#include "quota.hpp"
#include "remote.hpp"
#include "session.hpp"
#include "worker.hpp"

namespace tcps::engine {

namespace {

constexpr uint64_t kHelloTimeoutNs = 2'000'000'000;
constexpr size_t kMaxPendingHellos = 1024;
constexpr int kMaxWakeFds = 260;
// The elastic engine looks at the workers' load once per load window (worker.cpp's 100 ms).
constexpr uint64_t kRebalanceNs = 100'000'000;

// --- signals: a flag and eventfd writes, nothing else (async-signal-safe) ---
std::atomic<bool> g_stop{false};
std::atomic<bool> g_dump_stats{false};
int g_wake_fds[kMaxWakeFds];
std::atomic<int> g_wake_count{0};

void on_signal(int signo) {
    const int saved_errno = errno;
    if (signo == SIGUSR1) {
        g_dump_stats.store(true);
    } else {
        g_stop.store(true);
    }
    const uint64_t one = 1;
    const int count = g_wake_count.load();
    // SIGUSR1 needs only the main thread (fd 0); a stop wakes the workers too.
    const int limit = signo == SIGUSR1 ? (count > 0 ? 1 : 0) : count;
    for (int k = 0; k < limit; ++k) {
        ssize_t ignored = write(g_wake_fds[k], &one, sizeof(one));
        (void)ignored;
    }
    errno = saved_errno;
}

void add_wake_fd(int fd) {
    const int n = g_wake_count.load();
    if (n >= kMaxWakeFds) return;
    g_wake_fds[n] = fd;
    g_wake_count.store(n + 1);
}

// Every client socket costs the engine a descriptor: take as many as the system lets one
// process have (root may raise its hard limit to fs.nr_open). Returns the soft limit now.
uint64_t raise_fd_limit() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return 1024;
    long nr_open = 0;
    if (FILE *file = std::fopen("/proc/sys/fs/nr_open", "re")) {
        if (std::fscanf(file, "%ld", &nr_open) != 1) nr_open = 0;
        std::fclose(file);
    }
    if (nr_open > 0 && limit.rlim_max < static_cast<rlim_t>(nr_open)) {
        const rlimit raised{static_cast<rlim_t>(nr_open), static_cast<rlim_t>(nr_open)};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
    }
    if (limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &limit) != 0) getrlimit(RLIMIT_NOFILE, &limit);
    }
    return limit.rlim_cur == RLIM_INFINITY ? uint64_t{1} << 20 : limit.rlim_cur;
}

// Half of the machine's memory, in bytes (what the engine lets its clients' rings take).
uint64_t default_memory_budget() {
    uint64_t kib = 0;
    if (FILE *file = std::fopen("/proc/meminfo", "re")) {
        unsigned long long value = 0;
        if (std::fscanf(file, "MemTotal: %llu kB", &value) == 1) kib = value;
        std::fclose(file);
    }
    return kib > 0 ? kib * 1024 / 2 : uint64_t{1} << 30;
}

// Descriptors the engine keeps for itself (its io_urings, eventfds, listeners, /proc reads).
constexpr uint64_t kReservedFds = 256;

// A control connection that has not said hello (or join) yet. Pending connections are
// shared between uids (pending_by_uid_); once it says hello, its descriptor counts against
// its uid's share of the engine.
struct PendingHello {
    int fd;
    uint64_t deadline_ns;
    ClientCreds creds;
};

class Engine {
  public:
    explicit Engine(const Options &options) : options_(options) {}
    ~Engine();
    int run();

  private:
    bool start_workers();
    void accept_clients();
    // Returns false when the connection is finished with (closed or handed over).
    bool on_hello_readable(PendingHello &hello);
    void start_session(PendingHello &hello);
    // Gives a shard of the new session to every worker but its home (several --cores).
    void share_family(Session &home, Worker *home_worker);
    void forget_freed_sessions();
    void reply_hello_error(int fd, int error);
    // Closes a pending connection that goes nowhere, and gives back its share.
    void drop_hello(PendingHello &hello);
    void join_session(PendingHello &hello, const ipc::ControlMessage &msg);
    // A relay's session (--fabric-listen): a client on another host (remote.hpp).
    void start_remote_session(int fd, const LinkHello &hello);
    void log_stats();
    // The elastic engine's window (--min-workers): which workers take new connections.
    void rebalance(uint64_t now);
    // Drops parked bytes nobody claimed in time (engine/parked.hpp), saying so.
    void expire_parked(uint64_t now);
    // The least loaded of the workers that take new families.
    Worker *pick_home();
    void stop_workers();

    Options options_;
    std::string path_;
    int listener_ = -1;
    ino_t inode_ = 0;
    int wake_fd_ = -1;
    uint32_t next_session_id_ = 1;
    std::vector<std::unique_ptr<Worker>> workers_;
    std::vector<PendingHello> hellos_;
    // Pending connections by uid: one uid may hold at most half of what others leave of
    // kMaxPendingHellos, so a client that connects and says nothing cannot lock others out.
    std::unordered_map<uid_t, uint32_t> pending_by_uid_;
    // Which worker serves each session, for forked children joining it. Ids are never reused;
    // a session leaves once its worker has freed it (forget_freed_sessions), and a join for a
    // session that has ended is refused, here or by the worker.
    std::unordered_map<uint32_t, Worker *> session_workers_;
    std::vector<uint32_t> freed_scratch_;
    LinkAcceptor links_;
    std::unique_ptr<Elasticity> elastic_;  // null unless --min-workers
    uint64_t next_rebalance_ns_ = UINT64_MAX;
};

Engine::~Engine() {
    for (PendingHello &hello : hellos_) drop_hello(hello);
    if (listener_ >= 0) close(listener_);
    if (wake_fd_ >= 0) close(wake_fd_);
}

bool Engine::start_workers() {
    std::vector<int> cores = options_.cores;
    if (cores.empty()) cores.push_back(-1);
    for (size_t k = 0; k < cores.size(); ++k) {
        WorkerConfig config;
        config.index = static_cast<int>(k);
        config.core = cores[k];
        config.spin_us = options_.spin_us;
        config.handoff_load = options_.handoff_load;
        config.ask_back_at_once = options_.ask_back_at_once;
        config.send_zc = options_.send_zc;
        config.busy_poll = options_.busy_poll;
        if (links_.is_open()) {
            config.fabric = true;
            config.fabric_config = ipc::FabricConfig::from_env();
            config.fabric_config.node = options_.fabric_node;
            if (config.fabric_config.node.empty()) {
                sockaddr_storage addr{};
                socklen_t len = 0;
                if (parse_link_address(options_.fabric_listen, addr, len))
                    config.fabric_config.node = numeric_host(addr, len);
            }
        }
        auto worker = std::make_unique<Worker>(config, g_stop);
        // The elastic engine starts with its minimum; the others are parked until needed.
        if (elastic_) worker->set_active(static_cast<int>(k) < elastic_->active());
        const std::string error = worker->init();
        if (!error.empty()) {
            log_line("worker %zu: %s", k, error.c_str());
            return false;
        }
        add_wake_fd(worker->doorbell_fd());
        workers_.push_back(std::move(worker));
    }
    // Workers never take signals: the handler runs on this thread and wakes them.
    sigset_t blocked, previous;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &blocked, &previous);
    bool ok = true;
    for (auto &worker : workers_) {
        const std::string error = worker->start();
        if (!error.empty()) {
            log_line("%s", error.c_str());
            ok = false;
            break;
        }
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    return ok;
}

void Engine::stop_workers() {
    g_stop.store(true);
    const uint64_t one = 1;
    for (auto &worker : workers_) {
        ssize_t ignored = write(worker->doorbell_fd(), &one, sizeof(one));
        (void)ignored;
    }
    for (auto &worker : workers_) worker->join();
}

Worker *Engine::pick_home() {
    Worker *best = nullptr;
    for (auto &worker : workers_)
        if (worker->active() && (!best || worker->load() < best->load())) best = worker.get();
    return best ? best : workers_.front().get();
}

void Engine::rebalance(uint64_t now) {
    std::vector<int> busy;
    for (auto &worker : workers_) busy.push_back(worker->busy_percent(now));
    const int before = elastic_->active();
    const int active = elastic_->update(busy);
    if (active == before) return;
    for (size_t k = 0; k < workers_.size(); ++k)
        workers_[k]->set_active(static_cast<int>(k) < active);
    TCPS_LOG_VERBOSE("engine: %d of %zu workers take new connections (busy %d%% %d%%...)", active,
                     workers_.size(), busy[0], busy.size() > 1 ? busy[1] : 0);
}

void Engine::expire_parked(uint64_t now) {
    uint64_t bytes = 0;
    const size_t count = parked_bytes().expire(now, bytes);
    if (count > 0)
        log_line(
            "engine: %llu bytes received on %zu sockets passed on with SCM_RIGHTS were not "
            "read by the sender and never claimed by a receiver with tcps within %llu s: "
            "dropped",
            static_cast<unsigned long long>(bytes), count,
            static_cast<unsigned long long>(kParkedLifetimeNs / 1'000'000'000));
    if (const size_t connections = parked_connections().expire(now); connections > 0)
        log_line(
            "engine: %zu connections accepted on listeners passed on with SCM_RIGHTS were not "
            "taken by the sender and never claimed by a receiver with tcps within %llu s: reset",
            connections, static_cast<unsigned long long>(kParkedLifetimeNs / 1'000'000'000));
}

void Engine::log_stats() {
    forget_freed_sessions();
    log_line("engine: %zu sessions known by id", session_workers_.size());
    for (size_t k = 0; k < workers_.size(); ++k) {
        const WorkerStats &st = workers_[k]->stats();
        char zerocopy[64] = "unsupported";
        if (workers_[k]->zerocopy())
            std::snprintf(zerocopy, sizeof(zerocopy), "%llu copied %llu",
                          static_cast<unsigned long long>(st.zerocopy_out.load()),
                          static_cast<unsigned long long>(st.zerocopy_copied.load()));
        log_line(
            "worker %zu: sessions %llu (%llu total), sockets %llu, accepts %llu, kernel-served "
            "%llu, "
            "bytes in %llu out %llu (direct in %llu out %llu, zero-copy out %s), rings grown tx "
            "%llu rx %llu, receives across the wrap %llu, ring SEND_ZC sends %llu copied %llu "
            "bytes %llu, passed-on bytes parked "
            "%llu adopted sockets %llu served %llu, listeners adopted %llu (on demand %llu), "
            "untaken connections "
            "parked %llu unparked %llu, "
            "live connections asked back %llu shed %llu, listener twins %llu steered to %llu "
            "ready %llu parked %llu, violations %llu, busy %llu%%%s%s",
            k, static_cast<unsigned long long>(st.sessions.load()),
            static_cast<unsigned long long>(st.sessions_total.load()),
            static_cast<unsigned long long>(st.sockets.load()),
            static_cast<unsigned long long>(st.accepts.load()),
            static_cast<unsigned long long>(st.kernel_served.load()),
            static_cast<unsigned long long>(st.bytes_in.load()),
            static_cast<unsigned long long>(st.bytes_out.load()),
            static_cast<unsigned long long>(st.direct_in.load()),
            static_cast<unsigned long long>(st.direct_out.load()), zerocopy,
            static_cast<unsigned long long>(st.tx_rings_grown.load()),
            static_cast<unsigned long long>(st.rx_rings_grown.load()),
            static_cast<unsigned long long>(st.wrapped_recvs.load()),
            static_cast<unsigned long long>(st.ring_zc_sends.load()),
            static_cast<unsigned long long>(st.ring_zc_copied.load()),
            static_cast<unsigned long long>(st.ring_zc_bytes.load()),
            static_cast<unsigned long long>(st.parked_bytes.load()),
            static_cast<unsigned long long>(st.adopted.load()),
            static_cast<unsigned long long>(st.unparked_bytes.load()),
            static_cast<unsigned long long>(st.adopted_listeners.load()),
            static_cast<unsigned long long>(st.on_demand_listeners.load()),
            static_cast<unsigned long long>(st.parked_connections.load()),
            static_cast<unsigned long long>(st.unparked_connections.load()),
            static_cast<unsigned long long>(st.shed_asked.load()),
            static_cast<unsigned long long>(st.shed.load()),
            static_cast<unsigned long long>(st.twins.load()),
            static_cast<unsigned long long>(st.twin_steers.load()),
            static_cast<unsigned long long>(st.twin_ready.load()),
            static_cast<unsigned long long>(st.twin_parked.load()),
            static_cast<unsigned long long>(st.violations.load()),
            static_cast<unsigned long long>(st.load_percent.load()),
            workers_[k]->saturated() ? " (saturated)" : "",
            workers_[k]->active() ? "" : " (parked)");
    }
}

void Engine::accept_clients() {
    for (int k = 0; k < 64; ++k) {
        PendingHello hello;
        hello.fd = accept_control_client(listener_, hello.creds);
        if (hello.fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                log_line("accept on the control socket: %s", std::strerror(errno));
            return;
        }
        const uid_t uid = hello.creds.uid;
        uint32_t &pending = pending_by_uid_[uid];
        int refused = 0;
        if ((uid != geteuid() && !within_share(pending, hellos_.size(), 1, kMaxPendingHellos)) ||
            hellos_.size() >= kMaxPendingHellos)
            refused = -EAGAIN;
        if (refused != 0) {
            TCPS_LOG_VERBOSE("client pid %d uid %u: refused: %s", hello.creds.pid, uid,
                             std::strerror(-refused));
            if (pending == 0) pending_by_uid_.erase(uid);
            reply_hello_error(hello.fd, refused);
            close(hello.fd);
            continue;
        }
        ++pending;
        hello.deadline_ns = monotonic_ns() + kHelloTimeoutNs;
        hellos_.push_back(hello);
    }
}

void Engine::drop_hello(PendingHello &hello) {
    if (hello.fd < 0) return;
    close(hello.fd);
    hello.fd = -1;
}

static void reply_join_error(int fd, int error) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kJoinReply);
    reply.version = ipc::kLayoutVersion;
    reply.result = error;
    ipc::send_control(fd, reply, nullptr, 0);
}

void Engine::reply_hello_error(int fd, int error) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kHelloReply);
    reply.version = ipc::kLayoutVersion;
    reply.result = error;
    ipc::send_control(fd, reply, nullptr, 0);
}

bool Engine::on_hello_readable(PendingHello &hello) {
    ipc::ControlMessage msg;
    int unused_fd = -1;
    // A hello carries no descriptors: any sent along are closed and the message refused.
    const int rc = ipc::recv_control(hello.fd, msg, &unused_fd, 0, MSG_DONTWAIT);
    if (rc == -EAGAIN || rc == -EWOULDBLOCK) return true;
    if (rc == -ECONNRESET) {
        drop_hello(hello);
        return false;
    }
    if (rc == 0 && msg.type == static_cast<uint32_t>(ipc::ControlType::kJoin) &&
        msg.version == ipc::kLayoutVersion) {
        join_session(hello, msg);
        return false;
    }
    if (rc < 0 || msg.type != static_cast<uint32_t>(ipc::ControlType::kHello) ||
        msg.version != ipc::kLayoutVersion) {
        TCPS_LOG_VERBOSE("client pid %d: bad hello (%s), refused", hello.creds.pid,
                         rc < 0 ? std::strerror(-rc) : "type or version");
        reply_hello_error(hello.fd, -EPROTONOSUPPORT);
        drop_hello(hello);
        return false;
    }
    start_session(hello);
    return false;
}

void Engine::start_session(PendingHello &hello) {
    auto session = std::make_unique<Session>();
    session->creds = hello.creds;
    const uint32_t id = next_session_id_++;
    // The session's descriptors and its first member's connection.
    int rc = quotas().charge(hello.creds.uid, kSessionFds + 1, kSessionBytes);
    if (rc == 0) {
        session->charged = hello.creds.uid;
        session->members[0].control_charged = hello.creds.uid;
        rc = create_region(*session, id, false);
    }
    if (rc != 0) {
        log_line("client pid %d uid %u: no session: %s", hello.creds.pid, hello.creds.uid,
                 std::strerror(-rc));
        reply_hello_error(hello.fd, rc);
        drop_hello(hello);
        return;
    }
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kHelloReply);
    reply.version = ipc::kLayoutVersion;
    reply.result = 0;
    reply.session_id = id;
    const int fds[2] = {session->memfd, session->doorbell_fd};
    const int sent = ipc::send_control(hello.fd, reply, fds, 2);
    if (sent != 0) {
        TCPS_LOG_VERBOSE("client pid %d: hello reply failed: %s", hello.creds.pid,
                         std::strerror(-sent));
        drop_hello(hello);
        return;
    }
    session->members[0].control_fd = hello.fd;
    hello.fd = -1;  // the session's now
    forget_freed_sessions();
    Worker *best = pick_home();
    session_workers_[id] = best;
    TCPS_LOG_VERBOSE("session %u: pid %d uid %u gid %u caps %#llx", id, hello.creds.pid,
                     hello.creds.uid, hello.creds.gid,
                     static_cast<unsigned long long>(hello.creds.caps));
    if (workers_.size() > 1) share_family(*session, best);
    best->adopt(std::move(session));
}

void Engine::share_family(Session &home, Worker *home_worker) {
    // Every worker serves the family (Family, session.hpp): the one chosen is its home, each
    // other one gets a shard of its own over the same region. The shards are handed over
    // before the home, so each is in its worker's inbox before any message about it.
    auto family = std::make_shared<Family>();
    family->workers.push_back(home_worker);
    family->next_chunk = home.chunks_active;
    for (uint32_t chunk : home.owned_chunks) family->chunk_owner[chunk].store(0);
    home.family = family;
    std::vector<std::unique_ptr<Session>> shards;
    for (auto &worker : workers_) {
        if (worker.get() == home_worker) continue;
        auto shard = std::make_unique<Session>();
        shard->id = home.id;
        shard->creds = home.creds;
        shard->family_token = home.family_token;
        shard->family = family;
        shard->memfd = fcntl(home.memfd, F_DUPFD_CLOEXEC, 0);
        void *base = shard->memfd < 0 ? MAP_FAILED
                                      : mmap(nullptr, ipc::kChunksOffset, PROT_READ | PROT_WRITE,
                                             MAP_SHARED | MAP_NORESERVE, shard->memfd, 0);
        if (base == MAP_FAILED) {
            // That worker serves none of this family's connections: the others do.
            log_line("session %u: no shard on a worker: %s", home.id, std::strerror(errno));
            continue;
        }
        shard->region.map_contiguous(static_cast<uint8_t *>(base), 0);
        shard->shard = static_cast<uint32_t>(family->workers.size());
        family->workers.push_back(worker.get());
        shards.push_back(std::move(shard));
    }
    for (auto &shard : shards) family->workers[shard->shard]->adopt(std::move(shard));
    // The home serves the family's control and its own sockets: the first connection its
    // listeners accept goes to the next worker.
    home.next_shard = family->workers.size() > 1 ? 1 : 0;
    if (family->workers.size() == 1) home.family.reset();
}

// The workers' freed sessions leave session_workers_ here, so it holds live sessions only
// (plus those freed since the last hello) however many sessions the engine has served.
void Engine::forget_freed_sessions() {
    freed_scratch_.clear();
    for (auto &worker : workers_) worker->take_freed_sessions(freed_scratch_);
    for (uint32_t id : freed_scratch_) session_workers_.erase(id);
}

void Engine::join_session(PendingHello &hello, const ipc::ControlMessage &msg) {
    // The session's worker checks the token and the reservation; here only where it lives.
    const auto found = session_workers_.find(msg.session_id);
    if (found == session_workers_.end()) {
        TCPS_LOG_VERBOSE("client pid %d: join of unknown session %u refused", hello.creds.pid,
                         msg.session_id);
        reply_join_error(hello.fd, -ENOENT);
        drop_hello(hello);
        return;
    }
    // The member's connection counts against its uid from now on (the worker gives it back
    // if it refuses the join).
    if (const int rc = quotas().charge(hello.creds.uid, 1, 0); rc != 0) {
        reply_join_error(hello.fd, rc);
        drop_hello(hello);
        return;
    }
    JoinRequest join;
    join.session_id = msg.session_id;
    join.member = static_cast<uint32_t>(msg.arg);
    join.token = msg.token;
    join.control_fd = hello.fd;
    join.creds = hello.creds;
    found->second->adopt_join(join);
}

void Engine::start_remote_session(int fd, const LinkHello &hello) {
    const uint32_t id = next_session_id_++;
    std::unique_ptr<Session> session = make_remote_session(fd, hello, id);
    if (!session) return;
    forget_freed_sessions();  // remote sessions are freed too: keep the workers' lists short
    Worker *best = pick_home();
    TCPS_LOG_VERBOSE("session %u: remote, pid %d uid %u gid %u caps %#llx (from the relay)", id,
                     hello.pid, hello.uid, hello.gid, static_cast<unsigned long long>(hello.caps));
    best->adopt(std::move(session));
}

int Engine::run() {
    const uint64_t fd_limit = raise_fd_limit();
    const uint64_t client_fds = options_.max_fds > 0 ? options_.max_fds : fd_limit;
    const uint64_t bytes =
        options_.max_memory_mb > 0 ? options_.max_memory_mb << 20 : default_memory_budget();
    if (client_fds > fd_limit || client_fds <= kReservedFds) {
        log_line("--max-fds %llu: the engine may open %llu descriptors",
                 static_cast<unsigned long long>(client_fds),
                 static_cast<unsigned long long>(fd_limit));
        return 1;
    }
    quotas().configure(client_fds - kReservedFds, bytes, geteuid());
    signal(SIGPIPE, SIG_IGN);
    path_ = options_.socket_path.empty() ? ipc::engine_socket_path() : options_.socket_path;

    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) {
        log_line("eventfd: %s", std::strerror(errno));
        return 1;
    }
    add_wake_fd(wake_fd_);
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGUSR1, &action, nullptr);

    std::string error;
    const ListenResult listened = open_control_socket(path_, listener_, inode_, error);
    if (listened != ListenResult::kOk) {
        log_line("%s", error.c_str());
        return 1;
    }
    if (!options_.fabric_listen.empty()) {
        error = links_.open(options_.fabric_listen);
        if (!error.empty()) {
            log_line("%s", error.c_str());
            unlink(path_.c_str());
            return 1;
        }
    }
    const size_t worker_count = options_.cores.empty() ? 1 : options_.cores.size();
    if (options_.min_workers > static_cast<int>(worker_count)) {
        log_line("--min-workers %d: there are only %zu workers (--cores)", options_.min_workers,
                 worker_count);
        unlink(path_.c_str());
        return 1;
    }
    if (options_.min_workers > 0 && options_.min_workers < static_cast<int>(worker_count)) {
        elastic_ =
            std::make_unique<Elasticity>(options_.min_workers, static_cast<int>(worker_count),
                                         options_.elastic_high, options_.elastic_low);
        next_rebalance_ns_ = monotonic_ns() + kRebalanceNs;
    }
    if (!start_workers()) {
        stop_workers();
        unlink(path_.c_str());
        return 1;
    }
    log_line("listening on %s with %zu worker%s", path_.c_str(), workers_.size(),
             workers_.size() == 1 ? "" : "s");
    if (elastic_)
        log_line("elastic: %d to %zu workers take new connections", elastic_->active(),
                 workers_.size());
    if (links_.is_open()) log_line("serving relays on %s", options_.fabric_listen.c_str());
    if (options_.ready_fd >= 0) {
        static const char kReady[] = "ready\n";
        ssize_t ignored = write(options_.ready_fd, kReady, sizeof(kReady) - 1);
        (void)ignored;
        close(options_.ready_fd);
    }

    std::vector<pollfd> fds;
    while (!g_stop.load()) {
        fds.clear();
        fds.push_back({wake_fd_, POLLIN, 0});
        fds.push_back({listener_, POLLIN, 0});
        uint64_t next_deadline = UINT64_MAX;
        for (const PendingHello &hello : hellos_) {
            fds.push_back({hello.fd, POLLIN, 0});
            next_deadline = std::min(next_deadline, hello.deadline_ns);
        }
        const size_t links_at = fds.size();
        links_.add_pollfds(fds);
        next_deadline = std::min(next_deadline, links_.next_deadline_ns());
        next_deadline = std::min(next_deadline, next_rebalance_ns_);
        // Parked bytes expire (expire_parked): look once a second while some wait.
        if (parked_bytes().entries() > 0 || parked_connections().entries() > 0)
            next_deadline = std::min(next_deadline, monotonic_ns() + 1'000'000'000);
        int timeout_ms = -1;
        if (next_deadline != UINT64_MAX) {
            const uint64_t now = monotonic_ns();
            timeout_ms =
                next_deadline <= now ? 0 : static_cast<int>((next_deadline - now) / 1'000'000 + 1);
        }
        const int ready = poll(fds.data(), fds.size(), timeout_ms);
        if (ready < 0 && errno != EINTR) {
            log_line("poll: %s", std::strerror(errno));
            break;
        }
        if (g_stop.load()) break;
        if (fds[0].revents & POLLIN) {
            uint64_t drained;
            ssize_t ignored = read(wake_fd_, &drained, sizeof(drained));
            (void)ignored;
        }
        if (g_dump_stats.exchange(false)) log_stats();
        expire_parked(monotonic_ns());
        if (elastic_ && monotonic_ns() >= next_rebalance_ns_) {
            const uint64_t now = monotonic_ns();
            rebalance(now);
            next_rebalance_ns_ = now + kRebalanceNs;
        }
        // Hellos first: the vector grows when clients are accepted below.
        const uint64_t now = monotonic_ns();
        std::vector<PendingHello> still_waiting;
        for (size_t k = 0; k < hellos_.size(); ++k) {
            PendingHello &hello = hellos_[k];
            const short revents = ready > 0 ? fds[k + 2].revents : 0;
            bool keep = true;
            if (revents & (POLLIN | POLLHUP | POLLERR)) keep = on_hello_readable(hello);
            if (keep && now >= hello.deadline_ns) {
                TCPS_LOG_VERBOSE("client pid %d: no hello within 2 s, dropped", hello.creds.pid);
                drop_hello(hello);
                keep = false;
            }
            if (keep) {
                still_waiting.push_back(hello);
            } else if (auto found = pending_by_uid_.find(hello.creds.uid);
                       found != pending_by_uid_.end() && --found->second == 0) {
                pending_by_uid_.erase(found);
            }
        }
        hellos_.swap(still_waiting);
        if (fds[1].revents & POLLIN) accept_clients();
        links_.on_poll(fds.data() + links_at, now,
                       [this](int fd, const LinkHello &hello) { start_remote_session(fd, hello); });
    }

    log_line("stopping");
    stop_workers();
    if (options_.verbose) log_stats();
    // Remove the socket file only if it is still ours.
    struct stat st;
    if (lstat(path_.c_str(), &st) == 0 && st.st_ino == inode_) unlink(path_.c_str());
    return 0;
}

}  // namespace

int run_engine(const Options &options) {
    Engine engine(options);
    return engine.run();
}

}  // namespace tcps::engine
