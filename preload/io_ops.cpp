// The data path: send and receive through the socket's rings, no syscall while the engine is
// awake and the ring has room/data.
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <new>

#include "libc.hpp"
#include "ops.hpp"
#include "ring.hpp"

namespace tcps::shim {

// A call's hold on its socket (see CallHold below); interpose.cpp takes it around accept and
// connect. False if the socket is gone.

namespace {

// A position inside the caller's iovec array, so one call can copy in several pieces.
struct IovCursor {
    const iovec *iov;
    int count;
    int index = 0;
    size_t offset = 0;
    size_t remaining = 0;
};

// Validates an iovec array as readv/writev do and returns its total length, or -errno.
long iov_total(const iovec *iov, int iovcnt, size_t &total) {
    total = 0;
    if (iovcnt < 0 || iovcnt > IOV_MAX) return -EINVAL;
    if (iovcnt > 0 && !iov) return -EFAULT;
    for (int i = 0; i < iovcnt; ++i) {
        if (iov[i].iov_len > static_cast<size_t>(SSIZE_MAX) - total) return -EINVAL;
        total += iov[i].iov_len;
    }
    return 0;
}

void copy_into_ring(IovCursor &c, uint8_t *ring, uint32_t ring_bytes, uint32_t pos, size_t n) {
    while (n > 0) {
        const iovec &v = c.iov[c.index];
        const size_t chunk = std::min(n, v.iov_len - c.offset);
        if (chunk > 0) {
            ipc::ring_copy_in(ring, ring_bytes, pos,
                              static_cast<const uint8_t *>(v.iov_base) + c.offset, chunk);
            pos += static_cast<uint32_t>(chunk);
            n -= chunk;
            c.offset += chunk;
            c.remaining -= chunk;
        }
        if (c.offset == v.iov_len) {
            ++c.index;
            c.offset = 0;
        }
    }
}

// `discard`: MSG_TRUNC on TCP drops the bytes without copying them.
void copy_from_ring(IovCursor &c, const uint8_t *ring, uint32_t ring_bytes, uint32_t pos, size_t n,
                    bool discard) {
    if (discard) {
        c.remaining -= n;
        return;
    }
    while (n > 0) {
        const iovec &v = c.iov[c.index];
        const size_t chunk = std::min(n, v.iov_len - c.offset);
        if (chunk > 0) {
            ipc::ring_copy_out(ring, ring_bytes, pos, static_cast<uint8_t *>(v.iov_base) + c.offset,
                               chunk);
            pos += static_cast<uint32_t>(chunk);
            n -= chunk;
            c.offset += chunk;
            c.remaining -= chunk;
        }
        if (c.offset == v.iov_len) {
            ++c.index;
            c.offset = 0;
        }
    }
}

// What the rx ring holds for the client from `head`, and where. The size is loaded after
// rx_tail: the engine stores a new one (release, after moving the unread bytes into the bigger
// ring) before any rx_tail past the bytes it held.
// A null `ring`: the ring grew and this process cannot map its bulk rings (no address space).
struct RxRing {
    const uint8_t *ring;
    uint32_t bytes;
    uint32_t available;
};
RxRing rx_ring_at(const SocketRef &ref, uint32_t head) {
    const uint32_t tail = ref.shm->rx_tail.load(std::memory_order_acquire);
    const uint32_t bytes = ipc::ring_bytes(ref.shm->rx_ring_bytes.load(std::memory_order_acquire));
    if (bytes > ipc::kRingBytes && !map_bulk(ref.slot >> ipc::kChunkShift)) return {nullptr, 0, 0};
    return {region().rx_ring(ref.slot, bytes), bytes, std::min(tail - head, bytes)};
}

// Engine flags as this client must read them: once Linux would have disconnected the socket
// (see SocketSnapshot::disconnected), the earlier Reset/EOF/shutdown flags no longer count.
uint32_t effective_flags(const SocketRef &ref) {
    uint32_t flags = ref.shm->flags.load(std::memory_order_acquire);
    if (ref.sock->disconnected.load(std::memory_order_relaxed))
        flags &= ~(ipc::kFlagReset | ipc::kFlagRxEof | ipc::kFlagRxShut | ipc::kFlagTxShut);
    return flags;
}

bool connecting(const SocketRef &ref, uint32_t flags) {
    return !(flags & (ipc::kFlagConnected | ipc::kFlagReset)) &&
           ((flags & ipc::kFlagConnecting) ||
            ref.sock->connect_state.load(std::memory_order_relaxed) == kConnecting);
}

// RAII for the tx lock with the "holder sleeps" hint non-blocking senders look at.
class TxSleeping {
  public:
    explicit TxSleeping(Socket &sock) : sock_(sock) { sock_.tx_sleeping.store(true); }
    ~TxSleeping() { sock_.tx_sleeping.store(false); }
    TxSleeping(const TxSleeping &) = delete;
    TxSleeping &operator=(const TxSleeping &) = delete;

