// Remote sessions: the worker's side (see remote.hpp), and the main thread's acceptor of relays.
#include "remote.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include "clock.hpp"
#include "fence.hpp"
#include "log.hpp"
#include "session.hpp"
#include "worker.hpp"

namespace tcps::engine {

namespace {

// How long an ended remote session waits for its last publishes to complete before its
// region is abandoned (kept mapped, never reused) so that nothing can land in freed memory.
constexpr uint64_t kReleaseTimeoutNs = 5'000'000'000;
constexpr uint64_t kLinkHelloTimeoutNs = 2'000'000'000;
constexpr size_t kMaxPendingLinks = 256;
constexpr uint32_t kNoSession = UINT32_MAX;

constexpr size_t kLine1Offset = offsetof(ipc::SocketSlot, tx_head);
constexpr size_t kResponseOffset = offsetof(ipc::SocketSlot, response);
constexpr size_t kAddressesOffset = offsetof(ipc::SocketSlot, local_addr);
constexpr size_t kAcceptRingOffset = offsetof(ipc::SocketSlot, accept_ring);
constexpr size_t kClaimOffset = offsetof(ipc::SocketSlot, claim);
constexpr size_t kHoldersOffset = offsetof(ipc::SocketSlot, holders);
constexpr size_t kRxLockOwnerOffset = offsetof(ipc::SocketSlot, rx_lock_owner);
static_assert(offsetof(ipc::SocketSlot, peer_addr) ==
                  kAddressesOffset + sizeof(ipc::SockAddrRecord),
              "the two addresses are one range");
static_assert(offsetof(ipc::SocketSlot, rx_lock) == kHoldersOffset + 4 &&
                  offsetof(ipc::SocketSlot, tx_lock) == kHoldersOffset + 8 &&
                  offsetof(ipc::SocketSlot, req_lock) == kHoldersOffset + 12 &&
                  kRxLockOwnerOffset == kHoldersOffset + 16 &&
                  offsetof(ipc::SocketSlot, req_lock_owner) == kHoldersOffset + 24,
              "holders, then the locks, then their owners");

}  // namespace

// ---------------------------------------------------------------------------------------------
// The worker's side

std::string Worker::open_fabric() {
    ipc::FabricConfig config = config_.fabric_config;
    config.max_tag = kLinkMaxTag;
    const int rc = ipc::FabricEndpoint::open(config, fabric_);
    if (rc < 0)
        return std::string("fabric endpoint (") + config.provider + " on " +
               (config.node.empty() ? "any address" : config.node) + "): " + std::strerror(-rc);
    return {};
}

bool Worker::attach_remote(Session &s) {
    RemoteLink &link = *s.remote;
    uint32_t region = 0;
    int rc = fabric_ ? fabric_->register_region(s.region.base, ipc::kRemoteRegionBytes, region)
                     : -EPROTONOSUPPORT;
    if (rc == 0 && (rc = fabric_->connect_region(region, link.peer)) < 0)
        fabric_->unregister_region(region);
    LinkReply reply{};
    reply.magic = kLinkMagic;
    reply.version = kLinkVersion;
    reply.session_id = s.id;
    if (rc == 0) rc = fabric_->bootstrap_info(region, reply.fabric);
    reply.result = rc;
    // Small and the first bytes on a fresh connection: all of it fits in the socket buffer.
    const ssize_t sent = send(link.link_fd, &reply, sizeof(reply), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (rc == 0 && sent != static_cast<ssize_t>(sizeof(reply))) {
        rc = sent < 0 ? -errno : -EPROTO;
        fabric_->unregister_region(region);
    }
    if (rc != 0) {
        log_line("session %u (remote pid %d): %s", s.id, s.creds.pid, std::strerror(-rc));
        return false;
    }
    link.attached = true;
    link.region = region;
    link.publisher.attach(fabric_.get(), region, s.region.base);
    if (fabric_owners_.size() <= region) fabric_owners_.resize(region + 1);
    fabric_owners_[region] = {s.index, s.gen};
    post_link_poll(s);
    TCPS_LOG_VERBOSE("session %u: remote client (pid %d on the relay's host), fabric region %u",
                     s.id, s.creds.pid, region);
    return true;
}

bool Worker::poll_fabric() {
    bool work = false;
    // Bounded: a few rounds, so one busy relay cannot hold the loop.
    for (int round = 0; round < 4; ++round) {
        const int n = fabric_->progress(
            [this](uint32_t region, uint32_t tag) { on_fabric_tag(region, tag); });
        if (n < 0) {
            log_line("worker %d: fabric completion queue: %s", config_.index, std::strerror(-n));
            break;
        }
        if (n == 0) break;
        work = true;
    }
    for (size_t k = 0; k < active_.size(); ++k) {
        Session *s = table_[active_[k]].get();
        if (!s || !s->remote || !s->remote->attached || s->remote->publisher.drained()) continue;
        if (s->remote->publisher.flush() != 0 && !s->ending) {
            s->remote->peer_gone = true;  // the mirror is broken: nothing more goes out
            end_session(*s, "its fabric publishes failed");
        }
    }
    return work;
}

void Worker::on_fabric_tag(uint32_t region, uint32_t tag) {
    if (region >= fabric_owners_.size() || fabric_owners_[region].session_index == kNoSession)
        return;
    Session *s = table_[fabric_owners_[region].session_index].get();
    if (!s || s->gen != fabric_owners_[region].session_gen || !s->remote || s->ending) return;
    if (tag == ipc::kFabricRegionFailed) {
        s->remote->peer_gone = true;
        return end_session(*s, "its fabric link failed");
    }
    if (tag < kRemoteSlots) return process_slot(*s, tag);
    if (tag == kTagMemberGone) return end_member(*s, 0, "the client process ended (relay)");
    violation(*s, "unexpected fabric tag %u", tag);
}

void Worker::note_remote_init(Session &s, uint32_t i) {
    s.remote->slots[i].init_pending = true;
    mark_changed(s, i);
}

void Worker::publish_remote(Session &s) {
    if (s.ending || !s.remote->attached) return;
    // Accepted connections (engine slots) before the listeners (client slots) whose accept
    // rings name them: the client must find a connection complete when it takes its index.
    for (int pass = 0; pass < 2; ++pass) {
        for (uint32_t i : s.changed)
            if ((i >= ipc::kClientSlots) == (pass == 0)) publish_remote_slot(s, i);
    }
    if (s.remote->publisher.error() != 0) {
        s.remote->peer_gone = true;  // the mirror is broken: nothing more goes out
        end_session(s, "its fabric publishes failed");
    }
}

void Worker::publish_remote_slot(Session &s, uint32_t i) {
    RemoteLink &link = *s.remote;
    PublishedSlot &published = link.slots[i];
    RegionPublisher &out = link.publisher;
    const size_t slot_at = slot_offset(i);
    ipc::SocketSlot &slot = s.region.slot(i);
    const EngineSlot &es = s.slots[i];

    if (published.init_pending) {
        // The client-side words init_slot() reset, before anything that tells the client the
        // socket is there. A client slot's request lock is held by the thread waiting for our
        // kSocket answer: it stays the client's.
        published.init_pending = false;
        out.publish(slot_at, offsetof(ipc::SocketSlot, doorbell_queued));
        if (i < ipc::kClientSlots) {
            out.publish(slot_at + kHoldersOffset, 12);
            out.publish(slot_at + kRxLockOwnerOffset, 8);
        } else {
            out.publish(slot_at + kHoldersOffset, 28);
        }
        out.notify(kTagSlotInit + i);
        published.rx_tail = 0;
        published.acc_tail = 0;
    }
    // Ring bytes and accept entries before the indices that cover them.
    const uint32_t rx_tail = slot.rx_tail.load(std::memory_order_relaxed);
    if (rx_tail != published.rx_tail) {
        if (es.state != ipc::SlotState::kFree && rx_tail - published.rx_tail <= ipc::kRingBytes)
            out.publish_ring(ipc::rx_ring_offset(i), ipc::kRingBytes, published.rx_tail, rx_tail);
        published.rx_tail = rx_tail;
    }
    const uint32_t acc_tail = slot.acc_tail.load(std::memory_order_relaxed);
    if (acc_tail != published.acc_tail) {
        const uint32_t count = acc_tail - published.acc_tail;
        if (count <= ipc::kAcceptRingEntries) {
            const uint32_t at = published.acc_tail & (ipc::kAcceptRingEntries - 1);
            const uint32_t first = std::min(count, ipc::kAcceptRingEntries - at);
            out.publish(slot_at + kAcceptRingOffset + at * 4, first * 4);
            if (count > first) out.publish(slot_at + kAcceptRingOffset, (count - first) * 4);
        }
        published.acc_tail = acc_tail;
    }
    const uint32_t resp_seq = slot.resp_seq.load(std::memory_order_relaxed);
    if (resp_seq != published.resp_seq) {
        const uint32_t opt_len = std::min<uint32_t>(slot.response.opt_len, ipc::kOptMax);
        const size_t len = offsetof(ipc::Response, opt) + ((opt_len + 3) & ~3u);
        out.publish(slot_at + kResponseOffset, len);
        published.resp_seq = resp_seq;
    }
    if (std::memcmp(published.addresses, &slot.local_addr, sizeof(published.addresses)) != 0) {
        std::memcpy(published.addresses, &slot.local_addr, sizeof(published.addresses));
        out.publish(slot_at + kAddressesOffset, sizeof(published.addresses));
    }
    // Line 1 last, with the tag: the relay wakes the slot's waiters once all of it is there.
    const auto state = static_cast<uint32_t>(es.state);
    const bool freed = es.state == ipc::SlotState::kFree &&
                       published.state != static_cast<uint32_t>(ipc::SlotState::kFree);
    if (freed && i < ipc::kClientSlots) {
        // The claim goes back only after the client can see the slot free (layout.hpp).
        out.publish(slot_at + kLine1Offset, ipc::kCacheLine);
        out.publish(slot_at + kClaimOffset, 4, i);
    } else {
        out.publish(slot_at + kLine1Offset, ipc::kCacheLine, i);
    }
    published.state = state;
}

void Worker::end_remote(Session &s) {
    RemoteLink &link = *s.remote;
    if (link.attached && !link.releasing) {
        // engine_alive = 0 is already in our copy: pass it on, then say so (unless nobody is
        // there to hear it).
        if (!link.peer_gone) {
            link.publisher.publish(kEngineAliveOffset, 4);
            link.publisher.notify(kTagSessionEnd);
        }
        link.releasing = true;
        link.release_deadline_ns = monotonic_ns() + kReleaseTimeoutNs;
        ++remote_releasing_;
    }
    // The relay learns it from the fabric or from the EOF, whichever comes first; this also
    // completes our poll on the link.
    if (link.link_fd >= 0) shutdown(link.link_fd, SHUT_RDWR);
}

bool Worker::remote_released(Session &s) {
    RemoteLink &link = *s.remote;
    if (!link.attached) return true;
    const bool late = monotonic_ns() >= link.release_deadline_ns;
    if (link.peer_gone || late) {
        link.publisher.discard();
    } else {
        link.publisher.flush();
        // Our last publishes (engine_alive = 0, kTagSessionEnd) go out first.
        if (fabric_->region_outstanding(link.region) > 0 || !link.publisher.drained()) return false;
    }
    // Drops what the provider has not taken; busy while it still has some of it.
    if (fabric_->unregister_region(link.region) == -EBUSY) {
        if (!late) return false;
        // The provider may still read or write it: never unmap it, never reuse its index.
        log_line("session %u: the relay stopped answering; its region stays mapped", s.id);
        s.region.base = nullptr;
    }
    fabric_owners_[link.region] = {};
    link.attached = false;
    if (link.releasing) --remote_releasing_;
    link.releasing = false;
    return true;
}

void Worker::post_link_poll(Session &s) {
    RemoteLink &link = *s.remote;
    if (link.link_posted || link.link_fd < 0) return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return end_session(s, "out of submission queue entries");
    io_uring_prep_poll_add(sqe, link.link_fd, POLLIN | POLLRDHUP);
    io_uring_sqe_set_data64(sqe, user_data(Kind::kLink, s.index, 0, s.gen));
    link.link_posted = true;
    ++s.inflight;
}

void Worker::on_link(Session &s, int32_t res) {
    RemoteLink &link = *s.remote;
    link.link_posted = false;
    if (s.ending) return;
    // Nothing travels on the link after the setup: readable means the relay is gone.
    char byte;
    const ssize_t n = recv(link.link_fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) || (res > 0 && (res & POLLERR))) {
        link.peer_gone = true;
        return end_session(s, "the relay closed its link");
    }
    if (n > 0) return violation(s, "unexpected bytes on the relay's link");
    post_link_poll(s);
}

bool Worker::fabric_idle() {
    if (!fabric_->ready_to_sleep()) return false;
    if (!fabric_wait_posted_ && fabric_->wait_fd() >= 0) {
        io_uring_sqe *sqe = get_sqe();
        if (!sqe) return false;
        io_uring_prep_poll_add(sqe, fabric_->wait_fd(), POLLIN);
        io_uring_sqe_set_data64(sqe, user_data(Kind::kFabricWait, 0, 0, 0));
        fabric_wait_posted_ = true;
    }
    // Without a wait fd the provider cannot wake us: keep polling it.
    return fabric_->wait_fd() >= 0;
}

// ---------------------------------------------------------------------------------------------
// The main thread's side

LinkAcceptor::~LinkAcceptor() {
    for (Pending &pending : pending_) close(pending.fd);
    if (listener_ >= 0) close(listener_);
}

std::string LinkAcceptor::open(const std::string &address) {
    sockaddr_storage addr{};
    socklen_t len = 0;
    if (!parse_link_address(address, addr, len))
        return "--fabric-listen: '" + address + "' is not HOST:PORT or [V6]:PORT";
    listener_ = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener_ < 0) return std::string("socket: ") + std::strerror(errno);
    const int one = 1;
    setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listener_, reinterpret_cast<sockaddr *>(&addr), len) != 0)
        return "bind " + address + ": " + std::strerror(errno);
    if (listen(listener_, 128) != 0) return std::string("listen: ") + std::strerror(errno);
    return {};
}

