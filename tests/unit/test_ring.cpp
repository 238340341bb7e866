// Byte-ring copies (ipc/ring.hpp): in and out at any free-running index, wrapping at the end.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "ring.hpp"

using namespace tcps::ipc;

namespace {

constexpr uint32_t kRing = 64;

std::vector<uint8_t> pattern(size_t len, uint8_t first) {
    std::vector<uint8_t> bytes(len);
    std::iota(bytes.begin(), bytes.end(), first);
    return bytes;
}

}  // namespace

TEST_CASE("copy in then out at the start of the ring returns the same bytes") {
    std::vector<uint8_t> ring(kRing, 0xee);
    auto src = pattern(10, 1);
    ring_copy_in(ring.data(), kRing, 0, src.data(), src.size());
    std::vector<uint8_t> dst(10);
    ring_copy_out(ring.data(), kRing, 0, dst.data(), dst.size());
    CHECK(dst == src);
    CHECK(ring[10] == 0xee);  // nothing written past the copy
}

TEST_CASE("a copy that crosses the end of the ring wraps to its start") {
    std::vector<uint8_t> ring(kRing, 0);
    auto src = pattern(20, 100);
    const uint32_t pos = kRing - 8;
    ring_copy_in(ring.data(), kRing, pos, src.data(), src.size());
    CHECK(std::vector<uint8_t>(ring.end() - 8, ring.end()) == pattern(8, 100));
    CHECK(std::vector<uint8_t>(ring.begin(), ring.begin() + 12) == pattern(12, 108));
    std::vector<uint8_t> dst(20);
    ring_copy_out(ring.data(), kRing, pos, dst.data(), dst.size());
    CHECK(dst == src);
}

TEST_CASE("free-running indices beyond the ring size and past uint32 overflow map with the mask") {
    std::vector<uint8_t> ring(kRing, 0);
    auto src = pattern(16, 7);
    const uint32_t pos = 0xfffffff8u;  // 8 bytes before the index wraps to 0
    ring_copy_in(ring.data(), kRing, pos, src.data(), 8);
    ring_copy_in(ring.data(), kRing, pos + 8, src.data() + 8, 8);  // index wrapped to 0
    std::vector<uint8_t> dst(16);
    ring_copy_out(ring.data(), kRing, pos, dst.data(), dst.size());
    CHECK(dst == src);
    CHECK(ring[(pos & (kRing - 1))] == 7);
    CHECK(ring[0] == 15);
}

TEST_CASE("a copy of the whole ring at an offset round-trips") {
    std::vector<uint8_t> ring(kRing, 0);
    auto src = pattern(kRing, 0);
    ring_copy_in(ring.data(), kRing, 37, src.data(), src.size());
    std::vector<uint8_t> dst(kRing);
    ring_copy_out(ring.data(), kRing, 37 + kRing, dst.data(), dst.size());
    CHECK(dst == src);
}

// Applications pass {NULL, 0} iovecs (writev/readv allow them); memcpy must not see NULL.
TEST_CASE("a zero-length copy touches nothing, even from or to a null pointer") {
    std::vector<uint8_t> ring(kRing, 0x5a);
    uint8_t byte = 1;
    ring_copy_in(ring.data(), kRing, 63, &byte, 0);
    ring_copy_out(ring.data(), kRing, 63, &byte, 0);
    ring_copy_in(ring.data(), kRing, 5, nullptr, 0);
    ring_copy_out(ring.data(), kRing, 5, nullptr, 0);
    CHECK(byte == 1);
    CHECK(std::all_of(ring.begin(), ring.end(), [](uint8_t b) { return b == 0x5a; }));
}

TEST_CASE("gathering from an iovec array into the ring wraps and stops at len") {
    std::vector<uint8_t> ring(kRing, 0);
    auto a = pattern(5, 1), c = pattern(30, 6);
    iovec iov[3] = {{a.data(), a.size()}, {nullptr, 0}, {c.data(), c.size()}};
    const uint32_t pos = kRing - 3;
    CHECK(ring_copy_in_iov(ring.data(), kRing, pos, iov, 3, 20) == 20);  // stops inside c
    std::vector<uint8_t> dst(20);
    ring_copy_out(ring.data(), kRing, pos, dst.data(), dst.size());
    CHECK(dst == pattern(20, 1));
    CHECK(ring[(pos + 20) & (kRing - 1)] == 0);  // the 21st byte was not copied
}

TEST_CASE("gathering returns what the iovecs hold when that is less than len") {
    std::vector<uint8_t> ring(kRing, 0);
    auto a = pattern(4, 1), b = pattern(3, 5);
    iovec iov[2] = {{a.data(), a.size()}, {b.data(), b.size()}};
    CHECK(ring_copy_in_iov(ring.data(), kRing, 0, iov, 2, 100) == 7);
    CHECK(ring_copy_in_iov(ring.data(), kRing, 0, iov, 0, 100) == 0);
    CHECK(std::vector<uint8_t>(ring.begin(), ring.begin() + 7) == pattern(7, 1));
}

TEST_CASE("scattering from the ring into an iovec array wraps and fills iovecs in order") {
    std::vector<uint8_t> ring(kRing, 0);
    auto src = pattern(kRing, 0);
    ring_copy_in(ring.data(), kRing, 0, src.data(), src.size());
    std::vector<uint8_t> a(3), c(10), d(10);
    iovec iov[4] = {{a.data(), a.size()}, {nullptr, 0}, {c.data(), c.size()}, {d.data(), d.size()}};
    const uint32_t pos = kRing - 5;
    CHECK(ring_copy_out_iov(ring.data(), kRing, pos, iov, 4, 18) == 18);
    CHECK(a == std::vector<uint8_t>{59, 60, 61});
    CHECK(c == std::vector<uint8_t>{62, 63, 0, 1, 2, 3, 4, 5, 6, 7});
    CHECK(d == std::vector<uint8_t>{8, 9, 10, 11, 12, 0, 0, 0, 0, 0});
}

