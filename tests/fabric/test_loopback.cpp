// The cross-host channel with both sides in this process, one thread each, over tcp;ofi_rxm on
// 127.0.0.1 (or $TCPS_FABRIC_PROVIDER). Each side has its own endpoint, domain and copy of the
// region, as two hosts would.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>

#include "scenarios.hpp"

using namespace tcps;
using namespace tcps::test;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kTimeoutMs = 60000;

ipc::FabricConfig loopback_config() {
    ipc::FabricConfig config = ipc::FabricConfig::from_env();
    if (config.node.empty()) config.node = "127.0.0.1";
    return config;
}

struct Pair {
    Side a;
    Side b;
};

void open_or_fail(const ipc::FabricConfig &config, Role role, size_t len, size_t mapped,
                  Side &side) {
    std::string error;
    if (open_side(config, role, len, mapped, side, error) != 0) FAIL(error);
}

// Opens both sides and bootstraps them over a socketpair (both ends at once: each side sends
// first, then reads).
void open_pair(Pair &pair, const ipc::FabricConfig &config_a, const ipc::FabricConfig &config_b,
               size_t len_a = kMirrorBytes, size_t len_b = kMirrorBytes) {
    open_or_fail(config_a, Role::kA, len_a, len_a, pair.a);
    open_or_fail(config_b, Role::kB, len_b, len_b, pair.b);
    int fds[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    int result_b = 0;
    std::thread side_b(
        [&] { result_b = pair.b.endpoint->exchange_bootstrap(fds[1], pair.b.region, 10000); });
    const int result_a = pair.a.endpoint->exchange_bootstrap(fds[0], pair.a.region, 10000);
    side_b.join();
    close(fds[0]);
    close(fds[1]);
    REQUIRE(result_a == 0);
    REQUIRE(result_b == 0);
}

// Runs `scenario` on both sides at once: B on a thread, A here.
template <typename Scenario>
void run_both(Pair &pair, Scenario scenario, Outcome &a, Outcome &b) {
    std::thread side_b([&] { b = scenario(pair.b); });
    a = scenario(pair.a);
    side_b.join();
}

// Progress on one side until `done` or the deadline; notifications go to `on_notification`.
template <typename Done, typename Handler>
bool pump_until(Side &side, Done done, Handler on_notification, int timeout_ms) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!done()) {
        if (Clock::now() > deadline) return false;
        const int n = side.endpoint->progress(on_notification);
        if (n < 0) return false;
        if (n == 0) side.endpoint->wait(10);
    }
    return true;
}

}  // namespace

TEST_CASE("a publish lands in the peer's copy with its notification") {
    Pair pair;
    open_pair(pair, loopback_config(), loopback_config());
    Outcome a, b;
    run_both(
        pair, [](Side &side) { return run_basic(side, kTimeoutMs); }, a, b);
    INFO("A: " << a.error << " / B: " << b.error);
    CHECK(a.ok);
    CHECK(b.ok);
}

TEST_CASE("1000 ordered publishes never show the counter ahead of the payload") {
    Pair pair;
    open_pair(pair, loopback_config(), loopback_config());
    Outcome a, b;
    run_both(
        pair, [](Side &side) { return run_ordering(side, 1000, kTimeoutMs); }, a, b);
    INFO("A: " << a.error << " / B: " << b.error);
    CHECK(a.ok);
    CHECK(b.ok);
    CHECK(b.bytes == 1000);
}

TEST_CASE("64 MB streamed through a slot's tx ring arrive with the same checksum") {
    Pair pair;
    open_pair(pair, loopback_config(), loopback_config());
    Outcome a, b;
    constexpr uint64_t kTotal = 64ull << 20;
    run_both(
        pair, [](Side &side) { return run_stream(side, kTotal, 120000); }, a, b);
    INFO("A: " << a.error << " / B: " << b.error);
    REQUIRE(a.ok);
    REQUIRE(b.ok);
    CHECK(a.bytes == kTotal);
    CHECK(b.bytes == kTotal);
    CHECK(a.checksum == b.checksum);
    WARN("stream through a 64 KiB ring over " << pair.a.endpoint->provider_name() << ": "
                                              << static_cast<double>(kTotal) / a.seconds / 1e6
                                              << " MB/s");
}

