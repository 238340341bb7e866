#include "session.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <sys/socket.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "identity.hpp"
#include "quota.hpp"
#include "remote.hpp"
#include "ring.hpp"

namespace tcps::engine {

Session::Session() {
    waiter_fds.fill(-1);
    waiter_owner.fill(kNoMember);
    waiter_charged.fill(kUncharged);
}

Session::~Session() {
    release();
}

void Session::release() {
    if (region.base) {
        if (client_slots != 0) {
            munmap(region.base, ipc::kRemoteRegionBytes);  // one mapping: map_contiguous
        } else {
            for (uint32_t k = 0; k < ipc::kMaxChunks; ++k) {
                if (uint8_t *chunk = region.chunk(k)) munmap(chunk, ipc::kChunkBulkOffset);
                if (uint8_t *bulk = region.bulk(k)) munmap(bulk, ipc::kChunkBulkBytes);
            }
            munmap(region.base, ipc::kChunksOffset);
        }
        region.map_contiguous(nullptr, 0);
    }
    for (MemRegistration &mem : mems) release_mem(mem);
    for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) close_waiter(*this, w);
    for (Member &member : members) close_control(member);
    for (int *fd : {&memfd, &doorbell_fd}) {
        if (*fd >= 0) close(*fd);
        *fd = -1;
    }
    if (charged != kUncharged) quotas().release(charged, kSessionFds, kSessionBytes);
    charged = kUncharged;
}

void release_mem(MemRegistration &mem) {
    mem = MemRegistration{};
}

std::shared_ptr<void> own_mapping(uint8_t *base, uint64_t length, uid_t uid) {
    return std::shared_ptr<void>(base, [length, uid](void *mapped) {
        munmap(mapped, length);
        if (uid != kUncharged) quotas().release(uid, 0, length);
    });
}

namespace {

constexpr int kSoPeerPidfd = 77;  // SO_PEERPIDFD, Linux 6.5; not in these headers yet

// The effective uid on the "Uid:" line of /proc/PID/status (real, effective, saved, fs).
bool parse_effective_uid(const std::string &text, uid_t &uid) {
    const size_t at = text.find("\nUid:");
    if (at == std::string::npos) return false;
    unsigned long real = 0, effective = 0;
    if (std::sscanf(text.c_str() + at + 5, "%lu %lu", &real, &effective) != 2) return false;
    uid = static_cast<uid_t>(effective);
    return true;
}

}  // namespace

bool read_rights(int sock, pid_t pid, uid_t uid, uid_t &effective_uid, uint64_t &caps) {
    // A pidfd pins the peer's identity: if it is still alive after we read its status, the
    // pid was not reused in between. Older kernels lack SO_PEERPIDFD: the uid check remains.
    caps = 0;
    int pidfd = -1;
    socklen_t len = sizeof(pidfd);
    if (getsockopt(sock, SOL_SOCKET, kSoPeerPidfd, &pidfd, &len) != 0) pidfd = -1;
    const std::string path = "/proc/" + std::to_string(pid) + "/status";
    std::string text;
    if (const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC); fd >= 0) {
        char buffer[4096];
        for (int k = 0; k < 16; ++k) {
            const ssize_t n = read(fd, buffer, sizeof(buffer));
            if (n <= 0) break;
            text.append(buffer, static_cast<size_t>(n));
        }
        close(fd);
    }
    bool trusted = true;
    if (pidfd >= 0) {
        trusted = syscall(SYS_pidfd_send_signal, pidfd, 0, nullptr, 0) == 0;
        close(pidfd);
    }
    uint64_t read_caps = 0;
    if (!trusted || !parse_effective_uid(text, effective_uid) || !parse_cap_eff(text, read_caps))
        return false;
    // A process whose uid changed since it connected keeps no capability with us.
    if (effective_uid == uid) caps = read_caps;
    return true;
}

int accept_control_client(int listener, ClientCreds &creds) {
    for (;;) {
        const int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return -1;
        ucred cred{};
        socklen_t len = sizeof(cred);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
            close(fd);
            continue;
        }
        // Every message the client sends from now on carries its credentials, which the
        // kernel vouches for (kNewSocket creates the socket with them).
        const int on = 1;
        if (setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &on, sizeof(on)) != 0) {
            close(fd);
            continue;
        }
        creds = ClientCreds{};
        creds.pid = cred.pid;
        creds.uid = cred.uid;
        creds.gid = cred.gid;
        uid_t effective_uid = cred.uid;
        read_rights(fd, cred.pid, cred.uid, effective_uid, creds.caps);
        return fd;
    }
}

namespace {

// What one member may do, narrowing `rights` (family_rights).
void narrow_rights(ClientCreds &rights, int control_fd, pid_t pid, uid_t uid, int socket_fd) {
    uid_t effective_uid = 0;
    uint64_t caps = 0;
    if (!read_rights(control_fd, pid, uid, effective_uid, caps)) {
        effective_uid = uid == 0 ? 65534 : uid;  // in doubt: none
        caps = 0;
    }
    // Capabilities count only in the namespaces the member's user namespace owns.
    if (socket_fd >= 0 && caps != 0 && !caps_count_in_netns_of(socket_fd, pid)) caps = 0;
    rights.caps &= caps;
    if (effective_uid != 0) rights.uid = effective_uid;
}

}  // namespace

