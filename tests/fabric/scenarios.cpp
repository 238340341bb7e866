#include "scenarios.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <vector>

namespace tcps::test {

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kDataSlot = 0;               // the slot the scenarios move data for (the tag)
constexpr uint32_t kDoneSlot = 1;               // the slot of the closing handshake
constexpr uint32_t kTrailerMagic = 0x454e4f44;  // "DONE"

// What A sends in slot 1's request at the end, and B checks.
struct Trailer {
    uint32_t magic;
    uint32_t reserved;
    uint64_t bytes;
    uint64_t checksum;
};

std::string describe(const char *what, int error) {
    return std::string(what) + ": " + std::strerror(-error);
}

size_t offset_of(const Side &side, const void *field) {
    return static_cast<size_t>(static_cast<const uint8_t *>(field) - side.base);
}

// A checksum of a byte stream fed in pieces of any size: the same bytes give the same value
// however they were split. Eight bytes at a time, so it costs little next to the transfer.
class Checksum {
  public:
    void add(const uint8_t *data, size_t len) {
        for (; len > 0 && filled_ != 0; --len) take_byte(*data++);
        for (; len >= 8; data += 8, len -= 8) {
            uint64_t word;
            std::memcpy(&word, data, 8);
            mix(word);
        }
        for (; len > 0; --len) take_byte(*data++);
    }
    uint64_t value() const {
        Checksum copy = *this;
        if (copy.filled_ != 0) copy.mix(copy.partial_);
        return copy.hash_ ^ copy.count_;
    }

  private:
    void take_byte(uint8_t byte) {
        partial_ |= uint64_t{byte} << (8 * filled_);
        if (++filled_ == 8) {
            mix(partial_);
            partial_ = 0;
            filled_ = 0;
        }
    }
    void mix(uint64_t word) {
        hash_ = (hash_ ^ word) * 0x9e3779b97f4a7c15ull;
        hash_ ^= hash_ >> 29;
        ++count_;
    }
    uint64_t hash_ = 0xcbf29ce484222325ull;
    uint64_t partial_ = 0;
    unsigned filled_ = 0;
    uint64_t count_ = 0;
};

// The stream's bytes: a pseudo-random table of prime length, so an offset error anywhere
// shows up as a checksum mismatch, and producing the stream is a memcpy.
class Pattern {
  public:
    static constexpr size_t kBytes = 1'000'003;
    Pattern() : bytes_(kBytes) {
        uint64_t x = 0x2545f4914f6cdd1dull;
        for (auto &b : bytes_) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b = static_cast<uint8_t>(x >> 32);
        }
    }
    // Copies `len` bytes of the stream from `position` to `out`.
    void copy(uint64_t position, uint8_t *out, size_t len) const {
        while (len > 0) {
            const size_t at = position % kBytes;
            const size_t n = std::min(len, kBytes - at);
            std::memcpy(out, bytes_.data() + at, n);
            out += n;
            position += n;
            len -= n;
        }
    }

  private:
    std::vector<uint8_t> bytes_;
};

// The byte at stream position p, for the small fixed tests.
inline uint8_t stream_byte(uint64_t position) {
    const uint64_t x = position * 0x9e3779b97f4a7c15ull;
    return static_cast<uint8_t>((x >> 29) ^ (x >> 47));
}

// Drives one side: progress, queued notifications, publishes that retry on -EAGAIN, sleeping
// on the wait fd when idle, all bounded by one deadline.
class Driver {
  public:
    Driver(Side &side, int timeout_ms)
        : side_(side), deadline_(Clock::now() + std::chrono::milliseconds(timeout_ms)) {}

    const std::string &error() const { return error_; }
    bool failed() const { return !error_.empty(); }
    void fail(std::string message) {
        if (error_.empty()) error_ = std::move(message);
    }

