// The cross-host channel: a region mirrored between two machines over libfabric.
//
// On one host the client and the engine share one region (layout.hpp). Across hosts each side
// keeps a full copy of the region, with the same offsets. Every field has exactly one writer, so
// mirroring is one-directional per range: after a side writes a range it owns, it publishes it,
// and the transport puts those bytes into the peer's copy at the same offset. A publish may
// carry a notification tag (for tcps, a slot index); the peer's progress() reports it once the
// bytes of that publish and of every publish before it are in its copy.
//
// libfabric objects: one RDM endpoint per process side (an engine worker, a client process),
// one memory region (fi_mr_reg, FI_REMOTE_WRITE) per mirrored region, one peer address per
// remote side. A socket is no libfabric object: it is a slot (the notification tag) and the
// offsets of its slot and rings inside the region.
//
// Two ways in, by size:
//  * Up to kFabricSnapshotBytes (indices, flags, requests, responses): the bytes are copied at
//    publish() time and sent as a message (fi_sendmsg) that names the range. The receiver
//    checks the range against the region and applies it inside progress(), whole, with aligned
//    32-bit words stored one at a time (release): a reader never sees an index half-written.
//    This matters because these fields are rewritten while earlier copies are in flight, and
//    an RMA write lands piecemeal (the tcp provider recv()s straight into the target memory,
//    so a segment boundary can split a 4-byte index: seen in testing, under ASan).
//  * Longer ranges (ring bytes): an RMA write (fi_writemsg) from the region in place to the
//    peer's copy, checked against the MR by the provider, then, if a tag is given, an empty
//    message carrying the tag. The bytes must stay unchanged until the peer has consumed
//    them, which ring bytes do: a producer reuses ring space only after the consumer has read
//    it and published its head; and nobody reads them before the later index says they are
//    there.
//
// Ordering relied upon (checked at open): FI_ORDER_SAW, FI_ORDER_SAS, FI_ORDER_WAW and
// FI_ORDER_WAS in tx and rx msg_order: the writes and messages of one endpoint to one peer are
// processed in the order they were posted. A message's receive completion comes after its
// data, so when progress() applies a message, every earlier write and message of that peer is
// in place. Nothing relies on data placement order inside one write (max_order_waw_size).
//
// Completion: operations are posted with FI_DELIVERY_COMPLETE where the provider offers it
// (tcp;ofi_rxm does). Their completion then means the peer has the bytes, and a write the peer
// refused (outside its region) or a connection lost under it completes with an error instead
// of vanishing; the region is then failed for good (kFabricRegionFailed), since its copy on
// the peer is no longer exact. publish() never blocks: what the provider cannot take now
// (-FI_EAGAIN, as rxm answers while it connects) is queued and posted by progress(), in order
// within its region; each region has its queue, so a peer that takes nothing holds up only its
// own regions.
//
// Trust: the peer is untrusted. Its RMA writes can land only in the memory registered for it
// (the provider checks the MR bounds and the key, which is random unless the provider picks
// it). Its messages are checked here: the region's random token (so one peer cannot write into
// another peer's region), the range against the region, the tag against max_tag; anything else
// is dropped and counted. What it writes is input to be validated like any client-written
// field. The tcp provider itself authenticates nothing: run it on a trusted network only.
//
// Sleeping: tcp;ofi_rxm offers FI_WAIT_FD on the completion queue, and an idle side sleeps in
// poll() on it (wait()). While rxm sets up a connection (the first publish to a new peer, tens
// of milliseconds on loopback), fi_trywait keeps answering "progress first", so wait()
// returns at once and the caller spins for that long, once per peer.
//
// Threading: one thread at a time per endpoint (FI_THREAD_DOMAIN). Other threads (or processes
// sharing the memory) may read a region while progress() updates it: aligned 32-bit words are
// stored atomically with release order. Nothing here blocks except wait() and
// exchange_bootstrap(), which are bounded by their timeouts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

