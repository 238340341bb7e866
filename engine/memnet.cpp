// MemNet (seed 004): memory a family registers with the engine, and sends and receives that go
// straight from and into it (each socket's queue of ipc::DirectDescriptor), with no copy on the
// application's side. The client's memfd is untrusted: the engine maps it but never touches it
// itself; only the kernel does (io_uring send/recv), which reports a bad page as EFAULT.
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "log.hpp"
#include "quota.hpp"
#include "worker.hpp"

namespace tcps::engine {

namespace {

constexpr uint64_t kPage = 4096;

}  // namespace

void Worker::register_mem(Session &s, uint32_t member, const ipc::ControlMessage &msg, int fd) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kRegisterMemReply);
    reply.version = ipc::kLayoutVersion;
    reply.arg = -1;
    const uid_t uid = s.members[member].creds.uid;
    const uint64_t length = msg.token;
    const uint64_t mapped = (length + kPage - 1) & ~(kPage - 1);
    struct stat st;
    int result = 0;
    uint32_t id = 0;
    while (id < s.mems.size() && s.mems[id].base) ++id;
    if (fd < 0 || s.client_slots != 0) {
        result = -EINVAL;
    } else if (length == 0 || length > (uint64_t{1} << 46)) {
        result = -EINVAL;
    } else if (id >= ipc::kMaxMemRegistrations) {
        result = -ENOMEM;  // the family's registrations: a clear error, as ibv_reg_mr's
    } else if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
               static_cast<uint64_t>(st.st_size) < mapped) {
        result = -EINVAL;
    } else if (!(fcntl(fd, F_GET_SEALS) & F_SEAL_SHRINK)) {
        // Only a memfd sealed against shrinking: a file that shrinks under our mapping would
        // make the kernel fault in our sends (EFAULT, harmless), but say so plainly instead.
        result = -EINVAL;
    } else if ((result = quotas().charge(uid, 0, mapped)) == 0) {
        void *base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
            result = -errno;
            quotas().release(uid, 0, mapped);
        } else {
            if (id == s.mems.size()) s.mems.emplace_back();
            MemRegistration &mem = s.mems[id];
            mem.base = static_cast<uint8_t *>(base);
            mem.length = mapped;
            mem.keep = own_mapping(mem.base, mapped, uid);
            reply.arg = static_cast<int32_t>(id);
            // The family's other shards serve sockets that may use it: before the reply, so a
            // descriptor queued after it finds it there (take_direct).
            share_mem(s, id);
        }
    }
    if (fd >= 0) close(fd);
    reply.result = result;
    reply_control(s, member, reply);
}

void Worker::deregister_mem(Session &s, uint32_t member, int32_t id) {
    ipc::ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ipc::ControlType::kDeregisterMemReply);
    reply.version = ipc::kLayoutVersion;
    if (id < 0 || static_cast<uint32_t>(id) >= s.mems.size() || !s.mems[id].base) {
        reply.result = -EINVAL;
    } else {
        // A send or receive in progress (another thread's) keeps it mapped until it ends.
        release_mem(s.mems[id]);
        share_mem(s, static_cast<uint32_t>(id));
    }
    reply_control(s, member, reply);
}

