// A statically linked program (it ignores LD_PRELOAD): writes "static:ready\n", then reads one
// line from stdin and writes "static:" and that line to stdout. e2e.cpp execs it on an
// inherited offloaded socket, which the shim hands back to the kernel before the exec.
#include <unistd.h>

#include <cstring>

namespace {

bool write_all(const char *data, size_t length) {
    return write(1, data, length) == static_cast<ssize_t>(length);
}

}  // namespace

int main() {
    if (!write_all("static:ready\n", 13)) return 2;
    char line[256];
    size_t used = 0;
    while (used < sizeof(line) - 1) {
        const ssize_t n = read(0, line + used, 1);
        if (n <= 0) return 1;
        used += static_cast<size_t>(n);
        if (line[used - 1] == '\n') break;
    }
    if (!write_all("static:", 7) || !write_all(line, used)) return 2;
    return 0;
}
