// One client process's session: its region, its credentials, and the engine's private record
// of every socket slot. The region is client-writable; everything in this file that is not in
// the region is the engine's own truth, which it never reads back from shared memory.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "layout.hpp"
#include "policy.hpp"
#include "ring.hpp"

namespace tcps::engine {

inline constexpr uint32_t kNoSlot = 0xffffffff;
inline constexpr uint16_t kNoMember = 0xffff;

// An AF_INET/AF_INET6 address and port as a hashable key (the engine's connecting sockets by
// their local address).
struct AddressKey {
    uint8_t addr[16] = {};
    uint16_t port = 0;
    uint16_t family = 0;
    bool operator==(const AddressKey &other) const = default;
};
struct AddressKeyHash {
    size_t operator()(const AddressKey &key) const;
};
// False if `addr` is not an inet address.
bool address_key(const void *addr, uint32_t len, AddressKey &key);

// The engine's view of one socket slot.
// An option the application set on a listener, for its twin (engine/twin.cpp).
struct ListenerOption {
    int level = 0;
    int name = 0;
    std::vector<uint8_t> value;
};

struct EngineSlot {
    int fd = -1;
    uint32_t gen = 0;  // incarnation: bumped each time the slot opens, part of user_data
    ipc::SlotState state = ipc::SlotState::kFree;
    uint32_t flags = 0;         // what the engine last published in SocketSlot::flags
    uint32_t last_req_seq = 0;  // the last req_seq answered (kept across incarnations)
    int family = 0;

    // Ring indices: heads/tails the engine owns, and the last validated client values.
    // tx_head is what the client may write over again; tx_sent what the kernel has taken, which
    // runs ahead of it while a SEND_ZC's pages are the kernel's (zc_pending).
    uint32_t tx_head = 0;
    uint32_t tx_sent = 0;
    uint32_t tx_tail = 0;
    uint32_t rx_tail = 0;
    uint32_t rx_head = 0;
    uint32_t acc_tail = 0;
    uint32_t acc_head = 0;

    // Ring sizes (ipc::ring_bytes): the tx ring's as the client last set it (validated), the
    // rx ring's as we grew it, with our last doubling inside the bulk rings (ipc::ring_room).
    uint32_t tx_ring = ipc::kRingBytes;
    uint32_t rx_ring = ipc::kRingBytes;
    uint32_t rx_before = 0;
    uint32_t rx_grown_at = 0;
    uint32_t rx_head_at_growth = 0;  // the client's rx_head at the last doubling
    uint64_t rx_charged = 0;         // the rx ring's growth, charged to quota_uid
    bool bulk_used = false;          // a ring grew: its bulk rings hold pages to give back

    // Room the rx ring has for us to fill (ipc::ring_room); forgets the last doubling once the
    // client has read past it, before the free-running indices could wrap onto it.
    uint32_t rx_room() {
        if (rx_before != 0 && static_cast<int32_t>(rx_head - rx_grown_at) >= 0) rx_before = 0;
        return ipc::ring_room(rx_ring, rx_before, rx_grown_at, rx_head, rx_tail);
    }

    uint32_t applied_posted = 0;  // the SocketSlot::posted bits applied to fd

    // send(MSG_OOB): the tx position just past the urgent byte, while not yet sent.
    uint32_t urgent_tail = 0;
    bool urgent_pending = false;
    // The client wants urgent data watched (kPostedUrgentWatch): receives become a poll for
    // POLLIN|POLLPRI and reads by hand that look for the urgent mark before each read.
    bool urgent_watch = false;
    bool recv_polling = false;  // the posted kRecv is such a poll: we read by hand
    uint32_t poll_events = 0;   // what that poll waits for
    bool urgent_stop = false;   // stopped at the urgent mark (kFlagUrgentStop)
    bool past_mark_ok = false;  // the client asked to go past it (kPastMark)

