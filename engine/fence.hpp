// A full memory barrier (StoreLoad) for the Dekker-style handshakes with clients: "publish,
// then look at the other side's flag". TSan does not model std::atomic_thread_fence (GCC warns
// -Wtsan), so sanitizer builds use a seq_cst read-modify-write instead, which is also a full
// barrier on the machines we run on.
#pragma once

#include <atomic>

namespace tcps::engine {

inline void full_fence() {
#if defined(__SANITIZE_THREAD__)
    static std::atomic<unsigned> barrier{0};
    barrier.fetch_add(0, std::memory_order_seq_cst);
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace tcps::engine
