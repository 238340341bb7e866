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
//  * The region is a fixed control part (header, waiters, members) followed by up to
//    kMaxChunks chunks of kChunkSlots sockets each (their work queue, holds, slots and rings).
//    The memfd has its full size from the start (sparse: untouched pages cost nothing), but each
//    process maps a chunk only once it is used: the engine activates chunks in order as its
//    slots run out (RegionHeader::chunks_active), and a client maps a chunk when it first meets
//    a slot index in it. So a family with few sockets costs what it did with one chunk, and one
//    with 100,000 connections is still one family (no limit below Linux's RLIMIT_NOFILE).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tcps::ipc {

inline constexpr uint32_t kRegionMagic = 0x53504354;  // "TCPS" in little-endian memory
inline constexpr uint32_t kLayoutVersion = 10;

// Hard-coded, not std::hardware_destructive_interference_size: the engine and the shim are built
// separately and must agree on every offset.
inline constexpr size_t kCacheLine = 64;
inline constexpr size_t kPageSize = 4096;

// Sockets: chunks of kChunkSlots, at most kMaxChunks of them per family, so a family may hold
// 2^20 sockets, as many as Linux's default fs.nr_open lets one process have. The engine
// allocates every slot of a local session: for socket() (asked over the member's control
// connection, so the engine knows whose credentials to create it with) and for connections it
// accepts eagerly (S2).
inline constexpr uint32_t kChunkShift = 12;
inline constexpr uint32_t kChunkSlots = 1u << kChunkShift;
inline constexpr uint32_t kChunkMask = kChunkSlots - 1;
inline constexpr uint32_t kMaxChunks = 256;
inline constexpr uint32_t kMaxSockets = kChunkSlots * kMaxChunks;
// A session served through tcps-relay (RegionHeader::client_slots != 0) has one chunk: the
// client claims slots [0, kClientSlots) itself for socket() (Op::kSocket), and the engine
// allocates the rest of chunk 0 for accepted connections.
inline constexpr uint32_t kClientSlots = 1024;

// Per-socket byte rings. Powers of two so a free-running index maps with a mask. Each ring
// starts at kRingBytes in the slot's small rings and grows by doubling, up to kRingMaxBytes, in
// the slot's bulk rings when a stream keeps it full, as Linux grows a socket's buffers for a
// bulk stream (docs/architecture.md, "Rings that grow"). Its producer grows it: the client the
// tx ring (SocketSlot::tx_ring_bytes), the engine the rx ring (SocketSlot::rx_ring_bytes).
// Relay sessions keep kRingBytes (their one chunk is mirrored over the fabric without bulk
// rings).
inline constexpr uint32_t kRingBytes = 64 * 1024;
inline constexpr uint32_t kRingMaxBytes = 2048 * 1024;

// Connections accepted by the engine but not yet taken by the application's accept().
inline constexpr uint32_t kAcceptRingEntries = 64;

// MemNet transfers (send_direct, async_send...) in flight on one socket (DirectDescriptor).
inline constexpr uint32_t kDirectQueueEntries = 8;

// Threads of one family that can sleep at once, each on its own pipe (see Waiter).
inline constexpr uint32_t kMaxWaiters = 1024;

// Processes of one family that can be members of its session at once (see MemberRecord).
inline constexpr uint32_t kMaxMembers = 256;

// Each chunk's work queue: a slot is in it at most once (SocketSlot::doorbell_queued), so
// kChunkSlots entries can never overflow.
inline constexpr uint32_t kWorkQueueEntries = kChunkSlots;

inline constexpr uint32_t kSockAddrMax = 28;  // sizeof(sockaddr_in6)
inline constexpr uint32_t kOptMax = 256;      // TCP_INFO (232 bytes on 6.x) fits

static_assert((kRingBytes & (kRingBytes - 1)) == 0, "ring size must be a power of two");
static_assert((kRingMaxBytes & (kRingMaxBytes - 1)) == 0, "ring size must be a power of two");
static_assert(kRingMaxBytes > kRingBytes && kRingMaxBytes <= (1u << 30), "rings grow");
static_assert((kAcceptRingEntries & (kAcceptRingEntries - 1)) == 0, "accept ring: power of two");
static_assert((kDirectQueueEntries & (kDirectQueueEntries - 1)) == 0, "direct queue: power of two");
static_assert((kWorkQueueEntries & (kWorkQueueEntries - 1)) == 0, "work queue: power of two");
static_assert(kClientSlots < kChunkSlots, "a relay session's engine needs slots for accepts");
static_assert(kMaxSockets <= (1u << 20), "slot numbers travel in 20 bits (user_data, FdRef)");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "atomics must work across processes");
static_assert(std::atomic<int32_t>::is_always_lock_free, "atomics must work across processes");