    // A receive whose room wraps past the ring's end fills both parts at once (recvmsg): the
    // kernel reads these at submission.
    iovec rx_iov[2]{};
    msghdr rx_msg{};
    uint32_t send_len = 0;  // bytes of the send in flight
    // SEND_ZC out of the tx ring (--send-zc): the send in flight is one; one sent and not yet
    // released (its notification, which holds tx_head back, ends it); the kernel said that it
    // copied one anyway (auto copies from then on).
    bool send_zc = false;
    bool zc_pending = false;
    bool zc_copies = false;
    uint32_t zc_len = 0;      // what the one pending sent
    int32_t zc_unacked = -1;  // closing: the kernel's unacknowledged bytes at the last look
    uint16_t inflight = 0;    // SQEs whose completion refers to this slot
    bool recv_posted = false;
    bool send_posted = false;
    bool accept_posted = false;
    bool connect_posted = false;
    bool watch_posted = false;
    bool accept_retry = false;  // accepting paused by a resource error, retried on a tick
    bool timed = false;         // in the worker's list of slots to look at on each tick

    bool shut_wr_pending = false;
    uint32_t shut_wr_tail = 0;

    bool close_reset = false;
    // kClose of a socket that holds a port is answered once the kernel socket is closed.
    bool close_answer_pending = false;
    uint32_t close_answer_seq = 0;
    // Workers yet to look for the peer of its reset (reset_now): the close waits for them.
    uint32_t peer_resets_pending = 0;
    // A listener's untaken connections on other workers, told to close or reset (kDrop) and
    // not yet answered (kDropped): its close waits for them, and for those still being placed
    // (acc_pending), so that they are reset when close() returns, as Linux's close() resets
    // the queue of a listener (and its shutdown(SHUT_RD)).
    uint32_t drops_pending = 0;
    // A listener's shutdown(SHUT_RD) is answered once drops_pending is 0, for the same reason.
    bool shutdown_answer_pending = false;
    uint32_t shutdown_answer_seq = 0;
    bool send_cancelled = false;     // a reset close cancelled the send in flight
    uint32_t close_tail = 0;         // a graceful close drains the tx ring up to here
    uint64_t close_progress_ns = 0;  // last time the drain moved

    uint32_t accepted_by = kNoSlot;      // listener slot that accepted this connection
    uint32_t accepted_by_gen = 0;        // and that listener's incarnation
    uint32_t accept_pos = 0;             // its position in that listener's accept ring
    uint32_t accept_reserved = kNoSlot;  // engine slot held for the posted accept
    // A listener's accepted connections given to other workers (Family) and not yet placed:
    // they count against the accept ring's room.
    uint32_t acc_pending = 0;

    // Handed back to the kernel (kHandoff): no receive, accept or watch is posted again, and
    // closing it only drops our descriptor. handoff_member waits for the answer; handoff_kept
    // of the rx ring's unread bytes are still in the kernel socket (peeked), so not lost.
    bool handed_off = false;
    bool handoff_park = false;  // the unread bytes go to ParkedBytes (ipc::kHandoffPark)
    // So does the reset, not yet reported to the client (ipc::kHandoffErrorPending).
    bool handoff_error = false;
    int error = 0;         // the error the engine reported in the slot's so_error (kFlagReset)
    int prefix_error = 0;  // parked with the prefix (ParkedBytes): reported after its bytes
    // Seed 003's handoff of a live connection: the saturated worker asked for it back
    // (ipc::kFlagShed), and the client's hand-back (ipc::kHandoffShed) is under way; it is
    // undone, answered -EAGAIN, if the receive it cancelled brought bytes after all.
    bool shed_asked = false;
    bool handoff_shed = false;
    uint16_t handoff_member = kNoMember;
    uint32_t handoff_kept = 0;
    // A listener passed on (kHandoffPark): its untaken connections are parked for its next
    // owner (ParkedConnections) before the answer; parks_pending of them by other workers.
    uint64_t listener_cookie = 0;  // SO_COOKIE, for a listener: another offer of it is this one
    bool untaken_parked = false;
    uint32_t parks_pending = 0;
    uint32_t untaken_lost = 0;  // untaken connections that could not be parked
    // Seed 003's handoff at accept without a round trip (engine/twin.cpp, --handoff-load): the
    // listener's twin, a kernel listener of its owner's on the same address in one
    // SO_REUSEPORT group with fd; a classic BPF program on the group sends new connections to
    // the twin while the worker is saturated, and the application accepts them from it.
    int twin_fd = -1;
    bool twin_steered = false;       // the program picks the twin now
    bool twin_watch_posted = false;  // Kind::kTwinWatch in flight
    uint32_t twin_drained = 0;       // SocketSlot::twin_drained as last seen
    // An inherited listener served on demand (ipc::kAdoptOnDemand): twin_fd is a descriptor
    // of the listener itself, and the engine accepts nothing from it.
    bool on_demand = false;
    // What the application set on the listener (with --handoff-load): its twin gets the same.
    std::unique_ptr<std::vector<ListenerOption>> listener_options;
    // An adopted socket's parked bytes (kAdoptSocket, engine/parked.hpp): they go into the rx
    // ring, from prefix_at on, before anything is received from the kernel socket.
    std::unique_ptr<std::vector<uint8_t>> prefix;
    uint32_t prefix_at = 0;

