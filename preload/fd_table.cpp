#include "fd_table.hpp"

#include <sys/mman.h>

namespace tcps::shim {

bool FdTable::init(size_t entries) {
    if (entries_ || entries == 0) return entries_ != nullptr;
    void *memory = mmap(nullptr, entries * sizeof(std::atomic<uint64_t>), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) return false;
    entries_ = static_cast<std::atomic<uint64_t> *>(memory);  // zero-filled: all kNone
    size_ = entries;
    return true;
}

void FdTable::destroy() {
    if (entries_) munmap(entries_, size_ * sizeof(std::atomic<uint64_t>));
    entries_ = nullptr;
    size_ = 0;
    high_water_.store(0, std::memory_order_relaxed);
}

bool FdTable::set(int fd, FdRef ref) {
    if (fd < 0 || static_cast<size_t>(fd) >= size_) return false;
    int limit = high_water_.load(std::memory_order_relaxed);
    while (limit < fd + 1 &&
           !high_water_.compare_exchange_weak(limit, fd + 1, std::memory_order_acq_rel)) {
    }
    entries_[fd].store(ref.word, std::memory_order_release);
    return true;
}

FdRef FdTable::take(int fd) {
    if (static_cast<size_t>(fd) >= size_) return {};
    return {entries_[fd].exchange(0, std::memory_order_acq_rel)};
}

bool FdTable::take_if(int fd, FdRef expected) {
    if (static_cast<size_t>(fd) >= size_) return false;
    uint64_t word = expected.word;
    return entries_[fd].compare_exchange_strong(word, 0, std::memory_order_acq_rel);
}

void FdTable::forget_all() {
    const int limit = high_water_.load(std::memory_order_acquire);
    for (int fd = 0; fd < limit; ++fd) {
        const FdRef ref{entries_[fd].load(std::memory_order_relaxed)};
        if (ref.kind() == FdKind::kSocket || ref.kind() == FdKind::kInternal)
            entries_[fd].store(0, std::memory_order_relaxed);
    }
}

}  // namespace tcps::shim