// ---------------------------------------------------------------------------------------------
// Control operations a client asks of the engine for one socket (SocketSlot::request).
// Data never goes through requests: it moves through the rings.
enum class Op : uint32_t {
    kNone = 0,
    // Sessions through tcps-relay only (a local client asks with ControlType::kNewSocket).
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
    // recv(MSG_OOB): arg0 = the caller's MSG_PEEK|MSG_TRUNC bits, arg1 = 1 if it has room for
    // the byte. Result: what the kernel's recv(MSG_OOB) says (1 with the byte in
    // response.opt[0], or 0 with room for none, or -EINVAL/-EAGAIN/-ENOTCONN).
    kRecvOob = 11,
    // A read at the urgent mark the engine stopped at (kFlagUrgentStop): go on past it, as a
    // recv() there does on Linux (past the urgent byte, which is then gone). Answered once the
    // engine has taken what the kernel socket has past the mark. Result 0.
    kPastMark = 12,
    // A recv() that finds the rx ring empty while the engine receives for MemNet only
    // (kFlagRxDirect): the engine fills the ring again, from now on, and takes what its kernel
    // socket holds before it answers, so the caller finds those bytes in the ring. Result 0.
    kLeaveDirect = 13,
    // fstat()/statx() of an offloaded socket, which is the engine's kernel socket: arg0 = the
    // caller's statx mask, arg1 = its AT_STATX_SYNC_TYPE bits. Result 0 with response.opt the
    // kernel's struct statx of that socket (opt_len its size), or -errno.
    kStat = 14,
};
inline constexpr uint32_t kOpCount = 15;

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
// Urgent data, once the client said it wants it (kPostedUrgentWatch): the engine then takes
// the socket's bytes itself, looking for the urgent mark before each read, and stops there, as
// a Linux recv() stops there, since the kernel forgets the urgent byte once its socket is read
// past it. SocketSlot::urgent_mark is the rx ring position of that mark (the urgent byte is
// the next one, with SO_OOBINLINE; the one after it, without). While rx_head is there,
// SIOCATMARK is true; with nothing left in the ring, a recv() asks the engine to go on
// (Op::kPastMark), and readability is the kernel socket's (kernel_mask's POLLIN).
inline constexpr uint32_t kFlagUrgentMark = 1u << 10;
inline constexpr uint32_t kFlagUrgentStop = 1u << 11;
// The application receives this socket's bytes into registered memory (MemNet's direct
// receives): the engine does not fill the rx ring between them, so what arrives waits in its
// kernel socket for the next one instead of being copied twice. kernel_mask's POLLIN says
// that bytes wait there (readable); a recv() that finds the ring empty asks for the ring back
// (Op::kLeaveDirect).
inline constexpr uint32_t kFlagRxDirect = 1u << 12;
// An accepted connection the engine gives to the application's kernel (seed 003's handoff: it
// was saturated when it accepted it). It has received nothing: accept() takes its kernel socket
// (ControlType::kHandoff) and the application serves it natively from then on. A client that
// rings for it instead (a failed hand-off) makes the engine serve it as any other.
inline constexpr uint32_t kFlagKernelServed = 1u << 13;
// The engine, saturated, asks for this connection back (seed 003's handoff of live
// connections): the client may hand it to its kernel (kHandoff with kHandoffShed) at a moment
// when both rings are empty. The engine keeps serving it meanwhile, and withdraws the flag once
// it has room again.
inline constexpr uint32_t kFlagShed = 1u << 14;
// A listener's twin has connections waiting (seed 003's handoff at accept without a round
// trip, `tcpsd --handoff-load`): the twin is a kernel listener of the application's own on the
// same address, in one SO_REUSEPORT group with the engine's, to which the engine sends new
// connections while it is saturated. accept() takes them from it with the kernel's accept4()
// (the descriptor comes once per process with ControlType::kHandoff and kHandoffTwin). The
// engine sets the flag when the twin becomes readable, with SocketSlot::twin_ready_at; a
// client that finds the twin empty moves twin_drained past twin_ready_at (once per setting:
// a CAS) and rings, and the engine clears the flag and watches again. While twin_drained is
// past it the flag is stale: clients take it as clear.
inline constexpr uint32_t kFlagTwinReady = 1u << 15;
// A listener served on demand (ControlType::kAdoptSocket with kAdoptOnDemand): its "twin" is the
// listener itself, which other processes may accept from too; kFlagTwinReady says it has
// connections waiting, and what accept() takes from it is the kernel's, offloaded at its first
// use (no saturated engine to wait for).
inline constexpr uint32_t kFlagAcceptOnDemand = 1u << 16;

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
//  * The application showed interest in urgent data (POLLPRI, exceptfds, recv(MSG_OOB),
//    SIOCATMARK, SO_OOBINLINE): the engine watches the socket for it from then on (POLLPRI
//    in kernel_mask, urgent_mark).
inline constexpr uint32_t kPostedUrgentWatch = 1u << 6;
inline constexpr uint32_t kPostedMask = 0x7f;

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

