// tcpsd: the tcps engine. Owns the kernel TCP sockets of every offloaded program and drives
// them with io_uring from pinned worker threads.
#include <cstdio>
#include <string>

#include "engine.hpp"
#include "log.hpp"
#include "options.hpp"

int main(int argc, char **argv) {
    tcps::engine::Options options;
    std::string error;
    if (!tcps::engine::parse_options(argc, argv, options, error)) {
        std::fprintf(stderr, "tcpsd: %s\n%s", error.c_str(), tcps::engine::usage_text());
        return 2;
    }
    if (options.help) {
        std::fputs(tcps::engine::usage_text(), stdout);
        return 0;
    }
    tcps::engine::set_verbose(options.verbose);
    return tcps::engine::run_engine(options);
}
