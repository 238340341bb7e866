// A worker: one thread, one io_uring, the sessions (or shards of a family's session: Family in
// session.hpp) assigned to it and their kernel sockets. Nothing on the data path is shared
// with other threads; the only cross-thread inputs are the inbox (new sessions, joins, and the
// messages between the workers serving one family: a mutex and the doorbell eventfd, written
// only while the worker sleeps) and the stop flag.
#pragma once

#include <liburing.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "control.hpp"
#include "fabric.hpp"
#include "options.hpp"
#include "policy.hpp"
#include "session.hpp"

namespace tcps::engine {

// Sends from this size on go zero-copy (--send-zc), out of a tx ring or registered memory:
// below it pinning the pages and the notification cost more than the copy they save.
constexpr uint32_t kZeroCopyMinBytes = 64 * 1024;
// Linux 6.2's uapi, which liburing 2.3's header predates: the notification's res says whether
// the kernel copied the bytes after all.
#ifdef IORING_SEND_ZC_REPORT_USAGE
constexpr uint16_t kReportZeroCopyUsage = IORING_SEND_ZC_REPORT_USAGE;
#else
constexpr uint16_t kReportZeroCopyUsage = 1U << 3;
#endif
#ifdef IORING_NOTIF_USAGE_ZC_COPIED
constexpr uint32_t kZeroCopyCopied = IORING_NOTIF_USAGE_ZC_COPIED;
#else
constexpr uint32_t kZeroCopyCopied = 1U << 31;
#endif

// A message between the workers that serve one family (Family, session.hpp): the home shard
// gives accepted connections away and tells the other shards of the family's changes; a shard
// answers, or asks the home to speak for it on a member's control connection.
struct ShardMessage {
    enum class Type : uint8_t {
        kAccepted,        // home -> shard: place connection `fd` of `listener` (accept `seq`)
        kPlaced,          // shard -> home: placed in `slot` (result 0), or `fd` comes back
        kDrop,            // home -> shard: an accepted connection nobody will take: reset it
        kDropped,         // shard -> home: the answer to a kDrop of `accepted.listener`'s
                          // connection with result 0 or 1 (its close waits: drops_pending)
        kMemberEnded,     // home -> shard: drop member's holds; answered by kMemberReleased
        kMemberReleased,  // shard -> home
        kOrphaned,        // home -> shard: no member left; reset what nobody holds
        kEnd,             // either way: the family ends (a violation, a failure)
        kWaiter,          // home -> shard: waiter `slot` writes to pipe `fd` now (-1: none)
        kMem,             // home -> shard: MemNet registration `slot` is `mem` (base null: gone)
        kHandoff,         // home -> shard: `member` asks for `slot`'s kernel socket (kHandoff;
                          // `seq` 1: park the unread bytes)
        kHandoffDone,     // shard -> home: the answer for `member` (`reply`, and `fd`)
        kAdopt,           // home -> shard: serve kernel socket `fd` for `member` (kAdoptSocket;
                          // `accepted.family`, `accepted.quota_uid`)
        kAdopted,         // shard -> home: the answer for `member` (`reply`)
        kParked,          // shard -> home: untaken connection `slot` of `accepted.listener`
                          // parked (result 1), reset (0) or not its (2); answers kDrop with
                          // result 2
        kPeerReset,       // any -> each other worker: connection `key` (`slot`, gen `seq`) was
                          // reset; the worker serving its peer `peer_key` records it now.
                          // Answered by kPeerResetSeen
        kPeerResetSeen,   // the answer, to `from`
    };
    Type type = Type::kEnd;
    uint32_t session_id = 0;
    Worker *from = nullptr;
    uint32_t from_shard = 0;
    uint32_t slot = 0;
    uint32_t member = 0;
    uint64_t seq = 0;
    int fd = -1;  // travels with the message: its receiver closes it
    int32_t result = 0;
    AcceptedFrom accepted;
    ipc::ControlMessage reply{};
    MemRegistration mem;
    AddressKey key, peer_key;  // kPeerReset
};

struct WorkerConfig {
    int index = 0;
    int core = -1;  // -1: not pinned
    int spin_us = 50;
    bool busy_poll = false;
    int handoff_load = -1;          // Options::handoff_load
    bool ask_back_at_once = false;  // Options::ask_back_at_once
    SendZeroCopy send_zc = SendZeroCopy::kAuto;
    // Serve remote sessions (tcpsd --fabric-listen): the worker opens an endpoint of its own.
    bool fabric = false;
    ipc::FabricConfig fabric_config;
};

// Written by the worker (relaxed), read by the main thread for logs.
struct WorkerStats {
    std::atomic<uint64_t> sessions{0};  // live now
    std::atomic<uint64_t> sessions_total{0};
    std::atomic<uint64_t> sockets{0};  // open now
    std::atomic<uint64_t> accepts{0};
    std::atomic<uint64_t> kernel_served{0};  // accepted while saturated, left to the kernel
    std::atomic<uint64_t> bytes_in{0};       // network -> rx rings
    std::atomic<uint64_t> bytes_out{0};      // tx rings -> network
    // MemNet: network <-> registered memory, straight (counted in bytes_in/out too).
    std::atomic<uint64_t> direct_in{0};
    std::atomic<uint64_t> direct_out{0};
    // Of direct_out: sent with SEND_ZC, and of those the bytes the kernel copied anyway.
    std::atomic<uint64_t> zerocopy_out{0};
    std::atomic<uint64_t> zerocopy_copied{0};
    // Sends out of the tx rings with SEND_ZC, and those the kernel reported it copied anyway.
    std::atomic<uint64_t> ring_zc_sends{0};
    std::atomic<uint64_t> ring_zc_copied{0};
    std::atomic<uint64_t> ring_zc_bytes{0};  // sent from the rings without a copy
    std::atomic<uint64_t> wrapped_recvs{0};  // ring receives that filled both sides of the wrap
    std::atomic<uint64_t> violations{0};
    std::atomic<uint64_t> tx_rings_grown{0};  // tx rings the clients doubled (adopt_tx_ring)
    std::atomic<uint64_t> rx_rings_grown{0};  // rx rings we doubled (grow_rx)
    // Sockets passed on with SCM_RIGHTS: unread bytes parked at the hand-back (ParkedBytes),
    // kernel sockets adopted (kAdoptSocket), and parked bytes those served first.
    std::atomic<uint64_t> parked_bytes{0};
    std::atomic<uint64_t> adopted{0};
    // Listeners passed on with SCM_RIGHTS: untaken connections parked for the next owner,
    // listeners adopted, and parked connections those published.
    std::atomic<uint64_t> parked_connections{0};
    std::atomic<uint64_t> adopted_listeners{0};
    std::atomic<uint64_t> unparked_connections{0};
    std::atomic<uint64_t> unparked_bytes{0};
    // Live connections a saturated worker asked back (ipc::kFlagShed), and those the
    // application handed to its kernel (seed 003).
    std::atomic<uint64_t> shed_asked{0};
    std::atomic<uint64_t> shed{0};
    // Listeners' twins (twin.cpp): made, times a saturated worker sent new connections to one,
    // times one was found with connections waiting, and those parked at a hand-back.
    std::atomic<uint64_t> twins{0};
    std::atomic<uint64_t> twin_steers{0};
    std::atomic<uint64_t> twin_ready{0};
    std::atomic<uint64_t> twin_parked{0};
    // Inherited listeners served on demand (ipc::kAdoptOnDemand).
    std::atomic<uint64_t> on_demand_listeners{0};
    // The share of the last load window the loop spent working, in percent (LoadGauge's input).
    std::atomic<uint64_t> load_percent{0};
};

class Worker {
  public:
    Worker(const WorkerConfig &config, const std::atomic<bool> &stop);
    ~Worker();
    Worker(const Worker &) = delete;
    Worker &operator=(const Worker &) = delete;

