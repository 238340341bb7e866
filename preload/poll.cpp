// poll/ppoll/select/pselect over a mix of offloaded and kernel fds: offloaded readiness comes
// from the slots, kernel readiness from the real ppoll, and a sleep waits on both at once
// (the kernel fds plus this thread's waiter pipe), so no wake-up is lost and idle costs no CPU.
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "libc.hpp"
#include "ops.hpp"

namespace tcps::shim {

namespace {

constexpr nfds_t kStackEntries = 64;

timespec to_timespec(uint64_t ns) {
    return {static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
}

// Scratch arrays: on the stack for the usual small sets, on the heap beyond.
template <class T>
class Scratch {
  public:
    explicit Scratch(size_t n) : data_(n <= kStackEntries ? stack_ : nullptr) {
        if (!data_) data_ = static_cast<T *>(std::malloc(n * sizeof(T)));
    }
    ~Scratch() {
        if (data_ != stack_) std::free(data_);
    }
    Scratch(const Scratch &) = delete;
    Scratch &operator=(const Scratch &) = delete;
    T *get() const { return data_; }

  private:
    T stack_[kStackEntries];
    T *data_;
};

bool fd_is_offloaded(int fd) {
    FdRef ref = g_fds.get(fd);
    // A socket received with SCM_RIGHTS is offloaded at its first use.
    if (__builtin_expect(ref.empty(), 0) && adopt_pending(fd)) ref = g_fds.get(fd);
    return ref.kind() == FdKind::kSocket;
}

bool bit_is_set(const fd_set *set, int fd) {
    constexpr int kBits = 8 * sizeof(unsigned long);
    return set && (reinterpret_cast<const unsigned long *>(set)[fd / kBits] >> (fd % kBits)) & 1;
}

void set_bit(fd_set *set, int fd) {
    constexpr int kBits = 8 * sizeof(unsigned long);
    reinterpret_cast<unsigned long *>(set)[fd / kBits] |= 1ul << (fd % kBits);
}

void clear_bits(fd_set *set, int nfds) {
    if (!set) return;
    constexpr int kBits = 8 * sizeof(unsigned long);
    std::memset(set, 0, (static_cast<size_t>(nfds) + kBits - 1) / kBits * sizeof(unsigned long));
}

}  // namespace

KernelWaits::KernelWaits(const pollfd *fds, nfds_t nfds) {
    if (__builtin_expect(!kernel_served_any(), 1) || !fds) return;
    for (nfds_t i = 0; i < nfds && !became_ours_; ++i)
        if (fds[i].fd >= 0) add(fds[i].fd);
}

KernelWaits::KernelWaits(int nfds, const fd_set *r, const fd_set *w, const fd_set *e) {
    if (__builtin_expect(!kernel_served_any(), 1)) return;
    const int limit = std::min<int>(nfds, g_fds.limit());
    for (int fd = 0; fd < limit && !became_ours_; ++fd)
        if (bit_is_set(r, fd) || bit_is_set(w, fd) || bit_is_set(e, fd)) add(fd);
}

void KernelWaits::add(int fd) {
    for (size_t k = 0; k < count_; ++k)
        if (counted_[k] == fd) return;  // one count per socket is enough
    if (count_ == capacity_) {
        // More kernel-served sockets in one set than inline room: rare, and not a data path.
        int *grown = static_cast<int *>(std::malloc(2 * capacity_ * sizeof(int)));
        if (!grown) return;  // uncounted: as before counting existed
        std::memcpy(grown, counted_, count_ * sizeof(int));
        if (counted_ != inline_) std::free(counted_);
        counted_ = grown;
        capacity_ *= 2;
    }
    const int rc = begin_kernel_wait(fd);
    if (rc > 0) counted_[count_++] = fd;
    if (rc < 0) became_ours_ = true;
}

KernelWaits::~KernelWaits() {
    for (size_t k = 0; k < count_; ++k) end_kernel_wait(counted_[k]);
    if (counted_ != inline_) std::free(counted_);
}

bool poll_has_offloaded(const pollfd *fds, nfds_t nfds) {
    if (g_fds.size() == 0 || !fds) return false;
    for (nfds_t i = 0; i < nfds; ++i)
        if (fd_is_offloaded(fds[i].fd)) return true;
    return false;
}

long op_poll(pollfd *fds, nfds_t nfds, int64_t timeout_ns, const sigset_t *sigmask) {
    // Kernel entries go to the real ppoll (negative fds included: it ignores them), with one
    // spare entry for the waiter pipe; `where` maps them back.
    Scratch<pollfd> kernel(nfds + 1);
    Scratch<nfds_t> where(nfds + 1);
    Scratch<nfds_t> offloaded(nfds + 1);
    if (!kernel.get() || !where.get() || !offloaded.get()) return -ENOMEM;
    nfds_t kernel_count = 0;
    nfds_t offloaded_count = 0;
    for (nfds_t i = 0; i < nfds; ++i) {
        fds[i].revents = 0;
        if (fd_is_offloaded(fds[i].fd)) {
            offloaded.get()[offloaded_count++] = i;
        } else {
            kernel.get()[kernel_count] = fds[i];
            where.get()[kernel_count++] = i;
        }
    }

    // An offloaded fd that is no longer ours: closed under us, or handed back to the kernel
    // (another thread passed it on, or the engine asked for it back). Then the fds are sorted
    // again, and the kernel says which.
    bool moved = false;
    auto scan = [&] {
        long ready = 0;
        for (nfds_t k = 0; k < offloaded_count; ++k) {
            pollfd &p = fds[offloaded.get()[k]];
            SocketRef ref;
            uint32_t mask = 0;
            if (find_socket(p.fd, ref)) {
                if (p.events & POLLPRI) want_urgent(ref);  // also select()'s exceptfds
                mask = reported_events(current_mask(ref), static_cast<uint16_t>(p.events));
            } else if (g_fds.get(p.fd).kind() != FdKind::kSocket) {
                moved = true;
            } else {
                mask = POLLNVAL;  // its slot went to another socket under us
            }
            p.revents = static_cast<short>(mask);
            if (mask) ++ready;
        }
        return moved ? 0 : ready;
    };
    const uint64_t called = now_ns();
    auto again = [&]() -> long {
        int64_t left = timeout_ns;
        if (timeout_ns > 0) {
            const uint64_t spent = now_ns() - called;
            left = spent >= static_cast<uint64_t>(timeout_ns) ? 0 : timeout_ns - spent;
        }
        return op_poll(fds, nfds, left, sigmask);
    };
    auto copy_back = [&] {
        for (nfds_t k = 0; k < kernel_count; ++k)
            fds[where.get()[k]].revents = kernel.get()[k].revents;
    };
    // Offloaded fds are ready: the kernel ones get a look without waiting.
    auto finish_ready = [&](long ready) -> long {
        if (kernel_count == 0) return ready;
        timespec zero{0, 0};
        const int n = real(libc.ppoll)(kernel.get(), kernel_count, &zero, sigmask);
        if (n > 0) {
            copy_back();
            ready += n;
        }
        return ready;
    };

    long ready = scan();
    if (moved) return again();
    if (ready > 0 || timeout_ns == 0) {
        if (ready == 0) {
            timespec zero{0, 0};
            const int n = real(libc.ppoll)(kernel.get(), kernel_count, &zero, sigmask);
            if (n < 0) return -errno;
            copy_back();
            return n;
        }
        return finish_ready(ready);
    }
    const uint64_t start = now_ns();
    const uint64_t deadline = timeout_ns > 0 ? start + static_cast<uint64_t>(timeout_ns) : 0;
    const uint64_t spin_end = start + spin_budget_ns();
    for (unsigned i = 1; now_ns() < spin_end; ++i) {
        cpu_relax();
        if ((i & 7) == 0 && (ready = scan()) > 0) return finish_ready(ready);
        if (moved) return again();
    }
    const SpinLearner learn{start};
    for (;;) {
        const bool armed = waiter_arm(ipc::kWaitAnySlot);
        if ((ready = scan()) > 0 || moved) {
            if (armed) waiter_disarm();
            return moved ? again() : finish_ready(ready);
        }
        nfds_t count = kernel_count;
        if (armed) kernel.get()[count++] = {waiter_fd(), POLLIN, 0};
        uint64_t wait_ns = UINT64_MAX;
        if (deadline != 0) {
            const uint64_t now = now_ns();
            wait_ns = now >= deadline ? 0 : deadline - now;
        }
        // Without a waiter (nested in a signal handler, none left) we look again every 1 ms;
        // without an engine nothing offloaded will change, so no need.
        if (!armed && !session_dead() && wait_ns > 1'000'000) wait_ns = 1'000'000;
        timespec ts = to_timespec(wait_ns);
        int n;
        int saved;
        {
            const KernelWaits waits(kernel.get(), kernel_count);
            if (waits.became_ours()) {
                if (armed) waiter_disarm();
                return again();
            }
            n = real(libc.ppoll)(kernel.get(), count, wait_ns == UINT64_MAX ? nullptr : &ts,
                                 sigmask);
            saved = errno;
        }
        short pipe_events = 0;
        if (armed) {
            pipe_events = kernel.get()[kernel_count].revents;
            waiter_disarm();
            if ((pipe_events & (POLLHUP | POLLERR | POLLNVAL)) && !(pipe_events & POLLIN))
                mark_session_dead();
        }
        if (n < 0) return -saved;
        const long kernel_ready = n - (pipe_events ? 1 : 0);
        ready = scan();
        if (moved) return again();
        if (kernel_ready > 0 || ready > 0) {
            copy_back();
            return ready + kernel_ready;
        }
        if (deadline != 0 && now_ns() >= deadline) return 0;
    }
}

bool select_has_offloaded(int nfds, const fd_set *r, const fd_set *w, const fd_set *e) {
    if (g_fds.size() == 0 || nfds <= 0) return false;
    const int limit = std::min<int>(nfds, g_fds.limit());
    for (int fd = 0; fd < limit; ++fd)
        if ((bit_is_set(r, fd) || bit_is_set(w, fd) || bit_is_set(e, fd)) && fd_is_offloaded(fd))
            return true;
    return false;
}

long op_select(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t timeout_ns,
               const sigset_t *sigmask, int64_t *remaining_ns) {
    if (nfds < 0) return -EINVAL;
    size_t count = 0;
    for (int fd = 0; fd < nfds; ++fd)
        if (bit_is_set(r, fd) || bit_is_set(w, fd) || bit_is_set(e, fd)) ++count;
    Scratch<pollfd> fds(count);
    if (!fds.get()) return -ENOMEM;
    size_t k = 0;
    for (int fd = 0; fd < nfds; ++fd) {
        short events = 0;
        if (bit_is_set(r, fd)) events |= POLLIN | POLLRDNORM | POLLRDBAND;
        if (bit_is_set(w, fd)) events |= POLLOUT | POLLWRNORM | POLLWRBAND;
        if (bit_is_set(e, fd)) events |= POLLPRI;
        if (events) fds.get()[k++] = {fd, events, 0};
    }
    const uint64_t start = now_ns();
    const long n = op_poll(fds.get(), count, timeout_ns, sigmask);
    if (remaining_ns && timeout_ns > 0) {
        const uint64_t spent = now_ns() - start;
        *remaining_ns = spent >= static_cast<uint64_t>(timeout_ns) ? 0 : timeout_ns - spent;
    }
    if (n < 0) return n;
    for (size_t i = 0; i < count; ++i)
        if (fds.get()[i].revents & POLLNVAL) return -EBADF;
    // select() says which of what was asked is ready, counting each set's bit.
    long ready = 0;
    Scratch<uint8_t> asked(count);
    if (!asked.get()) return -ENOMEM;
    for (size_t i = 0; i < count; ++i) {
        const int fd = fds.get()[i].fd;
        asked.get()[i] =
            (bit_is_set(r, fd) ? 1 : 0) | (bit_is_set(w, fd) ? 2 : 0) | (bit_is_set(e, fd) ? 4 : 0);
    }
    clear_bits(r, nfds);
    clear_bits(w, nfds);
    clear_bits(e, nfds);
    for (size_t i = 0; i < count; ++i) {
        const int fd = fds.get()[i].fd;
        const uint32_t revents = static_cast<uint16_t>(fds.get()[i].revents);
        if ((asked.get()[i] & 1) && select_readable(revents)) {
            set_bit(r, fd);
            ++ready;
        }
        if ((asked.get()[i] & 2) && select_writable(revents)) {
            set_bit(w, fd);
            ++ready;
        }
        if ((asked.get()[i] & 4) && select_exceptional(revents)) {
            set_bit(e, fd);
            ++ready;
        }
    }
    return ready;
}

}  // namespace tcps::shim
