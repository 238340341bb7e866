// Each uid's share of what the engine spends for its clients: descriptors (kernel sockets,
// waiter pipes, control connections, regions) and memory (rx rings, sessions). The engine
// usually runs as root and serves every user, so without shares one unprivileged user could
// take all of its descriptors and deny every other user (issue 9). The rule: a uid may hold at
// most half of what the other uids leave, so whoever comes next always finds room; the
// engine's own uid is not limited (it could stop the engine anyway). A refusal is a clear
// error to the greedy client only: ENFILE for descriptors, ENOBUFS for memory.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace tcps::engine {

// What one socket costs the engine's memory: its rx ring, which the engine fills (the tx ring
// is the client's to touch), and its records.
inline constexpr uint64_t kSocketBytes = 64 * 1024 + 4096;
// What a session costs beyond its sockets: its records, its control part, its first chunk's
// queue and slot records.
inline constexpr uint64_t kSessionBytes = 1024 * 1024;

struct QuotaUsage {
    uint64_t fds = 0;
    uint64_t bytes = 0;
};

class Quotas {
  public:
    // Capacities: the descriptors and bytes the engine can spend on clients.
    void configure(uint64_t fds, uint64_t bytes, uid_t exempt_uid);
    // Charges `fds` descriptors and `bytes` of memory to `uid`. 0, or -ENFILE / -ENOBUFS
    // (nothing charged) when that would take the uid past its share.
    int charge(uid_t uid, uint64_t fds, uint64_t bytes);
    void release(uid_t uid, uint64_t fds, uint64_t bytes);
    QuotaUsage usage(uid_t uid) const;
    QuotaUsage total() const;
    QuotaUsage capacity() const { return capacity_; }

  private:
    mutable std::mutex mutex_;
    std::unordered_map<uid_t, QuotaUsage> used_;
    QuotaUsage total_;
    QuotaUsage capacity_{UINT64_MAX / 4, UINT64_MAX / 4};
    uid_t exempt_ = 0;
};

// The engine's one ledger (the main thread charges hellos and sessions, workers sockets).
Quotas &quotas();

// Whether a uid may take `want` more of a resource of `capacity` that it uses `mine` of and
// everyone `all` of: at most half of what the others leave. Pure, for the unit tests.
constexpr bool within_share(uint64_t mine, uint64_t all, uint64_t want, uint64_t capacity) {
    const uint64_t others = all - mine;
    if (others >= capacity) return false;
    return 2 * (mine + want) <= capacity - others;
}

}  // namespace tcps::engine
