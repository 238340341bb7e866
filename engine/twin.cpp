// A listener's twin: seed 003's handoff at accept without a round trip (--handoff-load).
//
// A saturated worker should not touch the connections it leaves to the kernel: handing each
// over after accepting it (kFlagKernelServed, a control round trip) costs both sides more than
// serving it. So at a listener's first listen() the engine makes a second kernel listener on
// the same address, owned as the first (its owner, its network namespace, the options the
// application set), and puts both in one SO_REUSEPORT group: the engine's at index 0, the twin
// at 1. A one-instruction classic BPF program on the group returns the index the kernel hands
// each new connection to: 0 while the worker has room, 1 while it is saturated, changed only
// when the worker's LoadGauge flips. The application accepts the twin's connections itself
// with the kernel's accept4() on a descriptor of the twin (kHandoff with kHandoffTwin, once per
// process), as natively; the engine only watches the twin (one poll per time it fills) so that
// accept(), poll() and epoll see it readable (kFlagTwinReady).
//
// Only for a listener the application made through the engine and did not give SO_REUSEPORT
// itself (its own group would be steered too), only for a local session. The twin leaves the
// group when the listener stops: its waiting connections are reset at a close or shutdown, as
// Linux resets a closed listener's queue, and parked for the next owner at a hand-back
// (SCM_RIGHTS), as the engine's own untaken ones are. When the engine's end comes first, a
// process that holds the twin keeps it as its kernel listener (the shim's recover_listener()).
#include <fcntl.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "control.hpp"
#include "identity.hpp"
#include "log.hpp"
#include "parked.hpp"
#include "quota.hpp"
#include "worker.hpp"

namespace tcps::engine {

namespace {

constexpr uint32_t kEngineIndex = 0;  // the engine's listener joined the group first
constexpr uint32_t kTwinIndex = 1;
// A hand-back parks at most this many of the twin's waiting connections (a listen backlog's
// worth); the rest are reset with the twin.
constexpr int kMaxTwinParked = 4096;

// The group's program: every new connection goes to socket `index` of the group.
int steer_to(int fd, uint32_t index) {
    sock_filter code[] = {{BPF_RET | BPF_K, 0, 0, index}};
    sock_fprog prog{1, code};
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
}

int int_option(int fd, int level, int name) {
    int value = 0;
    socklen_t len = sizeof(value);
    return getsockopt(fd, level, name, &value, &len) == 0 ? value : 0;
}

void set_int_option(int fd, int level, int name, int value) {
    setsockopt(fd, level, name, &value, sizeof(value));
}

// What the application set without a request (posted: ipc::kPostedNoDelay, kPostedCork), which
// accepted connections inherit from their listener: copied from the listener.
void copy_posted_options(int from, int to) {
    set_int_option(to, IPPROTO_TCP, TCP_NODELAY, int_option(from, IPPROTO_TCP, TCP_NODELAY));
    set_int_option(to, IPPROTO_TCP, TCP_CORK, int_option(from, IPPROTO_TCP, TCP_CORK));
}

void reset_and_close(int fd) {
    const linger abortive{1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
    close(fd);
}

}  // namespace

bool Worker::prepare_twin(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!gauge_.enabled() || s.remote || es.twin_fd >= 0 || (es.flags & ipc::kFlagListening))
        return false;
    // The application's own group: its sockets' order and its program are its own.
    if (int_option(es.fd, SOL_SOCKET, SO_REUSEPORT) != 0) return false;
    set_int_option(es.fd, SOL_SOCKET, SO_REUSEPORT, 1);
    return true;
}

void Worker::make_twin(Session &s, uint32_t i, int backlog) {
    EngineSlot &es = s.slots[i];
    sockaddr_storage local;
    socklen_t local_len = sizeof(local);
    int twin = -1;
    const char *step = "the owner's share of the engine";
    // A descriptor of the engine's, as a socket is: counted against the owner's share.
    int error = -quotas().charge(es.quota_uid, 1, kSocketBytes);
    bool ok = error == 0;
    const bool charged = ok;
    if (ok) {
        step = "the group's program";
        // Before the twin joins: no connection may reach the twin unwatched.
        ok = steer_to(es.fd, kEngineIndex) == 0;
    }
    if (ok) {
        step = "socket";
        twin = create_socket_like(es.fd, es.family);
        ok = twin >= 0;
    }
    if (ok && es.listener_options) {
        // As the application set them, in its order (IPV6_V6ONLY, SO_BINDTODEVICE, ... must
        // precede the bind). One the kernel now refuses is left out, as on hand-back.
        for (const ListenerOption &option : *es.listener_options)
            setsockopt(twin, option.level, option.name, option.value.data(),
                       static_cast<socklen_t>(option.value.size()));
    }
    if (ok) {
        copy_posted_options(es.fd, twin);
        set_int_option(twin, SOL_SOCKET, SO_REUSEPORT, 1);
        step = "bind";
        ok = getsockname(es.fd, reinterpret_cast<sockaddr *>(&local), &local_len) == 0 &&
             bind(twin, reinterpret_cast<sockaddr *>(&local), local_len) == 0;
    }
    if (ok) {
        step = "listen";
        ok = listen(twin, backlog) == 0;
    }
    if (!ok) {
        if (error == 0) error = errno;
        log_line(
            "worker %d: session %u slot %u: no twin for the listener (%s: %s); a saturated "
            "engine hands its connections over one by one",
            config_.index, s.id, i, step, std::strerror(error));
        if (twin >= 0) close(twin);
        if (charged) quotas().release(es.quota_uid, 1, kSocketBytes);
        setsockopt(es.fd, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, nullptr, 0);
        set_int_option(es.fd, SOL_SOCKET, SO_REUSEPORT, 0);
        return;
    }
    es.twin_fd = twin;
    es.twin_steered = false;
    es.twin_drained = s.region.slot(i).twin_drained.load(std::memory_order_acquire);
    stats_.twins.fetch_add(1, std::memory_order_relaxed);
    steer_twin(s, i);
    watch_twin(s, i);
}

void Worker::steer_twin(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    const bool to_twin = twins_wanted(s);
    if (es.twin_fd < 0 || es.on_demand || es.twin_steered == to_twin) return;
    if (steer_to(es.fd, to_twin ? kTwinIndex : kEngineIndex) != 0) {
        log_line("worker %d: session %u slot %u: steering the listener's group: %s", config_.index,
                 s.id, i, std::strerror(errno));
        return;
    }
    es.twin_steered = to_twin;
    if (to_twin) stats_.twin_steers.fetch_add(1, std::memory_order_relaxed);
}

bool Worker::twins_wanted(const Session &s) const {
    if (!s.family) return gauge_.saturated();
    const std::vector<Worker *> &workers = s.family->workers;
    return family_saturated(
        static_cast<uint32_t>(workers.size()), [&](uint32_t k) { return workers[k]->active(); },
        [&](uint32_t k) { return workers[k]->saturated(); });
}

void Worker::steer_twins() {
    for (uint32_t index : active_) {
        Session *s = table_[index].get();
        if (!s || s->ending || s->remote) continue;
        for (uint32_t li : s->listeners) steer_twin(*s, li);
    }
}

void Worker::watch_twin(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.twin_fd < 0 || es.twin_watch_posted || (es.flags & ipc::kFlagTwinReady) ||
        es.state != ipc::SlotState::kOpen)
        return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    io_uring_prep_poll_add(sqe, es.twin_fd, POLLIN);
    track_op(s, i, sqe, Kind::kTwinWatch);
    es.twin_watch_posted = true;
}

