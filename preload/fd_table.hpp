// The shim's fd table: a flat array indexed by fd number, allocated once (anonymous mmap, so
// untouched pages cost nothing). Every interposed call looks its fd up here first: one load.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tcps::shim {

enum class FdKind : uint32_t {
    kNone = 0,
    kSocket = 1,    // an offloaded socket: payload = slot, generation
    kInternal = 2,  // one of the shim's own descriptors (control socket, doorbell, waiter pipe)
    kEpoll = 3,     // an application epoll fd with offloaded members: payload = registry id
};

// One entry, packed in 64 bits so it is read and written with one atomic:
// generation or id (bits 32-63) | kind (bits 24-31) | slot (bits 0-23).
struct FdRef {
    uint64_t word = 0;

    static FdRef socket(uint32_t slot, uint32_t generation) {
        return {(uint64_t{generation} << 32) | (uint64_t{1} << 24) | (slot & 0xffffff)};
    }
    static FdRef internal() { return {uint64_t{2} << 24}; }
    static FdRef epoll(uint32_t id) { return {(uint64_t{id} << 32) | (uint64_t{3} << 24)}; }

    bool empty() const { return word == 0; }
    FdKind kind() const { return static_cast<FdKind>((word >> 24) & 0xff); }
    uint32_t slot() const { return static_cast<uint32_t>(word & 0xffffff); }
    uint32_t generation() const { return static_cast<uint32_t>(word >> 32); }
    uint32_t id() const { return generation(); }
    bool operator==(const FdRef &other) const { return word == other.word; }
};

class FdTable {
  public:
    // Room for fds [0, entries). Returns false if the memory cannot be had (the shim then
    // stays inert: every lookup misses).
    bool init(size_t entries);
    void destroy();

    size_t size() const { return size_; }

    FdRef get(int fd) const {
        if (static_cast<size_t>(fd) >= size_) return {};
        return {entries_[fd].load(std::memory_order_acquire)};
    }
    // False if fd is outside the table (the caller must not offload it).
    bool set(int fd, FdRef ref);
    // Clears the entry and returns what it held.
    FdRef take(int fd);
    // Clears the entry only if it still holds `expected`.
    bool take_if(int fd, FdRef expected);

    // After fork: forget every socket and internal entry (the child owns none of them).
    void forget_all();

    // 1 + the highest fd ever set: bounds scans.
    int limit() const { return high_water_.load(std::memory_order_acquire); }

  private:
    std::atomic<uint64_t> *entries_ = nullptr;
    size_t size_ = 0;
    std::atomic<int> high_water_{0};
};

}  // namespace tcps::shim
