#include "worker.hpp"

#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "clock.hpp"
#include "fence.hpp"
#include "identity.hpp"
#include "log.hpp"
#include "parked.hpp"
#include "quota.hpp"
#include "remote.hpp"
#include "ring.hpp"

namespace tcps::engine {

namespace {

constexpr unsigned kSqEntries = 4096;
constexpr unsigned kCqEntries = 32768;
constexpr uint32_t kMaxSessions = 4096;  // 12 bits of user_data
// user_data: kind (4 bits) | session index (12) | slot (20) | the slot's incarnation (28 low
// bits: a slot is freed only once nothing of it is in flight, so they only catch bugs).
constexpr uint64_t kGenMask = (uint64_t{1} << 28) - 1;
static_assert(kMaxSessions <= (1u << 12) && ipc::kMaxSockets <= (1u << 20),
              "session index and slot fit their user_data fields");
constexpr uint32_t kQueueBatch = 64;  // slots popped per session per iteration
constexpr unsigned kCqeBatch = 256;
constexpr uint64_t kTickNs = 100'000'000;
// A connection past its FIN, reset or shut down is never handed back to the kernel: its end is
// the engine's to report (the kernel socket's error was taken by the engine's receive).
constexpr uint32_t kConnectionEnded =
    ipc::kFlagRxEof | ipc::kFlagReset | ipc::kFlagTxShut | ipc::kFlagRxShut;
// The window over which a worker's busy time decides whether it is saturated (LoadGauge).
constexpr uint64_t kLoadWindowNs = 100'000'000;
// How long the ring pages of a freed engine slot stay: the free list is a stack, so under load
// the same few slots cycle through connections, and punching (and faulting in again) their
// 128 KiB for every connection cost the engine 17% of its CPU at 5,000 connections/s.
constexpr uint64_t kIdleRingNs = 1'000'000'000;
// A graceful close that makes no progress for this long (the peer stopped reading) is reset.
constexpr uint64_t kDrainTimeoutNs = 30'000'000'000ull;
constexpr uint64_t kShutdownWaitNs = 500'000'000;
// A new connection's peeked bytes are in its first, small rx ring (it grows only later).
constexpr uint32_t kPeekMask = ipc::kRingBytes - 1;
constexpr uint32_t kAcceptMask = ipc::kAcceptRingEntries - 1;

struct NamedOp {
    int op;
    const char *name;
};
constexpr NamedOp kNeededOps[] = {
    {IORING_OP_RECV, "IORING_OP_RECV"},
    {IORING_OP_SEND, "IORING_OP_SEND"},
    {IORING_OP_ACCEPT, "IORING_OP_ACCEPT"},
    {IORING_OP_POLL_ADD, "IORING_OP_POLL_ADD"},
    {IORING_OP_ASYNC_CANCEL, "IORING_OP_ASYNC_CANCEL"},
    {IORING_OP_READ, "IORING_OP_READ"},
};

}  // namespace

Worker::Worker(const WorkerConfig &config, const std::atomic<bool> &stop)
    : config_(config),
      stop_(stop),
      peek_scratch_(new uint8_t[ipc::kRingBytes]),
      gauge_(config.handoff_load) {
    saturated_.store(gauge_.saturated(), std::memory_order_relaxed);
    room_.store(gauge_.has_room(), std::memory_order_relaxed);
    table_.resize(kMaxSessions);
    free_indices_.reserve(kMaxSessions);
    for (uint32_t i = kMaxSessions; i-- > 0;) free_indices_.push_back(i);
}

Worker::~Worker() {
    if (thread_.joinable()) thread_.join();
    if (ring_ready_) io_uring_queue_exit(&ring_);
    if (doorbell_fd_ >= 0) close(doorbell_fd_);
}

std::string Worker::init() {
    io_uring_params params{};
    params.flags = IORING_SETUP_CQSIZE;
    params.cq_entries = kCqEntries;
    int rc = io_uring_queue_init_params(kSqEntries, &ring_, &params);
    if (rc < 0) return std::string("io_uring_queue_init: ") + std::strerror(-rc);
    ring_ready_ = true;
    if (!(params.features & IORING_FEAT_FAST_POLL))
        return "io_uring lacks IORING_FEAT_FAST_POLL (needs Linux 5.7+)";
    if (!(params.features & IORING_FEAT_NODROP))
        return "io_uring lacks IORING_FEAT_NODROP (needs Linux 5.5+)";
    // Came with multishot poll (IORING_POLL_ADD_MULTI), which has no flag of its own.
    if (!(params.features & IORING_FEAT_RSRC_TAGS))
        return "io_uring lacks multishot poll (IORING_FEAT_RSRC_TAGS, needs Linux 5.13+)";
    io_uring_probe *probe = io_uring_get_probe_ring(&ring_);
    if (!probe) return "io_uring: cannot probe supported operations";
    std::string missing;
    for (const NamedOp &op : kNeededOps) {
        if (!io_uring_opcode_supported(probe, op.op)) {
            missing = std::string("io_uring lacks ") + op.name;
            break;
        }
    }
    send_zc_ = io_uring_opcode_supported(probe, IORING_OP_SEND_ZC);
    io_uring_free_probe(probe);
    if (!missing.empty()) return missing;
    doorbell_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (doorbell_fd_ < 0) return std::string("eventfd: ") + std::strerror(errno);
    if (config_.fabric) return open_fabric();
    return {};
}

std::string Worker::start() {
    thread_ = std::thread([this] { run(); });
    if (config_.core >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(config_.core, &set);
        const int rc = pthread_setaffinity_np(thread_.native_handle(), sizeof(set), &set);
        if (rc != 0)
            return "cannot pin worker to core " + std::to_string(config_.core) + ": " +
                   std::strerror(rc);
    }
    return {};
}

void Worker::join() {
    if (thread_.joinable()) thread_.join();
}

void Worker::adopt(std::unique_ptr<Session> session) {
    {
        std::lock_guard<std::mutex> lock(pending_mutex_);
        pending_.push_back(std::move(session));
        queued_.fetch_add(1, std::memory_order_relaxed);
    }
    has_pending_.store(true, std::memory_order_seq_cst);
    const uint64_t one = 1;
    ssize_t ignored = write(doorbell_fd_, &one, sizeof(one));
    (void)ignored;
}

void Worker::post(ShardMessage &&message) {
    {
        std::lock_guard<std::mutex> lock(pending_mutex_);
        messages_.push_back(std::move(message));
    }
    // Our flag before its sleeping_, as it sets sleeping_ before it re-reads our flag.
    has_pending_.store(true, std::memory_order_seq_cst);
    poke();
}

int Worker::busy_percent(uint64_t now_ns) const {
    // A worker asleep computes no window: its last one is stale once a window has passed.
    if (now_ns - load_window_end_ns_.load(std::memory_order_relaxed) > 2 * kLoadWindowNs) return 0;
    return static_cast<int>(stats_.load_percent.load(std::memory_order_relaxed));
}

void Worker::poke() {
    if (!sleeping_.load(std::memory_order_seq_cst)) return;
    const uint64_t one = 1;
    ssize_t ignored = write(doorbell_fd_, &one, sizeof(one));
    (void)ignored;
}

void Worker::take_freed_sessions(std::vector<uint32_t> &ids) {
    std::lock_guard<std::mutex> lock(pending_mutex_);
    ids.insert(ids.end(), freed_ids_.begin(), freed_ids_.end());
    freed_ids_.clear();
}

void Worker::adopt_join(const JoinRequest &join) {
    {
        std::lock_guard<std::mutex> lock(pending_mutex_);
        pending_joins_.push_back(join);
    }
    has_pending_.store(true, std::memory_order_seq_cst);
    const uint64_t one = 1;
    ssize_t ignored = write(doorbell_fd_, &one, sizeof(one));
    (void)ignored;
}

uint64_t Worker::user_data(Kind kind, uint32_t session, uint32_t slot, uint32_t gen) {
    return (static_cast<uint64_t>(kind) << 60) | (static_cast<uint64_t>(session & 0xfff) << 48) |
           (static_cast<uint64_t>(slot & 0xfffff) << 28) | (gen & kGenMask);
}

// ---------------------------------------------------------------------------------------------
// The loop

void Worker::run() {
    char name[16];
    std::snprintf(name, sizeof(name), "tcpsd-w%d", config_.index);
    pthread_setname_np(pthread_self(), name);
    now_ns_ = monotonic_ns();
    uint64_t last_work = now_ns_;
    const uint64_t spin_ns = static_cast<uint64_t>(config_.spin_us) * 1000;
    post_worker_doorbell();
    for (;;) {
        if (stop_.load(std::memory_order_relaxed)) {
            shutdown_all();
            return;
        }
        const uint64_t iteration_start = now_ns_;
        bool work = false;
        if (has_pending_.load(std::memory_order_acquire)) work |= adopt_pending();
        // Index loop: ending a session may change active_.
        for (size_t k = 0; k < active_.size(); ++k) {
            Session *s = table_[active_[k]].get();
            if (s && !s->ending) work |= process_queue(*s);
        }
        if (fabric_) work |= poll_fabric();
        if (reap() > 0) work = true;
        flush_wakes();
        if (!ending_.empty()) free_ended_sessions();
        if (io_uring_sq_ready(&ring_) > 0) io_uring_submit(&ring_);
        if (!doorbell_posted_) post_worker_doorbell();

        now_ns_ = monotonic_ns();
        if (work) busy_ns_ += now_ns_ - iteration_start;
        if (now_ns_ - load_window_start_ns_ >= kLoadWindowNs) {
            // Busy: the wall time of the rounds that found work, but no more than the CPU the
            // thread had in the window. A round that another thread on the core preempted (a
            // server or a load generator sharing it) did not work meanwhile: counted, it made
            // a worker with little to do look saturated, which asked its connections back.
            const uint64_t cpu_now = thread_cpu_ns();
            const uint64_t busy = std::min(busy_ns_, cpu_now - window_cpu_start_ns_);
            window_cpu_start_ns_ = cpu_now;
            stats_.load_percent.store(std::min<uint64_t>(busy, now_ns_ - load_window_start_ns_) *
                                          100 / (now_ns_ - load_window_start_ns_),
                                      std::memory_order_relaxed);
            const bool was = gauge_.saturated();
            const bool now_saturated = gauge_.update(busy, now_ns_ - load_window_start_ns_);
            saturated_.store(now_saturated, std::memory_order_relaxed);
            room_.store(gauge_.has_room(), std::memory_order_relaxed);
            if (now_saturated != was)
                TCPS_LOG_VERBOSE("worker %d: %s", config_.index,
                                 was ? "no longer saturated: offloading new connections"
                                     : "saturated: new connections stay with the kernel, some "
                                       "live ones are asked back");
            adopted_this_window_ = 0;
            // Each window: the family's other workers' gauges may have flipped.
            steer_twins();
            if (now_saturated)
                ask_to_shed();
            else if (shed_asks_open_ > 0)
                withdraw_shed_asks();
            load_window_start_ns_ = now_ns_;
            load_window_end_ns_.store(now_ns_, std::memory_order_relaxed);
            busy_ns_ = 0;
        }
        if ((!timed_.empty() || reservations_ > 0 || !idle_rings_.empty()) &&
            now_ns_ >= next_housekeeping_ns_) {
            housekeeping(now_ns_);
            next_housekeeping_ns_ = now_ns_ + kTickNs;
        }
        if (work) {
            last_work = now_ns_;
        } else if (!config_.busy_poll && now_ns_ - last_work >= spin_ns) {
            sleep_until_work();
            now_ns_ = monotonic_ns();
            last_work = now_ns_;
        } else {
            cpu_relax();
        }
    }
}

bool Worker::adopt_pending() {
    std::vector<std::unique_ptr<Session>> incoming;
    std::vector<JoinRequest> joins;
    std::vector<ShardMessage> messages;
    {
        std::lock_guard<std::mutex> lock(pending_mutex_);
        incoming.swap(pending_);
        joins.swap(pending_joins_);
        messages.swap(messages_);
        has_pending_.store(false, std::memory_order_relaxed);
    }
    for (auto &owned : incoming) {
        queued_.fetch_sub(1, std::memory_order_relaxed);
        if (free_indices_.empty()) {
            log_line("worker %d: too many sessions, refusing session %u", config_.index, owned->id);
            // A shard refused costs nothing but the connections it would have served: the
            // home serves them itself (place_accepted's answer never comes back positive).
            // A home refused: the client sees engine_alive = 0 and falls back.
            if (!owned->is_shard())
                owned->region.header().engine_alive.store(0, std::memory_order_seq_cst);
            continue;  // the destructor closes everything
        }
        Session &s = *owned;
        s.index = free_indices_.back();
        free_indices_.pop_back();
        s.gen = next_session_gen_++;
        table_[s.index] = std::move(owned);
        active_.push_back(s.index);
        by_id_[s.id] = s.index;
        if (s.is_shard()) {
            TCPS_LOG_VERBOSE("session %u: shard %u served by worker %d", s.id, s.shard,
                             config_.index);
            continue;
        }
        Member &first = s.members[0];
        const int flags = fcntl(first.control_fd, F_GETFL);
        if (flags >= 0) fcntl(first.control_fd, F_SETFL, flags | O_NONBLOCK);
        first.state = ipc::MemberState::kLive;
        first.creds = s.creds;
        s.live_members = 1;
        note_member_identity(s, 0, true);
        s.region.member(0).pid.store(s.creds.pid, std::memory_order_relaxed);
        s.region.member(0).state.store(static_cast<uint32_t>(ipc::MemberState::kLive),
                                       std::memory_order_release);
        stats_.sessions.fetch_add(1, std::memory_order_relaxed);
        stats_.sessions_total.fetch_add(1, std::memory_order_relaxed);
        TCPS_LOG_VERBOSE("session %u (pid %d uid %u): served by worker %d", s.id, s.creds.pid,
                         s.creds.uid, config_.index);
        if (s.remote && !attach_remote(s)) {
            end_session(s, "cannot attach its region to the fabric");
            continue;
        }
        post_control_poll(s, 0);
        post_session_doorbell(s);
    }
    for (const JoinRequest &join : joins) accept_join(join);
    for (ShardMessage &message : messages) handle_message(message);
    return !incoming.empty() || !joins.empty() || !messages.empty();
}

Session *Worker::find_session(uint32_t id) {
    const auto it = by_id_.find(id);
    return it == by_id_.end() ? nullptr : table_[it->second].get();
}

bool Worker::process_queue(Session &s) {
    uint32_t n = 0;
    // Each chunk's queue in turn, from where the last batch stopped, so that a busy chunk does
    // not starve the others. Only this shard's chunks: the others are other workers'.
    const auto chunks = static_cast<uint32_t>(s.owned_chunks.size());
    for (uint32_t visited = 0; visited < chunks && n < kQueueBatch; ++visited) {
        const uint32_t chunk = s.owned_chunks[s.queue_cursor % chunks];
        for (; n < kQueueBatch; ++n) {
            uint32_t slot;
            const ipc::PopResult result = ipc::work_queue_pop(s.region, chunk, slot);
            if (result == ipc::PopResult::kEmpty) break;
            if (result == ipc::PopResult::kGarbage) {
                violation(s, "chunk %u's work queue holds a slot of another chunk", chunk);
                return true;
            }
            process_slot(s, slot);
            if (s.ending) return true;
        }
        if (n < kQueueBatch) s.queue_cursor = (s.queue_cursor + 1) % chunks;
    }
    return n > 0;
}

void Worker::process_slot(Session &s, uint32_t i) {
    ipc::SocketSlot &slot = s.region.slot(i);
    // Clear first, then read: a doorbell rung after this point queues the slot again. An
    // exchange rather than the contract's store(0): reading the client's exchange(1) makes its
    // earlier index stores visible to the loads below in the C++ model, not just on x86.
    slot.doorbell_queued.exchange(0, std::memory_order_seq_cst);
    // The request's sequence before the indices: a request (a close) covers every byte queued
    // before it.
    const uint32_t req_seq = slot.req_seq.load(std::memory_order_acquire);
    EngineSlot &es = s.slots[i];
    // Data first, so a shutdown or close in the same doorbell sees the bytes queued before it.
    if (es.state == ipc::SlotState::kOpen) {
        // The client rang: it uses the connection here, so its first bytes need not stay in
        // the kernel socket any more.
        if (es.peeking) leave_peek(s, i);
        if (es.kernel_served) {
            // It rang for a connection meant for the kernel (its hand-off failed): ours.
            es.kernel_served = false;
            publish_flags(s, i, es.flags & ~ipc::kFlagKernelServed);
            post_recv(s, i);
        }
        apply_client_state(s, i);
        if (s.ending) return;
    }
    if (req_seq != es.last_req_seq) handle_request(s, i, req_seq);
}

// What the client has done to slot i, as it is now: its posted TCP_CORK/TCP_NODELAY (before
// the bytes queued after them), its ring indices, then a posted shutdown. `posted` is read
// before the indices, so a shutdown in it covers every byte queued before it was posted.
void Worker::apply_client_state(Session &s, uint32_t i) {
    const ipc::SocketSlot &slot = s.region.slot(i);
    const uint32_t posted = slot.posted.load(std::memory_order_acquire) & ipc::kPostedMask;
    // Before tx_tail: a direct send's tx_at is among the bytes queued before it.
    const uint32_t direct_tail = slot.direct_tail.load(std::memory_order_acquire);
    const uint32_t tx_tail = slot.tx_tail.load(std::memory_order_acquire);
    // After tx_tail: the client stores it before the tx_tail that queues the urgent byte, so
    // a tx_tail that holds that byte comes with its mark (one seen ahead of its bytes is
    // checked against tx_tail below and taken at the next look).
    const uint32_t urgent_tail = slot.urgent_tail.load(std::memory_order_acquire);
    const uint32_t rx_head = slot.rx_head.load(std::memory_order_acquire);
    const uint32_t acc_head = slot.acc_head.load(std::memory_order_acquire);
    EngineSlot &es = s.slots[i];
    if (!adopt_tx_ring(s, i)) return;
    if (posted != es.applied_posted) apply_posted_options(s, i, posted);
    // An urgent byte among the bytes queued and not sent: any other value (a stale one, or
    // garbage) marks nothing.
    if (urgent_tail != es.urgent_tail && urgent_tail - es.tx_sent - 1 < tx_tail - es.tx_sent &&
        tx_tail - es.tx_head <= es.tx_ring) {
        es.urgent_tail = urgent_tail;
        es.urgent_pending = true;
    }
    apply_client_indices(s, i, tx_tail, rx_head, acc_head);
    if (s.ending) return;
    if (es.twin_fd >= 0) {
        const uint32_t drained = s.region.slot(i).twin_drained.load(std::memory_order_acquire);
        if (drained != es.twin_drained) {
            es.twin_drained = drained;
            twin_drained(s, i);
        }
    }
    if (direct_tail != es.direct_tail) {
        if (direct_tail - es.direct_head > ipc::kDirectQueueEntries ||
            direct_tail - es.direct_tail > ipc::kDirectQueueEntries)
            return violation(s, "slot %u: direct_tail %u outside the queue (head %u)", i,
                             direct_tail, es.direct_head);
        es.direct_tail = direct_tail;
        take_direct(s, i);
    }
    const uint32_t shut = posted & ~es.applied_posted & (ipc::kPostedShutRd | ipc::kPostedShutWr);
    if (shut) {
        es.applied_posted |= shut;
        const bool rd = shut & ipc::kPostedShutRd, wr = shut & ipc::kPostedShutWr;
        op_shutdown(s, i, rd && wr ? SHUT_RDWR : rd ? SHUT_RD : SHUT_WR);
    }
}

// The tx ring's size as the client set it, loaded after tx_tail: it stores a new size before
// the bytes queued with it. A send in flight keeps its place in the ring it was posted from;
// the client grew the ring so that those bytes stay there (ipc::ring_regrow).
bool Worker::adopt_tx_ring(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    const uint32_t stored = s.region.slot(i).tx_ring_bytes.load(std::memory_order_relaxed);
    if (!ipc::ring_bytes_valid(stored, s.ring_max())) {
        violation(s, "slot %u: tx ring size %u", i, stored);
        return false;
    }
    if (stored != 0 && !map_bulk(s, i >> ipc::kChunkShift)) {
        // The client's bytes are where we cannot reach them: the connection cannot go on.
        if (!(es.flags & ipc::kFlagReset))
            log_line("worker %d: session %u slot %u: cannot map the bulk rings; resetting it",
                     config_.index, s.id, i);
        reset_in_place(s, i);
        return false;
    }
    if (ipc::ring_bytes(stored) > es.tx_ring)
        stats_.tx_rings_grown.fetch_add(1, std::memory_order_relaxed);
    es.tx_ring = ipc::ring_bytes(stored);
    es.bulk_used = es.bulk_used || es.tx_ring > ipc::kRingBytes;
    return true;
}

void Worker::apply_posted_options(Session &s, uint32_t i, uint32_t posted) {
    EngineSlot &es = s.slots[i];
    const uint32_t changed = posted ^ es.applied_posted;
    const auto apply = [&](uint32_t set_bit, uint32_t value_bit, int name) {
        if (!(posted & set_bit) || !(changed & (set_bit | value_bit))) return;
        es.applied_posted = (es.applied_posted & ~value_bit) | set_bit | (posted & value_bit);
        const int on = (posted & value_bit) ? 1 : 0;
        // Cannot fail on a TCP socket; nothing would wait for an error anyway.
        (void)setsockopt(es.fd, IPPROTO_TCP, name, &on, sizeof(on));
        // A listener's twin: its connections inherit it too.
        if (es.twin_fd >= 0 && !es.on_demand)
            (void)setsockopt(es.twin_fd, IPPROTO_TCP, name, &on, sizeof(on));
    };
    // The cork last: clearing it pushes what is queued, with TCP_NODELAY already as wanted.
    apply(ipc::kPostedNoDelaySet, ipc::kPostedNoDelay, TCP_NODELAY);
    apply(ipc::kPostedCorkSet, ipc::kPostedCork, TCP_CORK);
    if ((posted & ipc::kPostedUrgentWatch) && !es.urgent_watch) {
        es.applied_posted |= ipc::kPostedUrgentWatch;
        es.urgent_watch = true;
        leave_direct_mode(s, i);  // the urgent mark is looked for in every read
        // A receive in flight would read past an urgent byte that comes now: take it back,
        // and read by hand from then on (on_recv posts the poll when it is cancelled).
        if (es.recv_posted && !es.recv_polling && !es.peek_posted) cancel(s, i, Kind::kRecv);
        look_for_urgent_mark(s, i);
        post_recv(s, i);
    }
}

void Worker::apply_client_indices(Session &s, uint32_t i, uint32_t tx_tail, uint32_t rx_head,
                                  uint32_t acc_head) {
    EngineSlot &es = s.slots[i];
    if (!tx_tail_valid(tx_tail, es.tx_head, es.tx_sent - es.tx_head + es.send_len, es.tx_ring))
        return violation(s, "slot %u: tx_tail %u outside the tx ring (tx_head %u)", i, tx_tail,
                         es.tx_head);
    if (!rx_head_valid(rx_head, es.rx_tail, es.rx_ring))
        return violation(s, "slot %u: rx_head %u outside the rx ring (rx_tail %u)", i, rx_head,
                         es.rx_tail);
    if (!acc_head_valid(acc_head, es.acc_tail))
        return violation(s, "slot %u: acc_head %u outside the accept ring (acc_tail %u)", i,
                         acc_head, es.acc_tail);
    // Bytes queued after a shutdown(SHUT_WR) are never sent.
    const bool tx_closed = es.shut_wr_pending || (es.flags & ipc::kFlagTxShut);
    if (tx_tail != es.tx_tail && !tx_closed) {
        es.tx_tail = tx_tail;
        post_send(s, i);
    }
    es.rx_head = rx_head;
    if ((es.flags & ipc::kFlagRxPaused) && es.rx_room() > 0) post_recv(s, i);
    es.acc_head = acc_head;
    if (es.flags & ipc::kFlagAcceptPaused) post_accept(s, i);
}

unsigned Worker::reap() {
    struct Completion {
        uint64_t user_data;
        int32_t res;
        uint32_t flags;
    };
    Completion batch[kCqeBatch];
    unsigned total = 0;
    for (;;) {
        unsigned count = 0;
        unsigned head;
        io_uring_cqe *cqe;
        io_uring_for_each_cqe(&ring_, head, cqe) {
            batch[count++] = {cqe->user_data, cqe->res, cqe->flags};
            if (count == kCqeBatch) break;
        }
        if (count == 0) {
            // Completions the kernel could not fit in the CQ wait on its overflow list.
            if (io_uring_cq_has_overflow(&ring_)) {
                io_uring_get_events(&ring_);
                if (io_uring_cq_ready(&ring_) > 0) continue;
            }
            break;
        }
        io_uring_cq_advance(&ring_, count);
        for (unsigned k = 0; k < count; ++k)
            handle_completion(batch[k].user_data, batch[k].res, batch[k].flags);
        total += count;
        if (count < kCqeBatch || total >= 4 * kCqeBatch) break;
    }
    return total;
}

void Worker::handle_completion(uint64_t data, int32_t res, uint32_t cqe_flags) {
    const auto kind = static_cast<Kind>(data >> 60);
    if (kind == Kind::kIgnore) return;
    if (kind == Kind::kWorkerDoorbell) {
        doorbell_posted_ = false;
        return;
    }
    if (kind == Kind::kFabricWait) {
        fabric_wait_posted_ = false;
        return;
    }
    const uint32_t index = (data >> 48) & 0xfff;
    const uint32_t i = (data >> 28) & 0xfffff;
    const uint32_t gen = static_cast<uint32_t>(data & kGenMask);
    Session *sp = table_[index].get();
    if (!sp) {
        log_line("worker %d: completion for missing session %u (bug)", config_.index, index);
        return;
    }
    Session &s = *sp;
    // A multishot operation stays in flight until its last completion (no IORING_CQE_F_MORE).
    const bool more = (cqe_flags & IORING_CQE_F_MORE) != 0;
    if (s.inflight > 0 && !more) --s.inflight;
    switch (kind) {
        case Kind::kSessionDoorbell:
            s.doorbell_posted = false;
            if (!s.ending) post_session_doorbell(s);
            // The client rings the home's doorbell when any worker of the family sleeps.
            if (s.family)
                for (size_t k = 1; k < s.family->workers.size(); ++k) s.family->workers[k]->poke();
            break;
        case Kind::kLink:
            if (s.remote) on_link(s, res);
            break;
        case Kind::kControl:
            if (i < ipc::kMaxMembers) {
                s.members[i].control_posted = false;
                on_control(s, i, res);
            }
            break;
        case Kind::kRecv:
        case Kind::kSend:
        case Kind::kAccept:
        case Kind::kConnect:
        case Kind::kWatch:
        case Kind::kPeekWatch:
        case Kind::kDirect:
        case Kind::kDirectWait:
        case Kind::kTwinWatch: {
            EngineSlot &es = s.slots[i];
            if (es.inflight > 0 && !more) --es.inflight;
            if ((es.gen & kGenMask) != gen) {
                log_line("worker %d: stale completion for session %u slot %u (bug)", config_.index,
                         s.id, i);
                break;
            }
            if (kind == Kind::kRecv) on_recv(s, i, res);
            if (kind == Kind::kSend) on_send(s, i, res, cqe_flags);
            if (kind == Kind::kAccept) on_accept(s, i, res);
            if (kind == Kind::kConnect) on_connect(s, i, res);
            if (kind == Kind::kWatch) on_watch(s, i, res, more);
            if (kind == Kind::kPeekWatch) on_peek_watch(s, i, res);
            if (kind == Kind::kDirect) on_direct(s, i, res, cqe_flags);
            if (kind == Kind::kDirectWait) on_direct_wait(s, i, res);
            if (kind == Kind::kTwinWatch) on_twin_watch(s, i, res);
            if (es.handoff_member != kNoMember) maybe_finish_handoff(s, i);
            break;
        }
        default:
            break;
    }
}

void Worker::flush_wakes() {
    if (dirty_.empty()) return;
    // Our stores (indices, flags, event_gen) before our loads of the waiters: pairs with the
    // client's arm-then-recheck, so either it sees our change or we see it armed.
    ipc::full_fence();
    for (size_t k = 0; k < dirty_.size(); ++k) {
        Session *s = dirty_[k];
        if (s->remote) publish_remote(*s);
        wake_changed_waiters(*s, !s->ending);
        s->dirty = false;
    }
    dirty_.clear();
}

void Worker::set_sleeping(uint32_t value) {
    // Ours before the chunks': a poke (through the family's home) that follows a client's look
    // at a chunk's flag sees it.
    sleeping_.store(value != 0, std::memory_order_seq_cst);
    for (uint32_t index : active_) {
        Session *s = table_[index].get();
        if (!s || s->ending) continue;
        for (uint32_t chunk : s->owned_chunks)
            s->region.chunk_header(chunk).engine_sleeping.store(value, std::memory_order_seq_cst);
    }
}

bool Worker::any_queue_has_work() {
    for (uint32_t index : active_) {
        Session *s = table_[index].get();
        if (!s || s->ending) continue;
        for (uint32_t chunk : s->owned_chunks)
            if (ipc::work_queue_ready(s->region, chunk)) return true;
    }
    return false;
}

void Worker::sleep_until_work() {
    set_sleeping(1);
    // engine_sleeping before re-reading the queues: a client that pushed before seeing our
    // flag is caught by this re-check, one that pushed after it writes the doorbell.
    ipc::full_fence();
    if (stop_.load(std::memory_order_relaxed) || has_pending_.load(std::memory_order_acquire) ||
        io_uring_cq_ready(&ring_) > 0 || any_queue_has_work() || (fabric_ && !fabric_idle())) {
        set_sleeping(0);
        return;
    }
    if (!doorbell_posted_) post_worker_doorbell();
    io_uring_cqe *cqe = nullptr;
    int rc;
    if (!timed_.empty() || reservations_ > 0 || remote_releasing_ > 0 || !idle_rings_.empty()) {
        __kernel_timespec ts{};
        ts.tv_nsec = kTickNs;
        rc = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
    } else {
        rc = io_uring_submit_and_wait(&ring_, 1);
    }
    if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
        log_line("worker %d: io_uring wait: %s", config_.index, std::strerror(-rc));
    set_sleeping(0);
}

void Worker::housekeeping(uint64_t now) {
    if (reservations_ > 0) expire_reservations(now);
    if (!idle_rings_.empty()) release_idle_rings(now);
    std::vector<TimedSlot> items;
    items.swap(timed_);
    for (const TimedSlot &item : items) {
        Session *s = table_[item.session_index].get();
        if (!s || s->gen != item.session_gen || s->ending) continue;
        EngineSlot &es = s->slots[item.slot];
        es.timed = false;
        if (es.gen != item.slot_gen || es.state == ipc::SlotState::kFree) continue;
        if (es.state == ipc::SlotState::kClosing) {
            const bool draining = !es.close_reset && es.tx_head != es.close_tail &&
                                  (es.flags & ipc::kFlagConnected) &&
                                  !(es.flags & (ipc::kFlagReset | ipc::kFlagTxShut));
            if (draining && es.zc_pending) {
                // Bytes a SEND_ZC took stay ours until the peer acknowledges them: the drain
                // moves while the kernel's unacknowledged bytes fall, as a slow reader's do.
                int unacked = 0;
                if (ioctl(es.fd, SIOCOUTQ, &unacked) == 0 && unacked != es.zc_unacked) {
                    es.zc_unacked = unacked;
                    es.close_progress_ns = now;
                }
            }
            if (draining && now - es.close_progress_ns > kDrainTimeoutNs) {
                TCPS_LOG_VERBOSE("session %u slot %u: close drain timed out, resetting", s->id,
                                 item.slot);
                start_close(*s, item.slot, true);
            } else {
                // Re-issue cancels that may have been lost, then look again.
                if (es.recv_posted) cancel(*s, item.slot, Kind::kRecv);
                if (es.accept_posted) cancel(*s, item.slot, Kind::kAccept);
                if (es.connect_posted) cancel(*s, item.slot, Kind::kConnect);
                if (es.watch_posted) cancel(*s, item.slot, Kind::kWatch);
                if (es.peek_watch_posted) cancel(*s, item.slot, Kind::kPeekWatch);
                if (es.direct_posted) cancel(*s, item.slot, Kind::kDirect);
                if (es.direct_wait_posted) cancel(*s, item.slot, Kind::kDirectWait);
                if (es.twin_watch_posted) cancel(*s, item.slot, Kind::kTwinWatch);
                if (es.send_posted && (es.close_reset || !draining))
                    cancel(*s, item.slot, Kind::kSend);
                maybe_finish_close(*s, item.slot);
            }
            if (es.state == ipc::SlotState::kClosing) schedule(*s, item.slot);
            continue;
        }
        es.accept_retry = false;
        post_recv(*s, item.slot);
        post_send(*s, item.slot);
        post_accept(*s, item.slot);
        watch_twin(*s, item.slot);
        if (es.flags & ipc::kFlagRxEof) post_watch(*s, item.slot);
    }
}

void Worker::release_idle_rings(uint64_t now) {
    while (!idle_rings_.empty() && idle_rings_.front().due_ns <= now) {
        const TimedSlot item = idle_rings_.front().slot;
        idle_rings_.pop_front();
        Session *s = table_[item.session_index].get();
        if (!s || s->gen != item.session_gen || s->ending) continue;
        const EngineSlot &es = s->slots[item.slot];
        if (es.gen != item.slot_gen || es.state != ipc::SlotState::kFree) continue;
        fallocate(s->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(ipc::tx_ring_offset(item.slot)),
                  static_cast<off_t>(ipc::kRingPairBytes));
    }
}

// ---------------------------------------------------------------------------------------------
// io_uring helpers

io_uring_sqe *Worker::get_sqe() {
    for (int attempt = 0; attempt < 3; ++attempt) {
        if (io_uring_sqe *sqe = io_uring_get_sqe(&ring_)) return sqe;
        io_uring_submit(&ring_);
    }
    return nullptr;
}

void Worker::schedule(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.timed) return;
    es.timed = true;
    timed_.push_back({s.index, s.gen, i, es.gen});
}

