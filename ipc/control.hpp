// The control socket: how a client process finds the engine and receives its region.
//
// AF_UNIX SOCK_SEQPACKET (message boundaries, SO_PEERCRED, SCM_RIGHTS). Used only to set a
// session up, to let a forked child join its parent's session, to register a sleeping thread's
// pipe, and (by its EOF) to tell either side that the other has gone. Every member process of a
// session has its own connection, so SO_PEERCRED names it and a reply reaches the process that
// asked. Nothing on the data path touches it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tcps::ipc {

enum class ControlType : uint32_t {
    kHello = 1,       // client -> engine: {version}
    kHelloReply = 2,  // engine -> client: {result, session_id} + fds [region memfd, doorbell]
    // client -> engine: {} + fds [pipe write end]
    kRegisterWaiter = 3,
    // engine -> client: {result, arg = the waiter index the engine gave the pipe}
    kWaiterReply = 4,
    // A live member about to fork: reserve a member record for the child.
    kReserveMember = 5,  // client -> engine: {}
    kReserveReply = 6,   // engine -> client: {result, arg = member index}
    // The first message on a forked child's own connection, instead of kHello:
    // {version, session_id, arg = reserved member index, token = the region's family_token}.
    kJoin = 7,
    kJoinReply = 8,  // engine -> client: {result}
    // After exec: the member's waiters died with its old image; free them. No reply.
    kReleaseWaiters = 9,
    // Hand a socket back to the kernel (the application passes it over SCM_RIGHTS): the
    // engine stops receiving and accepting on slot `arg`, sends what its tx ring holds, and
    // answers with a descriptor of its kernel socket. The slot stays open until closed. With
    // kHandoffPark in `reserved`, the bytes received and not read are parked for the socket's
    // next owner (engine/parked.hpp), who claims them with kAdoptSocket. With kHandoffShed
    // (the engine asked, kFlagShed), only if nothing can be lost: both rings empty, nothing
    // parked or peeked; else -EAGAIN, and the engine goes on serving the socket. With
    // kHandoffPark | kHandoffErrorPending, the reset the engine saw was not reported to the
    // application yet: it is parked too, for the next owner's first call (the kernel socket
    // no longer has it: the engine's receive took it).
    kHandoff = 10,  // client -> engine: {arg = slot, reserved = kHandoffPark/kHandoffShed bits}
    // engine -> client: {result, arg = bytes received but not read, reserved = connections
    // accepted but not taken: both were lost to the kernel socket, token = bytes parked} +
    // fds [the kernel socket]
    kHandoffReply = 11,
    // A new TCP socket (a local session's socket()): {arg = family} with SCM_CREDENTIALS
    // naming the caller's pid, effective uid and gid, which the kernel vouches for. The engine
    // creates the kernel socket with those ids as its owner (fsuid/fsgid) in the caller's
    // network namespace, as the caller's own socket() would have, and picks the slot.
    kNewSocket = 12,
    // engine -> client: {result, arg = slot}; the slot is kOpen, its rings empty, its chunk
    // active. result -ENFILE/-ENOBUFS: the caller's uid has used its share of the engine.
    kNewSocketReply = 13,
    // MemNet's register_mem (layout.hpp, DirectDescriptor): {token = length} + fds [a memfd of at
    // least that many bytes, which the client maps shared over the registered buffer]. The engine
    // maps it too and answers {result, arg = the registration's id}; -ENOMEM past the family's
    // registrations (kMaxMemRegistrations) or the uid's share of the engine's memory.
    kRegisterMem = 14,
    kRegisterMemReply = 15,
    // {arg = id}: the engine unmaps it once no send or receive uses it. Answer {result}.
    kDeregisterMem = 16,
    kDeregisterMemReply = 17,
    // Offload a kernel TCP socket this process holds (one it received with SCM_RIGHTS):
    // {} + fds [the socket], with SCM_CREDENTIALS as kNewSocket. The engine takes a connected
    // one (ESTABLISHED or CLOSE_WAIT, no ULP) into a slot it picks, serves first any bytes
    // parked for it (kHandoffPark), and answers {result, arg = slot, token = parked bytes}.
    // -EOPNOTSUPP: not a socket it takes; -EBUSY: the engine is saturated (--handoff-load) and
    // nothing is parked for it. On any error the socket stays the caller's, untouched.
    // With kAdoptOnDemand in `reserved`, a listener the process inherited from outside the
    // shim (socket activation: systemd, a supervisor): others may accept from it too, so the
    // engine accepts nothing ahead; it watches it, and the client accepts with the kernel's
    // accept4() on it (ipc::kFlagAcceptOnDemand, as from a twin).
    kAdoptSocket = 18,
    kAdoptSocketReply = 19,
};
inline constexpr uint32_t kHandoffPark = 1;
inline constexpr uint32_t kHandoffShed = 2;
// kHandoff of a listener with a twin (ipc::kFlagTwinReady): the socket stays offloaded; the
// answer's descriptor is the twin, for this process to accept from.
inline constexpr uint32_t kHandoffTwin = 4;
inline constexpr uint32_t kHandoffErrorPending = 8;
inline constexpr uint32_t kAdoptOnDemand = 1;
inline constexpr uint32_t kMaxMemRegistrations = 1024;  // per family

