// What the cross-host path (tcps-relay, tcpsd --fabric-listen) adds to the channel: composed
// snapshots (publish_copy), bare notifications, regions that end and whose index is reused,
// and the engine's RegionPublisher, which keeps publishes in order past the endpoint's limit.
// Both sides in this process, over tcp;ofi_rxm on 127.0.0.1 (or $TCPS_FABRIC_PROVIDER).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "mirror.hpp"
#include "scenarios.hpp"

using namespace tcps;
using namespace tcps::test;
using Clock = std::chrono::steady_clock;

namespace {

ipc::FabricConfig loopback_config() {
    ipc::FabricConfig config = ipc::FabricConfig::from_env();
    if (config.node.empty()) config.node = "127.0.0.1";
    return config;
}

struct Pair {
    Side a;
    Side b;
};

void open_pair(Pair &pair) {
    std::string error;
    if (open_side(loopback_config(), Role::kA, kMirrorBytes, kMirrorBytes, pair.a, error) != 0)
        FAIL(error);
    if (open_side(loopback_config(), Role::kB, kMirrorBytes, kMirrorBytes, pair.b, error) != 0)
        FAIL(error);
    ipc::FabricBootstrap info_a{}, info_b{};
    REQUIRE(pair.a.endpoint->bootstrap_info(pair.a.region, info_a) == 0);
    REQUIRE(pair.b.endpoint->bootstrap_info(pair.b.region, info_b) == 0);
    REQUIRE(pair.a.endpoint->connect_region(pair.a.region, info_b) == 0);
    REQUIRE(pair.b.endpoint->connect_region(pair.b.region, info_a) == 0);
}

// Progress on both sides (A on a thread) until `done(a_outstanding)` or 20 s, where
// a_outstanding is A's publishes in flight as A's thread last saw them (A's endpoint is its
// thread's alone meanwhile). B's notifications go to `on_b`.
template <typename Done, typename Handler>
bool pump_both(Pair &pair, Done done, Handler on_b) {
    std::atomic<bool> stop{false};
    std::atomic<uint32_t> a_outstanding{pair.a.endpoint->outstanding()};
    std::thread side_a([&] {
        while (!stop) {
            const int n = pair.a.endpoint->progress([](uint32_t, uint32_t) {});
            a_outstanding = pair.a.endpoint->outstanding();
            if (n == 0) pair.a.endpoint->wait(1);
        }
    });
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    bool ok = true;
    while (!done(a_outstanding.load())) {
        if (Clock::now() > deadline) {
            ok = false;
            break;
        }
        if (pair.b.endpoint->progress(on_b) == 0) pair.b.endpoint->wait(1);
    }
    stop = true;
    side_a.join();
    return ok;
}

uint32_t word_at(const Side &side, size_t offset) {
    uint32_t value;
    std::memcpy(&value, side.base + offset, 4);
    return value;
}

}  // namespace

TEST_CASE("publish_copy puts the caller's bytes in the peer's copy, not ours") {
    Pair pair;
    open_pair(pair);
    constexpr size_t kAt = 4096;
    const uint32_t ours = 0x11111111, theirs[2] = {0x22222222, 0x33333333};
    std::memcpy(pair.a.base + kAt, &ours, 4);
    REQUIRE(pair.a.endpoint->publish_copy(pair.a.region, kAt,
                                          {reinterpret_cast<const uint8_t *>(theirs), 8}, 5) == 0);
    uint32_t tag = ipc::kNoNotify;
    CHECK(pump_both(
        pair, [&](uint32_t) { return tag != ipc::kNoNotify; },
        [&](uint32_t, uint32_t t) { tag = t; }));
    CHECK(tag == 5);
    CHECK(word_at(pair.b, kAt) == 0x22222222);
    CHECK(word_at(pair.b, kAt + 4) == 0x33333333);
    CHECK(word_at(pair.a, kAt) == 0x11111111);
}

TEST_CASE("a bare notification carries its tag and changes nothing") {
    Pair pair;
    open_pair(pair);
    std::memset(pair.a.base, 0x5a, 64);
    REQUIRE(pair.a.endpoint->notify(pair.a.region, 9) == 0);
    uint32_t tag = ipc::kNoNotify;
    CHECK(pump_both(
        pair, [&](uint32_t) { return tag != ipc::kNoNotify; },
        [&](uint32_t, uint32_t t) { tag = t; }));
    CHECK(tag == 9);
    CHECK(word_at(pair.b, 0) == 0);
}

TEST_CASE("publish_copy checks its size, its range and its tag") {
    Pair pair;
    open_pair(pair);
    auto &endpoint = *pair.a.endpoint;
    uint8_t bytes[ipc::kFabricSnapshotBytes + 4] = {};
    CHECK(endpoint.publish_copy(pair.a.region, 0, {bytes, sizeof(bytes)}) == -EINVAL);
    CHECK(endpoint.publish_copy(pair.a.region, 0, {}) == -EINVAL);  // nothing at all
    CHECK(endpoint.publish_copy(pair.a.region, kMirrorBytes - 4, {bytes, 8}) == -EINVAL);
    CHECK(endpoint.publish_copy(pair.a.region, 0, {bytes, 8}, 4096) == -EINVAL);
    CHECK(endpoint.notify(pair.a.region + 1, 1) == -EINVAL);
}

