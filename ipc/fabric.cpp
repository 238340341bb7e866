// The cross-host channel over libfabric: see fabric.hpp for the design and the guarantees.
#include "fabric.hpp"

#include <poll.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "fence.hpp"

namespace tcps::ipc {

namespace {

// libfabric's FI_E* codes are the errno values for everything this file can meet; the few
// that are not (FI_ETRUNC and above) become EIO.
int errno_of(ssize_t fi_ret) {
    const int code = static_cast<int>(fi_ret < 0 ? -fi_ret : fi_ret);
    if (code == 0) return 0;
    return code < FI_ERRNO_OFFSET ? -code : -EIO;
}

// How long wait() naps where it cannot sleep on an fd.
constexpr useconds_t kNapMicroseconds = 50;

// The MR modes this file knows how to follow; a provider that needs another one is not used.
constexpr uint64_t kSupportedMrModes =
    FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;

void close_fid(fid *object) {
    if (object != nullptr) fi_close(object);
}

// Reads or writes exactly `len` bytes on a blocking or non-blocking socket before `deadline`.
int transfer_all(int fd, void *buf, size_t len, bool sending,
                 std::chrono::steady_clock::time_point deadline) {
    auto *bytes = static_cast<uint8_t *>(buf);
    size_t done = 0;
    while (done < len) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) return -ETIMEDOUT;
        pollfd pfd{fd, static_cast<short>(sending ? POLLOUT : POLLIN), 0};
        const int ready = ::poll(&pfd, 1, static_cast<int>(left.count()));
        if (ready < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (ready == 0) return -ETIMEDOUT;
        const ssize_t n = sending
                              ? ::send(fd, bytes + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT)
                              : ::recv(fd, bytes + done, len - done, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return -errno;
        }
        if (n == 0 && !sending) return -ECONNRESET;
        done += static_cast<size_t>(n);
    }
    return 0;
}

// Fills `value` from the kernel's random source (keys and tokens must not be guessable).
int random_u64(uint64_t &value) {
    uint8_t *bytes = reinterpret_cast<uint8_t *>(&value);
    size_t done = 0;
    while (done < sizeof(value)) {
        const ssize_t n = getrandom(bytes + done, sizeof(value) - done, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        done += static_cast<size_t>(n);
    }
    return 0;
}

// What every message starts with. A message carries a snapshot of up to kFabricSnapshotBytes
// of the region (len > 0) and/or a notification (tag != kNoNotify).
struct MessageHeader {
    uint64_t token;   // the receiving region's token (FabricBootstrap::token)
    uint64_t offset;  // where the bytes go in the receiver's copy
    uint32_t region;  // the receiver's region index
    uint32_t len;     // bytes after the header
    uint32_t tag;
    uint32_t reserved;
};
static_assert(sizeof(MessageHeader) == 32, "message header size is part of the protocol");
constexpr size_t kMessageBytes = sizeof(MessageHeader) + kFabricSnapshotBytes;

// How many provider operations one round of progress() reads at most.
constexpr size_t kCompletionBatch = 16;
constexpr int kCompletionRounds = 4;

}  // namespace

struct FabricEndpoint::Op {
    fi_context2 context;  // the provider hands its address back in completions
    bool is_message;
    uint32_t region;
    uint64_t offset;  // RMA writes: the range, sent from the region in place
    uint32_t len;
    uint32_t message_len;                       // messages: header + bytes
    alignas(8) uint8_t message[kMessageBytes];  // messages: built (snapshot) at publish time
};

struct FabricEndpoint::ReceiveBuffer {
    fi_context2 context;
    alignas(8) uint8_t bytes[kMessageBytes];
};

FabricConfig FabricConfig::from_env() {
    FabricConfig config;
    if (const char *value = std::getenv(kFabricProviderEnv); value != nullptr && *value)
        config.provider = value;
    if (const char *value = std::getenv(kFabricNodeEnv); value != nullptr && *value)
        config.node = value;
    if (const char *value = std::getenv(kFabricServiceEnv); value != nullptr && *value)
        config.service = value;
    return config;
}

int FabricEndpoint::open(const FabricConfig &config, std::unique_ptr<FabricEndpoint> &out) {
    if (config.max_tag == 0 || config.max_tag >= kFabricRegionFailed) return -EINVAL;
    std::unique_ptr<FabricEndpoint> endpoint(new FabricEndpoint());
    const int ret = endpoint->setup(config);
    if (ret < 0) return ret;
    out = std::move(endpoint);
    return 0;
}

int FabricEndpoint::setup(const FabricConfig &config) {
    max_tag_ = config.max_tag;
    // Writes and messages to one peer are processed in posting order, whichever follows which.
    constexpr uint64_t kOrder = FI_ORDER_WAW | FI_ORDER_WAS | FI_ORDER_SAW | FI_ORDER_SAS;

    fi_info *hints = fi_allocinfo();
    if (hints == nullptr) return -ENOMEM;
    hints->caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
    // Every operation passes an fi_context2 it owns until completion.
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->ep_attr->type = FI_EP_RDM;
    hints->tx_attr->msg_order = kOrder;
    hints->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
    hints->rx_attr->msg_order = kOrder;
    hints->domain_attr->mr_mode = static_cast<int>(kSupportedMrModes);
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->domain_attr->data_progress = FI_PROGRESS_MANUAL;
    hints->fabric_attr->prov_name = strdup(config.provider.c_str());
    const char *node = config.node.empty() ? nullptr : config.node.c_str();
    const char *service = config.service.empty() ? nullptr : config.service.c_str();
    int ret = fi_getinfo(FI_VERSION(1, 17), node, service,
                         node != nullptr || service != nullptr ? FI_SOURCE : 0, hints, &info_);
    fi_freeinfo(hints);
    if (ret == -FI_ENODATA) return -ENODATA;
    if (ret < 0) return errno_of(ret);

    // Check what we rely on rather than trusting the hints to have been honoured.
    if ((info_->tx_attr->msg_order & kOrder) != kOrder ||
        (info_->rx_attr->msg_order & kOrder) != kOrder ||
        (info_->domain_attr->mr_mode & ~static_cast<int>(kSupportedMrModes)) != 0 ||
        info_->ep_attr->max_msg_size < kMessageBytes)
        return -ENODATA;
    mr_mode_ = static_cast<uint64_t>(info_->domain_attr->mr_mode);
    completion_flag_ = (info_->tx_attr->op_flags & FI_DELIVERY_COMPLETE) ? FI_DELIVERY_COMPLETE
                                                                         : FI_TRANSMIT_COMPLETE;
    max_msg_size_ = info_->ep_attr->max_msg_size;

    if ((ret = fi_fabric(info_->fabric_attr, &fabric_, nullptr)) < 0) return errno_of(ret);
    if ((ret = fi_domain(fabric_, info_, &domain_, nullptr)) < 0) return errno_of(ret);

    fi_av_attr av_attr{};
    av_attr.type = FI_AV_TABLE;
    if ((ret = fi_av_open(domain_, &av_attr, &av_, nullptr)) < 0) return errno_of(ret);

    fi_cq_attr cq_attr{};
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.wait_obj = config.want_wait_fd ? FI_WAIT_FD : FI_WAIT_NONE;
    ret = fi_cq_open(domain_, &cq_attr, &cq_, nullptr);
    if (ret < 0 && config.want_wait_fd) {
        cq_attr.wait_obj = FI_WAIT_NONE;  // the provider cannot sleep: callers nap
        ret = fi_cq_open(domain_, &cq_attr, &cq_, nullptr);
    }
    if (ret < 0) return errno_of(ret);
    if (cq_attr.wait_obj == FI_WAIT_FD && fi_control(&cq_->fid, FI_GETWAIT, &wait_fd_) < 0)
        wait_fd_ = -1;

    if ((ret = fi_endpoint(domain_, info_, &ep_, nullptr)) < 0) return errno_of(ret);
    if ((ret = fi_ep_bind(ep_, &av_->fid, 0)) < 0) return errno_of(ret);
    if ((ret = fi_ep_bind(ep_, &cq_->fid, FI_TRANSMIT | FI_RECV)) < 0) return errno_of(ret);
    if ((ret = fi_enable(ep_)) < 0) return errno_of(ret);

    size_t address_len = kFabricAddressMax;
    address_.resize(address_len);
    if ((ret = fi_getname(&ep_->fid, address_.data(), &address_len)) < 0) return errno_of(ret);
    address_.resize(address_len);

    ops_ = std::make_unique<Op[]>(kFabricMaxOutstanding);
    free_ops_.reserve(kFabricMaxOutstanding);
    for (uint32_t i = kFabricMaxOutstanding; i > 0; --i) free_ops_.push_back(i - 1);
    receives_ = std::make_unique<ReceiveBuffer[]>(kFabricReceiveBuffers);
    unposted_receives_.reserve(kFabricReceiveBuffers);

    // Message buffers are sources and targets of transfers: with FI_MR_LOCAL they need MRs.
    if (mr_mode_ & FI_MR_LOCAL) {
        if ((ret = register_buffer(ops_.get(), sizeof(Op) * kFabricMaxOutstanding, FI_SEND,
                                   staging_mr_)) < 0)
            return ret;
        if ((ret = register_buffer(receives_.get(), sizeof(ReceiveBuffer) * kFabricReceiveBuffers,
                                   FI_RECV, receive_mr_)) < 0)
            return ret;
    }
    for (uint32_t i = 0; i < kFabricReceiveBuffers; ++i) {
        ret = post_receive(i);
        if (ret == -EAGAIN)
            unposted_receives_.push_back(i);
        else if (ret < 0)
            return ret;
    }
    return 0;
}

int FabricEndpoint::register_buffer(void *base, size_t len, uint64_t access, fid_mr *&mr) {
    // The key is the provider's to choose under FI_MR_PROV_KEY. Otherwise ours: random, so a
    // peer cannot guess another peer's key, and retried on the rare collision.
    const size_t key_bytes = std::min<size_t>(info_->domain_attr->mr_key_size, 8);
    const uint64_t key_mask = key_bytes >= 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * key_bytes)) - 1;
    int ret = -FI_ENOKEY;
    for (int attempt = 0; attempt < 8 && ret == -FI_ENOKEY; ++attempt) {
        uint64_t key = 0;
        if (!(mr_mode_ & FI_MR_PROV_KEY)) {
            if ((ret = random_u64(key)) < 0) return ret;
            key &= key_mask;
        }
        ret = fi_mr_reg(domain_, base, len, access, 0, key, 0, &mr, nullptr);
    }
    if (ret < 0) return errno_of(ret);
    if (mr_mode_ & FI_MR_ENDPOINT) {
        if ((ret = fi_mr_bind(mr, &ep_->fid, 0)) < 0 || (ret = fi_mr_enable(mr)) < 0) {
            fi_close(&mr->fid);
            mr = nullptr;
            return errno_of(ret);
        }
    }
    return 0;
}

