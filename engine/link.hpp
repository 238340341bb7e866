// The cross-host link between tcps-relay (the client's host) and tcpsd --fabric-listen (the
// engine's host): one TCP connection per session for setup and liveness, and the session's
// region mirrored over the fabric (ipc/fabric.hpp), in which each side publishes the fields it
// owns with the tags below.
//
// Setup: the relay connects to the engine's --fabric-listen address and sends a LinkHello
// (the client's credentials and the fabric bootstrap of its copy of the region); the engine
// creates a session with a copy of its own, serves it with its normal worker code, and answers
// with a LinkReply (its bootstrap). Then nothing more travels on the TCP connection: its EOF,
// in either direction, ends the session (the relay's death, the engine's death, the end of the
// session). Both sides run the same build; the structs travel in host byte order.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "fabric.hpp"
#include "layout.hpp"

namespace tcps::engine {

inline constexpr uint32_t kLinkMagic = 0x4b4e4c54;  // "TLNK" in little-endian memory
inline constexpr uint32_t kLinkVersion = 1;

struct LinkHello {
    uint32_t magic;
    uint32_t version;
    uint32_t layout_version;  // ipc::kLayoutVersion
    uint32_t reserved0;
    uint64_t region_bytes;  // ipc::kRemoteRegionBytes
    // The client process as the relay saw it (SO_PEERCRED and /proc on the relay's host).
    int32_t pid;
    uint32_t uid;
    uint32_t gid;
    uint32_t reserved1;
    uint64_t caps;
    ipc::FabricBootstrap fabric;  // the relay's copy of the region
};
static_assert(sizeof(LinkHello) == 48 + sizeof(ipc::FabricBootstrap), "link hello wire size");

struct LinkReply {
    uint32_t magic;
    uint32_t version;
    int32_t result;  // 0 or -errno (then `fabric` is meaningless and the engine closes)
    uint32_t session_id;
    ipc::FabricBootstrap fabric;  // the engine's copy of the region
};
static_assert(sizeof(LinkReply) == 16 + sizeof(ipc::FabricBootstrap), "link reply wire size");

// Notification tags. Relay -> engine: kTagSlot (the client rang the doorbell of that slot,
// or freed ring space the engine waits for) and kTagMemberGone. Engine -> relay: kTagSlot (the
// engine changed that slot: wake its waiters), kTagSlotInit (the engine reset the slot's
// client-side indices for a new socket), kTagSessionEnd.
// A relay session has one chunk (ipc::kRemoteRegionBytes): its slots are [0, kRemoteSlots).
inline constexpr uint32_t kRemoteSlots = ipc::kChunkSlots;
inline constexpr uint32_t kTagSlotInit = kRemoteSlots;  // + slot
inline constexpr uint32_t kTagSessionEnd = 2 * kRemoteSlots;
// The client process is gone: the relay has published its last indices, its holds (its
// bitmap in chunk 0) and then this; the engine drops its holds as for a dead member.
inline constexpr uint32_t kTagMemberGone = 2 * kRemoteSlots + 1;
inline constexpr uint32_t kLinkMaxTag = 2 * kRemoteSlots + 2;

// --- where things are in the region (offsets from its start) ---
using ipc::slot_offset;
constexpr size_t slot_field(uint32_t slot, size_t field_offset) {
    return slot_offset(slot) + field_offset;
}
constexpr size_t member_held_offset(uint32_t member) {
    return ipc::held_offset(member, 0);
}
inline constexpr size_t kEngineAliveOffset = offsetof(ipc::RegionHeader, engine_alive);

// The client-written words the relay passes on, as one record from the start of the slot:
// tx_tail, rx_head, req_seq, acc_head, posted, doorbell_queued (sent as 0), claim (sent as 0: the
// engine's copy never holds a claim it could hand back), holders. The locks stay on the
// client's host: nothing on the engine's reads them.
inline constexpr size_t kClientIndicesBytes = offsetof(ipc::SocketSlot, holders) + 4;
static_assert(offsetof(ipc::SocketSlot, tx_tail) == 0 && offsetof(ipc::SocketSlot, rx_head) == 4 &&
                  offsetof(ipc::SocketSlot, req_seq) == 8 &&
                  offsetof(ipc::SocketSlot, acc_head) == 12 &&
                  offsetof(ipc::SocketSlot, posted) == 16 &&
                  offsetof(ipc::SocketSlot, doorbell_queued) == 20 &&
                  offsetof(ipc::SocketSlot, claim) == 24 &&
                  offsetof(ipc::SocketSlot, holders) == 28,
              "the relay's record of client indices follows the slot's line 0");
static_assert(ipc::kHeldBytesPerMember <= ipc::kFabricSnapshotBytes,
              "a member's holds travel as one snapshot");
static_assert(sizeof(ipc::Response) <= ipc::kFabricSnapshotBytes &&
                  sizeof(ipc::Request) <= ipc::kFabricSnapshotBytes &&
                  sizeof(ipc::SocketSlot::accept_ring) <= ipc::kFabricSnapshotBytes,
              "requests, responses and accept rings travel as snapshots, applied word by word");

// Parses "HOST:PORT", "[V6]:PORT" (numeric addresses only) into `out`. False if malformed.
bool parse_link_address(const std::string &text, sockaddr_storage &out, socklen_t &len);
// The numeric host part of an address, as FabricConfig::node wants it.
std::string numeric_host(const sockaddr_storage &addr, socklen_t len);

// Keepalive and a user timeout on a link socket, so that a peer host that vanishes is noticed
// within seconds, not after TCP's retransmission timeout.
void tune_link_socket(int fd);

}  // namespace tcps::engine