void LinkAcceptor::add_pollfds(std::vector<pollfd> &fds) const {
    if (listener_ < 0) return;
    fds.push_back({listener_, POLLIN, 0});
    for (const Pending &pending : pending_) fds.push_back({pending.fd, POLLIN, 0});
}

uint64_t LinkAcceptor::next_deadline_ns() const {
    uint64_t next = UINT64_MAX;
    for (const Pending &pending : pending_) next = std::min(next, pending.deadline_ns);
    return next;
}

void LinkAcceptor::on_poll(const pollfd *fds, uint64_t now_ns,
                           const std::function<void(int fd, const LinkHello &hello)> &ready) {
    if (listener_ < 0) return;
    std::vector<Pending> still;
    for (size_t k = 0; k < pending_.size(); ++k) {
        Pending &pending = pending_[k];
        bool keep = true;
        if (fds[k + 1].revents & (POLLIN | POLLHUP | POLLERR)) keep = read_hello(pending, ready);
        if (keep && now_ns >= pending.deadline_ns) {
            log_line("a relay sent no complete hello within 2 s; dropped");
            close(pending.fd);
            keep = false;
        }
        if (keep) still.push_back(pending);
    }
    pending_.swap(still);
    if (fds[0].revents & POLLIN) accept_links(now_ns);
}

