// epoll with offloaded members. The application's epoll fd stays a real kernel epoll holding
// its kernel fds; the offloaded fds it adds live in a registry of ours, keyed by the epoll's
// table entry. epoll_wait reports both, and sleeps on the epoll fd, this thread's waiter pipe
// and the registry's eventfd, all three in an epoll instance of the waiter's: the sleep is an
// epoll_wait(), so a signal handler or a stop and SIGCONT end it with EINTR as they end
// Linux's. epoll_ctl rings that eventfd so a sleeper sees a member added by another thread; it
// also sits in the kernel epoll (with a cookie filtered out of results), so a thread already
// asleep in the real epoll_wait() when the registry is created wakes too.
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <unordered_map>
#include <vector>

#include "libc.hpp"
#include "ops.hpp"

namespace tcps::shim {

namespace {

// An epoll item is (file, fd number), as in the kernel: the socket it was added as, and the
// number it was added under. It stays in the set while that socket lives, whatever the number
// names later: Linux removes an item only when the last reference to the file goes, so a dup'ed
// socket whose registered fd was closed is still reported, under the old registration's data.
struct EpollEntry {
    int fd = -1;
    FdRef ref;            // the socket it was added as: a different one at that fd is not it
    uint32_t events = 0;  // as given (with EPOLLET/EPOLLONESHOT/EPOLLEXCLUSIVE)
    epoll_data_t data{};
    uint32_t reported_gen = 0;  // event_gen at the last EPOLLET report
    bool reported = false;      // EPOLLET: reported since added/modified
    bool disabled = false;      // EPOLLONESHOT: fired, waits for EPOLL_CTL_MOD
};

struct MemberKey {
    int fd;
    uint64_t ref;
    bool operator==(const MemberKey &other) const { return fd == other.fd && ref == other.ref; }
};
struct MemberKeyHash {
    size_t operator()(const MemberKey &key) const {
        return std::hash<uint64_t>()(key.ref ^ (static_cast<uint64_t>(key.fd) << 20));
    }
};

struct EpollSet {
    uint32_t id = 0;
    uint64_t serial = 0;   // never reused, unlike id: names the set to the waiters' epolls
    uint32_t holders = 0;  // fds naming it + calls inside it (under g_sets_mutex)
    int wake_fd = -1;
    std::atomic<int> sleepers{0};
    pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
    std::vector<EpollEntry> entries;
    std::unordered_map<MemberKey, size_t, MemberKeyHash> by_key;
    size_t rotate = 0;  // where the next scan starts: fairness when maxevents is small
};

// Added to event_gen once the engine is gone, so that EPOLLET sees its end as a new edge.
constexpr uint32_t kEngineEndEdge = 1u << 31;
constexpr uint32_t kControlBits = EPOLLET | EPOLLONESHOT | EPOLLEXCLUSIVE | EPOLLWAKEUP;
constexpr uint32_t kExclusiveOk =
    EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP | EPOLLWAKEUP | EPOLLET | EPOLLEXCLUSIVE;

pthread_mutex_t g_sets_mutex = PTHREAD_MUTEX_INITIALIZER;
std::vector<EpollSet *> g_sets;  // by id
std::vector<uint32_t> g_free_ids;
std::atomic<uint64_t> g_next_serial{1};

EpollSet *acquire_set(int epfd) {
    const FdRef ref = g_fds.get(epfd);
    if (ref.kind() != FdKind::kEpoll) return nullptr;
    pthread_mutex_lock(&g_sets_mutex);
    EpollSet *set = ref.id() < g_sets.size() ? g_sets[ref.id()] : nullptr;
    if (set) ++set->holders;
    pthread_mutex_unlock(&g_sets_mutex);
    return set;
}

void release_set(EpollSet *set) {
    pthread_mutex_lock(&g_sets_mutex);
    const bool last = --set->holders == 0;
    if (last) {
        g_sets[set->id] = nullptr;
        g_free_ids.push_back(set->id);
    }
    pthread_mutex_unlock(&g_sets_mutex);
    if (last) {
        if (set->wake_fd >= 0) {
            g_fds.take_if(set->wake_fd, FdRef::internal());
            real(libc.close)(set->wake_fd);
        }
        delete set;
    }
}

class SetHold {
  public:
    explicit SetHold(EpollSet *set) : set_(set) {}
    ~SetHold() {
        if (set_) release_set(set_);
    }
    SetHold(const SetHold &) = delete;
    SetHold &operator=(const SetHold &) = delete;

