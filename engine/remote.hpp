// Remote sessions: a client on another host, behind tcps-relay, served by this engine (started
// with --fabric-listen). The session has a region of its own here, a copy of the client's,
// which the worker serves with its normal code; the fabric (ipc/fabric.hpp) carries what each
// side writes into the other's copy, and link.hpp says how.
//
//  * Relay -> engine: for each slot the client rings, its tx ring bytes, its request and its
//    indices, tagged with the slot. The worker calls process_slot() on the tag: the tag is the
//    doorbell.
//  * Engine -> relay: after each batch, for each slot the worker changed (Session::changed),
//    the rx ring bytes that landed, the accept ring entries, the response, the addresses and
//    line 1, tagged with the slot; the relay wakes the client's waiters. Accepted connections
//    go before the listeners whose accept rings name them.
//  * The TCP connection of the setup stays open: its EOF is the relay's end.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fabric.hpp"
#include "layout.hpp"
#include "link.hpp"
#include "mirror.hpp"

namespace tcps::engine {

struct Session;

// What the client's copy of one slot holds of what the engine wrote, as far as we published it.
struct PublishedSlot {
    uint32_t rx_tail = 0;
    uint32_t acc_tail = 0;
    uint32_t resp_seq = 0;
    uint32_t state = 0;  // ipc::SlotState
    // init_slot() reset the slot's client-side words: publish them before anything else.
    bool init_pending = false;
    ipc::SockAddrRecord addresses[2] = {};  // local, peer
};

struct RemoteLink {
    int link_fd = -1;             // the setup connection, kept for its EOF
    ipc::FabricBootstrap peer{};  // the relay's copy, until the worker attaches the region
    bool attached = false;        // our copy is registered with the worker's endpoint
    uint32_t region = 0;          // its index there
    bool link_posted = false;
    bool peer_gone = false;            // the relay closed the link or the fabric failed
    bool releasing = false;            // ended: waiting for our publishes to complete
    uint64_t release_deadline_ns = 0;  // then give up waiting (the peer stopped answering)
    RegionPublisher publisher;
    std::unique_ptr<PublishedSlot[]> slots{new PublishedSlot[kRemoteSlots]};

    RemoteLink() = default;
    RemoteLink(const RemoteLink &) = delete;
    RemoteLink &operator=(const RemoteLink &) = delete;
    ~RemoteLink() {
        if (link_fd >= 0) close(link_fd);
    }
};

// The engine's main thread: the --fabric-listen socket and the relays' hellos on it.
class LinkAcceptor {
  public:
    LinkAcceptor() = default;
    ~LinkAcceptor();
    LinkAcceptor(const LinkAcceptor &) = delete;
    LinkAcceptor &operator=(const LinkAcceptor &) = delete;

    // Listens on `address` (HOST:PORT or [V6]:PORT). Empty string or the error.
    std::string open(const std::string &address);
    bool is_open() const { return listener_ >= 0; }

    // Adds the listener and the connections waiting for their hello to `fds`.
    void add_pollfds(std::vector<pollfd> &fds) const;
    // Handles the revents of what add_pollfds() added (starting at `fds`), and deadlines.
    // Calls `ready` with each connection whose hello is complete and valid, which it then owns.
    void on_poll(const pollfd *fds, uint64_t now_ns,
                 const std::function<void(int fd, const LinkHello &hello)> &ready);
    uint64_t next_deadline_ns() const;

  private:
    struct Pending {
        int fd = -1;
        uint64_t deadline_ns = 0;
        size_t received = 0;
        LinkHello hello{};
    };
    void accept_links(uint64_t now_ns);
    // False when the connection is finished with (handed on or dropped).
    bool read_hello(Pending &pending,
                    const std::function<void(int fd, const LinkHello &hello)> &ready);

    int listener_ = -1;
    std::vector<Pending> pending_;
};

// A session for the relay on `fd` (its hello checked): the region created, the link recorded.
// Null and the error (answered on fd, which is then closed) if the region cannot be made.
std::unique_ptr<Session> make_remote_session(int fd, const LinkHello &hello, uint32_t id);

// Answers a relay's hello with an error (before a session exists).
void reply_link_error(int fd, int error, uint32_t session_id);

}  // namespace tcps::engine