void Worker::post_worker_doorbell() {
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return;
    io_uring_prep_read(sqe, doorbell_fd_, &doorbell_value_, sizeof(doorbell_value_), 0);
    io_uring_sqe_set_data64(sqe, user_data(Kind::kWorkerDoorbell, 0, 0, 0));
    doorbell_posted_ = true;
}

void Worker::post_session_doorbell(Session &s) {
    if (s.doorbell_posted) return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return;
    io_uring_prep_read(sqe, s.doorbell_fd, &s.doorbell_value, sizeof(s.doorbell_value), 0);
    io_uring_sqe_set_data64(sqe, user_data(Kind::kSessionDoorbell, s.index, 0, s.gen));
    s.doorbell_posted = true;
    ++s.inflight;
}

void Worker::post_control_poll(Session &s, uint32_t member) {
    Member &m = s.members[member];
    if (m.control_posted || m.control_fd < 0) return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return end_session(s, "out of submission queue entries");
    io_uring_prep_poll_add(sqe, m.control_fd, POLLIN | POLLRDHUP);
    io_uring_sqe_set_data64(sqe, user_data(Kind::kControl, s.index, member, s.gen));
    m.control_posted = true;
    ++s.inflight;
}

void Worker::cancel(Session &s, uint32_t i, Kind kind) {
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return;  // the tick re-issues it
    io_uring_prep_cancel64(sqe, user_data(kind, s.index, i, s.slots[i].gen), 0);
    io_uring_sqe_set_data64(sqe, user_data(Kind::kIgnore, 0, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// Data path

// Tags an SQE for slot i's completion dispatch and counts it in flight: a slot or a session
// is freed only when nothing of it is left in the kernel.
void Worker::track_op(Session &s, uint32_t i, io_uring_sqe *sqe, Kind kind) {
    io_uring_sqe_set_data64(sqe, user_data(kind, s.index, i, s.slots[i].gen));
    ++s.slots[i].inflight;
    ++s.inflight;
}

void Worker::post_recv(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.recv_posted || es.state != ipc::SlotState::kOpen || !(es.flags & ipc::kFlagConnected) ||
        (es.flags & (ipc::kFlagRxEof | ipc::kFlagReset)) || es.handed_off || es.kernel_served)
        return;
    // An adopted socket's parked bytes come before anything its kernel socket holds.
    if (es.prefix && !feed_prefix(s, i)) return;
    if (es.direct == EngineSlot::Direct::kRecv) return post_direct(s, i);  // instead of the ring
    if (es.rx_direct) return post_direct_wait(s, i);  // the next direct receive takes them
    if (es.peeking) {
        // Peeked bytes wait in the ring until the client rings (leave_peek); before them, one
        // MSG_PEEK into the empty ring of the new connection.
        if (es.peeked > 0) return;
        io_uring_sqe *sqe = get_sqe();
        if (!sqe) return schedule(s, i);
        const uint32_t offset = es.rx_tail & kPeekMask;
        io_uring_prep_recv(sqe, es.fd, s.region.rx_ring(i, ipc::kRingBytes) + offset,
                           ipc::kRingBytes - offset, MSG_PEEK);
        track_op(s, i, sqe, Kind::kRecv);
        es.recv_posted = true;
        es.peek_posted = true;
        return;
    }
    if (es.rx_room() == 0) {
        if (!pause_full_rx(s, i)) return;
        if (es.rx_room() == 0) {
            // Still full. A client that has read a whole ring since the last doubling (or
            // since the start) reads a stream: give it a bigger ring, as Linux grows the
            // receive buffer of a socket whose reader keeps up. One that stopped reading
            // keeps its ring (it grows at most once more).
            const bool streaming = es.rx_head - es.rx_head_at_growth >= es.rx_ring;
            if (!streaming || !grow_rx(s, i) || es.rx_room() == 0) return;
        }
    }
    if (es.flags & ipc::kFlagRxPaused) publish_flags(s, i, es.flags & ~ipc::kFlagRxPaused);
    if (es.urgent_watch) {
        // We read by hand when the socket is readable (receive_by_hand); at the urgent mark,
        // only to say that there is something past it. POLLPRI while it is not yet known:
        // urgent data alone at the head of the queue does not make the socket readable.
        const uint32_t known = s.region.slot(i).kernel_mask.load(std::memory_order_relaxed);
        uint32_t events = POLLPRI & ~known;
        if (!es.urgent_stop || !(known & POLLIN)) events |= POLLIN;
        if (events == 0) return;  // stopped, and both known: the client moves next
        io_uring_sqe *sqe = get_sqe();
        if (!sqe) return schedule(s, i);
        io_uring_prep_poll_add(sqe, es.fd, events);
        track_op(s, i, sqe, Kind::kRecv);
        es.recv_posted = true;
        es.recv_polling = true;
        es.poll_events = events;
        return;
    }
    // One receive takes all the ring's room: where the room wraps past the ring's end, both
    // its parts, in order (two receives in flight on one stream could complete in either
    // order, and a linked second one would leave a gap after a short first).
    const uint32_t offset = es.rx_tail & (es.rx_ring - 1);
    const uint32_t room = es.rx_room();
    const uint32_t to_end = std::min(room, es.rx_ring - offset);
    uint8_t *ring = s.region.rx_ring(i, es.rx_ring);
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    if (room > to_end) {
        es.rx_iov[0] = {ring + offset, to_end};
        es.rx_iov[1] = {ring, room - to_end};
        es.rx_msg = {};
        es.rx_msg.msg_iov = es.rx_iov;
        es.rx_msg.msg_iovlen = 2;
        io_uring_prep_recvmsg(sqe, es.fd, &es.rx_msg, 0);
        stats_.wrapped_recvs.fetch_add(1, std::memory_order_relaxed);
    } else {
        io_uring_prep_recv(sqe, es.fd, ring + offset, to_end, 0);
    }
    track_op(s, i, sqe, Kind::kRecv);
    es.recv_posted = true;
}

// Doubles slot i's rx ring (docs/architecture.md, "Rings that grow"): into its bulk rings, the
// unread bytes copied to their places in the bigger ring, which the client reads from once it
// sees a tail past them. False if it may not grow: at its largest, a receive in flight, or the
// owner's share of the engine's memory used up (the ring then stays as it is, as Linux keeps a
// socket's buffer under memory pressure).
bool Worker::grow_rx(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.rx_ring >= s.ring_max() || es.recv_posted || es.peeking) return false;
    // Full at its whole size: so past the last doubling's limit, whose readers of an older size
    // a second doubling could no longer spare (ipc::ring_room).
    if (es.rx_tail - es.rx_head < es.rx_ring) return false;
    // A member that cannot map the bulk rings could not read a grown ring (client-written:
    // a lie only keeps this family's rings small).
    if (s.region.header().bulk_refused.load(std::memory_order_relaxed) != 0) return false;
    const uint32_t bigger = es.rx_ring * 2;
    if (!map_bulk(s, i >> ipc::kChunkShift)) return false;
    if (quotas().charge(es.quota_uid, 0, bigger - es.rx_ring) != 0) return false;
    es.rx_charged += bigger - es.rx_ring;
    ipc::ring_regrow(s.region.rx_ring(i, es.rx_ring), es.rx_ring, s.region.rx_ring(i, bigger),
                     bigger, es.rx_head, es.rx_tail);
    // Moving out of the small rings needs no care: nobody writes there again.
    es.rx_before = es.rx_ring > ipc::kRingBytes ? es.rx_ring : 0;
    es.rx_grown_at = es.rx_tail;
    es.rx_head_at_growth = es.rx_head;
    es.rx_ring = bigger;
    es.bulk_used = true;
    s.region.slot(i).rx_ring_bytes.store(bigger, std::memory_order_release);
    stats_.rx_rings_grown.fetch_add(1, std::memory_order_relaxed);
    return true;
}

void Worker::stop_at_urgent_mark(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    ipc::SocketSlot &slot = s.region.slot(i);
    es.urgent_stop = true;
    slot.urgent_mark.store(es.rx_tail, std::memory_order_relaxed);
    update_kernel_mask(s, i);
    publish_flags(s, i, es.flags | ipc::kFlagUrgentMark | ipc::kFlagUrgentStop);
    bump_event(s, i);
}

void Worker::receive_by_hand(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    ipc::SocketSlot &slot = s.region.slot(i);
    bool moved = false;
    for (int round = 0; round < 16 && !es.urgent_stop; ++round) {
        const uint32_t free_bytes = es.rx_room();
        if (free_bytes == 0) break;  // post_recv() pauses
        // Before each read: a read at the mark would pass it, and the kernel would forget the
        // urgent byte; Linux's recv() stops there, so do we, unless told to go on.
        int at_mark = 0;
        if (ioctl(es.fd, SIOCATMARK, &at_mark) == 0 && at_mark) {
            if (!es.past_mark_ok) {
                stop_at_urgent_mark(s, i);
                break;
            }
            es.past_mark_ok = false;
        }
        const uint32_t offset = es.rx_tail & (es.rx_ring - 1);
        const uint32_t len = std::min(free_bytes, es.rx_ring - offset);
        const ssize_t n = recv(es.fd, s.region.rx_ring(i, es.rx_ring) + offset, len, MSG_DONTWAIT);
        if (n > 0) {
            es.rx_tail += static_cast<uint32_t>(n);
            stats_.bytes_in.fetch_add(n, std::memory_order_relaxed);
            moved = true;
            continue;
        }
        if (moved) slot.rx_tail.store(es.rx_tail, std::memory_order_release);
        if (n == 0) return on_recv(s, i, 0);
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return on_recv(s, i, -errno);
    }
    if (moved) {
        slot.rx_tail.store(es.rx_tail, std::memory_order_release);
        bump_event(s, i);
    }
    look_for_urgent_mark(s, i);
    post_recv(s, i);
}

int Worker::op_past_mark(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.urgent_stop) return 0;
    es.urgent_stop = false;
    es.past_mark_ok = true;
    // Where the client reads past the mark, SIOCATMARK is no longer true there.
    publish_flags(s, i, es.flags & ~(ipc::kFlagUrgentMark | ipc::kFlagUrgentStop));
    if (es.recv_posted) return 0;  // the poll reads past it when it fires
    receive_by_hand(s, i);
    return 0;
}