TEST_CASE("an idle side sleeps on the wait fd and wakes for a notification") {
    Pair pair;
    open_pair(pair, loopback_config(), loopback_config());
    REQUIRE(pair.b.endpoint->wait_fd() >= 0);
    ipc::SocketSlot &slot = pair.a.view().slot(3);
    const size_t offset = reinterpret_cast<uint8_t *>(&slot.tx_tail) - pair.a.base;

    // rxm connects on the first publish, and while it does, fi_trywait keeps saying "progress
    // first": a warm-up publish, so that what is measured below is the idle sleep alone.
    std::atomic<bool> warmed{false};
    Clock::time_point woke_at;
    int waits = 0;
    uint32_t tag_seen = ipc::kNoNotify;
    std::thread side_b([&] {
        pump_until(
            pair.b, [&] { return warmed.load(); },
            [&](uint32_t, uint32_t tag) {
                if (tag == 1) warmed = true;
            },
            20000);
        const auto deadline = Clock::now() + std::chrono::seconds(20);
        while (tag_seen == ipc::kNoNotify && Clock::now() < deadline) {
            const int n =
                pair.b.endpoint->progress([&](uint32_t, uint32_t tag) { tag_seen = tag; });
            if (n != 0) break;
            // Each wait may last 5 s: only the fd can end it early.
            pair.b.endpoint->wait(5000);
            ++waits;
        }
        woke_at = Clock::now();
    });
    slot.tx_tail.store(1, std::memory_order_release);
    REQUIRE(pair.a.endpoint->publish(pair.a.region, offset, 4, 1) == 0);
    CHECK(pump_until(
        pair.a, [&] { return pair.a.endpoint->outstanding() == 0 && warmed; },
        [](uint32_t, uint32_t) {}, 20000));

    // Let B settle into its sleep, then publish while it sleeps.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    slot.tx_tail.store(42, std::memory_order_release);
    const auto published_at = Clock::now();
    REQUIRE(pair.a.endpoint->publish(pair.a.region, offset, 4, 3) == 0);
    const bool delivered = pump_until(
        pair.a, [&] { return pair.a.endpoint->outstanding() == 0; }, [](uint32_t, uint32_t) {},
        20000);
    side_b.join();
    CHECK(delivered);
    REQUIRE(tag_seen == 3);
    CHECK(pair.b.view().slot(3).tx_tail.load() == 42);
    const auto latency =
        std::chrono::duration_cast<std::chrono::milliseconds>(woke_at - published_at).count();
    INFO("woke " << latency << " ms after the publish, after " << waits << " waits");
    CHECK(latency < 2500);  // well inside one 5 s wait: the fd woke it
    CHECK(waits < 20);      // it slept rather than spun
}

TEST_CASE("publish checks its range, its tag and its connection") {
    Side side;
    open_or_fail(loopback_config(), Role::kA, kMirrorBytes, kMirrorBytes, side);
    auto &endpoint = *side.endpoint;
    CHECK(endpoint.publish(side.region, 0, 64, 0) == -ENOTCONN);
    CHECK(endpoint.publish(side.region + 1, 0, 64, 0) == -EINVAL);
    ipc::FabricBootstrap self{};
    REQUIRE(endpoint.bootstrap_info(side.region, self) == 0);
    ipc::FabricBootstrap wrong = self;
    wrong.region_len += 4096;
    CHECK(endpoint.connect_region(side.region, wrong) == -EPROTO);  // copies must match
    wrong = self;
    wrong.magic = 0;
    CHECK(endpoint.connect_region(side.region, wrong) == -EPROTO);
    wrong = self;
    wrong.address_len = ipc::kFabricAddressMax + 1;
    CHECK(endpoint.connect_region(side.region, wrong) == -EPROTO);
    REQUIRE(endpoint.connect_region(side.region, self) == 0);  // a loop to itself
    CHECK(endpoint.connect_region(side.region, self) == -EISCONN);
    CHECK(endpoint.publish(side.region, kMirrorBytes - 8, 16, 0) == -EINVAL);
    CHECK(endpoint.publish(side.region, kMirrorBytes + 1, 1, 0) == -EINVAL);
    CHECK(endpoint.publish(side.region, SIZE_MAX - 4, 8, 0) == -EINVAL);
    CHECK(endpoint.publish(side.region, 0, 0, 0) == -EINVAL);
    CHECK(endpoint.publish(side.region, 0, 8, 4096) == -EINVAL);  // max_tag
    CHECK(endpoint.publish(side.region, 0, 8, ipc::kFabricRegionFailed) == -EINVAL);

    // More than kFabricMaxOutstanding without progress: -EAGAIN, never a block.
    int ret = 0;
    uint32_t accepted = 0;
    for (uint32_t i = 0; i < ipc::kFabricMaxOutstanding + 10; ++i) {
        ret = endpoint.publish(side.region, 64, 8, ipc::kNoNotify);
        if (ret != 0) break;
        ++accepted;
    }
    CHECK(ret == -EAGAIN);
    CHECK(accepted == ipc::kFabricMaxOutstanding);
    // Progress drains them (the endpoint writes into its own copy).
    CHECK(pump_until(
        side, [&] { return endpoint.outstanding() == 0; }, [](uint32_t, uint32_t) {}, 20000));
    CHECK(endpoint.publish(side.region, 64, 8, 5) == 0);
    uint32_t tag_seen = ipc::kNoNotify;
    CHECK(pump_until(
        side, [&] { return tag_seen != ipc::kNoNotify; },
        [&](uint32_t, uint32_t tag) { tag_seen = tag; }, 20000));
    CHECK(tag_seen == 5);
}