struct ControlMessage {
    uint32_t type;  // ControlType
    uint32_t version;
    int32_t arg;
    int32_t result;  // 0 or -errno
    uint32_t session_id;
    uint32_t reserved;
    uint64_t token;  // kJoin
};
static_assert(sizeof(ControlMessage) == 32, "control messages are 32 bytes");

inline constexpr int kMaxControlFds = 2;

// Environment variable naming the engine's control socket (both sides).
inline constexpr const char *kEngineSocketEnv = "TCPS_ENGINE_SOCKET";

// The default control socket path: /run/tcps/engine.sock for root, else
// $XDG_RUNTIME_DIR/tcps/engine.sock, else /tmp/tcps-<uid>/engine.sock.
std::string default_engine_socket_path();

// The path to use: $TCPS_ENGINE_SOCKET if set and non-empty, else the default.
std::string engine_socket_path();

// Whether this process may trust the engine it reached on the connected control socket `sock`
// at `path` with its traffic: the process listening there runs as root or as our effective
// uid (SO_PEERCRED), and nobody else could have put it there: the socket file and its
// directory belong to root or to us, and the directory is writable by nobody else (unless it
// is sticky, as /tmp is, where only the owner may remove or replace the file). Returns 0, or
// -EPERM with `why` (at least 128 bytes) saying what failed. Allocates nothing.
int check_engine_identity(int sock, const char *path, char *why, size_t why_size);

// Sends one message with up to kMaxControlFds descriptors, and with `with_creds` this
// process's pid, effective uid and effective gid as SCM_CREDENTIALS (the kernel refuses ids
// the sender does not have). Returns 0 or -errno. These call the kernel directly (the shim
// must not intercept its own control traffic).
int send_control(int sock, const ControlMessage &msg, const int *fds, int nfds,
                 bool with_creds = false);

// The sender's identity as the kernel delivered it (SO_PASSCRED on the receiving socket).
struct ControlCreds {
    bool present = false;
    int32_t pid = 0;
    uint32_t uid = 0;
    uint32_t gid = 0;
};

// Receives one message and up to kMaxControlFds descriptors (set to -1 if absent; received
// descriptors are close-on-exec), and the sender's credentials if `creds` is given. Returns 0,
// -errno, or -ECONNRESET on EOF. A message of the wrong size, or carrying more descriptors
// than asked for, is -EPROTO (extra fds are closed).
int recv_control(int sock, ControlMessage &msg, int *fds, int max_fds, int flags = 0,
                 ControlCreds *creds = nullptr);

}  // namespace tcps::ipc