FabricEndpoint::~FabricEndpoint() {
    // The endpoint first: nothing may complete into memory we are about to release.
    close_fid(ep_ ? &ep_->fid : nullptr);
    for (Region &region : regions_) close_fid(region.mr ? &region.mr->fid : nullptr);
    close_fid(staging_mr_ ? &staging_mr_->fid : nullptr);
    close_fid(receive_mr_ ? &receive_mr_->fid : nullptr);
    close_fid(cq_ ? &cq_->fid : nullptr);
    close_fid(av_ ? &av_->fid : nullptr);
    close_fid(domain_ ? &domain_->fid : nullptr);
    close_fid(fabric_ ? &fabric_->fid : nullptr);
    if (info_ != nullptr) fi_freeinfo(info_);
}

const char *FabricEndpoint::provider_name() const {
    return info_ != nullptr && info_->fabric_attr->prov_name != nullptr
               ? info_->fabric_attr->prov_name
               : "";
}

bool FabricEndpoint::delivery_complete() const {
    return completion_flag_ == FI_DELIVERY_COMPLETE;
}

std::span<const uint8_t> FabricEndpoint::local_address() const {
    return {address_.data(), address_.size()};
}

int FabricEndpoint::insert_peer(std::span<const uint8_t> address, uint64_t &peer) {
    if (address.empty() || address.size() > kFabricAddressMax) return -EINVAL;
    fi_addr_t handle = FI_ADDR_NOTAVAIL;
    const int ret = fi_av_insert(av_, address.data(), 1, &handle, 0, nullptr);
    if (ret != 1 || handle == FI_ADDR_NOTAVAIL) return ret < 0 ? errno_of(ret) : -EINVAL;
    peer = handle;
    return 0;
}

