// The control socket's listening side, shared by tcpsd and tcps-relay (which answers clients
// exactly as tcpsd does): create its directory, take over a dead engine's socket file, refuse
// to replace a live one.
#pragma once

#include <sys/types.h>

#include <string>

namespace tcps::engine {

enum class ListenResult { kOk, kFailed, kBusy };

// Binds and listens (non-blocking, close-on-exec, mode 0666) on `path`. `inode` identifies
// the socket file, so that only our own is removed at exit. kBusy: a live engine serves it.
ListenResult open_control_socket(const std::string &path, int &listener, ino_t &inode,
                                 std::string &error);

}  // namespace tcps::engine
