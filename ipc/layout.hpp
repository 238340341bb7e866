// The whole shared-memory contract between libtcps.so (the client) and tcpsd (the engine).
//
// One region per client process family, created by the engine as a sealed memfd and handed to
// the process that said hello, over the control socket (SCM_RIGHTS). The processes it forks
// inherit the mapping with the descriptors, and each joins the session as a member with a
// control connection of its own, so a socket shared across fork is one slot, with one pair of
// rings, exactly as Linux shares one socket between the processes that hold it. Only the engine,
// that family, and whoever may ptrace one of its processes (and so read its memory anyway) can
// map the region, so one family never sees another's sockets or bytes (the seeds' H1: a
// protected channel).
//
// Rules of the contract:
//  * Fixed-size records, offsets computed from the compile-time constants below, never pointers
//    and never sizes read back from the region: the client can write anything anywhere in it.
//  * Every field is written by exactly one side; the comments name it. The engine treats every
//    client-written field as untrusted: it loads it once into a local, checks it, then uses the
//    local (no double fetch).
//  * A slot's indices (both sides', the client's too) are zeroed by the engine while it still
//    owns the slot: before it answers kSocket and before it publishes an accepted connection.
//  * A side that publishes (a store-release) and then reads what the other side published
//    (engine_sleeping, flags, a waiter's state) needs a seq_cst fence in between: release/acquire
//    alone allows the store-load reordering that loses a wake-up.
//  * Producer and consumer indices are free-running uint32 counters; a ring holds
//    `tail - head` bytes/entries, which must never exceed its capacity. Publish with
//    store-release, read with load-acquire.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tcps::ipc {

inline constexpr uint32_t kRegionMagic = 0x53504354;  // "TCPS" in little-endian memory
inline constexpr uint32_t kLayoutVersion = 3;

// Hard-coded, not std::hardware_destructive_interference_size: the engine and the shim are built
// separately and must agree on every offset.
inline constexpr size_t kCacheLine = 64;
inline constexpr size_t kPageSize = 4096;

// Sockets per client process. Slots [0, kClientSlots) are allocated by the client (socket());
// slots [kClientSlots, kMaxSockets) by the engine (connections it accepts eagerly, S2).
inline constexpr uint32_t kMaxSockets = 4096;
inline constexpr uint32_t kClientSlots = 1024;

// Per-socket byte rings. Powers of two so a free-running index maps with a mask.
inline constexpr uint32_t kTxRingBytes = 64 * 1024;
inline constexpr uint32_t kRxRingBytes = 64 * 1024;

// Connections accepted by the engine but not yet taken by the application's accept().
inline constexpr uint32_t kAcceptRingEntries = 64;

// Threads of one family that can sleep at once, each on its own pipe (see Waiter).
inline constexpr uint32_t kMaxWaiters = 1024;

// Processes of one family that can be members of its session at once (see MemberRecord).
inline constexpr uint32_t kMaxMembers = 256;

// Work queue: a slot is in it at most once (SocketSlot::doorbell_queued), so kMaxSockets entries
// can never overflow.
inline constexpr uint32_t kWorkQueueEntries = kMaxSockets;

inline constexpr uint32_t kSockAddrMax = 28;  // sizeof(sockaddr_in6)
inline constexpr uint32_t kOptMax = 256;      // TCP_INFO (232 bytes on 6.x) fits

static_assert((kTxRingBytes & (kTxRingBytes - 1)) == 0, "tx ring size must be a power of two");
static_assert((kRxRingBytes & (kRxRingBytes - 1)) == 0, "rx ring size must be a power of two");
static_assert((kAcceptRingEntries & (kAcceptRingEntries - 1)) == 0, "accept ring: power of two");
static_assert((kWorkQueueEntries & (kWorkQueueEntries - 1)) == 0, "work queue: power of two");
static_assert(kClientSlots < kMaxSockets, "the engine needs slots for accepted connections");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "atomics must work across processes");
static_assert(std::atomic<int32_t>::is_always_lock_free, "atomics must work across processes");