int FabricEndpoint::register_region(void *base, size_t len, uint32_t &region) {
    if (base == nullptr || len == 0) return -EINVAL;
    if (free_regions_.empty() && regions_.size() >= kFabricMaxRegions) return -ENOSPC;
    Region entry;
    entry.base = static_cast<uint8_t *>(base);
    entry.len = len;
    int ret = random_u64(entry.token);
    if (ret < 0) return ret;
    if ((ret = register_buffer(base, len, FI_REMOTE_WRITE | FI_WRITE, entry.mr)) < 0) return ret;
    entry.desc = fi_mr_desc(entry.mr);
    if (!free_regions_.empty()) {
        region = free_regions_.back();
        free_regions_.pop_back();
        regions_[region] = entry;
        return 0;
    }
    region = static_cast<uint32_t>(regions_.size());
    regions_.push_back(entry);
    return 0;
}

uint32_t FabricEndpoint::region_outstanding(uint32_t region) const {
    return region < regions_.size() ? regions_[region].outstanding : 0;
}

int FabricEndpoint::unregister_region(uint32_t region) {
    if (region >= regions_.size() || regions_[region].mr == nullptr) return -EINVAL;
    drop_queued(region);
    Region &entry = regions_[region];
    if (entry.outstanding > 0) return -EBUSY;
    close_fid(&entry.mr->fid);
    // A failure not yet reported concerns a region nobody will look at again.
    failed_unreported_.erase(
        std::remove(failed_unreported_.begin(), failed_unreported_.end(), region),
        failed_unreported_.end());
    // No MR, no base: apply_message drops whatever still arrives for this index.
    entry = Region{};
    free_regions_.push_back(region);
    return 0;
}

