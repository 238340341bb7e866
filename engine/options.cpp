#include "options.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace tcps::engine {

// Upper bound on CPU numbers and on the workers one engine runs.
static constexpr long kMaxCpu = 4095;
static constexpr size_t kMaxWorkers = 256;

static bool parse_long(const std::string &text, long min, long max, long &out) {
    if (text.empty()) return false;
    for (char c : text)
        if (c < '0' || c > '9') return false;
    errno = 0;
    char *end = nullptr;
    const long value = std::strtol(text.c_str(), &end, 10);
    if (errno != 0 || *end != '\0' || value < min || value > max) return false;
    out = value;
    return true;
}

bool parse_core_list(const std::string &text, std::vector<int> &cores) {
    std::vector<int> result;
    size_t pos = 0;
    if (text.empty()) return false;
    while (pos <= text.size()) {
        size_t comma = text.find(',', pos);
        if (comma == std::string::npos) comma = text.size();
        const std::string item = text.substr(pos, comma - pos);
        const size_t dash = item.find('-');
        long first, last;
        if (dash == std::string::npos) {
            if (!parse_long(item, 0, kMaxCpu, first)) return false;
            last = first;
        } else {
            if (!parse_long(item.substr(0, dash), 0, kMaxCpu, first) ||
                !parse_long(item.substr(dash + 1), 0, kMaxCpu, last) || last < first)
                return false;
        }
        for (long cpu = first; cpu <= last; ++cpu) {
            for (int seen : result)
                if (seen == cpu) return false;
            result.push_back(static_cast<int>(cpu));
            if (result.size() > kMaxWorkers) return false;
        }
        pos = comma + 1;
    }
    cores = std::move(result);
    return true;
}

const char *usage_text() {
    return "usage: tcpsd [--socket PATH] [--cores LIST] [--spin-us N] [--busy-poll] "
           "[--ready-fd FD] [--verbose] [--max-fds N] [--max-memory-mb N]\n"
           "             [--handoff-load PERCENT [--ask-back-at-once]]\n"
           "             [--min-workers N [--elastic-marks HIGH,LOW]]\n"
           "             [--send-zc auto|always|off]\n"
           "             [--fabric-listen ADDR:PORT [--fabric-node ADDR]]\n"
           "  --socket PATH  control socket (default: $TCPS_ENGINE_SOCKET or the per-user path)\n"
           "  --cores LIST   one worker pinned to each CPU, e.g. 1 or 0,1 or 2-3\n"
           "  --spin-us N    spin this long without work before sleeping (default 50)\n"
           "  --busy-poll    never sleep\n"
           "  --handoff-load PERCENT  a worker busy this much of the time (over 100 ms) is\n"
           "                 saturated: connections it accepts then stay with the kernel, in\n"
           "                 the application, and it asks live ones back (handed over when\n"
           "                 their rings are empty); they are offloaded again once it is busy\n"
           "                 less than PERCENT - 20 (PERCENT / 2 up to 20; default: never;\n"
           "                 0: always).\n"
           "                 Experimental: each such move costs a control round trip\n"
           "  --ask-back-at-once  (for tests) a saturated worker asks each connection it\n"
           "                 connects back at once, not an eighth of them per 100 ms\n"
           "  --send-zc auto|always|off  sends of 64 KiB and more out of a socket's ring go\n"
           "                 zero-copy (io_uring SEND_ZC); auto (default) stops on a socket\n"
           "                 once the kernel reports copying them anyway (loopback)\n"
           "  --min-workers N  elastic: new connections go to as few workers as their load\n"
           "                 needs, at least N (default: every worker, always)\n"
           "  --elastic-marks HIGH,LOW  one more worker once the active ones average HIGH%\n"
           "                 busy; one fewer once the others would average under LOW%\n"
           "                 (default 75,35)\n"
           "  --ready-fd FD  write \"ready\\n\" to FD once listening, then close it\n"
           "  --verbose      log every session\n"
           "  --max-fds N    descriptors the engine spends on its clients (default: as many as\n"
           "                 it may open); a uid other than the engine's gets at most half of\n"
           "                 what other uids leave (ENFILE past it)\n"
           "  --max-memory-mb N  memory for the clients' rings and sessions, shared the same\n"
           "                 way (ENOBUFS past it; default: half of the machine's memory)\n"
           "  --fabric-listen ADDR:PORT  also serve clients on other hosts: tcps-relay connects\n"
           "                 here ([V6]:PORT for IPv6); the session is mirrored over libfabric\n"
           "  --fabric-node ADDR  the address of the workers' fabric endpoints (default: the\n"
           "                 --fabric-listen address; needed when that is a wildcard)\n";
}