// MemNet (preload/tcps_memnet.h): one transfer straight from or into memory the family
// registered with the engine (ControlType::kRegisterMem), written by the client (untrusted).
// The engine takes a socket's descriptors in order: a send goes after the tx ring's bytes up
// to tx_at (the tx_tail when it was queued) and before the rest; a receive first lets the
// client read what the rx ring holds (result kDirectUseRxRing); one posted ahead
// (kDirectHintAhead) also stops the engine filling the ring (kFlagRxDirect).
enum class DirectOp : uint32_t { kSend = 1, kRecv = 2 };
struct DirectDescriptor {
    uint32_t op;      // DirectOp
    uint32_t mem;     // the registration's id
    uint32_t len;     // 1 .. kDirectMaxLen
    uint32_t tx_at;   // kSend: the tx ring position it goes after
    uint64_t offset;  // in the registration
    uint32_t flags;   // MSG_DONTWAIT or 0
    uint32_t hints;   // kDirectHint*
};
static_assert(sizeof(DirectDescriptor) == 32, "direct descriptor size is part of the layout");
inline constexpr uint32_t kDirectMaxLen = 1u << 30;
// A receive posted ahead of the data (memnet_async_recv) of at least kDirectModeMinLen bytes:
// the application keeps large receives posted on this socket, so the engine stops filling the
// rx ring for it (kFlagRxDirect). Smaller ones, and one that waits for its answer
// (memnet_recv_direct), read what the ring has: for them the ring's batching costs less than
// a transfer per call (docs/performance.md, Experiment 1b).
inline constexpr uint32_t kDirectHintAhead = 1u << 0;
inline constexpr uint32_t kDirectModeMinLen = 16 * 1024;
// A direct receive's result that is no count: kDirectUseRxRing + n (1 <= n <= kRingMaxBytes),
// take the n bytes the engine promised this receive from the rx ring, which come next after
// those it promised the socket's receives queued before it (the client takes them in queue
// order, whichever job is waited for first); kDirectUseRxRing alone, the socket's bytes cannot
// go straight to the caller now (urgent data watched, EOF, ...): read the ring as recv() does.
inline constexpr int32_t kDirectUseRxRing = INT32_MIN;
// n if `result` is kDirectUseRxRing + n, 0 for kDirectUseRxRing; `ring` says whether it is
// either.
constexpr uint32_t direct_ring_promise(int32_t result, bool &ring) {
    const uint32_t n = static_cast<uint32_t>(result) - static_cast<uint32_t>(kDirectUseRxRing);
    ring = n <= kRingMaxBytes;
    return ring ? n : 0;
}