void Worker::on_twin_watch(Session &s, uint32_t i, int32_t res) {
    EngineSlot &es = s.slots[i];
    es.twin_watch_posted = false;
    if (es.state != ipc::SlotState::kOpen) return maybe_finish_close(s, i);
    // A twin retired (the watch cancelled) and made again meanwhile (shutdown(SHUT_RD), then
    // listen()) is watched from now on.
    if (res == -ECANCELED || es.twin_fd < 0) return watch_twin(s, i);
    if (res < 0) {
        log_line("worker %d: session %u slot %u: watching the listener's twin: %s", config_.index,
                 s.id, i, std::strerror(-res));
        return schedule(s, i);  // watched again at the next tick
    }
    // Readable (or an error the client's accept4() reports, as the kernel's would): until a
    // client finds it empty, accept() looks there. A report older than this one is no report
    // of this readiness.
    ipc::SocketSlot &slot = s.region.slot(i);
    es.twin_drained = slot.twin_drained.load(std::memory_order_acquire);
    slot.twin_ready_at.store(es.twin_drained, std::memory_order_relaxed);
    publish_flags(s, i, es.flags | ipc::kFlagTwinReady);
    bump_event(s, i);
    stats_.twin_ready.fetch_add(1, std::memory_order_relaxed);
}

void Worker::twin_drained(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.flags & ipc::kFlagTwinReady) {
        publish_flags(s, i, es.flags & ~ipc::kFlagTwinReady);
        bump_event(s, i);
    }
    // Completes at once if another connection came meanwhile.
    watch_twin(s, i);
}

