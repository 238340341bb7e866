// The engine's checks of client input: ring indices, request records, bind and option
// permissions, sockets offered for adoption, and its command line. Pure functions (and real
// sockets on loopback where a check looks at one), no engine running.
#define CATCH_CONFIG_MAIN
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <ctime>

#include "options.hpp"
#include "parked.hpp"
#include "policy.hpp"
#include "quota.hpp"

using namespace tcps;
using namespace tcps::engine;

namespace {

ipc::Request make_request(ipc::Op op, int32_t arg0 = 0) {
    ipc::Request request{};
    request.op = static_cast<uint32_t>(op);
    request.arg0 = arg0;
    return request;
}

std::vector<uint8_t> inet_addr_bytes(const char *ip, uint16_t port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    inet_pton(AF_INET, ip, &addr.sin_addr);
    std::vector<uint8_t> bytes(sizeof(addr));
    std::memcpy(bytes.data(), &addr, sizeof(addr));
    return bytes;
}

std::vector<uint8_t> inet6_addr_bytes(const char *ip, uint16_t port) {
    sockaddr_in6 addr{};
    addr.sin6_family = AF_INET6;
    addr.sin6_port = htons(port);
    inet_pton(AF_INET6, ip, &addr.sin6_addr);
    std::vector<uint8_t> bytes(sizeof(addr));
    std::memcpy(bytes.data(), &addr, sizeof(addr));
    return bytes;
}

OptionDecision set_int(int level, int optname, int value, uint64_t caps,
                       const SocketFacts &facts = {}) {
    return decide_setsockopt(level, optname, reinterpret_cast<const uint8_t *>(&value),
                             sizeof(value), caps, facts);
}

bool refused_with(const OptionDecision &d, int error) {
    return d.action == OptionAction::kRefuse && d.error == error;
}

bool passed(const OptionDecision &d) {
    return d.action == OptionAction::kKernel;
}

}  // namespace

TEST_CASE("tx_tail may run at most one ring ahead of tx_head", "[rings]") {
    constexpr uint32_t kRing = ipc::kRingBytes;
    CHECK(tx_tail_valid(0, 0, 0, kRing));
    CHECK(tx_tail_valid(kRing, 0, 0, kRing));
    CHECK_FALSE(tx_tail_valid(kRing + 1, 0, 0, kRing));
    CHECK_FALSE(tx_tail_valid(1u << 30, 0, 0, kRing));
    // A grown ring holds more.
    CHECK(tx_tail_valid(kRing + 1, 0, 0, 2 * kRing));
    CHECK(tx_tail_valid(ipc::kRingMaxBytes, 0, 0, ipc::kRingMaxBytes));
    CHECK_FALSE(tx_tail_valid(ipc::kRingMaxBytes + 1, 0, 0, ipc::kRingMaxBytes));
    // Behind tx_head (a u32 "negative" distance) is a violation.
    CHECK_FALSE(tx_tail_valid(99, 100, 0, kRing));
    // Wrapping free-running counters.
    CHECK(tx_tail_valid(5, 0xfffffff0u, 0, kRing));
    CHECK_FALSE(tx_tail_valid(0x10000u + 0x20u, 0xfffffff0u, 0, kRing));
}

TEST_CASE("tx_tail may not fall behind bytes the kernel is sending", "[rings]") {
    CHECK(tx_tail_valid(1000, 0, 1000, ipc::kRingBytes));
    CHECK_FALSE(tx_tail_valid(999, 0, 1000, ipc::kRingBytes));
    CHECK(tx_tail_valid(2000, 0, 1000, ipc::kRingBytes));
}

TEST_CASE("rx_head may not pass rx_tail nor lag it by more than the ring", "[rings]") {
    constexpr uint32_t kRing = ipc::kRingBytes;
    CHECK(rx_head_valid(0, 0, kRing));
    CHECK(rx_head_valid(0, kRing, kRing));
    CHECK_FALSE(rx_head_valid(0, kRing + 1, kRing));
    CHECK(rx_head_valid(0, kRing + 1, 2 * kRing));
    CHECK_FALSE(rx_head_valid(12345, 0, kRing));
    CHECK(rx_head_valid(0xffffff00u, 0x100u, kRing));
    CHECK_FALSE(rx_head_valid(0x101u, 0x100u, kRing));
}