// A ring's size from its stored value (SocketSlot::tx_ring_bytes, rx_ring_bytes): 0 is kRingBytes.
constexpr uint32_t ring_bytes(uint32_t stored) {
    return stored == 0 ? kRingBytes : stored;
}
// Whether a stored size is one a ring may have, up to `max` (kRingMaxBytes, or kRingBytes where
// rings do not grow).
constexpr bool ring_bytes_valid(uint32_t stored, uint32_t max) {
    return stored == 0 || (stored > kRingBytes && stored <= max && (stored & (stored - 1)) == 0);
}

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
    // Relay sessions' client slots only: 0 free to claim. A client claims a kFree slot with CAS
    // 0 -> 1 before kSocket; the engine stores 0 again after it has set state = kFree at the end
    // of a close.
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
    // send(MSG_OOB): the tx ring position just past the urgent byte (the last byte of that
    // send). The engine sends the bytes up to it with MSG_OOB, so that byte is the urgent
    // pointer's. Free-running, 0 none; stored (release) before the tx_tail that queues that
    // byte, and read after tx_tail.
    std::atomic<uint32_t> urgent_tail;
    // MemNet descriptors queued in direct_queue (free-running); store (release) after the
    // descriptor, before the doorbell. At most kDirectQueueEntries ahead of direct_done.
    std::atomic<uint32_t> direct_tail;

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
    // A listener's: why the engine cannot accept the connections waiting in its kernel queue
    // (positive errno: EMFILE, the family has all its slots; ENFILE or ENOBUFS, the owner's
    // uid has used its share of the engine), 0 when it can. accept() reports it, as Linux's
    // accept() reports EMFILE while connections wait, instead of waiting for ever.
    std::atomic<int32_t> accept_error;
    std::atomic<uint32_t> urgent_mark;  // see kFlagUrgentMark
    // MemNet descriptors done (free-running): direct_results holds their results (bytes, or
    // -errno, or kDirectUseRxRing); stored (release) after the result.
    std::atomic<uint32_t> direct_done;
    // The rx ring's size, 0 for kRingBytes (ring_bytes()). The engine doubles it when a stream
    // keeps the ring full, storing it before any rx_tail past the bytes it holds; the client
    // loads it after rx_tail (acquire) and reads the ring with it.
    std::atomic<uint32_t> rx_ring_bytes;
    // A listener's: twin_drained as it was when the engine last set kFlagTwinReady. A client
    // that finds the twin empty reports it once (twin_drained from this value to the next).
    std::atomic<uint32_t> twin_ready_at;
    uint32_t engine_reserved[1];

    // --- control request/response ---
    Request request;    // client
    Response response;  // engine

    // --- addresses, written by the engine ---
    SockAddrRecord local_addr;
    SockAddrRecord peer_addr;

    // --- accept ring (engine produces, client consumes): indices of engine slots that hold
    // accepted connections, fully initialised before acc_tail is published ---
    uint32_t accept_ring[kAcceptRingEntries];

    // --- MemNet's queue: descriptors (client), and their results (engine) ---
    DirectDescriptor direct_queue[kDirectQueueEntries];
    int32_t direct_results[kDirectQueueEntries];

    // --- written by the client (untrusted): the tx ring's size, under the tx lock ---
    // 0 for kRingBytes (ring_bytes()). The client doubles it when a send finds the ring full,
    // storing it before any tx_tail past the bytes the ring holds; the engine loads it after
    // tx_tail (acquire) and sends from the ring with it.
    alignas(kCacheLine) std::atomic<uint32_t> tx_ring_bytes;
    // The last doubling inside the bulk rings: the size before it and tx_tail then. Until the
    // engine's tx_head passes tx_grown_at the client queues at most tx_ring_before bytes
    // (ring_room()), so it never writes where the engine may still send older bytes from.
    std::atomic<uint32_t> tx_ring_before;
    std::atomic<uint32_t> tx_grown_at;
    // tx_head at the last doubling: the client grows the ring only for a stream the engine has
    // sent a whole ring of since then (one whose peer reads).
    std::atomic<uint32_t> tx_head_at_growth;
    // A listener's: bumped by a client whose accept4() on the twin found it empty
    // (kFlagTwinReady). Any change makes the engine look at the twin again.
    std::atomic<uint32_t> twin_drained;
    uint32_t client_reserved[11];
};
static_assert(sizeof(SocketSlot) % kCacheLine == 0, "slots are whole cache lines");
static_assert(offsetof(SocketSlot, tx_head) == kCacheLine, "engine-written indices on line 1");
static_assert(offsetof(SocketSlot, request) % kCacheLine == 0, "request starts a cache line");
static_assert(offsetof(SocketSlot, tx_ring_bytes) % kCacheLine == 0, "client line of its own");
static_assert(sizeof(SocketSlot) == 1408, "slot size is part of the layout (version bump)");

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
// nobody joined. Each chunk holds, per member, a bitmap of the sockets of that chunk the member
// holds (RegionView::held_word); the engine reads it once the member is gone, to drop that
// member's hold on each (SocketSlot::holders).
enum class MemberState : uint32_t { kFree = 0, kReserved = 1, kLive = 2 };
struct alignas(kCacheLine) MemberRecord {
    // --- written by the engine ---
    std::atomic<uint32_t> state;  // MemberState
    std::atomic<int32_t> pid;     // the member's pid once live (0 before)
    uint32_t engine_reserved[14];
};
static_assert(sizeof(MemberRecord) == kCacheLine, "member records are one cache line");
// Written by the member itself (and, before fork, by its parent for the reservation).
inline constexpr size_t kHeldBytesPerMember = kChunkSlots / 8;

