#include "session.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "control.hpp"
#include "libc.hpp"
#include "ops.hpp"
#include "ring.hpp"

namespace tcps::shim {

FdTable g_fds;
uint64_t g_spin_ns = 20'000;

void close_internal(std::atomic<int> &holder) {
    const int fd = holder.exchange(-1);
    if (fd < 0) return;
    g_fds.take_if(fd, FdRef::internal());
    real(libc.close)(fd);
}

namespace {

enum SessionState : int { kNone = 0, kActive = 1, kUnavailable = 2, kDead = 3 };

constexpr uint64_t kRetryNs = 1'000'000'000;           // engine retry: at most once a second
constexpr uint64_t kControlTimeoutNs = 2'000'000'000;  // hello and waiter replies
constexpr size_t kMaxFdTable = size_t{1} << 20;

// Client-private state of each socket, one array per mapped chunk (allocated with the
// chunk's mapping, so a family with few sockets pays for one).
std::atomic<Socket *> g_socket_chunks[ipc::kMaxChunks];
// Maps chunks; the hot path only reads the pointers (set once, before any slot of the chunk
// is handed to another thread: through the fd table or the accept ring's lock).
pthread_mutex_t g_chunk_mutex = PTHREAD_MUTEX_INITIALIZER;

TCPS_TLS uint64_t tl_spin_ns = UINT64_MAX;  // UINT64_MAX: not learnt yet, g_spin_ns

std::atomic<int> g_init_state{0};  // 0 not yet, 1 ready, -1 inert
bool g_debug = false;
bool g_debug_said = false;

std::atomic<int> g_state{kNone};
ipc::RegionView g_region;
uint32_t g_session_id = 0;
std::atomic<int> g_control_fd{-1};
std::atomic<int> g_doorbell_fd{-1};
std::atomic<int> g_memfd{-1};   // the region's memfd, kept for an exec to hand on
uint64_t g_retry_after_ns = 0;  // under g_setup_mutex
// Bumped when the session is replaced (fork): thread-local waiters of an older one are void.
std::atomic<uint32_t> g_epoch{1};
pthread_mutex_t g_setup_mutex = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t g_control_mutex = PTHREAD_MUTEX_INITIALIZER;
// Holds and releases of sockets, and fork's copy of them to the child, one at a time.
pthread_mutex_t g_hold_mutex = PTHREAD_MUTEX_INITIALIZER;

uint32_t g_member = 0;       // our member index in the session (0: the process that said hello)
int g_fork_member = -1;      // reserved for the child of the fork in progress
bool g_fork_locked = false;  // before_fork() holds g_hold_mutex

std::atomic<uint32_t> g_slot_hint{0};

// Waiters this process registered (the read end of each one's pipe, -1 if not ours), and
// which of those a thread is using now. A thread that exits leaves its waiter to the next.
std::atomic<uint64_t> g_waiter_bits[ipc::kMaxWaiters / 64];
std::atomic<int> g_waiter_fds[ipc::kMaxWaiters];
// Each waiter's epoll instances, made the first time a wait needs them (-1: none yet): one
// that holds its pipe alone, for waits that every interruption ends (Interrupt::kAlways), and
// one that also holds an application epoll (for epoll_wait), with the registry it was made for.
std::atomic<int> g_waiter_eps[ipc::kMaxWaiters];
std::atomic<int> g_waiter_nest_eps[ipc::kMaxWaiters];
uint64_t g_waiter_nest_keys[ipc::kMaxWaiters];
pthread_key_t g_waiter_key;

// This thread holds, or is about to take, g_setup_mutex / g_hold_mutex: set before the lock
// and cleared after the unlock, so that a signal handler that interrupts the thread anywhere
// in between sees it (see shim_locked_here()).
TCPS_TLS bool tl_in_setup = false;
TCPS_TLS bool tl_in_holds = false;

void lock_holds() {
    tl_in_holds = true;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    pthread_mutex_lock(&g_hold_mutex);
}

void unlock_holds() {
    pthread_mutex_unlock(&g_hold_mutex);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    tl_in_holds = false;
}

// The same for g_control_mutex (control requests: kNewSocket, waiters, forks) and
// g_chunk_mutex (mapping a chunk).
TCPS_TLS bool tl_in_control = false;
TCPS_TLS bool tl_in_chunks = false;

void lock_flagged(pthread_mutex_t &mutex, bool &flag) {
    flag = true;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    pthread_mutex_lock(&mutex);
}

void unlock_flagged(pthread_mutex_t &mutex, bool &flag) {
    pthread_mutex_unlock(&mutex);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    flag = false;
}

TCPS_TLS int tl_waiter = -1;
TCPS_TLS uint32_t tl_waiter_epoch = 0;
TCPS_TLS bool tl_armed = false;
TCPS_TLS bool tl_byte_taken = false;
TCPS_TLS bool tl_acquiring = false;

void debug_line(const char *text) {
    if (!g_debug || g_debug_said) return;
    g_debug_said = true;
    ssize_t ignored = real(libc.write)(2, text, std::strlen(text));
    (void)ignored;
}

int high_fd_base() {
    rlimit limit{};
    int base = 512;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
        limit.rlim_cur > 64 + 512)
        base = static_cast<int>(limit.rlim_cur - 64);
    return base;
}

int dup_high(int fd) {
    int moved = real(libc.fcntl)(fd, F_DUPFD_CLOEXEC, high_fd_base());
    if (moved < 0) moved = real(libc.fcntl)(fd, F_DUPFD_CLOEXEC, 0);
    return moved;
}

// Every waiter's pipe and epoll instances.
void close_waiters() {
    for (auto *holders : {g_waiter_fds, g_waiter_eps, g_waiter_nest_eps})
        for (uint32_t i = 0; i < ipc::kMaxWaiters; ++i) close_internal(holders[i]);
}

// Waits for one control message, for at most the control timeout.
int recv_control_timed(int fd, ipc::ControlMessage &msg, int *fds, int max_fds) {
    const uint64_t deadline = now_ns() + kControlTimeoutNs;
    for (;;) {
        const int rc = ipc::recv_control(fd, msg, fds, max_fds, MSG_DONTWAIT);
        if (rc != -EAGAIN && rc != -EWOULDBLOCK) return rc;
        const uint64_t now = now_ns();
        if (now >= deadline) return -ETIMEDOUT;
        const uint64_t left = deadline - now;
        timespec ts{static_cast<time_t>(left / 1'000'000'000),
                    static_cast<long>(left % 1'000'000'000)};
        pollfd p{fd, POLLIN, 0};
        const int n = real(libc.ppoll)(&p, 1, &ts, nullptr);
        if (n < 0 && errno != EINTR) return -errno;
    }
}

bool header_matches(const ipc::RegionHeader &h) {
    return h.magic == ipc::kRegionMagic && h.version == ipc::kLayoutVersion &&
           h.region_bytes == ipc::kRegionBytes && h.chunk_slots == ipc::kChunkSlots &&
           h.max_chunks >= 1 && h.max_chunks <= ipc::kMaxChunks &&
           (h.client_slots == 0 || h.client_slots == ipc::kClientSlots) &&
           h.tx_ring_bytes == ipc::kRingBytes && h.rx_ring_bytes == ipc::kRingBytes &&
           (h.ring_max_bytes == ipc::kRingBytes || h.ring_max_bytes == ipc::kRingMaxBytes) &&
           h.max_waiters == ipc::kMaxWaiters && h.engine_alive.load(std::memory_order_acquire) == 1;
}

// A new connection to the engine's control socket: the fd, or -errno.
int dial_engine(const char *&why) {
    const std::string path = ipc::engine_socket_path();
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof(addr.sun_path)) {
        why = "socket path too long";
        return -ENAMETOOLONG;
    }
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    const int sock = real(libc.socket)(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0) {
        why = "socket(AF_UNIX)";
        return -errno;
    }
    if (real(libc.connect)(sock, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0) {
        const int error = errno;
        real(libc.close)(sock);
        why = "connect";
        return -error;
    }
    // Whoever answers there would see and could change all our traffic: only root's engine or
    // our own uid's, in a place nobody else controls.
    static char identity_why[256];
    if (const int rc =
            ipc::check_engine_identity(sock, path.c_str(), identity_why, sizeof(identity_why));
        rc != 0) {
        real(libc.close)(sock);
        why = identity_why;
        return rc;
    }
    return sock;
}

// Maps chunk `k`'s bulk rings (16 GiB of address space). Under g_chunk_mutex.
bool map_bulk_locked(uint32_t k, int memfd) {
    if (g_region.bulk(k)) return true;
    if (g_region.header().ring_max_bytes <= ipc::kRingBytes) return false;  // a relay's: none
    void *bulk = mmap(nullptr, ipc::kChunkBulkBytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd,
                      static_cast<off_t>(ipc::chunk_offset(k) + ipc::kChunkBulkOffset));
    if (bulk == MAP_FAILED) return false;
    g_region.bulks[k].store(static_cast<uint8_t *>(bulk), std::memory_order_release);
    return true;
}

// Maps chunk `k` of the region (memfd `memfd`) and its sockets' client state, whose locks
// are words in the region shared with the whole family. Under g_chunk_mutex.
bool map_chunk_locked(uint32_t k, int memfd) {
    if (g_region.chunk(k)) return true;
    void *chunk = mmap(nullptr, ipc::kChunkBulkOffset, PROT_READ | PROT_WRITE, MAP_SHARED, memfd,
                       static_cast<off_t>(ipc::chunk_offset(k)));
    if (chunk == MAP_FAILED) return false;
    // The bulk rings now, before any of the chunk's slots is used: a process whose address
    // space cannot hold them says so, and the engine then grows none of the family's rx rings
    // (it could not read them; Linux's recv() never fails for want of address space).
    if (g_region.base && g_region.header().ring_max_bytes > ipc::kRingBytes &&
        !map_bulk_locked(k, memfd))
        g_region.header().bulk_refused.store(1, std::memory_order_relaxed);
    Socket *states = g_socket_chunks[k].load(std::memory_order_relaxed);
    if (!states) {
        void *memory = mmap(nullptr, sizeof(Socket) * ipc::kChunkSlots, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) {
            munmap(chunk, ipc::kChunkBulkOffset);
            return false;
        }
        states = static_cast<Socket *>(memory);
        for (uint32_t j = 0; j < ipc::kChunkSlots; ++j) new (&states[j]) Socket();
    }
    const auto *slots =
        reinterpret_cast<ipc::SocketSlot *>(static_cast<uint8_t *>(chunk) + ipc::kChunkSlotsOffset);
    for (uint32_t j = 0; j < ipc::kChunkSlots; ++j) {
        auto &slot = const_cast<ipc::SocketSlot &>(slots[j]);
        states[j].rx_lock.bind(&slot.rx_lock, &slot.rx_lock_owner);
        states[j].tx_lock.bind(&slot.tx_lock, &slot.tx_lock_owner);
        states[j].request_lock.bind(&slot.req_lock, &slot.req_lock_owner);
    }
    g_socket_chunks[k].store(states, std::memory_order_release);
    g_region.chunks[k].store(static_cast<uint8_t *>(chunk), std::memory_order_release);
    return true;
}

bool map_chunk(uint32_t k) {
    lock_flagged(g_chunk_mutex, tl_in_chunks);
    const bool ok = map_chunk_locked(k, g_memfd.load());
    unlock_flagged(g_chunk_mutex, tl_in_chunks);
    return ok;
}

// Unmaps the control part and every chunk (the sockets' client state stays, for reuse).
void unmap_region() {
    for (uint32_t k = 0; k < ipc::kMaxChunks; ++k) {
        if (uint8_t *chunk = g_region.chunk(k)) munmap(chunk, ipc::kChunkBulkOffset);
        if (uint8_t *bulk = g_region.bulk(k)) munmap(bulk, ipc::kChunkBulkBytes);
        g_region.chunks[k].store(nullptr, std::memory_order_relaxed);
        g_region.bulks[k].store(nullptr, std::memory_order_relaxed);
    }
    if (g_region.base) munmap(g_region.base, ipc::kChunksOffset);
    g_region.base = nullptr;
}

// Connects to the engine and maps this process's region. 0 or -errno; `why` says what failed.
int connect_engine(const char *&why) {
    const int sock = dial_engine(why);
    if (sock < 0) return sock;
    int rc = 0;
    int fds[ipc::kMaxControlFds] = {-1, -1};
    void *base = MAP_FAILED;
    ipc::ControlMessage hello{};
    ipc::ControlMessage reply{};
    struct stat st {};
    hello.type = static_cast<uint32_t>(ipc::ControlType::kHello);
    hello.version = ipc::kLayoutVersion;
    if ((rc = ipc::send_control(sock, hello, nullptr, 0)) != 0) {
        why = "hello";
        goto fail;
    }
    if ((rc = recv_control_timed(sock, reply, fds, ipc::kMaxControlFds)) != 0) {
        why = "hello reply";
        goto fail;
    }
    if (reply.type != static_cast<uint32_t>(ipc::ControlType::kHelloReply) || reply.result != 0 ||
        fds[0] < 0 || fds[1] < 0) {
        rc = reply.result < 0 ? reply.result : -EPROTO;
        why = "engine refused the session";
        goto fail;
    }
    // A region smaller than the layout would fault (SIGBUS) on first touch of its end.
    if (fstat(fds[0], &st) != 0 || static_cast<uint64_t>(st.st_size) < ipc::kRegionBytes) {
        rc = -EPROTO;
        why = "region too small";
        goto fail;
    }
    base = mmap(nullptr, ipc::kChunksOffset, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        why = "mmap";
        goto fail;
    }
    g_region.base = static_cast<uint8_t *>(base);
    if (!header_matches(g_region.header())) {
        rc = -EPROTO;
        why = "region header does not match this libtcps";
        goto fail;
    }
    lock_flagged(g_chunk_mutex, tl_in_chunks);
    rc = map_chunk_locked(0, fds[0]) ? 0 : -ENOMEM;
    unlock_flagged(g_chunk_mutex, tl_in_chunks);
    if (rc != 0) {
        why = "mmap";
        goto fail;
    }
    g_memfd.store(move_high_internal(fds[0]));
    g_session_id = reply.session_id;
    g_member = 0;
    g_doorbell_fd.store(move_high_internal(fds[1]));
    g_control_fd.store(move_high_internal(sock));
    return 0;

fail:
    unmap_region();
    for (int fd : fds)
        if (fd >= 0) real(libc.close)(fd);
    real(libc.close)(sock);
    return rc;
}

// Thread exit: the waiter stays registered and ours, free for this process's next thread.
void release_waiter(int index) {
    if (index < 0 || index >= static_cast<int>(ipc::kMaxWaiters)) return;
    g_waiter_bits[index / 64].fetch_and(~(uint64_t{1} << (index % 64)));
}

// pthread key destructor: the thread is exiting, its waiter is free again.
void release_waiter_at_exit(void *value) {
    const int index = static_cast<int>(reinterpret_cast<intptr_t>(value)) - 1;
    if (tl_waiter == index && tl_waiter_epoch == g_epoch.load()) release_waiter(index);
    tl_waiter = -1;
}

void adopt_waiter(int index) {
    tl_waiter = index;
    tl_waiter_epoch = g_epoch.load();
    pthread_setspecific(g_waiter_key, reinterpret_cast<void *>(static_cast<intptr_t>(index + 1)));
}

// Gives this thread a waiter: one this process registered that no thread uses, or a fresh pipe
// registered with the engine, which picks its index.
bool acquire_waiter() {
    if (tl_acquiring) return false;  // a signal handler interrupted our own registration
    tl_acquiring = true;
    for (uint32_t i = 0; i < ipc::kMaxWaiters; ++i) {
        const uint64_t bit = uint64_t{1} << (i % 64);
        if (g_waiter_fds[i].load() < 0 || (g_waiter_bits[i / 64].load() & bit)) continue;
        if (g_waiter_bits[i / 64].fetch_or(bit) & bit) continue;
        adopt_waiter(static_cast<int>(i));
        tl_acquiring = false;
        return true;
    }
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
        tl_acquiring = false;
        return false;
    }
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kRegisterWaiter);
    msg.version = ipc::kLayoutVersion;
    msg.arg = -1;
    ipc::ControlMessage reply{};
    int rc;
    lock_flagged(g_control_mutex, tl_in_control);
    const int control = g_control_fd.load();
    rc = ipc::send_control(control, msg, &pipe_fds[1], 1);
    if (rc == 0) {
        int none = -1;
        rc = recv_control_timed(control, reply, &none, 0);
        if (rc == 0 && reply.type != static_cast<uint32_t>(ipc::ControlType::kWaiterReply))
            rc = -EPROTO;
        if (rc == 0) rc = reply.result;
        if (rc == 0 && (reply.arg < 0 || reply.arg >= static_cast<int32_t>(ipc::kMaxWaiters)))
            rc = -EPROTO;
    }
    unlock_flagged(g_control_mutex, tl_in_control);
    real(libc.close)(pipe_fds[1]);  // the engine holds it now: its death is our EOF
    if (rc != 0) {
        real(libc.close)(pipe_fds[0]);
        if (rc == -ECONNRESET || rc == -EPIPE) mark_session_dead();
        tl_acquiring = false;
        return false;
    }
    const int index = reply.arg;
    g_waiter_bits[index / 64].fetch_or(uint64_t{1} << (index % 64));
    g_waiter_fds[index].store(move_high_internal(pipe_fds[0]));
    adopt_waiter(index);
    tl_acquiring = false;
    return true;
}

// One request/reply on our control connection. 0 or -errno.
int control_exchange(const ipc::ControlMessage &msg, ipc::ControlMessage &reply,
                     ipc::ControlType reply_type, bool with_creds = false, int fd = -1) {
    lock_flagged(g_control_mutex, tl_in_control);
    const int control = g_control_fd.load();
    int rc = ipc::send_control(control, msg, fd >= 0 ? &fd : nullptr, fd >= 0 ? 1 : 0, with_creds);
    if (rc == 0) {
        int none = -1;
        rc = recv_control_timed(control, reply, &none, 0);
        if (rc == 0 && reply.type != static_cast<uint32_t>(reply_type)) rc = -EPROTO;
        if (rc == 0) rc = reply.result;
    }
    unlock_flagged(g_control_mutex, tl_in_control);
    return rc;
}

// The slot an engine reply names (kNewSocketReply, kAdoptSocketReply), mapped here; or
// -ENOMEM, after closing it (with `reset`) if it is one we cannot map.
int take_reply_slot(const ipc::ControlMessage &reply, bool reset) {
    const uint32_t slot = static_cast<uint32_t>(reply.arg);
    if (reply.arg >= 0 && map_slot(slot)) return static_cast<int>(slot);
    if (reply.arg >= 0 && slot < ipc::kMaxSockets && g_region.mapped(slot))
        request_close(slot, reset);
    return -ENOMEM;
}

}  // namespace

int register_mem_with_engine(int memfd, uint64_t length, uint32_t &id) {
    if (!session_usable(true) || session_dead()) return -ENOSYS;
    if (claims_slots()) return -ENOSYS;  // through tcps-relay: no memory shared with the engine
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kRegisterMem);
    msg.version = ipc::kLayoutVersion;
    msg.token = length;
    ipc::ControlMessage reply{};
    lock_flagged(g_control_mutex, tl_in_control);
    const int control = g_control_fd.load();
    int rc = ipc::send_control(control, msg, &memfd, 1);
    if (rc == 0) {
        int none = -1;
        rc = recv_control_timed(control, reply, &none, 0);
        if (rc == 0 && reply.type != static_cast<uint32_t>(ipc::ControlType::kRegisterMemReply))
            rc = -EPROTO;
        if (rc == 0) rc = reply.result;
    }
    unlock_flagged(g_control_mutex, tl_in_control);
    if (rc != 0) return rc;
    if (reply.arg < 0 || static_cast<uint32_t>(reply.arg) >= ipc::kMaxMemRegistrations)
        return -EPROTO;
    id = static_cast<uint32_t>(reply.arg);
    return 0;
}