void Worker::take_direct(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    ipc::SocketSlot &slot = s.region.slot(i);
    while (es.direct == EngineSlot::Direct::kNone && es.direct_head != es.direct_tail &&
           es.state == ipc::SlotState::kOpen) {
        // One copy out of the region: the client may rewrite it under us.
        ipc::DirectDescriptor d;
        std::memcpy(&d, &slot.direct_queue[es.direct_head & (ipc::kDirectQueueEntries - 1)],
                    sizeof(d));
        ++es.direct_head;
        const bool send = d.op == static_cast<uint32_t>(ipc::DirectOp::kSend);
        const bool recv = d.op == static_cast<uint32_t>(ipc::DirectOp::kRecv);
        int32_t error = 0;
        if ((!send && !recv) || d.len == 0 || d.len > ipc::kDirectMaxLen ||
            (d.flags & ~static_cast<uint32_t>(MSG_DONTWAIT)) != 0 || !knows_mem(s, d.mem)) {
            error = -EINVAL;
        } else if (d.offset > s.mems[d.mem].length || d.len > s.mems[d.mem].length - d.offset) {
            error = -EFAULT;
        } else if (send && d.tx_at - es.tx_sent > es.tx_tail - es.tx_sent) {
            error = -EINVAL;  // not a position among the bytes queued and not yet sent
        }
        es.direct_mem = d.mem;
        // A socket the engine reads in a special way (urgent data watched, first bytes peeked,
        // at EOF or reset) reads the ring as recv() does.
        const bool special = es.urgent_watch || es.peeking ||
                             (es.flags & (ipc::kFlagRxEof | ipc::kFlagReset)) ||
                             !(es.flags & ipc::kFlagConnected) || es.handed_off;
        if (error == 0 && recv && !special && (d.hints & ipc::kDirectHintAhead) &&
            d.len >= ipc::kDirectModeMinLen)
            enter_direct_mode(s, i);
        // Bytes already in the ring come first: promised to this receive (those not promised
        // to one before it), and it goes straight to the kernel socket only if there are none.
        if (error == 0 && recv) {
            error = promise_ring_bytes(s, i, d.len);
            if (error == 0 && special) error = ipc::kDirectUseRxRing;
        }
        if (error != 0) {
            es.direct_mem = UINT32_MAX;  // nothing to let go
            publish_direct_result(s, i, error);
            continue;
        }
        MemRegistration &mem = s.mems[d.mem];
        es.direct = send ? EngineSlot::Direct::kSend : EngineSlot::Direct::kRecv;
        es.direct_tx_at = d.tx_at;
        es.direct_len = d.len;
        es.direct_done = 0;
        es.direct_dontwait = (d.flags & MSG_DONTWAIT) != 0;
        es.direct_base = mem.base + d.offset;
        es.direct_keep = mem.keep;
        if (send) {
            post_send(s, i);
        } else if (es.recv_posted) {
            cancel(s, i, Kind::kRecv);  // on_recv goes on with the direct receive
        } else {
            post_direct(s, i);
        }
    }
}

void Worker::publish_direct_result(Session &s, uint32_t i, int32_t result) {
    ipc::SocketSlot &slot = s.region.slot(i);
    const uint32_t done = slot.direct_done.load(std::memory_order_relaxed);
    // Release: a client that reads this result (acquire) also sees the ticket answered by a
    // reuse of the entry that came before it (preload/memnet_shim.cpp).
    __atomic_store_n(&slot.direct_results[done & (ipc::kDirectQueueEntries - 1)], result,
                     __ATOMIC_RELEASE);
    slot.direct_done.store(done + 1, std::memory_order_release);
    bump_event(s, i);
}

int32_t Worker::promise_ring_bytes(Session &s, uint32_t i, uint32_t len) {
    EngineSlot &es = s.slots[i];
    // From the client's head (what it has read is no one's), or past the last promise.
    const uint32_t head = s.region.slot(i).rx_head.load(std::memory_order_acquire);
    uint32_t from = rx_head_valid(head, es.rx_tail, es.rx_ring) ? head : es.rx_head;
    if (static_cast<int32_t>(es.ring_promised - from) > 0) from = es.ring_promised;
    if (static_cast<int32_t>(es.rx_tail - from) <= 0) return 0;
    const uint32_t n = std::min(len, es.rx_tail - from);
    es.ring_promised = from + n;
    return ipc::kDirectUseRxRing + static_cast<int32_t>(n);
}

void Worker::post_direct(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.direct == EngineSlot::Direct::kNone || es.direct_posted ||
        es.state != ipc::SlotState::kOpen)
        return;
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    const uint32_t len = es.direct_len - es.direct_done;  // at most ipc::kDirectMaxLen
    uint8_t *at = es.direct_base + es.direct_done;
    const int flags = es.direct_dontwait ? MSG_DONTWAIT : 0;
    // Large direct sends go out of the registered pages themselves (SEND_ZC), as --send-zc says.
    es.direct_zc = es.direct == EngineSlot::Direct::kSend && zero_copy_allowed(es, len);
    if (es.direct_zc)
        io_uring_prep_send_zc(sqe, es.fd, at, len, flags | MSG_NOSIGNAL, kReportZeroCopyUsage);
    else if (es.direct == EngineSlot::Direct::kSend)
        io_uring_prep_send(sqe, es.fd, at, len, flags | MSG_NOSIGNAL);
    else
        io_uring_prep_recv(sqe, es.fd, at, len, flags);
    track_op(s, i, sqe, Kind::kDirect);
    es.direct_posted = true;
}