TEST_CASE("messages with an out-of-range tag are dropped whole and counted") {
    ipc::FabricConfig strict = loopback_config();
    strict.max_tag = 16;
    Pair pair;
    open_pair(pair, loopback_config(), strict);
    ipc::SocketSlot &slot = pair.a.view().slot(0);
    const size_t offset = reinterpret_cast<uint8_t *>(&slot.tx_tail) - pair.a.base;
    slot.tx_tail.store(1);
    REQUIRE(pair.a.endpoint->publish(pair.a.region, offset, 4, 100) == 0);  // B's max is 16
    slot.tx_tail.store(2);
    REQUIRE(pair.a.endpoint->publish(pair.a.region, offset, 4, 3) == 0);

    std::vector<uint32_t> seen;
    std::thread side_a([&] {
        pump_until(
            pair.a, [&] { return pair.a.endpoint->outstanding() == 0; }, [](uint32_t, uint32_t) {},
            20000);
    });
    CHECK(pump_until(
        pair.b, [&] { return !seen.empty(); }, [&](uint32_t, uint32_t tag) { seen.push_back(tag); },
        20000));
    side_a.join();
    REQUIRE(seen.size() == 1);
    CHECK(seen[0] == 3);
    CHECK(pair.b.endpoint->rejected_messages() == 1);
    CHECK(pair.b.view().slot(0).tx_tail.load() == 2);  // the second publish, applied
}

// A message must name one of the receiver's regions and carry that region's token: one peer
// of an endpoint cannot publish into another peer's region.
void check_forged_message(const std::function<void(ipc::FabricBootstrap &)> &forge) {
    Pair pair;
    open_or_fail(loopback_config(), Role::kA, kMirrorBytes, kMirrorBytes, pair.a);
    open_or_fail(loopback_config(), Role::kB, kMirrorBytes, kMirrorBytes, pair.b);
    ipc::FabricBootstrap info_a{}, info_b{};
    REQUIRE(pair.a.endpoint->bootstrap_info(pair.a.region, info_a) == 0);
    REQUIRE(pair.b.endpoint->bootstrap_info(pair.b.region, info_b) == 0);
    forge(info_b);
    REQUIRE(pair.a.endpoint->connect_region(pair.a.region, info_b) == 0);
    REQUIRE(pair.b.endpoint->connect_region(pair.b.region, info_a) == 0);
    std::memset(pair.a.base + 4096, 0x77, 4);
    REQUIRE(pair.a.endpoint->publish(pair.a.region, 4096, 4, 1) == 0);
    std::thread side_a([&] {
        pump_until(
            pair.a, [&] { return pair.a.endpoint->outstanding() == 0; }, [](uint32_t, uint32_t) {},
            20000);
    });
    int delivered = 0;
    CHECK(pump_until(
        pair.b, [&] { return pair.b.endpoint->rejected_messages() > 0; },
        [&](uint32_t, uint32_t) { ++delivered; }, 20000));
    side_a.join();
    CHECK(delivered == 0);
    CHECK(pair.b.base[4096] == 0);  // nothing applied
}

TEST_CASE("a message naming a region the receiver does not have is dropped") {
    check_forged_message([](ipc::FabricBootstrap &info) { info.region = 7; });
}

TEST_CASE("a message with another region's token is dropped") {
    check_forged_message([](ipc::FabricBootstrap &info) { info.token ^= 1; });
}