    // An accepted connection's first receive is a MSG_PEEK: its bytes go into the rx ring and
    // stay in the kernel socket too, as do the bytes that follow (peeked again) while the
    // ring has room, until the client first rings for the slot (it read, wrote, or asked
    // something: it uses the connection here) or a FIN or an RST comes. Then they are dropped
    // from the kernel socket and receiving goes on as usual. So a server that accepts and
    // passes a connection on with SCM_RIGHTS before reading it (Node's cluster, round-robin)
    // hands back a kernel socket that still holds the request, all of it.
    bool peeking = false;
    bool peek_posted = false;        // the recv in flight is the MSG_PEEK
    bool peek_watch_posted = false;  // Kind::kPeekWatch in flight
    bool peek_lowat = false;         // the kernel socket's SO_RCVLOWAT is peeked + 1, not 1
    uint32_t peeked = 0;             // bytes at the ring's tail that the kernel socket still has

    int rcvlowat = 1;
    // Whose share of the engine this socket counts against (Quotas), and the io_uring
    // personality its accepts run with (the listener's owner, 0: the engine's own).
    uint32_t quota_uid = 0;
    // Listed in the worker's connecting sockets (by its local address) while its connect is
    // in progress, so that accepting its connection settles it first.
    bool connect_tracked = false;
    AddressKey connect_key;
    // Listed in the worker's connected sockets (by its local address, with its peer's) while
    // it is connected, so that a reset this worker sends to it is seen at once.
    bool connected_tracked = false;
    AddressKey connected_key;
    AddressKey connected_peer;
    uint16_t accept_personality = 0;

    // MemNet's direct queue (ipc::DirectDescriptor): descriptors taken (direct_head) and the
    // one in progress. A direct send waits for the tx ring's bytes up to direct_tx_at; a
    // direct receive waits for the ring's receive in flight to be cancelled.
    enum class Direct : uint8_t { kNone, kSend, kRecv };
    Direct direct = Direct::kNone;
    bool direct_posted = false;  // Kind::kDirect in flight
    bool direct_dontwait = false;
    uint32_t direct_head = 0;           // descriptors taken; the one in progress is direct_head - 1
    uint32_t direct_tail = 0;           // the client's, validated
    uint32_t direct_mem = UINT32_MAX;   // the registration in use, if any
    std::shared_ptr<void> direct_keep;  // its mapping, kept until the transfer ends
    // The rx ring position up to which its bytes are promised to direct receives
    // (ipc::kDirectUseRxRing + n): a receive gets the ring's bytes not promised yet, and one
    // that finds none goes to the kernel socket, whose bytes all come after them.
    uint32_t ring_promised = 0;
    uint32_t direct_tx_at = 0;
    uint32_t direct_len = 0;
    uint32_t direct_done = 0;
    uint8_t *direct_base = nullptr;
    // A large direct send goes out with SEND_ZC: its result comes first, then a notification
    // once the kernel let go of the registered pages, which ends the transfer.
    bool direct_zc = false;
    int32_t direct_zc_result = 0;
    // Direct mode (ipc::kFlagRxDirect): the application takes this socket's bytes with direct
    // receives, so between them the engine leaves what arrives in the kernel socket and only
    // polls it (Kind::kDirectWait) to keep kernel_mask current: POLLIN while bytes wait there,
    // then the FIN or an RST.
    bool rx_direct = false;
    // Accepted while the worker was saturated (ipc::kFlagKernelServed): nothing is received
    // until the application takes its kernel socket, or rings for it after all.
    bool kernel_served = false;
    bool direct_wait_posted = false;
    uint32_t direct_wait_events = 0;  // what the poll in flight waits for
};

// Memory a family registered for MemNet (ControlType::kRegisterMem): the engine's own mapping
// of the client's memfd, shared by the family's shards (Family) and by each transfer in
// progress (EngineSlot::direct_keep). Unmapped, and its bytes given back to the uid charged,
// when the last of them lets go.
struct MemRegistration {
    uint8_t *base = nullptr;
    uint64_t length = 0;  // mapped: page-rounded
    std::shared_ptr<void> keep;
};
// The shared owner of a mapping of `length` bytes at `base`, charged to `uid`.
std::shared_ptr<void> own_mapping(uint8_t *base, uint64_t length, uid_t uid);

// The engine's records of a session's slots, one array per active chunk.
class SlotTable {
  public:
    EngineSlot &operator[](uint32_t i) {
        return chunks_[i >> ipc::kChunkShift][i & ipc::kChunkMask];
    }
    const EngineSlot &operator[](uint32_t i) const {
        return chunks_[i >> ipc::kChunkShift][i & ipc::kChunkMask];
    }
    void add_chunk(uint32_t k) { chunks_[k].reset(new EngineSlot[ipc::kChunkSlots]); }

