// Control requests: one outstanding per socket, answered in SocketSlot::response.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <string>

#include "identity.hpp"
#include "parked.hpp"
#include "quota.hpp"
#include "worker.hpp"

#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif

namespace tcps::engine {

namespace {

std::string read_small_file(const char *path) {
    std::string text;
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return text;
    char buffer[1024];
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n > 0) text.assign(buffer, static_cast<size_t>(n));
    close(fd);
    return text;
}

int get_int_option(int fd, int level, int optname, int fallback) {
    int value = 0;
    socklen_t len = sizeof(value);
    if (getsockopt(fd, level, optname, &value, &len) != 0) return fallback;
    return value;
}

const sockaddr *as_sockaddr(const uint8_t *bytes) {
    return reinterpret_cast<const sockaddr *>(bytes);
}

}  // namespace

void Worker::respond(Session &s, uint32_t i, uint32_t seq, int result, const uint8_t *opt,
                     uint32_t opt_len) {
    ipc::SocketSlot &slot = s.region.slot(i);
    slot.response.result = result;
    slot.response.opt_len = opt_len;
    if (opt_len > 0) std::memcpy(slot.response.opt, opt, opt_len);
    slot.resp_seq.store(seq, std::memory_order_release);
    bump_event(s, i);
}

void Worker::handle_request(Session &s, uint32_t i, uint32_t req_seq) {
    EngineSlot &es = s.slots[i];
    // One copy out of the region; everything below reads the copy only.
    ipc::Request req;
    std::memcpy(&req, &s.region.slot(i).request, sizeof(req));
    es.last_req_seq = req_seq;
    int result = check_request(req, i, es.state, s.client_slots);
    if (result != 0) return respond(s, i, req_seq, result);
    switch (static_cast<ipc::Op>(req.op)) {
        case ipc::Op::kSocket:
            result = op_socket(s, i, req);
            break;
        case ipc::Op::kBind:
            result = op_bind(s, i, req);
            break;
        case ipc::Op::kListen:
            result = op_listen(s, i, req);
            break;
        case ipc::Op::kConnect:
            result = op_connect(s, i, req);
            break;
        case ipc::Op::kShutdown:
            result = op_shutdown(s, i, req.arg0);
            // A listener's untaken connections on other workers are reset first (kDropped),
            // as Linux's shutdown(SHUT_RD) resets the queue before it returns.
            if (result == 0 && es.drops_pending > 0) {
                es.shutdown_answer_pending = true;
                es.shutdown_answer_seq = req_seq;
                return;
            }
            break;
        case ipc::Op::kClose: {
            // A socket that holds a port (a listener, or bound and not connected) is answered
            // once its kernel socket is closed, so that the port is free when close() returns,
            // as on Linux; a reset once its RST is sent (and seen by a peer of ours), as
            // Linux's close() sends it. Others are answered first: the client does not wait.
            const bool holds_port =
                (es.flags & ipc::kFlagListening) ||
                ((es.flags & ipc::kFlagBound) && !(es.flags & ipc::kFlagConnected));
            const bool resets =
                req.arg0 == 1 && (es.flags & ipc::kFlagConnected) && !(es.flags & ipc::kFlagReset);
            if ((holds_port || resets) && es.state == ipc::SlotState::kOpen) {
                es.close_answer_pending = true;
                es.close_answer_seq = req_seq;
            } else {
                respond(s, i, req_seq, 0);
            }
            start_close(s, i, req.arg0 == 1);
            return;
        }
        case ipc::Op::kSetSockOpt:
            result = op_setsockopt(s, i, req);
            break;
        case ipc::Op::kGetSockOpt: {
            uint8_t out[ipc::kOptMax];
            uint32_t out_len = 0;
            result = op_getsockopt(s, i, req, out, out_len);
            return respond(s, i, req_seq, result, out, result == 0 ? out_len : 0);
        }
        case ipc::Op::kGetSockName:
            result = op_getsockname(s, i);
            break;
        case ipc::Op::kIoctl:
            result = op_ioctl(s, i, req);
            break;
        case ipc::Op::kPastMark:
            result = op_past_mark(s, i);
            break;
        case ipc::Op::kLeaveDirect:
            result = op_leave_direct(s, i);
            break;
        case ipc::Op::kStat: {
            struct statx out {};
            result = op_stat(s, i, req, out);
            return respond(s, i, req_seq, result, reinterpret_cast<const uint8_t *>(&out),
                           result == 0 ? sizeof(out) : 0);
        }
        case ipc::Op::kRecvOob: {
            uint8_t out[1];
            uint32_t out_len = 0;
            result = op_recv_oob(s, i, req, out, out_len);
            return respond(s, i, req_seq, result, out, out_len);
        }
        default:
            result = -EINVAL;
            break;
    }
    if (s.ending) return;
    respond(s, i, req_seq, result);
}

