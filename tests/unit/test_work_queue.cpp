// The work queues (ipc/ring.hpp): client threads push slot indices onto their chunk's queue,
// the engine pops them.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <array>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "ring.hpp"

using namespace tcps::ipc;

namespace {

// The control part and two chunks, mapped sparse: only the pages the queues and the slots
// touch get memory.
constexpr size_t kTestBytes = kChunksOffset + 2 * kChunkBytes;
class Region {
  public:
    Region() {
        void *mem = mmap(nullptr, kTestBytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        REQUIRE(mem != MAP_FAILED);
        view_.map_contiguous(static_cast<uint8_t *>(mem), 2);
        work_queue_init(view_, 0);
        work_queue_init(view_, 1);
    }
    ~Region() { munmap(view_.base, kTestBytes); }
    Region(const Region &) = delete;
    Region &operator=(const Region &) = delete;
    const RegionView &view() const { return view_; }

  private:
    RegionView view_;
};

// What the engine does with a popped slot: clear its doorbell so the client queues it again.
void engine_takes(const RegionView &region, uint32_t slot) {
    region.slot(slot).doorbell_queued.store(0, std::memory_order_seq_cst);
}

}  // namespace

TEST_CASE("an empty queue pops nothing") {
    Region region;
    uint32_t slot = 12345;
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
    CHECK(slot == 12345);
}

TEST_CASE("one thread's pushes pop in the same order") {
    Region region;
    for (uint32_t i = 0; i < 100; ++i)
        REQUIRE(work_queue_push(region.view(), (i * 37) % kChunkSlots));
    for (uint32_t i = 0; i < 100; ++i) {
        uint32_t slot = 0;
        REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
        CHECK(slot == (i * 37) % kChunkSlots);
    }
    uint32_t slot = 0;
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
}

TEST_CASE("order holds across many wraps of the entry array") {
    Region region;
    uint32_t next_push = 0, next_pop = 0;
    for (int round = 0; round < 10; ++round) {
        for (uint32_t i = 0; i < kWorkQueueEntries - 1; ++i)
            REQUIRE(work_queue_push(region.view(), next_push++ % kChunkSlots));
        for (uint32_t i = 0; i < kWorkQueueEntries - 1; ++i) {
            uint32_t slot = 0;
            REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
            REQUIRE(slot == next_pop++ % kChunkSlots);
        }
    }
    CHECK(region.view().chunk_header(0).wq_tail.load() ==
          region.view().chunk_header(0).wq_head.load());
}

TEST_CASE("a full queue refuses a push until the engine pops one") {
    Region region;
    for (uint32_t i = 0; i < kWorkQueueEntries; ++i) REQUIRE(work_queue_push(region.view(), i));
    CHECK_FALSE(work_queue_push(region.view(), 7));
    CHECK(region.view().chunk_header(0).wq_tail.load() == kWorkQueueEntries);

    uint32_t slot = 99;
    REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 0);
    CHECK(work_queue_push(region.view(), 7));
    CHECK_FALSE(work_queue_push(region.view(), 8));

    for (uint32_t i = 1; i < kWorkQueueEntries; ++i) {
        REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
        REQUIRE(slot == i);
    }
    REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 7);
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
}

TEST_CASE("each slot goes to its own chunk's queue") {
    Region region;
    REQUIRE(work_queue_push(region.view(), kChunkSlots + 9));
    REQUIRE(work_queue_push(region.view(), 9));
    uint32_t slot = 0;
    REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 9);
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
    CHECK(work_queue_ready(region.view(), 1));
    REQUIRE(work_queue_pop(region.view(), 1, slot) == PopResult::kSlot);
    CHECK(slot == kChunkSlots + 9);
    CHECK_FALSE(work_queue_ready(region.view(), 1));
}