  private:
    std::unique_ptr<EngineSlot[]> chunks_[ipc::kMaxChunks];
};

struct RemoteLink;  // remote.hpp: a client on another host, behind tcps-relay
class Worker;

// One family served by several workers (tcpsd --cores with more than one CPU). Each worker
// holds a shard of the family's session: its own Session object over the same region, with
// the chunks it activated, their slots and their work queues, so a socket belongs to exactly
// one worker and the data path takes no lock. Shard 0, the home, also holds everything that
// is the family's: its members and their control connections, its waiters' registrations,
// its MemNet registrations, and every socket the family creates itself (listeners, outgoing
// connections). The home gives the connections its listeners accept to the shards in turn;
// the shards learn of the family's changes (waiters, registrations, members that end) by
// message (Worker::post). Chunks are activated under `chunk_mutex`, in order, by whichever
// shard needs one: a rare event, never on the data path.
struct Family {
    std::vector<Worker *> workers;  // by shard, fixed at creation
    std::mutex chunk_mutex;
    uint32_t next_chunk = 0;  // under chunk_mutex
    // The shard that owns each activated chunk.
    std::array<std::atomic<uint32_t>, ipc::kMaxChunks> chunk_owner{};
    // The live members' identities, for a shard's privileged requests (family_rights); the
    // home updates it before it closes a member's connection, under members_mutex.
    struct MemberIdentity {
        pid_t pid;
        uid_t uid;
        int control_fd;
    };
    std::mutex members_mutex;
    std::array<MemberIdentity, ipc::kMaxMembers> members{};
    std::array<bool, ipc::kMaxMembers> member_live{};
};

// What an accepted connection inherits from its listener.
struct AcceptedFrom {
    int family = 0;
    uid_t quota_uid = 0;  // charged when the accept was posted
    int rcvlowat = 1;
    uint32_t listener = 0;
    uint32_t listener_gen = 0;
    // A connection parked when its listener was passed on (ParkedConnections): bytes received
    // for it before may wait in ParkedBytes, and go first.
    bool parked = false;
};

// An accepted connection the home gave to a shard (or placed itself behind such one), in
// accept order: published into its listener's accept ring once it and all before it are placed.
struct PendingAccept {
    uint64_t seq = 0;
    uint32_t listener = 0;
    uint32_t listener_gen = 0;
    uint32_t fallback = kNoSlot;  // the home's slot reserved for it: used if the shard cannot
    uint32_t slot = kNoSlot;      // where it was placed, once placed
    uint32_t shard = 0;           // whose slot that is
    bool placed = false;
    AcceptedFrom from;
};

inline constexpr uint64_t kReservationNs = 10'000'000'000;  // a forked child joins within 10 s

// One process of the session's family (see ipc::MemberRecord).
// A descriptor or session not counted against anyone's share (Quotas).
inline constexpr uid_t kUncharged = static_cast<uid_t>(-1);

struct Member {
    ipc::MemberState state = ipc::MemberState::kFree;
    int control_fd = -1;                 // its own control connection, once live
    uid_t control_charged = kUncharged;  // whose share the connection counts against
    bool control_posted = false;
    ClientCreds creds;
    uint64_t reserved_until_ns = 0;  // kReserved: freed if nobody joins by then
};

struct Session {
    uint32_t id = 0;
    ClientCreds creds;          // of the process that said hello
    uint64_t family_token = 0;  // the engine's own copy: the region's may have been rewritten
    int memfd = -1;
    int doorbell_fd = -1;  // this session's eventfd: the client writes it when we sleep
    ipc::RegionView region;
    // Chunks the engine has mapped, initialised and published (RegionHeader::chunks_active),
    // and how many this session may have: one for a relay session, whose client claims slots
    // [0, kClientSlots) of it itself (client_slots != 0).
    uint32_t chunks_active = 0;
    uint32_t max_chunks = ipc::kMaxChunks;
    uint32_t client_slots = 0;
    // How far its rings may grow: a relay session's chunk has no bulk rings.
    uint32_t ring_max() const { return client_slots != 0 ? ipc::kRingBytes : ipc::kRingMaxBytes; }
    uint32_t queue_cursor = 0;  // the chunk whose work queue process_queue() drains first