void Worker::on_recv(Session &s, uint32_t i, int32_t res) {
    EngineSlot &es = s.slots[i];
    es.recv_posted = false;
    const bool peek = es.peek_posted;
    es.peek_posted = false;
    if (es.state != ipc::SlotState::kOpen) return maybe_finish_close(s, i);
    if (peek && (res > 0 || res == -ECANCELED) && !es.peeking) {
        // Peeking ended while the peek was in flight: what it saw is still in the kernel
        // socket, and a real receive takes it (nothing, once the socket was handed back).
        return post_recv(s, i);
    }
    if (peek && res > 0) {
        // The pause before the bytes: a client that reads them then sees the flag and rings.
        publish_flags(s, i, es.flags | ipc::kFlagRxPaused, true);
        es.peeked = static_cast<uint32_t>(res);
        es.rx_tail += es.peeked;
        s.region.slot(i).rx_tail.store(es.rx_tail, std::memory_order_release);
        stats_.bytes_in.fetch_add(res, std::memory_order_relaxed);
        bump_event(s, i);
        watch_peeked(s, i);
        return;
    }
    if (peek) es.peeking = false;  // EOF or an error before any byte: nothing was peeked
    // A direct receive waits for this one to end. Bytes (or the FIN, an error) that came into
    // the ring first: the client reads them there, and the direct receive says so once they
    // are published (below).
    bool direct_to_ring = false;
    const uint32_t direct_len = es.direct_len;
    if (es.direct == EngineSlot::Direct::kRecv && !es.recv_polling) {
        if (res == -ECANCELED) return post_direct(s, i);
        release_direct(s, i);
        direct_to_ring = true;
    }
    if (es.recv_polling) {
        es.recv_polling = false;
        if (res == -ECANCELED) return post_recv(s, i);  // taken back to wait for other events
        if (res < 0) return schedule(s, i);  // a poll that failed: again on the next tick
        if (!es.urgent_stop) return receive_by_hand(s, i);
        // Stopped at the mark: something waits past it, or urgent data came. Readable,
        // until the client goes on.
        look_for_urgent_mark(s, i);
        bump_event(s, i);
        return post_recv(s, i);
    }
    if (res > 0) {
        es.rx_tail += static_cast<uint32_t>(res);
        s.region.slot(i).rx_tail.store(es.rx_tail, std::memory_order_release);
        stats_.bytes_in.fetch_add(res, std::memory_order_relaxed);
        bump_event(s, i);
        post_recv(s, i);
    } else if (res == 0) {
        record_fin(s, i);
    } else if (res == -EAGAIN || res == -EINTR || res == -ENOBUFS || res == -ENOMEM) {
        schedule(s, i);  // transient: try again on the next tick, not in a tight loop
    } else if (res == -ECANCELED) {
        // Taken back: to read by hand (urgent data watched), or for direct mode.
        post_recv(s, i);
    } else {
        record_error(s, i, -res);
    }
    if (direct_to_ring && es.state == ipc::SlotState::kOpen) {
        const int32_t promise = promise_ring_bytes(s, i, direct_len);
        publish_direct_result(s, i, promise != 0 ? promise : ipc::kDirectUseRxRing);
        take_direct(s, i);
    }
}

// Waits for what comes behind the peeked bytes: a one-shot poll, with the kernel socket's
// SO_RCVLOWAT one above them so that only more bytes make it readable; io_uring adds
// POLLRDHUP, so the FIN completes it, as POLLERR and POLLHUP (an RST) do. The low-water mark
// is at most the ring's 64 KiB, which needs no larger receive buffer than the default
// (tcp_set_rcvlowat()). A ring full of peeked bytes waits for the client, as a full ring does.
void Worker::watch_peeked(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.peek_watch_posted || !es.peeking || es.state != ipc::SlotState::kOpen) return;
    const uint32_t base = es.rx_tail - es.peeked;
    if (es.peeked >= ipc::kRingBytes - (base & kPeekMask)) return;
    const int lowat = static_cast<int>(es.peeked) + 1;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe || setsockopt(es.fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof(lowat)) != 0)
        return leave_peek(s, i);  // no way to watch: receive for real
    es.peek_lowat = true;
    io_uring_prep_poll_add(sqe, es.fd, POLLIN | POLLRDHUP);
    track_op(s, i, sqe, Kind::kPeekWatch);
    es.peek_watch_posted = true;
}

void Worker::on_peek_watch(Session &s, uint32_t i, int32_t res) {
    EngineSlot &es = s.slots[i];
    es.peek_watch_posted = false;
    if (es.state != ipc::SlotState::kOpen) return maybe_finish_close(s, i);
    if (res == -ECANCELED || !es.peeking) return;
    // The FIN or an error behind the peeked bytes (or no poll: ENOMEM): receiving for real
    // reports it, as the kernel would at once.
    if (res < 0 || (res & (POLLRDHUP | POLLERR | POLLHUP))) return leave_peek(s, i);
    // More bytes: peek again, here and now (they are there), and add what is new to the ring.
    const uint32_t base = es.rx_tail - es.peeked;
    const uint32_t room = ipc::kRingBytes - (base & kPeekMask);
    const ssize_t n = recv(es.fd, peek_scratch_.get(), room, MSG_PEEK | MSG_DONTWAIT);
    if (n <= static_cast<ssize_t>(es.peeked)) return leave_peek(s, i);
    const auto added = static_cast<uint32_t>(n) - es.peeked;
    std::memcpy(s.region.rx_ring(i, ipc::kRingBytes) + ((base + es.peeked) & kPeekMask),
                peek_scratch_.get() + es.peeked, added);
    es.peeked += added;
    es.rx_tail += added;
    s.region.slot(i).rx_tail.store(es.rx_tail, std::memory_order_release);
    stats_.bytes_in.fetch_add(added, std::memory_order_relaxed);
    bump_event(s, i);
    watch_peeked(s, i);
}

// Takes `bytes` out of the kernel socket without copying them (TCP's MSG_TRUNC): they are in
// the rx ring already. They are there, and only the engine reads this socket, so this cannot
// block or come up short; if it did, the kernel socket and the ring would disagree about the
// stream, so the connection is reset rather than ever handing out a byte twice.
bool Worker::discard_received(Session &s, uint32_t i, uint32_t bytes) {
    EngineSlot &es = s.slots[i];
    while (bytes > 0) {
        // The kernel writes nothing with MSG_TRUNC; the buffer is this worker's own all the same,
        // since a sanitizer's recv() takes it as written (a null one would be shared by all).
        const uint32_t chunk = std::min<uint32_t>(bytes, ipc::kRingBytes);
        const ssize_t n = recv(es.fd, peek_scratch_.get(), chunk, MSG_TRUNC | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || static_cast<uint32_t>(n) > bytes) {
            log_line(
                "worker %d: session %u slot %u: peeked bytes missing from the kernel socket "
                "(%s); resetting the connection",
                config_.index, s.id, i, n < 0 ? std::strerror(errno) : "short");
            reset_in_place(s, i);
            return false;
        }
        bytes -= static_cast<uint32_t>(n);
    }
    return true;
}

void Worker::end_peek(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.peeking) return;
    es.peeking = false;
    if (es.peek_watch_posted) cancel(s, i, Kind::kPeekWatch);
    if (es.peek_lowat) {
        const int one = 1;
        setsockopt(es.fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
        es.peek_lowat = false;
    }
    if (es.recv_posted && es.peek_posted) cancel(s, i, Kind::kRecv);  // on_recv receives again
    const uint32_t peeked = es.peeked;
    es.peeked = 0;
    discard_received(s, i, peeked);
}

void Worker::leave_peek(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.peeking) return;
    end_peek(s, i);
    if (!es.recv_posted) post_recv(s, i);
}

void Worker::post_send(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.send_posted) return;
    const bool open = es.state == ipc::SlotState::kOpen;
    const bool draining = es.state == ipc::SlotState::kClosing && !es.close_reset;
    if ((!open && !draining) || !(es.flags & ipc::kFlagConnected) ||
        (es.flags & (ipc::kFlagReset | ipc::kFlagTxShut)))
        return;
    uint32_t tail = open ? es.tx_tail : es.close_tail;
    if (es.direct == EngineSlot::Direct::kSend && open) {
        // A direct send goes after the ring's bytes queued before it, and before the rest.
        if (es.tx_sent == es.direct_tx_at) return post_direct(s, i);
        tail = es.direct_tx_at;
    }
    const uint32_t pending = tail - es.tx_sent;
    if (pending == 0) {
        if (es.shut_wr_pending && open) apply_shut_wr(s, i);
        return;
    }
    const uint32_t offset = es.tx_sent & (es.tx_ring - 1);
    uint32_t len = std::min(pending, es.tx_ring - offset);
    int flags = MSG_NOSIGNAL;
    if (es.urgent_pending) {
        // The bytes up to the urgent one go as one send(MSG_OOB): Linux makes the last byte of
        // such a send the urgent pointer's.
        const uint32_t to_urgent = es.urgent_tail - es.tx_sent;
        if (to_urgent == 0 || to_urgent > pending) {
            es.urgent_pending = false;
        } else if (to_urgent <= len) {
            len = to_urgent;
            flags |= MSG_OOB;
        }
    }
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    uint8_t *from = s.region.tx_ring(i, es.tx_ring) + offset;
    es.send_zc = open && zero_copy_fits(es, len, flags);
    if (es.send_zc)
        io_uring_prep_send_zc(sqe, es.fd, from, len, flags, kReportZeroCopyUsage);
    else
        io_uring_prep_send(sqe, es.fd, from, len, flags);
    track_op(s, i, sqe, Kind::kSend);
    es.send_posted = true;
    es.send_len = len;
}