void Worker::retire_twin(Session &s, uint32_t i, bool park) {
    EngineSlot &es = s.slots[i];
    if (es.twin_fd < 0) return;
    if (es.on_demand) {
        // The listener itself: what waits in it is the kernel's queue, for whoever holds it.
        if (es.twin_watch_posted) cancel(s, i, Kind::kTwinWatch);
        close_twin(s, i);
        if (es.flags & ipc::kFlagTwinReady) publish_flags(s, i, es.flags & ~ipc::kFlagTwinReady);
        bump_event(s, i);
        return;
    }
    if (s.ending) {
        // The engine stops serving the family (its stop, a violation): a process that holds
        // the twin makes it its kernel listener, with what waits in it (the shim's
        // recover_listener()), so only our descriptor goes.
        if (es.twin_watch_posted) cancel(s, i, Kind::kTwinWatch);
        close_twin(s, i);
        return;
    }
    // From now on new connections reach only the listener (a handshake the kernel began on
    // the twin before this may still complete there, and is reset below).
    steer_to(es.fd, kEngineIndex);
    const int twin = es.twin_fd;
    if (park) {
        // Those waiting in it would have waited in the one queue Linux has: they go with the
        // listener to its next owner.
        for (int k = 0; k < kMaxTwinParked; ++k) {
            const int conn = accept4(twin, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (conn < 0) break;
            if (parked_connections().park(es.listener_cookie, conn, es.quota_uid, now_ns_) != 0) {
                reset_and_close(conn);
                ++es.untaken_lost;
                continue;
            }
            stats_.parked_connections.fetch_add(1, std::memory_order_relaxed);
            stats_.twin_parked.fetch_add(1, std::memory_order_relaxed);
        }
    }
    // tcp_disconnect() of a listener: it leaves the group and the kernel resets what still
    // waits in it, for every process that holds it (their accept() then fails with EINVAL).
    shutdown(twin, SHUT_RD);
    if (es.twin_watch_posted) cancel(s, i, Kind::kTwinWatch);
    close_twin(s, i);
    es.twin_steered = false;
    // The listener alone again, as the application made it.
    setsockopt(es.fd, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, nullptr, 0);
    set_int_option(es.fd, SOL_SOCKET, SO_REUSEPORT, 0);
    if (es.flags & ipc::kFlagTwinReady) publish_flags(s, i, es.flags & ~ipc::kFlagTwinReady);
    bump_event(s, i);
}

void Worker::serve_on_demand(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    // A second descriptor of the listener, as the twin's: charged as one.
    int copy = -1;
    if (quotas().charge(es.quota_uid, 1, kSocketBytes) == 0) {
        copy = fcntl(es.fd, F_DUPFD_CLOEXEC, 0);
        if (copy < 0) quotas().release(es.quota_uid, 1, kSocketBytes);
    }
    if (copy < 0) {
        // Without it the listener is served as any adopted one: accepted ahead.
        log_line(
            "worker %d: session %u slot %u: the inherited listener is accepted from ahead "
            "(no second descriptor of it)",
            config_.index, s.id, i);
        return;
    }
    es.on_demand = true;
    es.twin_fd = copy;
    es.twin_drained = s.region.slot(i).twin_drained.load(std::memory_order_acquire);
    publish_flags(s, i, es.flags | ipc::kFlagAcceptOnDemand);
    stats_.on_demand_listeners.fetch_add(1, std::memory_order_relaxed);
    watch_twin(s, i);
}

void Worker::close_twin(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.twin_fd < 0) return;
    close(es.twin_fd);
    es.twin_fd = -1;
    quotas().release(es.quota_uid, 1, kSocketBytes);
}

void Worker::give_twin(Session &s, uint32_t member, uint32_t i) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kHandoffReply);
    reply.version = ipc::kLayoutVersion;
    reply.session_id = s.id;
    int copy = -1;
    if (!s.region.mapped(i) || s.slots[i].state != ipc::SlotState::kOpen || s.slots[i].twin_fd < 0)
        reply.result = -ENOENT;
    else if ((copy = fcntl(s.slots[i].twin_fd, F_DUPFD_CLOEXEC, 0)) < 0)
        reply.result = errno == EMFILE ? -ENFILE : -errno;  // ours is, to the client, the system's
    deliver_handoff(s, member, reply, copy);
}

void Worker::note_listener_option(Session &s, uint32_t i, int level, int name, const void *value,
                                  uint32_t len) {
    EngineSlot &es = s.slots[i];
    if (es.on_demand) return;  // the listener itself: the option is set on it already
    if (!gauge_.enabled() || s.remote || (es.flags & (ipc::kFlagConnected | ipc::kFlagConnecting)))
        return;
    if (level == SOL_SOCKET &&
        (name == SO_REUSEPORT || name == SO_ATTACH_REUSEPORT_CBPF ||
         name == SO_ATTACH_REUSEPORT_EBPF || name == SO_DETACH_REUSEPORT_BPF)) {
        // The application makes a group of its own: the twin leaves it (what waits in it is
        // reset, as a listener's queue is at its close).
        retire_twin(s, i, false);
        return;
    }
    if (es.twin_fd >= 0) setsockopt(es.twin_fd, level, name, value, len);
    if (es.flags & ipc::kFlagListening) return;  // only what precedes a twin's making
    if (!es.listener_options) es.listener_options = std::make_unique<std::vector<ListenerOption>>();
    auto &options = *es.listener_options;
    const auto *bytes = static_cast<const uint8_t *>(value);
    for (ListenerOption &option : options) {
        if (option.level == level && option.name == name) {
            option.value.assign(bytes, bytes + len);
            return;
        }
    }
    // Distinct options are few (decide_setsockopt's list); a bound all the same.
    if (options.size() < 64)
        options.push_back({level, name, std::vector<uint8_t>(bytes, bytes + len)});
}

}  // namespace tcps::engine
