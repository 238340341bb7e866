#include "quota.hpp"

#include <cerrno>

namespace tcps::engine {

void Quotas::configure(uint64_t fds, uint64_t bytes, uid_t exempt_uid) {
    std::lock_guard<std::mutex> lock(mutex_);
    capacity_ = {fds, bytes};
    exempt_ = exempt_uid;
}

int Quotas::charge(uid_t uid, uint64_t fds, uint64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    QuotaUsage &mine = used_[uid];
    if (uid != exempt_) {
        if (fds > 0 && !within_share(mine.fds, total_.fds, fds, capacity_.fds)) return -ENFILE;
        if (bytes > 0 && !within_share(mine.bytes, total_.bytes, bytes, capacity_.bytes))
            return -ENOBUFS;
    }
    mine.fds += fds;
    mine.bytes += bytes;
    total_.fds += fds;
    total_.bytes += bytes;
    return 0;
}

void Quotas::release(uid_t uid, uint64_t fds, uint64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = used_.find(uid);
    if (found == used_.end()) return;
    QuotaUsage &mine = found->second;
    fds = fds < mine.fds ? fds : mine.fds;
    bytes = bytes < mine.bytes ? bytes : mine.bytes;
    mine.fds -= fds;
    mine.bytes -= bytes;
    total_.fds -= fds;
    total_.bytes -= bytes;
    if (mine.fds == 0 && mine.bytes == 0) used_.erase(found);
}

QuotaUsage Quotas::usage(uid_t uid) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = used_.find(uid);
    return found == used_.end() ? QuotaUsage{} : found->second;
}

QuotaUsage Quotas::total() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return total_;
}

Quotas &quotas() {
    static Quotas ledger;
    return ledger;
}

}  // namespace tcps::engine