    // Sets up the io_uring (probing every operation it uses) and the doorbell eventfd.
    // Returns an empty string or what is missing.
    std::string init();
    // Starts the thread and pins it. Returns an empty string or the error.
    std::string start();
    void join();

    // The eventfd that wakes this worker (signal handler, session hand-off).
    int doorbell_fd() const { return doorbell_fd_; }
    const WorkerStats &stats() const { return stats_; }
    // Whether this kernel has io_uring's SEND_ZC (large MemNet sends use it).
    bool zerocopy() const { return send_zc_; }
    // Whether it counts as saturated now (--handoff-load; read by the main thread for logs).
    bool saturated() const { return saturated_.load(std::memory_order_relaxed); }
    // Whether it takes adopted sockets now (LoadGauge::has_room), for the home's choice.
    bool has_room() const { return room_.load(std::memory_order_relaxed); }
    uint64_t load() const { return stats_.sessions.load(std::memory_order_relaxed) + queued_; }
    // Elastic engine (--min-workers): whether this worker takes new connections and families.
    // A parked one still serves what it has.
    bool active() const { return takes_new_.load(std::memory_order_relaxed); }
    void set_active(bool active) { takes_new_.store(active, std::memory_order_relaxed); }
    // The busy share of its last load window in percent, 0 if it has slept since.
    int busy_percent(uint64_t now_ns) const;

