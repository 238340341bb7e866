#include "policy.hpp"

#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>

#ifndef IPV6_FLOWLABEL_MGR
#define IPV6_FLOWLABEL_MGR 32  // linux/in6.h; glibc's netinet/in.h lacks it
#endif
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef TCP_ZEROCOPY_RECEIVE
#define TCP_ZEROCOPY_RECEIVE 35
#endif
#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif

namespace tcps::engine {

bool parse_cap_eff(std::string_view text, uint64_t &caps) {
    constexpr std::string_view kKey = "CapEff:";
    size_t pos = 0;
    while (pos < text.size()) {
        const size_t end = text.find('\n', pos);
        const std::string_view line =
            text.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
        if (line.substr(0, kKey.size()) == kKey) {
            size_t i = kKey.size();
            while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
            uint64_t value = 0;
            size_t digits = 0;
            for (; i < line.size(); ++i, ++digits) {
                const char c = line[i];
                int nibble;
                if (c >= '0' && c <= '9') {
                    nibble = c - '0';
                } else if (c >= 'a' && c <= 'f') {
                    nibble = c - 'a' + 10;
                } else if (c >= 'A' && c <= 'F') {
                    nibble = c - 'A' + 10;
                } else {
                    break;
                }
                if (digits >= 16) return false;
                value = (value << 4) | static_cast<uint64_t>(nibble);
            }
            if (digits == 0) return false;
            // Only trailing blanks may follow the number.
            for (; i < line.size(); ++i)
                if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return false;
            caps = value;
            return true;
        }
        if (end == std::string_view::npos) break;
        pos = end + 1;
    }
    return false;
}

int check_request(const ipc::Request &request, uint32_t slot, ipc::SlotState engine_state,
                  uint32_t client_slots) {
    if (request.op == 0 || request.op >= ipc::kOpCount) return -EINVAL;
    const auto op = static_cast<ipc::Op>(request.op);
    if (op == ipc::Op::kSocket) {
        if (slot >= client_slots || engine_state != ipc::SlotState::kFree) return -EBADF;
        if (request.arg0 != AF_INET && request.arg0 != AF_INET6) return -EAFNOSUPPORT;
        return 0;
    }
    if (slot >= ipc::kMaxSockets || engine_state != ipc::SlotState::kOpen) return -EBADF;
    switch (op) {
        case ipc::Op::kBind:
        case ipc::Op::kConnect:
            if (request.addr_len > ipc::kSockAddrMax) return -EINVAL;
            break;
        case ipc::Op::kSetSockOpt:
            if (request.opt_len > ipc::kOptMax) return -EINVAL;
            break;
        case ipc::Op::kGetSockOpt:
            if (request.arg2 < 0 || request.opt_len > ipc::kOptMax) return -EINVAL;
            break;
        case ipc::Op::kShutdown:
            if (request.arg0 < SHUT_RD || request.arg0 > SHUT_RDWR) return -EINVAL;
            break;
        default:
            break;
    }
    return 0;
}

static uint16_t load_family(const uint8_t *addr) {
    sa_family_t family;
    std::memcpy(&family, addr, sizeof(family));
    return family;
}

int sockaddr_port(const uint8_t *addr, uint32_t len) {
    if (len < sizeof(sa_family_t) + sizeof(uint16_t)) return -1;
    const uint16_t family = load_family(addr);
    // AF_UNSPEC counts: Linux binds an AF_INET socket to AF_UNSPEC + INADDR_ANY + port.
    if (family != AF_INET && family != AF_INET6 && family != AF_UNSPEC) return -1;
    uint16_t port_be;
    std::memcpy(&port_be, addr + offsetof(sockaddr_in, sin_port), sizeof(port_be));
    return ntohs(port_be);
}

int check_bind_permission(const uint8_t *addr, uint32_t len, const ClientCreds &creds,
                          int unprivileged_port_start) {
    const int port = sockaddr_port(addr, len);
    if (port <= 0 || port >= unprivileged_port_start) return 0;
    if (creds.caps & kCapNetBindService) return 0;
    return -EACCES;
}

static int load_int(const uint8_t *value, uint32_t len) {
    int v = 0;
    if (len >= sizeof(int)) std::memcpy(&v, value, sizeof(int));
    return v;
}

// Whether `name` is one of the space-separated words of `list`.
static bool list_contains(std::string_view list, std::string_view name) {
    if (name.empty()) return false;
    size_t pos = 0;
    while (pos < list.size()) {
        while (pos < list.size() && (list[pos] == ' ' || list[pos] == '\n')) ++pos;
        size_t end = pos;
        while (end < list.size() && list[end] != ' ' && list[end] != '\n') ++end;
        if (list.substr(pos, end - pos) == name) return true;
        pos = end;
    }
    return false;
}

static OptionDecision refuse(int error) {
    return {OptionAction::kRefuse, error};
}

OptionDecision decide_setsockopt(int level, int optname, const uint8_t *value, uint32_t len,
                                 uint64_t caps, const SocketFacts &facts) {
    const bool admin = (caps & kCapNetAdmin) != 0;
    const bool raw = (caps & kCapNetRaw) != 0;
    const int val = load_int(value, len);
    if (level == SOL_SOCKET) {
        switch (optname) {
            // Their values hold pointers or descriptors that would be the engine's, not the
            // client's: the engine must never act on them.
            case SO_ATTACH_FILTER:
            case SO_ATTACH_BPF:
            case SO_ATTACH_REUSEPORT_CBPF:
            case SO_ATTACH_REUSEPORT_EBPF:
                return refuse(-ENOPROTOOPT);
            case SO_DEBUG:
                if (val != 0 && !admin) return refuse(-EACCES);  // Linux says EACCES here
                break;
            case SO_MARK:
                if (!admin && !raw) return refuse(-EPERM);
                break;
            case SO_PRIORITY:
                if (len >= sizeof(int) && (val < 0 || val > 6) && !admin && !raw)
                    return refuse(-EPERM);
                break;
            case SO_RCVBUFFORCE:
            case SO_SNDBUFFORCE:
                if (!admin) return refuse(-EPERM);
                break;
            case SO_BINDTODEVICE:
            case SO_BINDTOIFINDEX:
                // Since Linux 5.7 anyone may bind a socket to a device once; changing it
                // needs CAP_NET_RAW.
                if (facts.bound_to_device && !raw) return refuse(-EPERM);
                break;
            case SO_PREFER_BUSY_POLL:
                if (val != 0 && !admin) return refuse(-EPERM);
                break;
            case SO_BUSY_POLL_BUDGET:
                if (val > facts.busy_poll_budget && !admin) return refuse(-EPERM);
                break;
            case SO_TXTIME:
                if (len >= sizeof(clockid_t) && !admin) {
                    clockid_t clock;
                    std::memcpy(&clock, value, sizeof(clock));
                    if (clock != CLOCK_MONOTONIC) return refuse(-EPERM);
                }
                break;
            case SO_RCVLOWAT:
                // The rx ring, not the kernel socket, decides readability for the client.
                if (len < sizeof(int)) return refuse(-EINVAL);
                return {OptionAction::kEngineOnly, 0};
            default:
                break;
        }
    } else if (level == IPPROTO_IP) {
        switch (optname) {
            case IP_TRANSPARENT:
                if (val != 0 && !admin && !raw) return refuse(-EPERM);
                break;
            case IP_IPSEC_POLICY:
            case IP_XFRM_POLICY:
                if (!admin) return refuse(-EPERM);
                break;
            default:
                break;
        }
    } else if (level == IPPROTO_IPV6) {
        switch (optname) {
            case IPV6_TRANSPARENT:
                if (val != 0 && !admin && !raw) return refuse(-EPERM);
                break;
            case IPV6_IPSEC_POLICY:
            case IPV6_XFRM_POLICY:
                if (!admin) return refuse(-EPERM);
                break;
            case IPV6_HOPOPTS:
            case IPV6_RTHDRDSTOPTS:
            case IPV6_DSTOPTS:
            case IPV6_2292PKTOPTIONS:
                if (!raw) return refuse(-EPERM);
                break;
            case IPV6_FLOWLABEL_MGR:
                // Flow labels are owned by the caller's euid, which would be the engine's.
                if (!admin) return refuse(-EPERM);
                break;
            default:
                break;
        }
    } else if (level == IPPROTO_TCP) {
        switch (optname) {
            case TCP_REPAIR:
                // The other TCP_REPAIR_* options need repair mode, which only this turns on.
                if (!admin) return refuse(-EPERM);
                break;
            case TCP_CONGESTION: {
                if (admin) break;
                size_t n = 0;
                while (n < len && value[n] != 0) ++n;
                const std::string_view name(reinterpret_cast<const char *>(value), n);
                if (list_contains(facts.allowed_congestion, name)) break;
                // Linux: a known algorithm that is not allowed is EPERM, an unknown one ENOENT
                // (only CAP_NET_ADMIN may load a module for it).
                return refuse(list_contains(facts.available_congestion, name) ? -EPERM : -ENOENT);
            }
            default:
                break;
        }
    }
    return {};
}

GetOptionDecision decide_getsockopt(int level, int optname) {
    if (level == SOL_SOCKET) {
        if (optname == SO_ERROR) return {GetOptionAction::kSoError, 0};
        if (optname == SO_RCVLOWAT) return {GetOptionAction::kRcvLowat, 0};
        // Would create a pidfd inside the engine; TCP sockets have no peer pid anyway.
        if (optname == SO_PEERPIDFD) return {GetOptionAction::kRefuse, -ENODATA};
    } else if (level == IPPROTO_TCP && optname == TCP_ZEROCOPY_RECEIVE) {
        // Maps pages at an address taken from the buffer: the engine's address space.
        return {GetOptionAction::kRefuse, -ENOPROTOOPT};
    }
    return {};
}

bool ioctl_allowed(unsigned long request) {
    switch (request) {
        case SIOCINQ:
        case SIOCOUTQ:
        case SIOCOUTQNSD:
        case SIOCATMARK:
            return true;
        default:
            return false;
    }
}

bool LoadGauge::update(uint64_t busy_ns, uint64_t window_ns) {
    if (high_ < 0 || window_ns == 0) return saturated_;
    const uint64_t percent = std::min<uint64_t>(busy_ns, window_ns) * 100 / window_ns;
    last_percent_ = static_cast<int>(percent);
    if (percent >= static_cast<uint64_t>(high_))
        saturated_ = true;
    else if (static_cast<int64_t>(percent) < low_mark())
        saturated_ = false;
    return saturated_;
}

Elasticity::Elasticity(int min, int max, int high, int low, int dwell)
    : min_(std::max(1, min)),
      max_(std::max(min_, max)),
      high_(high),
      low_(low),
      dwell_(std::max(1, dwell)),
      active_(min_) {}

int Elasticity::update(const std::vector<int> &busy) {
    int total = 0;
    for (int k = 0; k < active_ && k < static_cast<int>(busy.size()); ++k)
        total += std::clamp(busy[k], 0, 100);
    over_ = total >= high_ * active_ ? over_ + 1 : 0;
    under_ = active_ > 1 && total < low_ * (active_ - 1) ? under_ + 1 : 0;
    if (over_ >= 2 && active_ < max_) {
        ++active_;
        over_ = under_ = 0;
    } else if (under_ >= dwell_ && active_ > min_) {
        --active_;
        over_ = under_ = 0;
    }
    return active_;
}

}  // namespace tcps::engine