int FabricEndpoint::bootstrap_info(uint32_t region, FabricBootstrap &out) const {
    if (region >= regions_.size() || regions_[region].mr == nullptr) return -EINVAL;
    const Region &entry = regions_[region];
    out = FabricBootstrap{};
    out.magic = kFabricBootstrapMagic;
    out.version = kFabricBootstrapVersion;
    out.address_len = static_cast<uint32_t>(address_.size());
    out.region = region;
    std::memcpy(out.address, address_.data(), address_.size());
    // Under FI_MR_VIRT_ADDR the peer targets our virtual addresses, otherwise offsets.
    out.region_base =
        (mr_mode_ & FI_MR_VIRT_ADDR) ? reinterpret_cast<uintptr_t>(entry.base) : uint64_t{0};
    out.region_len = entry.len;
    out.key = fi_mr_key(entry.mr);
    out.token = entry.token;
    return 0;
}

int FabricEndpoint::connect_region(uint32_t region, const FabricBootstrap &peer_info) {
    if (region >= regions_.size() || regions_[region].mr == nullptr) return -EINVAL;
    Region &entry = regions_[region];
    if (entry.connected) return -EISCONN;
    // The peer's record is untrusted input: check every field before use.
    if (peer_info.magic != kFabricBootstrapMagic || peer_info.version != kFabricBootstrapVersion)
        return -EPROTO;
    if (peer_info.address_len == 0 || peer_info.address_len > kFabricAddressMax ||
        peer_info.region >= kFabricMaxRegions || peer_info.region_len != entry.len ||
        peer_info.region_base > UINT64_MAX - peer_info.region_len)
        return -EPROTO;
    uint64_t peer = 0;
    const int ret = insert_peer({peer_info.address, peer_info.address_len}, peer);
    if (ret < 0) return ret;
    entry.peer = peer;
    entry.peer_region = peer_info.region;
    entry.peer_token = peer_info.token;
    entry.remote_base = peer_info.region_base;
    entry.remote_key = peer_info.key;
    entry.connected = true;
    return 0;
}

