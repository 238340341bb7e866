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
    std::vector<uint8_t> ring(kRxRingBytes, 0);
    auto src = pattern(4096, 3);
    const uint32_t pos = 5 * kRxRingBytes - 1000;
    ring_copy_in(ring.data(), kRxRingBytes, pos, src.data(), src.size());
    std::vector<uint8_t> dst(4096);
    ring_copy_out(ring.data(), kRxRingBytes, pos, dst.data(), dst.size());
    CHECK(dst == src);
    CHECK(ring[kRxRingBytes - 1000] == 3);
    CHECK(ring[0] == static_cast<uint8_t>(3 + 1000));
}
