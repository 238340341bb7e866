// Pure checks the engine applies to client input: ring indices, request records, bind and
// socket-option permissions. No I/O here, so the unit tests can cover every branch.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "layout.hpp"

namespace tcps::engine {

// Capability bits as /proc/PID/status CapEff numbers them.
inline constexpr uint64_t kCapNetBindService = 1ull << 10;
inline constexpr uint64_t kCapNetAdmin = 1ull << 12;
inline constexpr uint64_t kCapNetRaw = 1ull << 13;

struct ClientCreds {
    pid_t pid = 0;
    uid_t uid = 0;
    gid_t gid = 0;
    uint64_t caps = 0;  // CapEff
};

// Parses the hex CapEff value out of the text of /proc/PID/status. False if absent/malformed.
bool parse_cap_eff(std::string_view status_text, uint64_t &caps);

// --- ring indices (free-running u32; every argument loaded once from the region) ---

// The client's tx_tail may not be more than its ring (of `ring_bytes`) ahead of the engine's
// tx_head, and may not fall behind bytes the kernel is already sending (`in_flight`).
constexpr bool tx_tail_valid(uint32_t tx_tail, uint32_t tx_head, uint32_t in_flight,
                             uint32_t ring_bytes) {
    const uint32_t queued = tx_tail - tx_head;
    return queued <= ring_bytes && queued >= in_flight;
}

// The client's rx_head may not pass rx_tail nor lag it by more than the ring.
constexpr bool rx_head_valid(uint32_t rx_head, uint32_t rx_tail, uint32_t ring_bytes) {
    return rx_tail - rx_head <= ring_bytes;
}

constexpr bool acc_head_valid(uint32_t acc_head, uint32_t acc_tail) {
    return acc_tail - acc_head <= ipc::kAcceptRingEntries;
}

// --- requests ---

// Checks a request copied out of the region against the engine's own view of the slot.
// Returns 0 if the engine may carry it out, else the -errno to answer with.
// `client_slots`: how many slots the client claims itself (a relay session's), the only ones
// kSocket may name.
int check_request(const ipc::Request &request, uint32_t slot, ipc::SlotState engine_state,
                  uint32_t client_slots);

// Port (host order) of an AF_INET/AF_INET6 socket address, or -1 if it has none.
int sockaddr_port(const uint8_t *addr, uint32_t len);

// 0, or -EACCES when binding `addr` needs a privilege the client lacks (as Linux decides it:
// port != 0 below ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE).
int check_bind_permission(const uint8_t *addr, uint32_t len, const ClientCreds &creds,
                          int unprivileged_port_start);

// --- socket options ---

// What the engine knows about the kernel socket when it judges a setsockopt.
struct SocketFacts {
    bool bound_to_device = false;  // SO_BINDTOIFINDEX != 0
    int busy_poll_budget = 0;      // SO_BUSY_POLL_BUDGET now
    // Congestion control names (space separated) as in /proc/sys/net/ipv4/.
    std::string_view allowed_congestion;
    std::string_view available_congestion;
};

enum class OptionAction {
    kKernel,      // apply to the kernel socket and return its result
    kRefuse,      // answer `error` without touching the socket
    kEngineOnly,  // the engine keeps the value itself (SO_RCVLOWAT), answer 0
};

struct OptionDecision {
    OptionAction action = OptionAction::kKernel;
    int error = 0;  // -errno for kRefuse
};

// setsockopt(level, optname, value[0..len)) by a client holding `caps`.
OptionDecision decide_setsockopt(int level, int optname, const uint8_t *value, uint32_t len,
                                 uint64_t caps, const SocketFacts &facts);

enum class GetOptionAction {
    kKernel,
    kRefuse,
    kSoError,   // the slot's so_error, then cleared
    kRcvLowat,  // the engine's own value
};

struct GetOptionDecision {
    GetOptionAction action = GetOptionAction::kKernel;
    int error = 0;
};

GetOptionDecision decide_getsockopt(int level, int optname);

// Only these ioctls reach the kernel socket; each takes an int out-parameter.
bool ioctl_allowed(unsigned long request);

// Whether a worker is saturated (seed 003's handoff), from the share of each window it spent
// working, with hysteresis so that it does not flip on every window: saturated from
// `high_percent` busy on, no longer once below the low mark, 20 points lower (half of
// `high_percent` up to 20, so that every high mark has a low one a window can get under). A
// negative percentage never saturates; 0 always does.
class LoadGauge {
  public:
    explicit LoadGauge(int high_percent) : high_(high_percent), saturated_(high_percent == 0) {}
    // One window: busy_ns of window_ns worked. Returns saturated().
    bool update(uint64_t busy_ns, uint64_t window_ns);
    bool saturated() const { return saturated_; }
    bool enabled() const { return high_ >= 0; }
    // Whether it may take more work from the kernel (connections offloaded again): the last
    // window was under the low mark, so that what it takes back does not push it over the
    // high one at once and shed them again (no ping-pong).
    bool has_room() const { return high_ < 0 || (!saturated_ && last_percent_ < low_mark()); }
    int low_mark() const { return high_ > 20 ? high_ - 20 : high_ - high_ / 2; }

