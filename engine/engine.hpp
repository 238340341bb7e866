// The engine's main thread: the control socket, each client's hello and region, the hand-off
// of sessions to workers, signals and shutdown.
#pragma once

#include "options.hpp"

namespace tcps::engine {

// Runs tcpsd until SIGTERM/SIGINT. Returns the process exit status.
int run_engine(const Options &options);

}  // namespace tcps::engine