    // One round of progress. When `may_sleep` and nothing arrived, sleeps on the wait fd.
    bool poll(bool may_sleep) {
        if (failed()) return false;
        if (Clock::now() > deadline_) {
            fail("timed out");
            return false;
        }
        ipc::FabricNotification batch[32];
        const int n = side_.endpoint->progress(std::span<ipc::FabricNotification>(batch));
        if (n < 0) {
            fail(describe("progress", n));
            return false;
        }
        for (int i = 0; i < n; ++i) {
            if (batch[i].tag == ipc::kFabricRegionFailed) {
                fail(describe("a publish failed", side_.endpoint->region_error(batch[i].region)));
                return false;
            }
            if (batch[i].region != side_.region) {
                fail("notification for an unknown region");
                return false;
            }
            tags_.push_back(batch[i].tag);
        }
        if (n == 0 && may_sleep && side_.sleep_when_idle) {
            const auto left =
                std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
            const int ret =
                side_.endpoint->wait(static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1000)));
            if (ret < 0) fail(describe("wait", ret));
        }
        return !failed();
    }

    bool publish(const void *field, size_t len, uint32_t tag) {
        const size_t offset = offset_of(side_, field);
        for (;;) {
            const int ret = side_.endpoint->publish(side_.region, offset, len, tag);
            if (ret == 0) return true;
            if (ret != -EAGAIN) {
                fail(describe("publish", ret));
                return false;
            }
            if (!poll(false)) return false;
        }
    }

    // The next notification's tag, waiting for it if needed.
    bool next(uint32_t &tag) {
        while (tags_.empty()) {
            if (!poll(true)) return false;
        }
        tag = tags_.front();
        tags_.pop_front();
        return true;
    }
    bool pending() const { return !tags_.empty(); }
    bool take(uint32_t &tag) {
        if (tags_.empty()) return false;
        tag = tags_.front();
        tags_.pop_front();
        return true;
    }

    // Until every publish of this side has completed locally.
    bool drain() {
        while (side_.endpoint->outstanding() > 0) {
            if (!poll(true)) return false;
        }
        return true;
    }

  private:
    Side &side_;
    Clock::time_point deadline_;
    std::deque<uint32_t> tags_;
    std::string error_;
};

Outcome finish(Driver &driver, Outcome outcome) {
    if (driver.failed()) {
        outcome.ok = false;
        outcome.error = driver.error();
    }
    return outcome;
}

// A's half of the closing handshake: sends the trailer, waits for B's verdict.
void close_as_a(Side &side, Driver &driver, uint64_t bytes, uint64_t checksum) {
    ipc::SocketSlot &done = side.view().slot(kDoneSlot);
    Trailer trailer{kTrailerMagic, 0, bytes, checksum};
    std::memcpy(done.request.opt, &trailer, sizeof(trailer));
    if (!driver.publish(&done.request, sizeof(done.request), kDoneSlot)) return;
    uint32_t tag = 0;
    while (driver.next(tag)) {
        if (tag != kDoneSlot) continue;  // late answers about the data slot
        if (done.response.result != 0)
            driver.fail(describe("B rejected the transfer", done.response.result));
        driver.drain();
        return;
    }
}

// B's half: checks the trailer against what it saw and answers. `bytes`/`checksum` are B's.
void close_as_b(Side &side, Driver &driver, uint64_t bytes, uint64_t checksum) {
    ipc::SocketSlot &done = side.view().slot(kDoneSlot);
    Trailer trailer;
    std::memcpy(&trailer, done.request.opt, sizeof(trailer));
    int result = 0;
    if (trailer.magic != kTrailerMagic || trailer.bytes != bytes || trailer.checksum != checksum)
        result = -EBADMSG;
    done.response.result = result;
    if (!driver.publish(&done.response, sizeof(done.response), kDoneSlot)) return;
    driver.drain();
    if (result != 0)
        driver.fail("trailer mismatch: A sent " + std::to_string(trailer.bytes) + " bytes, B got " +
                    std::to_string(bytes) +
                    (trailer.checksum != checksum ? ", checksums differ" : ""));
}

}  // namespace

Side::~Side() {
    endpoint.reset();  // before the memory it may still write into
    if (base != nullptr) munmap(base, mapped);
}