  private:
    EpollSet *set_;
};

// The data of our wake-up eventfd's event inside the application's kernel epoll: a value
// drawn once per process, so that it cannot be mistaken for the application's own data.
uint64_t wake_cookie() {
    static const uint64_t cookie = [] {
        uint64_t value = 0;
        if (getrandom(&value, sizeof(value), GRND_NONBLOCK) != sizeof(value))
            value = now_ns() * 0x9e3779b97f4a7c15ull;
        return value | 1;
    }();
    return cookie;
}

void drain(int wake_fd) {
    uint64_t count;
    ssize_t ignored = real(libc.read)(wake_fd, &count, sizeof(count));
    (void)ignored;
}

// Removes our wake-up events from what the kernel epoll returned (draining the eventfd).
int strip_wake_events(EpollSet &set, epoll_event *events, int n) {
    int kept = 0;
    bool woken = false;
    for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 == wake_cookie()) {
            woken = true;
            continue;
        }
        events[kept++] = events[i];
    }
    if (woken) drain(set.wake_fd);
    return kept;
}

// Whether `epfd` is an epoll instance: deleting a descriptor it cannot hold answers ENOENT
// from an epoll, EINVAL from anything else. The probe is our own eventfd.
long check_epoll_fd(int epfd, int probe) {
    const int rc = real(libc.epoll_ctl)(epfd, EPOLL_CTL_DEL, probe, nullptr);
    if (rc == 0) return 0;
    if (errno == ENOENT) return 0;
    return -errno;  // EBADF, EINVAL
}

// The registry of `epfd`, created (with its table entry) on the first offloaded member.
long find_or_create_set(int epfd, EpollSet *&out) {
    out = acquire_set(epfd);
    if (out) return 0;
    const FdRef ref = g_fds.get(epfd);
    if (ref.kind() == FdKind::kSocket) return -EINVAL;  // an offloaded socket is no epoll
    if (ref.kind() == FdKind::kInternal) return -EBADF;
    const int wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake < 0) return -errno;
    if (const long rc = check_epoll_fd(epfd, wake); rc != 0) {
        real(libc.close)(wake);
        return rc;
    }
    auto *set = new EpollSet;
    set->serial = g_next_serial.fetch_add(1, std::memory_order_relaxed);
    set->wake_fd = move_high_internal(wake);
    set->holders = 2;  // the fd's reference and this call's
    pthread_mutex_lock(&g_sets_mutex);
    if (!g_free_ids.empty()) {
        set->id = g_free_ids.back();
        g_free_ids.pop_back();
        g_sets[set->id] = set;
    } else {
        set->id = static_cast<uint32_t>(g_sets.size());
        g_sets.push_back(set);
    }
    pthread_mutex_unlock(&g_sets_mutex);
    if (!g_fds.set(epfd, FdRef::epoll(set->id))) {
        release_set(set);
        release_set(set);
        return -EBADF;
    }
    // The eventfd joins the kernel epoll too: a thread that went to sleep in the real
    // epoll_wait() before this set existed wakes now, and finds its offloaded members.
    epoll_event wake_event{};
    wake_event.events = EPOLLIN;
    wake_event.data.u64 = wake_cookie();
    if (real(libc.epoll_ctl)(epfd, EPOLL_CTL_ADD, set->wake_fd, &wake_event) == 0) {
        const uint64_t one = 1;
        ssize_t ignored = real(libc.write)(set->wake_fd, &one, sizeof(one));
        (void)ignored;
    }
    out = set;
    return 0;
}

MemberKey key_of(const EpollEntry &entry) {
    return {entry.fd, entry.ref.word};
}

// The member's socket, if it still lives: its generation is unchanged and some fd of this
// process (or a call in progress) still holds it.
bool member_socket(const EpollEntry &entry, SocketRef &out) {
    const uint32_t slot = entry.ref.slot();
    if (!region().base || !region().mapped(slot)) return false;
    Socket &sock = socket_state(slot);
    if (sock.generation.load(std::memory_order_acquire) != entry.ref.generation() ||
        sock.refs.load(std::memory_order_acquire) == 0)
        return false;
    out.fd = entry.fd;
    out.slot = slot;
    out.generation = entry.ref.generation();
    out.sock = &sock;
    out.shm = &region().slot(slot);
    return true;
}