int deregister_mem_with_engine(uint32_t id) {
    if (!session_usable(false) || session_dead()) return 0;  // gone with the engine
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kDeregisterMem);
    msg.version = ipc::kLayoutVersion;
    msg.arg = static_cast<int32_t>(id);
    ipc::ControlMessage reply{};
    return control_exchange(msg, reply, ipc::ControlType::kDeregisterMemReply);
}

int request_handoff(uint32_t slot, uint32_t how, Handoff &out) {
    out = Handoff{};
    if (!session_usable(false)) return -ECONNRESET;
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kHandoff);
    msg.version = ipc::kLayoutVersion;
    msg.arg = static_cast<int32_t>(slot);
    msg.reserved = how;
    ipc::ControlMessage reply{};
    int fds[1] = {-1};
    lock_flagged(g_control_mutex, tl_in_control);
    const int control = g_control_fd.load();
    int rc = ipc::send_control(control, msg, nullptr, 0);
    // The engine answers once the socket's tx ring has drained: as long as a blocking send.
    for (int k = 0; rc == 0 && k < 30; ++k) {
        rc = recv_control_timed(control, reply, fds, 1);
        if (rc != -ETIMEDOUT) break;
        rc = 0;
        if (session_dead()) rc = -ECONNRESET;
    }
    unlock_flagged(g_control_mutex, tl_in_control);
    if (rc == 0 && reply.type != static_cast<uint32_t>(ipc::ControlType::kHandoffReply))
        rc = -EPROTO;
    if (rc == 0) rc = reply.result;
    if (rc == 0 && fds[0] < 0) rc = -EPROTO;
    if (rc != 0) {
        if (fds[0] >= 0) real(libc.close)(fds[0]);
        return rc;
    }
    out.kernel_fd = fds[0];
    out.lost_bytes = static_cast<uint32_t>(reply.arg);
    out.lost_connections = reply.reserved;
    out.parked_bytes = reply.token;
    return 0;
}