int open_side(const ipc::FabricConfig &config, Role role, size_t len, size_t mapped, Side &side,
              std::string &error) {
    side.role = role;
    void *memory = mmap(nullptr, mapped, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
        const int ret = -errno;
        error = describe("mmap", ret);
        return ret;
    }
    side.base = static_cast<uint8_t *>(memory);
    side.len = len;
    side.mapped = mapped;
    int ret = ipc::FabricEndpoint::open(config, side.endpoint);
    if (ret < 0) {
        error = describe(("open provider " + config.provider).c_str(), ret);
        return ret;
    }
    ret = side.endpoint->register_region(side.base, len, side.region);
    if (ret < 0) {
        error = describe("register_region", ret);
        return ret;
    }
    return 0;
}

Outcome run_basic(Side &side, int timeout_ms) {
    Driver driver(side, timeout_ms);
    Outcome outcome;
    ipc::SocketSlot &slot = side.view().slot(kDataSlot);
    uint8_t *ring = side.view().tx_ring(kDataSlot, ipc::kRingBytes);
    constexpr size_t kRequestBytes = 200;
    if (side.role == Role::kA) {
        for (size_t i = 0; i < ipc::kRingBytes; ++i) ring[i] = stream_byte(i);
        for (size_t i = 0; i < kRequestBytes; ++i) slot.request.opt[i] = stream_byte(i + 7);
        // The ring goes in place (64 KiB), the request as a snapshot; one notification.
        if (!driver.publish(ring, ipc::kRingBytes, ipc::kNoNotify) ||
            !driver.publish(&slot.request, sizeof(slot.request), kDataSlot))
            return finish(driver, outcome);
        uint32_t tag = 0;
        if (driver.next(tag)) {
            if (tag != kDataSlot) driver.fail("unexpected tag " + std::to_string(tag));
            if (slot.response.result != 0) driver.fail("B saw different bytes");
        }
        driver.drain();
        outcome.bytes = ipc::kRingBytes + sizeof(slot.request);
        return finish(driver, outcome);
    }
    uint32_t tag = 0;
    if (!driver.next(tag)) return finish(driver, outcome);
    if (tag != kDataSlot) driver.fail("unexpected tag " + std::to_string(tag));
    int result = 0;
    for (size_t i = 0; i < ipc::kRingBytes; ++i)
        if (ring[i] != stream_byte(i)) result = -EBADMSG;
    for (size_t i = 0; i < kRequestBytes; ++i)
        if (slot.request.opt[i] != stream_byte(i + 7)) result = -EBADMSG;
    if (result != 0) driver.fail("the published bytes differ in B's copy");
    slot.response.result = result;
    driver.publish(&slot.response, sizeof(slot.response), kDataSlot);
    driver.drain();
    return finish(driver, outcome);
}