    // Worker-assigned identity for user_data.
    uint32_t index = 0;
    uint32_t gen = 0;

    SlotTable slots;
    std::array<int, ipc::kMaxWaiters> waiter_fds;
    std::array<uint16_t, ipc::kMaxWaiters> waiter_owner;  // member index, kNoMember if free
    std::array<uid_t, ipc::kMaxWaiters> waiter_charged;   // whose share each pipe counts against
    uid_t charged =
        kUncharged;  // whose share the session (memfd, doorbell, records) counts against
    std::array<Member, ipc::kMaxMembers> members;
    uint32_t live_members = 0;
    uint32_t reserved_members = 0;
    uint32_t waiter_scan_limit = 0;           // 1 + the highest registered waiter index
    std::vector<uint32_t> free_engine_slots;  // engine-allocated slots, a stack
    std::vector<uint32_t> listeners;
    std::vector<MemRegistration> mems;  // by id

    // Slots whose readiness changed in this batch, for waking waiters (a bit per slot of the
    // active chunks).
    std::vector<uint32_t> changed;
    std::vector<uint64_t> changed_bits;
    bool changed_test(uint32_t i) const {
        return i / 64 < changed_bits.size() && (changed_bits[i / 64] >> (i % 64)) & 1;
    }
    // Calls visit(i) for each slot of this Session's chunks (a shard's own; all, otherwise).
    template <typename Visit>
    void for_each_slot(Visit visit) {
        for (size_t k = 0; k < owned_chunks.size(); ++k)
            for (uint32_t i = owned_chunks[k] << ipc::kChunkShift, end = (owned_chunks[k] + 1)
                                                                         << ipc::kChunkShift;
                 i < end; ++i)
                visit(i);
    }
    // The shard whose chunk holds `slot` (Family), 0 (the home) if none or not a family's.
    uint32_t shard_of(uint32_t slot) const {
        if (!family || slot >= ipc::kMaxSockets) return 0;
        const uint32_t owner =
            family->chunk_owner[slot >> ipc::kChunkShift].load(std::memory_order_acquire);
        return owner < family->workers.size() ? owner : 0;
    }
    bool dirty = false;  // in the worker's list of sessions to wake

    bool ending = false;
    bool orphaned = false;  // no member left: ends when the last graceful close finishes
    uint32_t inflight = 0;  // every SQE whose completion refers to this session
    bool doorbell_posted = false;
    uint64_t doorbell_value = 0;  // the eventfd read's buffer
    uint32_t open_sockets = 0;

    // Shards (Family): null for a family served by one worker.
    std::shared_ptr<Family> family;
    uint32_t shard = 0;
    bool is_shard() const { return shard != 0; }
    std::vector<uint32_t> owned_chunks;  // the chunks this Session activated, in order
    // The home's: the shard the next accepted connection goes to, the accept order, the
    // connections given away and not yet published, and per member the shards that have not
    // yet released its holds (the member's index is not reused before).
    uint32_t next_shard = 0;
    uint64_t next_accept_seq = 0;
    std::deque<PendingAccept> pending_accepts;
    std::array<uint16_t, ipc::kMaxMembers> member_acks{};