int FabricEndpoint::exchange_bootstrap(int fd, uint32_t region, int timeout_ms) {
    FabricBootstrap mine{};
    int ret = bootstrap_info(region, mine);
    if (ret < 0) return ret;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    if ((ret = transfer_all(fd, &mine, sizeof(mine), true, deadline)) < 0) return ret;
    FabricBootstrap theirs{};
    if ((ret = transfer_all(fd, &theirs, sizeof(theirs), false, deadline)) < 0) return ret;
    return connect_region(region, theirs);
}

int FabricEndpoint::region_error(uint32_t region) const {
    return region < regions_.size() ? regions_[region].error : -EINVAL;
}

FabricEndpoint::Op &FabricEndpoint::take_op(uint32_t region) {
    Op &op = ops_[free_ops_.back()];
    free_ops_.pop_back();
    ++outstanding_;
    ++regions_[region].outstanding;
    op.region = region;
    return op;
}

FabricEndpoint::Op &FabricEndpoint::take_message(uint32_t region, size_t offset,
                                                 const uint8_t *bytes, size_t len, uint32_t tag) {
    const Region &entry = regions_[region];
    Op &message = take_op(region);
    message.is_message = true;
    MessageHeader header{entry.peer_token,
                         len > 0 ? offset : 0,
                         entry.peer_region,
                         static_cast<uint32_t>(len),
                         tag,
                         0};
    std::memcpy(message.message, &header, sizeof(header));
    // The snapshot: what the peer gets is what the bytes hold now.
    if (len > 0) std::memcpy(message.message + sizeof(header), bytes, len);
    message.message_len = static_cast<uint32_t>(sizeof(header) + len);
    return message;
}

int FabricEndpoint::publish(uint32_t region, size_t offset, size_t len, uint32_t tag) {
    if (region >= regions_.size() || regions_[region].mr == nullptr) return -EINVAL;
    Region &entry = regions_[region];
    if (entry.error != 0) return entry.error;
    if (!entry.connected) return -ENOTCONN;
    if (len == 0 || offset > entry.len || len > entry.len - offset || len > max_msg_size_ ||
        len > UINT32_MAX)
        return -EINVAL;
    if (tag != kNoNotify && tag >= max_tag_) return -EINVAL;
    const bool snapshot = len <= kFabricSnapshotBytes;
    const size_t needed = snapshot || tag == kNoNotify ? 1 : 2;
    if (free_ops_.size() < needed) return -EAGAIN;

    if (snapshot)
        return submit(region, &take_message(region, offset, entry.base + offset, len, tag),
                      nullptr);
    Op &write = take_op(region);
    write.is_message = false;
    write.offset = offset;
    write.len = static_cast<uint32_t>(len);
    Op *notification = tag != kNoNotify ? &take_message(region, 0, nullptr, 0, tag) : nullptr;
    return submit(region, &write, notification);
}