Outcome run_ordering(Side &side, uint32_t count, int timeout_ms) {
    Driver driver(side, timeout_ms);
    Outcome outcome;
    ipc::SocketSlot &slot = side.view().slot(kDataSlot);
    // Two payloads per version: 256 bytes of the request (a snapshot message) and a 2 KiB
    // block of the tx ring (an RMA write in place; 16 blocks, reused only after B's head says
    // B has checked them).
    constexpr size_t kPayloadWords = 64;
    constexpr uint32_t kBlockWords = 512;
    constexpr uint32_t kBlocks = 16;
    auto *payload = reinterpret_cast<uint32_t *>(slot.request.opt);
    auto block = [&](uint32_t version) {
        return reinterpret_cast<uint32_t *>(side.view().tx_ring(kDataSlot, ipc::kRingBytes)) +
               (version % kBlocks) * kBlockWords;
    };
    auto block_word = [](uint32_t version, uint32_t i) { return version * 0x9e3779b1u + i; };

    if (side.role == Role::kA) {
        uint32_t acked = 0;
        for (uint32_t version = 1; version <= count && !driver.failed(); ++version) {
            while (version - acked >= kBlocks && !driver.failed()) {
                uint32_t tag;
                if (driver.next(tag) && tag == kDataSlot)
                    acked = slot.tx_head.load(std::memory_order_acquire);
            }
            uint32_t *words = block(version);
            for (uint32_t i = 0; i < kBlockWords; ++i) words[i] = block_word(version, i);
            for (size_t i = 0; i < kPayloadWords; ++i) payload[i] = version;
            slot.tx_tail.store(version, std::memory_order_release);
            if (!driver.publish(words, kBlockWords * 4, ipc::kNoNotify) ||
                !driver.publish(payload, kPayloadWords * 4, ipc::kNoNotify) ||
                !driver.publish(&slot.tx_tail, 4, kDataSlot))
                break;
        }
        if (!driver.failed()) close_as_a(side, driver, count, count);
        return finish(driver, outcome);
    }

    // B: the invariant is checked after every progress round, not only at notifications.
    uint32_t notifications = 0;
    uint32_t last_tail = 0;
    auto check_copy = [&] {
        const uint32_t tail = slot.tx_tail.load(std::memory_order_acquire);
        const uint32_t version = payload[0];
        for (size_t i = 1; i < kPayloadWords; ++i)
            if (payload[i] != version) {
                driver.fail("torn payload at tail " + std::to_string(tail));
                return;
            }
        if (tail > version)
            driver.fail("counter ahead of payload: tail " + std::to_string(tail) + ", payload " +
                        std::to_string(version));
        if (tail < last_tail) driver.fail("tail went backwards");
        last_tail = tail;
    };
    while (!driver.failed()) {
        uint32_t tag;
        if (!driver.take(tag)) {
            if (driver.poll(true)) check_copy();
            continue;
        }
        if (tag == kDoneSlot) break;
        if (tag != kDataSlot) {
            driver.fail("unexpected tag " + std::to_string(tag));
            break;
        }
        ++notifications;
        check_copy();
        // Notification k comes after publish k: the copy shows at least version k.
        if (last_tail < notifications)
            driver.fail("notification " + std::to_string(notifications) +
                        " before its data (tail " + std::to_string(last_tail) + ")");
        // The RMA-written block of the version the counter shows is all there.
        const uint32_t *words = block(last_tail);
        for (uint32_t i = 0; i < kBlockWords; ++i)
            if (words[i] != block_word(last_tail, i)) {
                driver.fail("counter ahead of the ring block at tail " + std::to_string(last_tail));
                break;
            }
        slot.tx_head.store(last_tail, std::memory_order_release);
        if (!driver.publish(&slot.tx_head, 4, kDataSlot)) break;
    }
    if (!driver.failed()) {
        if (notifications != count)
            driver.fail("got " + std::to_string(notifications) + " notifications of " +
                        std::to_string(count));
        close_as_b(side, driver, notifications, last_tail);
    }
    outcome.bytes = notifications;
    return finish(driver, outcome);
}