void Worker::on_direct(Session &s, uint32_t i, int32_t res, uint32_t cqe_flags) {
    EngineSlot &es = s.slots[i];
    if (es.direct_zc) {
        // SEND_ZC: the result (with IORING_CQE_F_MORE: a notification follows), then the
        // notification that the pages are the application's again, which ends the transfer.
        if (!(cqe_flags & IORING_CQE_F_NOTIF) && (cqe_flags & IORING_CQE_F_MORE)) {
            es.direct_zc_result = res;
            return;
        }
        es.direct_zc = false;
        if (cqe_flags & IORING_CQE_F_NOTIF) {
            const bool copied = static_cast<uint32_t>(res) & kZeroCopyCopied;
            res = es.direct_zc_result;
            if (copied) es.zc_copies = true;
            if (res > 0)
                (copied ? stats_.zerocopy_copied : stats_.zerocopy_out)
                    .fetch_add(res, std::memory_order_relaxed);
        } else if (res == -EINVAL) {
            // A kernel without IORING_SEND_ZC_REPORT_USAGE (before 6.2): copy from now on.
            log_line("worker %d: SEND_ZC refused (%s): large sends are copied", config_.index,
                     std::strerror(EINVAL));
            send_zc_ = false;
            es.direct_posted = false;
            return schedule(s, i);  // sent again, copied, on the next tick
        }
    }
    es.direct_posted = false;
    if (es.direct == EngineSlot::Direct::kNone) return;
    if (es.state != ipc::SlotState::kOpen) {
        finish_direct(s, i, -EBADF);  // closed: nobody waits for it
        return maybe_finish_close(s, i);
    }
    const bool send = es.direct == EngineSlot::Direct::kSend;
    if (res == -EINTR || res == -ENOBUFS || res == -ENOMEM ||
        (res == -EAGAIN && !es.direct_dontwait))
        return schedule(s, i);  // transient: again on the next tick
    if (res < 0) {
        finish_direct(s, i, es.direct_done > 0 ? static_cast<int32_t>(es.direct_done) : res);
        return send ? post_send(s, i) : post_recv(s, i);
    }
    if (send) {
        es.direct_done += static_cast<uint32_t>(res);
        stats_.bytes_out.fetch_add(res, std::memory_order_relaxed);
        stats_.direct_out.fetch_add(res, std::memory_order_relaxed);
        es.close_progress_ns = now_ns_;
        // All of it, as the paper's send_direct; with MSG_DONTWAIT what the kernel took.
        if (es.direct_done < es.direct_len && !es.direct_dontwait && res > 0)
            return post_direct(s, i);
        finish_direct(s, i, static_cast<int32_t>(es.direct_done));
        return post_send(s, i);  // the ring's bytes queued behind it
    }
    if (res > 0) {
        stats_.bytes_in.fetch_add(res, std::memory_order_relaxed);
        stats_.direct_in.fetch_add(res, std::memory_order_relaxed);
    }
    // Whether bytes still wait in the kernel socket, for poll() while in direct mode: the
    // receive's completion says (the socket's queue after it).
    if (es.rx_direct && res > 0) {
        std::atomic<uint32_t> &mask = s.region.slot(i).kernel_mask;
        const uint32_t before = mask.load(std::memory_order_relaxed);
        mask.store((cqe_flags & IORING_CQE_F_SOCK_NONEMPTY) ? before | POLLIN : before & ~POLLIN,
                   std::memory_order_relaxed);
    }
    finish_direct(s, i, res);
    if (res == 0) return record_fin(s, i);  // as after the ring's own receive
    post_recv(s, i);
}

void Worker::release_direct(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    es.direct = EngineSlot::Direct::kNone;
    es.direct_base = nullptr;
    es.direct_keep.reset();
    es.direct_mem = UINT32_MAX;
}

void Worker::finish_direct(Session &s, uint32_t i, int32_t result) {
    release_direct(s, i);
    if (s.slots[i].state != ipc::SlotState::kOpen) return;
    publish_direct_result(s, i, result);
    take_direct(s, i);
}

