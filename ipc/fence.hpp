// Memory barriers for the Dekker-style handshakes with clients ("publish, then look at the
// other side's flag") and for the fabric's mirror. TSan does not model
// std::atomic_thread_fence (GCC warns -Wtsan), so sanitizer builds use a read-modify-write of
// the same order instead, which is also such a barrier on the machines we run on.
#pragma once

#include <atomic>

namespace tcps::ipc {

namespace detail {
inline std::atomic<unsigned> fence_word{0};
}  // namespace detail

// A fence of `order`, or under TSan the read-modify-write of that order that stands for it.
inline void fence(std::memory_order order) {
#if defined(__SANITIZE_THREAD__)
    detail::fence_word.fetch_add(0, order);
#else
    std::atomic_thread_fence(order);
#endif
}

// StoreLoad: our stores before our later loads.
inline void full_fence() {
    fence(std::memory_order_seq_cst);
}

// Every store before it is visible before any store after it (a plain memcpy's).
inline void release_fence() {
    fence(std::memory_order_release);
}

}  // namespace tcps::ipc