int adopt_with_engine(int kernel_fd, uint64_t &parked, bool on_demand) {
    parked = 0;
    if (!session_usable(true) || session_dead()) return -ENOSYS;
    if (claims_slots()) return -EOPNOTSUPP;  // through tcps-relay the socket is not the engine's
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kAdoptSocket);
    msg.version = ipc::kLayoutVersion;
    msg.reserved = on_demand ? ipc::kAdoptOnDemand : 0;
    ipc::ControlMessage reply{};
    // With our credentials: the socket counts against our uid, as one we made would.
    const int rc =
        control_exchange(msg, reply, ipc::ControlType::kAdoptSocketReply, true, kernel_fd);
    if (rc == -ECONNRESET || rc == -EPIPE) mark_session_dead();
    // Bytes parked for the socket: counted in a refusal too.
    if (reply.type == static_cast<uint32_t>(ipc::ControlType::kAdoptSocketReply))
        parked = reply.token;
    if (rc != 0) return rc;
    // Not a slot we can use: the engine lets go of its descriptor, ours stays.
    return take_reply_slot(reply, false);
}

namespace {

// A new control connection that joins our session as reserved member `member`: its fd (moved
// high, close-on-exec, not in the table), or -errno.
int dial_and_join(int member) {
    const char *why = "";
    const int sock = dial_engine(why);
    if (sock < 0) return sock;
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kJoin);
    msg.version = ipc::kLayoutVersion;
    msg.session_id = g_session_id;
    msg.arg = member;
    msg.token = g_region.header().family_token;
    ipc::ControlMessage reply{};
    int none = -1;
    int rc = ipc::send_control(sock, msg, nullptr, 0);
    if (rc == 0) rc = recv_control_timed(sock, reply, &none, 0);
    if (rc == 0 && reply.type != static_cast<uint32_t>(ipc::ControlType::kJoinReply)) rc = -EPROTO;
    if (rc == 0) rc = reply.result;
    if (rc != 0) {
        real(libc.close)(sock);
        return rc;
    }
    const int moved = dup_high(sock);
    if (moved < 0) return sock;
    real(libc.close)(sock);
    return moved;
}