    // Any thread: hands a session (region created, hello answered) to this worker.
    void adopt(std::unique_ptr<Session> session);
    // Any thread: a forked child's control connection that asks to join one of our sessions.
    // The worker checks it and answers kJoinReply (closing the connection if refused).
    void adopt_join(const JoinRequest &join);
    // Any thread: a message from another worker serving the same family.
    void post(ShardMessage &&message);
    // Any thread: wakes this worker if it sleeps (a client rang the doorbell of a family whose
    // home is another worker).
    void poke();
    // Any thread: moves the ids of the sessions freed since the last call into `ids`, so the
    // engine can forget where they lived.
    void take_freed_sessions(std::vector<uint32_t> &ids);

  private:
    enum class Kind : uint8_t {
        kIgnore = 0,
        kWorkerDoorbell,
        kSessionDoorbell,
        kControl,
        kRecv,
        kSend,
        kAccept,
        kConnect,
        kWatch,       // multishot poll for an RST on a socket with no recv posted (after the FIN)
        kLink,        // a remote session's setup connection: its EOF ends the session
        kFabricWait,  // the fabric endpoint's wait fd: the relays published something
        kPeekWatch,   // poll for what comes behind an accepted connection's peeked bytes
        kDirect,      // a MemNet send or receive straight from/into registered memory
        kDirectWait,  // direct mode: a poll for what waits in the kernel socket
        kTwinWatch,   // a poll for connections waiting in a listener's twin (twin.cpp)
    };

    struct TimedSlot {
        uint32_t session_index;
        uint32_t session_gen;
        uint32_t slot;
        uint32_t slot_gen;
    };

    void run();
    void shutdown_all();

    // --- loop pieces ---
    bool adopt_pending();
    bool process_queue(Session &s);
    void process_slot(Session &s, uint32_t i);
    unsigned reap();
    void handle_completion(uint64_t user_data, int32_t res, uint32_t cqe_flags);
    void flush_wakes();
    void sleep_until_work();
    bool any_queue_has_work();
    void set_sleeping(uint32_t value);
    void housekeeping(uint64_t now);
    void release_idle_rings(uint64_t now);

    // --- io_uring helpers ---
    io_uring_sqe *get_sqe();
    static uint64_t user_data(Kind kind, uint32_t session, uint32_t slot, uint32_t gen);
    void post_worker_doorbell();
    void post_session_doorbell(Session &s);
    void post_control_poll(Session &s, uint32_t member);
    void cancel(Session &s, uint32_t i, Kind kind);
    void track_op(Session &s, uint32_t i, io_uring_sqe *sqe, Kind kind);
    void schedule(Session &s, uint32_t i);

