// tcpsd's command line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tcps::engine {

// --send-zc: kAuto sends large ring sends zero-copy until the kernel reports that it copied
// them anyway for that socket (loopback, a device without scatter-gather), then copies;
// kAlways never stops (for tests: the zero-copy path on loopback); kOff never starts.
enum class SendZeroCopy { kOff, kAuto, kAlways };

struct Options {
    std::string socket_path;  // empty: ipc::engine_socket_path()
    std::vector<int> cores;   // one worker per entry, pinned; empty: one unpinned worker
    int spin_us = 50;
    // Seed 003's handoff: from this percentage of busy time a worker counts as saturated, and
    // the connections it accepts then stay with the kernel in the application. -1: never.
    int handoff_load = -1;
    // For tests: a saturated worker asks each connection back as soon as it connects.
    bool ask_back_at_once = false;
    // Large sends out of the tx rings with io_uring's SEND_ZC (issue 11, item 4).
    SendZeroCopy send_zc = SendZeroCopy::kAuto;
    // Seed 001's H4: with N > 0, only the workers needed take new connections, between N and
    // the number of --cores (Elasticity); 0: every worker always does.
    int min_workers = 0;
    // Its watermarks in percent of busy time (Elasticity): 0 < low < high <= 100.
    int elastic_high = 75;
    int elastic_low = 35;
    bool busy_poll = false;
    int ready_fd = -1;
    bool verbose = false;
    bool help = false;
    // Serve clients on other hosts (tcps-relay): relays connect here (HOST:PORT, [V6]:PORT).
    std::string fabric_listen;
    // The address the workers' fabric endpoints open on; empty: the --fabric-listen host.
    std::string fabric_node;
    // What the engine may spend on its clients (quota.hpp); 0: its descriptor limit, and half
    // of the machine's memory.
    uint64_t max_fds = 0;
    uint64_t max_memory_mb = 0;
};

// Parses "1", "0,1", "2-3", "0,2-3": CPU numbers in order, no duplicates. False if malformed.
bool parse_core_list(const std::string &text, std::vector<int> &cores);

// Parses argv into `options`. On a usage error returns false with a message in `error`.
bool parse_options(int argc, char **argv, Options &options, std::string &error);

const char *usage_text();

}  // namespace tcps::engine