  private:
    int high_;
    bool saturated_;
    int last_percent_ = 0;
};

// Which of a family's `count` workers takes its next connection (issues 11.1 and 11.3): the
// next in turn from `next` that takes new work (`takes_new(k)`, --min-workers) and is not
// `busy(k)` (saturated, or without room for an adopted socket, --handoff-load), so that one
// busy worker does not send the kernel connections the others have room for; while all that
// take new work are busy, the next of them in turn (it leaves the connection to the kernel);
// the home (0) when none takes new work. `next` moves past the one chosen.
template <class TakesNew, class Busy>
uint32_t next_worker(uint32_t &next, uint32_t count, TakesNew takes_new, Busy busy) {
    uint32_t first_busy = count;
    for (uint32_t tries = 0; tries < count; ++tries) {
        const uint32_t k = (next + tries) % count;
        if (!takes_new(k)) continue;
        if (!busy(k)) {
            next = (k + 1) % count;
            return k;
        }
        if (first_busy == count) first_busy = k;
    }
    if (first_busy == count) return 0;
    next = (first_busy + 1) % count;
    return first_busy;
}

// Whether a family's new connections should go to its listeners' twins (seed 003's handoff at
// accept): every worker that takes new work is saturated (the home's own gauge when none
// does), as next_worker() would give each one to a busy worker.
template <class TakesNew, class Saturated>
bool family_saturated(uint32_t count, TakesNew takes_new, Saturated saturated) {
    bool any_takes_new = false;
    for (uint32_t k = 0; k < count; ++k) {
        if (!takes_new(k)) continue;
        if (!saturated(k)) return false;
        any_takes_new = true;
    }
    return any_takes_new || saturated(0);
}

// Seed 001's H4: how many workers take new connections (an elastic engine), between `min` and
// `max`, from each load window's busy shares, with watermarks. One more when the active
// workers' average is at `high` or above for two windows running; one fewer when the others
// would carry the active ones' load at under `low` on average (their total over one worker
// fewer), for `dwell` windows running. Since low < high, a change never provokes the opposite
// one at the same load: no ping-pong. The first `active()` workers are the active ones.
class Elasticity {
  public:
    Elasticity(int min, int max, int high = 75, int low = 35, int dwell = 3);
    // One window: `busy[k]` is worker k's busy share in percent (those past active() count for
    // nothing). Returns active().
    int update(const std::vector<int> &busy);
    int active() const { return active_; }

  private:
    int min_;
    int max_;
    int high_;
    int low_;
    int dwell_;
    int active_;
    int over_ = 0;   // windows running at or above high
    int under_ = 0;  // windows running in which one fewer would stay under low
};

}  // namespace tcps::engine