// ---------------------------------------------------------------------------------------------
// Control operations a client asks of the engine for one socket (SocketSlot::request).
// Data never goes through requests: it moves through the rings.
enum class Op : uint32_t {
    kNone = 0,
    // arg0 = family (AF_INET or AF_INET6). The slot must be a free client slot.
    // Result 0. The engine creates its kernel socket and sets state = kOpen.
    kSocket = 1,
    // addr/addr_len. Result 0 or -errno (EADDRINUSE, EACCES for a port below
    // ip_unprivileged_port_start without CAP_NET_BIND_SERVICE, EINVAL, ...).
    kBind = 2,
    // arg0 = backlog. Result 0 or -errno. Then the engine accepts eagerly into the accept ring.
    kListen = 3,
    // addr/addr_len. Result -EINPROGRESS: the connect has started; its outcome arrives in flags
    // (kFlagConnected, or kFlagReset with so_error/error_gen). Other results are immediate errors
    // (-EISCONN, -EALREADY, -EINVAL, -EAFNOSUPPORT...).
    kConnect = 4,
    // arg0 = how (SHUT_RD/SHUT_WR/SHUT_RDWR). SHUT_WR takes effect after the tx ring drains.
    kShutdown = 5,
    // arg0 = 1 to reset (SO_LINGER 0, or unread bytes in the rx ring: Linux sends RST then).
    // The client does not wait for the response; the engine drains the tx ring (unless reset),
    // closes its socket and then sets state = kFree, after which the slot may be reused.
    kClose = 6,
    // arg0 = level, arg1 = optname, opt/opt_len. Result 0 or -errno. Applied to the engine's
    // kernel socket after the engine's permission check.
    kSetSockOpt = 7,
    // arg0 = level, arg1 = optname, arg2 = buffer length the caller offers.
    // Result 0 with response.opt/opt_len, or -errno.
    kGetSockOpt = 8,
    // Refreshes local_addr (e.g. after an implicit bind). Result 0.
    kGetSockName = 9,
    // SIOCOUTQ/SIOCINQ and friends on the kernel socket. arg0 = request. Result >= 0 value.
    kIoctl = 10,
};
inline constexpr uint32_t kOpCount = 11;

// Socket states in SocketSlot::state, written by the engine only.
enum class SlotState : uint32_t {
    kFree = 0,     // unused; a client slot may be taken by socket()
    kOpen = 1,     // has a kernel socket in the engine
    kClosing = 2,  // kClose received; the engine is draining/closing
};

// SocketSlot::flags bits, written by the engine only.
inline constexpr uint32_t kFlagBound = 1u << 0;
inline constexpr uint32_t kFlagListening = 1u << 1;
inline constexpr uint32_t kFlagConnecting = 1u << 2;
inline constexpr uint32_t kFlagConnected = 1u << 3;
// The peer's FIN arrived; every byte before it is already in the rx ring (rx_tail is final).
inline constexpr uint32_t kFlagRxEof = 1u << 4;
// Local shutdown(SHUT_WR) was applied (after the tx ring drained).
inline constexpr uint32_t kFlagTxShut = 1u << 5;
inline constexpr uint32_t kFlagRxShut = 1u << 6;
// The connection is dead (RST, timeout, failed connect): no more data in either direction.
inline constexpr uint32_t kFlagReset = 1u << 7;
// The engine stopped receiving because the rx ring is full. A client that frees rx space while
// this is set must ring the doorbell for the slot.
inline constexpr uint32_t kFlagRxPaused = 1u << 8;
// The accept ring is full or the engine ran out of slots: accepting paused. A client that
// takes a connection while this is set must ring the doorbell for the listener.
inline constexpr uint32_t kFlagAcceptPaused = 1u << 9;

// SocketSlot::posted bits, written by the client: operations whose answer the client knows
// without the engine, so the calling thread does not wait for it. The engine applies them when
// it next looks at the slot, after the bytes queued before them.
//  * TCP_CORK and TCP_NODELAY only change how the kernel cuts the byte stream into segments, and
//    Linux accepts them on a TCP socket in any state (servers toggle TCP_CORK around every
//    response). A *Set bit says the client chose the value; until then getsockopt() asks the
//    engine (an accepted socket inherits its listener's). Applied before the bytes queued after
//    them, so those are corked.
//  * shutdown() of a connected socket that has not been reset always succeeds; the bits only
//    ever get set. Other states ask the engine (Op::kShutdown).
inline constexpr uint32_t kPostedCorkSet = 1u << 0;
inline constexpr uint32_t kPostedCork = 1u << 1;
inline constexpr uint32_t kPostedNoDelaySet = 1u << 2;
inline constexpr uint32_t kPostedNoDelay = 1u << 3;
inline constexpr uint32_t kPostedShutRd = 1u << 4;
inline constexpr uint32_t kPostedShutWr = 1u << 5;
inline constexpr uint32_t kPostedMask = 0x3f;

