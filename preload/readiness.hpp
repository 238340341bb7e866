// Readiness of an offloaded socket, computed from what the engine published in its slot and
// what the client knows privately, with the exact rules of Linux's tcp_poll(). Pure functions
// of a snapshot, so they are tested without an engine (tests/shim).
#pragma once

#include <poll.h>

#include <cstdint>

#include "layout.hpp"

namespace tcps::shim {

struct SocketSnapshot {
    uint32_t flags = 0;                  // SocketSlot::flags (ipc::kFlag*)
    uint32_t tx_room = ipc::kRingBytes;  // what the tx ring can take now (ipc::tx_ring_room)
    uint32_t rx_available = 0;           // rx_tail - rx_head
    uint32_t rcvlowat = 1;               // SO_RCVLOWAT: readable from this many bytes on
    uint32_t accept_available = 0;       // acc_tail - the client's acc_head
    bool error_pending = false;          // so_error set in a generation not yet reported
    bool error_deferred = false;         // Socket::deferred_error (no reset: only POLLERR)
    bool urgent = false;                 // urgent data is there (the kernel socket's POLLPRI)
    bool past_mark_readable = false;     // the engine stopped at the urgent mark, bytes past it
    bool direct_readable = false;        // direct mode (kFlagRxDirect), bytes in the kernel socket
    bool listening = false;              // listen() succeeded and no shutdown(SHUT_RD) since
    bool connect_started = false;        // connect() was called and its outcome not yet reported
    // Linux disconnected the socket (tcp_disconnect()): after connect() reported a failed
    // attempt, or shutdown(SHUT_RD) of a listener or of a connecting socket. The engine's
    // Reset/RxEof/RxShut/TxShut flags from before no longer count.
    bool disconnected = false;
    bool shut_rd = false;  // the application called shutdown(SHUT_RD/SHUT_RDWR)
    bool shut_wr = false;  // the application called shutdown(SHUT_WR/SHUT_RDWR)
    bool dead = false;     // the engine session is gone
    // A listener's accept() has not yet reported the engine's end (it does so once).
    bool end_unreported = false;
};

// POLL* bits (identical to the EPOLL* values on Linux), including POLLRDNORM/POLLWRNORM and
// POLLRDHUP; the caller masks them with what it asked for.
uint32_t poll_mask(const SocketSnapshot &snapshot);

// Which bits a caller gets for `requested` events: POLLERR and POLLHUP always, as the kernel does.
inline uint32_t reported_events(uint32_t mask, uint32_t requested) {
    return mask & (requested | POLLERR | POLLHUP);
}

// select()'s view of a poll mask (Linux fs/select.c POLLIN_SET/POLLOUT_SET/POLLEX_SET).
inline bool select_readable(uint32_t revents) {
    return revents & (POLLRDNORM | POLLRDBAND | POLLIN | POLLHUP | POLLERR);
}
inline bool select_writable(uint32_t revents) {
    return revents & (POLLWRBAND | POLLWRNORM | POLLOUT | POLLERR);
}
inline bool select_exceptional(uint32_t revents) {
    return revents & POLLPRI;
}

}  // namespace tcps::shim