// A chunk's work queue: a bounded multi-producer (client threads) single-consumer (engine)
// queue of the chunk's slot indices. Each entry carries a sequence number (Vyukov's bounded
// queue): entry i is free for position p when seq == p, holds position p when seq == p + 1.
struct WorkEntry {
    std::atomic<uint32_t> seq;
    uint32_t slot;
};
static_assert(sizeof(WorkEntry) == 8, "work entries are 8 bytes");

// The first page of a chunk: its work queue's indices.
struct alignas(kPageSize) ChunkHeader {
    // --- line 0: written by the client ---
    std::atomic<uint32_t> wq_tail;
    uint32_t reserved0[15];
    // --- line 1: written by the engine ---
    std::atomic<uint32_t> wq_head;
    // 1 while the worker serving this chunk sleeps: a client that queues one of its slots must
    // then write the family's doorbell eventfd (received at hello), which wakes that worker
    // (through the family's home, when the chunk is another worker's). TAS's rule: notify
    // only an idle peer; per chunk, since the workers of one family sleep on their own.
    std::atomic<uint32_t> engine_sleeping;
    uint32_t reserved1[14];
};
static_assert(sizeof(ChunkHeader) == kPageSize, "a chunk's header is one page");
static_assert(offsetof(ChunkHeader, wq_head) == kCacheLine, "engine line");

struct alignas(kPageSize) RegionHeader {
    // --- line 0: written by the engine once, before the region is handed over ---
    uint32_t magic;
    uint32_t version;
    uint64_t region_bytes;
    uint32_t max_sockets;
    uint32_t client_slots;
    uint32_t tx_ring_bytes;  // kRingBytes: each ring's first size
    uint32_t rx_ring_bytes;
    uint32_t max_waiters;
    uint32_t session_id;
    uint32_t max_members;
    uint32_t max_chunks;
    uint32_t chunk_slots;
    uint32_t ring_max_bytes;  // kRingMaxBytes, or kRingBytes for a relay session
    // Proof of membership: a process that can read the region may join the session (kJoin).
    uint64_t family_token;

    // --- line 1: written by the engine ---
    std::atomic<uint32_t> engine_alive;  // 1 while the session is served; 0 = dead, fall back
    // Chunks [0, chunks_active) are in use: the engine has initialised them and polls their
    // work queues. Only grows; published (release) before any slot index in a new chunk.
    std::atomic<uint32_t> chunks_active;
    uint32_t reserved1[14];

    // --- line 2: written by the client ---
    std::atomic<uint32_t> waiters_armed;  // a hint: the engine scans waiters only if non-zero
    // Non-zero once a member could not map a chunk's bulk rings (its address space is limited,
    // RLIMIT_AS): the engine grows no rx ring of this family from then on, since that member
    // could not read it. Each member maps them as it maps the chunk, so before it reads there.
    std::atomic<uint32_t> bulk_refused;
    uint32_t reserved2[14];
};
static_assert(sizeof(RegionHeader) == kPageSize, "the header is one page");
static_assert(offsetof(RegionHeader, engine_alive) == kCacheLine, "engine line");
static_assert(offsetof(RegionHeader, waiters_armed) == 2 * kCacheLine, "client line");
static_assert(offsetof(RegionHeader, bulk_refused) == 2 * kCacheLine + 4, "client line");

// --- region map: all offsets derive from the constants, never from the region itself ---
constexpr size_t align_up(size_t value, size_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}
// The control part.
inline constexpr size_t kWaitersOffset = sizeof(RegionHeader);
inline constexpr size_t kMembersOffset =
    align_up(kWaitersOffset + kMaxWaiters * sizeof(Waiter), kPageSize);