struct fid_fabric;
struct fid_domain;
struct fid_ep;
struct fid_av;
struct fid_cq;
struct fid_mr;
struct fi_info;

namespace tcps::ipc {

// Environment variables read by FabricConfig::from_env().
inline constexpr const char *kFabricProviderEnv = "TCPS_FABRIC_PROVIDER";
inline constexpr const char *kFabricNodeEnv = "TCPS_FABRIC_NODE";
inline constexpr const char *kFabricServiceEnv = "TCPS_FABRIC_SERVICE";

struct FabricConfig {
    // libfabric provider, as fi_info -p spells it: "verbs;ofi_rxm" in production,
    // "tcp;ofi_rxm" where there is no RDMA hardware.
    std::string provider = "tcp;ofi_rxm";
    // Local address and port to open the endpoint on (FI_SOURCE); empty = provider's choice.
    std::string node;
    std::string service;
    // Notification tags must be below this. For tcps, the number of slots.
    uint32_t max_tag = 4096;
    // Open the completion queue with FI_WAIT_FD so an idle side can sleep in poll().
    bool want_wait_fd = true;

    // The defaults, overridden by TCPS_FABRIC_PROVIDER, TCPS_FABRIC_NODE, TCPS_FABRIC_SERVICE.
    static FabricConfig from_env();
};

inline constexpr uint32_t kNoNotify = 0xffffffffu;
// The tag progress() reports when one of this side's publishes to a region failed: the mirror
// is no longer exact and the region's session must end.
inline constexpr uint32_t kFabricRegionFailed = 0xfffffffeu;

// Publishes of at most this many bytes are copied at publish() time and applied whole by the
// peer (see the top of this file); longer ones are RMA-written in place.
inline constexpr size_t kFabricSnapshotBytes = 512;
// Publishes in flight or queued at once; publish() answers -EAGAIN beyond this.
inline constexpr uint32_t kFabricMaxOutstanding = 1024;
// Receive buffers kept posted for the peers' messages.
inline constexpr uint32_t kFabricReceiveBuffers = 256;
inline constexpr uint32_t kFabricMaxRegions = 4096;

inline constexpr uint32_t kFabricAddressMax = 64;  // fi_getname bytes; sockaddr_in6 is 28

// What one side tells the other about itself and one of its regions, over the bootstrap
// socket. Fixed size, host byte order (both sides run the same build).
struct FabricBootstrap {
    uint32_t magic;
    uint32_t version;
    uint32_t address_len;
    uint32_t region;  // the sender's region index, for messages to it
    uint8_t address[kFabricAddressMax];
    uint64_t region_base;  // remote address of offset 0 (the virtual address, or 0)
    uint64_t region_len;
    uint64_t key;    // the MR key for RMA writes into the region
    uint64_t token;  // proves in every message that it comes from this region's peer
};
static_assert(sizeof(FabricBootstrap) == 16 + kFabricAddressMax + 32, "bootstrap wire size");

inline constexpr uint32_t kFabricBootstrapMagic = 0x46435054;  // "TPCF"
inline constexpr uint32_t kFabricBootstrapVersion = 2;

struct FabricNotification {
    uint32_t region;  // the local region the peer published into
    uint32_t tag;
};

class FabricEndpoint {
  public:
    // Opens the fabric, domain, address vector, completion queue and the RDM endpoint, and
    // posts the receive buffers. Returns 0 or -errno (-ENODATA: no provider matches the config
    // with the ordering needed).
    static int open(const FabricConfig &config, std::unique_ptr<FabricEndpoint> &out);
    ~FabricEndpoint();
    FabricEndpoint(const FabricEndpoint &) = delete;
    FabricEndpoint &operator=(const FabricEndpoint &) = delete;

