// The client's side of the channel: the engine session (control socket, region, doorbell),
// the client-private state of each offloaded socket, control requests, and how a thread waits.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>

#include <atomic>
#include <cstdint>

#include "common.hpp"
#include "fd_table.hpp"
#include "layout.hpp"
#include "memnet_hooks.h"
#include "readiness.hpp"

// The shim's thread-local state: initial-exec, so that an access is a load from the thread
// pointer, never a call into the dynamic linker (which may allocate or lock).
#define TCPS_TLS __attribute__((tls_model("initial-exec"))) thread_local

namespace tcps::shim {

// ---------------------------------------------------------------------------------------------
// Process-wide state

// Every fd the shim knows about. Empty (size 0) until the library constructor ran: every
// lookup misses and every call goes straight to libc.
extern FdTable g_fds;

// Spin before sleeping (TCPS_SPIN_US, default 20 µs): the most a thread spins.
extern uint64_t g_spin_ns;

// How long this thread spins before it sleeps now. It starts at g_spin_ns and learns from the
// waits that had to sleep: one that lasted well past a full spin (a server waiting for its next
// connection) halves it, since spinning only burnt the core; one that a full spin would have
// covered doubles it again. Measured: nginx under connection-per-request load spent a third of
// its CPU spinning in epoll_wait with a fixed 20 µs.
uint64_t spin_budget_ns();
// After a wait that slept: `waited_ns` from its start to its end.
void spin_learn(uint64_t waited_ns);
// Calls spin_learn() when the sleeping part of a wait that began at `start` ends, however.
struct SpinLearner {
    uint64_t start;
    ~SpinLearner() { spin_learn(now_ns() - start); }
};

// Library constructor work; idempotent. False: the shim stays inert.
bool shim_init();

// ---------------------------------------------------------------------------------------------
// Client-private state of one offloaded socket, indexed by its slot (client or engine range).

enum ConnectState : int { kUnconnected = 0, kConnecting = 1, kConnected = 2 };

// The setsockopt() calls the engine accepted for a socket, in order, kept so that a listener
// can be made again in the kernel after the engine's end (recover_listener()). Small values
// only (ints, linger, timevals, names up to 16 bytes); calls past the last entry are not kept.
// Lock-free (a handler may set an option): an entry is claimed, written, then marked ready.
struct OptionLog {
    static constexpr uint32_t kEntries = 12;
    static constexpr uint32_t kValueMax = 16;
    struct Entry {
        std::atomic<bool> ready{false};
        int level = 0;
        int name = 0;
        uint32_t len = 0;
        uint8_t value[kValueMax] = {};
    };
    std::atomic<uint32_t> claimed{0};
    Entry entries[kEntries];

