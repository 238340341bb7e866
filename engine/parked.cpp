#include "parked.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <iterator>

#include "quota.hpp"

namespace tcps::engine {

bool socket_cookie(int fd, uint64_t &cookie) {
    socklen_t len = sizeof(cookie);
    return getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &len) == 0 && len == sizeof(cookie);
}

namespace {

bool int_option(int fd, int level, int name, int &value) {
    socklen_t len = sizeof(value);
    value = 0;
    return getsockopt(fd, level, name, &value, &len) == 0;
}

}  // namespace

int adoptable_socket(int fd, int &family, bool &listening, bool reset_parked) {
    int type, protocol, repair;
    if (!int_option(fd, SOL_SOCKET, SO_TYPE, type) || type != SOCK_STREAM ||
        !int_option(fd, SOL_SOCKET, SO_PROTOCOL, protocol) || protocol != IPPROTO_TCP ||
        !int_option(fd, SOL_SOCKET, SO_DOMAIN, family) || (family != AF_INET && family != AF_INET6))
        return -EOPNOTSUPP;
    tcp_info info{};
    socklen_t info_len = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &info_len) != 0 ||
        (info.tcpi_state != TCP_ESTABLISHED && info.tcpi_state != TCP_CLOSE_WAIT &&
         info.tcpi_state != TCP_LISTEN && !(reset_parked && info.tcpi_state == TCP_CLOSE)))
        return -EOPNOTSUPP;
    listening = info.tcpi_state == TCP_LISTEN;
    char ulp[16] = {};
    socklen_t ulp_len = sizeof(ulp);
    if (getsockopt(fd, IPPROTO_TCP, TCP_ULP, ulp, &ulp_len) != 0 || (ulp_len > 0 && ulp[0] != 0))
        return -EOPNOTSUPP;
    if (int_option(fd, IPPROTO_TCP, TCP_REPAIR, repair) && repair != 0) return -EOPNOTSUPP;
    return 0;
}

int ParkedBytes::park(int fd, uid_t uid, std::vector<uint8_t> bytes, uint64_t now, int error) {
    uint64_t cookie;
    if (!socket_cookie(fd, cookie)) return -ENOTSOCK;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = entries_.find(cookie);
    // The same socket, parked before and not claimed: the new bytes were received later.
    const uid_t owner = found != entries_.end() ? found->second.uid : uid;
    if (const int rc = quotas().charge(owner, 0, bytes.size()); rc != 0) return rc;
    if (found != entries_.end()) {
        Entry &entry = found->second;
        entry.bytes.insert(entry.bytes.end(), bytes.begin(), bytes.end());
        entry.parked_ns = now;
        if (error != 0) entry.error = error;
        return 0;
    }
    entries_.emplace(cookie, Entry{uid, now, std::move(bytes), error});
    return 0;
}

std::vector<uint8_t> ParkedBytes::claim(int fd, int *error) {
    if (error) *error = 0;
    uint64_t cookie;
    if (!socket_cookie(fd, cookie)) return {};
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = entries_.find(cookie);
    if (found == entries_.end()) return {};
    if (error) *error = found->second.error;
    std::vector<uint8_t> bytes = std::move(found->second.bytes);
    quotas().release(found->second.uid, 0, bytes.size());
    entries_.erase(found);
    return bytes;
}

bool ParkedBytes::holds(int fd) const {
    uint64_t cookie;
    if (!socket_cookie(fd, cookie)) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.count(cookie) > 0;
}

uint64_t ParkedBytes::bytes_for(int fd) const {
    uint64_t cookie;
    if (!socket_cookie(fd, cookie)) return 0;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(cookie);
    return it == entries_.end() ? 0 : it->second.bytes.size();
}

int ParkedBytes::error_for(int fd) const {
    uint64_t cookie;
    if (!socket_cookie(fd, cookie)) return 0;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(cookie);
    return it == entries_.end() ? 0 : it->second.error;
}

size_t ParkedBytes::expire(uint64_t now, uint64_t &bytes) {
    bytes = 0;
    size_t count = 0;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
        if (now - it->second.parked_ns < kParkedLifetimeNs) {
            ++it;
            continue;
        }
        bytes += it->second.bytes.size();
        ++count;
        quotas().release(it->second.uid, 0, it->second.bytes.size());
        it = entries_.erase(it);
    }
    return count;
}

size_t ParkedBytes::entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
}

int ParkedConnections::park(uint64_t cookie, int fd, uid_t uid, uint64_t now) {
    if (const int rc = quotas().charge(uid, 1, 0); rc != 0) return rc;
    std::lock_guard<std::mutex> lock(mutex_);
    entries_[cookie].push_back(Entry{uid, now, fd});
    ++count_;
    return 0;
}

std::vector<int> ParkedConnections::claim(uint64_t cookie) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = entries_.find(cookie);
    if (found == entries_.end()) return {};
    std::vector<int> fds;
    for (const Entry &entry : found->second) {
        quotas().release(entry.uid, 1, 0);
        fds.push_back(entry.fd);
    }
    count_ -= found->second.size();
    entries_.erase(found);
    return fds;
}

size_t ParkedConnections::expire(uint64_t now) {
    size_t expired = 0;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
        std::vector<Entry> &list = it->second;
        // Parked in order, so the old ones lead.
        size_t n = 0;
        while (n < list.size() && now - list[n].parked_ns >= kParkedLifetimeNs) {
            reset_parked_connection(list[n].fd);
            quotas().release(list[n].uid, 1, 0);
            ++n;
        }
        list.erase(list.begin(), list.begin() + static_cast<std::ptrdiff_t>(n));
        expired += n;
        count_ -= n;
        it = list.empty() ? entries_.erase(it) : std::next(it);
    }
    return expired;
}

size_t ParkedConnections::entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return count_;
}

void reset_parked_connection(int fd) {
    parked_bytes().claim(fd);
    const linger abortive{1, 0};  // close() sends RST
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
    close(fd);
}

ParkedConnections &parked_connections() {
    static ParkedConnections store;
    return store;
}

ParkedBytes &parked_bytes() {
    static ParkedBytes store;
    return store;
}

}  // namespace tcps::engine