    // This endpoint's address (fi_getname), for the peer's insert_peer().
    std::span<const uint8_t> local_address() const;
    // Adds a peer to the address vector. Returns 0 and its handle in `peer`, or -errno.
    int insert_peer(std::span<const uint8_t> address, uint64_t &peer);

    // Registers [base, base + len) for remote writes by the peer (FI_REMOTE_WRITE; FI_WRITE
    // too, as it is also the source of this side's publishes). Returns 0 and the region's index,
    // or -errno. The memory must stay mapped until the endpoint is destroyed.
    int register_region(void *base, size_t len, uint32_t &region);
    // What the peer needs to publish into `region` (address, key, base as the MR mode wants
    // it, token).
    int bootstrap_info(uint32_t region, FabricBootstrap &out) const;
    // Binds `region` to the peer described by `peer_info`: inserts its address and records
    // where its copy is. Its copy must be exactly as long as ours. Returns 0 or -errno.
    int connect_region(uint32_t region, const FabricBootstrap &peer_info);
    // Sends bootstrap_info(region) over `fd` (a connected stream or seqpacket socket), reads
    // the peer's and connects the region to it. Waits at most `timeout_ms`. 0 or -errno.
    int exchange_bootstrap(int fd, uint32_t region, int timeout_ms = 10000);

    // Mirrors [offset, offset + len) of `region` into the peer's copy, then (unless tag is
    // kNoNotify) notifies the peer with `tag`. Never blocks: what the provider cannot take now
    // is queued and posted by progress(), in order. Returns 0, -EINVAL (range outside the
    // region, tag too large, region unregistered), -ENOTCONN (region not connected), -EAGAIN (too
    // many publishes in flight: call progress() and retry), or the region's sticky error after a
    // publish to it failed (-ECANCELED, -ENOTCONN, ... as the provider reports it).
    int publish(uint32_t region, size_t offset, size_t len, uint32_t tag = kNoNotify);
    // Like publish(), but the peer gets `bytes` (at most kFabricSnapshotBytes, copied now) at
    // [offset, offset + bytes.size()) instead of what our copy holds there: for a record the
    // caller composes (an index pair it read once, a field it must not pass on). Empty bytes
    // with a tag is a bare notification, ordered like any publish.
    int publish_copy(uint32_t region, size_t offset, std::span<const uint8_t> bytes,
                     uint32_t tag = kNoNotify);
    int notify(uint32_t region, uint32_t tag) { return publish_copy(region, 0, {}, tag); }

    // Reads completions, applies the peers' messages, posts queued publishes, and stores up to
    // out.size() notifications, in the order the peers published them. Returns how many, or
    // -errno if the completion queue itself failed. A region whose publish failed is reported
    // once, as a notification with tag kFabricRegionFailed (then see region_error()).
    int progress(std::span<FabricNotification> out);
    template <typename Handler>
    int progress(Handler &&handler) {
        FabricNotification batch[32];
        const int n = progress(std::span<FabricNotification>(batch));
        for (int i = 0; i < n; ++i) handler(batch[i].region, batch[i].tag);
        return n;
    }

    // The completion queue's wait fd (readable when progress() has work), or -1 if the
    // provider has none. Before sleeping on it, call ready_to_sleep().
    int wait_fd() const { return wait_fd_; }
    // fi_trywait: true if nothing is pending, so sleeping on wait_fd() cannot miss an event.
    bool ready_to_sleep();
    // Sleeps until the completion queue may have work, at most timeout_ms (a short nap instead
    // while publishes are queued, or without a wait fd). Returns 0 or -errno.
    int wait(int timeout_ms);