int FabricEndpoint::publish_copy(uint32_t region, size_t offset, std::span<const uint8_t> bytes,
                                 uint32_t tag) {
    if (region >= regions_.size() || regions_[region].mr == nullptr) return -EINVAL;
    Region &entry = regions_[region];
    if (entry.error != 0) return entry.error;
    if (!entry.connected) return -ENOTCONN;
    const size_t len = bytes.size();
    if (len > kFabricSnapshotBytes || (len == 0 && tag == kNoNotify) ||
        (len > 0 && (offset > entry.len || len > entry.len - offset)))
        return -EINVAL;
    if (tag != kNoNotify && tag >= max_tag_) return -EINVAL;
    if (free_ops_.empty()) return -EAGAIN;
    return submit(region, &take_message(region, offset, bytes.data(), len, tag), nullptr);
}

int FabricEndpoint::submit(uint32_t region, Op *first, Op *second) {
    Op *ops[2] = {first, second};
    std::deque<uint32_t> &queued = regions_[region].queued;
    for (Op *op : ops) {
        if (op == nullptr) continue;
        // Posting directly is only in order if nothing of this region is queued ahead.
        if (queued.empty()) {
            const int ret = post(*op);
            if (ret == 0) continue;
            if (ret != -EAGAIN) {
                complete(*op);
                if (op == ops[0] && ops[1] != nullptr) complete(*ops[1]);
                return fail_region(region, ret);
            }
            backlog_.push_back(region);
        }
        queued.push_back(static_cast<uint32_t>(op - ops_.get()));
        ++queued_count_;
    }
    return 0;
}

int FabricEndpoint::post(Op &op) {
    const Region &entry = regions_[op.region];
    ssize_t ret;
    if (op.is_message) {
        iovec local{op.message, op.message_len};
        void *desc = staging_mr_ != nullptr ? fi_mr_desc(staging_mr_) : nullptr;
        fi_msg message{};
        message.msg_iov = &local;
        message.desc = &desc;
        message.iov_count = 1;
        message.addr = entry.peer;
        message.context = &op.context;
        ret = fi_sendmsg(ep_, &message, FI_COMPLETION | completion_flag_);
    } else {
        iovec local{entry.base + op.offset, op.len};
        void *desc = (mr_mode_ & FI_MR_LOCAL) ? entry.desc : nullptr;
        fi_rma_iov remote{entry.remote_base + op.offset, op.len, entry.remote_key};
        fi_msg_rma message{};
        message.msg_iov = &local;
        message.desc = &desc;
        message.iov_count = 1;
        message.addr = entry.peer;
        message.rma_iov = &remote;
        message.rma_iov_count = 1;
        message.context = &op.context;
        // Delivery complete: the completion means the peer placed the bytes, and a write the
        // peer refused or a connection lost under it completes with an error, not silently.
        ret = fi_writemsg(ep_, &message, FI_COMPLETION | completion_flag_);
    }
    return ret == 0 ? 0 : errno_of(ret);
}

int FabricEndpoint::post_receive(uint32_t index) {
    ReceiveBuffer &buffer = receives_[index];
    void *desc = receive_mr_ != nullptr ? fi_mr_desc(receive_mr_) : nullptr;
    const ssize_t ret =
        fi_recv(ep_, buffer.bytes, sizeof(buffer.bytes), desc, FI_ADDR_UNSPEC, &buffer.context);
    return ret == 0 ? 0 : errno_of(ret);
}

void FabricEndpoint::complete(Op &op) {
    free_ops_.push_back(static_cast<uint32_t>(&op - ops_.get()));
    --outstanding_;
    --regions_[op.region].outstanding;
}

int FabricEndpoint::fail_region(uint32_t region, int error) {
    Region &entry = regions_[region];
    if (entry.error == 0) {
        entry.error = error;
        failed_unreported_.push_back(region);
    }
    return entry.error;
}