// Zero-copy saves the kernel's copy of a large send, at the price of pinning its pages and of
// a notification once the peer has acknowledged it (only then may the client write there
// again). One such send at a time per socket: each notification then releases a known range
// (two could arrive in either order).
bool Worker::zero_copy_fits(const EngineSlot &es, uint32_t len, int flags) const {
    return !es.zc_pending && !(flags & MSG_OOB) && zero_copy_allowed(es, len);
}

// --send-zc for one send of len bytes on this socket, ring or MemNet: `auto` stops at the
// kernel's first report that it copied anyway (loopback always does).
bool Worker::zero_copy_allowed(const EngineSlot &es, uint32_t len) const {
    if (!send_zc_ || config_.send_zc == SendZeroCopy::kOff || len < kZeroCopyMinBytes) return false;
    return config_.send_zc == SendZeroCopy::kAlways || !es.zc_copies;
}

// What the kernel is done with (sent, and released if it went zero-copy) is the client's to
// write over again: publish it.
void Worker::release_tx(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.tx_head == es.tx_sent) return;
    es.tx_head = es.tx_sent;
    if (es.state == ipc::SlotState::kFree) return;
    s.region.slot(i).tx_head.store(es.tx_head, std::memory_order_release);
    bump_event(s, i);
}

void Worker::on_send(Session &s, uint32_t i, int32_t res, uint32_t cqe_flags) {
    EngineSlot &es = s.slots[i];
    if (cqe_flags & IORING_CQE_F_NOTIF) return on_send_released(s, i, res);
    if (es.send_zc) {
        es.send_zc = false;
        if (res == -EINVAL && !es.zc_pending) {
            // A kernel without IORING_SEND_ZC_REPORT_USAGE (before 6.2): copy from now on.
            log_line("worker %d: SEND_ZC refused (%s): large sends are copied", config_.index,
                     std::strerror(EINVAL));
            send_zc_ = false;
            res = -EAGAIN;  // sent again, copied, on the next tick
        }
        // IORING_CQE_F_MORE: a notification follows, and tx_head waits for it.
        if (cqe_flags & IORING_CQE_F_MORE) {
            es.zc_pending = true;
            es.zc_len = res > 0 ? static_cast<uint32_t>(res) : 0;
            stats_.ring_zc_sends.fetch_add(1, std::memory_order_relaxed);
        }
    }
    es.send_posted = false;
    es.send_len = 0;
    if (res > 0) {
        es.tx_sent += static_cast<uint32_t>(res);
        if (es.urgent_pending && static_cast<int32_t>(es.tx_sent - es.urgent_tail) >= 0)
            es.urgent_pending = false;
        es.close_progress_ns = now_ns_;
        if (!es.zc_pending) release_tx(s, i);
        stats_.bytes_out.fetch_add(res, std::memory_order_relaxed);
    } else if (res == 0 || res == -EAGAIN || res == -EINTR || res == -ENOBUFS || res == -ENOMEM) {
        schedule(s, i);  // transient: try again on the next tick, not in a tight loop
        return;
    } else if (res < 0 && res != -ECANCELED) {
        record_error(s, i, -res);
    }
    if (es.state == ipc::SlotState::kClosing) return maybe_finish_close(s, i);
    post_send(s, i);
}

// The notification of a SEND_ZC: the kernel is done with the pages it sent from, so the client
// may write over them, and over what copying sends took after it.
void Worker::on_send_released(Session &s, uint32_t i, int32_t usage) {
    EngineSlot &es = s.slots[i];
    es.zc_pending = false;
    if (static_cast<uint32_t>(usage) & kZeroCopyCopied) {
        es.zc_copies = true;
        stats_.ring_zc_copied.fetch_add(1, std::memory_order_relaxed);
    } else {
        stats_.ring_zc_bytes.fetch_add(es.zc_len, std::memory_order_relaxed);
    }
    es.zc_len = 0;
    es.close_progress_ns = now_ns_;
    release_tx(s, i);
    if (es.state == ipc::SlotState::kClosing) return maybe_finish_close(s, i);
    post_send(s, i);
}

void Worker::apply_shut_wr(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    es.shut_wr_pending = false;
    if (es.flags & ipc::kFlagTxShut) return;
    if (shutdown(es.fd, SHUT_WR) != 0 && errno != ENOTCONN) {
        record_error(s, i, errno);
        return;
    }
    update_kernel_mask(s, i);
    publish_flags(s, i, es.flags | ipc::kFlagTxShut);
    bump_event(s, i);
}

uint32_t Worker::take_free_slot(Session &s) {
    if (!has_free_slot(s)) return kNoSlot;
    const uint32_t i = s.free_engine_slots.back();
    s.free_engine_slots.pop_back();
    return i;
}

bool Worker::has_free_slot(Session &s) {
    if (!s.free_engine_slots.empty()) return true;
    const int rc = activate_chunk(s);
    if (rc != 0 && rc != -EMFILE)
        log_line("session %u: cannot map chunk %u: %s", s.id, s.chunks_active, std::strerror(-rc));
    return !s.free_engine_slots.empty();
}

uint16_t Worker::personality_for(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return 0;
    return personality_for(st.st_uid, st.st_gid);
}

uint16_t Worker::personality_for(uid_t uid, gid_t gid) {
    if (uid == geteuid() && gid == getegid()) return 0;
    const uint64_t key = (uint64_t{uid} << 32) | gid;
    for (const auto &known : personalities_)
        if (known.first == key) return known.second;
    // Registered with this thread's credentials, with the owner's ids as fsuid and fsgid: the
    // ids a socket's inode takes at creation (sock_alloc), which become the accepted socket's
    // owner (sk_uid, what ss and /proc/net/tcp show, what uid-based routing uses) and its
    // file's fsuid/fsgid (what nft's meta skuid/skgid match). Raw syscalls: glibc's wrappers
    // would change every thread of the engine.
    const long old_uid = syscall(SYS_setfsuid, uid);
    const long old_gid = syscall(SYS_setfsgid, gid);
    const int id = io_uring_register_personality(&ring_);
    syscall(SYS_setfsgid, old_gid);
    syscall(SYS_setfsuid, old_uid);
    if (id <= 0 || id > UINT16_MAX) {
        log_line("worker %d: io_uring personality for uid %u gid %u: %s", config_.index, uid, gid,
                 std::strerror(id < 0 ? -id : EINVAL));
        return 0;
    }
    personalities_.emplace_back(key, static_cast<uint16_t>(id));
    return static_cast<uint16_t>(id);
}

void Worker::post_accept(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.state != ipc::SlotState::kOpen || !(es.flags & ipc::kFlagListening) ||
        es.accept_posted || es.accept_retry || es.handed_off || es.on_demand)
        return;
    // The accept ring full is the application's own backlog (it has not taken them), which
    // pauses accepting as a full queue does. No slot, or no share left, is not: those
    // connections wait in the kernel while accept() says why (accept_error).
    int error = 0;
    auto has_room = [&] {
        if (es.acc_tail + es.acc_pending - es.acc_head >= ipc::kAcceptRingEntries) return false;
        if (!has_free_slot(s)) {
            error = EMFILE;
            return false;
        }
        if (const int rc = quotas().charge(es.quota_uid, 1, kSocketBytes); rc != 0) {
            error = -rc;
            return false;
        }
        return true;
    };
    if (!has_room()) {
        if (error != 0) return refuse_accepts(s, i, error);
        if (!(es.flags & ipc::kFlagAcceptPaused))
            publish_flags(s, i, es.flags | ipc::kFlagAcceptPaused, true);
        ipc::full_fence();
        const uint32_t acc_head = s.region.slot(i).acc_head.load(std::memory_order_acquire);
        if (!acc_head_valid(acc_head, es.acc_tail))
            return violation(s, "slot %u: acc_head %u outside the accept ring (acc_tail %u)", i,
                             acc_head, es.acc_tail);
        es.acc_head = acc_head;
        if (!has_room()) {
            if (error != 0) return refuse_accepts(s, i, error);
            return;
        }
    }
    if (es.flags & ipc::kFlagAcceptPaused) publish_flags(s, i, es.flags & ~ipc::kFlagAcceptPaused);
    set_accept_error(s, i, 0);
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) {
        quotas().release(es.quota_uid, 1, kSocketBytes);
        return schedule(s, i);
    }
    // The engine slot (and the owner's share) is taken now, so the accepted connection
    // always has a home.
    es.accept_reserved = take_free_slot(s);
    io_uring_prep_accept(sqe, es.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    sqe->personality = es.accept_personality;
    track_op(s, i, sqe, Kind::kAccept);
    es.accept_posted = true;
}

void Worker::set_accept_error(Session &s, uint32_t i, int error) {
    ipc::SocketSlot &slot = s.region.slot(i);
    if (slot.accept_error.load(std::memory_order_relaxed) == error) return;
    slot.accept_error.store(error, std::memory_order_release);
    bump_event(s, i);
}

void Worker::refuse_accepts(Session &s, uint32_t i, int error) {
    // Said only while a connection really waits in the kernel's queue, as Linux's accept()
    // fails with EMFILE only then; looked at again on every tick until there is room.
    pollfd p{s.slots[i].fd, POLLIN, 0};
    const bool waiting = poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
    if (waiting && s.region.slot(i).accept_error.load(std::memory_order_relaxed) == 0)
        TCPS_LOG_VERBOSE("session %u slot %u: cannot accept: %s", s.id, i, std::strerror(error));
    set_accept_error(s, i, waiting ? error : 0);
    s.slots[i].accept_retry = true;
    schedule(s, i);
}

void Worker::on_accept(Session &s, uint32_t i, int32_t res) {
    EngineSlot &es = s.slots[i];
    es.accept_posted = false;
    const uint32_t reserved = es.accept_reserved;
    es.accept_reserved = kNoSlot;
    if (es.state != ipc::SlotState::kOpen || res < 0) {
        if (reserved != kNoSlot) {
            s.free_engine_slots.push_back(reserved);
            quotas().release(es.quota_uid, 1, kSocketBytes);
        }
        if (res >= 0) {
            close(res);  // the listener is closing
        } else if (es.state == ipc::SlotState::kOpen) {
            if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM) {
                // The engine's own limits: to the application, the system's. Said in accept()
                // while connections wait, and retried on every tick.
                TCPS_LOG_VERBOSE("session %u slot %u: accept: %s; retrying", s.id, i,
                                 std::strerror(-res));
                refuse_accepts(s, i, res == -EMFILE ? ENFILE : -res);
            } else if (res == -EINVAL) {
                // Not listening any more (shutdown(SHUT_RD) on the listener).
            } else if (res != -ECANCELED) {
                post_accept(s, i);  // ECONNABORTED and friends concern one connection only
            }
        }
        if (es.state == ipc::SlotState::kClosing) maybe_finish_close(s, i);
        return;
    }
    deliver_accepted(s, i, reserved, res, false);
    post_accept(s, i);
}

void Worker::deliver_accepted(Session &s, uint32_t i, uint32_t j, int fd, bool parked) {
    EngineSlot &es = s.slots[i];
    // Before the accept returns, as on Linux: the family's own connect that this is settles
    // first (issue 10). Connecting sockets are the home's.
    if (!connecting_.empty()) {
        sockaddr_storage peer;
        socklen_t peer_len = sizeof(peer);
        if (getpeername(fd, reinterpret_cast<sockaddr *>(&peer), &peer_len) == 0)
            settle_connect_of(peer, peer_len);
    }
    const AcceptedFrom from{es.family, es.quota_uid, es.rcvlowat, i, es.gen, parked};
    if (s.family) {
        // The family's connections go to its workers in turn. One given away is published
        // once that worker has placed it; those accepted after it wait behind it, so that the
        // application takes them in the kernel's order.
        // Parked workers (--min-workers) are passed over; the home takes it if all are.
        const uint32_t shard = next_shard(s, false);
        if (shard != 0 || !s.pending_accepts.empty()) {
            PendingAccept pending;
            pending.seq = s.next_accept_seq++;
            pending.listener = i;
            pending.listener_gen = es.gen;
            pending.from = from;
            if (shard == 0) {
                setup_accepted(s, j, fd, from);
                pending.slot = j;
                pending.placed = true;
            } else {
                pending.fallback = j;
                ShardMessage message = message_for(s, ShardMessage::Type::kAccepted);
                message.seq = pending.seq;
                message.fd = fd;
                message.accepted = from;
                s.family->workers[shard]->post(std::move(message));
            }
            s.pending_accepts.push_back(pending);
            ++es.acc_pending;
            return;
        }
    }
    setup_accepted(s, j, fd, from);
    publish_accepted(s, i, j);
}

void Worker::setup_accepted(Session &s, uint32_t j, int fd, const AcceptedFrom &from) {
    init_slot(s, j, fd, from.family, ipc::kFlagConnected | ipc::kFlagBound);
    EngineSlot &conn = s.slots[j];
    conn.quota_uid = from.quota_uid;
    conn.rcvlowat = from.rcvlowat;  // inherited from the listener, as the kernel does
    // Its first bytes are peeked (EngineSlot::peeking): not for a remote session, whose client
    // cannot pass a socket on, nor with a low-water mark above 1, which the first segment
    // might not reach while nothing more is received.
    conn.peeking = !s.remote && conn.rcvlowat <= 1;
    if (from.parked) {
        // Bytes its first owner's engine had taken from the kernel socket come first.
        std::vector<uint8_t> bytes = parked_bytes().claim(fd);
        if (!bytes.empty()) {
            conn.prefix = std::make_unique<std::vector<uint8_t>>(std::move(bytes));
            conn.peeking = false;
        }
        stats_.unparked_connections.fetch_add(1, std::memory_order_relaxed);
    }
    // Saturated (seed 003): the application serves this one with the kernel; accept() takes
    // its kernel socket, of which nothing was read.
    if (!s.remote && gauge_.saturated() && !conn.prefix) {
        conn.kernel_served = true;
        conn.peeking = false;
        publish_flags(s, j, conn.flags | ipc::kFlagKernelServed);
        stats_.kernel_served.fetch_add(1, std::memory_order_relaxed);
    }
    conn.accepted_by = from.listener;
    conn.accepted_by_gen = from.listener_gen;
    note_connected(s, j);
    update_kernel_mask(s, j);
    ipc::SocketSlot &conn_slot = s.region.slot(j);
    conn.last_req_seq = conn_slot.req_seq.load(std::memory_order_acquire);
    conn_slot.resp_seq.store(conn.last_req_seq, std::memory_order_relaxed);
    publish_open(s, j);
    post_recv(s, j);
    // A parked one was counted when it was first accepted (unparked counts it again).
    if (!from.parked) stats_.accepts.fetch_add(1, std::memory_order_relaxed);
}

void Worker::publish_accepted(Session &s, uint32_t i, uint32_t j) {
    EngineSlot &es = s.slots[i];
    if (s.region.mapped(j)) s.slots[j].accept_pos = es.acc_tail;
    // Only now that the slot is complete (whichever worker completed it: its message to us
    // ordered its stores before ours).
    ipc::SocketSlot &listener = s.region.slot(i);
    listener.accept_ring[es.acc_tail & kAcceptMask] = j;
    ++es.acc_tail;
    listener.acc_tail.store(es.acc_tail, std::memory_order_release);
    bump_event(s, i);
}

void Worker::publish_accepts(Session &s) {
    while (!s.pending_accepts.empty() && s.pending_accepts.front().placed) {
        const PendingAccept p = s.pending_accepts.front();
        s.pending_accepts.pop_front();
        EngineSlot &listener = s.slots[p.listener];
        const bool same = listener.gen == p.listener_gen;
        if (same && listener.acc_pending > 0) --listener.acc_pending;
        if (same && listener.state == ipc::SlotState::kOpen) {
            publish_accepted(s, p.listener, p.slot);
            // A listener being passed on waits for these before it parks its untaken ones.
            if (listener.handoff_member != kNoMember) maybe_finish_handoff(s, p.listener);
        } else {
            drop_placed(s, p);  // its listener closed meanwhile: it dies with it
            // Its close waits for the connections still being placed (maybe_finish_close).
            if (same && listener.state == ipc::SlotState::kClosing)
                maybe_finish_close(s, p.listener);
        }
    }
}

void Worker::drop_placed(Session &s, const PendingAccept &p) {
    if (p.shard == 0) return start_close(s, p.slot, true);
    ShardMessage message = message_for(s, ShardMessage::Type::kDrop);
    message.slot = p.slot;
    message.accepted = p.from;
    message.result = 1;  // close it
    s.family->workers[p.shard]->post(std::move(message));
    EngineSlot &listener = s.slots[p.from.listener];
    if (listener.gen == p.from.listener_gen && listener.state == ipc::SlotState::kClosing)
        ++listener.drops_pending;
}

void Worker::resume_listeners(Session &s) {
    for (uint32_t li : s.listeners)
        if (s.slots[li].flags & ipc::kFlagAcceptPaused) post_accept(s, li);
}

void Worker::post_connect_poll(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.connect_posted) return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    io_uring_prep_poll_add(sqe, es.fd, POLLOUT);
    track_op(s, i, sqe, Kind::kConnect);
    es.connect_posted = true;
}

void Worker::track_connect(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    sockaddr_storage local;
    socklen_t len = sizeof(local);
    if (es.connect_tracked || getsockname(es.fd, reinterpret_cast<sockaddr *>(&local), &len) != 0 ||
        !address_key(&local, len, es.connect_key))
        return;
    connecting_[es.connect_key] = {s.index, s.gen, i, es.gen};
    es.connect_tracked = true;
}

void Worker::untrack_connect(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.connect_tracked) return;
    es.connect_tracked = false;
    const auto found = connecting_.find(es.connect_key);
    if (found != connecting_.end() && found->second.session_index == s.index &&
        found->second.slot == i)
        connecting_.erase(found);
}