// In a forked child: joins the parent's session as member `member` on a connection of our
// own. 0 or -errno.
int join_session(int member) {
    const int sock = dial_and_join(member);
    if (sock < 0) return sock;
    close_internal(g_control_fd);  // the parent's connection: our copy goes
    g_fds.set(sock, FdRef::internal());
    g_control_fd.store(sock);
    return 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

bool shim_init() {
    const int state = g_init_state.load(std::memory_order_acquire);
    if (state != 0) return state > 0;
    if (!resolve_libc()) {
        g_init_state.store(-1);
        return false;
    }
    if (const char *spin = std::getenv("TCPS_SPIN_US"); spin && *spin)
        g_spin_ns = std::strtoull(spin, nullptr, 10) * 1000;
    if (const char *debug = std::getenv("TCPS_DEBUG"); debug && *debug && *debug != '0')
        g_debug = true;
    for (auto &fd : g_waiter_fds) fd.store(-1, std::memory_order_relaxed);
    for (auto &fd : g_waiter_eps) fd.store(-1, std::memory_order_relaxed);
    for (auto &fd : g_waiter_nest_eps) fd.store(-1, std::memory_order_relaxed);

    rlimit limit{};
    size_t entries = 65536;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0)
        entries = limit.rlim_max == RLIM_INFINITY ? kMaxFdTable : limit.rlim_max;
    if (entries > kMaxFdTable) entries = kMaxFdTable;
    if (entries < 1024) entries = 1024;
    if (pthread_key_create(&g_waiter_key, release_waiter_at_exit) != 0 || !g_fds.init(entries)) {
        g_init_state.store(-1);
        return false;
    }
    g_self_pid.store(getpid());
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
    g_init_state.store(1, std::memory_order_release);
    adopt_inherited_sockets();
    note_inherited_listeners();
    return true;
}

void Socket::open(int family, bool nonblock, uint32_t gen) {
    domain = family;
    nonblocking.store(nonblock);
    file_flags.store(0);
    listening.store(false);
    linger_reset.store(false);
    shut_rd.store(false);
    shut_wr.store(false);
    disconnected.store(false);
    end_reported.store(false);
    connect_state.store(kUnconnected);
    rcv_timeout_ns.store(0);
    snd_timeout_ns.store(0);
    rcvlowat.store(1);
    consumed_error_gen.store(0);  // the engine starts every socket at error_gen 0
    deferred_error.store(0);
    tx_sleeping.store(false);
    backlog.store(0);
    options.clear();
    remake_tried.store(false);
    close_internal(twin_fd);  // a socket before it in this slot had one (never, but never leak it)
    for (auto &ticket : direct_tickets) ticket = nullptr;
    ring_taken = 0;
    refs.store(1);
    generation.store(gen, std::memory_order_release);
}

namespace {

// When process `pid` started (clock ticks since boot, /proc/PID/stat field 22). False if it is
// gone or a zombie. One we may not look at (hidepid) but that exists counts as started at 0:
// older than anyone, so that no process that cannot see it takes its place.
bool process_start(int32_t pid, uint64_t &start) {
    char path[48];
    std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        start = 0;
        return kill(pid, 0) == 0 || errno == EPERM;
    }
    char text[1024];
    const ssize_t n = real(libc.read)(fd, text, sizeof(text) - 1);
    real(libc.close)(fd);
    if (n <= 0) return false;
    text[n] = '\0';
    // After the command name (which may hold anything, up to the last ')'): state, then 19
    // more fields to the start time.
    const char *p = std::strrchr(text, ')');
    if (!p || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X') return false;
    p += 2;
    for (int field = 3; field < 22; ++field) {
        p = std::strchr(p, ' ');
        if (!p) return false;
        ++p;
    }
    start = std::strtoull(p, nullptr, 10);
    return true;
}

}  // namespace

bool remakes_listener(uint32_t slot) {
    if (!g_region.base || !g_region.mapped(slot)) return false;
    const uint64_t bit = uint64_t{1} << (slot % 64);
    int32_t oldest = 0;
    uint64_t oldest_start = UINT64_MAX;
    for (uint32_t m = 0; m < ipc::kMaxMembers; ++m) {
        const ipc::MemberRecord &record = g_region.member(m);
        if (record.state.load(std::memory_order_acquire) !=
                static_cast<uint32_t>(ipc::MemberState::kLive) ||
            !(g_region.held_word(m, slot).load(std::memory_order_acquire) & bit))
            continue;
        const int32_t pid = record.pid.load(std::memory_order_relaxed);
        uint64_t start;
        if (pid <= 0 || !process_start(pid, start)) continue;
        if (start < oldest_start || (start == oldest_start && pid < oldest)) {
            oldest = pid;
            oldest_start = start;
        }
    }
    // A child forked after the engine's end joined nothing: no record names it.
    return oldest != 0 && oldest == g_self_pid.load();
}

void OptionLog::clear() {
    for (Entry &entry : entries) entry.ready.store(false, std::memory_order_relaxed);
    claimed.store(0, std::memory_order_release);
}

void OptionLog::add(int level, int name, const void *value, uint32_t len) {
    if (len > kValueMax) return;
    const uint32_t index = claimed.fetch_add(1, std::memory_order_acq_rel);
    if (index >= kEntries) return;
    Entry &entry = entries[index];
    entry.level = level;
    entry.name = name;
    entry.len = len;
    if (len > 0) std::memcpy(entry.value, value, len);
    entry.ready.store(true, std::memory_order_release);
}

Socket &socket_state(uint32_t slot) {
    return g_socket_chunks[slot >> ipc::kChunkShift].load(
        std::memory_order_relaxed)[slot & ipc::kChunkMask];
}

bool map_slot(uint32_t slot) {
    if (slot >= ipc::kMaxSockets) return false;
    return g_region.chunk(slot >> ipc::kChunkShift) || map_chunk(slot >> ipc::kChunkShift);
}

bool map_bulk(uint32_t k) {
    if (g_region.bulk(k)) return true;
    lock_flagged(g_chunk_mutex, tl_in_chunks);
    const bool ok = map_bulk_locked(k, g_memfd.load());
    unlock_flagged(g_chunk_mutex, tl_in_chunks);
    return ok;
}

bool find_socket(int fd, SocketRef &out) {
    FdRef ref = g_fds.get(fd);
    // A socket received with SCM_RIGHTS is offloaded at its first use.
    if (__builtin_expect(ref.empty(), 0) && adopt_pending(fd)) ref = g_fds.get(fd);
    if (ref.kind() != FdKind::kSocket || !g_region.base || !g_region.mapped(ref.slot()))
        return false;
    Socket &sock = socket_state(ref.slot());
    // A close racing on another thread may have handed the slot to a new socket.
    if (sock.generation.load(std::memory_order_acquire) != ref.generation()) return false;
    out.fd = fd;
    out.slot = ref.slot();
    out.generation = ref.generation();
    out.sock = &sock;
    out.shm = &g_region.slot(ref.slot());
    return true;
}

// ---------------------------------------------------------------------------------------------

bool shim_locked_here() {
    return tl_in_setup || tl_in_holds || tl_in_control || tl_in_chunks;
}