TEST_CASE("a peer cannot write outside the region registered for it") {
    // B maps two copies' worth but registers one; A believes B's region is twice as long (a
    // forged bootstrap) and writes past the end. B's memory past the region must not change.
    constexpr size_t kLen = kMirrorBytes;
    Pair pair;
    open_or_fail(loopback_config(), Role::kA, 2 * kLen, 2 * kLen, pair.a);
    open_or_fail(loopback_config(), Role::kB, kLen, 2 * kLen, pair.b);
    std::memset(pair.b.base + kLen, 0x5a, kLen);  // guard
    std::memset(pair.a.base + kLen, 0xee, kLen);  // what A tries to write there

    ipc::FabricBootstrap info_a{}, info_b{};
    REQUIRE(pair.a.endpoint->bootstrap_info(pair.a.region, info_a) == 0);
    REQUIRE(pair.b.endpoint->bootstrap_info(pair.b.region, info_b) == 0);
    info_b.region_len = 2 * kLen;
    REQUIRE(pair.a.endpoint->connect_region(pair.a.region, info_b) == 0);
    info_a.region_len = kLen;
    REQUIRE(pair.b.endpoint->connect_region(pair.b.region, info_a) == 0);

    // A message naming a range past B's region (B checks it), and an RMA write straddling the
    // end of B's region (the provider checks it against the MR).
    REQUIRE(pair.a.endpoint->publish(pair.a.region, kLen + 4096, 64, 2) == 0);
    REQUIRE(pair.a.endpoint->publish(pair.a.region, kLen - 512, 8192, 2) == 0);
    // Then a legal publish, to know when B has processed everything before it (if the
    // connection survives the refusals).
    pair.a.base[0] = 0x11;
    REQUIRE(pair.a.endpoint->publish(pair.a.region, 0, 1, 1) == 0);

    std::atomic<bool> stop{false};
    std::vector<uint32_t> tags_b;
    std::thread side_b([&] {
        const auto deadline = Clock::now() + std::chrono::seconds(20);
        while (!stop && Clock::now() < deadline) {
            if (pair.b.endpoint->progress([&](uint32_t, uint32_t tag) { tags_b.push_back(tag); }) ==
                0)
                pair.b.endpoint->wait(10);
        }
    });
    // A: until every publish completed or failed.
    std::vector<uint32_t> tags_a;
    pump_until(
        pair.a, [&] { return pair.a.endpoint->outstanding() == 0; },
        [&](uint32_t, uint32_t tag) { tags_a.push_back(tag); }, 20000);
    // Give B a bounded while to take whatever reached it.
    pump_until(
        pair.a,
        [&] { return pair.a.endpoint->region_error(pair.a.region) != 0 || pair.b.base[0] == 0x11; },
        [&](uint32_t, uint32_t tag) { tags_a.push_back(tag); }, 5000);
    stop = true;
    side_b.join();
    // B read the refused write's error already; the message before it may still be queued.
    pump_until(
        pair.b, [&] { return pair.b.endpoint->rejected_messages() > 0; },
        [&](uint32_t, uint32_t tag) { tags_b.push_back(tag); }, 5000);

    bool guard_intact = true;
    for (size_t i = kLen; i < 2 * kLen; ++i)
        if (pair.b.base[i] != 0x5a) guard_intact = false;
    CHECK(guard_intact);
    for (uint32_t tag : tags_b) CHECK(tag != 2);  // no notification for a refused write
    CHECK(pair.b.endpoint->rejected_messages() >= 1);
    const int error_a = pair.a.endpoint->region_error(pair.a.region);
    WARN("out-of-bounds write: A's region error "
         << error_a << " (" << std::strerror(error_a < 0 ? -error_a : 0) << "), B saw "
         << tags_b.size() << " notifications");
    CHECK(error_a != 0);  // the provider reported the refused write to A
}

TEST_CASE("a publish to a peer that has gone fails its region instead of vanishing") {
    Pair pair;
    open_pair(pair, loopback_config(), loopback_config());
    ipc::SocketSlot &slot = pair.a.view().slot(0);
    const size_t offset = reinterpret_cast<uint8_t *>(&slot.tx_tail) - pair.a.base;

    // Connected and working first.
    bool b_got_it = false;
    std::thread side_b([&] {
        pump_until(
            pair.b, [&] { return b_got_it; }, [&](uint32_t, uint32_t) { b_got_it = true; }, 20000);
    });
    REQUIRE(pair.a.endpoint->publish(pair.a.region, offset, 4, 0) == 0);
    CHECK(pump_until(
        pair.a, [&] { return pair.a.endpoint->outstanding() == 0; }, [](uint32_t, uint32_t) {},
        20000));
    side_b.join();
    REQUIRE(b_got_it);

    // B goes away (its endpoint closes, as when its process dies). A keeps publishing: within
    // a bounded time the region must report the failure, and publish must refuse.
    pair.b.endpoint.reset();
    bool failed = false;
    int publish_result = 0;
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    while (!failed && Clock::now() < deadline) {
        publish_result = pair.a.endpoint->publish(pair.a.region, offset, 4, 0);
        if (publish_result != 0 && publish_result != -EAGAIN) break;
        pair.a.endpoint->progress([&](uint32_t, uint32_t tag) {
            if (tag == ipc::kFabricRegionFailed) failed = true;
        });
        pair.a.endpoint->wait(10);
    }
    const int error = pair.a.endpoint->region_error(pair.a.region);
    INFO("region error " << error << ", last publish " << publish_result);
    CHECK(error != 0);
    CHECK(pair.a.endpoint->publish(pair.a.region, offset, 4, 0) == error);
}