void Worker::settle_connect_of(const sockaddr_storage &peer, socklen_t len) {
    AddressKey key;
    if (!address_key(&peer, len, key)) return;
    const auto found = connecting_.find(key);
    if (found == connecting_.end()) return;
    const TimedSlot target = found->second;
    Session *s = table_[target.session_index].get();
    if (!s || s->gen != target.session_gen || s->ending) return;
    EngineSlot &es = s->slots[target.slot];
    if (es.gen != target.slot_gen || es.state != ipc::SlotState::kOpen ||
        !(es.flags & ipc::kFlagConnecting))
        return;
    sockaddr_storage theirs;
    socklen_t theirs_len = sizeof(theirs);
    // Its handshake is through (the kernel queued the connection we took): connected now.
    if (getpeername(es.fd, reinterpret_cast<sockaddr *>(&theirs), &theirs_len) == 0) {
        untrack_connect(*s, target.slot);
        on_connected(*s, target.slot);
    }
}

static void store_address(ipc::SockAddrRecord &record, const sockaddr_storage &addr,
                          socklen_t len) {
    const uint32_t n = std::min<uint32_t>(len, ipc::kSockAddrMax);
    std::memcpy(record.bytes, &addr, n);
    record.len = n;
}

void Worker::note_connected(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    ipc::SocketSlot &slot = s.region.slot(i);
    sockaddr_storage local, peer;
    socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
    const bool have_local =
        getsockname(es.fd, reinterpret_cast<sockaddr *>(&local), &local_len) == 0;
    const bool have_peer = getpeername(es.fd, reinterpret_cast<sockaddr *>(&peer), &peer_len) == 0;
    if (have_local) store_address(slot.local_addr, local, local_len);
    if (have_peer) store_address(slot.peer_addr, peer, peer_len);
    if (es.connected_tracked || !have_local || !have_peer ||
        !address_key(&local, local_len, es.connected_key) ||
        !address_key(&peer, peer_len, es.connected_peer))
        return;
    connected_.emplace(es.connected_key, TimedSlot{s.index, s.gen, i, es.gen});
    es.connected_tracked = true;
}

void Worker::untrack_connected(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.connected_tracked) return;
    es.connected_tracked = false;
    auto [first, last] = connected_.equal_range(es.connected_key);
    for (auto it = first; it != last; ++it) {
        if (it->second.session_index == s.index && it->second.slot == i) {
            connected_.erase(it);
            return;
        }
    }
}

void Worker::reset_now(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    // tcp_disconnect() sends the RST within this call (a close() might only drop our
    // reference while io_uring still holds the file), and on loopback the peer's kernel
    // socket is reset before it returns.
    sockaddr unspec{};
    unspec.sa_family = AF_UNSPEC;
    connect(es.fd, &unspec, sizeof(unspec));
    if (!es.connected_tracked) return;
    const AddressKey ours = es.connected_key;
    untrack_connected(s, i);
    if (peer_reset_here(ours, es.connected_peer)) return;
    // A peer on this host (the same address at both ends) may be served by another worker:
    // each one looks, and the close is answered once all have (maybe_finish_close), so that
    // the peer's next call sees the reset, as on Linux.
    if (!s.family || !same_host(ours, es.connected_peer)) return;
    ShardMessage message = message_for(s, ShardMessage::Type::kPeerReset);
    message.slot = i;
    message.seq = es.gen;
    message.key = ours;
    message.peer_key = es.connected_peer;
    for (Worker *worker : s.family->workers) {
        if (worker == this) continue;
        ShardMessage copy = message;
        worker->post(std::move(copy));
        ++es.peer_resets_pending;
    }
}

bool Worker::same_host(const AddressKey &a, const AddressKey &b) {
    return a.family == b.family && std::memcmp(a.addr, b.addr, sizeof(a.addr)) == 0;
}

bool Worker::peer_reset_here(const AddressKey &ours, const AddressKey &peer_key) {
    auto [first, last] = connected_.equal_range(peer_key);
    for (auto it = first; it != last; ++it) {
        const TimedSlot target = it->second;
        Session *ps = table_[target.session_index].get();
        if (!ps || ps->gen != target.session_gen || ps->ending) continue;
        EngineSlot &peer = ps->slots[target.slot];
        if (peer.gen != target.slot_gen || peer.state != ipc::SlotState::kOpen ||
            (peer.flags & ipc::kFlagReset) || !(peer.connected_peer == ours))
            return true;
        // Only with nothing of ours still in its kernel socket, so that no byte sent before the
        // RST is overtaken by it (the receive in flight brings those, then the error).
        int unread = 1;
        int error = 0;
        socklen_t len = sizeof(error);
        if (ioctl(peer.fd, SIOCINQ, &unread) != 0 || unread != 0 ||
            getsockopt(peer.fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error == 0)
            return true;
        record_error(*ps, target.slot, error);
        return true;
    }
    return false;
}

void Worker::on_peer_reset_answer(Session *s, const ShardMessage &message) {
    const uint32_t i = message.slot;
    if (!s || !s->region.mapped(i)) return;
    EngineSlot &es = s->slots[i];
    if (es.gen != message.seq || es.peer_resets_pending == 0) return;
    if (--es.peer_resets_pending == 0) maybe_finish_close(*s, i);
}

void Worker::on_connect(Session &s, uint32_t i, int32_t res) {
    EngineSlot &es = s.slots[i];
    es.connect_posted = false;
    if (es.state != ipc::SlotState::kOpen) return maybe_finish_close(s, i);
    if (res == -ECANCELED || !(es.flags & ipc::kFlagConnecting)) return;
    int error = 0;
    socklen_t len = sizeof(error);
    if (getsockopt(es.fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    if (error == 0 && res < 0) error = -res;
    if (error == 0) {
        sockaddr_storage peer;
        socklen_t peer_len = sizeof(peer);
        if (getpeername(es.fd, reinterpret_cast<sockaddr *>(&peer), &peer_len) == 0)
            return on_connected(s, i);
        if (errno != ENOTCONN) {
            error = errno;
        } else if (res > 0 && (res & (POLLHUP | POLLERR))) {
            error = ECONNRESET;
        } else {
            return post_connect_poll(s, i);  // woke early: still connecting
        }
    }
    record_error(s, i, error);
}

void Worker::on_connected(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    untrack_connect(s, i);
    note_connected(s, i);
    update_kernel_mask(s, i);
    // Reset/RxEof may remain from a failed earlier attempt when a retry connects at once.
    publish_flags(s, i,
                  (es.flags & ~(ipc::kFlagConnecting | ipc::kFlagReset | ipc::kFlagRxEof)) |
                      ipc::kFlagConnected | ipc::kFlagBound);
    bump_event(s, i);
    post_recv(s, i);
    post_send(s, i);
    // Tests (semantics_shed): every connection meets the hand-back at its first call.
    if (config_.ask_back_at_once && gauge_.saturated() && sheddable(s, i)) ask_back(s, i);
}

void Worker::post_watch(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.watch_posted || es.state != ipc::SlotState::kOpen || !(es.flags & ipc::kFlagConnected) ||
        (es.flags & ipc::kFlagReset) || es.handed_off)
        return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    // Multishot: io_uring always adds POLLRDHUP to a poll's events, and after the FIN it
    // stays set, so a one-shot poll would complete at once. This one completes on every
    // wake-up that matches (state changes, errors); on_watch looks for POLLERR|POLLHUP.
    io_uring_prep_poll_multishot(sqe, es.fd, POLLERR | POLLHUP);
    track_op(s, i, sqe, Kind::kWatch);
    es.watch_posted = true;
}

void Worker::look_for_urgent_mark(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    ipc::SocketSlot &slot = s.region.slot(i);
    int at_mark = 0;
    if (ioctl(es.fd, SIOCATMARK, &at_mark) == 0 && at_mark) {
        slot.urgent_mark.store(es.rx_tail, std::memory_order_relaxed);
        if (!(es.flags & ipc::kFlagUrgentMark))
            publish_flags(s, i, es.flags | ipc::kFlagUrgentMark);
    }
    const uint32_t before = slot.kernel_mask.load(std::memory_order_relaxed);
    update_kernel_mask(s, i);
    const uint32_t now = slot.kernel_mask.load(std::memory_order_relaxed);
    if ((before ^ now) & POLLPRI) bump_event(s, i);
    // The urgent byte was read: a poll in flight that leaves POLLPRI out would miss the next.
    if (es.recv_polling && !(now & POLLPRI) && !(es.poll_events & POLLPRI))
        cancel(s, i, Kind::kRecv);
}

void Worker::on_watch(Session &s, uint32_t i, int32_t res, bool more) {
    EngineSlot &es = s.slots[i];
    if (!more) es.watch_posted = false;
    if (es.state != ipc::SlotState::kOpen) {
        if (!more) maybe_finish_close(s, i);
        return;
    }
    if (res == -ECANCELED || (es.flags & ipc::kFlagReset)) return;
    // Ended without an error to report (ENOMEM, a full CQ): armed again on the next tick.
    if (!more) schedule(s, i);
    if (res < 0 || !(res & (POLLERR | POLLHUP))) return;  // POLLRDHUP alone: the FIN we know
    int error = 0;
    socklen_t len = sizeof(error);
    if (getsockopt(es.fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    if (error != 0) {
        // After the peer's FIN, Linux reports an RST as EPIPE (tcp_reset() in CLOSE_WAIT).
        record_error(s, i, error);
        if (es.watch_posted) cancel(s, i, Kind::kWatch);
        return;
    }
    // POLLHUP without an error: both directions are shut (our FIN went, theirs came), or a
    // send already collected the error and reports it.
    update_kernel_mask(s, i);
    bump_event(s, i);
}

// ---------------------------------------------------------------------------------------------
// Control socket of a session

void Worker::on_control(Session &s, uint32_t member, int32_t res) {
    if (s.ending || s.members[member].state != ipc::MemberState::kLive) return;
    const int fd = s.members[member].control_fd;
    if (res < 0 && res != -ECANCELED) return end_member(s, member, "control socket poll failed");
    for (int k = 0; k < 16; ++k) {
        ipc::ControlMessage msg;
        int received = -1;
        ipc::ControlCreds creds;
        const int rc = ipc::recv_control(fd, msg, &received, 1, MSG_DONTWAIT, &creds);
        if (rc == -EAGAIN || rc == -EWOULDBLOCK) break;
        if (rc == -ECONNRESET) return end_member(s, member, "client closed its control socket");
        if (rc == -EPROTO) return violation(s, "malformed control message");
        if (rc < 0) return end_member(s, member, "control socket error");
        handle_control_message(s, member, msg, received, creds);
        if (s.ending || s.members[member].state != ipc::MemberState::kLive) return;
    }
    post_control_poll(s, member);
}

void Worker::handle_control_message(Session &s, uint32_t member, const ipc::ControlMessage &msg,
                                    int fd, const ipc::ControlCreds &creds) {
    const auto type = static_cast<ipc::ControlType>(msg.type);
    if (type == ipc::ControlType::kRegisterWaiter) return register_waiter(s, member, fd);
    if (type == ipc::ControlType::kRegisterMem) return register_mem(s, member, msg, fd);
    if (type == ipc::ControlType::kAdoptSocket)
        return adopt_socket(s, member, fd, creds, msg.reserved & ipc::kAdoptOnDemand);
    if (fd >= 0) close(fd);
    if (type == ipc::ControlType::kDeregisterMem) return deregister_mem(s, member, msg.arg);
    if (type == ipc::ControlType::kNewSocket) return new_socket(s, member, msg.arg, creds);
    if (type == ipc::ControlType::kReserveMember) return reserve_member(s, member);
    if (type == ipc::ControlType::kReleaseWaiters) return release_waiters(s, member);
    if (type == ipc::ControlType::kHandoff) return start_handoff(s, member, msg.arg, msg.reserved);
    violation(s, "unexpected control message type %u", msg.type);
}

void Worker::new_socket(Session &s, uint32_t member, int family, const ipc::ControlCreds &creds) {
    const Member &m = s.members[member];
    int result = 0;
    uint32_t i = kNoSlot;
    if (s.client_slots != 0) return violation(s, "kNewSocket in a session whose client claims");
    // The kernel vouches for these ids (it refuses any the sender does not hold); the pid must
    // be the member's own, so the namespace we look up is its.
    if (!creds.present || creds.pid != m.creds.pid) {
        result = -EPERM;
    } else if (family != AF_INET && family != AF_INET6) {
        result = -EAFNOSUPPORT;
    } else if ((result = quotas().charge(creds.uid, 1, kSocketBytes)) == 0) {
        i = take_free_slot(s);
        int fd = -EMFILE;  // the family has all 2^20 of its slots
        if (i != kNoSlot) fd = create_socket_as(family, creds.uid, creds.gid, creds.pid);
        if (fd < 0) {
            if (i != kNoSlot) s.free_engine_slots.push_back(i);
            i = kNoSlot;
            quotas().release(creds.uid, 1, kSocketBytes);
            // The engine's own descriptor limit is, to the client, the system's.
            result = fd == -EMFILE && !s.free_engine_slots.empty() ? -ENFILE : fd;
        } else {
            init_slot(s, i, fd, family, 0);
            s.slots[i].quota_uid = creds.uid;
            publish_open(s, i);
        }
    }
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kNewSocketReply);
    reply.version = ipc::kLayoutVersion;
    reply.result = result;
    reply.arg = static_cast<int32_t>(i);
    reply.session_id = s.id;
    if (!reply_control(s, member, reply) && i != kNoSlot && !s.ending)
        start_close(s, i, true);  // nobody will ever hold it
}

void Worker::adopt_socket(Session &s, uint32_t member, int fd, const ipc::ControlCreds &creds,
                          bool on_demand) {
    const Member &m = s.members[member];
    int result = 0;
    int family = 0;
    bool listening = false;
    if (s.client_slots != 0) {
        if (fd >= 0) close(fd);
        return violation(s, "kAdoptSocket in a session whose client claims");
    }
    if (fd < 0) {
        result = -EBADF;
    } else if (!creds.present || creds.pid != m.creds.pid) {
        result = -EPERM;  // as kNewSocket: the socket counts against the sender's own uid
    } else {
        result = adoptable_socket(fd, family, listening, parked_bytes().error_for(fd) != 0);
    }
    // Listeners are the home's, as the family's own are.
    if (result == 0 && s.family && !listening) {
        // The family's sockets go to its workers in turn, as accepted connections do.
        if (const uint32_t shard = next_shard(s, true); shard != 0) {
            ShardMessage message = message_for(s, ShardMessage::Type::kAdopt);
            message.member = member;
            message.fd = fd;
            message.accepted.family = family;
            message.accepted.quota_uid = creds.uid;
            s.family->workers[shard]->post(std::move(message));
            return;  // the shard answers through us (kAdopted)
        }
    }
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kAdoptSocketReply);
    reply.version = ipc::kLayoutVersion;
    reply.arg = -1;
    reply.session_id = s.id;
    if (result == 0 && listening) {
        result = setup_adopted_listener(s, fd, family, creds, on_demand, reply);
        if (result == 0) fd = -1;  // the slot's, or a copy of one it has
    } else if (result == 0) {
        result = setup_adopted(s, fd, family, creds.uid, reply);
    }
    reply.result = result;
    if (result != 0 && fd >= 0) close(fd);  // refused: the socket is the client's alone
    answer_adopt(s, member, reply);
}

// A listener passed on with SCM_RIGHTS (or any kernel listener a client offers): served as if
// the client had made it here, and the connections parked for it when an engine slot handed it
// back (ParkedConnections) come first in its accept ring. Never refused for load: a saturated
// worker leaves the connections it accepts to the kernel anyway (handoff at accept).
int Worker::setup_adopted_listener(Session &s, int fd, int family, const ipc::ControlCreds &creds,
                                   bool on_demand, ipc::ControlMessage &reply) {
    const uid_t uid = creds.uid;
    uint64_t cookie = 0;
    if (!socket_cookie(fd, cookie)) return -ENOTSOCK;
    // The family serves it already (a second descriptor of it came, or another member offered
    // it first): one slot, so that one accept ring holds what the one kernel queue would.
    uint32_t i = kNoSlot;
    for (const uint32_t k : s.listeners) {
        const EngineSlot &other = s.slots[k];
        if (other.listener_cookie == cookie && other.state == ipc::SlotState::kOpen &&
            !other.handed_off)
            i = k;
    }
    if (i != kNoSlot) {
        close(fd);
    } else {
        // Its connections inherit the application's low-water mark (open_adopted).
        if (const int rc = open_adopted(s, fd, family, uid, ipc::kFlagListening, i); rc != 0)
            return rc;
        EngineSlot &es = s.slots[i];
        es.listener_cookie = cookie;
        s.listeners.push_back(i);
        // What it accepts is the adopter's, as if it had accepted it (the kernel's accept()
        // makes the new socket with the caller's ids, whoever made the listener).
        es.accept_personality = personality_for(uid, creds.gid);
        if (on_demand) serve_on_demand(s, i);
        refresh_local_address(s, i);
        update_kernel_mask(s, i);
        publish_open(s, i);
        stats_.adopted_listeners.fetch_add(1, std::memory_order_relaxed);
    }
    // The parked connections, in the order they were accepted, each in a slot of its own as
    // an accept's would be; one there is no room for is reset, as a full queue drops.
    uint64_t served = 0;
    const EngineSlot &listener = s.slots[i];
    const ipc::SocketSlot &listener_shm = s.region.slot(i);
    for (const int conn : parked_connections().claim(cookie)) {
        // Room in its accept ring (a listener the family served already may hold some).
        const uint32_t acc_head = listener_shm.acc_head.load(std::memory_order_acquire);
        const bool room =
            acc_head_valid(acc_head, listener.acc_tail) &&
            listener.acc_tail + listener.acc_pending - acc_head < ipc::kAcceptRingEntries;
        const bool charged = room && quotas().charge(uid, 1, kSocketBytes) == 0;
        const uint32_t j = charged ? take_free_slot(s) : kNoSlot;
        if (j == kNoSlot) {
            if (charged) quotas().release(uid, 1, kSocketBytes);
            reset_parked_connection(conn);
            continue;
        }
        deliver_accepted(s, i, j, conn, true);
        ++served;
    }
    reply.token = served;
    reply.arg = static_cast<int32_t>(i);
    post_accept(s, i);
    return 0;
}

// A slot for the kernel socket `fd` a client offered (kAdoptSocket), charged to `uid`: in `i`,
// or -errno. The application's low-water mark is the engine's to keep (ops.cpp); the kernel
// socket's goes back to 1 so that receives keep filling the ring (a listener's connections
// inherit it).
int Worker::open_adopted(Session &s, int fd, int family, uid_t uid, uint32_t flags, uint32_t &i) {
    if (const int rc = quotas().charge(uid, 1, kSocketBytes); rc != 0) return rc;
    i = take_free_slot(s);
    if (i == kNoSlot) {
        quotas().release(uid, 1, kSocketBytes);
        return -EMFILE;  // the family has all 2^20 of its slots
    }
    init_slot(s, i, fd, family, flags | ipc::kFlagBound);
    EngineSlot &es = s.slots[i];
    es.quota_uid = uid;
    int lowat = 1;
    socklen_t len = sizeof(lowat);
    if (getsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, &len) == 0 && lowat > 1) {
        es.rcvlowat = lowat;
        const int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
    }
    return 0;
}

int Worker::setup_adopted(Session &s, int fd, int family, uid_t uid, ipc::ControlMessage &reply) {
    // Saturated, or too close to it (seed 003, LoadGauge::has_room): the socket stays with the
    // kernel, unless bytes received before it was passed on wait for it here (they must come
    // first). Under --handoff-load, at most 8 or an eighth of the worker's connections per
    // load window, as it sheds them: its load rises in steps that the 20 points between its
    // watermarks can usually hold, rather than past the high one at once (no ping-pong).
    // Said in the answer even when the socket is refused (no slot, no share left), so that the
    // client does not serve the connection from its kernel socket without them.
    reply.token = parked_bytes().bytes_for(fd);
    if (!parked_bytes().holds(fd)) {
        if (!gauge_.has_room()) return -EBUSY;
        if (config_.handoff_load >= 0 &&
            adopted_this_window_ >= std::max<size_t>(8, connected_.size() / 8))
            return -EBUSY;
    }
    uint32_t i = kNoSlot;
    if (const int rc = open_adopted(s, fd, family, uid, ipc::kFlagConnected, i); rc != 0) return rc;
    EngineSlot &es = s.slots[i];
    int parked_error = 0;
    std::vector<uint8_t> bytes = parked_bytes().claim(fd, &parked_error);
    reply.token = bytes.size();
    if (!bytes.empty()) es.prefix = std::make_unique<std::vector<uint8_t>>(std::move(bytes));
    note_connected(s, i);
    update_kernel_mask(s, i);
    // The reset its sender's engine took from the kernel socket: reported after the parked
    // bytes (feed_prefix), as the kernel reports sk_err after its receive queue.
    if (es.prefix)
        es.prefix_error = parked_error;
    else if (parked_error != 0)
        record_error(s, i, parked_error);
    publish_open(s, i);
    stats_.adopted.fetch_add(1, std::memory_order_relaxed);
    ++adopted_this_window_;
    reply.arg = static_cast<int32_t>(i);
    post_recv(s, i);
    return 0;
}

void Worker::place_adopted(Session *s, ShardMessage &message) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kAdoptSocketReply);
    reply.version = ipc::kLayoutVersion;
    reply.arg = -1;
    reply.session_id = message.session_id;
    reply.result = -ECONNRESET;  // the family is ending
    if (s)
        reply.result = setup_adopted(*s, message.fd, message.accepted.family,
                                     message.accepted.quota_uid, reply);
    if (reply.result == 0) message.fd = -1;  // the slot's now (else handle_message closes it)
    ShardMessage answer;
    answer.type = ShardMessage::Type::kAdopted;
    answer.session_id = message.session_id;
    answer.from = this;
    answer.from_shard = s ? s->shard : 0;
    answer.member = message.member;
    answer.reply = reply;
    message.from->post(std::move(answer));
}