void FabricEndpoint::flush_queued() {
    for (size_t k = 0; k < backlog_.size();) {
        const uint32_t region = backlog_[k];
        std::deque<uint32_t> &queued = regions_[region].queued;
        while (!queued.empty()) {
            Op &op = ops_[queued.front()];
            // A region that failed drops what it still had queued.
            int ret = regions_[region].error;
            if (ret == 0) {
                ret = post(op);
                if (ret == -EAGAIN) break;  // this region waits; the others may go on
            }
            queued.pop_front();
            --queued_count_;
            if (ret != 0) {
                complete(op);
                fail_region(region, ret);
            }
        }
        if (queued.empty()) {
            backlog_[k] = backlog_.back();
            backlog_.pop_back();
        } else {
            ++k;
        }
    }
}

void FabricEndpoint::drop_queued(uint32_t region) {
    std::deque<uint32_t> &queued = regions_[region].queued;
    if (queued.empty()) return;
    while (!queued.empty()) {
        complete(ops_[queued.front()]);
        queued.pop_front();
        --queued_count_;
    }
    backlog_.erase(std::remove(backlog_.begin(), backlog_.end(), region), backlog_.end());
}

FabricEndpoint::Op *FabricEndpoint::op_of(void *context) {
    // A context is the first member of its record; any other address is not one of ours.
    const auto at = reinterpret_cast<uintptr_t>(context);
    const auto first = reinterpret_cast<uintptr_t>(ops_.get());
    if (context == nullptr || at < first || at >= first + sizeof(Op) * kFabricMaxOutstanding ||
        (at - first) % sizeof(Op) != 0)
        return nullptr;
    return reinterpret_cast<Op *>(context);
}

FabricEndpoint::ReceiveBuffer *FabricEndpoint::receive_buffer_of(void *context) {
    const auto at = reinterpret_cast<uintptr_t>(context);
    const auto first = reinterpret_cast<uintptr_t>(receives_.get());
    if (context == nullptr || at < first ||
        at >= first + sizeof(ReceiveBuffer) * kFabricReceiveBuffers ||
        (at - first) % sizeof(ReceiveBuffer) != 0)
        return nullptr;
    return reinterpret_cast<ReceiveBuffer *>(context);
}

bool FabricEndpoint::apply_message(const uint8_t *bytes, size_t len,
                                   FabricNotification &notification) {
    // A peer's message is untrusted: check all of it before touching the region.
    auto reject = [&] {
        ++rejected_messages_;
        return false;
    };
    MessageHeader header;
    if (len < sizeof(header)) return reject();
    std::memcpy(&header, bytes, sizeof(header));
    const size_t body = len - sizeof(header);
    if (header.len != body || body > kFabricSnapshotBytes || header.region >= regions_.size())
        return reject();
    Region &entry = regions_[header.region];
    if (entry.mr == nullptr) return reject();  // unregistered: a late message of its old peer
    // The token, not connect_region(), decides: the peer may publish as soon as it has our
    // bootstrap record, before this side has read its own.
    if (header.token != entry.token || (header.tag != kNoNotify && header.tag >= max_tag_) ||
        (body > 0 && (header.offset > entry.len || body > entry.len - header.offset)))
        return reject();

    if (body > 0) {
        uint8_t *target = entry.base + header.offset;
        const uint8_t *source = bytes + sizeof(header);
        if (((reinterpret_cast<uintptr_t>(target) | body) & 3) == 0) {
            // Word by word, each a release store: a reader of an aligned 32-bit field sees the
            // old value or the new one, and with it everything placed before.
            for (size_t i = 0; i < body; i += 4) {
                uint32_t word;
                std::memcpy(&word, source + i, 4);
                std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t *>(target + i))
                    .store(word, std::memory_order_release);
            }
        } else {
            release_fence();
            std::memcpy(target, source, body);
        }
    }
    if (header.tag == kNoNotify) return false;
    notification = {header.region, header.tag};
    return true;
}