bool entry_alive(const EpollEntry &entry) {
    SocketRef ignored;
    return member_socket(entry, ignored);
}

void erase_entry(EpollSet &set, size_t index) {
    set.by_key.erase(key_of(set.entries[index]));
    if (index != set.entries.size() - 1) {
        set.entries[index] = set.entries.back();
        set.by_key[key_of(set.entries[index])] = index;
    }
    set.entries.pop_back();
}

// Ready offloaded members into `out` (at most `room`), under the set's mutex.
int collect(EpollSet &set, epoll_event *out, int room) {
    pthread_mutex_lock(&set.mutex);
    int n = 0;
    const size_t size = set.entries.size();
    const size_t start = size ? set.rotate % size : 0;
    for (size_t k = 0; k < size && n < room; ++k) {
        EpollEntry &entry = set.entries[(start + k) % size];
        SocketRef ref;
        if (entry.disabled || !member_socket(entry, ref)) continue;
        // The generation first: a change after it shows as a new generation next time. The
        // engine's end is an edge of its own: a killed engine bumps nothing.
        const uint32_t gen = ref.shm->event_gen.load(std::memory_order_acquire) +
                             (session_dead() ? kEngineEndEdge : 0);
        const uint32_t mask = reported_events(current_mask(ref), entry.events & ~kControlBits);
        if (!mask) continue;
        if (entry.events & EPOLLET) {
            if (entry.reported && entry.reported_gen == gen) continue;  // no new edge
            entry.reported = true;
            entry.reported_gen = gen;
        }
        if (entry.events & EPOLLONESHOT) entry.disabled = true;
        out[n].events = mask;
        out[n].data = entry.data;
        ++n;
    }
    set.rotate += n > 0 ? 1 : 0;
    // Members whose socket is gone left the set, as the kernel drops a file from every epoll
    // when its last reference goes.
    for (size_t i = set.entries.size(); i-- > 0;)
        if (!entry_alive(set.entries[i])) erase_entry(set, i);
    pthread_mutex_unlock(&set.mutex);
    return n;
}

void wake_sleepers(EpollSet &set) {
    if (set.sleepers.load(std::memory_order_seq_cst) == 0) return;
    const uint64_t one = 1;
    ssize_t ignored = real(libc.write)(set.wake_fd, &one, sizeof(one));
    (void)ignored;
}

}  // namespace

long op_epoll_ctl(int epfd, int op, SocketRef &ref, epoll_event *event) {
    const bool has_event = op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD;
    if (has_event && !event) return -EFAULT;
    if (has_event && (event->events & EPOLLEXCLUSIVE)) {
        if (op == EPOLL_CTL_MOD || (event->events & ~kExclusiveOk)) return -EINVAL;
    }
    if (epfd == ref.fd) return -EINVAL;
    const FdKind epfd_kind = g_fds.get(epfd).kind();
    if (epfd_kind == FdKind::kSocket) return -EINVAL;  // a socket is no epoll
    if (epfd_kind == FdKind::kInternal) return -EBADF;
    if (op != EPOLL_CTL_ADD && op != EPOLL_CTL_MOD && op != EPOLL_CTL_DEL) {
        // Linux still checks epfd first.
        EpollSet *set = acquire_set(epfd);
        if (set) {
            release_set(set);
            return -EINVAL;
        }
        const int probe = eventfd(0, EFD_CLOEXEC);
        if (probe < 0) return -EINVAL;
        const long rc = check_epoll_fd(epfd, probe);
        real(libc.close)(probe);
        return rc != 0 ? rc : -EINVAL;
    }
    EpollSet *set = nullptr;
    if (op == EPOLL_CTL_ADD) {
        if (const long rc = find_or_create_set(epfd, set); rc != 0) return rc;
    } else {
        set = acquire_set(epfd);
        if (!set) {
            // Not one of ours: either not an epoll, or one without this member.
            const int probe = eventfd(0, EFD_CLOEXEC);
            if (probe < 0) return -ENOENT;
            const long rc = check_epoll_fd(epfd, probe);
            real(libc.close)(probe);
            return rc != 0 ? rc : -ENOENT;
        }
    }
    SetHold hold(set);
    if (event && (event->events & EPOLLPRI) && op != EPOLL_CTL_DEL) want_urgent(ref);
    const FdRef self = FdRef::socket(ref.slot, ref.generation);
    long result = 0;
    pthread_mutex_lock(&set->mutex);
    // The item of this fd number *and* this socket: an earlier socket that had the number is
    // another item (gone, or kept alive by a dup), which these calls cannot reach, as in Linux.
    const auto found = set->by_key.find({ref.fd, self.word});
    switch (op) {
        case EPOLL_CTL_ADD:
            if (found != set->by_key.end()) {
                result = -EEXIST;
                break;
            }
            set->entries.push_back({ref.fd, self, event->events, event->data, 0, false, false});
            set->by_key[{ref.fd, self.word}] = set->entries.size() - 1;
            break;
        case EPOLL_CTL_MOD: {
            if (found == set->by_key.end()) {
                result = -ENOENT;
                break;
            }
            EpollEntry &entry = set->entries[found->second];
            if (entry.events & EPOLLEXCLUSIVE) {
                result = -EINVAL;
                break;
            }
            entry.events = event->events;
            entry.data = event->data;
            entry.reported = false;  // re-armed: reported again if ready now, as Linux does
            entry.disabled = false;
            break;
        }
        case EPOLL_CTL_DEL:
            if (found == set->by_key.end())
                result = -ENOENT;
            else
                erase_entry(*set, found->second);
            break;
    }
    pthread_mutex_unlock(&set->mutex);
    if (result == 0 && op != EPOLL_CTL_DEL) wake_sleepers(*set);
    return result;
}