TEST_CASE("a ring's stored size is 0 or a power of two up to the session's largest", "[rings]") {
    CHECK(ipc::ring_bytes(0) == ipc::kRingBytes);
    CHECK(ipc::ring_bytes(2 * ipc::kRingBytes) == 2 * ipc::kRingBytes);
    CHECK(ipc::ring_bytes_valid(0, ipc::kRingMaxBytes));
    CHECK(ipc::ring_bytes_valid(2 * ipc::kRingBytes, ipc::kRingMaxBytes));
    CHECK(ipc::ring_bytes_valid(ipc::kRingMaxBytes, ipc::kRingMaxBytes));
    CHECK_FALSE(ipc::ring_bytes_valid(2 * ipc::kRingMaxBytes, ipc::kRingMaxBytes));
    CHECK_FALSE(ipc::ring_bytes_valid(3 * ipc::kRingBytes, ipc::kRingMaxBytes));
    CHECK_FALSE(ipc::ring_bytes_valid(ipc::kRingBytes / 2, ipc::kRingMaxBytes));
    CHECK_FALSE(ipc::ring_bytes_valid(ipc::kRingBytes, ipc::kRingMaxBytes));  // that is 0
    CHECK_FALSE(ipc::ring_bytes_valid(1u << 31, ipc::kRingMaxBytes));
    // A relay session's rings do not grow.
    CHECK_FALSE(ipc::ring_bytes_valid(2 * ipc::kRingBytes, ipc::kRingBytes));
}

TEST_CASE("acc_head stays within the accept ring", "[rings]") {
    CHECK(acc_head_valid(0, 0));
    CHECK(acc_head_valid(0, ipc::kAcceptRingEntries));
    CHECK_FALSE(acc_head_valid(0, ipc::kAcceptRingEntries + 1));
    CHECK_FALSE(acc_head_valid(1, 0));
}

TEST_CASE("unknown and empty ops are answered -EINVAL", "[requests]") {
    ipc::Request request{};
    request.op = 0;
    CHECK(check_request(request, 0, ipc::SlotState::kOpen, ipc::kClientSlots) == -EINVAL);
    request.op = ipc::kOpCount;
    CHECK(check_request(request, 0, ipc::SlotState::kOpen, ipc::kClientSlots) == -EINVAL);
    request.op = 0xffffffffu;
    CHECK(check_request(request, 0, ipc::SlotState::kFree, ipc::kClientSlots) == -EINVAL);
}

TEST_CASE("kSocket needs a free client slot and an inet family", "[requests]") {
    // A local session's client claims no slot: its sockets come over the control connection.
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_INET), 0, ipc::SlotState::kFree, 0) ==
          -EBADF);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_INET), 0, ipc::SlotState::kFree,
                        ipc::kClientSlots) == 0);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_INET6), ipc::kClientSlots - 1,
                        ipc::SlotState::kFree, ipc::kClientSlots) == 0);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_INET), ipc::kClientSlots,
                        ipc::SlotState::kFree, ipc::kClientSlots) == -EBADF);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_INET), 3, ipc::SlotState::kOpen,
                        ipc::kClientSlots) == -EBADF);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_INET), 3, ipc::SlotState::kClosing,
                        ipc::kClientSlots) == -EBADF);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_UNIX), 3, ipc::SlotState::kFree,
                        ipc::kClientSlots) == -EAFNOSUPPORT);
    CHECK(check_request(make_request(ipc::Op::kSocket, AF_PACKET), 3, ipc::SlotState::kFree,
                        ipc::kClientSlots) == -EAFNOSUPPORT);
}

TEST_CASE("requests on a slot that is not open are -EBADF", "[requests]") {
    for (ipc::Op op :
         {ipc::Op::kBind, ipc::Op::kListen, ipc::Op::kConnect, ipc::Op::kShutdown, ipc::Op::kClose,
          ipc::Op::kSetSockOpt, ipc::Op::kGetSockOpt, ipc::Op::kGetSockName, ipc::Op::kIoctl}) {
        CHECK(check_request(make_request(op), 5, ipc::SlotState::kFree, ipc::kClientSlots) ==
              -EBADF);
        CHECK(check_request(make_request(op), 5, ipc::SlotState::kClosing, ipc::kClientSlots) ==
              -EBADF);
        CHECK(check_request(make_request(op), ipc::kMaxSockets, ipc::SlotState::kOpen,
                            ipc::kClientSlots) == -EBADF);
    }
}

