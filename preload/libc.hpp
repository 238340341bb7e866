// The real libc functions behind every interposed call, resolved with dlsym(RTLD_NEXT).
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <sys/uio.h>

#include <cstdio>

namespace tcps::shim {

struct LibcFunctions {
#define TCPS_LIBC(ret, name, params) ret(*name) params = nullptr;
#include "syscalls.def"
};

// Written once by resolve_libc(), read everywhere after.
extern LibcFunctions libc;

// Resolves every function (idempotent, cheap after the first call). Returns false if a
// required one is missing: it is named on stderr once and the shim stays inert. A call
// re-entering from inside dlsym (an interposed malloc, say) returns false at once.
bool resolve_libc();

// The real function, resolving on first use when called before the library constructor.
template <class Fn>
inline Fn real(Fn &slot) {
    if (__builtin_expect(slot != nullptr, 1)) return slot;
    resolve_libc();
    return slot;
}

}  // namespace tcps::shim