TEST_CASE("a slot index out of range pops as garbage and the queue moves past it") {
    Region region;
    // A hostile client writes other chunks' slots (or anything) into chunk 0's queue.
    region.view().work_entry(0, 0).seq.store(1);
    region.view().work_entry(0, 0).slot = kChunkSlots;
    region.view().work_entry(0, 1).seq.store(2);
    region.view().work_entry(0, 1).slot = 0xffffffffu;
    region.view().chunk_header(0).wq_tail.store(2);
    REQUIRE(work_queue_push(region.view(), 5));
    uint32_t slot = 77;
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kGarbage);
    CHECK(slot == 77);  // garbage is never handed out
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kGarbage);
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 5);
}

TEST_CASE("a slot index overwritten in shared memory after the push pops as garbage") {
    Region region;
    REQUIRE(work_queue_push(region.view(), 3));
    region.view().work_entry(0, 0).slot = 123456;  // a hostile client rewrites the entry
    uint32_t slot = 0;
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kGarbage);
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
}

TEST_CASE("a sequence number the client scribbled over reads as empty, not as a slot") {
    Region region;
    region.view().work_entry(0, 0).seq.store(12345);
    region.view().work_entry(0, 0).slot = 1;
    uint32_t slot = 0;
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
}

TEST_CASE("ringing the doorbell of an already queued slot queues it once") {
    Region region;
    ring_doorbell(region.view(), 42);
    ring_doorbell(region.view(), 42);
    ring_doorbell(region.view(), 43);
    uint32_t slot = 0;
    REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 42);
    REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 43);
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);

    // Until the engine clears the flag, further rings add nothing; after it, the slot is queued.
    ring_doorbell(region.view(), 42);
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
    engine_takes(region.view(), 42);
    ring_doorbell(region.view(), 42);
    REQUIRE(work_queue_pop(region.view(), 0, slot) == PopResult::kSlot);
    CHECK(slot == 42);
}

TEST_CASE("four producers of 100k pushes each and one consumer: every push pops exactly once") {
    Region region;
    constexpr uint32_t kProducers = 4;
    constexpr uint32_t kPushesEach = 100'000;
    // Producer p pushes slot p * 1024 + (i % 1024): its own slot range, so the consumer can
    // tell the producers apart and check that each one's pushes arrive complete and in order.
    constexpr uint32_t kRange = kChunkSlots / kProducers;
    static_assert(kRange == 1024);

    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    std::atomic<bool> timed_out{false};
    std::atomic<uint32_t> full_retries{0};
    std::vector<std::thread> producers;
    for (uint32_t p = 0; p < kProducers; ++p) {
        producers.emplace_back([&, p] {
            for (uint32_t i = 0; i < kPushesEach && !timed_out.load(); ++i) {
                while (!work_queue_push(region.view(), p * kRange + i % kRange)) {
                    full_retries.fetch_add(1, std::memory_order_relaxed);
                    if (std::chrono::steady_clock::now() > deadline) {
                        timed_out = true;
                        return;
                    }
                    std::this_thread::yield();
                }
            }
        });
    }

    std::array<uint32_t, kProducers> popped{};
    bool in_order = true, garbage = false;
    uint64_t total = 0;
    while (total < uint64_t{kProducers} * kPushesEach && !timed_out.load()) {
        uint32_t slot = 0;
        const PopResult result = work_queue_pop(region.view(), 0, slot);
        if (result == PopResult::kEmpty) {
            if (std::chrono::steady_clock::now() > deadline) timed_out = true;
            std::this_thread::yield();
            continue;
        }
        if (result == PopResult::kGarbage) {
            garbage = true;
            break;
        }
        const uint32_t producer = slot / kRange;
        if (slot % kRange != popped[producer] % kRange) in_order = false;
        ++popped[producer];
        ++total;
    }
    timed_out = timed_out.load() || total < uint64_t{kProducers} * kPushesEach;
    for (auto &thread : producers) thread.join();

    REQUIRE_FALSE(timed_out.load());
    CHECK_FALSE(garbage);
    CHECK(in_order);
    for (uint32_t p = 0; p < kProducers; ++p) CHECK(popped[p] == kPushesEach);
    uint32_t slot = 0;
    CHECK(work_queue_pop(region.view(), 0, slot) == PopResult::kEmpty);
    INFO("pushes that found the queue full: " << full_retries.load());
}