TEST_CASE("lengths beyond the request records are -EINVAL", "[requests]") {
    ipc::Request request = make_request(ipc::Op::kBind);
    request.addr_len = ipc::kSockAddrMax;
    CHECK(check_request(request, 1, ipc::SlotState::kOpen, ipc::kClientSlots) == 0);
    request.addr_len = ipc::kSockAddrMax + 1;
    CHECK(check_request(request, 1, ipc::SlotState::kOpen, ipc::kClientSlots) == -EINVAL);
    request = make_request(ipc::Op::kConnect);
    request.addr_len = 0xffffffffu;
    CHECK(check_request(request, 1, ipc::SlotState::kOpen, ipc::kClientSlots) == -EINVAL);
    request = make_request(ipc::Op::kSetSockOpt);
    request.opt_len = ipc::kOptMax;
    CHECK(check_request(request, 1, ipc::SlotState::kOpen, ipc::kClientSlots) == 0);
    request.opt_len = ipc::kOptMax + 1;
    CHECK(check_request(request, 1, ipc::SlotState::kOpen, ipc::kClientSlots) == -EINVAL);
    request = make_request(ipc::Op::kGetSockOpt);
    request.arg2 = -1;
    CHECK(check_request(request, 1, ipc::SlotState::kOpen, ipc::kClientSlots) == -EINVAL);
}

TEST_CASE("shutdown's how is checked first, as Linux does", "[requests]") {
    CHECK(check_request(make_request(ipc::Op::kShutdown, SHUT_RD), 1, ipc::SlotState::kOpen,
                        ipc::kClientSlots) == 0);
    CHECK(check_request(make_request(ipc::Op::kShutdown, SHUT_RDWR), 1, ipc::SlotState::kOpen,
                        ipc::kClientSlots) == 0);
    CHECK(check_request(make_request(ipc::Op::kShutdown, 3), 1, ipc::SlotState::kOpen,
                        ipc::kClientSlots) == -EINVAL);
    CHECK(check_request(make_request(ipc::Op::kShutdown, -1), 1, ipc::SlotState::kOpen,
                        ipc::kClientSlots) == -EINVAL);
}

TEST_CASE("CapEff is read from /proc/PID/status text", "[caps]") {
    uint64_t caps = 0;
    CHECK(parse_cap_eff("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n", caps));
    CHECK(caps == 0x000001ffffffffffull);
    CHECK(parse_cap_eff("CapEff:\t0000000000003400", caps));
    CHECK((caps & kCapNetBindService) != 0);
    CHECK((caps & kCapNetAdmin) != 0);
    CHECK((caps & kCapNetRaw) != 0);
    CHECK_FALSE(parse_cap_eff("CapPrm:\t0000000000003400\n", caps));
    CHECK_FALSE(parse_cap_eff("CapEff:\t\n", caps));
    CHECK_FALSE(parse_cap_eff("CapEff:\t00000000000000000\n", caps));  // 17 digits
    CHECK_FALSE(parse_cap_eff("CapEff:\t12zz\n", caps));
    CHECK_FALSE(parse_cap_eff("xCapEff:\t1\n", caps));
}

TEST_CASE("binding a port below ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE", "[bind]") {
    ClientCreds user{1, 1000, 1000, 0};
    ClientCreds with_cap{1, 1000, 1000, kCapNetBindService};
    ClientCreds root{1, 0, 0, ~uint64_t{0}};
    // uid 0 without the capability (dropped, or counted in another user namespace) is refused,
    // as cap_capable() refuses it.
    ClientCreds root_without_cap{1, 0, 0, 0};
    const auto port80 = inet_addr_bytes("127.0.0.1", 80);
    const auto port8080 = inet_addr_bytes("127.0.0.1", 8080);
    const auto port0 = inet_addr_bytes("0.0.0.0", 0);
    CHECK(check_bind_permission(port80.data(), 16, user, 1024) == -EACCES);
    CHECK(check_bind_permission(port80.data(), 16, with_cap, 1024) == 0);
    CHECK(check_bind_permission(port80.data(), 16, root, 1024) == 0);
    CHECK(check_bind_permission(port80.data(), 16, root_without_cap, 1024) == -EACCES);
    CHECK(check_bind_permission(port8080.data(), 16, user, 1024) == 0);
    CHECK(check_bind_permission(port0.data(), 16, user, 1024) == 0);
    // The sysctl moves the limit.
    CHECK(check_bind_permission(port80.data(), 16, user, 80) == 0);
    CHECK(check_bind_permission(port8080.data(), 16, user, 9000) == -EACCES);
    const auto v6_port22 = inet6_addr_bytes("::1", 22);
    CHECK(check_bind_permission(v6_port22.data(), 28, user, 1024) == -EACCES);
    // AF_UNSPEC binds like AF_INET on Linux: its port counts too.
    auto unspec = inet_addr_bytes("0.0.0.0", 25);
    const sa_family_t family = AF_UNSPEC;
    std::memcpy(unspec.data(), &family, sizeof(family));
    CHECK(check_bind_permission(unspec.data(), 16, user, 1024) == -EACCES);
    // Too short to name a port: the kernel answers EINVAL.
    CHECK(check_bind_permission(port80.data(), 2, user, 1024) == 0);
}

