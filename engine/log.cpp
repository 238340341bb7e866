#include "log.hpp"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdio>

namespace tcps::engine {

static std::atomic<bool> g_verbose{false};
static const char *g_program = "tcpsd";

void set_log_program(const char *name) {
    g_program = name;
}

void set_verbose(bool value) {
    g_verbose.store(value, std::memory_order_relaxed);
}
bool verbose() {
    return g_verbose.load(std::memory_order_relaxed);
}

void log_line(const char *format, ...) {
    const int saved_errno = errno;
    char line[512];
    int n = std::snprintf(line, sizeof(line), "%s: ", g_program);
    va_list args;
    va_start(args, format);
    const int body = std::vsnprintf(line + n, sizeof(line) - n - 1, format, args);
    va_end(args);
    if (body > 0) n += body;
    if (n > static_cast<int>(sizeof(line)) - 2) n = sizeof(line) - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, n);
    (void)ignored;
    errno = saved_errno;
}

}  // namespace tcps::engine