void Worker::answer_adopt(Session &s, uint32_t member, const ipc::ControlMessage &reply) {
    const bool delivered =
        s.members[member].state == ipc::MemberState::kLive && reply_control(s, member, reply);
    if (delivered || reply.result != 0 || reply.arg < 0 || s.ending) return;
    // Nobody will ever hold it: the member's process is gone with its descriptor (else it
    // still reads its replies). Closed where it lives.
    const auto i = static_cast<uint32_t>(reply.arg);
    if (const uint32_t owner = s.shard_of(i); owner != 0) {
        ShardMessage message = message_for(s, ShardMessage::Type::kDrop);
        message.slot = i;
        message.accepted.listener = kNoSlot;
        message.result = 1;
        s.family->workers[owner]->post(std::move(message));
        return;
    }
    start_close(s, i, true);
}

bool Worker::pause_full_rx(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    // Pause, then look at rx_head once more so a client that freed space just before seeing
    // the flag is not missed (it rings only when it sees the flag).
    if (!(es.flags & ipc::kFlagRxPaused)) publish_flags(s, i, es.flags | ipc::kFlagRxPaused, true);
    ipc::full_fence();
    const uint32_t rx_head = s.region.slot(i).rx_head.load(std::memory_order_acquire);
    if (!rx_head_valid(rx_head, es.rx_tail, es.rx_ring)) {
        violation(s, "slot %u: rx_head %u outside the rx ring (rx_tail %u)", i, rx_head,
                  es.rx_tail);
        return false;
    }
    es.rx_head = rx_head;
    return true;
}

bool Worker::feed_prefix(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.prefix) return true;
    ipc::SocketSlot &slot = s.region.slot(i);
    // Full: the client rings once it has read (kFlagRxPaused), as for any full ring.
    if (es.rx_room() == 0 && (!pause_full_rx(s, i) || es.rx_room() == 0)) return false;
    const std::vector<uint8_t> &bytes = *es.prefix;
    const size_t n = std::min<size_t>(es.rx_room(), bytes.size() - es.prefix_at);
    ipc::ring_copy_in(s.region.rx_ring(i, es.rx_ring), es.rx_ring, es.rx_tail,
                      bytes.data() + es.prefix_at, n);
    es.prefix_at += static_cast<uint32_t>(n);
    es.rx_tail += static_cast<uint32_t>(n);
    slot.rx_tail.store(es.rx_tail, std::memory_order_release);
    stats_.unparked_bytes.fetch_add(n, std::memory_order_relaxed);
    bump_event(s, i);
    if (es.prefix_at < bytes.size()) return false;
    es.prefix.reset();
    es.prefix_at = 0;
    if (es.prefix_error != 0) {
        record_error(s, i, std::exchange(es.prefix_error, 0));
        return false;  // nothing more to receive: the kernel socket was reset
    }
    return true;
}

bool Worker::reply_control(Session &s, uint32_t member, const ipc::ControlMessage &reply) {
    const int rc = ipc::send_control(s.members[member].control_fd, reply, nullptr, 0);
    if (rc == -EAGAIN || rc == -EWOULDBLOCK) {
        violation(s, "client does not read its control replies");
        return false;
    }
    if (rc < 0) {
        end_member(s, member, "control socket error");
        return false;
    }
    return true;
}

void Worker::register_waiter(Session &s, uint32_t member, int fd) {
    int result = 0;
    int flags = -1;
    int own = -1;
    struct stat st;
    const uid_t uid = s.members[member].creds.uid;
    if (fd < 0) {
        result = -EINVAL;
    } else if ((result = quotas().charge(uid, 1, 0)) != 0) {
        // This uid holds its share of the engine's descriptors: its thread naps instead.
    } else if (fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode) || (flags = fcntl(fd, F_GETFL)) < 0 ||
               ((flags & O_ACCMODE) != O_WRONLY && (flags & O_ACCMODE) != O_RDWR)) {
        result = -EINVAL;  // only a pipe the client can write: the engine writes one byte
    } else {
        // Our own open file description of the same pipe, non-blocking: O_NONBLOCK on the
        // one we received is shared with the client, which could clear it and make our
        // write block. The client already holds this pipe open for writing, so reopening it
        // for writing gives the client nothing new.
        char proc_path[64];
        std::snprintf(proc_path, sizeof(proc_path), "/proc/self/fd/%d", fd);
        own = open(proc_path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (own < 0) result = -EINVAL;  // e.g. ENXIO: nobody holds the read end
    }
    if (fd >= 0) close(fd);
    if (result == -EINVAL && fd >= 0) quotas().release(uid, 1, 0);
    int32_t index = -1;
    if (result == 0) {
        for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) {
            if (s.waiter_owner[w] == kNoMember && s.waiter_fds[w] < 0) {
                index = static_cast<int32_t>(w);
                break;
            }
        }
        if (index < 0) {
            close(own);
            quotas().release(uid, 1, 0);
            result = -ENOSPC;
        }
    }
    if (result == 0) {
        install_waiter(s, static_cast<uint32_t>(index), own, static_cast<uint16_t>(member), uid);
        share_waiter(s, static_cast<uint32_t>(index));  // before the reply: see share_waiter
    }
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kWaiterReply);
    reply.version = ipc::kLayoutVersion;
    reply.arg = index;
    reply.result = result;
    reply.session_id = s.id;
    reply_control(s, member, reply);
}

void Worker::release_waiters(Session &s, uint32_t member) {
    for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) {
        if (s.waiter_owner[w] != member) continue;
        close_waiter(s, w);
        share_waiter(s, w);
    }
}

void Worker::start_handoff(Session &s, uint32_t member, int32_t slot, uint32_t how) {
    // Another worker's connection: it answers through us.
    if (const uint32_t owner =
            slot >= 0 && !s.is_shard() ? s.shard_of(static_cast<uint32_t>(slot)) : 0;
        owner != 0) {
        ShardMessage message = message_for(s, ShardMessage::Type::kHandoff);
        message.member = member;
        message.slot = static_cast<uint32_t>(slot);
        message.seq = how;
        s.family->workers[owner]->post(std::move(message));
        return;
    }
    if (how & ipc::kHandoffTwin) {
        if (slot < 0) slot = static_cast<int32_t>(ipc::kMaxSockets);  // no such slot
        return give_twin(s, member, static_cast<uint32_t>(slot));
    }
    const bool park = how & ipc::kHandoffPark, shed = how & ipc::kHandoffShed;
    int refusal = 0;
    if (slot < 0 || !s.region.mapped(static_cast<uint32_t>(slot)) ||
        s.slots[slot].state != ipc::SlotState::kOpen || s.slots[slot].handed_off)
        refusal = -EBADF;
    else if (shed && s.slots[slot].shed_asked &&
             (!gauge_.saturated() || (s.slots[slot].flags & kConnectionEnded))) {
        // An ask left over from a hand-back that was under way at the withdrawal, or one for a
        // connection that has ended since (below, maybe_finish_handoff): it stays here.
        withdraw_shed_ask(s, static_cast<uint32_t>(slot));
        refusal = -EAGAIN;
    } else if (shed) {
        refusal = shed_refusal(s, static_cast<uint32_t>(slot));
    }
    if (refusal != 0) {
        ipc::ControlMessage reply{};
        reply.type = static_cast<uint32_t>(ipc::ControlType::kHandoffReply);
        reply.version = ipc::kLayoutVersion;
        reply.result = refusal;
        reply.session_id = s.id;
        deliver_handoff(s, member, reply, -1);
        return;
    }
    const auto i = static_cast<uint32_t>(slot);
    EngineSlot &es = s.slots[i];
    es.handoff_shed = shed;
    // Bytes the application wrote before passing the socket go out first, as they would
    // have from the kernel's send buffer, with the options and shutdown it posted.
    apply_client_state(s, i);
    if (s.ending) return;
    es.handed_off = true;
    es.kernel_served = false;
    es.handoff_park = park;
    es.handoff_error = park && (how & ipc::kHandoffErrorPending);
    es.handoff_member = static_cast<uint16_t>(member);
    if (es.peeking) {
        // What the client has read of the peeked bytes leaves the kernel socket; the rest
        // stays there for whoever gets the socket (handoff_kept: not lost).
        es.peeking = false;
        if (es.peek_watch_posted) cancel(s, i, Kind::kPeekWatch);
        const uint32_t read = es.rx_head - (es.rx_tail - es.peeked);
        if (read <= es.peeked && discard_received(s, i, read)) es.handoff_kept = es.peeked - read;
        es.peeked = 0;
    }
    if (es.recv_posted) cancel(s, i, Kind::kRecv);
    if (es.accept_posted) cancel(s, i, Kind::kAccept);
    if (es.watch_posted) cancel(s, i, Kind::kWatch);
    if (es.direct_wait_posted) cancel(s, i, Kind::kDirectWait);
    stop_listening(s, i, park);
    maybe_finish_handoff(s, i);
}

int Worker::shed_refusal(Session &s, uint32_t i) const {
    const EngineSlot &es = s.slots[i];
    if (!es.shed_asked) return -EAGAIN;  // withdrawn meanwhile: the worker has room again
    // Each byte received and not read, or written and not sent, would be lost or held up:
    // the client asks again at a later moment, when both rings are empty.
    const ipc::SocketSlot &shm = s.region.slot(i);
    const bool idle = shm.rx_head.load(std::memory_order_acquire) == es.rx_tail &&
                      shm.tx_tail.load(std::memory_order_acquire) == es.tx_head &&
                      es.tx_tail == es.tx_head && !es.send_posted;
    const bool plain = !es.prefix && !es.peeking && !es.rx_direct &&
                       es.direct == EngineSlot::Direct::kNone && !es.urgent_watch &&
                       !es.shut_wr_pending && !es.kernel_served;
    if (!idle || !plain) return -EAGAIN;
    return 0;
}

bool Worker::sheddable(const Session &s, uint32_t i) const {
    const EngineSlot &es = s.slots[i];
    // A remote client has no kernel to take it; a relay's claims its slots itself.
    return !s.remote && s.client_slots == 0 && !s.ending && es.state == ipc::SlotState::kOpen &&
           (es.flags & ipc::kFlagConnected) && !(es.flags & kConnectionEnded) && !es.handed_off &&
           !es.kernel_served && !es.shed_asked && !es.rx_direct &&
           es.direct == EngineSlot::Direct::kNone;
}

void Worker::ask_to_shed() {
    // An eighth of the connections per window (at least one), a different eighth each time:
    // seed 003 sheds only as many as it takes to leave the saturated state.
    const size_t want = std::max<size_t>(1, connected_.size() / 8);
    const uint32_t round = shed_round_++;
    size_t asked = 0;
    for (int pass = 0; pass < 2 && asked < want; ++pass) {
        for (const auto &[key, target] : connected_) {
            if (asked >= want) break;
            // The first pass takes this round's eighth, the second any (few connections).
            if (pass == 0 && (target.slot + round) % 8 != 0) continue;
            Session *s = table_[target.session_index].get();
            if (!s || s->gen != target.session_gen ||
                s->slots[target.slot].gen != target.slot_gen || !sheddable(*s, target.slot))
                continue;
            ask_back(*s, target.slot);
            ++asked;
        }
    }
}

void Worker::ask_back(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    es.shed_asked = true;
    // No event: the client looks at the flag at its next call on the socket; one it does not
    // use costs the worker nothing.
    publish_flags(s, i, es.flags | ipc::kFlagShed);
    ++shed_asks_open_;
    stats_.shed_asked.fetch_add(1, std::memory_order_relaxed);
}

void Worker::withdraw_shed_ask(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.shed_asked) return;
    es.shed_asked = false;
    publish_flags(s, i, es.flags & ~ipc::kFlagShed);
}

void Worker::withdraw_shed_asks() {
    for (const auto &[key, target] : connected_) {
        Session *s = table_[target.session_index].get();
        if (!s || s->gen != target.session_gen || s->slots[target.slot].gen != target.slot_gen)
            continue;
        if (s->slots[target.slot].handoff_member != kNoMember) continue;  // one under way ends
        withdraw_shed_ask(*s, target.slot);
    }
    shed_asks_open_ = 0;
}