    // --- data path ---
    void apply_client_state(Session &s, uint32_t i);
    void apply_posted_options(Session &s, uint32_t i, uint32_t posted);
    void apply_client_indices(Session &s, uint32_t i, uint32_t tx_tail, uint32_t rx_head,
                              uint32_t acc_head);
    void post_recv(Session &s, uint32_t i);
    bool grow_rx(Session &s, uint32_t i);
    bool adopt_tx_ring(Session &s, uint32_t i);
    void post_send(Session &s, uint32_t i);
    void post_accept(Session &s, uint32_t i);
    // Connections wait in listener i's kernel queue that the engine cannot take (`error`):
    // accept() reports it while they wait, and the tick tries again.
    void refuse_accepts(Session &s, uint32_t i, int error);
    void set_accept_error(Session &s, uint32_t i, int error);
    void post_connect_poll(Session &s, uint32_t i);
    void post_watch(Session &s, uint32_t i);
    // Records the rx ring position of the urgent mark if the kernel socket's reading stopped
    // there (SIOCATMARK), and what poll() says of urgent data.
    void look_for_urgent_mark(Session &s, uint32_t i);
    // A socket whose urgent data is watched: reads what the kernel socket has, by hand, up to
    // the urgent mark (where it stops, unless told to go past), then polls again.
    void receive_by_hand(Session &s, uint32_t i);
    void stop_at_urgent_mark(Session &s, uint32_t i);
    // An accepted connection's first bytes are peeked (session.hpp, EngineSlot::peeking):
    // end_peek() drops them from the kernel socket, which the rx ring now holds alone;
    // leave_peek() also starts receiving for real.
    void watch_peeked(Session &s, uint32_t i);
    void on_peek_watch(Session &s, uint32_t i, int32_t res);
    void end_peek(Session &s, uint32_t i);
    void leave_peek(Session &s, uint32_t i);
    bool discard_received(Session &s, uint32_t i, uint32_t bytes);
    void on_recv(Session &s, uint32_t i, int32_t res);
    void on_send(Session &s, uint32_t i, int32_t res, uint32_t cqe_flags);
    void on_send_released(Session &s, uint32_t i, int32_t usage);
    bool zero_copy_fits(const EngineSlot &es, uint32_t len, int flags) const;
    bool zero_copy_allowed(const EngineSlot &es, uint32_t len) const;
    void release_tx(Session &s, uint32_t i);
    void on_accept(Session &s, uint32_t i, int32_t res);
    // Connection `fd`, accepted by listener i into the reserved slot j: placed (here or at a
    // shard) and published in accept order.
    void deliver_accepted(Session &s, uint32_t i, uint32_t j, int fd, bool parked);
    // Slot j becomes connection `fd`, accepted by `from`'s listener (here or at the home).
    void setup_accepted(Session &s, uint32_t j, int fd, const AcceptedFrom &from);
    // Publishes connection j (any shard's) in listener i's accept ring.
    void publish_accepted(Session &s, uint32_t i, uint32_t j);
    // The home: publishes the given-away connections at the front of the accept order that
    // are placed (or drops them, their listener gone).
    void publish_accepts(Session &s);
    void drop_placed(Session &s, const PendingAccept &p);
    void on_connect(Session &s, uint32_t i, int32_t res);
    void on_connected(Session &s, uint32_t i);
    // Connects in progress, by local address: a connection this worker accepts from one of
    // them settles that connect first, so that, as on Linux, the connecting side is connected
    // no later than the accept returns (issue 10).
    void track_connect(Session &s, uint32_t i);
    void untrack_connect(Session &s, uint32_t i);
    void settle_connect_of(const sockaddr_storage &peer, socklen_t len);
    // A socket just connected (accepted, connected, adopted): publishes both its addresses
    // and tracks it by them, with one getsockname() and one getpeername(). Tracked by local
    // address, a reset this worker sends to another of its own sockets is recorded on that
    // one before the close that sent it is answered (issue 10).
    void note_connected(Session &s, uint32_t i);
    void untrack_connected(Session &s, uint32_t i);
    // Sends slot i's RST now (tcp_disconnect()), and records it on the peer if it is ours: on
    // this worker at once, on another one through kPeerReset (its close waits for them).
    void reset_now(Session &s, uint32_t i);
    // A connection of ours `ours` was reset: if this worker serves its peer `peer_key`, the
    // reset is recorded there now (when nothing unread could be overtaken). Whether it does.
    bool peer_reset_here(const AddressKey &ours, const AddressKey &peer_key);
    static bool same_host(const AddressKey &a, const AddressKey &b);
    void on_peer_reset_answer(Session *s, const ShardMessage &message);
    void on_watch(Session &s, uint32_t i, int32_t res, bool more);
    void on_control(Session &s, uint32_t member, int32_t res);
    void handle_control_message(Session &s, uint32_t member, const ipc::ControlMessage &msg, int fd,
                                const ipc::ControlCreds &creds);
    void register_waiter(Session &s, uint32_t member, int fd);
    // kNewSocket: a socket created as the asking process would have created it (its euid and
    // egid as the owner, in its network namespace), in a slot the engine picks.
    void new_socket(Session &s, uint32_t member, int family, const ipc::ControlCreds &creds);
    void reserve_member(Session &s, uint32_t member);
    void release_waiters(Session &s, uint32_t member);
    // kHandoff; `shed`: only if the worker asked for the socket and nothing can be lost
    // (shed_refusal), else answered -EAGAIN.
    // `how`: ipc::kHandoff* bits.
    void start_handoff(Session &s, uint32_t member, int32_t slot, uint32_t how);
    // 0 if slot i can go back to its client's kernel now without losing a byte, else -errno.
    int shed_refusal(Session &s, uint32_t i) const;
    // Whether slot i is a connection a saturated worker may ask back.
    bool sheddable(const Session &s, uint32_t i) const;
    // Seed 003's handoff of live connections, once per load window: while saturated, asks some
    // of this worker's connections back (ipc::kFlagShed); once no longer, withdraws the asks.
    void ask_to_shed();
    void ask_back(Session &s, uint32_t i);
    void withdraw_shed_ask(Session &s, uint32_t i);
    void withdraw_shed_asks();
    // kAdoptSocket: the member's kernel TCP socket `fd` (a connected one) served from a slot,
    // on the family's next worker in turn.
    void adopt_socket(Session &s, uint32_t member, int fd, const ipc::ControlCreds &creds,
                      bool on_demand);
    // Serves `fd` from a slot of this worker's: 0 with `reply.arg` the slot and `reply.token`
    // the parked bytes queued first, or -errno (then `fd` stays the caller's).
    int open_adopted(Session &s, int fd, int family, uid_t uid, uint32_t flags, uint32_t &i);
    int setup_adopted(Session &s, int fd, int family, uid_t uid, ipc::ControlMessage &reply);
    int setup_adopted_listener(Session &s, int fd, int family, const ipc::ControlCreds &creds,
                               bool on_demand, ipc::ControlMessage &reply);
    // A passed-on listener's untaken connections (ParkedConnections): park_untaken() parks
    // those here and asks the shards for theirs; park_connection() parks one.
    void park_untaken(Session &s, uint32_t i);
    bool park_connection(Session &s, uint32_t j, uint64_t cookie);
    // kAdopt on a shard (`s` null: the family is ending there).
    void place_adopted(Session *s, ShardMessage &message);
    // The home's answer to kAdoptSocket; a slot whose answer cannot be delivered is closed.
    void answer_adopt(Session &s, uint32_t member, const ipc::ControlMessage &reply);
    // Moves what fits of an adopted socket's parked bytes into its rx ring. True once all are
    // there (receiving from the kernel socket may start).
    bool feed_prefix(Session &s, uint32_t i);
    // Slot i's rx ring is full: publishes kFlagRxPaused, then takes the client's rx_head once
    // more. False after a violation (an rx_head outside the ring).
    bool pause_full_rx(Session &s, uint32_t i);
    // Answers a pending kHandoff once nothing more can land in the slot's rings.
    void maybe_finish_handoff(Session &s, uint32_t i);
    void accept_join(const JoinRequest &join);
    // Sends a reply on a member's control connection; false if the session ended over it.
    bool reply_control(Session &s, uint32_t member, const ipc::ControlMessage &reply);
    void resume_listeners(Session &s);