int FabricEndpoint::read_error_entry() {
    fi_cq_err_entry error{};
    const ssize_t ret = fi_cq_readerr(cq_, &error, 0);
    if (ret < 0) return ret == -FI_EAGAIN ? 0 : errno_of(ret);
    const int code = error.err != 0 ? errno_of(error.err) : -EIO;
    if (Op *op = op_of(error.op_context)) {
        const uint32_t region = op->region;
        complete(*op);
        fail_region(region, code);
    } else if (ReceiveBuffer *buffer = receive_buffer_of(error.op_context)) {
        // A message that did not fit (or a receive the provider cancelled): drop it.
        ++rejected_messages_;
        const uint32_t index = static_cast<uint32_t>(buffer - receives_.get());
        if (post_receive(index) < 0) unposted_receives_.push_back(index);
    }
    // Anything else is no operation of ours: the regions' own operations report their errors.
    return 0;
}

int FabricEndpoint::progress(std::span<FabricNotification> out) {
    size_t delivered = 0;
    while (delivered < out.size() && !failed_unreported_.empty()) {
        out[delivered++] = {failed_unreported_.back(), kFabricRegionFailed};
        failed_unreported_.pop_back();
    }
    fi_cq_data_entry entries[kCompletionBatch];
    // Bounded: a few batches per call, so one busy peer cannot keep the caller here.
    for (int round = 0; round < kCompletionRounds; ++round) {
        // Never read more completions than there is room for notifications.
        const size_t room = std::min(kCompletionBatch, out.size() - delivered);
        if (room == 0) break;
        const ssize_t n = fi_cq_read(cq_, entries, room);
        if (n == -FI_EAGAIN) break;
        if (n == -FI_EAVAIL) {
            const int ret = read_error_entry();
            if (ret < 0) return ret;
            continue;
        }
        if (n < 0) return errno_of(n);
        for (ssize_t i = 0; i < n; ++i) {
            const fi_cq_data_entry &entry = entries[i];
            if (ReceiveBuffer *buffer = receive_buffer_of(entry.op_context)) {
                const size_t len = std::min(entry.len, sizeof(buffer->bytes));
                if (apply_message(buffer->bytes, len, out[delivered])) ++delivered;
                const uint32_t index = static_cast<uint32_t>(buffer - receives_.get());
                if (post_receive(index) < 0) unposted_receives_.push_back(index);
            } else if (Op *op = op_of(entry.op_context)) {
                complete(*op);
            }
        }
        if (static_cast<size_t>(n) < room) break;
    }
    while (!unposted_receives_.empty() && post_receive(unposted_receives_.back()) == 0)
        unposted_receives_.pop_back();
    flush_queued();
    return static_cast<int>(delivered);
}

bool FabricEndpoint::ready_to_sleep() {
    if (wait_fd_ < 0 || queued_count_ > 0 || !failed_unreported_.empty() ||
        !unposted_receives_.empty())
        return false;
    fid *fids[1] = {&cq_->fid};
    return fi_trywait(fabric_, fids, 1) == FI_SUCCESS;
}

int FabricEndpoint::wait(int timeout_ms) {
    if (!failed_unreported_.empty()) return 0;
    if (wait_fd_ < 0 || queued_count_ > 0 || !unposted_receives_.empty()) {
        // No fd, or work to retry: nap briefly instead of spinning. Short, as nothing will
        // end the nap early.
        if (timeout_ms > 0) ::usleep(kNapMicroseconds);
        return 0;
    }
    if (!ready_to_sleep()) return 0;
    pollfd pfd{wait_fd_, POLLIN, 0};
    if (::poll(&pfd, 1, timeout_ms) < 0 && errno != EINTR) return -errno;
    return 0;
}

}  // namespace tcps::ipc
