// Received bytes that wait for a socket's next owner (issue 11, item 3).
//
// When the application passes an offloaded socket on with SCM_RIGHTS, the engine gives the
// kernel socket back (kHandoff), but the bytes it had already received and the application had
// not read cannot go back into the kernel socket. They are parked here, keyed by the socket's
// cookie (SO_COOKIE: the kernel never gives two sockets the same one), for whoever receives the
// socket: a receiver that runs with tcps offers the socket to the engine (kAdoptSocket), which
// serves these bytes before any the kernel socket holds, so the stream arrives whole. The
// entry holds no reference to the socket: a receiver that closes it unused closes the
// connection at once, as on Linux. Bytes nobody claims within kParkedLifetimeNs (the receiver
// runs without tcps, or closed it) are dropped and said in the log.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace tcps::engine {

inline constexpr uint64_t kParkedLifetimeNs = 60'000'000'000;

// A socket's cookie (SO_COOKIE), unique for the kernel's lifetime: false if `fd` is not a
// socket.
bool socket_cookie(int fd, uint64_t &cookie);

// Whether the engine can serve the kernel socket `fd` a client offers (kAdoptSocket): a TCP
// socket of AF_INET or AF_INET6 (its family in `family`), connected (ESTABLISHED, or
// CLOSE_WAIT: the peer's FIN is the last thing it holds; CLOSE too with `reset_parked`, a
// reset parked for it) or listening (`listening` says which), with no upper layer protocol
// (kTLS) and not in repair mode. 0 or -EOPNOTSUPP. Looks with getsockopt() first, which
// answers ENOTSOCK for any other file without touching it.
int adoptable_socket(int fd, int &family, bool &listening, bool reset_parked = false);

class ParkedBytes {
  public:
    // Parks `bytes` for the socket `fd` refers to, charged to `uid` (quotas()), and `error`
    // if not 0: a reset the engine took from the kernel socket and its application had not
    // reported yet, reported after the bytes. Bytes parked again for a socket whose earlier
    // ones wait still come after them. 0, or -errno (then nothing is kept).
    int park(int fd, uid_t uid, std::vector<uint8_t> bytes, uint64_t now, int error = 0);
    // The bytes parked for the socket `fd` refers to, which leave the store (none: empty),
    // and the error parked with them in `error` (0: none).
    std::vector<uint8_t> claim(int fd, int *error = nullptr);
    // Whether bytes or an error are parked for it; how many bytes; the error.
    bool holds(int fd) const;
    uint64_t bytes_for(int fd) const;
    int error_for(int fd) const;
    // Drops the entries parked before now - kParkedLifetimeNs. Returns how many, and their
    // bytes in `bytes`.
    size_t expire(uint64_t now, uint64_t &bytes);
    size_t entries() const;

  private:
    struct Entry {
        uid_t uid = 0;
        uint64_t parked_ns = 0;
        std::vector<uint8_t> bytes;
        int error = 0;
    };

    mutable std::mutex mutex_;
    std::map<uint64_t, Entry> entries_;  // by socket cookie
};

// The engine's one store (workers park and claim; the main thread expires).
ParkedBytes &parked_bytes();

// Connections that wait for a listener's next owner. When the application passes an offloaded
// listener on with SCM_RIGHTS, the connections the engine had accepted and the application had
// not taken cannot go back into the kernel's accept queue. They wait here, keyed by the
// listener's cookie, each with its own descriptor (nothing read from it: an untaken
// connection's first bytes were only peeked), and any bytes already received are parked for
// it in ParkedBytes. A receiver that runs with tcps offers the listener to the engine
// (kAdoptSocket), which publishes these in its accept ring before anything it accepts itself:
// what Linux's shared accept queue would have given it. Holding the listener is what Linux
// asks of accept(), and all this asks. Those nobody claims within kParkedLifetimeNs are reset,
// as Linux resets a closed listener's queue, and said in the log.
class ParkedConnections {
  public:
    // Parks connection `fd` (ours from now on) for the listener whose cookie is `cookie`,
    // charged to `uid` (one descriptor). 0, or -errno (then `fd` is still the caller's).
    int park(uint64_t cookie, int fd, uid_t uid, uint64_t now);
    // The connections parked for the listener whose cookie is `cookie`, in the order they
    // were parked, which leave the store (the caller owns the descriptors).
    std::vector<int> claim(uint64_t cookie);
    // Resets and closes those parked before now - kParkedLifetimeNs: how many.
    size_t expire(uint64_t now);
    size_t entries() const;

  private:
    struct Entry {
        uid_t uid = 0;
        uint64_t parked_ns = 0;
        int fd = -1;
    };

    mutable std::mutex mutex_;
    std::map<uint64_t, std::vector<Entry>> entries_;  // by listener cookie
    size_t count_ = 0;
};

ParkedConnections &parked_connections();

// Resets and closes a parked connection nobody will serve (bytes parked for it go too), as
// Linux resets the connections of a listener's queue that nobody takes.
void reset_parked_connection(int fd);

}  // namespace tcps::engine
