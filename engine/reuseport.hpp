// Linux lets sockets share a port with SO_REUSEPORT only when they belong to the same uid. All
// of the engine's sockets have the engine's uid, so the engine keeps that rule itself, across
// all workers: a process-wide registry of the reuseport sockets each client uid has bound.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "policy.hpp"

namespace tcps::engine {

class ReuseportRegistry {
  public:
    // Held across check, bind() and add(), so two binds cannot both pass the check.
    std::mutex &mutex() { return mutex_; }

    // Whether a socket of another uid already holds an overlapping address. Caller holds mutex().
    bool conflicts(const BoundAddress &address, uid_t uid) const;

    // Records a bound reuseport socket; returns a token for remove(). Caller holds mutex().
    uint64_t add(const BoundAddress &address, uid_t uid);

    // Takes the lock itself. Token 0 is ignored.
    void remove(uint64_t token);

  private:
    struct Entry {
        uint64_t token;
        BoundAddress address;
        uid_t uid;
    };
    std::mutex mutex_;
    std::vector<Entry> entries_;
    uint64_t next_token_ = 1;
};

ReuseportRegistry &reuseport_registry();

}  // namespace tcps::engine