    // Publishes posted or queued and not yet completed.
    uint32_t outstanding() const { return outstanding_; }
    int region_error(uint32_t region) const;
    // Publishes of `region` posted or queued and not yet completed: its memory is still read
    // by the provider until this is 0.
    uint32_t region_outstanding(uint32_t region) const;
    // Forgets `region`: its publishes not yet handed to the provider are dropped, its MR is
    // closed, and messages still arriving for it are dropped. -EBUSY (and nothing changes but
    // the dropping) while the provider still has some of its publishes: the memory stays in use
    // until they complete. Its index may be handed out again (with a new token, so a late
    // message of the old peer cannot land in the new region).
    int unregister_region(uint32_t region);
    // Messages dropped because they failed a check (a misbehaving or confused peer).
    uint64_t rejected_messages() const { return rejected_messages_; }
    // Whether an operation's completion means the peer has the bytes (FI_DELIVERY_COMPLETE).
    bool delivery_complete() const;
    uint64_t mr_mode() const { return mr_mode_; }
    const char *provider_name() const;

  private:
    FabricEndpoint() = default;

    struct Region {
        uint8_t *base = nullptr;
        size_t len = 0;
        fid_mr *mr = nullptr;
        void *desc = nullptr;
        uint64_t token = 0;  // expected in the peer's messages
        bool connected = false;
        uint64_t peer = 0;
        uint32_t peer_region = 0;
        uint64_t peer_token = 0;
        uint64_t remote_base = 0;
        uint64_t remote_key = 0;
        int error = 0;
        uint32_t outstanding = 0;     // its publishes posted or queued
        std::deque<uint32_t> queued;  // ops the provider has not taken yet, in posting order
    };
    struct Op;
    struct ReceiveBuffer;

    int setup(const FabricConfig &config);
    int register_buffer(void *base, size_t len, uint64_t access, fid_mr *&mr);
    // Posts (or queues behind what is queued) one or two operations of one publish.
    int submit(uint32_t region, Op *first, Op *second);
    Op &take_op(uint32_t region);
    Op &take_message(uint32_t region, size_t offset, const uint8_t *bytes, size_t len,
                     uint32_t tag);
    int post(Op &op);
    int post_receive(uint32_t index);
    void flush_queued();
    void drop_queued(uint32_t region);
    void complete(Op &op);
    int fail_region(uint32_t region, int error);
    int read_error_entry();
    Op *op_of(void *context);
    ReceiveBuffer *receive_buffer_of(void *context);
    // Checks and applies one received message; true if it carries a notification.
    bool apply_message(const uint8_t *bytes, size_t len, FabricNotification &notification);

    fi_info *info_ = nullptr;
    fid_fabric *fabric_ = nullptr;
    fid_domain *domain_ = nullptr;
    fid_av *av_ = nullptr;
    fid_cq *cq_ = nullptr;
    fid_ep *ep_ = nullptr;
    fid_mr *staging_mr_ = nullptr;
    fid_mr *receive_mr_ = nullptr;
    int wait_fd_ = -1;
    uint32_t max_tag_ = 0;
    uint64_t mr_mode_ = 0;
    uint64_t completion_flag_ = 0;  // FI_DELIVERY_COMPLETE, or FI_TRANSMIT_COMPLETE without it
    size_t max_msg_size_ = 0;
    std::vector<uint8_t> address_;
    std::vector<Region> regions_;
    std::vector<uint32_t> free_regions_;  // unregistered indices, handed out again

    // Publishes: a fixed pool of operation records (each with its message buffer), a free
    // list, and per region a FIFO of the ones the provider has not taken yet (posted strictly
    // in order within the region; a peer that takes nothing holds up only its own regions).
    std::unique_ptr<Op[]> ops_;
    std::vector<uint32_t> free_ops_;
    std::vector<uint32_t> backlog_;  // regions with queued ops
    uint32_t queued_count_ = 0;      // ops queued, all regions
    uint32_t outstanding_ = 0;

    std::unique_ptr<ReceiveBuffer[]> receives_;
    std::vector<uint32_t> unposted_receives_;  // to post again (the provider said -EAGAIN)

    std::vector<uint32_t> failed_unreported_;
    uint64_t rejected_messages_ = 0;
};

}  // namespace tcps::ipc
