// The shared region's layout (ipc/layout.hpp): sizes, offsets and alignment both sides rely on.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "layout.hpp"

using namespace tcps::ipc;

TEST_CASE("records are standard layout, so offsetof and the shared mapping are meaningful") {
    CHECK(std::is_standard_layout_v<SocketSlot>);
    CHECK(std::is_standard_layout_v<RegionHeader>);
    CHECK(std::is_standard_layout_v<Request>);
    CHECK(std::is_standard_layout_v<Response>);
    CHECK(std::is_standard_layout_v<Waiter>);
    CHECK(std::is_standard_layout_v<WorkEntry>);
    CHECK(std::is_trivially_copyable_v<SockAddrRecord>);
}

TEST_CASE("the region's parts follow each other page aligned and without overlap") {
    CHECK(kWaitersOffset == kPageSize);
    CHECK(kMembersOffset >= kWaitersOffset + kMaxWaiters * sizeof(Waiter));
    CHECK(kChunksOffset >= kMembersOffset + kMaxMembers * sizeof(MemberRecord));
    CHECK(kChunkQueueOffset == sizeof(ChunkHeader));
    CHECK(kChunkHeldOffset >= kChunkQueueOffset + kWorkQueueEntries * sizeof(WorkEntry));
    CHECK(kChunkSlotsOffset >= kChunkHeldOffset + kMaxMembers * kHeldBytesPerMember);
    CHECK(kChunkRingsOffset >= kChunkSlotsOffset + size_t{kChunkSlots} * sizeof(SocketSlot));
    for (size_t offset : {kWaitersOffset, kMembersOffset, kChunksOffset, kChunkHeldOffset,
                          kChunkSlotsOffset, kChunkRingsOffset, kChunkBytes})
        CHECK(offset % kPageSize == 0);
    CHECK(kRegionBytes == kChunksOffset + size_t{kMaxChunks} * kChunkBytes);
    CHECK(kRemoteRegionBytes == chunk_offset(0) + kChunkBulkOffset);
}

TEST_CASE("each slot's tx and rx rings are disjoint, adjacent and inside its chunk") {
    for (uint32_t slot : {0u, 1u, kChunkSlots - 1, kChunkSlots, kMaxSockets - 1}) {
        const uint32_t chunk = slot >> kChunkShift;
        CHECK(tx_ring_offset(slot) % kPageSize == 0);
        CHECK(rx_ring_offset(slot) == tx_ring_offset(slot) + kRingBytes);
        CHECK(tx_ring_offset(slot) >= chunk_offset(chunk) + kChunkRingsOffset);
        CHECK(rx_ring_offset(slot) + kRingBytes <= chunk_offset(chunk) + kChunkBulkOffset);
        CHECK(slot_offset(slot) + sizeof(SocketSlot) <= chunk_offset(chunk) + kChunkRingsOffset);
        // The bulk rings, after every small ring of the chunk.
        CHECK(bulk_rings_offset(slot) % kPageSize == 0);
        CHECK(bulk_rings_offset(slot) >= chunk_offset(chunk) + kChunkBulkOffset);
        CHECK(bulk_rings_offset(slot) + kBulkPairBytes <= chunk_offset(chunk + 1));
        if ((slot & kChunkMask) != kChunkMask) {
            CHECK(tx_ring_offset(slot + 1) == rx_ring_offset(slot) + kRingBytes);
            CHECK(bulk_rings_offset(slot + 1) == bulk_rings_offset(slot) + kBulkPairBytes);
        }
    }
    CHECK(rx_ring_offset(kChunkSlots - 1) + kRingBytes == kChunkBulkOffset + chunk_offset(0));
    CHECK(bulk_rings_offset(kChunkSlots - 1) + kBulkPairBytes == chunk_offset(1));
    CHECK(bulk_rings_offset(kMaxSockets - 1) + kBulkPairBytes == kRegionBytes);
}

TEST_CASE("a slot's client-written and engine-written fields sit on separate cache lines") {
    CHECK(offsetof(SocketSlot, tx_tail) < kCacheLine);
    CHECK(offsetof(SocketSlot, doorbell_queued) < kCacheLine);
    CHECK(offsetof(SocketSlot, tx_head) == kCacheLine);
    CHECK(offsetof(SocketSlot, kernel_mask) < 2 * kCacheLine);
    CHECK(offsetof(SocketSlot, request) == 2 * kCacheLine);
    CHECK(offsetof(SocketSlot, response) % kCacheLine == 0);
    CHECK(offsetof(SocketSlot, response) >= offsetof(SocketSlot, request) + sizeof(Request));
    CHECK(offsetof(SocketSlot, local_addr) >= offsetof(SocketSlot, response) + sizeof(Response));
    CHECK(offsetof(SocketSlot, accept_ring) + sizeof(uint32_t) * kAcceptRingEntries <=
          sizeof(SocketSlot));
    CHECK(sizeof(SocketSlot) % kCacheLine == 0);
    CHECK(alignof(SocketSlot) == kCacheLine);
}