// A relay session's socket() (a local client asks with kNewSocket, new_socket()). Its process
// is on another host: the socket is the engine's own, counted against the uid the relay names.
int Worker::op_socket(Session &s, uint32_t i, const ipc::Request &req) {
    if (const int rc = quotas().charge(s.creds.uid, 1, kSocketBytes); rc != 0) return rc;
    const int fd = socket(req.arg0, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0) {
        const int error = errno;
        quotas().release(s.creds.uid, 1, kSocketBytes);
        return -(error == EMFILE ? ENFILE : error);
    }
    init_slot(s, i, fd, req.arg0, 0);
    s.slots[i].quota_uid = s.creds.uid;
    publish_open(s, i);
    return 0;
}

int Worker::op_bind(Session &s, uint32_t i, const ipc::Request &req) {
    EngineSlot &es = s.slots[i];
    // A privileged port, judged as the kernel would for the client: its socket's namespace's
    // ip_unprivileged_port_start now, and the rights every member has there now. Everything
    // else, SO_REUSEPORT's same-owner rule among them, the kernel checks itself: the socket
    // is the client's (create_socket_as).
    if (sockaddr_port(req.addr, req.addr_len) > 0) {
        const int port_start = unprivileged_port_start_of(es.fd);
        const ClientCreds unprivileged;
        if (check_bind_permission(req.addr, req.addr_len, unprivileged, port_start) != 0) {
            const int denied =
                check_bind_permission(req.addr, req.addr_len, family_rights(s, es.fd), port_start);
            if (denied != 0) return denied;
        }
    }
    if (bind(es.fd, as_sockaddr(req.addr), req.addr_len) != 0) return -errno;
    refresh_local_address(s, i);
    publish_flags(s, i, es.flags | ipc::kFlagBound);
    return 0;
}

int Worker::op_listen(Session &s, uint32_t i, const ipc::Request &req) {
    EngineSlot &es = s.slots[i];
    const bool twin = prepare_twin(s, i);
    if (listen(es.fd, req.arg0) != 0) {
        const int error = errno;
        if (twin) {
            const int off = 0;
            setsockopt(es.fd, SOL_SOCKET, SO_REUSEPORT, &off, sizeof(off));
        }
        return -error;
    }
    if (twin)
        make_twin(s, i, req.arg0);
    else if (es.twin_fd >= 0 && !es.on_demand)
        listen(es.twin_fd, req.arg0);  // a new backlog: for both
    refresh_local_address(s, i);
    if (!(es.flags & ipc::kFlagListening)) {
        publish_flags(s, i, es.flags | ipc::kFlagListening | ipc::kFlagBound);
        s.listeners.push_back(i);
        // What it accepts belongs to its owner, as if the owner had accepted it.
        es.accept_personality = personality_for(es.fd);
        socket_cookie(es.fd, es.listener_cookie);
    }
    update_kernel_mask(s, i);
    post_accept(s, i);
    return 0;
}

