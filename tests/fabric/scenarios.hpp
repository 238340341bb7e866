// Two-sided scenarios over the cross-host channel (ipc/fabric.hpp), shared by the loopback
// test (both sides in one process, one thread each) and fabric_peer (one side per process, for
// the two-namespace test and the measurements).
//
// The mirrored region uses the real tcps layout (ipc/layout.hpp), cut after slot 0's rings: a
// few MB. Side A plays the client (it writes slot 0's line 0, its request and its tx ring);
// side B plays the engine (it writes line 1 and the response). The tag of a notification is
// the slot it is about, as in tcps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "fabric.hpp"
#include "layout.hpp"

namespace tcps::test {

// The control part, chunk 0's queue, holds and slots, and slot 0's tx and rx rings.
inline constexpr size_t kMirrorBytes = ipc::tx_ring_offset(0) + ipc::kRingPairBytes;

// The region for a stream through a ring of `ring_bytes` at slot 0's tx ring: the real layout
// for the default (64 KiB), longer for measuring the transport with a larger window.
constexpr size_t mirror_bytes(uint32_t ring_bytes) {
    return ipc::tx_ring_offset(0) +
           (ring_bytes > ipc::kRingBytes ? ring_bytes : ipc::kRingPairBytes);
}

enum class Role { kA, kB };

struct Side {
    Role role = Role::kA;
    std::unique_ptr<ipc::FabricEndpoint> endpoint;
    uint8_t *base = nullptr;  // the local copy of the region
    size_t len = 0;
    size_t mapped = 0;  // bytes mapped at base (may exceed len: guard pages in tests)
    uint32_t region = 0;
    // Sleep on the wait fd when idle (true) or spin on progress() (false).
    bool sleep_when_idle = true;

    Side() = default;
    Side(Side &&) = default;
    Side &operator=(Side &&) = default;
    ~Side();
    ipc::RegionView view() const { return ipc::RegionView(base, 1); }
};

// Maps `mapped` bytes (zeroed), registers the first `len`, opens the endpoint. 0 or -errno;
// `error` says what failed.
int open_side(const ipc::FabricConfig &config, Role role, size_t len, size_t mapped, Side &side,
              std::string &error);

struct Outcome {
    bool ok = true;
    std::string error;  // what went wrong, when !ok
    // Measurements (zero when the scenario has none).
    uint64_t bytes = 0;
    double seconds = 0;
    double median_us = 0;  // one-way latency, half of the round trip
    double p99_us = 0;
    uint64_t checksum = 0;
};

// Side A fills a 64 KiB range of slot 0's tx ring and part of its request, publishes both with
// tag 0; B checks every byte when the notification arrives and answers in the response.
Outcome run_basic(Side &side, int timeout_ms);

// A publishes, `count` times, a 2 KiB block of slot 0's tx ring (an RMA write), a 256-byte
// payload in its request (a snapshot message), each filled from the version number, and then
// tx_tail = version, notifying each time. B checks, at every notification and every progress
// round, that its copy never shows tx_tail ahead of either payload, that no payload is torn,
// that notifications come in order, and that all arrive; it acknowledges with tx_head so that
// A reuses a ring block only after B has checked it.
Outcome run_ordering(Side &side, uint32_t count, int timeout_ms);

// A streams `total` pseudo-random bytes through slot 0's 64 KiB tx ring (ring bytes, then
// tx_tail with a notification); B consumes them, checksums them, and publishes tx_head back.
// At the end A publishes its own checksum and B compares. `ring_bytes` (a power of two) may
// exceed the layout's 64 KiB to measure with a larger window; the region must then be
// mirror_bytes(ring_bytes) long.
Outcome run_stream(Side &side, uint64_t total, int timeout_ms,
                   uint32_t ring_bytes = ipc::kRingBytes);

// Ping-pong of 4-byte index publishes: A publishes tx_tail = i, B answers tx_head = i.
// Reports the one-way latency (half the round trip), median and 99th percentile.
Outcome run_latency(Side &side, uint32_t rounds, int timeout_ms);

}  // namespace tcps::test
