// Acting as the client: what the engine does on a client's behalf must look, to the kernel and
// to the rest of the system, as if the client had done it. Sockets are owned by the process
// that asked for them (its uid and gid: ss, /proc/net/tcp, nft's meta skuid/skgid, the
// kernel's SO_REUSEPORT check and uid routing all see them) and live in its network namespace;
// binds are judged with that namespace's ip_unprivileged_port_start and with the capabilities
// the client has there.
#pragma once

#include <sys/types.h>

#include <cstdint>

namespace tcps::engine {

// Creates a non-blocking TCP socket of `family` owned by `uid`/`gid` (the calling thread's
// fsuid/fsgid for the call) in the network namespace of process `pid`. The fd, or -errno.
// Changes only this thread's credentials and namespace, and puts both back.
int create_socket_as(int family, uid_t uid, gid_t gid, pid_t pid);

// The same for a socket like `fd`: its owner, its network namespace. The fd, or -errno.
int create_socket_like(int fd, int family);

// The ip_unprivileged_port_start of the network namespace socket `fd` lives in, read now.
int unprivileged_port_start_of(int fd);

// Whether capabilities process `pid` holds in its own user namespace count in the network
// namespace of socket `fd`: that namespace belongs to the process's user namespace or to one
// of its descendants (Linux's ns_capable()). A process in a container has no capability in
// the host's namespaces, whatever its CapEff says.
bool caps_count_in_netns_of(int fd, pid_t pid);

}  // namespace tcps::engine
