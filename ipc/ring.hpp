// Lock-free pieces shared by both sides: byte-ring copies and the work queue.
// Header-only so the shim's hot path inlines them.
#pragma once

#include <sys/uio.h>
#include <cstring>

#include "layout.hpp"

namespace tcps::ipc {

// Copies `len` bytes into a ring of `ring_bytes` (a power of two) at free-running index `pos`,
// wrapping at the end. The caller has checked that `len` bytes are free.
inline void ring_copy_in(uint8_t *ring, uint32_t ring_bytes, uint32_t pos, const void *src,
                         size_t len) {
    if (len == 0) return;  // src may be NULL then ({NULL, 0} iovecs); memcpy must not see it
    const uint32_t at = pos & (ring_bytes - 1);
    const size_t first = len < ring_bytes - at ? len : ring_bytes - at;
    std::memcpy(ring + at, src, first);
    if (len > first) std::memcpy(ring, static_cast<const uint8_t *>(src) + first, len - first);
}

inline void ring_copy_out(const uint8_t *ring, uint32_t ring_bytes, uint32_t pos, void *dst,
                          size_t len) {
    if (len == 0) return;
    const uint32_t at = pos & (ring_bytes - 1);
    const size_t first = len < ring_bytes - at ? len : ring_bytes - at;
    std::memcpy(dst, ring + at, first);
    if (len > first) std::memcpy(static_cast<uint8_t *>(dst) + first, ring, len - first);
}

// Gathers up to `len` bytes from an iovec array into the ring; returns the bytes copied.
inline size_t ring_copy_in_iov(uint8_t *ring, uint32_t ring_bytes, uint32_t pos,
                               const struct iovec *iov, size_t iovcnt, size_t len) {
    size_t done = 0;
    for (size_t i = 0; i < iovcnt && done < len; ++i) {
        size_t n = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        ring_copy_in(ring, ring_bytes, pos + static_cast<uint32_t>(done), iov[i].iov_base, n);
        done += n;
    }
    return done;
}

// Scatters up to `len` bytes from the ring into an iovec array; returns the bytes copied.
inline size_t ring_copy_out_iov(const uint8_t *ring, uint32_t ring_bytes, uint32_t pos,
                                const struct iovec *iov, size_t iovcnt, size_t len) {
    size_t done = 0;
    for (size_t i = 0; i < iovcnt && done < len; ++i) {
        size_t n = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        ring_copy_out(ring, ring_bytes, pos + static_cast<uint32_t>(done), iov[i].iov_base, n);
        done += n;
    }
    return done;
}

// --- growing rings (docs/architecture.md, "Rings that grow") ---

// What a producer may add to a ring of `bytes` holding [head, tail). Once it doubled the ring
// inside the bulk rings at `grown_at`, from `before` bytes (0: no such doubling), and until the
// consumer's head passes grown_at, at most `before` bytes may be queued: a byte queued at
// position q then never lands where position q - before lay in the smaller ring, which a
// consumer that still uses the smaller size may be reading.
inline uint32_t ring_room(uint32_t bytes, uint32_t before, uint32_t grown_at, uint32_t head,
                          uint32_t tail) {
    const uint32_t used = tail - head;
    const uint32_t limit =
        before != 0 && static_cast<int32_t>(head - grown_at) < 0 ? before : bytes;
    return used < limit ? limit - used : 0;
}

// The client's room in a socket's tx ring, and the ring's size in `bytes`.
inline uint32_t tx_ring_room(const SocketSlot &slot, uint32_t &bytes) {
    const uint32_t tail = slot.tx_tail.load(std::memory_order_relaxed);
    const uint32_t head = slot.tx_head.load(std::memory_order_acquire);
    bytes = ring_bytes(slot.tx_ring_bytes.load(std::memory_order_relaxed));
    return ring_room(bytes, slot.tx_ring_before.load(std::memory_order_relaxed),
                     slot.tx_grown_at.load(std::memory_order_relaxed), head, tail);
}

// The producer's part of a doubling: copies the ring's bytes [head, tail) from their places in
// the ring of `from_bytes` at `from` to their places in the ring of `to_bytes` (2 * from_bytes)
// at `to`. When `to` is `from` (inside the bulk rings) a byte either keeps its place or moves
// into the half the smaller ring never used, so what a consumer still reading the smaller ring
// finds there stays intact.
inline void ring_regrow(const uint8_t *from, uint32_t from_bytes, uint8_t *to, uint32_t to_bytes,
                        uint32_t head, uint32_t tail) {
    for (uint32_t pos = head; pos != tail;) {
        const uint32_t at = pos & (from_bytes - 1);
        const uint32_t run = tail - pos < from_bytes - at ? tail - pos : from_bytes - at;
        uint8_t *const dst = to + (pos & (to_bytes - 1));
        if (dst != from + at) std::memcpy(dst, from + at, run);
        pos += run;
    }
}

// --- work queues (client threads produce, the engine consumes; one per chunk) ---

// Engine, before it publishes chunk `chunk` as active: entry i is free for position i.
inline void work_queue_init(const RegionView &region, uint32_t chunk) {
    for (uint32_t i = 0; i < kWorkQueueEntries; ++i)
        region.work_entry(chunk, i).seq.store(i, std::memory_order_relaxed);
    region.chunk_header(chunk).wq_tail.store(0, std::memory_order_relaxed);
    region.chunk_header(chunk).wq_head.store(0, std::memory_order_relaxed);
}

// Client: queues `slot` on its chunk's queue. Returns false only if the queue is full, which
// the doorbell_queued rule makes impossible for a well-behaved client.
inline bool work_queue_push(const RegionView &region, uint32_t slot) {
    const uint32_t chunk = slot >> kChunkShift;
    auto &tail = region.chunk_header(chunk).wq_tail;
    uint32_t pos = tail.load(std::memory_order_relaxed);
    for (;;) {
        WorkEntry &entry = region.work_entry(chunk, pos & (kWorkQueueEntries - 1));
        const uint32_t seq = entry.seq.load(std::memory_order_acquire);
        const int32_t diff = static_cast<int32_t>(seq - pos);
        if (diff == 0) {
            if (tail.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
                entry.slot = slot;
                entry.seq.store(pos + 1, std::memory_order_release);
                return true;
            }
        } else if (diff < 0) {
            return false;
        } else {
            pos = tail.load(std::memory_order_relaxed);
        }
    }
}

// Client: marks `slot` as having work and queues it unless it is already queued. The seq_cst
// exchange pairs with the engine's seq_cst clear: either the engine sees what the caller
// published before this call, or the caller sees the flag clear and queues the slot again.
inline void ring_doorbell(const RegionView &region, uint32_t slot) {
    if (region.slot(slot).doorbell_queued.exchange(1, std::memory_order_seq_cst) == 0)
        work_queue_push(region, slot);
}

enum class PopResult { kEmpty, kSlot, kGarbage };

// Engine: whether chunk `chunk`'s queue holds an entry (a peek, for the check before sleeping).
inline bool work_queue_ready(const RegionView &region, uint32_t chunk) {
    const uint32_t head = region.chunk_header(chunk).wq_head.load(std::memory_order_relaxed);
    const WorkEntry &entry = region.work_entry(chunk, head & (kWorkQueueEntries - 1));
    return entry.seq.load(std::memory_order_acquire) == head + 1;
}

// Engine: takes the next slot queued on chunk `chunk`. The entry is client-written: kGarbage
// means the client broke the protocol (a slot index outside that chunk) and its session must
// end.
inline PopResult work_queue_pop(const RegionView &region, uint32_t chunk, uint32_t &slot_out) {
    auto &head_index = region.chunk_header(chunk).wq_head;
    const uint32_t head = head_index.load(std::memory_order_relaxed);
    WorkEntry &entry = region.work_entry(chunk, head & (kWorkQueueEntries - 1));
    if (entry.seq.load(std::memory_order_acquire) != head + 1) return PopResult::kEmpty;
    const uint32_t slot = entry.slot;
    entry.seq.store(head + kWorkQueueEntries, std::memory_order_release);
    head_index.store(head + 1, std::memory_order_release);
    if ((slot >> kChunkShift) != chunk) return PopResult::kGarbage;
    slot_out = slot;
    return PopResult::kSlot;
}

}  // namespace tcps::ipc