// ---------------------------------------------------------------------------------------------
struct SockAddrRecord {
    uint32_t len;  // 0 = none
    uint8_t bytes[kSockAddrMax];
};
static_assert(sizeof(SockAddrRecord) == 32, "address records are 32 bytes");

// Written by the client; read (once, then validated) by the engine.
struct Request {
    uint32_t op;  // Op
    int32_t arg0;
    int32_t arg1;
    int32_t arg2;
    uint32_t addr_len;
    uint32_t opt_len;
    uint32_t reserved[2];
    uint8_t addr[kSockAddrMax];
    uint32_t reserved2;
    uint8_t opt[kOptMax];
};
static_assert(sizeof(Request) == 32 + 32 + kOptMax, "request record size is part of the layout");

// Written by the engine.
struct Response {
    int32_t result;  // >= 0 success, -errno failure
    uint32_t opt_len;
    uint32_t reserved[6];
    uint8_t opt[kOptMax];
};
static_assert(sizeof(Response) == 32 + kOptMax, "response record size is part of the layout");

// One offloaded socket's channel: its control request/response, its state, and the indices of
// its own tx and rx rings (the ring bytes live at tx_ring_offset()/rx_ring_offset()).
struct alignas(kCacheLine) SocketSlot {
    // --- line 0: written by the client (untrusted) ---
    std::atomic<uint32_t> tx_tail;   // bytes the application has put into the tx ring
    std::atomic<uint32_t> rx_head;   // bytes the application has taken from the rx ring
    std::atomic<uint32_t> req_seq;   // bumped (release) after `request` is written
    std::atomic<uint32_t> acc_head;  // accept ring entries taken by the application
    std::atomic<uint32_t> posted;    // kPosted*: store (release) before the doorbell
    // 1 while the slot sits in the work queue. Client: exchange(1) after publishing; push the
    // slot only if it was 0. Engine: store(0) when it pops the slot, then reads the indices.
    std::atomic<uint32_t> doorbell_queued;
    // Client slots only: 0 free to claim. A client claims a kFree slot with CAS 0 -> 1 before
    // kSocket; the engine stores 0 again after it has set state = kFree at the end of a close.
    std::atomic<uint32_t> claim;
    // Member processes that hold the socket (an fd in their table). The client that makes it
    // drop to 0 sends kClose; the engine decrements for each holding member that dies and
    // closes the socket if it made it drop to 0. Zeroed by the engine with the indices.
    std::atomic<uint32_t> holders;
    // Cross-process locks of the family's threads (futex words: 0 free, 1 held, 2 held with
    // sleepers) and the pid of each holder, so a lock held by a process that died can be
    // taken over: rx (recv, accept), tx (send), and control requests.
    std::atomic<uint32_t> rx_lock;
    std::atomic<uint32_t> tx_lock;
    std::atomic<uint32_t> req_lock;
    std::atomic<uint32_t> rx_lock_owner;
    std::atomic<uint32_t> tx_lock_owner;
    std::atomic<uint32_t> req_lock_owner;
    uint32_t client_reserved[2];

    // --- line 1: written by the engine ---
    std::atomic<uint32_t> tx_head;   // bytes the kernel has taken from the tx ring
    std::atomic<uint32_t> rx_tail;   // bytes the engine has landed in the rx ring
    std::atomic<uint32_t> resp_seq;  // = req_seq of the request `response` answers
    std::atomic<uint32_t> acc_tail;  // accept ring entries published by the engine
    std::atomic<uint32_t> state;     // SlotState
    std::atomic<uint32_t> flags;     // kFlag*
    // The socket's pending error (positive errno, 0 none), as SO_ERROR would report it.
    std::atomic<int32_t> so_error;
    // Bumped each time the engine records a new so_error. The client reports an error once per
    // generation (recv/send/SO_ERROR consume it, as sock_error() does on Linux).
    std::atomic<uint32_t> error_gen;
    // Bumped (release) after every change the engine makes to this slot that can change its
    // readiness: data landed, tx space freed, flags, accept ring. EPOLLET edges come from it.
    std::atomic<uint32_t> event_gen;
    // The kernel's poll mask of the engine's socket at the last state change, for the bits that
    // are not about data in our rings: POLLHUP, POLLERR, POLLRDHUP (and POLLOUT when writable).
    std::atomic<uint32_t> kernel_mask;
    uint32_t engine_reserved[6];

