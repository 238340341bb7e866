// Received bytes that wait for a socket's next owner (issue 11, item 3).
//
// When the application passes an offloaded socket on with SCM_RIGHTS, the engine gives the
// kernel socket back (kHandoff), but the bytes it had already received and the application had
// not read cannot go back into the kernel socket. They are parked here, keyed by the socket's
// identity (its sockfs inode), for whoever receives the socket: a receiver that runs with tcps
// offers the socket to the engine (kAdoptSocket), which serves these bytes before any the
// kernel socket holds, so the stream arrives whole. Each entry keeps a descriptor of the
// socket, so its inode cannot be reused while the bytes wait. Bytes nobody claims within
// kParkedLifetimeNs (the receiver runs without tcps) are dropped and said in the log.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace tcps::engine {

inline constexpr uint64_t kParkedLifetimeNs = 60'000'000'000;

// A socket's identity while some descriptor keeps it open.
struct SocketIdentity {
    dev_t dev = 0;
    ino_t ino = 0;
    bool operator<(const SocketIdentity &other) const {
        return dev != other.dev ? dev < other.dev : ino < other.ino;
    }
};
// fstat() of a socket: false if `fd` is not one (call it on sockets only: fstat() of a file on
// a FUSE mount, say, could wait for its server).
bool socket_identity(int fd, SocketIdentity &out);

// Whether the engine can serve the kernel socket `fd` a client offers (kAdoptSocket): a TCP
// socket of AF_INET or AF_INET6 (its family in `family`), connected (ESTABLISHED, or
// CLOSE_WAIT: the peer's FIN is the last thing it holds), with no upper layer protocol (kTLS)
// and not in repair mode. 0 or -EOPNOTSUPP. Looks with getsockopt() first, which answers
// ENOTSOCK for any other file without touching it.
int adoptable_socket(int fd, int &family);

class ParkedBytes {
  public:
    ~ParkedBytes();
    // Parks `bytes` for the socket `fd` refers to, taking `fd` (closed when the entry goes) and
    // charging the entry to `uid` (quotas()). Bytes parked again for a socket whose earlier
    // ones wait still come after them. 0, or -errno (then `fd` is closed and nothing kept).
    int park(int fd, uid_t uid, std::vector<uint8_t> bytes, uint64_t now);
    // The bytes parked for the socket `fd` refers to, which leave the store (none: empty).
    std::vector<uint8_t> claim(int fd);
    // Whether bytes are parked for it.
    bool holds(int fd) const;
    // Drops the entries parked before now - kParkedLifetimeNs. Returns how many, and their
    // bytes in `bytes`.
    size_t expire(uint64_t now, uint64_t &bytes);
    size_t entries() const;

  private:
    struct Entry {
        int fd = -1;
        uid_t uid = 0;
        uint64_t parked_ns = 0;
        std::vector<uint8_t> bytes;
    };
    void drop(Entry &entry);

    mutable std::mutex mutex_;
    std::map<SocketIdentity, Entry> entries_;
};

// The engine's one store (workers park and claim; the main thread expires).
ParkedBytes &parked_bytes();

}  // namespace tcps::engine
