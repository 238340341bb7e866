// Small pieces every part of the shim uses: export marker, clock, spin hint, the socket lock.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <ctime>

// Interposed entry points are the only symbols libtcps.so exports (with the version script).
#define TCPS_EXPORT extern "C" __attribute__((visibility("default")))

namespace tcps::shim {

inline uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield" ::: "memory");
#else
    std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

// Serialises one direction of one socket across threads, as Linux's socket lock does: a whole
// send() is never interleaved with another. Uncontended, lock and unlock are one atomic each;
// contended threads sleep on a process-private futex (0 free, 1 held, 2 held with sleepers).
class SocketLock {
  public:
    bool try_lock() {
        uint32_t expected = 0;
        return word_.compare_exchange_strong(expected, 1, std::memory_order_acquire,
                                             std::memory_order_relaxed);
    }
    void lock() {
        if (try_lock()) return;
        for (int i = 0; i < 100; ++i) {
            cpu_relax();
            if (word_.load(std::memory_order_relaxed) == 0 && try_lock()) return;
        }
        // Uninterruptible like lock_sock(): a signal does not make the caller give up.
        while (word_.exchange(2, std::memory_order_acquire) != 0)
            syscall(SYS_futex, reinterpret_cast<uint32_t *>(&word_), FUTEX_WAIT_PRIVATE, 2, nullptr,
                    nullptr, 0);
    }
    void unlock() {
        if (word_.exchange(0, std::memory_order_release) == 2)
            syscall(SYS_futex, reinterpret_cast<uint32_t *>(&word_), FUTEX_WAKE_PRIVATE, 1, nullptr,
                    nullptr, 0);
    }
    bool held() const { return word_.load(std::memory_order_relaxed) != 0; }
    void reset() { word_.store(0, std::memory_order_relaxed); }

  private:
    std::atomic<uint32_t> word_{0};
};

class SocketLockGuard {
  public:
    explicit SocketLockGuard(SocketLock &lock) : lock_(lock) { lock_.lock(); }
    ~SocketLockGuard() { lock_.unlock(); }
    SocketLockGuard(const SocketLockGuard &) = delete;
    SocketLockGuard &operator=(const SocketLockGuard &) = delete;

  private:
    SocketLock &lock_;
};

}  // namespace tcps::shim
