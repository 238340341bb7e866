#include "mirror.hpp"

#include <cerrno>
#include <cstring>

namespace tcps::engine {

namespace {

// A session whose publishes pile up this far is not being served by its peer: fail it rather
// than grow without bound.
constexpr size_t kMaxWaiting = 1 << 16;

}  // namespace

int RegionPublisher::fail(int error) {
    if (error_ == 0) error_ = error;
    waiting_.clear();
    return error_;
}

int RegionPublisher::wait(size_t offset, const void *bytes, size_t len, uint32_t tag, bool copied) {
    if (waiting_.size() >= kMaxWaiting) return fail(-ENOBUFS);
    Waiting &item = waiting_.emplace_back();
    item.offset = offset;
    item.len = static_cast<uint32_t>(len);
    item.tag = tag;
    item.copied = copied;
    if (copied && len > 0) std::memcpy(item.bytes.data(), bytes, len);
    return 0;
}

int RegionPublisher::post(const Waiting &item) {
    if (item.copied)
        return endpoint_->publish_copy(region_, item.offset, {item.bytes.data(), item.len},
                                       item.tag);
    return endpoint_->publish(region_, item.offset, item.len, item.tag);
}

int RegionPublisher::publish(size_t offset, size_t len, uint32_t tag) {
    if (error_ != 0) return error_;
    if (len == 0) return tag == ipc::kNoNotify ? 0 : notify(tag);
    if (waiting_.empty()) {
        const int ret = endpoint_->publish(region_, offset, len, tag);
        if (ret != -EAGAIN) return ret == 0 ? 0 : fail(ret);
    }
    // A small range is snapshotted now, as the endpoint would have done.
    const bool small = len <= ipc::kFabricSnapshotBytes;
    return wait(offset, small ? base_ + offset : nullptr, len, tag, small);
}

int RegionPublisher::publish_copy(size_t offset, const void *bytes, size_t len, uint32_t tag) {
    if (error_ != 0) return error_;
    if (len > ipc::kFabricSnapshotBytes) return -EINVAL;
    if (waiting_.empty()) {
        const int ret = endpoint_->publish_copy(region_, offset,
                                                {static_cast<const uint8_t *>(bytes), len}, tag);
        if (ret != -EAGAIN) return ret == 0 ? 0 : fail(ret);
    }
    return wait(offset, bytes, len, tag, true);
}

int RegionPublisher::publish_ring(size_t ring_offset, uint32_t ring_bytes, uint32_t from,
                                  uint32_t to) {
    const uint32_t count = to - from;
    if (count == 0 || count > ring_bytes) return error_;
    const uint32_t at = from & (ring_bytes - 1);
    const uint32_t first = count < ring_bytes - at ? count : ring_bytes - at;
    int ret = publish(ring_offset + at, first);
    if (ret == 0 && count > first) ret = publish(ring_offset, count - first);
    return ret;
}

int RegionPublisher::flush() {
    while (error_ == 0 && !waiting_.empty()) {
        const int ret = post(waiting_.front());
        if (ret == -EAGAIN) break;
        if (ret != 0) return fail(ret);
        waiting_.pop_front();
    }
    return error_;
}

}  // namespace tcps::engine