    void clear();
    void add(int level, int name, const void *value, uint32_t len);
};

struct Socket {
    std::atomic<uint32_t> refs{0};        // fd numbers that refer to it (dup)
    std::atomic<uint32_t> generation{0};  // bumped each time the slot becomes ours
    // The generation that went back to the kernel (handoff.cpp), under the same fd numbers: a
    // call in flight on it when it went goes on as the kernel's call. And while that happens
    // (the numbers being replaced), a close() of one of them waits, so that it closes the
    // kernel socket rather than a number that the replacement would then take again.
    std::atomic<uint32_t> kernel_gen{UINT32_MAX};
    std::atomic<bool> handing_back{false};
    int domain = 0;
    // O_NONBLOCK belongs to the open file description, which dup'ed fds share: so here.
    std::atomic<bool> nonblocking{false};
    std::atomic<int> file_flags{0};  // O_APPEND/O_ASYNC as set with F_SETFL
    std::atomic<bool> listening{false};
    std::atomic<bool> linger_reset{false};  // SO_LINGER {1, 0}: close() resets
    std::atomic<bool> shut_rd{false};
    std::atomic<bool> shut_wr{false};
    std::atomic<bool> disconnected{false};  // a failed connect was reported (see readiness)
    // A listener's accept() has reported the engine's end (ECONNABORTED): it is quiet since.
    std::atomic<bool> end_reported{false};
    std::atomic<int> connect_state{kUnconnected};
    // SO_RCVTIMEO/SO_SNDTIMEO: 0 blocks forever, > 0 a limit, < 0 never waits (Linux stores a
    // negative timeval as a zero timeout).
    std::atomic<int64_t> rcv_timeout_ns{0};
    std::atomic<int64_t> snd_timeout_ns{0};
    // SO_RCVLOWAT as the engine's socket holds it (>= 1): recv and readiness honour it.
    std::atomic<int> rcvlowat{1};
    std::atomic<uint32_t> consumed_error_gen{0};
    // An error a recvmmsg() met after its first message, for the next call (Linux's sk_err).
    std::atomic<int> deferred_error{0};
    // Locks shared with every process that holds the socket (bound to its slot's words).
    SocketLock rx_lock;                    // recv and accept
    SocketLock tx_lock;                    // send
    SocketLock request_lock;               // one control request at a time
    std::atomic<bool> tx_sleeping{false};  // the tx lock holder waits for ring space
    // A listener's backlog and the options set on it, to make it again in the kernel if the
    // engine goes (recover_listener()), which this process tries once by itself.
    std::atomic<int> backlog{0};
    OptionLog options;
    std::atomic<bool> remake_tried{false};
    // A listener's twin (ipc::kFlagTwinReady), as this process holds it: an internal
    // descriptor, asked for the first time accept() finds the flag, closed with the socket.
    std::atomic<int> twin_fd{-1};
    // MemNet (memnet_shim.cpp): the ticket of each entry of the slot's direct queue that this
    // process queued, so that whoever reuses the entry gives its result to that ticket first.
    // Under tx_lock.
    tcps_memnet_ticket *direct_tickets[ipc::kDirectQueueEntries] = {};
    // The queue position up to which this process has taken the ring bytes the engine
    // promised its receives (ipc::kDirectUseRxRing + n), in queue order. Under tx_lock.
    uint32_t ring_taken = 0;