    // --- slots ---
    // A free slot for a new socket or an accepted connection (kNoSlot if the session has none
    // left and may not have another chunk), taken off the free list.
    uint32_t take_free_slot(Session &s);
    bool has_free_slot(Session &s);
    // The io_uring personality whose credentials own what an accept on listener `fd` creates:
    // those of the listener's owner (its socket's uid and gid), as if that owner accepted.
    uint16_t personality_for(int fd);
    uint16_t personality_for(uid_t uid, gid_t gid);

    // --- slot state ---
    void init_slot(Session &s, uint32_t i, int fd, int family, uint32_t flags);
    // Slot i (set up) is open for its client from now on, and counted as such.
    void publish_open(Session &s, uint32_t i);
    void publish_flags(Session &s, uint32_t i, uint32_t flags, bool seq_cst = false);
    void bump_event(Session &s, uint32_t i);
    void mark_changed(Session &s, uint32_t i);
    void record_error(Session &s, uint32_t i, int error);
    // The peer's FIN was received (a receive returned 0): every recv() sees it from now on.
    void record_fin(Session &s, uint32_t i);
    // `also`: bits the kernel reported before the engine consumed them (POLLERR with SO_ERROR).
    void update_kernel_mask(Session &s, uint32_t i, uint32_t also = 0);
    // The kernel socket's local address into the slot; 0 or -errno (getsockname()).
    int refresh_local_address(Session &s, uint32_t i);
    void apply_shut_wr(Session &s, uint32_t i);
    // A listener stops (close, shutdown(SHUT_RD), hand-back): no more accepts from its kernel
    // socket; its twin's waiting connections are parked with `park_twin`, else reset.
    void stop_listening(Session &s, uint32_t i, bool park_twin = false);