TEST_CASE("options that carry pointers or descriptors are refused", "[sockopt]") {
    const uint64_t all = kCapNetAdmin | kCapNetRaw | kCapNetBindService;
    for (int optname :
         {SO_ATTACH_FILTER, SO_ATTACH_BPF, SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF}) {
        CHECK(refused_with(set_int(SOL_SOCKET, optname, 0, all), -ENOPROTOOPT));
    }
    CHECK(passed(set_int(SOL_SOCKET, SO_DETACH_FILTER, 0, 0)));
    CHECK(decide_getsockopt(IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE).action == GetOptionAction::kRefuse);
}

TEST_CASE("privileged options need the client's capability, not the engine's", "[sockopt]") {
    CHECK(refused_with(set_int(SOL_SOCKET, SO_MARK, 7, 0), -EPERM));
    CHECK(passed(set_int(SOL_SOCKET, SO_MARK, 7, kCapNetAdmin)));
    CHECK(passed(set_int(SOL_SOCKET, SO_MARK, 7, kCapNetRaw)));
    CHECK(refused_with(set_int(SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20, kCapNetRaw), -EPERM));
    CHECK(passed(set_int(SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20, kCapNetAdmin)));
    CHECK(refused_with(set_int(SOL_SOCKET, SO_SNDBUFFORCE, 1 << 20, 0), -EPERM));
    CHECK(refused_with(set_int(SOL_SOCKET, SO_DEBUG, 1, 0), -EACCES));
    CHECK(passed(set_int(SOL_SOCKET, SO_DEBUG, 0, 0)));
    CHECK(passed(set_int(SOL_SOCKET, SO_PRIORITY, 6, 0)));
    CHECK(refused_with(set_int(SOL_SOCKET, SO_PRIORITY, 7, 0), -EPERM));
    CHECK(refused_with(set_int(SOL_SOCKET, SO_PRIORITY, -1, 0), -EPERM));
    CHECK(passed(set_int(SOL_SOCKET, SO_PRIORITY, 7, kCapNetAdmin)));
    CHECK(refused_with(set_int(IPPROTO_IP, IP_TRANSPARENT, 1, 0), -EPERM));
    CHECK(passed(set_int(IPPROTO_IP, IP_TRANSPARENT, 0, 0)));
    CHECK(passed(set_int(IPPROTO_IP, IP_TRANSPARENT, 1, kCapNetRaw)));
    CHECK(refused_with(set_int(IPPROTO_IPV6, IPV6_TRANSPARENT, 1, 0), -EPERM));
    CHECK(refused_with(set_int(IPPROTO_TCP, TCP_REPAIR, 1, kCapNetRaw), -EPERM));
    CHECK(passed(set_int(IPPROTO_TCP, TCP_REPAIR, 1, kCapNetAdmin)));
    CHECK(refused_with(set_int(IPPROTO_IP, IP_XFRM_POLICY, 0, 0), -EPERM));
    CHECK(refused_with(set_int(IPPROTO_IPV6, IPV6_HOPOPTS, 0, kCapNetAdmin), -EPERM));
    CHECK(refused_with(set_int(SOL_SOCKET, SO_PREFER_BUSY_POLL, 1, 0), -EPERM));
    CHECK(passed(set_int(SOL_SOCKET, SO_PREFER_BUSY_POLL, 0, 0)));
}

TEST_CASE("SO_BINDTODEVICE: the first binding is free, changing it needs CAP_NET_RAW",
          "[sockopt]") {
    const char device[] = "lo";
    const auto *bytes = reinterpret_cast<const uint8_t *>(device);
    SocketFacts unbound, already;
    already.bound_to_device = true;
    CHECK(passed(decide_setsockopt(SOL_SOCKET, SO_BINDTODEVICE, bytes, 3, 0, unbound)));
    CHECK(
        refused_with(decide_setsockopt(SOL_SOCKET, SO_BINDTODEVICE, bytes, 3, 0, already), -EPERM));
    CHECK(passed(decide_setsockopt(SOL_SOCKET, SO_BINDTODEVICE, bytes, 3, kCapNetRaw, already)));
}

TEST_CASE("SO_TXTIME on another clock than CLOCK_MONOTONIC needs CAP_NET_ADMIN", "[sockopt]") {
    struct {
        clockid_t clock;
        uint32_t flags;
    } txtime{CLOCK_TAI, 0};
    const auto *bytes = reinterpret_cast<const uint8_t *>(&txtime);
    CHECK(refused_with(decide_setsockopt(SOL_SOCKET, SO_TXTIME, bytes, sizeof(txtime), 0, {}),
                       -EPERM));
    txtime.clock = CLOCK_MONOTONIC;
    CHECK(passed(decide_setsockopt(SOL_SOCKET, SO_TXTIME, bytes, sizeof(txtime), 0, {})));
}