bool parse_options(int argc, char **argv, Options &options, std::string &error) {
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        std::string value;
        bool has_value = false;
        const size_t eq = arg.find('=');
        std::string name = arg;
        if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
            name = arg.substr(0, eq);
            value = arg.substr(eq + 1);
            has_value = true;
        }
        auto take_value = [&]() -> bool {
            if (has_value) return true;
            if (i + 1 >= argc) {
                error = name + " needs a value";
                return false;
            }
            value = argv[++i];
            return true;
        };
        if (name == "--socket") {
            if (!take_value()) return false;
            if (value.empty()) {
                error = "--socket needs a path";
                return false;
            }
            options.socket_path = value;
        } else if (name == "--cores") {
            if (!take_value()) return false;
            if (!parse_core_list(value, options.cores)) {
                error = "invalid core list '" + value + "'";
                return false;
            }
        } else if (name == "--handoff-load") {
            if (!take_value()) return false;
            long percent;
            if (!parse_long(value, 0, 100, percent)) {
                error = "invalid --handoff-load '" + value + "' (a percentage, 0-100)";
                return false;
            }
            options.handoff_load = static_cast<int>(percent);
        } else if (name == "--ask-back-at-once") {
            options.ask_back_at_once = true;
        } else if (name == "--send-zc") {
            if (!take_value()) return false;
            if (value == "auto") {
                options.send_zc = SendZeroCopy::kAuto;
            } else if (value == "always") {
                options.send_zc = SendZeroCopy::kAlways;
            } else if (value == "off") {
                options.send_zc = SendZeroCopy::kOff;
            } else {
                error = "invalid --send-zc '" + value + "' (auto, always or off)";
                return false;
            }
        } else if (name == "--min-workers") {
            if (!take_value()) return false;
            long count;
            if (!parse_long(value, 1, 4096, count)) {
                error = "invalid --min-workers '" + value + "' (a count of workers, 1 or more)";
                return false;
            }
            options.min_workers = static_cast<int>(count);
        } else if (name == "--elastic-marks") {
            if (!take_value()) return false;
            const size_t comma = value.find(',');
            long high = 0, low = 0;
            if (comma == std::string::npos || !parse_long(value.substr(0, comma), 1, 100, high) ||
                !parse_long(value.substr(comma + 1), 1, 100, low) || low >= high) {
                error = "invalid --elastic-marks '" + value + "' (HIGH,LOW: 0 < LOW < HIGH <= 100)";
                return false;
            }
            options.elastic_high = static_cast<int>(high);
            options.elastic_low = static_cast<int>(low);
        } else if (name == "--spin-us") {
            if (!take_value()) return false;
            long us;
            if (!parse_long(value, 0, 10'000'000, us)) {
                error = "invalid --spin-us '" + value + "'";
                return false;
            }
            options.spin_us = static_cast<int>(us);
        } else if (name == "--max-fds" || name == "--max-memory-mb") {
            if (!take_value()) return false;
            long n;
            if (!parse_long(value, 1, 1L << 40, n)) {
                error = "invalid " + name + " '" + value + "'";
                return false;
            }
            (name == "--max-fds" ? options.max_fds : options.max_memory_mb) =
                static_cast<uint64_t>(n);
        } else if (name == "--ready-fd") {
            if (!take_value()) return false;
            long fd;
            if (!parse_long(value, 0, 1 << 20, fd)) {
                error = "invalid --ready-fd '" + value + "'";
                return false;
            }
            options.ready_fd = static_cast<int>(fd);
        } else if (name == "--fabric-listen" || name == "--fabric-node") {
            if (!take_value()) return false;
            if (value.empty()) {
                error = name + " needs an address";
                return false;
            }
            (name == "--fabric-listen" ? options.fabric_listen : options.fabric_node) = value;
        } else if (name == "--busy-poll" && !has_value) {
            options.busy_poll = true;
        } else if ((name == "--help" || name == "-h") && !has_value) {
            options.help = true;
        } else if (name == "--verbose" && !has_value) {
            options.verbose = true;
        } else {
            error = "unknown argument '" + arg + "'";
            return false;
        }
    }
    if (!options.fabric_node.empty() && options.fabric_listen.empty()) {
        error = "--fabric-node needs --fabric-listen";
        return false;
    }
    return true;
}

}  // namespace tcps::engine