void Worker::maybe_finish_handoff(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.handoff_member == kNoMember) return;
    const bool sending = es.send_posted || (es.tx_head != es.tx_tail &&
                                            !(es.flags & (ipc::kFlagReset | ipc::kFlagTxShut)));
    if (es.recv_posted || es.accept_posted || es.watch_posted || es.peek_watch_posted ||
        es.direct_wait_posted || sending)
        return;
    if ((es.flags & ipc::kFlagListening) && es.handoff_park) {
        // A listener passed on: its connections accepted and not taken wait for its next
        // owner, once those given to other workers are published in order.
        if (es.acc_pending > 0) return;
        if (!es.untaken_parked) park_untaken(s, i);
        if (es.parks_pending > 0) return;
    }
    const uint32_t member = es.handoff_member;
    es.handoff_member = kNoMember;
    const ipc::SocketSlot &shm = s.region.slot(i);
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kHandoffReply);
    reply.version = ipc::kLayoutVersion;
    reply.session_id = s.id;
    const uint32_t rx_head = shm.rx_head.load(std::memory_order_acquire);
    if (std::exchange(es.handoff_shed, false)) {
        // The receive it cancelled brought bytes after all (or the client read or wrote
        // meanwhile): the engine goes on serving the socket, nothing lost. So too if it ended
        // in the peer's FIN or an error: the engine took the kernel socket's error, which the
        // kernel socket would no longer report (its first send after a reset would say EPIPE,
        // not ECONNRESET); the engine reports it, as Linux would.
        const bool gone = !s.is_shard() && s.members[member].state != ipc::MemberState::kLive;
        const bool ended = es.flags & kConnectionEnded;
        if (ended) withdraw_shed_ask(s, i);
        if (rx_head != es.rx_tail || gone || ended) {
            es.handed_off = false;
            post_recv(s, i);
            reply.result = -EAGAIN;
            return deliver_handoff(s, member, reply, -1);
        }
        stats_.shed.fetch_add(1, std::memory_order_relaxed);
    }
    if (!s.is_shard() && s.members[member].state != ipc::MemberState::kLive) return;
    const uint32_t unread =
        rx_head_valid(rx_head, es.rx_tail, es.rx_ring) ? es.rx_tail - rx_head : 0;
    const uint32_t lost = unread - std::min(unread, es.handoff_kept);
    // Bytes not yet served from an adopted socket's parked ones come after the ring's.
    const size_t prefix_left = es.prefix ? es.prefix->size() - es.prefix_at : 0;
    reply.arg = static_cast<int32_t>(lost + prefix_left);
    // A reset parked with the prefix is unreported still; the client says of one it saw.
    const int parked_error = es.prefix_error != 0                               ? es.prefix_error
                             : es.handoff_error && (es.flags & ipc::kFlagReset) ? es.error
                                                                                : 0;
    if (es.handoff_park && (lost + prefix_left > 0 || parked_error != 0)) {
        // They wait for the socket's next owner (engine/parked.hpp): the ring's unread bytes
        // past those the kernel socket still has (peeked), then the rest of the prefix.
        std::vector<uint8_t> bytes(lost + prefix_left);
        ipc::ring_copy_out(s.region.rx_ring(i, es.rx_ring), es.rx_ring, rx_head + (unread - lost),
                           bytes.data(), lost);
        if (prefix_left > 0)
            std::memcpy(bytes.data() + lost, es.prefix->data() + es.prefix_at, prefix_left);
        const size_t count = bytes.size();
        const int rc =
            parked_bytes().park(es.fd, es.quota_uid, std::move(bytes), now_ns_, parked_error);
        if (rc == 0) {
            reply.arg = 0;
            reply.token = count;
            stats_.parked_bytes.fetch_add(count, std::memory_order_relaxed);
        } else {
            TCPS_LOG_VERBOSE("session %u slot %u: cannot park %zu unread bytes: %s", s.id, i, count,
                             std::strerror(-rc));
        }
    }
    es.prefix.reset();
    const uint32_t acc_head = shm.acc_head.load(std::memory_order_acquire);
    reply.reserved = es.untaken_parked                       ? es.untaken_lost
                     : acc_head_valid(acc_head, es.acc_tail) ? es.acc_tail - acc_head
                                                             : 0;
    // The application's low-water mark, which the engine kept for it (ops.cpp), is the
    // kernel socket's from now on.
    if (es.rcvlowat != 1 || es.peek_lowat)
        setsockopt(es.fd, SOL_SOCKET, SO_RCVLOWAT, &es.rcvlowat, sizeof(int));
    es.peek_lowat = false;
    const int copy = fcntl(es.fd, F_DUPFD_CLOEXEC, 0);
    reply.result = copy >= 0 ? 0 : -errno;
    deliver_handoff(s, member, reply, copy);
}

void Worker::deliver_handoff(Session &s, uint32_t member, const ipc::ControlMessage &reply,
                             int fd) {
    if (s.is_shard()) {
        ShardMessage message = message_for(s, ShardMessage::Type::kHandoffDone);
        message.member = member;
        message.reply = reply;
        message.fd = fd;
        return tell_home(s, std::move(message));
    }
    int rc = 0;
    if (member < ipc::kMaxMembers && s.members[member].state == ipc::MemberState::kLive)
        rc = ipc::send_control(s.members[member].control_fd, reply, &fd, fd >= 0 ? 1 : 0);
    if (fd >= 0) close(fd);
    if (rc == -EAGAIN || rc == -EWOULDBLOCK)
        violation(s, "client does not read its control replies");
}

void Worker::reserve_member(Session &s, uint32_t member) {
    int32_t index = -1;
    for (uint32_t m = 1; m < ipc::kMaxMembers; ++m) {  // 0 is the process that said hello
        // Not one whose holds another worker has yet to drop (end_member).
        if (s.members[m].state == ipc::MemberState::kFree && s.member_acks[m] == 0) {
            index = static_cast<int32_t>(m);
            break;
        }
    }
    if (index >= 0) {
        const auto m = static_cast<uint32_t>(index);
        s.members[m] = Member{};
        s.members[m].state = ipc::MemberState::kReserved;
        s.members[m].reserved_until_ns = monotonic_ns() + kReservationNs;
        ++s.reserved_members;
        ++reservations_;
        // The engine owns a free record: the parent fills `held` once we answer.
        ipc::MemberRecord &record = s.region.member(m);
        for (uint32_t chunk : s.owned_chunks)
            for (uint32_t slot = chunk << ipc::kChunkShift; slot < (chunk + 1) << ipc::kChunkShift;
                 slot += 64)
                s.region.held_word(m, slot).store(0, std::memory_order_relaxed);
        record.pid.store(0, std::memory_order_relaxed);
        record.state.store(static_cast<uint32_t>(ipc::MemberState::kReserved),
                           std::memory_order_release);
    }
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kReserveReply);
    reply.version = ipc::kLayoutVersion;
    reply.arg = index;
    reply.result = index >= 0 ? 0 : -EMFILE;
    reply.session_id = s.id;
    reply_control(s, member, reply);
}

void Worker::accept_join(const JoinRequest &join) {
    Session *found = nullptr;
    for (uint32_t index : active_) {
        Session *s = table_[index].get();
        if (s && s->id == join.session_id && !s->ending && !s->is_shard()) found = s;
    }
    int result = 0;
    if (!found) {
        result = -ENOENT;
    } else if (join.token != found->family_token || join.member >= ipc::kMaxMembers ||
               found->members[join.member].state != ipc::MemberState::kReserved) {
        result = -EPERM;
    }
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kJoinReply);
    reply.version = ipc::kLayoutVersion;
    reply.arg = static_cast<int32_t>(join.member);
    reply.result = result;
    reply.session_id = join.session_id;
    if (result != 0) {
        TCPS_LOG_VERBOSE("client pid %d: join of session %u as member %u refused: %s",
                         join.creds.pid, join.session_id, join.member, std::strerror(-result));
        ipc::send_control(join.control_fd, reply, nullptr, 0);
        close(join.control_fd);
        quotas().release(join.creds.uid, 1, 0);  // charged when the engine accepted it
        return;
    }
    Session &s = *found;
    Member &m = s.members[join.member];
    m.state = ipc::MemberState::kLive;
    m.control_fd = join.control_fd;
    m.control_charged = join.creds.uid;
    m.creds = join.creds;
    note_member_identity(s, join.member, true);
    --s.reserved_members;
    --reservations_;
    ++s.live_members;
    const int flags = fcntl(m.control_fd, F_GETFL);
    if (flags >= 0) fcntl(m.control_fd, F_SETFL, flags | O_NONBLOCK);
    ipc::MemberRecord &record = s.region.member(join.member);
    record.pid.store(join.creds.pid, std::memory_order_relaxed);
    record.state.store(static_cast<uint32_t>(ipc::MemberState::kLive), std::memory_order_release);
    TCPS_LOG_VERBOSE("session %u: pid %d joined as member %u", s.id, join.creds.pid, join.member);
    if (!reply_control(s, join.member, reply)) return;
    post_control_poll(s, join.member);
}

void Worker::end_member(Session &s, uint32_t member, const char *why) {
    Member &m = s.members[member];
    if (m.state == ipc::MemberState::kFree || s.ending) return;
    TCPS_LOG_VERBOSE("session %u: member %u (pid %d) ends: %s", s.id, member, m.creds.pid, why);
    if (m.state == ipc::MemberState::kReserved) {
        --s.reserved_members;
        --reservations_;
    } else {
        --s.live_members;
    }
    // Members end from their connection's poll completion (nothing posted on it then) or
    // from an expired reservation (no connection), so the descriptor can go now.
    note_member_identity(s, member, false);
    close_control(m);
    release_waiters(s, member);
    // Drop the member's hold on each socket it held, as its exit closes its descriptors.
    if (!release_holds(s, member)) return;
    if (s.family) {
        ShardMessage message = message_for(s, ShardMessage::Type::kMemberEnded);
        message.member = member;
        tell_shards(s, message);
        s.member_acks[member] = static_cast<uint16_t>(s.family->workers.size() - 1);
    }
    ipc::MemberRecord &record = s.region.member(member);
    record.pid.store(0, std::memory_order_relaxed);
    record.state.store(static_cast<uint32_t>(ipc::MemberState::kFree), std::memory_order_release);
    m = Member{};
    if (s.live_members > 0 || s.reserved_members > 0) return;
    // Nobody is left. What nobody held (connections no process accepted) is reset, as the
    // kernel resets a closed listener's queue; the graceful closes finish sending what their
    // processes wrote before exiting, and then the session ends (finish_close). The other
    // workers do the same with theirs.
    if (s.family) tell_shards(s, message_for(s, ShardMessage::Type::kOrphaned));
    orphan(s, why);
}

void Worker::orphan(Session &s, const char *why) {
    s.for_each_slot([&](uint32_t i) {
        if (s.slots[i].state == ipc::SlotState::kOpen) start_close(s, i, true);
    });
    // Only now: a close that finished in the loop must not end the session under it.
    s.orphaned = true;
    if (s.open_sockets == 0) return end_session(s, why);
    TCPS_LOG_VERBOSE("session %u: no member left; ending once %u closes finish", s.id,
                     s.open_sockets);
}

bool Worker::release_holds(Session &s, uint32_t member) {
    for (size_t k = 0; k < s.owned_chunks.size(); ++k) {
        const uint32_t end = (s.owned_chunks[k] + 1) << ipc::kChunkShift;
        for (uint32_t first = s.owned_chunks[k] << ipc::kChunkShift; first < end; first += 64) {
            uint64_t bits =
                s.region.held_word(member, first).exchange(0, std::memory_order_acq_rel);
            while (bits) {
                const uint32_t i = first + static_cast<uint32_t>(__builtin_ctzll(bits));
                bits &= bits - 1;
                if (s.slots[i].state != ipc::SlotState::kOpen) continue;
                std::atomic<uint32_t> &holders = s.region.slot(i).holders;
                uint32_t count = holders.load(std::memory_order_acquire);
                while (count > 0 && !holders.compare_exchange_weak(count, count - 1,
                                                                   std::memory_order_acq_rel)) {
                }
                if (count == 1) {
                    // The bytes it sent just before dying may not have rung our doorbell yet.
                    const ipc::SocketSlot &slot = s.region.slot(i);
                    const uint32_t head = slot.rx_head.load(std::memory_order_acquire);
                    const uint32_t tail = slot.tx_tail.load(std::memory_order_acquire);
                    if (adopt_tx_ring(s, i))
                        apply_client_indices(s, i, tail, head,
                                             slot.acc_head.load(std::memory_order_acquire));
                    if (s.ending) return false;
                    // Unread bytes make the close a reset, as Linux does at exit.
                    start_close(s, i, head != s.slots[i].rx_tail);
                }
            }
        }
    }
    return true;
}