    // --- control request/response ---
    Request request;    // client
    Response response;  // engine

    // --- addresses, written by the engine ---
    SockAddrRecord local_addr;
    SockAddrRecord peer_addr;

    // --- accept ring (engine produces, client consumes): indices of engine slots that hold
    // accepted connections, fully initialised before acc_tail is published ---
    uint32_t accept_ring[kAcceptRingEntries];
};
static_assert(sizeof(SocketSlot) % kCacheLine == 0, "slots are whole cache lines");
static_assert(offsetof(SocketSlot, tx_head) == kCacheLine, "engine-written indices on line 1");
static_assert(offsetof(SocketSlot, request) % kCacheLine == 0, "request starts a cache line");
static_assert(sizeof(SocketSlot) == 1088, "slot size is part of the layout (version bump)");

// A sleeping client thread. Each waiter has a pipe: the client holds the read end, the engine
// the write end (registered over the member's control socket; the engine picks the index, resets
// the record and answers with it, and frees it when that member ends). The client arms (state =
// kArmed, slot), re-checks its condition, then blocks reading the pipe; the engine writes one byte
// to every armed waiter whose slot changed (or that waits on any slot). If the engine dies the
// pipe's write end closes and the reader wakes with EOF, so no thread sleeps on a dead engine.
enum class WaiterState : uint32_t { kIdle = 0, kArmed = 1, kSignaled = 2 };
inline constexpr uint32_t kWaitAnySlot = 0xffffffffu;
struct alignas(kCacheLine) Waiter {
    std::atomic<uint32_t>
        state;  // client: Idle->Armed, Armed/Signaled->Idle; engine: Armed->Signaled
    std::atomic<uint32_t> slot;  // client: the slot waited on, or kWaitAnySlot
};
static_assert(sizeof(Waiter) == kCacheLine, "one waiter per cache line: no false sharing");

// A process of the family. The engine reserves a record when a member is about to fork
// (kReserveMember) and makes it live when the child joins on a control connection of its own
// (kJoin); it frees the record when that connection closes, or 10 s after a reservation that
// nobody joined. `held` says which sockets the member holds; the engine reads it once the member
// is gone, to drop that member's hold on each (SocketSlot::holders).
enum class MemberState : uint32_t { kFree = 0, kReserved = 1, kLive = 2 };
struct alignas(kCacheLine) MemberRecord {
    // --- line 0: written by the engine ---
    std::atomic<uint32_t> state;  // MemberState
    std::atomic<int32_t> pid;     // the member's pid once live (0 before)
    uint32_t engine_reserved[14];
    // --- written by the member itself (and, before fork, by its parent for the reservation) ---
    std::atomic<uint64_t> held[kMaxSockets / 64];
};
static_assert(sizeof(MemberRecord) == kCacheLine + kMaxSockets / 8, "member records");

// The client's work queue: a bounded multi-producer (client threads) single-consumer (engine)
// queue of slot indices. Each entry carries a sequence number (Vyukov's bounded queue): entry i
// is free for position p when seq == p, holds position p when seq == p + 1.
struct WorkEntry {
    std::atomic<uint32_t> seq;
    uint32_t slot;
};
static_assert(sizeof(WorkEntry) == 8, "work entries are 8 bytes");

struct alignas(kPageSize) RegionHeader {
    // --- line 0: written by the engine once, before the region is handed over ---
    uint32_t magic;
    uint32_t version;
    uint64_t region_bytes;
    uint32_t max_sockets;
    uint32_t client_slots;
    uint32_t tx_ring_bytes;
    uint32_t rx_ring_bytes;
    uint32_t max_waiters;
    uint32_t session_id;
    uint32_t max_members;
    uint32_t reserved0[3];
    // Proof of membership: a process that can read the region may join the session (kJoin).
    uint64_t family_token;