    // --- a listener's twin (twin.cpp; seed 003's handoff at accept without a round trip) ---
    // Before listener i's first listen(): whether it gets a twin, and if so its SO_REUSEPORT.
    bool prepare_twin(Session &s, uint32_t i);
    // After it: the twin, bound and listening as the listener is, or none (`prepared` undone).
    void make_twin(Session &s, uint32_t i, int backlog);
    // The group's choice, as the worker's load says: the twin while saturated.
    void steer_twin(Session &s, uint32_t i);
    void steer_twins();
    // Whether the family's new connections go to the twins now (family_saturated()).
    bool twins_wanted(const Session &s) const;
    // Which of the family's workers takes its next connection (next_worker()); `adopted`:
    // a socket offered to the engine, which needs room rather than no saturation.
    uint32_t next_shard(Session &s, bool adopted);
    void watch_twin(Session &s, uint32_t i);
    void on_twin_watch(Session &s, uint32_t i, int32_t res);
    // The client found the twin empty (SocketSlot::twin_drained): flag off, watch again.
    void twin_drained(Session &s, uint32_t i);
    // The twin leaves the group; what waits in it is parked (`park`) or reset.
    void retire_twin(Session &s, uint32_t i, bool park);
    // An inherited listener (ipc::kAdoptOnDemand): watched, accepted from by the clients.
    void serve_on_demand(Session &s, uint32_t i);
    // Our descriptor of the twin goes, and its charge to the owner's share.
    void close_twin(Session &s, uint32_t i);
    // kHandoff with kHandoffTwin: a descriptor of the twin for the member.
    void give_twin(Session &s, uint32_t member, uint32_t i);
    // A setsockopt() the application made on listener i: noted for, and applied to, its twin.
    void note_listener_option(Session &s, uint32_t i, int level, int name, const void *value,
                              uint32_t len);
    // Connections in listener i's accept ring that the application has not taken: closed
    // (`close`), or reset but kept, since the application may still take their index.
    void drop_untaken(Session &s, uint32_t i, bool close);
    // What becomes of a listener's accepted connections nobody took, from accept ring position
    // `from` on (a shard's are told with kDrop, whose result is this).
    enum class Untaken : int32_t { kReset = 0, kClose = 1, kPark = 2 };
    void for_each_untaken(Session &s, uint32_t i, uint32_t from, Untaken what);
    void reset_in_place(Session &s, uint32_t i);
    void start_close(Session &s, uint32_t i, bool reset);
    void maybe_finish_close(Session &s, uint32_t i);
    void finish_close(Session &s, uint32_t i);

    // --- requests (ops.cpp) ---
    void handle_request(Session &s, uint32_t i, uint32_t req_seq);
    void respond(Session &s, uint32_t i, uint32_t seq, int result, const uint8_t *opt = nullptr,
                 uint32_t opt_len = 0);
    int op_socket(Session &s, uint32_t i, const ipc::Request &req);
    int op_bind(Session &s, uint32_t i, const ipc::Request &req);
    int op_listen(Session &s, uint32_t i, const ipc::Request &req);
    int op_connect(Session &s, uint32_t i, const ipc::Request &req);
    int op_shutdown(Session &s, uint32_t i, int how);
    int shutdown_listener(Session &s, uint32_t i, int how);
    int shutdown_connecting(Session &s, uint32_t i, int how);
    int op_setsockopt(Session &s, uint32_t i, const ipc::Request &req);
    int op_getsockopt(Session &s, uint32_t i, const ipc::Request &req, uint8_t *out,
                      uint32_t &out_len);
    int op_getsockname(Session &s, uint32_t i);
    int op_ioctl(Session &s, uint32_t i, const ipc::Request &req);
    int op_stat(Session &s, uint32_t i, const ipc::Request &req, struct statx &out);
    int op_recv_oob(Session &s, uint32_t i, const ipc::Request &req, uint8_t *out,
                    uint32_t &out_len);
    int op_past_mark(Session &s, uint32_t i);

