#include "reuseport.hpp"

namespace tcps::engine {

bool ReuseportRegistry::conflicts(const BoundAddress &address, uid_t uid) const {
    for (const Entry &entry : entries_)
        if (entry.uid != uid && bound_addresses_overlap(entry.address, address)) return true;
    return false;
}

uint64_t ReuseportRegistry::add(const BoundAddress &address, uid_t uid) {
    const uint64_t token = next_token_++;
    entries_.push_back({token, address, uid});
    return token;
}

void ReuseportRegistry::remove(uint64_t token) {
    if (token == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < entries_.size(); ++i) {
        if (entries_[i].token == token) {
            entries_[i] = entries_.back();
            entries_.pop_back();
            return;
        }
    }
}

ReuseportRegistry &reuseport_registry() {
    static ReuseportRegistry registry;
    return registry;
}

}  // namespace tcps::engine