TEST_CASE("a region is unregistered only when idle; a late message for its index is dropped") {
    Pair pair;
    open_pair(pair);
    auto &a = *pair.a.endpoint;
    auto &b = *pair.b.endpoint;
    uint32_t tag = ipc::kNoNotify;
    // The first publish waits while rxm connects: unregistering would simply drop it. Connect.
    REQUIRE(a.publish(pair.a.region, 0, 64, 1) == 0);
    CHECK(pump_both(
        pair, [&](uint32_t a_out) { return tag == 1 && a_out == 0; },
        [&](uint32_t, uint32_t t) { tag = t; }));
    // Now the provider takes it at once, and holds the region's memory until it completes.
    REQUIRE(a.publish(pair.a.region, 0, 64, 2) == 0);
    CHECK(a.region_outstanding(pair.a.region) == 1);
    CHECK(a.unregister_region(pair.a.region) == -EBUSY);
    CHECK(pump_both(
        pair, [&](uint32_t a_out) { return tag == 2 && a_out == 0; },
        [&](uint32_t, uint32_t t) { tag = t; }));
    REQUIRE(a.unregister_region(pair.a.region) == 0);
    CHECK(a.unregister_region(pair.a.region) == -EINVAL);
    CHECK(a.publish(pair.a.region, 0, 64, 1) == -EINVAL);

    // B ends its region; A, not told yet, publishes into it: dropped, not applied.
    REQUIRE(b.region_outstanding(pair.b.region) == 0);
    REQUIRE(b.unregister_region(pair.b.region) == 0);
    // Its index comes back for the next region, with a new token the old peer does not know.
    uint32_t again = 0;
    REQUIRE(b.register_region(pair.b.base, kMirrorBytes, again) == 0);
    CHECK(again == pair.b.region);
    uint32_t region_a2 = 0;
    REQUIRE(a.register_region(pair.a.base, kMirrorBytes, region_a2) == 0);
    ipc::FabricBootstrap stale{};
    REQUIRE(b.bootstrap_info(again, stale) == 0);
    stale.token ^= 0x5555;  // what the old peer knew: not this region's token
    REQUIRE(a.connect_region(region_a2, stale) == 0);
    const uint32_t marker = 0x7e7e7e7e;
    std::memcpy(pair.a.base + 8192, &marker, 4);
    REQUIRE(a.publish(region_a2, 8192, 4, 2) == 0);
    const uint64_t rejected_before = b.rejected_messages();
    CHECK(pump_both(
        pair, [&](uint32_t) { return b.rejected_messages() > rejected_before; },
        [](uint32_t, uint32_t) {}));
    CHECK(word_at(pair.b, 8192) == 0);
}

TEST_CASE("the publisher keeps order and each snapshot past the endpoint's limit") {
    Pair pair;
    open_pair(pair);
    engine::RegionPublisher publisher;
    publisher.attach(pair.a.endpoint.get(), pair.a.region, pair.a.base);
    // Three times the endpoint's limit, no progress in between: most of them wait in the
    // publisher. Each carries the value it had when published, with that value as its tag.
    constexpr uint32_t kCount = 3 * ipc::kFabricMaxOutstanding;
    constexpr size_t kAt = 4096;
    for (uint32_t k = 0; k < kCount; ++k) {
        std::memcpy(pair.a.base + kAt, &k, 4);
        REQUIRE(publisher.publish(kAt, 4, k % 4000) == 0);
    }
    CHECK_FALSE(publisher.drained());
    uint32_t seen = 0;
    bool in_order = true;
    std::atomic<bool> stop{false};
    std::thread side_a([&] {
        while (!stop) {
            pair.a.endpoint->progress([](uint32_t, uint32_t) {});
            publisher.flush();
            pair.a.endpoint->wait(1);
        }
    });
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (seen < kCount && Clock::now() < deadline) {
        // One notification at a time, so that nothing later is applied before we look.
        ipc::FabricNotification one[1];
        const int n = pair.b.endpoint->progress(std::span<ipc::FabricNotification>(one));
        if (n == 1) {
            // Applied with its notification, each with the value it had when published.
            if (one[0].tag != seen % 4000 || word_at(pair.b, kAt) != seen) in_order = false;
            ++seen;
        } else if (n == 0) {
            pair.b.endpoint->wait(1);
        }
    }
    stop = true;
    side_a.join();
    CHECK(seen == kCount);
    CHECK(in_order);
    CHECK(publisher.error() == 0);
    CHECK(publisher.drained());
}