void Worker::expire_reservations(uint64_t now) {
    for (size_t k = 0; k < active_.size(); ++k) {
        Session *s = table_[active_[k]].get();
        if (!s || s->ending || s->reserved_members == 0) continue;
        for (uint32_t m = 0; m < ipc::kMaxMembers && !s->ending; ++m) {
            if (s->members[m].state == ipc::MemberState::kReserved &&
                now >= s->members[m].reserved_until_ns)
                end_member(*s, m, "a reservation nobody joined");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Slot state

// The engine-written indices, error and addresses of a slot, back to those of a new socket.
static void clear_engine_fields(ipc::SocketSlot &slot) {
    slot.tx_head.store(0, std::memory_order_relaxed);
    slot.rx_tail.store(0, std::memory_order_relaxed);
    slot.acc_tail.store(0, std::memory_order_relaxed);
    slot.so_error.store(0, std::memory_order_relaxed);
    slot.kernel_mask.store(0, std::memory_order_relaxed);
    slot.accept_error.store(0, std::memory_order_relaxed);
    slot.urgent_mark.store(0, std::memory_order_relaxed);
    slot.direct_done.store(0, std::memory_order_relaxed);
    slot.rx_ring_bytes.store(0, std::memory_order_relaxed);
    slot.twin_ready_at.store(0, std::memory_order_relaxed);
    slot.local_addr.len = 0;
    slot.peer_addr.len = 0;
}

void Worker::publish_open(Session &s, uint32_t i) {
    s.region.slot(i).state.store(static_cast<uint32_t>(ipc::SlotState::kOpen),
                                 std::memory_order_release);
    ++s.open_sockets;
    stats_.sockets.fetch_add(1, std::memory_order_relaxed);
}

void Worker::init_slot(Session &s, uint32_t i, int fd, int family, uint32_t flags) {
    EngineSlot &es = s.slots[i];
    const uint32_t last_req_seq = es.last_req_seq;
    const uint32_t gen = es.gen + 1;
    es = EngineSlot{};
    es.last_req_seq = last_req_seq;
    es.gen = gen;
    es.fd = fd;
    es.family = family;
    es.state = ipc::SlotState::kOpen;
    es.flags = flags;

    ipc::SocketSlot &slot = s.region.slot(i);
    // The client's indices too: the engine owns the slot until it answers kSocket or
    // publishes the accepted connection, and a reused slot must start with empty rings.
    slot.tx_tail.store(0, std::memory_order_relaxed);
    slot.rx_head.store(0, std::memory_order_relaxed);
    slot.acc_head.store(0, std::memory_order_relaxed);
    slot.holders.store(0, std::memory_order_relaxed);
    slot.posted.store(0, std::memory_order_relaxed);
    slot.urgent_tail.store(0, std::memory_order_relaxed);
    slot.direct_tail.store(0, std::memory_order_relaxed);
    for (auto *word : {&slot.tx_ring_bytes, &slot.tx_ring_before, &slot.tx_grown_at,
                       &slot.tx_head_at_growth, &slot.twin_drained})
        word->store(0, std::memory_order_relaxed);
    // Locks a dead member may have left held. One whose holder lives is its to release: a
    // thread that took it after the previous socket went away (handed back, closed under it)
    // finds that socket stale and unlocks; cleared now, that unlock would release the new
    // socket's holder. The request lock stays with the thread that waits for our answer to
    // kSocket.
    const auto clear_abandoned = [](std::atomic<uint32_t> &word, std::atomic<uint32_t> &owner) {
        const uint32_t pid = owner.load(std::memory_order_relaxed);
        if (word.load(std::memory_order_relaxed) != 0 && pid != 0 && pid <= INT32_MAX &&
            !(kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH))
            return;
        word.store(0, std::memory_order_relaxed);
        owner.store(0, std::memory_order_relaxed);
    };
    clear_abandoned(slot.rx_lock, slot.rx_lock_owner);
    clear_abandoned(slot.tx_lock, slot.tx_lock_owner);
    if (i >= s.client_slots) {
        slot.req_lock.store(0, std::memory_order_relaxed);
        slot.req_lock_owner.store(0, std::memory_order_relaxed);
    }
    slot.error_gen.store(0, std::memory_order_relaxed);
    clear_engine_fields(slot);
    slot.flags.store(flags, std::memory_order_relaxed);
    slot.event_gen.fetch_add(1, std::memory_order_relaxed);
    if (s.remote) note_remote_init(s, i);
}

void Worker::record_fin(Session &s, uint32_t i) {
    update_kernel_mask(s, i);
    publish_flags(s, i, s.slots[i].flags | ipc::kFlagRxEof);
    bump_event(s, i);
    // No recv is posted from now on; an RST must still be seen before the next send.
    post_watch(s, i);
}

void Worker::publish_flags(Session &s, uint32_t i, uint32_t flags, bool seq_cst) {
    s.slots[i].flags = flags;
    s.region.slot(i).flags.store(flags,
                                 seq_cst ? std::memory_order_seq_cst : std::memory_order_release);
    // A remote client sees a flag only once it is published (a pause it must answer, too).
    if (s.remote) mark_changed(s, i);
}

void Worker::mark_changed(Session &s, uint32_t i) {
    if (!s.changed_test(i)) {
        s.changed_bits[i / 64] |= uint64_t{1} << (i % 64);
        s.changed.push_back(i);
    }
    if (!s.dirty) {
        s.dirty = true;
        dirty_.push_back(&s);
    }
}

void Worker::bump_event(Session &s, uint32_t i) {
    s.region.slot(i).event_gen.fetch_add(1, std::memory_order_release);
    mark_changed(s, i);
}

void Worker::record_error(Session &s, uint32_t i, int error) {
    EngineSlot &es = s.slots[i];
    if (es.flags & ipc::kFlagReset) return;  // the first error is the one reported
    untrack_connect(s, i);
    ipc::SocketSlot &slot = s.region.slot(i);
    // The kernel said POLLERR until the engine took its SO_ERROR; the client's is pending now.
    update_kernel_mask(s, i, POLLERR);
    // The error before the flag (both release): a client that sees kFlagReset also sees the
    // new error_gen and so_error, so it never reports a reset without its error. A client that
    // sees the error first treats a pending error as a reset (preload/readiness.cpp).
    es.error = error;
    slot.so_error.store(error, std::memory_order_relaxed);
    slot.error_gen.fetch_add(1, std::memory_order_release);
    publish_flags(s, i, (es.flags & ~ipc::kFlagConnecting) | ipc::kFlagReset);
    bump_event(s, i);
}

void Worker::update_kernel_mask(Session &s, uint32_t i, uint32_t also) {
    EngineSlot &es = s.slots[i];
    pollfd p{es.fd, POLLIN | POLLOUT | POLLRDHUP | POLLPRI, 0};
    uint32_t mask = also;
    if (es.fd >= 0 && poll(&p, 1, 0) > 0)
        mask |= static_cast<uint32_t>(p.revents) &
                (POLLHUP | POLLERR | POLLRDHUP | POLLOUT | POLLPRI | POLLIN);
    s.region.slot(i).kernel_mask.store(mask, std::memory_order_relaxed);
}

int Worker::refresh_local_address(Session &s, uint32_t i) {
    sockaddr_storage addr;
    socklen_t len = sizeof(addr);
    if (getsockname(s.slots[i].fd, reinterpret_cast<sockaddr *>(&addr), &len) != 0) return -errno;
    store_address(s.region.slot(i).local_addr, addr, len);
    return 0;
}

void Worker::start_close(Session &s, uint32_t i, bool reset) {
    EngineSlot &es = s.slots[i];
    if (es.state == ipc::SlotState::kFree) return;
    if (es.state == ipc::SlotState::kOpen) {
        es.state = ipc::SlotState::kClosing;
        s.region.slot(i).state.store(static_cast<uint32_t>(ipc::SlotState::kClosing),
                                     std::memory_order_release);
        es.close_tail = es.tx_tail;
        es.close_progress_ns = now_ns_;
        if (es.flags & ipc::kFlagListening) stop_listening(s, i);
        // Connections accepted but never taken by the application die with it (also those
        // of a listener that a shutdown(SHUT_RD) stopped earlier).
        drop_untaken(s, i, true);
        // Bytes the client read must not make the kernel reset the connection as unread.
        end_peek(s, i);
        if (es.recv_posted) cancel(s, i, Kind::kRecv);
        if (es.accept_posted) cancel(s, i, Kind::kAccept);
        if (es.connect_posted) cancel(s, i, Kind::kConnect);
        if (es.watch_posted) cancel(s, i, Kind::kWatch);
        if (es.direct_posted) cancel(s, i, Kind::kDirect);
        if (es.direct_wait_posted) cancel(s, i, Kind::kDirectWait);
        untrack_connect(s, i);
    }
    // Parked bytes never served are unread bytes, which make Linux's close() reset.
    if (es.prefix && es.prefix_at < es.prefix->size()) reset = true;
    // The kernel socket lives on in the application: closing only drops our descriptor.
    if (es.handed_off) reset = false, es.close_tail = es.tx_head;
    if (reset && !es.close_reset) {
        es.close_reset = true;
        if (es.fd >= 0) {
            const linger abortive{1, 0};  // close() sends RST
            setsockopt(es.fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
            if ((es.flags & ipc::kFlagConnected) && !(es.flags & ipc::kFlagReset)) reset_now(s, i);
        }
    }
    maybe_finish_close(s, i);
}

void Worker::park_untaken(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    es.untaken_parked = true;
    const uint32_t acc_head = s.region.slot(i).acc_head.load(std::memory_order_acquire);
    if (!acc_head_valid(acc_head, es.acc_tail)) return;  // the client's mess: reset at close
    for_each_untaken(s, i, acc_head, Untaken::kPark);
    // They are the store's now (or reset): the ring has nothing left to take.
    es.acc_head = es.acc_tail;
}

bool Worker::park_connection(Session &s, uint32_t j, uint64_t cookie) {
    EngineSlot &conn = s.slots[j];
    // A receive in flight that is not a peek may be taking bytes into the ring as we look
    // (a listener with SO_RCVLOWAT above 1 does not peek): reset, as before.
    const bool receiving = conn.recv_posted && !conn.peek_posted;
    int copy = -1;
    if (cookie != 0 && !receiving && !s.remote) copy = fcntl(conn.fd, F_DUPFD_CLOEXEC, 0);
    if (copy >= 0 && !conn.peeking) {
        // Bytes taken from the kernel socket go with it: the ring's, then what is left of
        // bytes parked for it before (none, mostly: a peek leaves them in the kernel socket).
        const uint32_t unread = conn.rx_tail - conn.rx_head;
        const size_t prefix_left = conn.prefix ? conn.prefix->size() - conn.prefix_at : 0;
        std::vector<uint8_t> bytes(unread <= conn.rx_ring ? unread : 0);
        ipc::ring_copy_out(s.region.rx_ring(j, conn.rx_ring), conn.rx_ring, conn.rx_head,
                           bytes.data(), static_cast<uint32_t>(bytes.size()));
        if (prefix_left > 0)
            bytes.insert(bytes.end(), conn.prefix->begin() + conn.prefix_at, conn.prefix->end());
        if (!bytes.empty() &&
            parked_bytes().park(copy, conn.quota_uid, std::move(bytes), now_ns_) != 0) {
            close(copy);
            copy = -1;
        }
    }
    if (copy >= 0 && parked_connections().park(cookie, copy, conn.quota_uid, now_ns_) != 0) {
        parked_bytes().claim(copy);  // dropped with it
        close(copy);
        copy = -1;
    }
    if (copy < 0) {
        start_close(s, j, true);
        return false;
    }
    // Everything it holds is still in the kernel socket, which lives on in the store: the
    // peeked bytes stay there, its low-water mark is back at 1, and closing drops only our
    // descriptor.
    if (conn.peeking) {
        conn.peeking = false;
        conn.peeked = 0;
        if (conn.peek_watch_posted) cancel(s, j, Kind::kPeekWatch);
        if (conn.peek_lowat) {
            const int one = 1;
            setsockopt(conn.fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
            conn.peek_lowat = false;
        }
    }
    conn.handed_off = true;
    conn.prefix.reset();
    start_close(s, j, false);
    stats_.parked_connections.fetch_add(1, std::memory_order_relaxed);
    return true;
}

void Worker::stop_listening(Session &s, uint32_t i, bool park_twin) {
    retire_twin(s, i, park_twin);
    for (size_t k = 0; k < s.listeners.size(); ++k) {
        if (s.listeners[k] == i) {
            s.listeners[k] = s.listeners.back();
            s.listeners.pop_back();
            break;
        }
    }
    if (s.slots[i].accept_posted) cancel(s, i, Kind::kAccept);
}

void Worker::drop_untaken(Session &s, uint32_t i, bool close) {
    for_each_untaken(s, i, s.slots[i].acc_head, close ? Untaken::kClose : Untaken::kReset);
}

void Worker::for_each_untaken(Session &s, uint32_t i, uint32_t from, Untaken what) {
    EngineSlot &es = s.slots[i];
    // The ring is engine-written but in the region: each entry is checked against our own
    // record of the connection (a client that overwrote one only keeps that connection of its
    // own open until its session ends).
    const ipc::SocketSlot &listener = s.region.slot(i);
    for (uint32_t pos = from; pos != es.acc_tail; ++pos) {
        const uint32_t j = listener.accept_ring[pos & kAcceptMask];
        if (!s.region.mapped(j)) {
            // Another worker's (Family): it checks the connection against its own record (and
            // answers a park with kParked, which the hand-back waits for).
            const uint32_t owner = s.shard_of(j);
            if (owner == 0) continue;
            ShardMessage message = message_for(s, ShardMessage::Type::kDrop);
            message.slot = j;
            message.accepted.listener = i;
            message.accepted.listener_gen = es.gen;
            message.result = static_cast<int32_t>(what);
            message.seq = es.listener_cookie;
            s.family->workers[owner]->post(std::move(message));
            if (what == Untaken::kPark)
                ++es.parks_pending;
            else
                ++es.drops_pending;  // its close waits for the answer (kDropped)
            continue;
        }
        const EngineSlot &conn = s.slots[j];
        if (conn.state != ipc::SlotState::kOpen || conn.accepted_by != i ||
            conn.accepted_by_gen != es.gen || conn.accept_pos != pos)
            continue;
        if (what == Untaken::kPark) {
            if (!park_connection(s, j, es.listener_cookie)) ++es.untaken_lost;
        } else if (what == Untaken::kClose) {
            start_close(s, j, true);
        } else {
            reset_in_place(s, j);
        }
    }
}

void Worker::reset_in_place(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.state != ipc::SlotState::kOpen || (es.flags & ipc::kFlagReset)) return;
    // tcp_disconnect() sends the RST and leaves our descriptor open.
    sockaddr unspec{};
    unspec.sa_family = AF_UNSPEC;
    connect(es.fd, &unspec, sizeof(unspec));
    es.peeking = false;
    es.peeked = 0;
    if (es.recv_posted) cancel(s, i, Kind::kRecv);
    if (es.watch_posted) cancel(s, i, Kind::kWatch);
    if (es.peek_watch_posted) cancel(s, i, Kind::kPeekWatch);
    if (es.direct_wait_posted) cancel(s, i, Kind::kDirectWait);
    record_error(s, i, ECONNRESET);
}

void Worker::maybe_finish_close(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.state != ipc::SlotState::kClosing) return;
    const bool draining = !es.close_reset && es.tx_head != es.close_tail &&
                          (es.flags & ipc::kFlagConnected) &&
                          !(es.flags & (ipc::kFlagReset | ipc::kFlagTxShut));
    if (draining) {
        post_send(s, i);
        schedule(s, i);  // for the drain deadline
        return;
    }
    if (es.send_posted && !es.send_cancelled) {
        es.send_cancelled = true;
        cancel(s, i, Kind::kSend);
    }
    if (es.inflight > 0) return;
    // Other workers looking for a peer of a reset (reset_now), or resetting a listener's
    // untaken connections (kDrop), or placing its last accepted ones: the answer waits for them.
    if ((es.peer_resets_pending > 0 || es.drops_pending > 0 || es.acc_pending > 0) && !s.ending)
        return;
    finish_close(s, i);
}

void Worker::finish_close(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.direct != EngineSlot::Direct::kNone) finish_direct(s, i, -EBADF);
    untrack_connected(s, i);
    if (es.fd >= 0) {
        if (!es.close_reset && !es.handed_off) {
            // A positive linger would make close() block this thread; the kernel still
            // delivers what it holds after close() without it.
            linger current{};
            socklen_t len = sizeof(current);
            if (getsockopt(es.fd, SOL_SOCKET, SO_LINGER, &current, &len) == 0 && current.l_onoff &&
                current.l_linger > 0) {
                const linger off{0, 0};
                setsockopt(es.fd, SOL_SOCKET, SO_LINGER, &off, sizeof(off));
            }
        }
        close(es.fd);
        if (s.open_sockets > 0) --s.open_sockets;
        stats_.sockets.fetch_sub(1, std::memory_order_relaxed);
        quotas().release(es.quota_uid, 1, kSocketBytes);
    }
    close_twin(s, i);  // retired at stop_listening: never open here, but never leak it
    if (es.accept_reserved != kNoSlot) {
        s.free_engine_slots.push_back(es.accept_reserved);
        quotas().release(es.quota_uid, 1, kSocketBytes);
    }
    if (es.rx_charged) quotas().release(es.quota_uid, 0, es.rx_charged);
    // A grown ring's pages at once: few sockets grow theirs, and they hold up to megabytes.
    if (es.bulk_used && !s.ending)
        fallocate(s.memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(ipc::bulk_rings_offset(i)),
                  static_cast<off_t>(ipc::kBulkPairBytes));

    const uint32_t last_req_seq = es.last_req_seq;
    const uint32_t gen = es.gen;
    const bool timed = es.timed;
    const bool handed_off = es.handed_off;
    const bool answer_close = es.close_answer_pending;
    const uint32_t answer_seq = es.close_answer_seq;
    es = EngineSlot{};
    es.last_req_seq = last_req_seq;
    es.gen = gen;
    es.timed = timed;  // a stale tick entry drops itself: the slot is free

    if (s.ending) return;  // the whole region goes away
    if (s.orphaned && s.open_sockets == 0) return end_session(s, "its last close finished");
    // A thread of the client asleep in a receive on it wakes, and finds it the kernel's now.
    if (handed_off) bump_event(s, i);
    // Before the slot is free: the waiting client reads its answer before anyone can reuse it.
    if (answer_close) respond(s, i, answer_seq, 0);
    ipc::SocketSlot &slot = s.region.slot(i);
    slot.flags.store(0, std::memory_order_relaxed);
    clear_engine_fields(slot);
    // Give the ring pages back: the memfd is sparse and only live sockets should cost memory.
    // A relay client's slot at once (its client picks slots round-robin); an engine slot's
    // once it has stayed free for kIdleRingNs, since the free list is a stack and the next
    // connection most likely takes it again.
    const bool client_claimed = i < s.client_slots;
    if (client_claimed)
        fallocate(s.memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(ipc::tx_ring_offset(i)),
                  static_cast<off_t>(ipc::kRingPairBytes));
    else
        idle_rings_.push_back({{s.index, s.gen, i, es.gen}, now_ns_ + kIdleRingNs});
    slot.state.store(static_cast<uint32_t>(ipc::SlotState::kFree), std::memory_order_release);
    // After kFree: a client that wins the claim then finds the slot free (layout.hpp).
    if (client_claimed) slot.claim.store(0, std::memory_order_release);
    bump_event(s, i);
    if (!client_claimed) {
        s.free_engine_slots.push_back(i);
        resume_listeners(s);
    }
}

// ---------------------------------------------------------------------------------------------
// Session lifetime

void Worker::violation(Session &s, const char *format, ...) {
    if (s.ending) return;
    char what[256];
    va_list args;
    va_start(args, format);
    std::vsnprintf(what, sizeof(what), format, args);
    va_end(args);
    log_line("session %u (pid %d): protocol violation: %s", s.id, s.creds.pid, what);
    stats_.violations.fetch_add(1, std::memory_order_relaxed);
    end_session(s, "protocol violation");
}

void Worker::end_session(Session &s, const char *why) {
    if (s.ending) return;
    s.ending = true;
    TCPS_LOG_VERBOSE("session %u (pid %d): ending: %s", s.id, s.creds.pid, why);
    if (s.family) {
        // A family that ends before its members do (a violation, a failure, the engine's
        // stop) ends on every worker; one whose members are all gone ends on each worker once
        // its closes finish (kOrphaned).
        if (s.is_shard()) {
            if (!s.orphaned) tell_home(s, message_for(s, ShardMessage::Type::kEnd));
        } else {
            if (s.live_members > 0 || s.reserved_members > 0)
                tell_shards(s, message_for(s, ShardMessage::Type::kEnd));
            for (uint32_t m = 0; m < ipc::kMaxMembers; ++m) note_member_identity(s, m, false);
        }
    }
    // Every registered waiter gets a byte and then EOF: no client thread sleeps on us.
    if (!s.is_shard() || !s.orphaned) announce_engine_gone(s);
    for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) close_waiter(s, w);
    s.for_each_slot([&](uint32_t i) {
        if (s.slots[i].state != ipc::SlotState::kFree) start_close(s, i, true);
    });
    // EOF on the control socket tells the client at once and completes our poll on it. The
    // doorbell read is cancelled, not completed by a write: the eventfd's file description is
    // shared with the client, which could make a write from us block.
    for (Member &m : s.members)
        if (m.control_fd >= 0) shutdown(m.control_fd, SHUT_RDWR);
    reservations_ -= s.reserved_members;
    s.reserved_members = 0;
    if (s.doorbell_posted) {
        if (io_uring_sqe *sqe = get_sqe()) {
            io_uring_prep_cancel64(sqe, user_data(Kind::kSessionDoorbell, s.index, 0, s.gen), 0);
            io_uring_sqe_set_data64(sqe, user_data(Kind::kIgnore, 0, 0, 0));
        }
    }
    if (s.remote) end_remote(s);
    ending_.push_back(s.index);
}

void Worker::free_ended_sessions() {
    for (size_t k = 0; k < ending_.size();) {
        Session *s = table_[ending_[k]].get();
        if (s && (s->inflight > 0 || (s->remote && !remote_released(*s)))) {
            ++k;
            continue;
        }
        ending_[k] = ending_.back();
        ending_.pop_back();
        if (s) free_session(*s);
    }
}

void Worker::free_session(Session &s) {
    const uint32_t index = s.index;
    for (size_t k = 0; k < dirty_.size(); ++k) {
        if (dirty_[k] == &s) {
            dirty_[k] = dirty_.back();
            dirty_.pop_back();
            break;
        }
    }
    for (size_t k = 0; k < active_.size(); ++k) {
        if (active_[k] == index) {
            active_[k] = active_.back();
            active_.pop_back();
            break;
        }
    }
    by_id_.erase(s.id);
    const bool shard = s.is_shard();
    TCPS_LOG_VERBOSE("session %u (pid %d): freed%s", s.id, s.creds.pid, shard ? " (a shard)" : "");
    if (!shard) {
        // The engine's map of sessions by id names the home.
        std::lock_guard<std::mutex> lock(pending_mutex_);
        freed_ids_.push_back(s.id);
    }
    table_[index].reset();  // unmaps the region, closes its descriptors
    free_indices_.push_back(index);
    if (!shard) stats_.sessions.fetch_sub(1, std::memory_order_relaxed);
}

void Worker::shutdown_all() {
    adopt_pending();
    // Copy: ending a session may free it and edit active_.
    const std::vector<uint32_t> indices = active_;
    for (uint32_t index : indices)
        if (Session *s = table_[index].get()) end_session(*s, "engine stopping");
    const uint64_t deadline = monotonic_ns() + kShutdownWaitNs;
    while (!active_.empty() && monotonic_ns() < deadline) {
        io_uring_cqe *cqe = nullptr;
        __kernel_timespec ts{};
        ts.tv_nsec = 20'000'000;
        io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
        now_ns_ = monotonic_ns();
        reap();
        if (fabric_) poll_fabric();
        if (!timed_.empty()) housekeeping(now_ns_);
        free_ended_sessions();
    }
    // Whatever did not finish in time: close the sockets, but leave those regions mapped,
    // since the kernel may still complete an operation into them until the ring is gone.
    for (uint32_t index : active_) {
        Session *s = table_[index].get();
        if (!s) continue;
        s->for_each_slot([&](uint32_t i) {
            if (s->slots[i].fd >= 0) close(s->slots[i].fd);
            if (s->slots[i].twin_fd >= 0) close(s->slots[i].twin_fd);
            s->slots[i].fd = -1;
            s->slots[i].twin_fd = -1;
        });
        s->region.base = nullptr;
        s->release();
        if (!s->is_shard()) stats_.sessions.fetch_sub(1, std::memory_order_relaxed);
    }
    if (ring_ready_) {
        io_uring_queue_exit(&ring_);
        ring_ready_ = false;
    }
    for (uint32_t index : active_) table_[index].reset();
    active_.clear();
    ending_.clear();
    dirty_.clear();
}

}  // namespace tcps::engine
