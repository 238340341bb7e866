#include "libc.hpp"

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace tcps::shim {

LibcFunctions libc;

namespace {

std::atomic<int> g_resolved{0};  // 0 not yet, 1 all required found, -1 one missing
thread_local bool tl_resolving = false;

void say_missing(const char *name) {
    // Fatal misconfiguration: the one message the shim prints on its own.
    static const char prefix[] = "tcps: libtcps.so cannot find libc's ";
    static const char suffix[] = "; TCP offload disabled for this process\n";
    // Raw syscalls: `write` itself is one of ours and may be the one missing.
    syscall(SYS_write, 2, prefix, sizeof(prefix) - 1);
    syscall(SYS_write, 2, name, std::strlen(name));
    syscall(SYS_write, 2, suffix, sizeof(suffix) - 1);
}

}  // namespace

bool resolve_libc() {
    const int state = g_resolved.load(std::memory_order_acquire);
    if (state != 0) return state > 0;
    if (tl_resolving) return false;
    tl_resolving = true;
    bool ok = true;
    const char *missing = nullptr;
#define TCPS_LIBC(ret, name, params)                                          \
    if (!libc.name) {                                                         \
        libc.name = reinterpret_cast<ret(*) params>(dlsym(RTLD_NEXT, #name)); \
        if (!libc.name && ok) {                                               \
            ok = false;                                                       \
            missing = #name;                                                  \
        }                                                                     \
    }
#define TCPS_LIBC_OPTIONAL(ret, name, params) \
    if (!libc.name) libc.name = reinterpret_cast<ret(*) params>(dlsym(RTLD_NEXT, #name));
#include "syscalls.def"
    int expected = 0;
    if (g_resolved.compare_exchange_strong(expected, ok ? 1 : -1, std::memory_order_acq_rel) && !ok)
        say_missing(missing);
    tl_resolving = false;
    return g_resolved.load(std::memory_order_acquire) > 0;
}

}  // namespace tcps::shim