TEST_CASE("a gather then a scatter with different iovec shapes preserve the byte stream") {
    std::vector<uint8_t> ring(kRing, 0);
    auto src = pattern(50, 200);
    iovec in[3] = {{src.data(), 7}, {src.data() + 7, 31}, {src.data() + 38, 12}};
    uint32_t pos = 1000;  // an index far past the ring size
    REQUIRE(ring_copy_in_iov(ring.data(), kRing, pos, in, 3, 50) == 50);
    std::vector<uint8_t> dst(50);
    iovec out[2] = {{dst.data(), 25}, {dst.data() + 25, 25}};
    REQUIRE(ring_copy_out_iov(ring.data(), kRing, pos, out, 2, 50) == 50);
    CHECK(dst == src);
}

TEST_CASE("the real ring sizes wrap like the small one") {
    std::vector<uint8_t> ring(kRingBytes, 0);
    auto src = pattern(4096, 3);
    const uint32_t pos = 5 * kRingBytes - 1000;
    ring_copy_in(ring.data(), kRingBytes, pos, src.data(), src.size());
    std::vector<uint8_t> dst(4096);
    ring_copy_out(ring.data(), kRingBytes, pos, dst.data(), dst.size());
    CHECK(dst == src);
    CHECK(ring[kRingBytes - 1000] == 3);
    CHECK(ring[0] == static_cast<uint8_t>(3 + 1000));
}

// Growing rings (ring_room, ring_regrow): the byte at stream position p, so a read can be checked.
uint8_t stream_at(uint32_t pos) {
    return static_cast<uint8_t>(pos * 7 + (pos >> 8));
}

std::vector<uint8_t> stream(uint32_t from, uint32_t to) {
    std::vector<uint8_t> bytes;
    for (uint32_t p = from; p != to; ++p) bytes.push_back(stream_at(p));
    return bytes;
}

std::vector<uint8_t> read_ring(const uint8_t *ring, uint32_t bytes, uint32_t from, uint32_t to) {
    std::vector<uint8_t> out(to - from);
    ring_copy_out(ring, bytes, from, out.data(), out.size());
    return out;
}

TEST_CASE("a ring moved into a bigger one keeps its bytes at their stream positions") {
    for (uint32_t head : {0u, 10u, kRing - 1, 5 * kRing + 17, 0xffffffe0u}) {
        for (uint32_t used : {0u, 1u, kRing / 2, kRing}) {
            const uint32_t tail = head + used;
            std::vector<uint8_t> small(kRing), big(2 * kRing, 0xee);
            auto bytes = stream(head, tail);
            ring_copy_in(small.data(), kRing, head, bytes.data(), bytes.size());
            ring_regrow(small.data(), kRing, big.data(), 2 * kRing, head, tail);
            CHECK(read_ring(big.data(), 2 * kRing, head, tail) == bytes);
            CHECK(read_ring(small.data(), kRing, head, tail) == bytes);  // left as it was
        }
    }
}

TEST_CASE("a ring doubled in place keeps its bytes for a reader of either size") {
    // The producer doubles a full ring of kRing at tail, in place, then fills what ring_room
    // allows under the new size while the consumer has not moved: a consumer that still reads
    // with the old size must find every byte it was shown, one with the new size all of them.
    for (uint32_t head : {0u, 1u, kRing / 2, kRing - 1, kRing, 3 * kRing + 5, 0xffffffc0u + 3}) {
        std::vector<uint8_t> ring(2 * kRing, 0xee);
        const uint32_t tail = head + kRing;  // full
        auto before = stream(head, tail);
        ring_copy_in(ring.data(), kRing, head, before.data(), before.size());
        ring_regrow(ring.data(), kRing, ring.data(), 2 * kRing, head, tail);
        CHECK(read_ring(ring.data(), kRing, head, tail) == before);
        CHECK(read_ring(ring.data(), 2 * kRing, head, tail) == before);
        // Nothing fits until the consumer reads; then only what keeps the old bytes intact.
        CHECK(ring_room(2 * kRing, kRing, tail, head, tail) == 0);
        for (uint32_t consumed : {1u, kRing / 3, kRing - 1}) {
            const uint32_t now_head = head + consumed;
            std::vector<uint8_t> copy = ring;
            const uint32_t room = ring_room(2 * kRing, kRing, tail, now_head, tail);
            CHECK(room == consumed);
            auto more = stream(tail, tail + room);
            ring_copy_in(copy.data(), 2 * kRing, tail, more.data(), more.size());
            CHECK(read_ring(copy.data(), kRing, now_head, tail) == stream(now_head, tail));
            CHECK(read_ring(copy.data(), 2 * kRing, now_head, tail + room) ==
                  stream(now_head, tail + room));
        }
        // Once the consumer is past the doubling, the whole ring is the producer's.
        CHECK(ring_room(2 * kRing, kRing, tail, tail, tail) == 2 * kRing);
        CHECK(ring_room(2 * kRing, kRing, tail, tail + 1, tail + 1) == 2 * kRing);
        CHECK(ring_room(2 * kRing, 0, 0, head, tail) == kRing);
    }
}