int Worker::op_connect(Session &s, uint32_t i, const ipc::Request &req) {
    EngineSlot &es = s.slots[i];
    if (es.flags & ipc::kFlagConnected) return -EISCONN;
    if (es.flags & ipc::kFlagConnecting) return -EALREADY;
    if (es.flags & ipc::kFlagReset) {
        // The last attempt failed (refused, timed out, aborted by a shutdown). The engine took
        // its outcome with SO_ERROR, so its kernel socket still counts as connecting and would
        // answer ECONNABORTED; the client has already reported the failure as Linux does.
        // Disconnect it (what __inet_stream_connect() does on that ECONNABORTED): back in
        // TCP_CLOSE, explicit bind kept, it starts the new attempt below.
        sockaddr unspec{};
        unspec.sa_family = AF_UNSPEC;
        connect(es.fd, &unspec, sizeof(unspec));
    }
    // The kernel's own non-blocking connect: its immediate errors are exactly Linux's.
    if (connect(es.fd, as_sockaddr(req.addr), req.addr_len) == 0) {
        on_connected(s, i);
        return 0;
    }
    const int error = errno;
    if (error != EINPROGRESS) return -error;
    refresh_local_address(s, i);
    // A new attempt after a failed one starts clean.
    publish_flags(
        s, i,
        (es.flags & ~(ipc::kFlagReset | ipc::kFlagRxEof)) | ipc::kFlagConnecting | ipc::kFlagBound);
    track_connect(s, i);
    post_connect_poll(s, i);
    return -EINPROGRESS;
}

int Worker::shutdown_listener(Session &s, uint32_t i, int how) {
    EngineSlot &es = s.slots[i];
    // inet_shutdown(): SHUT_WR leaves a listener alone. SHUT_RD disconnects it: accept()
    // fails with EINVAL, poll says POLLOUT|POLLHUP, the kernel resets the connections in its
    // queue, and listen() may be called again.
    if (shutdown(es.fd, how) != 0) return -errno;
    if (how == SHUT_WR) return 0;
    stop_listening(s, i);
    // Ours too: those the engine accepted but the application has not taken.
    drop_untaken(s, i, false);
    update_kernel_mask(s, i);
    publish_flags(s, i, es.flags & ~(ipc::kFlagListening | ipc::kFlagAcceptPaused));
    bump_event(s, i);
    return 0;
}