Outcome run_stream(Side &side, uint64_t total, int timeout_ms, uint32_t ring_bytes) {
    Driver driver(side, timeout_ms);
    Outcome outcome;
    ipc::SocketSlot &slot = side.view().slot(kDataSlot);
    uint8_t *ring = side.view().tx_ring(kDataSlot, ipc::kRingBytes);
    const uint32_t kRing = ring_bytes;
    if ((kRing & (kRing - 1)) != 0 || ipc::tx_ring_offset(kDataSlot) + kRing > side.len) {
        outcome.ok = false;
        outcome.error = "the ring does not fit the region";
        return outcome;
    }
    // Published per tail update: at most 64 KiB, and at least two fit in the ring so one is
    // in flight while B takes the other.
    const uint32_t kChunk = std::min<uint32_t>(kRing / 2, 64 * 1024);
    Checksum checksum;
    const Pattern pattern;  // before the clock starts (B has no use for it)
    const auto start = Clock::now();

    if (side.role == Role::kA) {
        uint32_t tail = 0;
        uint32_t head = 0;
        uint64_t sent = 0;
        uint64_t consumed = 0;
        while (consumed < total && !driver.failed()) {
            bool progressed = false;
            while (sent < total && tail - head < kRing && !driver.failed()) {
                const uint32_t room = kRing - (tail - head);
                const uint32_t n = static_cast<uint32_t>(
                    std::min<uint64_t>(std::min<uint32_t>(room, kChunk), total - sent));
                // Up to two pieces: to the end of the ring, then from its start.
                const uint32_t at = tail & (kRing - 1);
                const uint32_t first = std::min(n, kRing - at);
                pattern.copy(sent, ring + at, first);
                if (n > first) pattern.copy(sent + first, ring, n - first);
                checksum.add(ring + at, first);
                if (n > first) checksum.add(ring, n - first);
                if (!driver.publish(ring + at, first, ipc::kNoNotify)) break;
                if (n > first && !driver.publish(ring, n - first, ipc::kNoNotify)) break;
                tail += n;
                sent += n;
                slot.tx_tail.store(tail, std::memory_order_release);
                if (!driver.publish(&slot.tx_tail, 4, kDataSlot)) break;
                progressed = true;
            }
            uint32_t tag;
            while (driver.take(tag)) {
                if (tag != kDataSlot) continue;
                // B's head is untrusted: it may only move forward, up to our tail.
                const uint32_t new_head = slot.tx_head.load(std::memory_order_acquire);
                if (new_head - head > tail - head) {
                    driver.fail("B's head overruns the tail");
                    break;
                }
                consumed += new_head - head;
                head = new_head;
                progressed = true;
            }
            if (!progressed) driver.poll(true);
        }
        outcome.seconds = std::chrono::duration<double>(Clock::now() - start).count();
        outcome.bytes = consumed;
        outcome.checksum = checksum.value();
        if (!driver.failed()) close_as_a(side, driver, sent, checksum.value());
        return finish(driver, outcome);
    }

    uint32_t head = 0;
    uint64_t received = 0;
    for (;;) {
        uint32_t tag = 0;
        if (!driver.next(tag)) break;
        if (tag == kDoneSlot) {
            close_as_b(side, driver, received, checksum.value());
            break;
        }
        if (tag != kDataSlot) continue;
        const uint32_t tail = slot.tx_tail.load(std::memory_order_acquire);
        if (tail - head > kRing) {
            driver.fail("A's tail overruns the ring");
            break;
        }
        if (tail == head) continue;  // an older notification: already consumed
        const uint32_t n = tail - head;
        const uint32_t at = head & (kRing - 1);
        const uint32_t first = std::min(n, kRing - at);
        checksum.add(ring + at, first);
        if (n > first) checksum.add(ring, n - first);
        head = tail;
        received += n;
        slot.tx_head.store(head, std::memory_order_release);
        if (!driver.publish(&slot.tx_head, 4, kDataSlot)) break;
    }
    outcome.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    outcome.bytes = received;
    outcome.checksum = checksum.value();
    return finish(driver, outcome);
}

Outcome run_latency(Side &side, uint32_t rounds, int timeout_ms) {
    Driver driver(side, timeout_ms);
    Outcome outcome;
    ipc::SocketSlot &slot = side.view().slot(kDataSlot);
    constexpr uint32_t kWarmup = 100;
    if (side.role == Role::kA) {
        std::vector<double> samples;
        samples.reserve(rounds);
        for (uint32_t i = 1; i <= rounds + kWarmup && !driver.failed(); ++i) {
            const auto t0 = Clock::now();
            slot.tx_tail.store(i, std::memory_order_release);
            if (!driver.publish(&slot.tx_tail, 4, kDataSlot)) break;
            uint32_t tag = 0;
            while (driver.next(tag)) {
                if (tag == kDataSlot && slot.tx_head.load(std::memory_order_acquire) == i) break;
            }
            if (driver.failed()) break;
            if (i > kWarmup)
                samples.push_back(
                    std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        }
        if (!samples.empty()) {
            std::sort(samples.begin(), samples.end());
            outcome.median_us = samples[samples.size() / 2] / 2;
            outcome.p99_us = samples[samples.size() * 99 / 100] / 2;
        }
        if (!driver.failed()) close_as_a(side, driver, 0, 0);
        return finish(driver, outcome);
    }
    for (;;) {
        uint32_t tag = 0;
        if (!driver.next(tag)) break;
        if (tag == kDoneSlot) {
            close_as_b(side, driver, 0, 0);
            break;
        }
        if (tag != kDataSlot) continue;
        slot.tx_head.store(slot.tx_tail.load(std::memory_order_acquire), std::memory_order_release);
        if (!driver.publish(&slot.tx_head, 4, kDataSlot)) break;
    }
    return finish(driver, outcome);
}

}  // namespace tcps::test