bool session_usable(bool create) {
    const int state = g_state.load(std::memory_order_acquire);
    if (state == kActive)
        return g_region.header().engine_alive.load(std::memory_order_relaxed) != 0;
    if (!create || state == kDead || g_init_state.load() <= 0) return false;
    // A signal handler that interrupted this thread's own setup (a socket() in it while the
    // first socket() waits for the engine's reply) would wait for itself on the mutex.
    if (tl_in_setup) return false;
    tl_in_setup = true;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    pthread_mutex_lock(&g_setup_mutex);
    bool usable = false;
    const int again = g_state.load();
    if (again == kActive) {
        usable = g_region.header().engine_alive.load() != 0;
    } else if (again != kDead && now_ns() >= g_retry_after_ns) {
        const char *why = "";
        const int rc = connect_engine(why);
        char line[256];
        if (rc == 0) {
            g_state.store(kActive, std::memory_order_release);
            usable = true;
            std::snprintf(line, sizeof(line),
                          "tcps: pid %d: TCP offloaded to the engine (session %u)\n", getpid(),
                          g_session_id);
        } else {
            g_state.store(kUnavailable);
            g_retry_after_ns = now_ns() + kRetryNs;
            std::snprintf(line, sizeof(line),
                          "tcps: pid %d: no engine (%s: %s); TCP stays in the kernel\n", getpid(),
                          why, std::strerror(-rc));
        }
        debug_line(line);
    }
    pthread_mutex_unlock(&g_setup_mutex);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    tl_in_setup = false;
    return usable;
}

bool session_dead() {
    const int state = g_state.load(std::memory_order_acquire);
    if (state == kDead) return true;
    return state == kActive && g_region.header().engine_alive.load(std::memory_order_relaxed) == 0;
}

namespace {

// After the engine's end, a listener's twin (engine/twin.cpp) is kept only by the process that
// makes the listener again (remakes_listener()), which makes the twin its kernel listener
// (recover_listener()); the others let it go, so that the port is free for that process's
// new socket if it holds no twin itself (nginx's master, whose workers accepted).
void release_twins_after_end() {
    for (uint32_t k = 0; k < ipc::kMaxChunks; ++k) {
        Socket *chunk = g_socket_chunks[k].load(std::memory_order_acquire);
        if (!chunk) continue;
        for (uint32_t i = 0; i < ipc::kChunkSlots; ++i)
            if (chunk[i].twin_fd.load(std::memory_order_relaxed) >= 0 &&
                !remakes_listener(k * ipc::kChunkSlots + i))
                close_internal(chunk[i].twin_fd);
    }
}

}  // namespace

void mark_session_dead() {
    int expected = kActive;
    if (g_state.compare_exchange_strong(expected, kDead)) release_twins_after_end();
}

const ipc::RegionView &region() {
    return g_region;
}

uint64_t spin_budget_ns() {
    return std::min(tl_spin_ns, g_spin_ns);
}

void spin_learn(uint64_t waited_ns) {
    const uint64_t budget = spin_budget_ns();
    if (waited_ns <= 2 * g_spin_ns)
        tl_spin_ns = std::min(g_spin_ns, std::max<uint64_t>(2 * budget, 1'000));
    else
        tl_spin_ns = budget < 500 ? 0 : budget / 2;
}

bool claims_slots() {
    return g_region.header().client_slots != 0;
}

int claim_client_slot() {
    const uint32_t start = g_slot_hint.fetch_add(1, std::memory_order_relaxed);
    const uint32_t count = g_region.header().client_slots;
    if (count > ipc::kClientSlots) return -1;
    for (uint32_t k = 0; k < count; ++k) {
        const uint32_t slot = (start + k) % count;
        ipc::SocketSlot &shm = g_region.slot(slot);
        if (shm.state.load(std::memory_order_acquire) !=
                static_cast<uint32_t>(ipc::SlotState::kFree) ||
            shm.claim.load(std::memory_order_relaxed) != 0)
            continue;
        // The engine clears a claim only after the slot is kFree again, so winning it here
        // means the slot is free (other processes of the family claim from the same slots).
        uint32_t expected = 0;
        if (shm.claim.compare_exchange_strong(expected, 1, std::memory_order_acq_rel))
            return static_cast<int>(slot);
    }
    return -1;
}

void release_client_slot(uint32_t slot) {
    if (slot >= ipc::kClientSlots) return;
    g_region.slot(slot).claim.store(0, std::memory_order_release);
}

int new_socket(int family) {
    if (!session_usable(false)) return -ECONNRESET;
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kNewSocket);
    msg.version = ipc::kLayoutVersion;
    msg.arg = family;
    ipc::ControlMessage reply{};
    // With our credentials: the engine creates the socket as ours (identity.hpp).
    const int rc = control_exchange(msg, reply, ipc::ControlType::kNewSocketReply, true);
    if (rc == -ECONNRESET || rc == -EPIPE) mark_session_dead();
    if (rc != 0) return rc;
    return take_reply_slot(reply, true);  // one we cannot use is given back unused
}

void hold_socket(uint32_t slot) {
    lock_holds();
    g_region.held_word(g_member, slot)
        .fetch_or(uint64_t{1} << (slot % 64), std::memory_order_acq_rel);
    g_region.slot(slot).holders.fetch_add(1, std::memory_order_acq_rel);
    unlock_holds();
}

bool holds_socket(uint32_t slot) {
    return g_region.held_word(g_member, slot).load(std::memory_order_acquire) &
           (uint64_t{1} << (slot % 64));
}

bool unhold_socket(uint32_t slot) {
    lock_holds();
    // The mark first: if we die between the two, the socket leaks until the family ends,
    // while the other order could drop a hold twice and close it under another process.
    const uint64_t bit = uint64_t{1} << (slot % 64);
    if (!(g_region.held_word(g_member, slot).fetch_and(~bit, std::memory_order_acq_rel) & bit)) {
        // Our hold went already (a close racing a hand-back in another thread): dropping
        // another would take one of another process's.
        unlock_holds();
        return false;
    }
    std::atomic<uint32_t> &holders = g_region.slot(slot).holders;
    uint32_t count = holders.load(std::memory_order_acquire);
    while (count > 0 &&
           !holders.compare_exchange_weak(count, count - 1, std::memory_order_acq_rel)) {
    }
    unlock_holds();
    return count == 1;
}

void notify_engine(uint32_t slot) {
    ipc::ring_doorbell(g_region, slot);
    // Our push before our look at engine_sleeping; the engine sets it and then re-checks the
    // queue (engine worker sleep_until_work): one of us sees the other. The chunk's: each is
    // served by one worker of the engine, which sleeps on its own.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (g_region.chunk_header(slot >> ipc::kChunkShift)
            .engine_sleeping.load(std::memory_order_relaxed)) {
        const uint64_t one = 1;
        ssize_t ignored =
            real(libc.write)(g_doorbell_fd.load(std::memory_order_relaxed), &one, sizeof(one));
        (void)ignored;
    }
}

int request(uint32_t slot, const ipc::Request &req, ipc::Response *response) {
    if (!session_usable(false)) return -ECONNRESET;
    Socket &sock = socket_state(slot);
    ipc::SocketSlot &shm = g_region.slot(slot);
    SocketLockGuard one_at_a_time(sock.request_lock);
    std::memcpy(&shm.request, &req, sizeof(req));
    const uint32_t seq = shm.req_seq.load(std::memory_order_relaxed) + 1;
    shm.req_seq.store(seq, std::memory_order_release);
    notify_engine(slot);
    // At or past our request: the slot may be reused right after a close is answered.
    auto answered = [&] {
        return static_cast<int32_t>(shm.resp_seq.load(std::memory_order_acquire) - seq) >= 0;
    };
    const WaitResult waited = wait_until(slot, answered, -1, Interrupt::kNever);
    int result = -ECONNRESET;
    if (waited == WaitResult::kReady) {
        result = shm.response.result;
        if (response) std::memcpy(response, &shm.response, sizeof(*response));
    }
    return result;
}

