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
    CHECK(kWorkQueueOffset >= kWaitersOffset + kMaxWaiters * sizeof(Waiter));
    CHECK(kSlotsOffset >= kWorkQueueOffset + kWorkQueueEntries * sizeof(WorkEntry));
    CHECK(kRingsOffset >= kSlotsOffset + size_t{kMaxSockets} * sizeof(SocketSlot));
    for (size_t offset : {kWaitersOffset, kWorkQueueOffset, kSlotsOffset, kRingsOffset})
        CHECK(offset % kPageSize == 0);
    CHECK(kRegionBytes % kPageSize == 0);
}

TEST_CASE("each slot's tx and rx rings are disjoint, adjacent and inside the region") {
    for (uint32_t slot : {0u, 1u, kClientSlots - 1, kClientSlots, kMaxSockets - 1}) {
        CHECK(tx_ring_offset(slot) % kPageSize == 0);
        CHECK(rx_ring_offset(slot) == tx_ring_offset(slot) + kTxRingBytes);
        CHECK(rx_ring_offset(slot) + kRxRingBytes <= kRegionBytes);
        if (slot + 1 < kMaxSockets)
            CHECK(tx_ring_offset(slot + 1) == rx_ring_offset(slot) + kRxRingBytes);
    }
    CHECK(rx_ring_offset(kMaxSockets - 1) + kRxRingBytes == kRegionBytes);
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
    CHECK(offsetof(RegionHeader, engine_sleeping) < 2 * kCacheLine);
    CHECK(offsetof(RegionHeader, wq_tail) == 2 * kCacheLine);
    CHECK(offsetof(RegionHeader, wq_head) == 3 * kCacheLine);
    CHECK(offsetof(RegionHeader, waiters_armed) == 4 * kCacheLine);
}

TEST_CASE("an address record holds any IPv4 or IPv6 socket address") {
    CHECK(kSockAddrMax >= 28);  // sizeof(sockaddr_in6)
    CHECK(sizeof(SockAddrRecord) == 32);
    CHECK(sizeof(Request::addr) == kSockAddrMax);
    CHECK(sizeof(Request::opt) == kOptMax);
    CHECK(sizeof(Response::opt) == kOptMax);
}

TEST_CASE("the constants satisfy the invariants the protocol depends on") {
    CHECK(kMaxSockets <= kWorkQueueEntries);  // doorbell_queued: the queue can never overflow
    CHECK(kClientSlots < kMaxSockets);
    CHECK((kTxRingBytes & (kTxRingBytes - 1)) == 0);
    CHECK((kRxRingBytes & (kRxRingBytes - 1)) == 0);
    CHECK((kAcceptRingEntries & (kAcceptRingEntries - 1)) == 0);
    CHECK(uint64_t{kTxRingBytes} < (uint64_t{1} << 31));  // tail - head fits in an int32 diff
    CHECK(kRegionMagic == 0x53504354u);
    CHECK(kLayoutVersion >= 1);
    CHECK(kOpCount == static_cast<uint32_t>(Op::kIoctl) + 1);
}

TEST_CASE("a region view addresses each record at its documented offset") {
    // A real mapping of the whole region (sparse), so every reference points into it.
    void *mem = mmap(nullptr, kRegionBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    REQUIRE(mem != MAP_FAILED);
    RegionView view;
    view.base = static_cast<uint8_t *>(mem);
    auto at = [&](const void *p) {
        return static_cast<size_t>(static_cast<const uint8_t *>(p) - view.base);
    };
    CHECK(at(&view.header()) == 0);
    CHECK(at(&view.waiter(0)) == kWaitersOffset);
    CHECK(at(&view.waiter(kMaxWaiters - 1)) == kWaitersOffset + (kMaxWaiters - 1) * kCacheLine);
    CHECK(at(&view.work_entry(1)) == kWorkQueueOffset + sizeof(WorkEntry));
    CHECK(at(&view.slot(0)) == kSlotsOffset);
    CHECK(at(&view.slot(kMaxSockets - 1)) == kSlotsOffset + (kMaxSockets - 1) * sizeof(SocketSlot));
    CHECK(at(view.tx_ring(3)) == tx_ring_offset(3));
    CHECK(at(view.rx_ring(3)) == rx_ring_offset(3));
    CHECK(at(view.rx_ring(kMaxSockets - 1) + kRxRingBytes) == kRegionBytes);
    munmap(mem, kRegionBytes);
}