TEST_CASE("TCP_CONGESTION: unprivileged clients only get allowed algorithms", "[sockopt]") {
    SocketFacts facts;
    facts.allowed_congestion = "reno cubic\n";
    facts.available_congestion = "reno cubic bbr\n";
    auto set = [&](const char *name, uint64_t caps) {
        return decide_setsockopt(IPPROTO_TCP, TCP_CONGESTION,
                                 reinterpret_cast<const uint8_t *>(name),
                                 static_cast<uint32_t>(std::strlen(name)), caps, facts);
    };
    CHECK(passed(set("cubic", 0)));
    CHECK(passed(set("reno", 0)));
    CHECK(refused_with(set("bbr", 0), -EPERM));
    CHECK(refused_with(set("nonesuch", 0), -ENOENT));
    CHECK(refused_with(set("cub", 0), -ENOENT));
    CHECK(passed(set("bbr", kCapNetAdmin)));
}

TEST_CASE("ordinary options pass through to the kernel socket", "[sockopt]") {
    CHECK(passed(set_int(SOL_SOCKET, SO_REUSEADDR, 1, 0)));
    CHECK(passed(set_int(SOL_SOCKET, SO_REUSEPORT, 1, 0)));
    CHECK(passed(set_int(SOL_SOCKET, SO_KEEPALIVE, 1, 0)));
    CHECK(passed(set_int(SOL_SOCKET, SO_RCVBUF, 1 << 20, 0)));
    CHECK(passed(set_int(IPPROTO_TCP, TCP_NODELAY, 1, 0)));
    CHECK(passed(set_int(IPPROTO_TCP, TCP_KEEPIDLE, 30, 0)));
    CHECK(passed(set_int(IPPROTO_TCP, TCP_CORK, 1, 0)));
    CHECK(passed(set_int(IPPROTO_TCP, TCP_DEFER_ACCEPT, 5, 0)));
    CHECK(passed(set_int(IPPROTO_IPV6, IPV6_V6ONLY, 1, 0)));
    // The rx ring decides readability: SO_RCVLOWAT stays in the engine.
    CHECK(set_int(SOL_SOCKET, SO_RCVLOWAT, 10, 0).action == OptionAction::kEngineOnly);
    CHECK(decide_getsockopt(SOL_SOCKET, SO_ERROR).action == GetOptionAction::kSoError);
    CHECK(decide_getsockopt(SOL_SOCKET, SO_RCVLOWAT).action == GetOptionAction::kRcvLowat);
    CHECK(decide_getsockopt(IPPROTO_TCP, TCP_INFO).action == GetOptionAction::kKernel);
}

TEST_CASE("only data-size ioctls reach the kernel socket", "[ioctl]") {
    CHECK(ioctl_allowed(SIOCINQ));
    CHECK(ioctl_allowed(SIOCOUTQ));
    CHECK(ioctl_allowed(SIOCOUTQNSD));
    CHECK(ioctl_allowed(SIOCATMARK));
    CHECK_FALSE(ioctl_allowed(SIOCGIFCONF));  // takes a pointer
    CHECK_FALSE(ioctl_allowed(0));
}

TEST_CASE("core lists", "[cli]") {
    std::vector<int> cores;
    CHECK(parse_core_list("1", cores));
    CHECK(cores == std::vector<int>{1});
    CHECK(parse_core_list("0,1", cores));
    CHECK(cores == std::vector<int>{0, 1});
    CHECK(parse_core_list("2-3", cores));
    CHECK(cores == std::vector<int>{2, 3});
    CHECK(parse_core_list("0,2-4", cores));
    CHECK(cores == std::vector<int>{0, 2, 3, 4});
    for (const char *bad :
         {"", ",", "1,", "a", "3-1", "1-", "-1", "1,1", "0-1,1", "99999", "1 ", "0x1"})
        CHECK_FALSE(parse_core_list(bad, cores));
}