void request_close(uint32_t slot, bool reset) {
    if (!session_usable(false)) return;
    Socket &sock = socket_state(slot);
    ipc::SocketSlot &shm = g_region.slot(slot);
    SocketLockGuard one_at_a_time(sock.request_lock);
    ipc::Request req{};
    req.op = static_cast<uint32_t>(ipc::Op::kClose);
    req.arg0 = reset ? 1 : 0;
    std::memcpy(&shm.request, &req, sizeof(req));
    shm.req_seq.store(shm.req_seq.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    notify_engine(slot);
}

// ---------------------------------------------------------------------------------------------

int take_error(SocketRef &ref) {
    if (ref.sock->deferred_error.load(std::memory_order_relaxed) != 0)
        if (const int deferred = ref.sock->deferred_error.exchange(0)) return deferred;
    const uint32_t gen = ref.shm->error_gen.load(std::memory_order_acquire);
    uint32_t consumed = ref.sock->consumed_error_gen.load(std::memory_order_relaxed);
    if (gen == consumed) return 0;
    const int error = ref.shm->so_error.load(std::memory_order_relaxed);
    if (!ref.sock->consumed_error_gen.compare_exchange_strong(consumed, gen)) return 0;
    return error > 0 ? error : 0;
}

bool error_pending(const SocketRef &ref) {
    return ref.sock->deferred_error.load(std::memory_order_relaxed) != 0 || reset_pending(ref);
}

bool reset_pending(const SocketRef &ref) {
    const uint32_t gen = ref.shm->error_gen.load(std::memory_order_acquire);
    return gen != ref.sock->consumed_error_gen.load(std::memory_order_relaxed) &&
           ref.shm->so_error.load(std::memory_order_relaxed) > 0;
}

void want_urgent(const SocketRef &ref) {
    if (ref.shm->posted.load(std::memory_order_relaxed) & ipc::kPostedUrgentWatch) return;
    ref.shm->posted.fetch_or(ipc::kPostedUrgentWatch, std::memory_order_release);
    notify_engine(ref.slot);
}

bool twin_ready(const SocketRef &ref) {
    const ipc::SocketSlot &shm = *ref.shm;
    return (shm.flags.load(std::memory_order_acquire) & ipc::kFlagTwinReady) &&
           shm.twin_drained.load(std::memory_order_acquire) ==
               shm.twin_ready_at.load(std::memory_order_relaxed);
}

void report_twin_drained(const SocketRef &ref) {
    uint32_t at = ref.shm->twin_ready_at.load(std::memory_order_relaxed);
    // Once per setting of the flag: whoever moves it past rings.
    if (ref.shm->twin_drained.compare_exchange_strong(at, at + 1, std::memory_order_acq_rel))
        notify_engine(ref.slot);
}

namespace {

// kFlagTwinReady stays set until a client finds the twin empty: a process that holds the twin
// asks the kernel, so that poll() and epoll do not report a connection another process has
// taken (or this one, the last), and reports it empty if so.
bool twin_readable(const SocketRef &ref) {
    if (!twin_ready(ref)) return false;
    const int twin = ref.sock->twin_fd.load(std::memory_order_acquire);
    if (twin < 0) return true;  // accept() asks for it and looks
    pollfd p{twin, POLLIN, 0};
    const timespec now{0, 0};
    if (real(libc.ppoll)(&p, 1, &now, nullptr) != 0) return true;  // readable, or an error
    report_twin_drained(ref);
    return false;
}

}  // namespace

SocketSnapshot snapshot(const SocketRef &ref) {
    SocketSnapshot s;
    const ipc::SocketSlot &shm = *ref.shm;
    const Socket &sock = *ref.sock;
    s.dead = session_dead();
    s.flags = shm.flags.load(std::memory_order_acquire);
    uint32_t tx_ring_bytes;
    s.tx_room = ipc::tx_ring_room(shm, tx_ring_bytes);
    s.rx_available =
        shm.rx_tail.load(std::memory_order_acquire) - shm.rx_head.load(std::memory_order_relaxed);
    s.accept_available =
        shm.acc_tail.load(std::memory_order_acquire) - shm.acc_head.load(std::memory_order_relaxed);
    // Connections wait that the engine cannot accept: readable, and accept() says why.
    if (s.accept_available == 0 && shm.accept_error.load(std::memory_order_relaxed) > 0)
        s.accept_available = 1;
    // Connections wait in the listener's twin (engine/twin.cpp): accept() takes them there.
    if (s.accept_available == 0 && twin_readable(ref)) s.accept_available = 1;
    s.error_pending = reset_pending(ref);
    s.error_deferred = ref.sock->deferred_error.load(std::memory_order_relaxed) != 0;
    const uint32_t kernel = shm.kernel_mask.load(std::memory_order_relaxed);
    s.urgent = (kernel & POLLPRI) != 0;
    // Stopped at the urgent mark with bytes waiting past it: readable, as the kernel socket is.
    s.past_mark_readable = (s.flags & ipc::kFlagUrgentStop) && (kernel & POLLIN) &&
                           shm.urgent_mark.load(std::memory_order_relaxed) ==
                               shm.rx_head.load(std::memory_order_relaxed);
    // Bytes wait in the engine's kernel socket for the next direct receive: readable, and a
    // recv() takes them (Op::kLeaveDirect).
    s.direct_readable = (s.flags & ipc::kFlagRxDirect) && (kernel & POLLIN);
    s.listening = sock.listening.load(std::memory_order_relaxed);
    s.end_unreported = !sock.end_reported.load(std::memory_order_relaxed);
    s.connect_started = sock.connect_state.load(std::memory_order_relaxed) == kConnecting;
    s.disconnected = sock.disconnected.load(std::memory_order_relaxed);
    s.shut_rd = sock.shut_rd.load(std::memory_order_relaxed);
    s.shut_wr = sock.shut_wr.load(std::memory_order_relaxed);
    s.rcvlowat = static_cast<uint32_t>(sock.rcvlowat.load(std::memory_order_relaxed));
    return s;
}

// ---------------------------------------------------------------------------------------------

bool waiter_arm(uint32_t slot) {
    if (tl_armed) return false;  // a signal handler inside our own wait
    if (!session_usable(false)) return false;
    if (tl_waiter < 0 || tl_waiter_epoch != g_epoch.load(std::memory_order_relaxed)) {
        tl_waiter = -1;
        if (!acquire_waiter()) return false;
    }
    tl_armed = true;  // before the store: a nested arm from a signal handler must see it
    tl_byte_taken = false;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    ipc::RegionHeader &header = g_region.header();
    ipc::Waiter &waiter = g_region.waiter(static_cast<uint32_t>(tl_waiter));
    header.waiters_armed.fetch_add(1, std::memory_order_seq_cst);
    waiter.slot.store(slot, std::memory_order_relaxed);
    waiter.state.store(static_cast<uint32_t>(ipc::WaiterState::kArmed), std::memory_order_seq_cst);
    // Armed before the caller re-reads the slot: pairs with the engine's fence between its
    // publishing and its look at the waiters (flush_wakes).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return true;
}

int waiter_fd() {
    return tl_waiter >= 0 ? g_waiter_fds[tl_waiter].load() : -1;
}

namespace {

// The epoll instance of this thread's waiter that holds its pipe, made on first use.
int waiter_epoll() {
    std::atomic<int> &holder = g_waiter_eps[tl_waiter];
    int ep = holder.load(std::memory_order_relaxed);
    if (ep >= 0) return ep;
    ep = real(libc.epoll_create1)(EPOLL_CLOEXEC);
    if (ep < 0) return -1;
    epoll_event event{};
    event.events = EPOLLIN;
    if (real(libc.epoll_ctl)(ep, EPOLL_CTL_ADD, waiter_fd(), &event) != 0) {
        real(libc.close)(ep);
        return -1;
    }
    ep = move_high_internal(ep);
    holder.store(ep, std::memory_order_relaxed);
    return ep;
}

}  // namespace

int epoll_sleep_until(int ep, epoll_event *events, int max, uint64_t deadline_ns,
                      const sigset_t *sigmask) {
    uint64_t left = UINT64_MAX;
    if (deadline_ns != 0) {
        const uint64_t now = now_ns();
        left = now >= deadline_ns ? 0 : deadline_ns - now;
    }
    if (libc.epoll_pwait2) {
        timespec ts{static_cast<time_t>(left / 1'000'000'000),
                    static_cast<long>(left % 1'000'000'000)};
        const int n =
            real(libc.epoll_pwait2)(ep, events, max, left == UINT64_MAX ? nullptr : &ts, sigmask);
        if (n >= 0 || errno != ENOSYS) return n;
    }
    const uint64_t ms = left == UINT64_MAX ? UINT64_MAX : (left + 999'999) / 1'000'000;
    const int timeout = ms > INT32_MAX ? -1 : static_cast<int>(ms);
    return real(libc.epoll_pwait)(ep, events, max, timeout, sigmask);
}

namespace {

// A blocking wait that every interruption ends: epoll_wait() returns EINTR after a handler
// (SA_RESTART or not) and after a stop and SIGCONT (ep_poll() answers -EINTR, never a restart
// code). False if there is no epoll to wait in.
bool block_interruptible(uint64_t deadline_ns, BlockResult &result) {
    const int ep = waiter_epoll();
    if (ep < 0) return false;
    epoll_event event{};
    const int n = epoll_sleep_until(ep, &event, 1, deadline_ns, nullptr);
    if (n < 0) {
        result = errno == EINTR ? BlockResult::kInterrupted : BlockResult::kDead;
    } else if (n == 0) {
        result = deadline_ns != 0 && now_ns() >= deadline_ns ? BlockResult::kTimeout
                                                             : BlockResult::kWoken;
    } else if (event.events & EPOLLIN) {
        result = BlockResult::kWoken;
    } else {
        mark_session_dead();  // EPOLLHUP alone: the engine is gone
        result = BlockResult::kDead;
    }
    return true;
}

}  // namespace

BlockResult waiter_block(uint64_t deadline_ns, Interrupt how) {
    BlockResult result;
    if (how == Interrupt::kAlways && block_interruptible(deadline_ns, result)) return result;
    const int fd = waiter_fd();
    if (deadline_ns == 0) {
        char byte;
        const ssize_t n = real(libc.read)(fd, &byte, 1);
        if (n == 1) {
            tl_byte_taken = true;
            return BlockResult::kWoken;
        }
        if (n < 0 && errno == EINTR) return BlockResult::kInterrupted;
        mark_session_dead();  // EOF: the engine is gone
        return BlockResult::kDead;
    }
    const uint64_t now = now_ns();
    if (now >= deadline_ns) return BlockResult::kTimeout;
    const uint64_t left = deadline_ns - now;
    timespec ts{static_cast<time_t>(left / 1'000'000'000), static_cast<long>(left % 1'000'000'000)};
    pollfd p{fd, POLLIN, 0};
    const int n = real(libc.ppoll)(&p, 1, &ts, nullptr);
    if (n == 0) return BlockResult::kTimeout;
    if (n < 0) return errno == EINTR ? BlockResult::kInterrupted : BlockResult::kDead;
    if (p.revents & POLLIN) return BlockResult::kWoken;
    mark_session_dead();
    return BlockResult::kDead;
}

int waiter_epoll_with(int epfd, int wake_fd, uint64_t key) {
    if (!tl_armed) return -1;
    std::atomic<int> &holder = g_waiter_nest_eps[tl_waiter];
    int ep = holder.load(std::memory_order_relaxed);
    if (ep >= 0 && g_waiter_nest_keys[tl_waiter] == key) return ep;
    // Another registry than last time: a fresh instance, so that no member of the old one wakes
    // this one (the old epoll may live on in another process, which we cannot delete it from).
    if (ep >= 0) close_internal(holder);
    ep = real(libc.epoll_create1)(EPOLL_CLOEXEC);
    if (ep < 0) return -1;
    const int members[3] = {waiter_fd(), epfd, wake_fd};
    for (uint32_t k = 0; k < 3; ++k) {
        epoll_event event{};
        event.events = EPOLLIN;
        event.data.u32 = k;
        // An epoll too deeply nested for one more level (ELOOP, EINVAL) is left to ppoll().
        if (real(libc.epoll_ctl)(ep, EPOLL_CTL_ADD, members[k], &event) != 0) {
            real(libc.close)(ep);
            return -1;
        }
    }
    ep = move_high_internal(ep);
    g_waiter_nest_keys[tl_waiter] = key;
    holder.store(ep, std::memory_order_relaxed);
    return ep;
}

void waiter_disarm() {
    if (!tl_armed) return;
    ipc::Waiter &waiter = g_region.waiter(static_cast<uint32_t>(tl_waiter));
    const uint32_t previous = waiter.state.exchange(static_cast<uint32_t>(ipc::WaiterState::kIdle),
                                                    std::memory_order_seq_cst);
    if (previous == static_cast<uint32_t>(ipc::WaiterState::kSignaled) && !tl_byte_taken) {
        // The engine writes its byte right after signalling: take it, or the pipe would wake
        // our next sleep for nothing.
        char byte;
        ssize_t n;
        do {
            n = real(libc.read)(waiter_fd(), &byte, 1);
        } while (n < 0 && errno == EINTR);
        if (n == 0) mark_session_dead();
    }
    g_region.header().waiters_armed.fetch_sub(1, std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    tl_armed = false;
}

void nap(uint64_t deadline_ns) {
    uint64_t sleep_ns = 1'000'000;
    if (deadline_ns != 0) {
        const uint64_t now = now_ns();
        if (now >= deadline_ns) return;
        if (deadline_ns - now < sleep_ns) sleep_ns = deadline_ns - now;
    }
    timespec ts{0, static_cast<long>(sleep_ns)};
    nanosleep(&ts, nullptr);
}

// ---------------------------------------------------------------------------------------------

int move_high_internal(int fd) {
    const int moved = real(libc.fcntl)(fd, F_DUPFD_CLOEXEC, high_fd_base());
    if (moved >= 0) {
        real(libc.close)(fd);
        fd = moved;
    }
    g_fds.set(fd, FdRef::internal());
    return fd;
}

void relocate_internal(int fd) {
    auto relocate = [fd](std::atomic<int> &holder) {
        if (holder.load() != fd) return false;
        const int moved = dup_high(fd);
        if (moved < 0) return true;  // nowhere to go: the dup2 will take ours
        g_fds.set(moved, FdRef::internal());
        holder.store(moved);
        g_fds.take_if(fd, FdRef::internal());
        return true;  // the caller's dup2 closes the old number for us
    };
    if (relocate(g_control_fd) || relocate(g_doorbell_fd) || relocate(g_memfd)) return;
    for (auto *holders : {g_waiter_fds, g_waiter_eps, g_waiter_nest_eps})
        for (uint32_t i = 0; i < ipc::kMaxWaiters; ++i)
            if (relocate(holders[i])) return;
    // Listeners' twins (Socket::twin_fd): rare, so a walk over the sockets we have mapped.
    for (uint32_t k = 0; k < ipc::kMaxChunks; ++k) {
        Socket *chunk = g_socket_chunks[k].load(std::memory_order_acquire);
        if (!chunk) continue;
        for (uint32_t i = 0; i < ipc::kChunkSlots; ++i)
            if (relocate(chunk[i].twin_fd)) return;
    }
}

namespace {

// before_fork() with a live session: a member record for the child, with our holds. True when
// the child has one; false after a failure, which leaves g_hold_mutex held for the fork (an
// engine that no longer answers is not waited for again: the session is then dead).
bool reserve_for_child() {
    lock_holds();
    g_fork_locked = true;
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kReserveMember);
    msg.version = ipc::kLayoutVersion;
    ipc::ControlMessage reply{};
    const int rc = control_exchange(msg, reply, ipc::ControlType::kReserveReply);
    if (rc == -ECONNRESET || rc == -EPIPE) {
        // A killed engine leaves engine_alive set; its end of the control connection says it.
        mark_session_dead();
        g_fork_locked = false;
        unlock_holds();
        return false;
    }
    if (rc != 0 || reply.arg <= 0 || reply.arg >= static_cast<int32_t>(ipc::kMaxMembers))
        return false;
    // The child holds what we hold, from this moment: if we close a socket right after fork,
    // it stays open for the child, as the kernel's reference counts keep it.
    // Every socket we hold is in a chunk we have mapped.
    const auto child = static_cast<uint32_t>(reply.arg);
    for (uint32_t first = 0; first < ipc::kMaxSockets; first += 64) {
        if (!g_region.mapped(first)) {
            first += ipc::kChunkSlots - 64;  // the whole chunk: nothing of ours there
            continue;
        }
        uint64_t bits = g_region.held_word(g_member, first).load(std::memory_order_acquire);
        g_region.held_word(child, first).store(bits, std::memory_order_relaxed);
        while (bits) {
            const uint32_t slot = first + static_cast<uint32_t>(__builtin_ctzll(bits));
            bits &= bits - 1;
            g_region.slot(slot).holders.fetch_add(1, std::memory_order_acq_rel);
        }
    }
    g_fork_member = reply.arg;
    return true;
}

}  // namespace

void before_fork() {
    g_fork_member = -1;
    if (g_state.load() == kActive && session_usable(false) && reserve_for_child()) return;
    // The engine is gone: the listeners this process is to remake (remakes_listener()) are made
    // again in the kernel before the child is, so that it inherits working ones (nginx's
    // workers after a reload, Apache's new children).
    if (session_dead()) recover_listeners();
}

void after_fork_in_parent() {
    forget_kernel_served();
    // A failed fork leaves the reservation to expire in the engine, with the holds it carries.
    g_fork_member = -1;
    if (g_fork_locked) {
        g_fork_locked = false;
        unlock_holds();
    }
}

namespace {

// The child could not join: it must never touch the parent's session. Drop our copies of its
// descriptors and forget its sockets; the child's first TCP socket() starts a session of its
// own, and inherited offloaded fds say EBADF.
void leave_parent_session() {
    const int state = g_state.load();
    if (state == kActive || state == kDead) {
        close_internal(g_control_fd);
        close_internal(g_doorbell_fd);
        close_internal(g_memfd);
        close_waiters();
    }
    unmap_region();
    g_state.store(kNone);
    g_retry_after_ns = 0;
    for (auto &chunk : g_socket_chunks)
        if (Socket *states = chunk.load())
            for (uint32_t j = 0; j < ipc::kChunkSlots; ++j) states[j].refs.store(0);
    g_fds.forget_all();
}

}  // namespace

void after_fork_in_child() {
    g_self_pid.store(getpid());
    forget_all_pending();
    g_setup_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_control_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_chunk_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_hold_mutex = PTHREAD_MUTEX_INITIALIZER;
    g_fork_locked = false;
    tl_in_holds = false;
    // The parent's waiters are its threads': ours come fresh from the engine when needed.
    close_waiters();
    for (auto &word : g_waiter_bits) word.store(0);
    g_epoch.fetch_add(1);
    tl_waiter = -1;
    tl_armed = false;
    tl_acquiring = false;
    const int member = g_fork_member;
    g_fork_member = -1;
    if (g_state.load() == kActive && member > 0 && join_session(member) == 0) {
        g_member = static_cast<uint32_t>(member);
    } else if (session_dead()) {
        // The engine is gone: the child has the parent's sockets as the parent has them, dead
        // (recv says ECONNRESET, a listener reports the end once), rather than EBADF, and its
        // new sockets go to the kernel, as the parent's do.
        close_internal(g_control_fd);
        g_state.store(kDead);
    } else {
        leave_parent_session();
    }
    epoll_after_fork();
}

// ---------------------------------------------------------------------------------------------
// exec

bool exec_handover(ExecHandover &out) {
    // A vfork()ed child shares our memory and our member's connection: it cannot hand the
    // session on without confusing the parent's replies.
    if (g_state.load() != kActive || !session_usable(false) || getpid() != g_self_pid.load())
        return false;
    out.control_fd = g_control_fd.load();
    out.doorbell_fd = g_doorbell_fd.load();
    out.memfd = g_memfd.load();
    out.session_id = g_session_id;
    out.member = g_member;
    return out.control_fd >= 0 && out.doorbell_fd >= 0 && out.memfd >= 0;
}

bool vfork_handover(const uint32_t *slots, size_t count, ExecHandover &out) {
    if (g_state.load() != kActive || !session_usable(false)) return false;
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kReserveMember);
    msg.version = ipc::kLayoutVersion;
    ipc::ControlMessage reply{};
    lock_holds();
    const int rc = control_exchange(msg, reply, ipc::ControlType::kReserveReply);
    if (rc != 0 || reply.arg <= 0 || reply.arg >= static_cast<int32_t>(ipc::kMaxMembers)) {
        unlock_holds();
        return false;
    }
    // The new image holds what it inherits, from now on (see before_fork()).
    const auto member = static_cast<uint32_t>(reply.arg);
    for (size_t k = 0; k < count; ++k) {
        const uint64_t bit = uint64_t{1} << (slots[k] % 64);
        if (g_region.held_word(member, slots[k]).fetch_or(bit, std::memory_order_acq_rel) & bit)
            continue;
        g_region.slot(slots[k]).holders.fetch_add(1, std::memory_order_acq_rel);
    }
    unlock_holds();
    const int control = dial_and_join(reply.arg);
    if (control < 0) return false;  // the reservation expires, and its holds with it
    out.control_fd = control;
    out.doorbell_fd = g_doorbell_fd.load();
    out.memfd = g_memfd.load();
    out.session_id = g_session_id;
    out.member = static_cast<uint32_t>(reply.arg);
    return true;
}

int adopt_session(const ExecHandover &from) {
    struct stat st {};
    if (fstat(from.memfd, &st) != 0 || static_cast<uint64_t>(st.st_size) < ipc::kRegionBytes ||
        from.member >= ipc::kMaxMembers)
        return -EPROTO;
    void *base =
        mmap(nullptr, ipc::kChunksOffset, PROT_READ | PROT_WRITE, MAP_SHARED, from.memfd, 0);
    if (base == MAP_FAILED) return -errno;
    g_region.base = static_cast<uint8_t *>(base);
    if (!header_matches(g_region.header()) || g_region.header().session_id != from.session_id) {
        unmap_region();
        return -EPROTO;
    }
    for (int fd : {from.control_fd, from.doorbell_fd, from.memfd}) {
        real(libc.fcntl)(fd, F_SETFD, FD_CLOEXEC);
        g_fds.set(fd, FdRef::internal());
    }
    g_control_fd.store(from.control_fd);
    g_doorbell_fd.store(from.doorbell_fd);
    g_memfd.store(from.memfd);
    g_session_id = from.session_id;
    g_member = from.member;
    // Chunk 0 now; the chunks of the inherited sockets as they are adopted (map_slot).
    if (!map_chunk(0)) {
        unmap_region();
        return -ENOMEM;
    }
    // The waiters of the image before exec died with it: the engine may give them out again.
    ipc::ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ipc::ControlType::kReleaseWaiters);
    msg.version = ipc::kLayoutVersion;
    ipc::send_control(from.control_fd, msg, nullptr, 0);
    g_state.store(kActive, std::memory_order_release);
    return 0;
}

}  // namespace tcps::shim