inline constexpr size_t kChunksOffset =
    align_up(kMembersOffset + kMaxMembers * sizeof(MemberRecord), kPageSize);
// Inside a chunk.
inline constexpr size_t kChunkQueueOffset = sizeof(ChunkHeader);
inline constexpr size_t kChunkHeldOffset =
    align_up(kChunkQueueOffset + kWorkQueueEntries * sizeof(WorkEntry), kPageSize);
inline constexpr size_t kChunkSlotsOffset =
    align_up(kChunkHeldOffset + kMaxMembers * kHeldBytesPerMember, kPageSize);
inline constexpr size_t kChunkRingsOffset =
    align_up(kChunkSlotsOffset + size_t{kChunkSlots} * sizeof(SocketSlot), kPageSize);
// Each slot's small rings (tx then rx, kRingBytes each), then each slot's bulk rings (tx then
// rx, kRingMaxBytes each), which a ring moves to when it first grows. A chunk is mapped in two
// pieces: up to its bulk rings when it is first used, its bulk rings (16 GiB of address space)
// only when one of its rings first grows, so a family whose rings never grow costs no more
// address space than before them. Only the pages a grown ring has used hold memory.
inline constexpr size_t kRingPairBytes = size_t{2} * kRingBytes;
inline constexpr size_t kBulkPairBytes = size_t{2} * kRingMaxBytes;
inline constexpr size_t kChunkBulkOffset = kChunkRingsOffset + size_t{kChunkSlots} * kRingPairBytes;
inline constexpr size_t kChunkBulkBytes = size_t{kChunkSlots} * kBulkPairBytes;
inline constexpr size_t kChunkBytes = kChunkBulkOffset + kChunkBulkBytes;
// The whole memfd, and the part a relay session uses (its one chunk without the bulk rings,
// mapped contiguously).
inline constexpr size_t kRegionBytes = kChunksOffset + size_t{kMaxChunks} * kChunkBytes;
inline constexpr size_t kRemoteRegionBytes = kChunksOffset + kChunkBulkOffset;

// File offsets (from the start of the region).
constexpr size_t chunk_offset(uint32_t chunk) {
    return kChunksOffset + size_t{chunk} * kChunkBytes;
}
constexpr size_t slot_offset(uint32_t slot) {
    return chunk_offset(slot >> kChunkShift) + kChunkSlotsOffset +
           size_t{slot & kChunkMask} * sizeof(SocketSlot);
}
constexpr size_t tx_ring_offset(uint32_t slot) {
    return chunk_offset(slot >> kChunkShift) + kChunkRingsOffset +
           size_t{slot & kChunkMask} * kRingPairBytes;
}
constexpr size_t rx_ring_offset(uint32_t slot) {
    return tx_ring_offset(slot) + kRingBytes;
}
constexpr size_t bulk_rings_offset(uint32_t slot) {
    return chunk_offset(slot >> kChunkShift) + kChunkBulkOffset +
           size_t{slot & kChunkMask} * kBulkPairBytes;
}
// Member `member`'s bitmap of the sockets it holds in chunk `chunk`.
constexpr size_t held_offset(uint32_t member, uint32_t chunk) {
    return chunk_offset(chunk) + kChunkHeldOffset + size_t{member} * kHeldBytesPerMember;
}
static_assert(kChunksOffset % kPageSize == 0 && kChunkBytes % kPageSize == 0,
              "chunks are whole pages (each is mapped on its own)");
static_assert(kChunkRingsOffset % kPageSize == 0, "rings are page aligned (hole punching)");
static_assert(kRingPairBytes % kPageSize == 0 && kBulkPairBytes % kPageSize == 0,
              "each socket's rings are whole pages");
static_assert(kChunksOffset == 4096 + 65536 + 256 * 64, "control part: header, waiters, members");
static_assert(kChunkBulkOffset == 4096 + 32768 + 256ull * 512 + 4096ull * 1408 + 4096ull * 131072,
              "chunk: queue header + queue + holds + slots + small rings");
static_assert(kChunkBytes == kChunkBulkOffset + 4096ull * 2 * kRingMaxBytes, "then bulk rings");