int Worker::shutdown_connecting(Session &s, uint32_t i, int how) {
    EngineSlot &es = s.slots[i];
    // inet_shutdown(): any shutdown in SYN_SENT disconnects: the attempt ends with SO_ERROR
    // ECONNRESET and connect() may be called again.
    if (shutdown(es.fd, how) != 0) return -errno;
    tcp_info info{};
    socklen_t len = sizeof(info);
    const bool closed =
        getsockopt(es.fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0 || info.tcpi_state == TCP_CLOSE;
    if (closed) {
        if (es.connect_posted) cancel(s, i, Kind::kConnect);
        int error = get_int_option(es.fd, SOL_SOCKET, SO_ERROR, 0);
        record_error(s, i, error != 0 ? error : ECONNRESET);
        return 0;
    }
    // The handshake finished before our shutdown, which then applied to a connection (with
    // nothing queued yet, so SHUT_WR needs no drain).
    on_connected(s, i);
    uint32_t flags = es.flags;
    if (how != SHUT_WR) flags |= ipc::kFlagRxShut;
    if (how != SHUT_RD) flags |= ipc::kFlagTxShut;
    update_kernel_mask(s, i);
    publish_flags(s, i, flags);
    bump_event(s, i);
    return 0;
}

int Worker::op_shutdown(Session &s, uint32_t i, int how) {
    EngineSlot &es = s.slots[i];
    int result = 0;
    const bool rd = how == SHUT_RD || how == SHUT_RDWR;
    const bool wr = how == SHUT_WR || how == SHUT_RDWR;
    uint32_t flags = es.flags;
    if (flags & ipc::kFlagListening) return shutdown_listener(s, i, how);
    if ((flags & ipc::kFlagConnecting) && !(flags & (ipc::kFlagConnected | ipc::kFlagReset)))
        return shutdown_connecting(s, i, how);
    if (!(flags & ipc::kFlagConnected) || (flags & ipc::kFlagReset)) {
        // Nothing in the rings to wait for: the kernel answers (ENOTCONN, listener, ...).
        if (shutdown(es.fd, how) != 0) return -errno;
        if (rd) flags |= ipc::kFlagRxShut;
        if (wr) flags |= ipc::kFlagTxShut;
    } else {
        if (rd) {
            // ENOTCONN once both FINs are through (the kernel socket is TCP_CLOSE), as on Linux;
            // the shutdown is recorded all the same.
            if (shutdown(es.fd, SHUT_RD) != 0) {
                if (errno != ENOTCONN) return -errno;
                result = -ENOTCONN;
            }
            flags |= ipc::kFlagRxShut;
        }
        if (wr && !(flags & ipc::kFlagTxShut) && !es.shut_wr_pending) {
            // Applied once the bytes queued before it have gone (post_send/on_send).
            es.shut_wr_pending = true;
            es.shut_wr_tail = es.tx_tail;
        }
    }
    update_kernel_mask(s, i);
    publish_flags(s, i, flags);
    bump_event(s, i);
    if (es.shut_wr_pending && !es.send_posted && es.tx_sent == es.tx_tail) apply_shut_wr(s, i);
    return result;
}

int Worker::op_setsockopt(Session &s, uint32_t i, const ipc::Request &req) {
    EngineSlot &es = s.slots[i];
    const int level = req.arg0;
    const int optname = req.arg1;
    SocketFacts facts;
    std::string allowed, available;
    if (level == SOL_SOCKET && (optname == SO_BINDTODEVICE || optname == SO_BINDTOIFINDEX))
        facts.bound_to_device = get_int_option(es.fd, SOL_SOCKET, SO_BINDTOIFINDEX, 0) != 0;
    if (level == SOL_SOCKET && optname == SO_BUSY_POLL_BUDGET)
        facts.busy_poll_budget = get_int_option(es.fd, SOL_SOCKET, SO_BUSY_POLL_BUDGET, 0);
    if (level == IPPROTO_TCP && optname == TCP_CONGESTION) {
        allowed = read_small_file("/proc/sys/net/ipv4/tcp_allowed_congestion_control");
        available = read_small_file("/proc/sys/net/ipv4/tcp_available_congestion_control");
        facts.allowed_congestion = allowed;
        facts.available_congestion = available;
    }
    // Options that need a capability are decided with the rights every member has now.
    OptionDecision decision = decide_setsockopt(level, optname, req.opt, req.opt_len, 0, facts);
    if (decision.action == OptionAction::kRefuse) {
        const OptionDecision privileged =
            decide_setsockopt(level, optname, req.opt, req.opt_len, s.creds.caps, facts);
        if (privileged.action != OptionAction::kRefuse)
            decision = decide_setsockopt(level, optname, req.opt, req.opt_len,
                                         family_rights(s, es.fd).caps, facts);
    }
    switch (decision.action) {
        case OptionAction::kRefuse:
            return decision.error;
        case OptionAction::kEngineOnly: {
            note_listener_option(s, i, level, optname, req.opt, req.opt_len);
            // SO_RCVLOWAT. The kernel socket computes Linux's value (negative: INT_MAX, 0: 1,
            // at most half the receive buffer) and applies its side effect (a larger
            // SO_RCVBUF); then it goes back to 1, so that the engine's receives keep filling
            // the rx ring, whose contents are what the application's low-water mark is about.
            if (setsockopt(es.fd, SOL_SOCKET, SO_RCVLOWAT, req.opt, req.opt_len) != 0)
                return -errno;
            es.rcvlowat = get_int_option(es.fd, SOL_SOCKET, SO_RCVLOWAT, 1);
            const int one = 1;
            setsockopt(es.fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
            return 0;
        }
        case OptionAction::kKernel:
            break;
    }
    note_listener_option(s, i, level, optname, req.opt, req.opt_len);
    if (setsockopt(es.fd, level, optname, req.opt, req.opt_len) != 0) return -errno;
    return 0;
}

int Worker::op_getsockopt(Session &s, uint32_t i, const ipc::Request &req, uint8_t *out,
                          uint32_t &out_len) {
    EngineSlot &es = s.slots[i];
    const auto room = static_cast<uint32_t>(std::min<int32_t>(req.arg2, ipc::kOptMax));
    const GetOptionDecision decision = decide_getsockopt(req.arg0, req.arg1);
    int value = 0;
    switch (decision.action) {
        case GetOptionAction::kRefuse:
            return decision.error;
        case GetOptionAction::kSoError:
            value = s.region.slot(i).so_error.exchange(0, std::memory_order_acq_rel);
            if (value == 0) value = get_int_option(es.fd, SOL_SOCKET, SO_ERROR, 0);
            break;
        case GetOptionAction::kRcvLowat:
            value = es.rcvlowat;
            break;
        case GetOptionAction::kKernel: {
            // The twin's group is the engine's doing, not the application's.
            if (es.twin_fd >= 0 && !es.on_demand && req.arg0 == SOL_SOCKET &&
                req.arg1 == SO_REUSEPORT)
                break;
            uint8_t buffer[ipc::kOptMax] = {};
            // Some options read input from the buffer (the client's opt bytes).
            std::memcpy(buffer, req.opt, std::min<uint32_t>(req.opt_len, ipc::kOptMax));
            socklen_t len = room;
            if (getsockopt(es.fd, req.arg0, req.arg1, buffer, &len) != 0) return -errno;
            out_len = std::min<uint32_t>(len, room);
            std::memcpy(out, buffer, out_len);
            return 0;
        }
    }
    // Integer answers: like Linux, as many bytes as the caller offered, at most an int.
    out_len = std::min<uint32_t>(room, sizeof(int));
    std::memcpy(out, &value, out_len);
    return 0;
}

int Worker::op_getsockname(Session &s, uint32_t i) {
    return refresh_local_address(s, i);
}

int Worker::op_ioctl(Session &s, uint32_t i, const ipc::Request &req) {
    const auto request = static_cast<unsigned long>(static_cast<uint32_t>(req.arg0));
    if (!ioctl_allowed(request)) return -ENOTTY;
    int value = 0;
    if (ioctl(s.slots[i].fd, request, &value) != 0) return -errno;
    return value;
}

// What fstat()/statx() of the socket says (st_ino as ss and /proc show it, the owner's uid,
// sockfs's device): the kernel socket's own. Only the sync bits of the caller's flags: the
// path is always the socket itself.
static_assert(sizeof(struct statx) <= ipc::kOptMax, "kStat answers with a struct statx");
int Worker::op_stat(Session &s, uint32_t i, const ipc::Request &req, struct statx &out) {
    const int flags = AT_EMPTY_PATH | (req.arg1 & AT_STATX_SYNC_TYPE);
    if (statx(s.slots[i].fd, "", flags, static_cast<unsigned>(req.arg0), &out) != 0) return -errno;
    return 0;
}

// recv(MSG_OOB) is the kernel socket's: it knows whether urgent data is there, read, inline,
// or not yet come, and answers as Linux does.
int Worker::op_recv_oob(Session &s, uint32_t i, const ipc::Request &req, uint8_t *out,
                        uint32_t &out_len) {
    EngineSlot &es = s.slots[i];
    const int flags = MSG_OOB | MSG_DONTWAIT | (req.arg0 & (MSG_PEEK | MSG_TRUNC));
    uint8_t byte = 0;
    const ssize_t n = recv(es.fd, &byte, req.arg1 > 0 ? 1 : 0, flags);
    if (n < 0) return -errno;
    if (n == 1) {
        out[0] = byte;
        out_len = 1;
    }
    look_for_urgent_mark(s, i);  // the byte taken: POLLPRI goes
    return static_cast<int>(n);
}

}  // namespace tcps::engine