bool epoll_has_members(int epfd) {
    return g_fds.get(epfd).kind() == FdKind::kEpoll;
}

int epoll_strip_wake(int epfd, epoll_event *events, int n) {
    EpollSet *set = acquire_set(epfd);
    if (!set) return n;
    SetHold hold(set);
    return strip_wake_events(*set, events, n);
}

long op_epoll_wait(int epfd, epoll_event *events, int maxevents, int64_t timeout_ns,
                   const sigset_t *sigmask) {
    if (maxevents <= 0 || maxevents > static_cast<int>(INT_MAX / sizeof(epoll_event)))
        return -EINVAL;
    if (!events) return -EFAULT;
    EpollSet *set = acquire_set(epfd);
    if (!set) return kUseKernel;
    SetHold hold(set);
    static thread_local unsigned calls = 0;

    // Offloaded members and kernel members, alternating who goes first so neither starves
    // the other when maxevents is small.
    auto gather = [&]() -> long {
        const bool kernel_first = (calls++ & 1) != 0;
        int n = 0;
        if (!kernel_first) n = collect(*set, events, maxevents);
        if (n < maxevents) {
            const int k = real(libc.epoll_wait)(epfd, events + n, maxevents - n, 0);
            if (k < 0) return n > 0 ? n : -errno;
            n += strip_wake_events(*set, events + n, k);
        }
        if (kernel_first && n < maxevents) n += collect(*set, events + n, maxevents - n);
        return n;
    };

    long n = gather();
    if (n != 0 || timeout_ns == 0) return n;
    const uint64_t start = now_ns();
    const uint64_t deadline = timeout_ns > 0 ? start + static_cast<uint64_t>(timeout_ns) : 0;
    const uint64_t spin_end = start + spin_budget_ns();
    for (unsigned i = 1; now_ns() < spin_end; ++i) {
        cpu_relax();
        if ((i & 7) == 0 && (n = collect(*set, events, maxevents)) > 0) return n;
    }
    const SpinLearner learn{start};
    for (;;) {
        set->sleepers.fetch_add(1, std::memory_order_seq_cst);
        const bool armed = waiter_arm(ipc::kWaitAnySlot);
        n = collect(*set, events, maxevents);
        if (n > 0) {
            if (armed) waiter_disarm();
            set->sleepers.fetch_sub(1);
            return n;
        }
        int rc;
        int saved = 0;
        const int nest = armed ? waiter_epoll_with(epfd, set->wake_fd, set->serial) : -1;
        if (nest >= 0) {
            // Data 0: the waiter pipe, 1: the application's epoll, 2: our eventfd.
            epoll_event woke[3];
            rc = epoll_sleep_until(nest, woke, 3, deadline, sigmask);
            saved = errno;
            waiter_disarm();
            for (int k = 0; k < rc; ++k) {
                if (woke[k].data.u32 == 0 && (woke[k].events & (EPOLLHUP | EPOLLERR)) &&
                    !(woke[k].events & EPOLLIN))
                    mark_session_dead();
                if (woke[k].data.u32 == 2) drain(set->wake_fd);
            }
            set->sleepers.fetch_sub(1);
        } else {
            // Without a waiter, or without an epoll of its own for it: ppoll(), which a stop
            // and SIGCONT restart unseen (an epoll_wait() would end with EINTR).
            pollfd fds[3] = {{epfd, POLLIN, 0}, {set->wake_fd, POLLIN, 0}, {-1, POLLIN, 0}};
            if (armed) fds[2].fd = waiter_fd();
            uint64_t wait_ns = UINT64_MAX;
            if (deadline != 0) {
                const uint64_t now = now_ns();
                wait_ns = now >= deadline ? 0 : deadline - now;
            }
            // Without a waiter (nested in a signal handler, none left) we look again every
            // 1 ms; without an engine nothing offloaded will change, so no need.
            if (!armed && !session_dead() && wait_ns > 1'000'000) wait_ns = 1'000'000;
            timespec ts{static_cast<time_t>(wait_ns / 1'000'000'000),
                        static_cast<long>(wait_ns % 1'000'000'000)};
            rc = real(libc.ppoll)(fds, 3, wait_ns == UINT64_MAX ? nullptr : &ts, sigmask);
            saved = errno;
            if (armed) {
                waiter_disarm();
                if ((fds[2].revents & (POLLHUP | POLLERR | POLLNVAL)) && !(fds[2].revents & POLLIN))
                    mark_session_dead();
            }
            set->sleepers.fetch_sub(1);
            if (fds[1].revents & POLLIN) drain(set->wake_fd);
        }
        if (rc < 0) return -saved;
        n = gather();
        if (n != 0) return n;
        if (deadline != 0 && now_ns() >= deadline) return 0;
    }
}

void epoll_release(uint32_t id) {
    pthread_mutex_lock(&g_sets_mutex);
    EpollSet *set = id < g_sets.size() ? g_sets[id] : nullptr;
    pthread_mutex_unlock(&g_sets_mutex);
    if (set) release_set(set);
}

void epoll_retain(uint32_t id) {
    pthread_mutex_lock(&g_sets_mutex);
    if (id < g_sets.size() && g_sets[id]) ++g_sets[id]->holders;
    pthread_mutex_unlock(&g_sets_mutex);
}

void epoll_hand_back(FdRef socket) {
    struct Moved {
        uint32_t set_id;
        int fd;
        epoll_event event;
    };
    std::vector<Moved> moved;
    pthread_mutex_lock(&g_sets_mutex);
    for (EpollSet *set : g_sets) {
        if (!set) continue;
        pthread_mutex_lock(&set->mutex);
        for (size_t k = set->entries.size(); k-- > 0;) {
            const EpollEntry &entry = set->entries[k];
            if (!(entry.ref == socket)) continue;
            epoll_event event{};
            event.events = entry.disabled ? entry.events & kControlBits : entry.events;
            event.data = entry.data;
            moved.push_back({set->id, entry.fd, event});
            erase_entry(*set, k);
        }
        pthread_mutex_unlock(&set->mutex);
    }
    pthread_mutex_unlock(&g_sets_mutex);
    if (moved.empty()) return;
    // The kernel epoll behind each set: any fd naming the set (dups share one instance).
    const int limit = g_fds.limit();
    for (Moved &item : moved) {
        for (int epfd = 0; epfd < limit; ++epfd) {
            const FdRef ref = g_fds.get(epfd);
            if (ref.kind() != FdKind::kEpoll || ref.id() != item.set_id) continue;
            // A socket the engine asked back is kept, its registrations with it, to be
            // offloaded again later (adopt.cpp).
            if (real(libc.epoll_ctl)(epfd, EPOLL_CTL_ADD, item.fd, &item.event) == 0)
                note_epoll_ctl(epfd, EPOLL_CTL_ADD, item.fd, &item.event);
            break;
        }
    }
}

void epoll_after_fork() {
    g_sets_mutex = PTHREAD_MUTEX_INITIALIZER;
    for (EpollSet *set : g_sets) {
        if (!set) continue;
        set->mutex = PTHREAD_MUTEX_INITIALIZER;
        set->sleepers.store(0);
        if (set->wake_fd >= 0) g_fds.set(set->wake_fd, FdRef::internal());
    }
}

}  // namespace tcps::shim