// Typed views over a mapped region (either side). `base` maps the control part; each chunk is
// mapped on its own, [0, kChunkBulkOffset) of it, and its bulk rings on their own once needed
// (or all contiguously after the control part: map_contiguous). A chunk pointer is set once,
// before any slot index of that chunk is handed to another thread; a bulk pointer before any
// ring size that needs it is used.
struct RegionView {
    uint8_t *base = nullptr;
    std::atomic<uint8_t *> chunks[kMaxChunks] = {};
    std::atomic<uint8_t *> bulks[kMaxChunks] = {};

    RegionView() = default;
    // Control part and chunks [0, n) mapped contiguously from `region`.
    RegionView(uint8_t *region, uint32_t n) { map_contiguous(region, n); }
    RegionView(const RegionView &other) { *this = other; }
    RegionView &operator=(const RegionView &other) {
        base = other.base;
        for (uint32_t k = 0; k < kMaxChunks; ++k) {
            chunks[k].store(other.chunk(k), std::memory_order_relaxed);
            bulks[k].store(other.bulk(k), std::memory_order_relaxed);
        }
        return *this;
    }

    // A mapping of [0, kChunksOffset + n * kChunkBytes): the control part and chunks [0, n),
    // with their bulk rings if `with_bulk` (else the last chunk may end at its bulk rings: a
    // relay session's kRemoteRegionBytes).
    void map_contiguous(uint8_t *region, uint32_t n, bool with_bulk = false) {
        base = region;
        for (uint32_t k = 0; k < kMaxChunks; ++k) {
            chunks[k].store(k < n ? region + chunk_offset(k) : nullptr, std::memory_order_relaxed);
            bulks[k].store(
                k < n && with_bulk ? region + chunk_offset(k) + kChunkBulkOffset : nullptr,
                std::memory_order_relaxed);
        }
    }
    uint8_t *chunk(uint32_t k) const { return chunks[k].load(std::memory_order_relaxed); }
    uint8_t *bulk(uint32_t k) const { return bulks[k].load(std::memory_order_acquire); }
    bool mapped(uint32_t slot) const {
        return slot < kMaxSockets && chunk(slot >> kChunkShift) != nullptr;
    }

    RegionHeader &header() const { return *reinterpret_cast<RegionHeader *>(base); }
    Waiter &waiter(uint32_t i) const {
        return reinterpret_cast<Waiter *>(base + kWaitersOffset)[i];
    }
    MemberRecord &member(uint32_t i) const {
        return reinterpret_cast<MemberRecord *>(base + kMembersOffset)[i];
    }
    ChunkHeader &chunk_header(uint32_t k) const {
        return *reinterpret_cast<ChunkHeader *>(chunk(k));
    }
    WorkEntry &work_entry(uint32_t k, uint32_t i) const {
        return reinterpret_cast<WorkEntry *>(chunk(k) + kChunkQueueOffset)[i];
    }
    // The word of member `member`'s holds that has `slot`'s bit (bit slot % 64).
    std::atomic<uint64_t> &held_word(uint32_t member, uint32_t slot) const {
        return reinterpret_cast<std::atomic<uint64_t> *>(
            chunk(slot >> kChunkShift) + kChunkHeldOffset +
            size_t{member} * kHeldBytesPerMember)[(slot & kChunkMask) / 64];
    }
    SocketSlot &slot(uint32_t i) const {
        return reinterpret_cast<SocketSlot *>(chunk(i >> kChunkShift) +
                                              kChunkSlotsOffset)[i & kChunkMask];
    }
    // Slot i's rings at size `bytes` (ring_bytes()): the small ones, or the bulk ones once grown.
    // The bulk rings must be mapped (bulk()) for a size above kRingBytes.
    uint8_t *tx_ring(uint32_t i, uint32_t bytes) const {
        return bytes > kRingBytes ? bulk(i >> kChunkShift) + size_t{i & kChunkMask} * kBulkPairBytes
                                  : chunk(i >> kChunkShift) + kChunkRingsOffset +
                                        size_t{i & kChunkMask} * kRingPairBytes;
    }
    uint8_t *rx_ring(uint32_t i, uint32_t bytes) const {
        return tx_ring(i, bytes) + (bytes > kRingBytes ? kRingMaxBytes : kRingBytes);
    }
};

}  // namespace tcps::ipc
