// libtcps.so's side of the MemNet API (tcps_memnet.h): transfers on an offloaded socket
// straight from/into memory the family registered with the engine, queued in the slot's
// direct queue (ipc::DirectDescriptor) with a few stores and a doorbell, and answered there.
// Bytes the rx ring already holds come first, copied, as recv() gives them.
#include <signal.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>

#include "common.hpp"
#include "memnet_hooks.h"
#include "ops.hpp"

namespace tcps::shim {

namespace {

constexpr uint32_t kEntryMask = ipc::kDirectQueueEntries - 1;

bool rx_ring_has_bytes(const SocketRef &ref) {
    return ref.shm->rx_tail.load(std::memory_order_acquire) !=
           ref.shm->rx_head.load(std::memory_order_relaxed);
}

bool answered(const tcps_memnet_ticket *ticket) {
    return __atomic_load_n(&ticket->answered, __ATOMIC_ACQUIRE) != 0;
}

void give_answer(tcps_memnet_ticket *ticket, int32_t result) {
    ticket->result = result;
    __atomic_store_n(&ticket->answered, 1, __ATOMIC_RELEASE);
}

bool done(const SocketRef &ref, const tcps_memnet_ticket *ticket) {
    return static_cast<int32_t>(ref.shm->direct_done.load(std::memory_order_acquire) -
                                ticket->seq) > 0;
}

// What a transfer says once the engine is gone, as send() and recv() do then: EPIPE for a
// send, ECONNRESET for a receive.
int engine_gone_error(bool recv) {
    return recv ? -ECONNRESET : -EPIPE;
}

long recv_from_ring(SocketRef &ref, void *local, size_t len, bool dontwait) {
    iovec iov{local, len};
    return op_recv(ref, &iov, 1, dontwait ? MSG_DONTWAIT : 0);
}

// Takes the ring bytes the engine promised the receives this process queued on the socket
// before position `upto` (and not taken yet), in queue order, each into its own job's buffer:
// the ring's bytes reach the receives in the order they were posted, whichever is waited for
// first, and before the bytes a later receive took straight from the kernel socket. A job not
// taken yet is not done, so its record is still in place. Under tx_lock.
void take_promised_before(SocketRef &ref, uint32_t upto) {
    Socket &sock = *ref.sock;
    const uint32_t done = ref.shm->direct_done.load(std::memory_order_acquire);
    while (sock.ring_taken != upto && static_cast<int32_t>(done - sock.ring_taken) > 0) {
        const uint32_t position = sock.ring_taken++;
        tcps_memnet_ticket *ticket = sock.direct_tickets[position & kEntryMask];
        if (!ticket || ticket->seq != position || !ticket->recv) continue;
        const int32_t result =
            answered(ticket) ? ticket->result
                             : __atomic_load_n(&ref.shm->direct_results[position & kEntryMask],
                                               __ATOMIC_ACQUIRE);
        bool ring = false;
        const uint32_t promised = ipc::direct_ring_promise(result, ring);
        if (promised == 0) continue;  // in its buffer already, or read as recv() does later
        const long got =
            recv_from_ring(ref, ticket->local, std::min<uint64_t>(promised, ticket->len), true);
        // The application took them with recv() meanwhile: this job reads as recv() does.
        give_answer(ticket, got == -EAGAIN ? ipc::kDirectUseRxRing : static_cast<int32_t>(got));
    }
}

// Queues one transfer: 0, or -errno. Waits for a free entry if kDirectQueueEntries are in
// flight.
int queue_transfer(SocketRef &ref, bool recv, uint32_t id, uint64_t offset, uint32_t len,
                   bool dontwait, tcps_memnet_ticket *ticket, bool ahead = false) {
    Socket &sock = *ref.sock;
    ipc::SocketSlot &shm = *ref.shm;
    // tx_lock: one producer of the queue at a time, and a send's tx_at is the ring position
    // behind every byte another thread's send() queued before it.
    sock.tx_lock.lock();
    const uint32_t tail = shm.direct_tail.load(std::memory_order_relaxed);
    auto entry_free = [&] {
        return tail - shm.direct_done.load(std::memory_order_acquire) < ipc::kDirectQueueEntries ||
               session_dead() || stale(ref);
    };
    if ((!entry_free() &&
         wait_until(ref.slot, entry_free, -1, Interrupt::kNever) != WaitResult::kReady) ||
        session_dead()) {
        sock.tx_lock.unlock();
        return engine_gone_error(recv);
    }
    if (stale(ref)) {
        sock.tx_lock.unlock();
        return -EBADF;
    }
    const uint32_t k = tail & kEntryMask;
    // The entry's last transfer is done: its ring bytes are taken (in order) and its result
    // goes to its ticket before we reuse it.
    const uint32_t reused = tail - ipc::kDirectQueueEntries;  // the position it held
    if (static_cast<int32_t>(reused - sock.ring_taken) >= 0) take_promised_before(ref, reused + 1);
    if (tcps_memnet_ticket *before = sock.direct_tickets[k]; before && !answered(before))
        give_answer(before, __atomic_load_n(&shm.direct_results[k], __ATOMIC_ACQUIRE));
    ipc::DirectDescriptor &d = shm.direct_queue[k];
    d.op = static_cast<uint32_t>(recv ? ipc::DirectOp::kRecv : ipc::DirectOp::kSend);
    d.mem = id;
    d.len = len;
    d.tx_at = shm.tx_tail.load(std::memory_order_relaxed);
    d.offset = offset;
    d.flags = dontwait ? MSG_DONTWAIT : 0;
    d.hints = ahead ? ipc::kDirectHintAhead : 0;
    ticket->slot = ref.slot;
    ticket->generation = ref.generation;
    ticket->seq = tail;
    ticket->recv = recv ? 1 : 0;
    ticket->queued = 1;
    __atomic_store_n(&ticket->answered, 0, __ATOMIC_RELAXED);
    sock.direct_tickets[k] = ticket;
    shm.direct_tail.store(tail + 1, std::memory_order_release);
    sock.tx_lock.unlock();
    notify_engine(ref.slot);
    return 0;
}

// The engine's result of a queued transfer: 1 with *result, 0 not within timeout_ns.
int transfer_result(SocketRef &ref, tcps_memnet_ticket *ticket, int64_t timeout_ns,
                    int32_t &result) {
    auto ready = [&] { return answered(ticket) || done(ref, ticket) || stale(ref); };
    if (!ready()) {
        if (timeout_ns == 0) return 0;
        const WaitResult waited = wait_until(ref.slot, ready, timeout_ns, Interrupt::kNever);
        if (waited == WaitResult::kDead) {
            result = engine_gone_error(ticket->recv != 0);
            return 1;
        }
        if (waited != WaitResult::kReady) return 0;
    }
    if (answered(ticket)) {
        result = ticket->result;
        return 1;
    }
    if (stale(ref)) {
        result = -EBADF;
        return 1;
    }
    // Acquire: an engine result newer than ours comes after a reuse of the entry that gave
    // our ticket its answer first (queue_transfer), which the check below then sees.
    const int32_t found =
        __atomic_load_n(&ref.shm->direct_results[ticket->seq & kEntryMask], __ATOMIC_ACQUIRE);
    result = answered(ticket) ? ticket->result : found;
    give_answer(ticket, result);
    return 1;
}

// The result of queued transfer `ticket` once the engine answered: what it says, or, for a
// receive sent to the ring, the bytes promised to it, taken after those of the receives queued
// before it. It leaves the socket's queue here (under the tx lock, as the queue's users).
int32_t settle_queued(SocketRef &ref, tcps_memnet_ticket *ticket, int32_t answer) {
    if (!ticket->queued) return answer;
    SocketLockGuard guard(ref.sock->tx_lock);
    take_promised_before(ref, ticket->seq + 1);
    ticket->queued = 0;
    Socket &sock = *ref.sock;
    if (sock.direct_tickets[ticket->seq & kEntryMask] == ticket)
        sock.direct_tickets[ticket->seq & kEntryMask] = nullptr;
    return answered(ticket) ? ticket->result : answer;
}

long direct_recv(SocketRef &ref, uint32_t id, uint64_t offset, void *local, size_t len) {
    const bool nonblocking = ref.sock->nonblocking.load(std::memory_order_relaxed);
    // A non-blocking socket takes what the ring has, as recv() does, and so does a blocking
    // one when the ring has bytes: a round trip to the engine would cost more than the copy.
    if (nonblocking || rx_ring_has_bytes(ref) || len == 0)
        return recv_from_ring(ref, local, len, nonblocking);
    tcps_memnet_ticket ticket{};
    const uint32_t want = static_cast<uint32_t>(std::min<size_t>(len, ipc::kDirectMaxLen));
    ticket.local = local;  // where the ring's bytes promised to it go
    ticket.len = want;
    if (const int rc = queue_transfer(ref, true, id, offset, want, false, &ticket); rc != 0)
        return rc;
    int32_t result = 0;
    transfer_result(ref, &ticket, -1, result);
    result = settle_queued(ref, &ticket, result);
    if (result == ipc::kDirectUseRxRing) return recv_from_ring(ref, local, len, false);
    return result;
}

long direct_send(SocketRef &ref, uint32_t id, uint64_t offset, size_t len) {
    const bool nonblocking = ref.sock->nonblocking.load(std::memory_order_relaxed);
    size_t sent = 0;
    long error = 0;
    while (sent < len) {
        const uint32_t want =
            static_cast<uint32_t>(std::min<size_t>(len - sent, ipc::kDirectMaxLen));
        tcps_memnet_ticket ticket{};
        int32_t result = queue_transfer(ref, false, id, offset + sent, want, nonblocking, &ticket);
        if (result == 0) {
            transfer_result(ref, &ticket, -1, result);
            result = settle_queued(ref, &ticket, result);
        }
        if (result < 0) {
            error = result;
            break;
        }
        sent += static_cast<size_t>(result);
        if (static_cast<uint32_t>(result) < want) break;  // MSG_DONTWAIT: what the kernel took
    }
    if (sent > 0) return static_cast<long>(sent);
    if (error == -EPIPE) raise(SIGPIPE);  // as send() without MSG_NOSIGNAL
    return error;
}

int hook_register(int memfd, uint64_t length, uint32_t *id) {
    return register_mem_with_engine(memfd, length, *id);
}

int hook_deregister(uint32_t id) {
    return deregister_mem_with_engine(id);
}

int hook_direct(int fd, int recv, uint32_t id, uint64_t offset, void *local, size_t len,
                long *result) {
    SocketRef ref;
    if (!find_socket(fd, ref)) return 0;
    *result = recv ? direct_recv(ref, id, offset, local, len) : direct_send(ref, id, offset, len);
    return 1;
}

int hook_post(int fd, int recv, uint32_t id, uint64_t offset, void *local, size_t len,
              tcps_memnet_ticket *ticket) {
    SocketRef ref;
    if (!find_socket(fd, ref)) return 0;
    if (len == 0 || len > ipc::kDirectMaxLen) return -EINVAL;
    const bool nonblocking = ref.sock->nonblocking.load(std::memory_order_relaxed);
    ticket->local = local;
    ticket->len = len;
    if (recv && (nonblocking || (len < ipc::kDirectModeMinLen && rx_ring_has_bytes(ref)))) {
        // As recv() does, from the ring: the job reads what it has when asked (hook_complete).
        ticket->slot = ref.slot;
        ticket->generation = ref.generation;
        ticket->recv = 1;
        ticket->queued = 0;
        give_answer(ticket, ipc::kDirectUseRxRing);
        return 1;
    }
    // A receive posted ahead even when the ring has bytes (the engine then says to read them
    // there): the engine stops filling the ring, and the bytes after them come straight here.
    const int rc = queue_transfer(ref, recv, id, offset, static_cast<uint32_t>(len), nonblocking,
                                  ticket, recv != 0);
    return rc == 0 ? 1 : rc;
}

int hook_complete(tcps_memnet_ticket *ticket, int timeout_ms, long *result) {
    SocketRef ref;
    ref.slot = ticket->slot;
    ref.generation = ticket->generation;
    ref.sock = &socket_state(ticket->slot);
    ref.shm = &region().slot(ticket->slot);
    const int64_t timeout_ns = timeout_ms < 0 ? -1 : int64_t{timeout_ms} * 1'000'000;
    int32_t answer = 0;
    if (!transfer_result(ref, ticket, timeout_ns, answer)) return 0;
    answer = settle_queued(ref, ticket, answer);
    if (answer != ipc::kDirectUseRxRing) {
        *result = answer;
        return 1;
    }
    if (stale(ref)) {
        *result = -EBADF;
        return 1;
    }
    // The ring's bytes: a blocking socket waits for them within the caller's timeout, then
    // reads as recv() does; a non-blocking one says EAGAIN, as recv() would.
    const bool nonblocking = ref.sock->nonblocking.load(std::memory_order_relaxed);
    auto readable = [&] {
        return rx_ring_has_bytes(ref) || direct_bytes_wait(*ref.shm) || stale(ref) ||
               session_dead() || error_pending(ref) ||
               (ref.shm->flags.load(std::memory_order_acquire) &
                (ipc::kFlagRxEof | ipc::kFlagReset));
    };
    for (;;) {
        if (!nonblocking && !readable() &&
            (timeout_ns == 0 ||
             wait_until(ref.slot, readable, timeout_ns, Interrupt::kNever) == WaitResult::kTimeout))
            return 0;
        const long got = recv_from_ring(ref, ticket->local, ticket->len, true);
        if (got != -EAGAIN || nonblocking) {
            *result = got;
            return 1;
        }
        // Another thread took the bytes first: wait for the next ones.
    }
}

const tcps_memnet_hooks kHooks = {hook_register, hook_deregister, hook_direct, hook_post,
                                  hook_complete};

}  // namespace

}  // namespace tcps::shim

TCPS_EXPORT const tcps_memnet_hooks *tcps_memnet_hooks_v1() {
    return &tcps::shim::kHooks;
}
