#include "readiness.hpp"

#include "layout.hpp"

namespace tcps::shim {

uint32_t poll_mask(const SocketSnapshot &s) {
    constexpr uint32_t kIn = POLLIN | POLLRDNORM;
    constexpr uint32_t kOut = POLLOUT | POLLWRNORM;
    // inet_csk_listen_poll(): only "a connection is waiting". Without an engine none ever
    // will: the listener is readable once, for the accept() that reports the end
    // (ECONNABORTED), and quiet after, rather than wake its server in a loop.
    if (s.listening) {
        if (s.dead) return s.end_unreported ? kIn : 0;
        return s.accept_available > 0 ? kIn : 0;
    }
    // No engine: wake everyone else, so each call finds out (ECONNRESET/EPIPE) and closes.
    if (s.dead) return kIn | kOut | POLLHUP | POLLERR | POLLRDHUP;

    uint32_t flags = s.flags;
    if (s.disconnected)
        flags &= ~(ipc::kFlagReset | ipc::kFlagRxEof | ipc::kFlagRxShut | ipc::kFlagTxShut);
    // The engine records an error only when the connection dies (record_error() sets Reset
    // with it), but publishes so_error before the flag: a pending error already means reset.
    const bool reset = (flags & ipc::kFlagReset) || s.error_pending;
    const bool connected = (flags & ipc::kFlagConnected) && !reset;
    const bool connecting =
        !connected && !reset && ((flags & ipc::kFlagConnecting) || s.connect_started);
    const bool rx_shut = (flags & (ipc::kFlagRxEof | ipc::kFlagRxShut)) || reset || s.shut_rd;
    const bool tx_shut = (flags & ipc::kFlagTxShut) || reset || s.shut_wr;
    const bool closed = reset || (!connected && !connecting);  // TCP_CLOSE

    uint32_t mask = 0;
    if ((rx_shut && tx_shut) || closed) mask |= POLLHUP;
    if (rx_shut) mask |= kIn | POLLRDHUP;
    if (!connecting) {  // SYN_SENT reports nothing but errors
        // tcp_stream_is_readable(): SO_RCVLOWAT bytes (at least one) are there.
        if (s.rx_available > 0 && s.rx_available >= s.rcvlowat) mask |= kIn;
        if (s.rx_available == 0 && (s.past_mark_readable || s.direct_readable)) mask |= kIn;
        // Writable while there is room; after SHUT_WR too, so a writer finds EPIPE.
        if (tx_shut || s.tx_room > 0) mask |= kOut;
        if (s.urgent) mask |= POLLPRI;  // tp->urg_data & TCP_URG_VALID
    }
    if (s.error_pending || s.error_deferred) mask |= POLLERR;
    return mask;
}

}  // namespace tcps::shim