TEST_CASE("command line", "[cli]") {
    auto parse = [](std::vector<std::string> args, Options &options, std::string &error) {
        std::vector<char *> argv;
        static std::string name = "tcpsd";
        argv.push_back(name.data());
        for (auto &arg : args) argv.push_back(arg.data());
        return parse_options(static_cast<int>(argv.size()), argv.data(), options, error);
    };
    Options options;
    std::string error;
    REQUIRE(parse({"--socket", "/tmp/x.sock", "--cores", "0-1", "--spin-us", "10", "--busy-poll",
                   "--ready-fd", "5", "--verbose"},
                  options, error));
    CHECK(options.socket_path == "/tmp/x.sock");
    CHECK(options.cores == std::vector<int>{0, 1});
    CHECK(options.spin_us == 10);
    CHECK(options.busy_poll);
    CHECK(options.ready_fd == 5);
    CHECK(options.verbose);
    Options defaults;
    REQUIRE(parse({}, defaults, error));
    CHECK(defaults.spin_us == 50);
    CHECK(defaults.cores.empty());
    Options bad;
    CHECK_FALSE(parse({"--cores", "x"}, bad, error));
    CHECK_FALSE(parse({"--spin-us"}, bad, error));
    CHECK_FALSE(parse({"--spin-us", "-5"}, bad, error));
    CHECK_FALSE(parse({"--bogus"}, bad, error));
    CHECK(parse({"--cores=3"}, bad, error));
    CHECK(bad.cores == std::vector<int>{3});
    CHECK(defaults.handoff_load == -1);  // never saturated unless asked
    CHECK(parse({"--handoff-load", "85"}, bad, error));
    CHECK(bad.handoff_load == 85);
    CHECK_FALSE(parse({"--handoff-load", "101"}, bad, error));
    CHECK_FALSE(parse({"--handoff-load", "-1"}, bad, error));
    CHECK_FALSE(defaults.ask_back_at_once);
    CHECK(parse({"--handoff-load", "0", "--ask-back-at-once"}, bad, error));
    CHECK(bad.ask_back_at_once);
    CHECK(defaults.min_workers == 0);  // every worker, always
    CHECK(parse({"--min-workers", "2"}, bad, error));
    CHECK(bad.min_workers == 2);
    CHECK_FALSE(parse({"--min-workers", "0"}, bad, error));
    CHECK((defaults.elastic_high == 75 && defaults.elastic_low == 35));
    CHECK(parse({"--elastic-marks", "20,10"}, bad, error));
    CHECK((bad.elastic_high == 20 && bad.elastic_low == 10));
    CHECK_FALSE(parse({"--elastic-marks", "10,20"}, bad, error));
    CHECK_FALSE(parse({"--elastic-marks", "50"}, bad, error));
}

TEST_CASE("a worker is saturated from its busy share on, and stays so down to 20 points below") {
    LoadGauge gauge(90);
    CHECK_FALSE(gauge.saturated());
    CHECK_FALSE(gauge.update(89, 100));
    CHECK(gauge.update(90, 100));
    CHECK(gauge.update(75, 100));  // between the marks: no flip back and forth
    CHECK(gauge.update(70, 100));
    CHECK_FALSE(gauge.update(69, 100));
    CHECK_FALSE(gauge.update(85, 100));
    CHECK(gauge.update(200, 100));  // busy past the window (clock jitter) counts as all of it
    CHECK(gauge.update(0, 0));      // an empty window changes nothing
}

TEST_CASE("elastic workers: one more from the high watermark, one fewer below the low one") {
    Elasticity elastic(1, 3);  // watermarks 75 and 35, 3 windows before one fewer
    CHECK(elastic.active() == 1);
    CHECK(elastic.update({74, 0, 0}) == 1);
    CHECK(elastic.update({80, 0, 0}) == 1);  // one window over: not yet
    CHECK(elastic.update({80, 0, 0}) == 2);  // two running
    CHECK(elastic.update({80, 90, 0}) == 2);
    CHECK(elastic.update({76, 80, 0}) == 3);
    CHECK(elastic.update({100, 100, 100}) == 3);  // at most max
    CHECK(elastic.update({100, 100, 100}) == 3);
    // The load that made it grow does not make it shrink back: 3 x 30 over two is 45, not < 35.
    for (int k = 0; k < 10; ++k) CHECK(elastic.update({30, 30, 30}) == 3);
    // 3 x 20 over two is 30: one fewer after three windows running.
    CHECK(elastic.update({20, 20, 20}) == 3);
    CHECK(elastic.update({20, 20, 20}) == 3);
    CHECK(elastic.update({20, 20, 20}) == 2);
    // And that one fewer does not make it grow again: 2 x 30 is well under 75 each.
    for (int k = 0; k < 10; ++k) CHECK(elastic.update({30, 30, 0}) == 2);
    for (int k = 0; k < 3; ++k) elastic.update({0, 0, 0});
    CHECK(elastic.active() == 1);
    for (int k = 0; k < 10; ++k) CHECK(elastic.update({0, 0, 0}) == 1);  // at least min
    // A load around one watermark flips nothing: alternating 70/80 never has two windows over.
    for (int k = 0; k < 10; ++k) CHECK(elastic.update({k % 2 ? 80 : 70}) == 1);
}

