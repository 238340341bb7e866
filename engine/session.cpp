#include "session.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>

#include "ring.hpp"

namespace tcps::engine {

Session::Session() : slots(new EngineSlot[ipc::kMaxSockets]) {
    waiter_fds.fill(-1);
    waiter_owner.fill(kNoMember);
    free_engine_slots.reserve(ipc::kMaxSockets - ipc::kClientSlots);
    // Highest first so the lowest index is handed out first.
    for (uint32_t i = ipc::kMaxSockets; i-- > ipc::kClientSlots;)
        free_engine_slots.push_back(static_cast<uint16_t>(i));
}

Session::~Session() {
    release();
}

void Session::release() {
    if (region.base) {
        munmap(region.base, ipc::kRegionBytes);
        region.base = nullptr;
    }
    for (int &fd : waiter_fds) {
        if (fd >= 0) close(fd);
        fd = -1;
    }
    for (Member &member : members) {
        if (member.control_fd >= 0) close(member.control_fd);
        member.control_fd = -1;
    }
    for (int *fd : {&memfd, &doorbell_fd}) {
        if (*fd >= 0) close(*fd);
        *fd = -1;
    }
}

int create_region(Session &session, uint32_t session_id) {
    const int memfd = memfd_create("tcps-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0) return -errno;
    session.memfd = memfd;
    if (ftruncate(memfd, static_cast<off_t>(ipc::kRegionBytes)) != 0) return -errno;
    void *base = mmap(nullptr, ipc::kRegionBytes, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_NORESERVE, memfd, 0);
    if (base == MAP_FAILED) return -errno;
    session.region.base = static_cast<uint8_t *>(base);

    ipc::RegionHeader &header = session.region.header();
    header.magic = ipc::kRegionMagic;
    header.version = ipc::kLayoutVersion;
    header.region_bytes = ipc::kRegionBytes;
    header.max_sockets = ipc::kMaxSockets;
    header.client_slots = ipc::kClientSlots;
    header.tx_ring_bytes = ipc::kTxRingBytes;
    header.rx_ring_bytes = ipc::kRxRingBytes;
    header.max_waiters = ipc::kMaxWaiters;
    header.session_id = session_id;
    header.max_members = ipc::kMaxMembers;
    if (getrandom(&session.family_token, sizeof(session.family_token), 0) !=
        static_cast<ssize_t>(sizeof(session.family_token)))
        return -EIO;
    header.family_token = session.family_token;
    header.engine_sleeping.store(0, std::memory_order_relaxed);
    ipc::work_queue_init(session.region);
    header.engine_alive.store(1, std::memory_order_release);

    // The client must not be able to shrink the file under the engine's mapping (SIGBUS).
    if (fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) return -errno;

    session.doorbell_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (session.doorbell_fd < 0) return -errno;
    session.id = session_id;
    return 0;
}

}  // namespace tcps::engine
