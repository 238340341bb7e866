// stderr logging: one line per event, "tcpsd: " first, written with one write(2) so lines
// from different threads never interleave.
#pragma once

namespace tcps::engine {

void set_verbose(bool verbose);
// The name lines start with (default "tcpsd"); set once, before any thread logs.
void set_log_program(const char *name);
bool verbose();

void log_line(const char *format, ...) __attribute__((format(printf, 1, 2)));

// Only with --verbose.
#define TCPS_LOG_VERBOSE(...)                                                 \
    do {                                                                      \
        if (::tcps::engine::verbose()) ::tcps::engine::log_line(__VA_ARGS__); \
    } while (0)

}  // namespace tcps::engine