  private:
    Socket &sock_;
};

// A call that sleeps on a socket holds it, as the kernel's fdget() holds the file for the whole
// call: close() of the fd in another thread then neither ends the call nor closes the socket;
// the socket goes when the call returns. Taken at the first wait only, so the calls that never
// sleep pay nothing.
class CallHold {
  public:
    explicit CallHold(const SocketRef &ref) : ref_(ref) {}
    ~CallHold() {
        if (held_) socket_unhold(ref_);
    }
    CallHold(const CallHold &) = delete;
    CallHold &operator=(const CallHold &) = delete;

    // False if the socket is already gone (its last fd was closed under us).
    bool acquire() {
        if (!held_) held_ = socket_hold(ref_);
        return held_;
    }

  private:
    const SocketRef &ref_;
    bool held_ = false;
};

}  // namespace

bool socket_hold(const SocketRef &ref) {
    std::atomic<uint32_t> &refs = ref.sock->refs;
    uint32_t n = refs.load(std::memory_order_acquire);
    do {
        if (n == 0) return false;  // released, or on its way
    } while (!refs.compare_exchange_weak(n, n + 1, std::memory_order_acq_rel));
    if (!stale(ref)) return true;
    // The slot went to a new socket between our look and our increment: give that socket its
    // count back (a close of it in these two instructions would be missed, the same window
    // socket_ops.cpp's close bookkeeping has).
    refs.fetch_sub(1, std::memory_order_acq_rel);
    return false;
}

void socket_unhold(const SocketRef &ref) {
    // A socket taken away under the call (handed back to the kernel, say) is not ours to close.
    if (stale(ref)) return;
    if (ref.sock->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) socket_release(ref.slot);
}

namespace {

// Doubles the tx ring when a send finds it full and the engine has sent a whole ring since the
// last doubling (or since the start): a stream whose peer reads, for which Linux would grow the
// send buffer (docs/architecture.md, "Rings that grow"). Under the tx lock. The queued bytes are
// copied to their places in the bigger ring (ipc::ring_regrow), which the engine uses once it sees
// a tail past them; a send it has in flight reads them where they were.
bool grow_tx(const SocketRef &ref, uint32_t ring_bytes) {
    ipc::SocketSlot &shm = *ref.shm;
    const uint32_t head = shm.tx_head.load(std::memory_order_acquire);
    const uint32_t tail = shm.tx_tail.load(std::memory_order_relaxed);
    // Full at its whole size: so past the last doubling's limit, whose readers of an older size
    // a second doubling could no longer spare (ipc::ring_room).
    if (tail - head < ring_bytes) return false;
    const bool streaming =
        head - shm.tx_head_at_growth.load(std::memory_order_relaxed) >= ring_bytes;
    if (!streaming || ring_bytes >= region().header().ring_max_bytes ||
        !map_bulk(ref.slot >> ipc::kChunkShift))
        return false;
    const uint32_t bigger = ring_bytes * 2;
    ipc::ring_regrow(region().tx_ring(ref.slot, ring_bytes), ring_bytes,
                     region().tx_ring(ref.slot, bigger), bigger, head, tail);
    // Moving out of the small rings needs no care: nobody writes there again.
    shm.tx_ring_before.store(ring_bytes > ipc::kRingBytes ? ring_bytes : 0,
                             std::memory_order_relaxed);
    shm.tx_grown_at.store(tail, std::memory_order_relaxed);
    shm.tx_head_at_growth.store(head, std::memory_order_relaxed);
    // Before the next tx_tail (release), which the engine loads first.
    shm.tx_ring_bytes.store(bigger, std::memory_order_relaxed);
    return true;
}

// The send loop of send() and sendfile(). `fill(ring, ring_bytes, pos, n)` puts up to n bytes
// of the caller's source into the tx ring (of ring_bytes) at free-running index pos and returns
// how many it put (fewer only at the end of the source), or -errno.
template <class Fill>
long send_stream(SocketRef &ref, size_t total, int flags, Fill &&fill) {
    Socket &sock = *ref.sock;
    ipc::SocketSlot &shm = *ref.shm;
    const bool nonblock =
        sock.nonblocking.load(std::memory_order_relaxed) || (flags & MSG_DONTWAIT);
    const int64_t timeout = effective_timeout(sock, nonblock, false);
    CallHold hold(ref);

    if (!sock.tx_lock.try_lock()) {
        // The holder waits for room: there is none for us either.
        if (nonblock && sock.tx_sleeping.load()) return -EAGAIN;
        sock.tx_lock.lock();
    }
    size_t remaining = total;
    size_t sent = 0;
    long result = 0;
    bool sigpipe = false;
    // send(MSG_OOB): the last byte this call queues is the urgent one. The engine may look at
    // the slot at any moment (a doorbell of an earlier send still queued), so the bytes that
    // end the call are published with urgent_tail stored first: the engine reads tx_tail, then
    // urgent_tail, and never sees the urgent byte queued without its mark (it would send it as
    // ordinary data, inline).
    const bool urgent = flags & MSG_OOB;
    bool marked = false;
    for (;;) {
        if (stale(ref)) {
            result = sent ? static_cast<long>(sent) : -EBADF;
            break;
        }
        const uint32_t state = effective_flags(ref);
        bool broken = session_dead() || error_pending(ref) ||
                      (state & (ipc::kFlagReset | ipc::kFlagTxShut)) || sock.shut_wr.load() ||
                      sock.listening.load();
        if (!broken && !(state & ipc::kFlagConnected)) {
            if (!connecting(ref, state)) {
                broken = true;  // never connected: Linux says EPIPE
            } else {
                // sk_stream_wait_connect(): wait for the handshake.
                if (timeout == 0) {
                    result = sent ? static_cast<long>(sent) : -EAGAIN;
                    break;
                }
                if (!hold.acquire()) {
                    result = -EBADF;
                    break;
                }
                auto settled = [&] {
                    return (effective_flags(ref) & (ipc::kFlagConnected | ipc::kFlagReset)) ||
                           error_pending(ref) || session_dead() || stale(ref);
                };
                const WaitResult waited = wait_until(ref.slot, settled, timeout,
                                                     socket_wait_interrupt(timeout, sent > 0));
                if (waited == WaitResult::kTimeout || waited == WaitResult::kInterrupted) {
                    result = waited == WaitResult::kTimeout ? -EAGAIN : -EINTR;
                    break;
                }
                continue;
            }
        }
        if (broken) {
            if (sent) {
                result = static_cast<long>(sent);
                break;
            }
            // sk_stream_error(): a pending error first, else EPIPE with its SIGPIPE.
            const int pending = session_dead() ? 0 : take_error(ref);
            const int error = pending ? pending : EPIPE;
            sigpipe = error == EPIPE && !(flags & MSG_NOSIGNAL);
            result = -error;
            break;
        }
        if (remaining == 0) {
            result = static_cast<long>(sent);
            break;
        }
        const uint32_t tail = shm.tx_tail.load(std::memory_order_relaxed);
        uint32_t ring_bytes;
        uint32_t space = ipc::tx_ring_room(shm, ring_bytes);
        if (space == 0 && grow_tx(ref, ring_bytes)) space = ipc::tx_ring_room(shm, ring_bytes);
        if (space > 0) {
            // Forget the last doubling once the engine is past it, before the free-running
            // indices could wrap onto it.
            if (shm.tx_ring_before.load(std::memory_order_relaxed) != 0 &&
                static_cast<int32_t>(shm.tx_head.load(std::memory_order_relaxed) -
                                     shm.tx_grown_at.load(std::memory_order_relaxed)) >= 0)
                shm.tx_ring_before.store(0, std::memory_order_relaxed);
            const size_t want = std::min<size_t>(space, remaining);
            const long put = fill(region().tx_ring(ref.slot, ring_bytes), ring_bytes, tail, want);
            if (put < 0) {
                result = sent ? static_cast<long>(sent) : put;
                break;
            }
            if (put > 0) {
                const uint32_t new_tail = tail + static_cast<uint32_t>(put);
                if (urgent &&
                    (static_cast<size_t>(put) == remaining || static_cast<size_t>(put) < want)) {
                    shm.urgent_tail.store(new_tail, std::memory_order_release);
                    marked = true;
                }
                shm.tx_tail.store(new_tail, std::memory_order_release);
                if (!urgent) notify_engine(ref.slot);
                sent += static_cast<size_t>(put);
                remaining -= static_cast<size_t>(put);
            }
            if (static_cast<size_t>(put) < want) {  // the source ended early
                result = static_cast<long>(sent);
                break;
            }
            continue;
        }
        if (timeout == 0) {
            result = sent ? static_cast<long>(sent) : -EAGAIN;
            break;
        }
        if (!hold.acquire()) {
            result = sent ? static_cast<long>(sent) : -EBADF;
            break;
        }
        if (urgent) notify_engine(ref.slot);  // room comes from the engine's sending
        auto room = [&] {
            uint32_t ring_bytes;
            return ipc::tx_ring_room(shm, ring_bytes) > 0 ||
                   (shm.flags.load(std::memory_order_acquire) &
                    (ipc::kFlagReset | ipc::kFlagTxShut)) ||
                   error_pending(ref) || session_dead() || stale(ref);
        };
        WaitResult waited;
        {
            TxSleeping sleeping(sock);
            // Bytes already queued make any interruption end the call with their count: a
            // handler with SA_RESTART, a stop and SIGCONT, even with room just made, as
            // sk_stream_wait_memory() does.
            waited =
                wait_until(ref.slot, room, timeout, socket_wait_interrupt(timeout, sent > 0), true);
        }
        if (waited == WaitResult::kTimeout || waited == WaitResult::kInterrupted) {
            result = sent ? static_cast<long>(sent)
                          : (waited == WaitResult::kTimeout ? -EAGAIN : -EINTR);
            break;
        }
    }
    if (urgent && sent > 0 && !stale(ref)) {
        // Cut short after bytes went out while it waited for room (a timeout, a signal, an
        // error): the last byte queued is the urgent one, as tcp_push() marks it.
        if (!marked)
            shm.urgent_tail.store(shm.tx_tail.load(std::memory_order_relaxed),
                                  std::memory_order_release);
        notify_engine(ref.slot);
    }
    sock.tx_lock.unlock();
    // As the kernel does (send_sig() in sk_stream_error()); after unlocking, so that a
    // handler that writes to this socket does not wait for ourselves.
    if (sigpipe) raise(SIGPIPE);
    return result;
}

}  // namespace

long op_send(SocketRef &ref, const iovec *iov, int iovcnt, int flags) {
    size_t total;
    if (const long rc = iov_total(iov, iovcnt, total); rc != 0) return rc;
    // MSG_MORE asks Linux to hold a partial segment back (up to ~200 ms) for more data; here the
    // bytes go to the engine at once, which sends what the ring holds: the same bytes in the
    // same order, possibly in more segments. TCP_CORK reaches the engine's socket and corks there.
    IovCursor cursor{iov, iovcnt, 0, 0, total};
    return send_stream(ref, total, flags,
                       [&](uint8_t *ring, uint32_t ring_bytes, uint32_t pos, size_t n) -> long {
                           copy_into_ring(cursor, ring, ring_bytes, pos, n);
                           return static_cast<long>(n);
                       });
}

namespace {

// recv(MSG_OOB): the urgent byte is the engine's kernel socket's to give (it is never in the
// rx ring unless SO_OOBINLINE); Linux never waits for it.
long recv_urgent(SocketRef &ref, const iovec *iov, int iovcnt, size_t total, int flags) {
    want_urgent(ref);
    ipc::Request req{};
    req.op = static_cast<uint32_t>(ipc::Op::kRecvOob);
    req.arg0 = flags & (MSG_PEEK | MSG_TRUNC);
    req.arg1 = total > 0 ? 1 : 0;
    ipc::Response response;
    const int rc = request(ref.slot, req, &response);
    if (rc == 1 && !(flags & MSG_TRUNC) && response.opt_len == 1) {
        for (int k = 0; k < iovcnt; ++k) {
            if (iov[k].iov_len == 0) continue;
            std::memcpy(iov[k].iov_base, response.opt, 1);
            break;
        }
    }
    return rc;
}

}  // namespace

bool direct_bytes_wait(const ipc::SocketSlot &shm) {
    return (shm.flags.load(std::memory_order_acquire) & ipc::kFlagRxDirect) &&
           (shm.kernel_mask.load(std::memory_order_relaxed) & POLLIN);
}

long op_recv(SocketRef &ref, const iovec *iov, int iovcnt, int flags, bool answered_before) {
    size_t total;
    if (const long rc = iov_total(iov, iovcnt, total); rc != 0) return rc;
    Socket &sock = *ref.sock;
    ipc::SocketSlot &shm = *ref.shm;
    if (sock.listening.load()) return -ENOTCONN;
    if (flags & MSG_OOB) return recv_urgent(ref, iov, iovcnt, total, flags);
    const bool nonblock =
        sock.nonblocking.load(std::memory_order_relaxed) || (flags & MSG_DONTWAIT);
    const int64_t timeout = effective_timeout(sock, nonblock, true);
    const bool peek = flags & MSG_PEEK;
    const bool waitall = (flags & MSG_WAITALL) && !nonblock;
    const bool discard = flags & MSG_TRUNC;
    // sock_rcvlowat(): a blocking call returns once this many bytes are in (or EOF/error).
    const size_t target =
        waitall ? total
                : std::min<size_t>(
                      static_cast<size_t>(sock.rcvlowat.load(std::memory_order_relaxed)), total);

    IovCursor cursor{iov, iovcnt, 0, 0, total};
    size_t copied = 0;
    long result = 0;
    // A peek that finds receiving paused asks for more: the engine holds back whatever
    // follows a new connection's first bytes until we ring (engine/session.hpp, peeking).
    if (peek && (shm.flags.load(std::memory_order_acquire) & ipc::kFlagRxPaused))
        notify_engine(ref.slot);
    CallHold hold(ref);
    bool asked_ring = false;
    sock.rx_lock.lock();
    for (;;) {
        if (stale(ref)) {
            result = copied ? static_cast<long>(copied) : -EBADF;
            break;
        }
        const uint32_t head = shm.rx_head.load(std::memory_order_relaxed);
        const RxRing rx = rx_ring_at(ref, head);
        if (!rx.ring) {
            result = copied ? static_cast<long>(copied) : -ENOMEM;
            break;
        }
        const uint32_t available = rx.available;
        if (available > 0 && !peek) {
            const size_t n = std::min<size_t>(available, cursor.remaining);
            copy_from_ring(cursor, rx.ring, rx.bytes, head, n, discard);
            shm.rx_head.store(head + static_cast<uint32_t>(n), std::memory_order_release);
            // Our rx_head before our look at the flag; the engine pauses, then re-reads
            // rx_head (post_recv): one of us sees the other.
            std::atomic_thread_fence(std::memory_order_seq_cst);
            if (shm.flags.load(std::memory_order_relaxed) & ipc::kFlagRxPaused)
                notify_engine(ref.slot);
            copied += n;
            if (cursor.remaining == 0 || copied >= target) {
                result = static_cast<long>(copied);
                break;
            }
            continue;
        }
        // At the urgent mark the engine stopped at, with nothing before it left in the ring: a
        // read that has bytes ends there, as Linux's does; one that has none goes on past it,
        // and the engine takes what is there past it before it answers.
        if (available == 0 && (shm.flags.load(std::memory_order_acquire) & ipc::kFlagUrgentStop) &&
            shm.urgent_mark.load(std::memory_order_relaxed) == head) {
            if (copied > 0) {
                result = static_cast<long>(copied);
                break;
            }
            if (!peek) {
                ipc::Request past{};
                past.op = static_cast<uint32_t>(ipc::Op::kPastMark);
                if (request(ref.slot, past) == 0) continue;
            }
        }
        const uint32_t state = effective_flags(ref);
        const bool dead = session_dead();
        const bool pending = !dead && error_pending(ref);
        const bool eof = dead || (state & (ipc::kFlagRxEof | ipc::kFlagRxShut | ipc::kFlagReset)) ||
                         sock.shut_rd.load();
        if (peek && available > 0 && (available >= target || pending || eof || timeout == 0)) {
            const size_t n = std::min<size_t>(available, total);
            copy_from_ring(cursor, rx.ring, rx.bytes, head, n, discard);
            result = static_cast<long>(n);
            break;
        }
        if (copied > 0 && (pending || eof)) {
            result = static_cast<long>(copied);  // the error waits for the next call
            break;
        }
        // tcp_recvmsg() looks at SOCK_DONE (the peer's FIN) before sk_err: after a FIN, an RST's
        // error waits for the next send and recv keeps returning 0.
        if (pending && (state & ipc::kFlagRxEof)) {
            result = 0;
            break;
        }
        if (pending) {
            if (const int error = take_error(ref)) {
                result = -error;
                break;
            }
            continue;
        }
        if (dead) {
            result = -ECONNRESET;
            break;
        }
        if (eof) {
            result = 0;
            break;
        }
        if (!(state & ipc::kFlagConnected) && !connecting(ref, state)) {
            result = -ENOTCONN;
            break;
        }
        // The engine receives for MemNet only (kFlagRxDirect): what came since waits in its
        // kernel socket. The ring again, with those bytes in it, once per wait: another
        // thread's direct receives may take the socket back meanwhile.
        if (available == 0 && !asked_ring && (state & ipc::kFlagRxDirect)) {
            asked_ring = true;
            ipc::Request leave{};
            leave.op = static_cast<uint32_t>(ipc::Op::kLeaveDirect);
            if (request(ref.slot, leave) == 0) continue;
        }
        if (timeout == 0) {
            result = copied ? static_cast<long>(copied) : -EAGAIN;
            break;
        }
        if (!hold.acquire()) {
            result = copied ? static_cast<long>(copied) : -EBADF;
            break;
        }
        // Like sk_wait_data(): other threads may use the socket while we sleep.
        sock.rx_lock.unlock();
        const uint32_t seen = peek ? available : 0;
        auto ready = [&] {
            return shm.rx_tail.load(std::memory_order_acquire) -
                           shm.rx_head.load(std::memory_order_relaxed) >
                       seen ||
                   (!peek && (shm.flags.load(std::memory_order_acquire) & ipc::kFlagUrgentStop)) ||
                   direct_bytes_wait(shm) ||
                   (effective_flags(ref) &
                    (ipc::kFlagRxEof | ipc::kFlagRxShut | ipc::kFlagReset)) ||
                   sock.shut_rd.load() || error_pending(ref) || session_dead() || stale(ref);
        };
        // What was copied (or peeked) so far is the call's answer to any interruption.
        const WaitResult waited =
            wait_until(ref.slot, ready, timeout,
                       socket_wait_interrupt(timeout, copied + seen > 0 || answered_before));
        sock.rx_lock.lock();
        asked_ring = false;
        if (waited == WaitResult::kTimeout || waited == WaitResult::kInterrupted) {
            if (peek && !stale(ref)) {
                // What a peek short of its target saw still counts, as it does for Linux.
                const uint32_t now_head = shm.rx_head.load(std::memory_order_relaxed);
                const RxRing now = rx_ring_at(ref, now_head);
                copied = std::min<size_t>(now.available, total);
                copy_from_ring(cursor, now.ring, now.bytes, now_head, copied, discard);
            }
            result = copied ? static_cast<long>(copied)
                            : (waited == WaitResult::kTimeout ? -EAGAIN : -EINTR);
            break;
        }
    }
    sock.rx_lock.unlock();
    return result;
}

long op_sendfile(SocketRef &ref, int in_fd, off_t *offset, size_t count) {
    // do_sendfile()'s checks, in its order. An offloaded socket as the source is a socket to
    // Linux (no pread, not a regular file); the kernel would only see our placeholder.
    const FdKind source_kind = g_fds.get(in_fd).kind();
    if (source_kind == FdKind::kInternal) return -EBADF;  // not the application's
    const bool source_is_socket = source_kind == FdKind::kSocket;
    if (!source_is_socket) {
        const int fl = real(libc.fcntl)(in_fd, F_GETFL);
        if (fl < 0) return -errno;
        if ((fl & O_PATH) || (fl & O_ACCMODE) == O_WRONLY) return -EBADF;
    }
    struct stat st {};
    if (!source_is_socket && real(libc.fstat)(in_fd, &st) != 0) return -errno;
    const bool regular = !source_is_socket && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode));
    off_t start;
    if (offset) {
        // Only files with a position can be read at an offset (FMODE_PREAD).
        if (source_is_socket || S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) return -ESPIPE;
        start = *offset;
        if (start < 0) return -EINVAL;
    } else {
        start = regular ? lseek(in_fd, 0, SEEK_CUR) : 0;
        if (start < 0) return -errno;
    }
    if (ref.sock->file_flags.load() & O_APPEND) return -EINVAL;  // do_splice_direct()
    if (!regular) return -EINVAL;  // splice_direct_to_actor(): files and block devices only
    if (count == 0) return 0;
    constexpr size_t kMaxRwCount = INT_MAX & ~(size_t{4096} - 1);  // MAX_RW_COUNT
    count = std::min(count, kMaxRwCount);

    // The file's pages are read straight into the free part of the tx ring (at most two
    // pieces where it wraps), a ring's worth at a time: no bounce buffer.
    off_t pos = start;
    const long rc =
        send_stream(ref, count, 0,
                    [&](uint8_t *ring, uint32_t ring_bytes, uint32_t ring_pos, size_t n) -> long {
                        const uint32_t at = ring_pos & (ring_bytes - 1);
                        const size_t first = std::min<size_t>(n, ring_bytes - at);
                        iovec pieces[2] = {{ring + at, first}, {ring, n - first}};
                        ssize_t got;
                        do {
                            got = preadv(in_fd, pieces, n > first ? 2 : 1, pos);
                        } while (got < 0 && errno == EINTR);
                        if (got < 0) return -errno;
                        pos += got;
                        return got;
                    });
    // sendfile() moves *offset, or the file position when there is none, by what was sent.
    if (offset)
        *offset = pos;
    else if (pos != start)
        lseek(in_fd, pos, SEEK_SET);
    return rc;
}