    // --- MemNet (memnet.cpp) ---
    void register_mem(Session &s, uint32_t member, const ipc::ControlMessage &msg, int fd);
    void deregister_mem(Session &s, uint32_t member, int32_t id);
    // Starts the next descriptor of the slot's direct queue, if none is in progress.
    void take_direct(Session &s, uint32_t i);
    void post_direct(Session &s, uint32_t i);
    void on_direct(Session &s, uint32_t i, int32_t res, uint32_t cqe_flags);
    // Publishes the descriptor's result and lets its registration go; then the next one.
    void finish_direct(Session &s, uint32_t i, int32_t result);
    void publish_direct_result(Session &s, uint32_t i, int32_t result);
    // The answer of a direct receive of `len` bytes that the rx ring's bytes come before: the
    // ring's bytes not promised yet (ipc::kDirectUseRxRing + n), or 0 if it has none.
    int32_t promise_ring_bytes(Session &s, uint32_t i, uint32_t len);
    // The slot's transfer ends: its registration is let go, nothing is published.
    void release_direct(Session &s, uint32_t i);
    // Direct mode (EngineSlot::rx_direct): entered when a direct receive is taken, left when a
    // recv() asks for the ring (Op::kLeaveDirect) or urgent data is watched.
    void enter_direct_mode(Session &s, uint32_t i);
    void leave_direct_mode(Session &s, uint32_t i);
    void post_direct_wait(Session &s, uint32_t i);
    void on_direct_wait(Session &s, uint32_t i, int32_t res);
    int op_leave_direct(Session &s, uint32_t i);

    // --- families served by several workers (Family) ---
    Session *find_session(uint32_t id);
    void handle_message(ShardMessage &message);
    void place_accepted(Session *s, ShardMessage &message);
    void on_placed(Session *s, ShardMessage &message);
    // Sends `message` to every other shard of the family (from the home).
    void tell_shards(Session &s, const ShardMessage &message);
    void tell_home(Session &s, ShardMessage &&message);
    ShardMessage message_for(Session &s, ShardMessage::Type type);
    // An answer to `message`, to its sender, from this worker.
    ShardMessage answer_for(const ShardMessage &message, ShardMessage::Type type);
    // Tells the shards of waiter w's pipe (a copy of it each), or that it has none now.
    void share_waiter(Session &s, uint32_t w);
    void share_mem(Session &s, uint32_t id);
    // Whether registration `id` is known here; a shard first applies the registrations its
    // inbox holds (the home tells the shards before it answers the client).
    bool knows_mem(Session &s, uint32_t id);
    void apply_mem_messages();
    // The answer to a kHandoff: sent on the member's connection (the home) or to the home.
    void deliver_handoff(Session &s, uint32_t member, const ipc::ControlMessage &reply, int fd);
    void note_member_identity(Session &s, uint32_t member, bool live);

    // --- members ---
    // Drops the member's hold on each socket of this Session's chunks; false if the session
    // ended meanwhile.
    bool release_holds(Session &s, uint32_t member);
    // A member's process is gone (its connection closed) or its reservation expired: its
    // waiters and its hold on each socket go; the session ends with its last member.
    void end_member(Session &s, uint32_t member, const char *why);
    // Nobody is left in the family: what nobody holds is reset, and the session ends once
    // its graceful closes have finished (at once if none is left).
    void orphan(Session &s, const char *why);
    void expire_reservations(uint64_t now);

    // --- session lifetime ---
    void violation(Session &s, const char *format, ...) __attribute__((format(printf, 3, 4)));
    void end_session(Session &s, const char *why);
    // Sessions are freed only here, at one point of the loop, once nothing refers to them.
    void free_ended_sessions();
    void free_session(Session &s);

