// tcps-relay: the client host's end of the cross-host path (relay.hpp). The shim talks to it
// as to a local tcpsd; it mirrors each client's region to a tcpsd --fabric-listen elsewhere.
#include <cstdio>
#include <string>

#include "log.hpp"
#include "relay.hpp"

int main(int argc, char **argv) {
    tcps::engine::RelayOptions options;
    std::string error;
    if (!tcps::engine::parse_relay_options(argc, argv, options, error)) {
        std::fprintf(stderr, "tcps-relay: %s\n%s", error.c_str(), tcps::engine::relay_usage_text());
        return 2;
    }
    if (options.help) {
        std::fputs(tcps::engine::relay_usage_text(), stdout);
        return 0;
    }
    tcps::engine::set_log_program("tcps-relay");
    tcps::engine::set_verbose(options.verbose);
    return tcps::engine::run_relay(options);
}