void LinkAcceptor::accept_links(uint64_t now_ns) {
    for (int k = 0; k < 16; ++k) {
        const int fd = accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (pending_.size() >= kMaxPendingLinks) {
            close(fd);
            continue;
        }
        tune_link_socket(fd);
        Pending pending;
        pending.fd = fd;
        pending.deadline_ns = now_ns + kLinkHelloTimeoutNs;
        pending_.push_back(pending);
    }
}

bool LinkAcceptor::read_hello(Pending &pending,
                              const std::function<void(int fd, const LinkHello &hello)> &ready) {
    auto *bytes = reinterpret_cast<uint8_t *>(&pending.hello);
    const ssize_t n = recv(pending.fd, bytes + pending.received,
                           sizeof(pending.hello) - pending.received, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
    if (n <= 0) {
        close(pending.fd);
        return false;
    }
    pending.received += static_cast<size_t>(n);
    if (pending.received < sizeof(pending.hello)) return true;
    const LinkHello &hello = pending.hello;
    if (hello.magic != kLinkMagic || hello.version != kLinkVersion ||
        hello.layout_version != ipc::kLayoutVersion ||
        hello.region_bytes != ipc::kRemoteRegionBytes) {
        log_line("a relay's hello does not match this tcpsd (version or layout); refused");
        reply_link_error(pending.fd, -EPROTONOSUPPORT, 0);
        close(pending.fd);
        return false;
    }
    ready(pending.fd, hello);
    return false;
}

void reply_link_error(int fd, int error, uint32_t session_id) {
    LinkReply reply{};
    reply.magic = kLinkMagic;
    reply.version = kLinkVersion;
    reply.result = error;
    reply.session_id = session_id;
    ssize_t ignored = send(fd, &reply, sizeof(reply), MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)ignored;
}

std::unique_ptr<Session> make_remote_session(int fd, const LinkHello &hello, uint32_t id) {
    auto session = std::make_unique<Session>();
    // The relay read these with SO_PEERCRED and /proc on its host, as we do for local clients;
    // the fabric's network is trusted (ipc/fabric.hpp), so we take its word.
    session->creds.pid = hello.pid;
    session->creds.uid = hello.uid;
    session->creds.gid = hello.gid;
    session->creds.caps = hello.caps;
    const int rc = create_region(*session, id, true);
    if (rc != 0) {
        log_line("remote client pid %d: cannot create its region: %s", hello.pid,
                 std::strerror(-rc));
        reply_link_error(fd, rc, id);
        close(fd);
        return nullptr;
    }
    session->remote = std::make_unique<RemoteLink>();
    session->remote->link_fd = fd;
    session->remote->peer = hello.fabric;
    return session;
}

}  // namespace tcps::engine