TEST_CASE("a high mark up to 20 has its low mark at half of it, so a worker can leave it") {
    LoadGauge gauge(10);
    CHECK(gauge.low_mark() == 5);
    CHECK(gauge.update(10, 100));
    CHECK(gauge.update(5, 100));  // between the marks
    CHECK_FALSE(gauge.has_room());
    CHECK_FALSE(gauge.update(4, 100));
    CHECK(gauge.has_room());
    CHECK(LoadGauge(20).low_mark() == 10);
    CHECK(LoadGauge(21).low_mark() == 1);
    CHECK(LoadGauge(40).low_mark() == 20);
    CHECK(LoadGauge(90).low_mark() == 70);
    LoadGauge one(1);  // saturated by any work, no longer by none
    CHECK(one.update(1, 100));
    CHECK_FALSE(one.update(0, 100));
}

TEST_CASE("handoff load -1 never saturates, 0 always does") {
    LoadGauge never(-1);
    CHECK_FALSE(never.update(100, 100));
    CHECK(never.has_room());
    LoadGauge always(0);
    CHECK(always.saturated());
    CHECK(always.update(0, 100));
    CHECK_FALSE(always.has_room());
}

TEST_CASE("a family's connections pass over busy workers while another has room") {
    // Workers 0-3: 2 parked (takes no new work), 1 busy.
    const bool takes_new[] = {true, true, false, true};
    bool busy[] = {false, true, false, false};
    auto active = [&](uint32_t k) { return takes_new[k]; };
    auto is_busy = [&](uint32_t k) { return busy[k]; };
    uint32_t next = 0;
    std::vector<uint32_t> order;
    for (int k = 0; k < 6; ++k) order.push_back(next_worker(next, 4, active, is_busy));
    CHECK(order == std::vector<uint32_t>{0, 3, 0, 3, 0, 3});
    CHECK_FALSE(family_saturated(4, active, is_busy));
    // All that take new work busy: in turn among them (each leaves it to the kernel).
    busy[0] = busy[3] = true;
    order.clear();
    next = 2;
    for (int k = 0; k < 4; ++k) order.push_back(next_worker(next, 4, active, is_busy));
    CHECK(order == std::vector<uint32_t>{3, 0, 1, 3});
    CHECK(family_saturated(4, active, is_busy));
    // One with room again: it takes them all.
    busy[1] = false;
    order.clear();
    for (int k = 0; k < 3; ++k) order.push_back(next_worker(next, 4, active, is_busy));
    CHECK(order == std::vector<uint32_t>{1, 1, 1});
    CHECK_FALSE(family_saturated(4, active, is_busy));
    // None takes new work: the home, saturated or not by its own gauge.
    auto none = [](uint32_t) { return false; };
    CHECK(next_worker(next, 4, none, is_busy) == 0);
    CHECK(family_saturated(4, none, is_busy));  // busy[0]
    busy[0] = false;
    CHECK_FALSE(family_saturated(4, none, is_busy));
    // One worker: always the home.
    next = 0;
    CHECK(next_worker(next, 1, active, is_busy) == 0);
    CHECK(next == 0);
}

TEST_CASE(
    "a worker takes connections back only under its low mark, so it does not shed them again") {
    LoadGauge gauge(50);
    CHECK(gauge.has_room());  // nothing measured yet
    gauge.update(40, 100);    // not saturated, but over the low mark (30)
    CHECK_FALSE(gauge.saturated());
    CHECK_FALSE(gauge.has_room());
    gauge.update(29, 100);
    CHECK(gauge.has_room());
    gauge.update(60, 100);
    CHECK_FALSE(gauge.has_room());  // saturated
    gauge.update(35, 100);          // still saturated: between the marks
    CHECK_FALSE(gauge.has_room());
    gauge.update(10, 100);
    CHECK(gauge.has_room());
}

namespace {

// A connected pair on loopback: {connecting end, accepted end}; the listener is closed.
std::pair<int, int> tcp_pair() {
    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    REQUIRE(bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    REQUIRE(listen(listener, 4) == 0);
    REQUIRE(getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &len) == 0);
    const int client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(connect(client, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) == 0);
    const int server = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    REQUIRE(server >= 0);
    close(listener);
    return {client, server};
}

std::vector<uint8_t> bytes_of(const char *text) {
    return std::vector<uint8_t>(text, text + std::strlen(text));
}

}  // namespace