    // Set for a remote session (tcpsd --fabric-listen): the client is on another host and this
    // region is a copy of the client's, mirrored over the fabric (remote.hpp). Null for local
    // clients.
    std::unique_ptr<RemoteLink> remote;

    Session();
    ~Session();
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;

    // Unmaps the region and closes every descriptor the session still holds.
    void release();
};

// The effective uid and CapEff of the process behind control connection `sock` (pid and uid
// as SO_PEERCRED reported them). False when in doubt (gone, pid reused); caps are 0 when its
// uid changed since it connected.
bool read_rights(int sock, pid_t pid, uid_t uid, uid_t &effective_uid, uint64_t &caps);

// Accepts one client on the control socket `listener` (non-blocking, close-on-exec) and learns
// who it is: SO_PEERCRED, then its rights (read_rights). Returns the connection, or -1 with
// errno set (EAGAIN: nobody waiting); a client whose credentials cannot be read is closed and
// the next one taken.
int accept_control_client(int listener, ClientCreds &creds);

// What the whole family may do now: requests reach the engine through the shared region, so
// a privileged one is allowed only if every live member could make it (Apache's children
// drop root after fork; they must not bind a port below 1024 through their parent's rights).
// Reads /proc for each member: only for the rare requests that need a privilege. A member's
// capabilities count only where its user namespace owns the network namespace of socket
// `socket_fd` (-1: anywhere).
ClientCreds family_rights(const Session &session, int socket_fd);

// Signals (a byte on its pipe) every armed waiter of the session that waits for a slot in
// `changed` or for any slot, unless `signal` is false, then empties `changed`. The caller's
// stores to the slots must be ordered before this call's loads of the waiters by a full fence
// (pairs with the client's arm-then-recheck: one of the two sees the other).
void wake_changed_waiters(Session &session, bool signal = true);

// Signals waiter `w` if it is armed (a byte on its pipe). The caller's stores before it must be
// ordered before this load by a full fence (wake_changed_waiters).
void signal_waiter(Session &session, uint32_t w);

// Makes waiter `w` the session's, idle, on the pipe write end `fd`, for member `owner`, counted
// against uid `charged`'s share.
void install_waiter(Session &session, uint32_t w, int fd, uint16_t owner,
                    uid_t charged = kUncharged);
// Closes waiter `w`'s pipe and frees it (and its share).
void close_waiter(Session &session, uint32_t w);
// Closes a member's control connection (and frees its share).
void close_control(Member &member);
// Unmaps a MemNet registration and gives its bytes back to the uid charged for them.
void release_mem(MemRegistration &mem);

// What a session costs its uid beyond its member connections: the memfd and the doorbell.
inline constexpr uint32_t kSessionFds = 2;

// Tells the session's processes that the engine is gone for them: engine_alive = 0 (they fall
// back), and every registered waiter gets a byte, so no thread sleeps on a dead session. The
// caller then closes (or releases) the waiters' pipes, which gives them EOF.
void announce_engine_gone(Session &session);

// Creates a sealed, mapped, initialised region for a new session, with chunk 0 active.
// `relay`: a session behind tcps-relay (one chunk, one contiguous mapping, the client claims
// its socket() slots). Returns 0 or -errno.
int create_region(Session &session, uint32_t session_id, bool relay);

// Maps, initialises and publishes the session's next chunk: its slots join the free list.
// 0, or -EMFILE (the session has all its chunks), -ENOMEM.
int activate_chunk(Session &session);
// Maps chunk `chunk`'s bulk rings (ipc::RegionView::bulk) if they are not yet: once, when the
// first of its rings grows. False if they cannot be (a relay session; no address space left).
bool map_bulk(Session &session, uint32_t chunk);

// A pending join: a forked child's control connection, for the worker serving the session.
struct JoinRequest {
    uint32_t session_id = 0;
    uint32_t member = 0;
    uint64_t token = 0;
    int control_fd = -1;
    ClientCreds creds;
};

}  // namespace tcps::engine