void Worker::enter_direct_mode(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (es.rx_direct) return;
    es.rx_direct = true;
    publish_flags(s, i, es.flags | ipc::kFlagRxDirect);
    update_kernel_mask(s, i);
    // A ring receive in flight would take the next bytes: taken back (on_recv then posts the
    // direct receive, or the poll).
    if (es.recv_posted && !es.peek_posted && !es.recv_polling) cancel(s, i, Kind::kRecv);
}

void Worker::leave_direct_mode(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.rx_direct) return;
    es.rx_direct = false;
    publish_flags(s, i, es.flags & ~ipc::kFlagRxDirect);
    bump_event(s, i);
    if (es.direct_wait_posted) cancel(s, i, Kind::kDirectWait);  // on_direct_wait: the ring
    post_recv(s, i);
}

void Worker::post_direct_wait(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    const uint32_t known = s.region.slot(i).kernel_mask.load(std::memory_order_relaxed);
    if (known & (POLLERR | POLLHUP)) return;  // nothing more to learn from the kernel socket
    if (known & POLLRDHUP) {
        // The FIN waits behind the bytes: io_uring's polls always include POLLRDHUP, so from
        // now on only the multishot watch can tell an RST.
        if (es.direct_wait_posted) cancel(s, i, Kind::kDirectWait);
        return post_watch(s, i);
    }
    // While bytes wait (POLLIN known), only the FIN or an RST is news.
    const uint32_t events = (known & POLLIN) ? POLLRDHUP : POLLIN | POLLRDHUP;
    if (es.direct_wait_posted) {
        // One that waits for less than we need now is taken back and posted again.
        if (es.direct_wait_events != events && !(events & ~es.direct_wait_events)) return;
        if (es.direct_wait_events != events) cancel(s, i, Kind::kDirectWait);
        return;
    }
    io_uring_sqe *sqe = get_sqe();
    if (!sqe) return schedule(s, i);
    io_uring_prep_poll_add(sqe, es.fd, events);
    track_op(s, i, sqe, Kind::kDirectWait);
    es.direct_wait_posted = true;
    es.direct_wait_events = events;
}

void Worker::on_direct_wait(Session &s, uint32_t i, int32_t res) {
    EngineSlot &es = s.slots[i];
    es.direct_wait_posted = false;
    if (es.state != ipc::SlotState::kOpen) return maybe_finish_close(s, i);
    if (res == -ECANCELED) return post_recv(s, i);  // the ring again, or a poll for more
    if (res < 0) return schedule(s, i);             // again on the next tick
    if (res & (POLLERR | POLLHUP)) {
        int error = 0;
        socklen_t len = sizeof(error);
        if (getsockopt(es.fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
        if (error != 0) return record_error(s, i, error);
    }
    const uint32_t before = s.region.slot(i).kernel_mask.load(std::memory_order_relaxed);
    update_kernel_mask(s, i);
    if (s.region.slot(i).kernel_mask.load(std::memory_order_relaxed) != before) bump_event(s, i);
    post_recv(s, i);
}

int Worker::op_leave_direct(Session &s, uint32_t i) {
    EngineSlot &es = s.slots[i];
    if (!es.rx_direct) return 0;
    // What the kernel socket holds now goes into the ring before the answer, so the recv()
    // that asked finds it there; a receive in flight (the ring's, being taken back, or a
    // direct one) brings it instead. Then the ring is filled as usual.
    const uint32_t offset = es.rx_tail & (es.rx_ring - 1);
    const uint32_t len = std::min(es.rx_room(), es.rx_ring - offset);
    if (!es.recv_posted && es.direct == EngineSlot::Direct::kNone && len > 0 &&
        !(es.flags & (ipc::kFlagRxEof | ipc::kFlagReset))) {
        const ssize_t n = recv(es.fd, s.region.rx_ring(i, es.rx_ring) + offset, len, MSG_DONTWAIT);
        if (n > 0) {
            es.rx_tail += static_cast<uint32_t>(n);
            s.region.slot(i).rx_tail.store(es.rx_tail, std::memory_order_release);
            stats_.bytes_in.fetch_add(n, std::memory_order_relaxed);
            bump_event(s, i);
        } else if (n == 0) {
            record_fin(s, i);
        }
    }
    leave_direct_mode(s, i);
    return 0;
}

}  // namespace tcps::engine
