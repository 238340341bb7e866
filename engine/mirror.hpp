// One side's publishes into a mirrored region (ipc/fabric.hpp), kept in order even when the
// endpoint cannot take them yet. Used by the engine for a remote session and by tcps-relay for
// each client's region.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>

#include "fabric.hpp"

namespace tcps::engine {

class RegionPublisher {
  public:
    // `base`: our copy of the region, as registered as `region` with `endpoint`.
    void attach(ipc::FabricEndpoint *endpoint, uint32_t region, const uint8_t *base) {
        endpoint_ = endpoint;
        region_ = region;
        base_ = base;
    }
    uint32_t region() const { return region_; }

    // publish(), publish_copy() and notify() of the endpoint, for this region. What the
    // endpoint cannot take now (-EAGAIN) waits here, behind which everything later waits too,
    // and goes out with flush(). A small range is copied when it waits, so the peer still gets
    // what it held at the call; ring bytes are read in place when they go, which the rings
    // allow: a producer rewrites ring bytes only after the consumer published its head.
    // Returns 0 or the region's error (sticky: the mirror is no longer exact).
    int publish(size_t offset, size_t len, uint32_t tag = ipc::kNoNotify);
    int publish_copy(size_t offset, const void *bytes, size_t len, uint32_t tag = ipc::kNoNotify);
    int notify(uint32_t tag) { return publish_copy(0, nullptr, 0, tag); }
    // Bytes [from, to) of the ring at `ring_offset` (`ring_bytes`, a power of two), wrapping.
    int publish_ring(size_t ring_offset, uint32_t ring_bytes, uint32_t from, uint32_t to);

    // Posts what waits, as far as the endpoint takes it. 0 or the region's error.
    int flush();
    bool drained() const { return waiting_.empty(); }
    // The peer is gone: what waits will never go.
    void discard() { waiting_.clear(); }
    int error() const { return error_; }

  private:
    struct Waiting {
        uint64_t offset;
        uint32_t len;
        uint32_t tag;
        bool copied;  // bytes holds the snapshot; otherwise the range is read when posted
        std::array<uint8_t, ipc::kFabricSnapshotBytes> bytes;
    };
    int wait(size_t offset, const void *bytes, size_t len, uint32_t tag, bool copied);
    int post(const Waiting &item);
    int fail(int error);

    ipc::FabricEndpoint *endpoint_ = nullptr;
    uint32_t region_ = 0;
    const uint8_t *base_ = nullptr;
    std::deque<Waiting> waiting_;
    int error_ = 0;
};

}  // namespace tcps::engine
