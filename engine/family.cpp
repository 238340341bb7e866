// A family served by several workers (Family, session.hpp): the messages between its shards.
// Each worker applies them on its own thread, from its inbox (Worker::adopt_pending), so a
// shard's state is only ever touched by the worker that serves it.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "fence.hpp"
#include "log.hpp"
#include "quota.hpp"
#include "worker.hpp"

namespace tcps::engine {

ShardMessage Worker::message_for(Session &s, ShardMessage::Type type) {
    ShardMessage message;
    message.type = type;
    message.session_id = s.id;
    message.from = this;
    message.from_shard = s.shard;
    return message;
}

ShardMessage Worker::answer_for(const ShardMessage &message, ShardMessage::Type type) {
    ShardMessage answer;
    answer.type = type;
    answer.session_id = message.session_id;
    answer.from = this;
    return answer;
}

uint32_t Worker::next_shard(Session &s, bool adopted) {
    const std::vector<Worker *> &workers = s.family->workers;
    return next_worker(
        s.next_shard, static_cast<uint32_t>(workers.size()),
        [&](uint32_t k) { return workers[k]->active(); },
        [&](uint32_t k) { return adopted ? !workers[k]->has_room() : workers[k]->saturated(); });
}

void Worker::tell_shards(Session &s, const ShardMessage &message) {
    for (size_t k = 1; k < s.family->workers.size(); ++k) {
        ShardMessage copy = message;
        s.family->workers[k]->post(std::move(copy));
    }
}

void Worker::tell_home(Session &s, ShardMessage &&message) {
    s.family->workers[0]->post(std::move(message));
}

void Worker::share_waiter(Session &s, uint32_t w) {
    if (!s.family || s.is_shard()) return;
    // Each shard gets its own descriptor of the pipe, so that none writes to a number the home
    // closed and reused. A shard that installs one wakes the waiter if it is armed, so a change
    // it made before it knew the waiter is not lost, only seen a little later.
    for (size_t k = 1; k < s.family->workers.size(); ++k) {
        ShardMessage message = message_for(s, ShardMessage::Type::kWaiter);
        message.slot = w;
        message.fd = s.waiter_fds[w] >= 0 ? fcntl(s.waiter_fds[w], F_DUPFD_CLOEXEC, 0) : -1;
        s.family->workers[k]->post(std::move(message));
    }
}

void Worker::share_mem(Session &s, uint32_t id) {
    if (!s.family || s.is_shard()) return;
    ShardMessage message = message_for(s, ShardMessage::Type::kMem);
    message.slot = id;
    message.mem = s.mems[id];
    tell_shards(s, message);
}

bool Worker::knows_mem(Session &s, uint32_t id) {
    auto known = [&] { return id < s.mems.size() && s.mems[id].base != nullptr; };
    if (known() || !s.is_shard()) return known();
    apply_mem_messages();
    return known();
}

void Worker::apply_mem_messages() {
    std::vector<ShardMessage> messages;
    {
        std::lock_guard<std::mutex> lock(pending_mutex_);
        messages.swap(messages_);
    }
    std::vector<ShardMessage> rest;
    for (ShardMessage &message : messages) {
        if (message.type == ShardMessage::Type::kMem) {
            handle_message(message);
        } else {
            rest.push_back(std::move(message));
        }
    }
    if (rest.empty()) return;
    std::lock_guard<std::mutex> lock(pending_mutex_);
    // Those that came meanwhile go after these: the order between two workers is kept.
    for (ShardMessage &message : messages_) rest.push_back(std::move(message));
    messages_.swap(rest);
    has_pending_.store(true, std::memory_order_relaxed);
}

void Worker::note_member_identity(Session &s, uint32_t member, bool live) {
    if (!s.family || s.is_shard()) return;
    std::lock_guard<std::mutex> lock(s.family->members_mutex);
    s.family->member_live[member] = live && s.members[member].control_fd >= 0;
    if (live)
        s.family->members[member] = {s.members[member].creds.pid, s.members[member].creds.uid,
                                     s.members[member].control_fd};
}

void Worker::handle_message(ShardMessage &message) {
    Session *s = find_session(message.session_id);
    const bool live = s && !s->ending;
    using Type = ShardMessage::Type;
    switch (message.type) {
        case Type::kAccepted:
            return place_accepted(live ? s : nullptr, message);
        case Type::kPlaced:
            return on_placed(live ? s : nullptr, message);
        case Type::kDrop: {
            const uint32_t j = message.slot;
            const bool ours = live && s->region.mapped(j) &&
                              s->slots[j].state == ipc::SlotState::kOpen &&
                              s->slots[j].accepted_by == message.accepted.listener &&
                              s->slots[j].accepted_by_gen == message.accepted.listener_gen;
            if (message.result == static_cast<int32_t>(Untaken::kPark)) {
                // Its listener was passed on: parked for the next owner. The home waits for
                // each answer before it answers the hand-back.
                ShardMessage answer = answer_for(message, Type::kParked);
                answer.slot = j;
                answer.accepted = message.accepted;
                // 2: not a connection of that listener (the entry was the client's lie).
                answer.result = !ours ? 2 : park_connection(*s, j, message.seq) ? 1 : 0;
                message.from->post(std::move(answer));
                break;
            }
            if (ours) {
                if (message.result != 0)
                    start_close(*s, j, true);
                else
                    reset_in_place(*s, j);
            }
            // After the RST (and any kPeerReset it sent): the listener's close waits for this.
            if (message.accepted.listener != kNoSlot) {
                ShardMessage answer = answer_for(message, Type::kDropped);
                answer.accepted = message.accepted;
                message.from->post(std::move(answer));
            }
            break;
        }
        case Type::kParked: {
            if (!live) break;
            const uint32_t i = message.accepted.listener;
            if (!s->region.mapped(i)) break;
            EngineSlot &listener = s->slots[i];
            if (listener.gen != message.accepted.listener_gen || listener.parks_pending == 0) break;
            --listener.parks_pending;
            if (message.result == 0) ++listener.untaken_lost;
            maybe_finish_handoff(*s, i);
            break;
        }
        case Type::kMemberEnded: {
            if (live && message.member < ipc::kMaxMembers) release_holds(*s, message.member);
            ShardMessage answer = answer_for(message, Type::kMemberReleased);
            answer.member = message.member;
            message.from->post(std::move(answer));
            break;
        }
        case Type::kMemberReleased:
            if (s && message.member < ipc::kMaxMembers && s->member_acks[message.member] > 0)
                --s->member_acks[message.member];
            break;
        case Type::kOrphaned:
            if (live) orphan(*s, "its family has no member left");
            break;
        case Type::kEnd:
            if (live) end_session(*s, "its family ended");
            break;
        case Type::kWaiter: {
            const uint32_t w = message.slot;
            if (!s || w >= ipc::kMaxWaiters) break;
            close_waiter(*s, w);
            if (message.fd < 0 || s->ending) break;
            s->waiter_fds[w] = message.fd;
            message.fd = -1;
            s->waiter_scan_limit = std::max(s->waiter_scan_limit, w + 1);
            // Armed before we knew it: woken now, it looks again.
            ipc::full_fence();
            signal_waiter(*s, w);
            break;
        }
        case Type::kMem:
            if (!s || message.slot >= ipc::kMaxMemRegistrations) break;
            if (message.slot >= s->mems.size()) s->mems.resize(message.slot + 1);
            s->mems[message.slot] = message.mem;
            break;
        case Type::kHandoff:
            if (live && message.member < ipc::kMaxMembers)
                start_handoff(*s, message.member, static_cast<int32_t>(message.slot), message.seq);
            break;
        case Type::kAdopt:
            place_adopted(live && message.member < ipc::kMaxMembers ? s : nullptr, message);
            break;
        case Type::kAdopted:
            if (live && message.member < ipc::kMaxMembers)
                answer_adopt(*s, message.member, message.reply);
            break;
        case Type::kPeerReset: {
            peer_reset_here(message.key, message.peer_key);
            ShardMessage answer = answer_for(message, Type::kPeerResetSeen);
            answer.slot = message.slot;
            answer.seq = message.seq;
            message.from->post(std::move(answer));
            break;
        }
        case Type::kPeerResetSeen:
            on_peer_reset_answer(s, message);
            break;
        case Type::kDropped: {
            const uint32_t li = message.accepted.listener;
            if (!s || !s->region.mapped(li)) break;
            EngineSlot &listener = s->slots[li];
            if (listener.gen != message.accepted.listener_gen || listener.drops_pending == 0) break;
            if (--listener.drops_pending > 0) break;
            if (std::exchange(listener.shutdown_answer_pending, false))
                respond(*s, li, listener.shutdown_answer_seq, 0);
            maybe_finish_close(*s, li);
            break;
        }
        case Type::kHandoffDone:
            if (live && message.member < ipc::kMaxMembers) {
                deliver_handoff(*s, message.member, message.reply, message.fd);
                message.fd = -1;
            }
            break;
    }
    if (message.fd >= 0) close(message.fd);
}

void Worker::place_accepted(Session *s, ShardMessage &message) {
    ShardMessage answer;
    answer.type = ShardMessage::Type::kPlaced;
    answer.session_id = message.session_id;
    answer.from = this;
    answer.seq = message.seq;
    answer.accepted = message.accepted;
    answer.result = -ENOENT;
    if (s && !s->orphaned) {
        answer.from_shard = s->shard;
        const uint32_t j = take_free_slot(*s);
        if (j != kNoSlot) {
            setup_accepted(*s, j, message.fd, message.accepted);
            message.fd = -1;
            answer.slot = j;
            answer.result = 0;
        }
    }
    // Not placed: the connection goes back, and the home serves it in the slot it kept.
    answer.fd = message.fd;
    message.fd = -1;
    message.from->post(std::move(answer));
}

void Worker::on_placed(Session *s, ShardMessage &message) {
    auto pending = s ? std::find_if(s->pending_accepts.begin(), s->pending_accepts.end(),
                                    [&](const PendingAccept &p) { return p.seq == message.seq; })
                     : std::deque<PendingAccept>::iterator{};
    if (!s || pending == s->pending_accepts.end()) {
        // The family ended meanwhile: the shard's copy ends with its shard; one that came back
        // is closed here and its share given back.
        if (message.fd >= 0) {
            close(message.fd);
            message.fd = -1;
            quotas().release(message.accepted.quota_uid, 1, kSocketBytes);
        }
        return;
    }
    if (message.result == 0) {
        pending->slot = message.slot;
        pending->shard = message.from_shard;
        s->free_engine_slots.push_back(pending->fallback);
    } else {
        setup_accepted(*s, pending->fallback, message.fd, pending->from);
        message.fd = -1;
        pending->slot = pending->fallback;
        pending->shard = 0;
    }
    pending->fallback = kNoSlot;
    pending->placed = true;
    publish_accepts(*s);
}

}  // namespace tcps::engine
