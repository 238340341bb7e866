// Small pieces every part of the shim uses: export marker, clock, spin hint, the socket lock.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
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

// This process's pid, refreshed in a forked child: the owner mark of the locks below.
inline std::atomic<int> g_self_pid{0};

// A vfork()ed child (or posix_spawn's, system()'s) runs on its parent's memory until it execs
// or exits: it must not change the shim's state, which is the parent's. A syscall: only the
// calls that change descriptors ask.
inline bool in_vfork_child() {
    return syscall(SYS_getpid) != g_self_pid.load(std::memory_order_relaxed);
}

// True when process `pid` no longer exists (a lock it held is abandoned).
inline bool process_gone(int pid) {
    return pid > 0 && syscall(SYS_kill, pid, 0) != 0 && errno == ESRCH;
}

// Serialises one direction of one socket (or its control requests) across the threads of every
// process that holds it, as Linux's socket lock does: a whole send() is never interleaved with
// another. The lock word lives in the socket's slot in shared memory (layout.hpp); uncontended,
// lock and unlock are one atomic each, contended threads sleep on a shared futex (0 free, 1
// held, 2 held with sleepers). The holder's pid sits beside the word, so a lock left held by a
// process that died is taken over instead of blocking the family forever.
class SocketLock {
  public:
    void bind(std::atomic<uint32_t> *word, std::atomic<uint32_t> *owner) {
        word_ = word;
        owner_ = owner;
    }
    bool try_lock() {
        uint32_t expected = 0;
        if (!word_->compare_exchange_strong(expected, 1, std::memory_order_acquire,
                                            std::memory_order_relaxed))
            return false;
        owner_->store(static_cast<uint32_t>(g_self_pid.load(std::memory_order_relaxed)),
                      std::memory_order_relaxed);
        return true;
    }
    void lock() {
        if (try_lock()) return;
        for (int i = 0; i < 100; ++i) {
            cpu_relax();
            if (word_->load(std::memory_order_relaxed) == 0 && try_lock()) return;
        }
        // Uninterruptible like lock_sock(): a signal does not make the caller give up.
        while (word_->exchange(2, std::memory_order_acquire) != 0) {
            timespec limit{0, 100'000'000};  // then look whether the holder still lives
            const long rc = syscall(SYS_futex, reinterpret_cast<uint32_t *>(word_), FUTEX_WAIT, 2,
                                    &limit, nullptr, 0);
            if (rc != 0 && errno == ETIMEDOUT) take_over_abandoned();
        }
        owner_->store(static_cast<uint32_t>(g_self_pid.load(std::memory_order_relaxed)),
                      std::memory_order_relaxed);
    }
    void unlock() {
        owner_->store(0, std::memory_order_relaxed);
        if (word_->exchange(0, std::memory_order_release) == 2)
            syscall(SYS_futex, reinterpret_cast<uint32_t *>(word_), FUTEX_WAKE, 1, nullptr, nullptr,
                    0);
    }
    bool held() const { return word_->load(std::memory_order_relaxed) != 0; }

  private:
    void take_over_abandoned() {
        uint32_t pid = owner_->load(std::memory_order_relaxed);
        if (pid == 0 || !process_gone(static_cast<int>(pid))) return;
        if (owner_->compare_exchange_strong(pid, 0, std::memory_order_relaxed))
            word_->store(0, std::memory_order_release);
    }

    std::atomic<uint32_t> *word_ = nullptr;
    std::atomic<uint32_t> *owner_ = nullptr;
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