TEST_CASE("only connected or listening TCP sockets of AF_INET/AF_INET6 are adopted", "[adopt]") {
    int family = 0;
    bool listening = false;
    auto [client, server] = tcp_pair();
    CHECK(adoptable_socket(client, family, listening) == 0);
    CHECK(family == AF_INET);
    CHECK(!listening);
    CHECK(adoptable_socket(server, family, listening) == 0);
    // After the peer's FIN (CLOSE_WAIT) still: the FIN is the last thing it holds.
    REQUIRE(shutdown(client, SHUT_WR) == 0);
    pollfd pfd{server, POLLRDHUP, 0};
    REQUIRE(poll(&pfd, 1, 5000) == 1);
    CHECK(adoptable_socket(server, family, listening) == 0);
    // The side that sent its FIN is not (FIN_WAIT2): its half-closed state is not a slot's.
    CHECK(adoptable_socket(client, family, listening) == -EOPNOTSUPP);
    close(client);
    close(server);

    const int listener = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    CHECK(adoptable_socket(listener, family, listening) == -EOPNOTSUPP);  // never connected
    sockaddr_in6 any{};
    any.sin6_family = AF_INET6;
    any.sin6_addr = in6addr_loopback;
    if (bind(listener, reinterpret_cast<sockaddr *>(&any), sizeof(any)) == 0 &&
        listen(listener, 1) == 0) {
        // A listener (passed on with SCM_RIGHTS): its queue is the application's to take.
        CHECK(adoptable_socket(listener, family, listening) == 0);
        CHECK(listening);
        CHECK(family == AF_INET6);
    }
    close(listener);
    const int udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    CHECK(adoptable_socket(udp, family, listening) == -EOPNOTSUPP);
    close(udp);
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    CHECK(adoptable_socket(pair[0], family, listening) == -EOPNOTSUPP);
    close(pair[0]);
    close(pair[1]);
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    CHECK(adoptable_socket(pipe_fds[0], family, listening) == -EOPNOTSUPP);  // ENOTSOCK, untouched
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    CHECK(adoptable_socket(-1, family, listening) == -EOPNOTSUPP);
}

TEST_CASE("parked bytes go only to the very socket they were parked for", "[adopt]") {
    ParkedBytes store;
    auto [a_client, a_server] = tcp_pair();
    auto [b_client, b_server] = tcp_pair();
    const uid_t uid = 4242;  // a uid of no process: its share is all the engine's room
    const QuotaUsage before = quotas().usage(uid);
    REQUIRE(store.park(a_server, uid, bytes_of("first "), 100) == 0);
    CHECK(quotas().usage(uid).bytes == before.bytes + 6);
    // Parked again before anyone claimed them: the later bytes follow, on the same entry.
    REQUIRE(store.park(a_server, uid, bytes_of("second"), 200) == 0);
    CHECK(store.entries() == 1);
    // Another socket, or the other end of the same connection, finds nothing.
    CHECK_FALSE(store.holds(b_server));
    CHECK(store.claim(b_server).empty());
    CHECK(store.claim(a_client).empty());
    // A descriptor of the same socket (as a receiver of SCM_RIGHTS has) claims them, once.
    const int received = dup(a_server);
    CHECK(store.holds(received));
    CHECK(store.claim(received) == bytes_of("first second"));
    CHECK(store.claim(received).empty());
    CHECK(store.entries() == 0);
    CHECK(quotas().usage(uid).bytes == before.bytes);
    // Not a socket: refused.
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    CHECK(store.park(pipe_fds[0], uid, bytes_of("x"), 0) == -ENOTSOCK);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    for (int fd : {a_client, a_server, b_client, b_server, received}) close(fd);
}

TEST_CASE("parked bytes keep no socket alive, and a new socket never gets them", "[adopt]") {
    ParkedBytes store;
    auto [client, server] = tcp_pair();
    const uid_t uid = 4243;
    REQUIRE(store.park(server, uid, bytes_of("unclaimed"), 1'000) == 0);
    // The receiver closes it unused: the connection closes at once, as on Linux.
    close(server);
    pollfd pfd{client, POLLRDHUP, 0};
    CHECK(poll(&pfd, 1, 5000) == 1);
    // Sockets made afterwards, whatever inode they get, are other sockets.
    for (int k = 0; k < 8; ++k) {
        auto [c, s] = tcp_pair();
        CHECK_FALSE(store.holds(s));
        CHECK_FALSE(store.holds(c));
        close(c);
        close(s);
    }
    uint64_t bytes = 0;
    CHECK(store.expire(1'000 + kParkedLifetimeNs - 1, bytes) == 0);
    CHECK(store.entries() == 1);
    CHECK(store.expire(1'000 + kParkedLifetimeNs, bytes) == 1);
    CHECK(bytes == 9);
    CHECK(store.entries() == 0);
    CHECK(quotas().usage(uid).fds == 0);
    CHECK(quotas().usage(uid).bytes == 0);
    close(client);
}