    // Fresh state for a socket that just became ours.
    void open(int family, bool nonblock, uint32_t gen);
};

// The client state of a socket whose chunk this process has mapped (map_slot).
Socket &socket_state(uint32_t slot);
// Maps the chunk of `slot` (a slot index the engine gave us) if this process has not yet.
// False if it cannot be mapped (then the slot must not be used).
bool map_slot(uint32_t slot);
// Maps chunk `k`'s bulk rings (ipc::RegionView::bulk) if this process has not yet: when one of
// its rings first grows. False if they cannot be (a relay session; no address space left).
bool map_bulk(uint32_t k);

// What an interposed call needs to act on an offloaded fd.
struct SocketRef {
    int fd = -1;
    uint32_t slot = 0;
    uint32_t generation = 0;
    Socket *sock = nullptr;
    ipc::SocketSlot *shm = nullptr;
};

// The offloaded socket behind `fd`, or false if the fd is not one of ours.
bool find_socket(int fd, SocketRef &out);
// The socket was closed (and its slot perhaps reused) since `ref` was taken.
inline bool stale(const SocketRef &ref) {
    return ref.sock->generation.load(std::memory_order_acquire) != ref.generation;
}

// ---------------------------------------------------------------------------------------------
// Session

// True when an engine session is up and alive; on the first call that asks (`create`), tries
// to set one up (retried at most once a second after a failure). False: use the kernel, and
// also when this thread is itself inside that setup (a signal handler interrupted it).
bool session_usable(bool create);

// This thread is inside the session's setup, a change of holds, a control request or the
// mapping of a chunk, under a mutex that a signal handler interrupting it must not wait for: a
// socket() there stays in the kernel.
bool shim_locked_here();

// The session is up but the engine is gone: offloaded sockets fail, new ones use the kernel.
bool session_dead();
void mark_session_dead();

const ipc::RegionView &region();

// A new socket from the engine, created as this process would create it (its uid, gid and
// network namespace), in a slot the engine picks (mapped here). The slot, or -errno: ENFILE
// or ENOBUFS when our uid has used its share of the engine, EMFILE when the family has all
// its slots, ECONNRESET when the engine is gone.
int new_socket(int family);

// Whether this session's client claims socket() slots itself (a relay session's).
bool claims_slots();
// Client slots: claims one whose state is kFree (SocketSlot::claim). -1 if none.
int claim_client_slot();
// Gives back a claimed slot whose kSocket failed (still kFree).
void release_client_slot(uint32_t slot);

// This process starts holding the socket in `slot` (its first fd for it): counted in the
// slot's holders and marked in this member's record, so the engine drops the hold if we die.
void hold_socket(uint32_t slot);
// Whether this process holds the slot (its mark is set).
bool holds_socket(uint32_t slot);
// This process's last fd for it is gone. True when no process of the family holds it any
// more: the caller closes it (kClose).
bool unhold_socket(uint32_t slot);

// After publishing work on `slot`: queue it for the engine and kick the engine if it sleeps.
void notify_engine(uint32_t slot);

// Sends a control request for `slot` and waits for its response (uninterruptible, like the
// kernel's own work inside a syscall). Returns the engine's result, or -ECONNRESET if the
// engine is gone. `response`, if given, receives a copy of the response.
int request(uint32_t slot, const ipc::Request &req, ipc::Response *response = nullptr);

// kClose without waiting for the response.
void request_close(uint32_t slot, bool reset);

// MemNet registrations (control messages): 0 and the id, or -errno.
int register_mem_with_engine(int memfd, uint64_t length, uint32_t &id);
int deregister_mem_with_engine(uint32_t id);

// ---------------------------------------------------------------------------------------------
// Error and readiness helpers

// The pending error of a socket, reported once per generation (as Linux's sock_error()), or
// one a recvmmsg() deferred (Socket::deferred_error) first. Returns the positive errno and
// consumes it, or 0.
int take_error(SocketRef &ref);
// Whether take_error() would return one; reset_pending(): the engine's (the connection died).
bool error_pending(const SocketRef &ref);
bool reset_pending(const SocketRef &ref);

SocketSnapshot snapshot(const SocketRef &ref);

// The application showed interest in the socket's urgent data (POLLPRI, recv(MSG_OOB),
// SIOCATMARK, SO_OOBINLINE): the engine watches for it from now on (kPostedUrgentWatch).
void want_urgent(const SocketRef &ref);
inline uint32_t current_mask(const SocketRef &ref) {
    return poll_mask(snapshot(ref));
}

// ---------------------------------------------------------------------------------------------
// Waiting: spin, then sleep on this thread's waiter pipe.

enum class WaitResult { kReady, kTimeout, kInterrupted, kDead };
enum class BlockResult { kWoken, kTimeout, kInterrupted, kDead };

// Which interruptions end a wait: those that end the kernel's own wait in the same call.
enum class Interrupt {
    // None: the shim's own work inside a call (a control request), as the kernel's is.
    kNever,
    // -ERESTARTSYS: a handler installed without SA_RESTART ends it (EINTR); a handler with
    // SA_RESTART, or a stop followed by SIGCONT, restarts it unseen. The wait blocks in read()
    // of the waiter pipe, so the kernel applies the rule itself.
    kUnlessRestart,
    // -EINTR: every handler, and a stop followed by SIGCONT even with no handler, end it. The
    // wait blocks in epoll_wait(), which the kernel never restarts after either.
    kAlways,
};

// The rule for a blocking socket call (sk_wait_data(), sk_stream_wait_memory(),
// inet_csk_wait_for_connect(), inet_wait_for_connect()): sock_intr_errno() restarts only a
// wait without a timeout (SO_RCVTIMEO/SO_SNDTIMEO), and a call that has already moved bytes
// returns their count whatever interrupted it, a stop included (signal_pending() is true for
// SIGSTOP too). Measured natively: tests/semantics check_interrupted_send and
// check_stop_and_continue.
inline Interrupt socket_wait_interrupt(int64_t timeout_ns, bool moved_bytes) {
    return timeout_ns > 0 || moved_bytes ? Interrupt::kAlways : Interrupt::kUnlessRestart;
}

// Arms this thread's waiter for `slot` (or ipc::kWaitAnySlot). False when no waiter can be
// had (nested use from a signal handler, none left, registration failed): the caller naps.
bool waiter_arm(uint32_t slot);
// The armed waiter's pipe (read end), for callers that poll it together with other fds.
int waiter_fd();
// Sleeps until the engine signals, the deadline passes (0: none) or `how` says an interruption
// ends the sleep (kInterrupted; kNever sleeps like kUnlessRestart and leaves the retry to the
// caller).
BlockResult waiter_block(uint64_t deadline_ns, Interrupt how);
// Back to idle; consumes the engine's byte if it signalled. Must follow every waiter_arm().
void waiter_disarm();
// A short sleep for when no waiter is available.
void nap(uint64_t deadline_ns);
// For epoll_wait(): an epoll instance of this thread's armed waiter holding its pipe (event
// data 0), the application's epoll `epfd` (1) and `wake_fd` (2), kept while `key` names the
// same registry. -1 if none can be had (the caller sleeps in ppoll()).
int waiter_epoll_with(int epfd, int wake_fd, uint64_t key);
// epoll_pwait2() until `deadline_ns` (0: none), or where the kernel lacks it epoll_pwait()
// with the time left rounded up to whole ms. The result and errno are the kernel's.
int epoll_sleep_until(int ep, epoll_event *events, int max, uint64_t deadline_ns,
                      const sigset_t *sigmask);

// Waits until `ready()` (re-checked after every wake-up), the timeout (ns; < 0 none, 0 do not
// wait), an interruption that `how` counts, or the engine's death. When an interruption and
// `ready()` come together, `ready()` wins (a wait for data, a connection or a handshake looks
// at it first), unless `interrupt_first`: sk_stream_wait_memory() looks at signal_pending()
// before the room, so a send returns what it queued even if room has just appeared.
//
// An interruption is seen only while the thread sleeps in the kernel: a handler that runs, or
// a stop that happens, while it spins (TCPS_SPIN_US) or arms its waiter is over before the
// sleep begins, and the wait goes on. Linux would notice one that arrives after its call
// began; closing that window would cost every wait a sigprocmask() pair.
template <class Ready>
WaitResult wait_until(uint32_t slot, Ready &&ready, int64_t timeout_ns, Interrupt how,
                      bool interrupt_first = false) {
    if (ready()) return WaitResult::kReady;
    if (session_dead()) return WaitResult::kDead;
    if (timeout_ns == 0) return WaitResult::kTimeout;
    const uint64_t start = now_ns();
    const uint64_t deadline = timeout_ns > 0 ? start + static_cast<uint64_t>(timeout_ns) : 0;
    const uint64_t spin_end = start + spin_budget_ns();
    for (unsigned i = 1;; ++i) {
        cpu_relax();
        if (ready()) return WaitResult::kReady;
        if ((i & 15) == 0 && now_ns() >= spin_end) break;
    }
    const SpinLearner learn{start};
    for (;;) {
        if (!waiter_arm(slot)) {
            nap(deadline);
            if (ready()) return WaitResult::kReady;
            if (session_dead()) return WaitResult::kDead;
            if (deadline != 0 && now_ns() >= deadline) return WaitResult::kTimeout;
            continue;
        }
        // Armed before this re-check: a change after it finds us armed and signals.
        if (ready()) {
            waiter_disarm();
            return WaitResult::kReady;
        }
        if (session_dead()) {
            waiter_disarm();
            return WaitResult::kDead;
        }
        const BlockResult blocked = waiter_block(deadline, how);
        waiter_disarm();
        const bool interrupted = blocked == BlockResult::kInterrupted && how != Interrupt::kNever;
        if (interrupted && interrupt_first) return WaitResult::kInterrupted;
        if (ready()) return WaitResult::kReady;
        if (blocked == BlockResult::kDead || session_dead()) return WaitResult::kDead;
        if (blocked == BlockResult::kTimeout) return WaitResult::kTimeout;
        if (interrupted) return WaitResult::kInterrupted;
    }
}

// ---------------------------------------------------------------------------------------------
// The shim's own descriptors

// Moves `fd` to a high number (close-on-exec) so it rarely collides with the application's,
// and marks it internal. Returns the new fd (or `fd` itself if no high number is free).
int move_high_internal(int fd);
// The application is about to dup2() onto one of our descriptors: move ours out of the way.
void relocate_internal(int fd);
// A listener's twin has connections waiting (ipc::kFlagTwinReady) that no client has found
// gone since; report_twin_drained(): this client found it empty (tells the engine once).
bool twin_ready(const SocketRef &ref);
void report_twin_drained(const SocketRef &ref);
// Closes the internal descriptor `holder` has, if any, and leaves it -1.
void close_internal(std::atomic<int> &holder);

// SCM_RIGHTS: asks the engine for its kernel socket behind `slot`, once it has stopped
// receiving and sent what the tx ring holds. 0 with `out.kernel_fd` set, or -errno. `how`:
// ipc::kHandoffPark bits. With kHandoffPark, the bytes the engine received and the application
// never read wait in the engine for the socket's next owner (`parked_bytes`); `lost_*` is what
// is gone with the hand-back. With kHandoffShed, only if the engine asked (ipc::kFlagShed) and
// nothing can be lost; else -EAGAIN.
struct Handoff {
    int kernel_fd = -1;
    uint32_t lost_bytes = 0;
    uint32_t lost_connections = 0;
    uint64_t parked_bytes = 0;
};
int request_handoff(uint32_t slot, uint32_t how, Handoff &out);

// Offers the kernel TCP socket `kernel_fd` to the engine (kAdoptSocket; the engine keeps a
// descriptor of its own). The slot that now serves it (mapped here), with `parked` bytes that
// were waiting for it queued first, or -errno: the socket stays ours, untouched.
// `on_demand`: a listener inherited from outside the shim (ipc::kAdoptOnDemand).
int adopt_with_engine(int kernel_fd, uint64_t &parked, bool on_demand = false);

// exec: what the new image needs to carry on as the same member of the same session.
struct ExecHandover {
    int control_fd = -1;
    int doorbell_fd = -1;
    int memfd = -1;
    uint32_t session_id = 0;
    uint32_t member = 0;
};
// Ours now, or false (no live session, or we are a vfork()ed child).
bool exec_handover(ExecHandover &out);
// In a vfork()ed child about to exec: reserves a member of our session for the new image,
// gives it a hold on each of `slots` and joins it on a connection of its own, touching
// nothing of the parent's but the shared locks. The handover names that connection.
bool vfork_handover(const uint32_t *slots, size_t count, ExecHandover &out);
// In the new image: maps the region and resumes the session. 0 or -errno.
int adopt_session(const ExecHandover &from);

// exec.cpp: in a vfork()ed child, `fd` now names `ref` (empty: not a socket of ours), in the
// child's own descriptor table only; and what `fd` names there.
void vfork_note(int fd, FdRef ref);
FdRef vfork_entry(int fd);

// After the engine's end, which process of the family makes listener `slot` again in the
// kernel: the oldest one still alive among the members that held it when the engine went (the
// region, which outlives the engine, names them and what they hold). A daemonized master
// rather than its workers, a parent rather than a child running a CGI program.
bool remakes_listener(uint32_t slot);

// handoff.cpp: after the engine's end, every listener for which remakes_listener() names this
// process is made again in the kernel under its descriptor numbers (recover_listener()).
void recover_listeners();

// exec.cpp: at start-up, takes over the session and sockets an exec handed to this image.
void adopt_inherited_sockets();

// pthread_atfork handlers: the parent reserves a member record for the child and gives it its
// holds; the child joins the session on a connection of its own and keeps every socket.
void before_fork();
void after_fork_in_parent();
void after_fork_in_child();
// Its epoll part (epoll.cpp): the registries' locks and wake-up descriptors.
void epoll_after_fork();

}  // namespace tcps::shim