ClientCreds family_rights(const Session &session, int socket_fd) {
    ClientCreds rights = session.creds;
    // A remote client's processes are not ours to read in /proc: its relay vouched for them.
    if (session.remote) return rights;
    if (session.is_shard()) {
        // The members are the home's: their identities, kept for us under the family's lock
        // (the home closes a member's connection only after it left the list).
        Family &family = *session.family;
        std::lock_guard<std::mutex> lock(family.members_mutex);
        for (uint32_t m = 0; m < ipc::kMaxMembers; ++m)
            if (family.member_live[m])
                narrow_rights(rights, family.members[m].control_fd, family.members[m].pid,
                              family.members[m].uid, socket_fd);
        return rights;
    }
    for (const Member &member : session.members)
        if (member.state == ipc::MemberState::kLive)
            narrow_rights(rights, member.control_fd, member.creds.pid, member.creds.uid, socket_fd);
    return rights;
}

void signal_waiter(Session &s, uint32_t w) {
    uint32_t armed = static_cast<uint32_t>(ipc::WaiterState::kArmed);
    if (!s.region.waiter(w).state.compare_exchange_strong(
            armed, static_cast<uint32_t>(ipc::WaiterState::kSignaled), std::memory_order_acq_rel))
        return;
    const char byte = 1;
    ssize_t ignored = write(s.waiter_fds[w], &byte, 1);  // EAGAIN: already awake
    (void)ignored;
}

void wake_changed_waiters(Session &s, bool signal) {
    if (signal && s.waiter_scan_limit > 0 &&
        s.region.header().waiters_armed.load(std::memory_order_acquire) != 0) {
        for (uint32_t w = 0; w < s.waiter_scan_limit; ++w) {
            if (s.waiter_fds[w] < 0) continue;
            ipc::Waiter &waiter = s.region.waiter(w);
            uint32_t state = waiter.state.load(std::memory_order_acquire);
            if (state != static_cast<uint32_t>(ipc::WaiterState::kArmed)) continue;
            const uint32_t slot = waiter.slot.load(std::memory_order_acquire);
            if (slot == ipc::kWaitAnySlot || s.changed_test(slot)) signal_waiter(s, w);
        }
    }
    for (uint32_t slot : s.changed) s.changed_bits[slot / 64] &= ~(uint64_t{1} << (slot % 64));
    s.changed.clear();
}

size_t AddressKeyHash::operator()(const AddressKey &key) const {
    uint64_t a, b;
    std::memcpy(&a, key.addr, 8);
    std::memcpy(&b, key.addr + 8, 8);
    return std::hash<uint64_t>{}(a * 0x9e3779b97f4a7c15ull ^ b ^ (uint64_t{key.port} << 48));
}

bool address_key(const void *addr, uint32_t len, AddressKey &key) {
    key = AddressKey{};
    sockaddr_storage storage{};
    std::memcpy(&storage, addr, std::min<size_t>(len, sizeof(storage)));
    if (storage.ss_family == AF_INET && len >= sizeof(sockaddr_in)) {
        const auto &in = reinterpret_cast<const sockaddr_in &>(storage);
        std::memcpy(key.addr, &in.sin_addr, 4);
        key.port = in.sin_port;
    } else if (storage.ss_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
        const auto &in6 = reinterpret_cast<const sockaddr_in6 &>(storage);
        std::memcpy(key.addr, &in6.sin6_addr, 16);
        key.port = in6.sin6_port;
    } else {
        return false;
    }
    key.family = storage.ss_family;
    return true;
}

void close_waiter(Session &s, uint32_t w) {
    if (s.waiter_fds[w] >= 0) close(s.waiter_fds[w]);
    if (s.waiter_charged[w] != kUncharged) quotas().release(s.waiter_charged[w], 1, 0);
    s.waiter_fds[w] = -1;
    s.waiter_owner[w] = kNoMember;
    s.waiter_charged[w] = kUncharged;
}

void close_control(Member &member) {
    if (member.control_fd >= 0) close(member.control_fd);
    if (member.control_charged != kUncharged) quotas().release(member.control_charged, 1, 0);
    member.control_fd = -1;
    member.control_charged = kUncharged;
}

void install_waiter(Session &s, uint32_t w, int fd, uint16_t owner, uid_t charged) {
    ipc::Waiter &waiter = s.region.waiter(w);
    waiter.slot.store(ipc::kWaitAnySlot, std::memory_order_relaxed);
    waiter.state.store(static_cast<uint32_t>(ipc::WaiterState::kIdle), std::memory_order_release);
    s.waiter_fds[w] = fd;
    s.waiter_owner[w] = owner;
    s.waiter_charged[w] = charged;
    s.waiter_scan_limit = std::max(s.waiter_scan_limit, w + 1);
}