TEST_CASE("the header keeps each side's fields on its own cache line") {
    CHECK(sizeof(RegionHeader) == kPageSize);
    CHECK(offsetof(RegionHeader, magic) == 0);
    CHECK(offsetof(RegionHeader, session_id) < kCacheLine);
    CHECK(offsetof(RegionHeader, engine_alive) == kCacheLine);
    CHECK(offsetof(RegionHeader, chunks_active) < 2 * kCacheLine);
    CHECK(offsetof(RegionHeader, waiters_armed) == 2 * kCacheLine);
    CHECK(offsetof(ChunkHeader, wq_tail) == 0);
    CHECK(offsetof(ChunkHeader, wq_head) == kCacheLine);
    CHECK(offsetof(ChunkHeader, engine_sleeping) < 2 * kCacheLine);
}

TEST_CASE("an address record holds any IPv4 or IPv6 socket address") {
    CHECK(kSockAddrMax >= 28);  // sizeof(sockaddr_in6)
    CHECK(sizeof(SockAddrRecord) == 32);
    CHECK(sizeof(Request::addr) == kSockAddrMax);
    CHECK(sizeof(Request::opt) == kOptMax);
    CHECK(sizeof(Response::opt) == kOptMax);
}

TEST_CASE("the constants satisfy the invariants the protocol depends on") {
    CHECK(kChunkSlots <= kWorkQueueEntries);  // doorbell_queued: a queue can never overflow
    CHECK(kClientSlots < kChunkSlots);
    CHECK(kMaxSockets == kChunkSlots * kMaxChunks);
    CHECK(kMaxSockets >= 1'000'000);  // as many sockets as fs.nr_open lets a process have
    CHECK((kRingBytes & (kRingBytes - 1)) == 0);
    CHECK((kRingMaxBytes & (kRingMaxBytes - 1)) == 0);
    CHECK((kAcceptRingEntries & (kAcceptRingEntries - 1)) == 0);
    CHECK(uint64_t{kRingMaxBytes} < (uint64_t{1} << 31));  // tail - head fits in an int32 diff
    CHECK(kRegionMagic == 0x53504354u);
    CHECK(kLayoutVersion >= 1);
    CHECK(kOpCount == static_cast<uint32_t>(Op::kStat) + 1);
}

TEST_CASE("a region view addresses each record at its documented offset") {
    // A real mapping of the control part and two chunks (sparse), one view of it contiguous
    // and one with each chunk mapped on its own, as a client maps them.
    const size_t bytes = kChunksOffset + 2 * kChunkBytes;
    void *mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    REQUIRE(mem != MAP_FAILED);
    RegionView view;
    view.map_contiguous(static_cast<uint8_t *>(mem), 2, true);
    auto at = [&](const void *p) {
        return static_cast<size_t>(static_cast<const uint8_t *>(p) - view.base);
    };
    CHECK(at(&view.header()) == 0);
    CHECK(at(&view.waiter(0)) == kWaitersOffset);
    CHECK(at(&view.waiter(kMaxWaiters - 1)) == kWaitersOffset + (kMaxWaiters - 1) * kCacheLine);
    CHECK(at(&view.member(3)) == kMembersOffset + 3 * sizeof(MemberRecord));
    CHECK(at(&view.chunk_header(1)) == chunk_offset(1));
    CHECK(at(&view.work_entry(0, 1)) == chunk_offset(0) + kChunkQueueOffset + sizeof(WorkEntry));
    CHECK(at(&view.slot(0)) == slot_offset(0));
    CHECK(at(&view.slot(kChunkSlots + 5)) == slot_offset(kChunkSlots + 5));
    CHECK(at(view.tx_ring(3, kRingBytes)) == tx_ring_offset(3));
    CHECK(at(view.rx_ring(kChunkSlots + 3, kRingBytes)) == rx_ring_offset(kChunkSlots + 3));
    // A grown ring is in the bulk rings, whatever its size.
    CHECK(at(view.tx_ring(3, 2 * kRingBytes)) == bulk_rings_offset(3));
    CHECK(at(view.tx_ring(3, kRingMaxBytes)) == bulk_rings_offset(3));
    CHECK(at(view.rx_ring(kChunkSlots + 3, kRingMaxBytes)) ==
          bulk_rings_offset(kChunkSlots + 3) + kRingMaxBytes);
    // A relay session's view (no bulk rings) has none to give.
    RegionView relay_view;
    relay_view.map_contiguous(static_cast<uint8_t *>(mem), 1);
    CHECK(relay_view.bulk(0) == nullptr);
    CHECK(at(relay_view.rx_ring(5, kRingBytes)) == rx_ring_offset(5));
    CHECK(at(&view.held_word(2, kChunkSlots + 130)) == held_offset(2, 1) + 2 * sizeof(uint64_t));
    CHECK(view.mapped(kChunkSlots * 2 - 1));
    CHECK_FALSE(view.mapped(kChunkSlots * 2));
    CHECK_FALSE(view.mapped(kMaxSockets));

    RegionView separate;
    separate.base = view.base;
    separate.chunks[1].store(view.base + chunk_offset(1));
    CHECK_FALSE(separate.mapped(0));
    CHECK(&separate.slot(kChunkSlots + 7) == &view.slot(kChunkSlots + 7));
    munmap(mem, bytes);
}