    // --- line 1: written by the engine ---
    std::atomic<uint32_t> engine_alive;  // 1 while the session is served; 0 = dead, fall back
    // 1 while the worker serving this client sleeps: a client that queues work must then write
    // the worker's doorbell eventfd (received at hello). TAS's rule: notify only an idle peer.
    std::atomic<uint32_t> engine_sleeping;
    uint32_t reserved1[14];

    // --- line 2: written by the client ---
    std::atomic<uint32_t> wq_tail;
    uint32_t reserved2[15];

    // --- line 3: written by the engine ---
    std::atomic<uint32_t> wq_head;
    uint32_t reserved3[15];

    // --- line 4: written by the client ---
    std::atomic<uint32_t> waiters_armed;  // a hint: the engine scans waiters only if non-zero
    uint32_t reserved4[15];
};
static_assert(sizeof(RegionHeader) == kPageSize, "the header is one page");
static_assert(offsetof(RegionHeader, engine_alive) == kCacheLine, "engine line");
static_assert(offsetof(RegionHeader, wq_tail) == 2 * kCacheLine, "client line");
static_assert(offsetof(RegionHeader, wq_head) == 3 * kCacheLine, "engine line");
static_assert(offsetof(RegionHeader, waiters_armed) == 4 * kCacheLine, "client line");

// --- region map: all offsets derive from the constants, never from the region itself ---
constexpr size_t align_up(size_t value, size_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}
inline constexpr size_t kWaitersOffset = sizeof(RegionHeader);
inline constexpr size_t kWorkQueueOffset =
    align_up(kWaitersOffset + kMaxWaiters * sizeof(Waiter), kPageSize);
inline constexpr size_t kMembersOffset =
    align_up(kWorkQueueOffset + kWorkQueueEntries * sizeof(WorkEntry), kPageSize);
inline constexpr size_t kSlotsOffset =
    align_up(kMembersOffset + kMaxMembers * sizeof(MemberRecord), kPageSize);
inline constexpr size_t kRingsOffset =
    align_up(kSlotsOffset + size_t{kMaxSockets} * sizeof(SocketSlot), kPageSize);
inline constexpr size_t kRingPairBytes = size_t{kTxRingBytes} + kRxRingBytes;
inline constexpr size_t kRegionBytes = kRingsOffset + size_t{kMaxSockets} * kRingPairBytes;

constexpr size_t tx_ring_offset(uint32_t slot) {
    return kRingsOffset + slot * kRingPairBytes;
}
constexpr size_t rx_ring_offset(uint32_t slot) {
    return kRingsOffset + slot * kRingPairBytes + kTxRingBytes;
}
static_assert(kRingsOffset % kPageSize == 0, "rings are page aligned (hole punching on free)");
static_assert(kRingPairBytes % kPageSize == 0, "each socket's rings are whole pages");
static_assert(kRegionBytes ==
                  4096 + 65536 + 32768 + 256ull * 576 + 4096ull * 1088 + 4096ull * 131072,
              "region size: header + waiters + work queue + members + slots + rings");

// Typed views over a mapped region (either side).
struct RegionView {
    uint8_t *base = nullptr;

    RegionHeader &header() const { return *reinterpret_cast<RegionHeader *>(base); }
    Waiter &waiter(uint32_t i) const {
        return reinterpret_cast<Waiter *>(base + kWaitersOffset)[i];
    }
    WorkEntry &work_entry(uint32_t i) const {
        return reinterpret_cast<WorkEntry *>(base + kWorkQueueOffset)[i];
    }
    MemberRecord &member(uint32_t i) const {
        return reinterpret_cast<MemberRecord *>(base + kMembersOffset)[i];
    }
    SocketSlot &slot(uint32_t i) const {
        return reinterpret_cast<SocketSlot *>(base + kSlotsOffset)[i];
    }
    uint8_t *tx_ring(uint32_t i) const { return base + tx_ring_offset(i); }
    uint8_t *rx_ring(uint32_t i) const { return base + rx_ring_offset(i); }
};

}  // namespace tcps::ipc
