// tcps-relay: the client host's end of the cross-host path. To the shim it is an engine: it
// listens on a control socket, answers hellos with a region, a doorbell eventfd and waiter
// pipes, exactly as tcpsd does, so an unmodified libtcps.so uses it. But it owns no TCP socket:
// each client's region is mirrored over the fabric (ipc/fabric.hpp) to a tcpsd started with
// --fabric-listen on another host, whose workers serve a copy of it with their normal code
// (engine/remote.hpp; link.hpp has the protocol).
//
// One thread. For each client: the doorbell (the work queue) becomes publishes of the slot's
// client-written parts, tagged with the slot; each tag from the engine wakes the client's
// threads that wait on that slot. Idle, it sleeps in poll() on the doorbells, the control
// connections and the fabric's wait fd.
//
// Not supported yet (refused, so the shim falls back as documented): fork members (kReserveMember
// and kJoin: a forked child gets a session of its own through the relay) and SCM_RIGHTS
// hand-off of an offloaded socket (kHandoff: the kernel socket is on the other host).
#pragma once

#include <string>

namespace tcps::engine {

struct RelayOptions {
    std::string socket_path;  // empty: ipc::engine_socket_path()
    std::string engine;       // the remote tcpsd's --fabric-listen address
    std::string fabric_node;  // our fabric endpoint's address; empty: the route to the engine
    int spin_us = 50;
    bool busy_poll = false;  // never sleep
    int ready_fd = -1;
    bool verbose = false;
    bool help = false;
};

bool parse_relay_options(int argc, char **argv, RelayOptions &options, std::string &error);
const char *relay_usage_text();

// Runs until SIGTERM/SIGINT. Returns the process exit status.
int run_relay(const RelayOptions &options);

}  // namespace tcps::engine