void announce_engine_gone(Session &s) {
    ipc::RegionHeader &header = s.region.header();
    header.engine_alive.store(0, std::memory_order_seq_cst);
    for (uint32_t w = 0; w < ipc::kMaxWaiters; ++w) {
        if (s.waiter_fds[w] < 0) continue;
        uint32_t armed = static_cast<uint32_t>(ipc::WaiterState::kArmed);
        s.region.waiter(w).state.compare_exchange_strong(
            armed, static_cast<uint32_t>(ipc::WaiterState::kSignaled), std::memory_order_acq_rel);
        const char byte = 1;
        ssize_t ignored = write(s.waiter_fds[w], &byte, 1);
        (void)ignored;
    }
}

int activate_chunk(Session &session) {
    // A family's shards take chunks in turn, in order (RegionHeader::chunks_active only grows,
    // past every chunk initialised): a rare step, under the family's lock.
    std::unique_lock<std::mutex> lock;
    uint32_t k = session.chunks_active;
    if (session.family) {
        lock = std::unique_lock<std::mutex>(session.family->chunk_mutex);
        k = session.family->next_chunk;
    }
    if (k >= session.max_chunks) return -EMFILE;
    if (!session.region.chunk(k)) {
        void *chunk =
            mmap(nullptr, ipc::kChunkBulkOffset, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                 session.memfd, static_cast<off_t>(ipc::chunk_offset(k)));
        if (chunk == MAP_FAILED) return -ENOMEM;
        session.region.chunks[k].store(static_cast<uint8_t *>(chunk), std::memory_order_relaxed);
    }
    // Its pages are still zero (nobody had it): every slot kFree, every hold clear.
    ipc::work_queue_init(session.region, k);
    session.slots.add_chunk(k);
    session.changed_bits.resize(
        std::max(session.changed_bits.size(), size_t{k + 1} * ipc::kChunkSlots / 64), 0);
    // Highest first so the lowest index is handed out first; a relay session's client claims
    // the first kClientSlots itself.
    const uint32_t first = k * ipc::kChunkSlots + (k == 0 ? session.client_slots : 0);
    for (uint32_t i = (k + 1) * ipc::kChunkSlots; i-- > first;)
        session.free_engine_slots.push_back(i);
    session.owned_chunks.push_back(k);
    session.chunks_active = k + 1;
    if (session.family) {
        session.family->chunk_owner[k].store(session.shard, std::memory_order_release);
        session.family->next_chunk = k + 1;
    }
    session.region.header().chunks_active.store(k + 1, std::memory_order_release);
    return 0;
}

bool map_bulk(Session &session, uint32_t chunk) {
    if (session.region.bulk(chunk)) return true;
    if (session.client_slots != 0) return false;  // a relay session's chunk has none
    void *bulk =
        mmap(nullptr, ipc::kChunkBulkBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
             session.memfd, static_cast<off_t>(ipc::chunk_offset(chunk) + ipc::kChunkBulkOffset));
    if (bulk == MAP_FAILED) return false;
    session.region.bulks[chunk].store(static_cast<uint8_t *>(bulk), std::memory_order_release);
    return true;
}

int create_region(Session &session, uint32_t session_id, bool relay) {
    const int memfd = memfd_create("tcps-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0) return -errno;
    session.memfd = memfd;
    if (ftruncate(memfd, static_cast<off_t>(ipc::kRegionBytes)) != 0) return -errno;
    // A relay session is one contiguous mapping (it is mirrored over the fabric as one); a
    // local one maps its control part here and each chunk when it is activated.
    session.client_slots = relay ? ipc::kClientSlots : 0;
    session.max_chunks = relay ? 1 : ipc::kMaxChunks;
    const size_t mapped = relay ? ipc::kRemoteRegionBytes : ipc::kChunksOffset;
    void *base =
        mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, memfd, 0);
    if (base == MAP_FAILED) return -errno;
    session.region.map_contiguous(static_cast<uint8_t *>(base), relay ? 1 : 0);

    ipc::RegionHeader &header = session.region.header();
    header.magic = ipc::kRegionMagic;
    header.version = ipc::kLayoutVersion;
    header.region_bytes = ipc::kRegionBytes;
    header.max_sockets = session.max_chunks * ipc::kChunkSlots;
    header.client_slots = session.client_slots;
    header.tx_ring_bytes = ipc::kRingBytes;
    header.rx_ring_bytes = ipc::kRingBytes;
    header.ring_max_bytes = session.ring_max();
    header.max_waiters = ipc::kMaxWaiters;
    header.session_id = session_id;
    header.max_members = ipc::kMaxMembers;
    header.max_chunks = session.max_chunks;
    header.chunk_slots = ipc::kChunkSlots;
    if (getrandom(&session.family_token, sizeof(session.family_token), 0) !=
        static_cast<ssize_t>(sizeof(session.family_token)))
        return -EIO;
    header.family_token = session.family_token;
    if (const int rc = activate_chunk(session); rc != 0) return rc;
    header.engine_alive.store(1, std::memory_order_release);

    // The client must not be able to shrink the file under the engine's mapping (SIGBUS).
    if (fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) return -errno;

    session.doorbell_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (session.doorbell_fd < 0) return -errno;
    session.id = session_id;
    return 0;
}

}  // namespace tcps::engine