long op_splice(SocketRef &ref, bool socket_is_input, int other_fd, bool other_offloaded,
               const loff_t *socket_offset, const loff_t *other_offset, size_t len,
               unsigned int flags) {
    // do_splice()'s checks, in its order: each side opened the right way, one side a pipe,
    // no offsets (a pipe's is ESPIPE, a socket's EINVAL).
    if (other_offloaded) return -EINVAL;  // two sockets: neither is a pipe
    if (g_fds.get(other_fd).kind() == FdKind::kInternal) return -EBADF;
    const int other_flags = real(libc.fcntl)(other_fd, F_GETFL);
    if (other_flags < 0) return -EBADF;
    if ((other_flags & O_PATH) ||
        (other_flags & O_ACCMODE) == (socket_is_input ? O_RDONLY : O_WRONLY))
        return -EBADF;
    struct stat st {};
    if (real(libc.fstat)(other_fd, &st) != 0) return -errno;
    if (!S_ISFIFO(st.st_mode)) return -EINVAL;
    if (other_offset) return -ESPIPE;   // the pipe's
    if (socket_offset) return -EINVAL;  // a socket cannot be read or written at an offset
    if (len == 0) return 0;
    // SPLICE_F_NONBLOCK is about the pipe only; the socket's own O_NONBLOCK is about the socket.
    const bool pipe_nonblock = flags & SPLICE_F_NONBLOCK;
    if (!socket_is_input) {
        // Pipe to socket: the pipe is read straight into the tx ring's free space, so nothing
        // taken from it can be left over. An empty pipe waits for a writer's bytes, unless the
        // call moved some already or SPLICE_F_NONBLOCK (EAGAIN), or no writer is left (0).
        bool pipe_was_empty = false;
        size_t moved = 0;
        const long rc = send_stream(
            ref, len, 0,
            [&](uint8_t *ring, uint32_t ring_bytes, uint32_t ring_pos, size_t n) -> long {
                pollfd readable{other_fd, POLLIN, 0};
                const int wait_ms = moved > 0 || pipe_nonblock ? 0 : -1;
                int ready;
                do {
                    ready = real(libc.poll)(&readable, 1, wait_ms);
                } while (ready < 0 && errno == EINTR && wait_ms != 0);
                if (ready < 0) return -errno;
                if (ready == 0) {
                    pipe_was_empty = moved == 0;
                    return 0;
                }
                const uint32_t at = ring_pos & (ring_bytes - 1);
                const size_t first = std::min<size_t>(n, ring_bytes - at);
                iovec pieces[2] = {{ring + at, first}, {ring, n - first}};
                const ssize_t got = real(libc.readv)(other_fd, pieces, n > first ? 2 : 1);
                if (got < 0) return errno == EAGAIN ? 0 : -errno;  // another reader was first
                moved += static_cast<size_t>(got);
                return got;
            });
        if (rc == 0 && pipe_was_empty) return -EAGAIN;
        return rc;
    }
    // Socket to pipe: peek, write what the pipe takes without waiting, and only then consume
    // that much from the ring. A pipe counts its room in slots, not bytes, so only a write
    // that cannot block says how much fits: through a non-blocking file description of our
    // own when the caller's blocks (its O_NONBLOCK is shared with everyone who holds it).
    // On the heap, once per thread that splices: a 64 KiB static TLS block would be taken
    // from every thread's stack in every process under the shim.
    thread_local std::unique_ptr<uint8_t[]> buffer_of_thread;
    if (!buffer_of_thread) buffer_of_thread.reset(new (std::nothrow) uint8_t[ipc::kRingBytes]);
    uint8_t *const buffer = buffer_of_thread.get();
    if (!buffer) return -ENOMEM;
    int writer = other_fd;
    if (!(other_flags & O_NONBLOCK)) {
        char path[40];
        std::snprintf(path, sizeof(path), "/proc/self/fd/%d", other_fd);
        writer = ::open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (writer < 0 && errno == ENXIO) {  // no reader left: what pipe_write() does then
            raise(SIGPIPE);
            return -EPIPE;
        }
        if (writer < 0) return -errno;
    }
    long result;
    for (;;) {
        iovec peek_at{buffer, std::min<size_t>(len, ipc::kRingBytes)};
        const long peeked = op_recv(ref, &peek_at, 1, MSG_PEEK);
        if (peeked <= 0) {
            result = peeked;
            break;
        }
        const ssize_t written = real(libc.write)(writer, buffer, static_cast<size_t>(peeked));
        if (written > 0) {
            iovec taken{nullptr, static_cast<size_t>(written)};
            result = op_recv(ref, &taken, 1, MSG_TRUNC | MSG_DONTWAIT);
            break;
        }
        if (errno != EAGAIN || pipe_nonblock) {
            result = -errno;
            break;
        }
        pollfd writable{other_fd, POLLOUT, 0};  // a full pipe: wait for its reader
        if (real(libc.poll)(&writable, 1, -1) < 0 && errno != EINTR) {
            result = -errno;
            break;
        }
    }
    if (writer != other_fd) real(libc.close)(writer);
    return result;
}

}  // namespace tcps::shim