    // --- remote sessions (remote.cpp): clients behind tcps-relay, over the fabric ---
    std::string open_fabric();
    // Registers a remote session's region and answers its relay. False: end the session.
    bool attach_remote(Session &s);
    // Applies what the relays published (the tags are doorbells) and posts what waits.
    bool poll_fabric();
    void on_fabric_tag(uint32_t region, uint32_t tag);
    // Publishes what this batch changed in a remote session's slots (from flush_wakes).
    void publish_remote(Session &s);
    void publish_remote_slot(Session &s, uint32_t i);
    void note_remote_init(Session &s, uint32_t i);
    void end_remote(Session &s);
    // True once a remote session's region may be unmapped (nothing of it left in flight).
    bool remote_released(Session &s);
    void post_link_poll(Session &s);
    void on_link(Session &s, int32_t res);
    // Whether the worker may sleep as far as the fabric is concerned; posts the wait fd's poll.
    bool fabric_idle();

    WorkerConfig config_;
    const std::atomic<bool> &stop_;
    WorkerStats stats_;
    io_uring ring_{};
    bool ring_ready_ = false;
    int doorbell_fd_ = -1;
    uint64_t doorbell_value_ = 0;
    bool doorbell_posted_ = false;
    std::thread thread_;

    std::mutex pending_mutex_;
    std::vector<std::unique_ptr<Session>> pending_;
    std::vector<JoinRequest> pending_joins_;
    std::vector<uint32_t> freed_ids_;     // under pending_mutex_
    std::vector<ShardMessage> messages_;  // under pending_mutex_
    std::atomic<bool> has_pending_{false};
    std::atomic<bool> sleeping_{false};             // between the sleep's re-check and its wake
    std::atomic<bool> takes_new_{true};             // active(): not parked
    std::atomic<uint64_t> load_window_end_ns_{0};   // when load_percent was last computed
    std::unordered_map<uint32_t, uint32_t> by_id_;  // session id -> index in table_
    std::atomic<uint64_t> queued_{0};

    std::vector<std::unique_ptr<Session>> table_;  // by Session::index
    std::vector<uint32_t> free_indices_;
    std::vector<uint32_t> active_;  // indices of sessions in table_
    std::vector<Session *> dirty_;
    std::vector<uint32_t> ending_;  // sessions ended, freed once their operations completed
    std::vector<TimedSlot> timed_;
    std::unique_ptr<uint8_t[]> peek_scratch_;  // kRingBytes: a peek of what follows the peeked
    // Freed engine slots whose ring pages are given back once they have stayed free a while
    // (oldest first; an entry whose slot reopened since is stale).
    struct IdleRings {
        TimedSlot slot;
        uint64_t due_ns;
    };
    std::deque<IdleRings> idle_rings_;
    uint32_t next_session_gen_ = 1;
    std::unordered_map<AddressKey, TimedSlot, AddressKeyHash> connecting_;
    std::unordered_multimap<AddressKey, TimedSlot, AddressKeyHash> connected_;
    // io_uring personalities by (uid, gid) of the listeners' owners (personality_for).
    std::vector<std::pair<uint64_t, uint16_t>> personalities_;
    bool send_zc_ = false;  // IORING_OP_SEND_ZC (Linux 6.0)
    // Saturation (seed 003): the share of each load window the loop spent working.
    LoadGauge gauge_;
    std::atomic<bool> saturated_{false};  // gauge_'s, for other threads
    std::atomic<bool> room_{true};        // gauge_'s has_room(), for other threads
    uint64_t load_window_start_ns_ = 0;
    uint64_t window_cpu_start_ns_ = 0;  // the thread's CPU time then (thread_cpu_ns)
    uint64_t busy_ns_ = 0;
    uint32_t shed_round_ = 0;         // load windows in which it asked: which connections it asks
    uint64_t shed_asks_open_ = 0;     // asks published and not withdrawn (an upper bound)
    size_t adopted_this_window_ = 0;  // sockets taken from the kernel (kAdoptSocket)
    uint32_t reservations_ = 0;       // reserved members across our sessions: expire on ticks
    uint64_t now_ns_ = 0;
    uint64_t next_housekeeping_ns_ = 0;

    std::unique_ptr<ipc::FabricEndpoint> fabric_;
    struct FabricOwner {
        uint32_t session_index = UINT32_MAX;
        uint32_t session_gen = 0;
    };
    std::vector<FabricOwner> fabric_owners_;  // by fabric region
    bool fabric_wait_posted_ = false;
    uint32_t remote_releasing_ = 0;  // ended remote sessions waiting for the fabric
};

}  // namespace tcps::engine
