// exec: offloaded sockets that are not close-on-exec survive it, as kernel sockets do.
//
// The new image must run the shim to use them (their descriptors are placeholders), and must
// carry on as the same member of the same session, so that it holds what the old image held.
// Before exec we therefore keep the member's control connection, the doorbell and the region's
// memfd open across it, describe the inherited sockets in TCPS_EXEC, and make sure LD_PRELOAD
// names libtcps.so. If the program's environment for the new image had no such LD_PRELOAD, we
// add it and say how to undo that in TCPS_PRELOAD_RESTORE: the new image's shim puts the
// environment back as the program wrote it before main() runs, so only the sockets notice.
// (Handing the kernel socket back instead would lose the bytes the engine already received.)
//
// A vfork()ed child (Python's subprocess) becomes a member of its own before the exec, on a
// new connection, from the descriptors it arranged (tracked apart from the parent's table).
// A program that will not load the shim (static, or set-user-ID/set-group-ID, which ignore
// LD_PRELOAD) gets kernel sockets instead: they are handed back before the exec (handoff.cpp).
// Not covered: posix_spawn(), system() and popen() (glibc execs inside them without calling
// these functions), and a vfork()ed child that execs a static program: there inherited
// offloaded descriptors are dead placeholders (EBADF). Sockets marked close-on-exec vanish as
// usual.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "libc.hpp"
#include "ops.hpp"
#include "session.hpp"

extern char **environ;

namespace tcps::shim {
namespace {

constexpr const char kStateVar[] = "TCPS_EXEC";
constexpr const char kRestoreVar[] = "TCPS_PRELOAD_RESTORE";
constexpr const char kPreloadVar[] = "LD_PRELOAD";

// Bits of a socket's process-local state (Socket) that the new image needs.
enum StateBit : unsigned {
    kNonblocking = 1u << 0,
    kListening = 1u << 1,
    kLingerReset = 1u << 2,
    kShutRd = 1u << 3,
    kShutWr = 1u << 4,
    kDisconnected = 1u << 5,
    kEndReported = 1u << 6,
};

template <class Fn>
Fn next_function(const char *name) {
    return reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
}

// Where this library was loaded from, for LD_PRELOAD: `buffer`, or nullptr.
const char *own_path(char *buffer, size_t size) {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void *>(&own_path), &info) == 0 || !info.dli_fname) return nullptr;
    if (size >= PATH_MAX && realpath(info.dli_fname, buffer)) return buffer;
    return info.dli_fname;
}

bool starts_with(const char *text, const char *prefix) {
    return std::strncmp(text, prefix, std::strlen(prefix)) == 0;
}

// A placeholder of ours: an O_PATH descriptor of /dev/null (socket_ops.cpp).
bool is_placeholder(int fd) {
    struct stat st {};
    const int flags = real(libc.fcntl)(fd, F_GETFL);
    return flags >= 0 && (flags & O_PATH) && real(libc.fstat)(fd, &st) == 0 &&
           S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3);
}

// The dups and closes a vfork()ed child made of our sockets before its exec. Its descriptor
// table is its own, but the shim's table is the parent's and must stay so (socket_ops.cpp):
// this notes the differences instead. Thread-local: the child runs on the thread that called
// vfork(), which stays suspended until the exec; `pid` tells a stale overlay from this child's.
struct VforkOverlay {
    static constexpr int kEntries = 64;
    int pid = 0;
    int count = 0;
    int fds[kEntries];
    uint64_t refs[kEntries];
};
TCPS_TLS VforkOverlay tl_overlay;

// What `fd` is in this process: the overlay's word if this vfork child changed it.
FdRef effective_entry(int fd, int self) {
    if (tl_overlay.pid == self)
        for (int k = tl_overlay.count; k-- > 0;)
            if (tl_overlay.fds[k] == fd) return FdRef{tl_overlay.refs[k]};
    return g_fds.get(fd);
}

// What an exec needs changed, and how to put it back if the exec fails. Fixed buffers on the
// stack, no allocation: in a vfork()ed child the heap is the parent's.
class ExecPlan {
  public:
    // False: nothing offloaded survives this exec; run it unchanged.
    bool prepare(char *const envp[]) {
        const bool vforked = in_vfork_child();
        if (!vforked && !exec_handover(handover_)) return false;
        const int self = static_cast<int>(syscall(SYS_getpid));

        // The sockets the new image inherits: ours, still placeholders, not close-on-exec.
        int limit = g_fds.limit();
        if (tl_overlay.pid == self)
            for (int k = 0; k < tl_overlay.count; ++k)
                limit = std::max(limit, tl_overlay.fds[k] + 1);
        size_t used = 0;
        uint32_t slots[kMaxInherited];
        size_t slot_count = 0;
        for (int fd = 0; fd < limit; ++fd) {
            const FdRef ref = effective_entry(fd, self);
            if (ref.kind() != FdKind::kSocket || !region().mapped(ref.slot())) continue;
            const Socket &sock = socket_state(ref.slot());
            if (sock.generation.load() != ref.generation()) continue;
            const int fd_flags = real(libc.fcntl)(fd, F_GETFD);
            if (fd_flags < 0 || (fd_flags & FD_CLOEXEC) || !is_placeholder(fd)) continue;
            if (slot_count == kMaxInherited) return false;
            slots[slot_count++] = ref.slot();
            unsigned bits = 0;
            if (sock.nonblocking.load()) bits |= kNonblocking;
            if (sock.listening.load()) bits |= kListening;
            if (sock.linger_reset.load()) bits |= kLingerReset;
            if (sock.shut_rd.load()) bits |= kShutRd;
            if (sock.shut_wr.load()) bits |= kShutWr;
            if (sock.disconnected.load()) bits |= kDisconnected;
            if (sock.end_reported.load()) bits |= kEndReported;
            char *const sockets = state_ + kHeadRoom;
            const size_t room = sizeof(state_) - kHeadRoom;
            const int n = std::snprintf(sockets + used, room - used,
                                        "%s%d:%u:%d:%u:%d:%lld:%lld:%d:%u", used ? "," : "", fd,
                                        ref.slot(), sock.domain, bits, sock.connect_state.load(),
                                        static_cast<long long>(sock.rcv_timeout_ns.load()),
                                        static_cast<long long>(sock.snd_timeout_ns.load()),
                                        sock.rcvlowat.load(), sock.consumed_error_gen.load());
            if (n < 0 || static_cast<size_t>(n) >= room - used) return false;
            used += static_cast<size_t>(n);
        }
        if (used == 0) return false;
        // A vfork child becomes a member of its own, like a forked one, on a new connection.
        if (vforked && !vfork_handover(slots, slot_count, handover_)) return false;
        own_connection_ = vforked;

        char head[kHeadRoom];
        int n = std::snprintf(head, sizeof(head), "%s=%u:%u:%d:%d:%d;", kStateVar,
                              handover_.session_id, handover_.member, handover_.control_fd,
                              handover_.doorbell_fd, handover_.memfd);
        if (n < 0 || static_cast<size_t>(n) >= sizeof(head)) return fail();
        std::memmove(state_ + n, state_ + kHeadRoom, used + 1);
        std::memcpy(state_, head, static_cast<size_t>(n));

        const char *preload = nullptr;
        size_t count = 0;
        for (char *const *e = envp; e && *e; ++e) {
            if (starts_with(*e, "LD_PRELOAD=")) preload = *e + sizeof(kPreloadVar);
            if (starts_with(*e, "LD_PRELOAD=") || starts_with(*e, "TCPS_EXEC=") ||
                starts_with(*e, "TCPS_PRELOAD_RESTORE="))
                continue;
            if (count + 4 >= kMaxEnv) return fail();
            env_[count++] = *e;
        }
        env_[count++] = state_;
        const char *library = own_path(library_, sizeof(library_));
        if (preload && library && std::strstr(preload, library)) {
            n = std::snprintf(preload_, sizeof(preload_), "%s=%s", kPreloadVar, preload);
            if (n < 0 || static_cast<size_t>(n) >= sizeof(preload_)) return fail();
            env_[count++] = preload_;
        } else if (library) {
            n = std::snprintf(preload_, sizeof(preload_), "%s=%s%s%s", kPreloadVar, library,
                              preload && *preload ? ":" : "", preload ? preload : "");
            if (n < 0 || static_cast<size_t>(n) >= sizeof(preload_)) return fail();
            env_[count++] = preload_;
            n = std::snprintf(restore_, sizeof(restore_), "%s=%s%s", kRestoreVar,
                              preload ? "1:" : "0", preload ? preload : "");
            if (n < 0 || static_cast<size_t>(n) >= sizeof(restore_)) return fail();
            env_[count++] = restore_;
        }
        env_[count] = nullptr;

        for (int fd : {handover_.control_fd, handover_.doorbell_fd, handover_.memfd})
            real(libc.fcntl)(fd, F_SETFD, 0);
        prepared_ = true;
        return true;
    }

    char *const *envp() { return env_; }

    // The exec failed: we carry on as before.
    void undo() {
        if (!prepared_) return;
        for (int fd : {handover_.control_fd, handover_.doorbell_fd, handover_.memfd})
            real(libc.fcntl)(fd, F_SETFD, FD_CLOEXEC);
        prepared_ = false;
        fail();
    }

  private:
    static constexpr size_t kMaxInherited = 256;
    static constexpr size_t kMaxEnv = 1024;   // more variables than that: a plain exec
    static constexpr size_t kHeadRoom = 128;  // "TCPS_EXEC=session:member:fds;"

    // Gives up: a connection opened for a vfork child goes, and with it the new member (the
    // engine drops its holds).
    bool fail() {
        if (own_connection_ && handover_.control_fd >= 0) real(libc.close)(handover_.control_fd);
        own_connection_ = false;
        return false;
    }

    ExecHandover handover_;
    bool prepared_ = false;
    bool own_connection_ = false;
    char state_[kHeadRoom + 8192];
    char library_[PATH_MAX];
    char preload_[PATH_MAX + 4096];
    char restore_[4200];
    char *env_[kMaxEnv];
};

// Whether the program at `path` will honour LD_PRELOAD: not set-user-ID or set-group-ID, and an
// ELF with an interpreter (or a script, whose interpreter is). In doubt (unreadable, not ELF),
// yes: the exec then fails or runs as it would anyway.
bool loads_preload(const char *path) {
    struct stat st {};
    if (!path || stat(path, &st) != 0) return true;
    if (st.st_mode & (S_ISUID | S_ISGID)) return false;
    const int fd = static_cast<int>(syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC));
    if (fd < 0) return true;
    Elf64_Ehdr header{};
    bool loads = true;
    if (pread(fd, &header, sizeof(header), 0) == static_cast<ssize_t>(sizeof(header)) &&
        std::memcmp(header.e_ident, ELFMAG, SELFMAG) == 0 &&
        header.e_ident[EI_CLASS] == ELFCLASS64 && header.e_phentsize == sizeof(Elf64_Phdr) &&
        header.e_phnum < 256) {
        loads = false;
        for (unsigned k = 0; k < header.e_phnum && !loads; ++k) {
            Elf64_Phdr program{};
            const off_t at = static_cast<off_t>(header.e_phoff + k * sizeof(Elf64_Phdr));
            if (pread(fd, &program, sizeof(program), at) != static_cast<ssize_t>(sizeof(program)))
                loads = true;
            else if (program.p_type == PT_INTERP)
                loads = true;
        }
    }
    real(libc.close)(fd);
    return loads;
}

// What execvp() would run for `file`: itself if it has a slash, else the first executable
// regular file of that name on PATH. Into `buffer`; nullptr if none.
const char *resolve_program(const char *file, char *buffer, size_t size) {
    if (!file || !*file) return nullptr;
    if (std::strchr(file, '/')) return file;
    const char *path = getenv("PATH");
    if (!path) path = "/bin:/usr/bin";
    for (const char *start = path;; ++start) {
        const char *end = std::strchr(start, ':');
        const size_t length = end ? static_cast<size_t>(end - start) : std::strlen(start);
        const int n = std::snprintf(buffer, size, "%.*s%s%s", static_cast<int>(length), start,
                                    length ? "/" : "", file);
        struct stat st {};
        if (n > 0 && static_cast<size_t>(n) < size && stat(buffer, &st) == 0 &&
            S_ISREG(st.st_mode) && access(buffer, X_OK) == 0)
            return buffer;
        if (!end) return nullptr;
        start = end;
    }
}

// Before exec of a program that will not load the shim: its inherited sockets become kernel
// sockets, so that it can use them (bytes the engine received and nobody read are lost, and
// said on stderr, as for SCM_RIGHTS).
void hand_back_inherited() {
    if (in_vfork_child() || g_fds.size() == 0) return;
    const int limit = g_fds.limit();
    for (int fd = 0; fd < limit; ++fd) {
        SocketRef ref;
        if (!find_socket(fd, ref)) continue;
        const int fd_flags = real(libc.fcntl)(fd, F_GETFD);
        if (fd_flags < 0 || (fd_flags & FD_CLOEXEC)) continue;
        hand_back(ref, 0);  // the new image cannot claim parked bytes
    }
}

void restore_environment() {
    unsetenv(kStateVar);
    if (const char *restore = getenv(kRestoreVar)) {
        if (restore[0] == '1' && restore[1] == ':')
            setenv(kPreloadVar, restore + 2, 1);
        else
            unsetenv(kPreloadVar);
        unsetenv(kRestoreVar);
    }
}

template <class Exec>
int exec_with_plan(const char *program, char *const envp[], Exec &&exec) {
    if (!loads_preload(program)) {
        hand_back_inherited();
        return exec(envp);
    }
    ExecPlan plan;  // about 30 KiB of stack, only for the time of an exec
    if (!plan.prepare(envp)) return exec(envp);
    const int rc = exec(plan.envp());
    const int saved = errno;
    plan.undo();
    errno = saved;
    return rc;
}

// execl-style argument lists, as an argv array (and the envp that follows, for execle).
std::vector<char *> collect_args(const char *first, va_list args, char *const **envp) {
    std::vector<char *> argv;
    argv.push_back(const_cast<char *>(first));
    while (argv.back() != nullptr) argv.push_back(va_arg(args, char *));
    if (envp) *envp = va_arg(args, char *const *);
    return argv;
}

}  // namespace

void vfork_note(int fd, FdRef ref) {
    const int self = static_cast<int>(syscall(SYS_getpid));
    if (tl_overlay.pid != self) {
        tl_overlay.pid = self;
        tl_overlay.count = 0;
    }
    if (tl_overlay.count == VforkOverlay::kEntries) return;  // beyond that, dead placeholders
    tl_overlay.fds[tl_overlay.count] = fd;
    tl_overlay.refs[tl_overlay.count] = ref.word;
    ++tl_overlay.count;
}

bool vfork_overlay_knows(int fd) {
    if (tl_overlay.count == 0) return false;
    if (tl_overlay.pid != static_cast<int>(syscall(SYS_getpid))) {
        tl_overlay.count = 0;  // the parent, back from vfork(): the child's notes are not ours
        return false;
    }
    for (int k = 0; k < tl_overlay.count; ++k)
        if (tl_overlay.fds[k] == fd) return true;
    return false;
}

FdRef vfork_entry(int fd) {
    return effective_entry(fd, static_cast<int>(syscall(SYS_getpid)));
}

// At start-up of an image that an exec handed offloaded sockets to.
void adopt_inherited_sockets() {
    const char *state = getenv(kStateVar);
    if (!state) return;
    ExecHandover from;
    int consumed = 0;
    if (std::sscanf(state, "%u:%u:%d:%d:%d;%n", &from.session_id, &from.member, &from.control_fd,
                    &from.doorbell_fd, &from.memfd, &consumed) != 5 ||
        consumed == 0 || adopt_session(from) != 0) {
        // Without the session the placeholders stay dead; closing our end of the connection
        // tells the engine this member is gone, which drops what it held.
        for (int fd : {from.control_fd, from.doorbell_fd, from.memfd})
            if (fd > 2) real(libc.close)(fd);
        restore_environment();
        return;
    }
    const char *cursor = state + consumed;
    std::vector<bool> inherited(ipc::kMaxSockets, false);
    while (*cursor) {
        int fd = -1, domain = 0, connect_state = 0, lowat = 1, used = 0;
        unsigned slot = 0, bits = 0, error_gen = 0;
        long long rcv = 0, snd = 0;
        if (std::sscanf(cursor, "%d:%u:%d:%u:%d:%lld:%lld:%d:%u%n", &fd, &slot, &domain, &bits,
                        &connect_state, &rcv, &snd, &lowat, &error_gen, &used) != 9 ||
            used == 0)
            break;
        cursor += used;
        if (*cursor == ',') ++cursor;
        if (fd < 0 || static_cast<size_t>(fd) >= g_fds.size() || !is_placeholder(fd) ||
            !map_slot(slot))
            continue;
        Socket &sock = socket_state(slot);
        if (!inherited[slot]) {
            inherited[slot] = true;
            sock.open(domain, bits & kNonblocking, sock.generation.load() + 1);
            sock.listening.store(bits & kListening);
            sock.linger_reset.store(bits & kLingerReset);
            sock.shut_rd.store(bits & kShutRd);
            sock.shut_wr.store(bits & kShutWr);
            sock.disconnected.store(bits & kDisconnected);
            sock.end_reported.store(bits & kEndReported);
            sock.connect_state.store(connect_state);
            sock.rcv_timeout_ns.store(rcv);
            sock.snd_timeout_ns.store(snd);
            sock.rcvlowat.store(lowat);
            sock.consumed_error_gen.store(error_gen);
        } else {
            sock.refs.fetch_add(1);  // a dup of one already adopted
        }
        g_fds.set(fd, FdRef::socket(slot, sock.generation.load()));
    }
    // What the old image held but did not hand on was close-on-exec: the kernel closed those
    // descriptors, so our hold on them goes.
    const uint32_t active =
        std::min(region().header().chunks_active.load(std::memory_order_acquire), ipc::kMaxChunks);
    for (uint32_t slot = 0; slot < active * ipc::kChunkSlots; ++slot) {
        if (slot % ipc::kChunkSlots == 0 && !map_slot(slot)) {
            slot += ipc::kChunkSlots - 1;
            continue;
        }
        const uint64_t bit = uint64_t{1} << (slot % 64);
        if (inherited[slot] || !(region().held_word(from.member, slot).load() & bit)) continue;
        if (unhold_socket(slot)) {
            const ipc::SocketSlot &shm = region().slot(slot);
            const bool unread = shm.rx_tail.load() != shm.rx_head.load();
            request_close(slot, unread);
        }
    }
    restore_environment();
}

}  // namespace tcps::shim

using namespace tcps::shim;

TCPS_EXPORT int execve(const char *path, char *const argv[], char *const envp[]) {
    static auto next = next_function<int (*)(const char *, char *const[], char *const[])>("execve");
    return exec_with_plan(path, envp, [&](char *const *env) { return next(path, argv, env); });
}

TCPS_EXPORT int execv(const char *path, char *const argv[]) {
    return execve(path, argv, environ);
}

TCPS_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[]) {
    static auto next =
        next_function<int (*)(const char *, char *const[], char *const[])>("execvpe");
    char resolved[PATH_MAX];
    return exec_with_plan(resolve_program(file, resolved, sizeof(resolved)), envp,
                          [&](char *const *env) { return next(file, argv, env); });
}

TCPS_EXPORT int execvp(const char *file, char *const argv[]) {
    return execvpe(file, argv, environ);
}

TCPS_EXPORT int fexecve(int fd, char *const argv[], char *const envp[]) {
    static auto next = next_function<int (*)(int, char *const[], char *const[])>("fexecve");
    char self[64];
    std::snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
    return exec_with_plan(self, envp, [&](char *const *env) { return next(fd, argv, env); });
}

TCPS_EXPORT int execl(const char *path, const char *arg, ...) {
    va_list args;
    va_start(args, arg);
    std::vector<char *> argv = collect_args(arg, args, nullptr);
    va_end(args);
    return execve(path, argv.data(), environ);
}

TCPS_EXPORT int execle(const char *path, const char *arg, ...) {
    va_list args;
    va_start(args, arg);
    char *const *envp = nullptr;
    std::vector<char *> argv = collect_args(arg, args, &envp);
    va_end(args);
    return execve(path, argv.data(), envp);
}

TCPS_EXPORT int execlp(const char *file, const char *arg, ...) {
    va_list args;
    va_start(args, arg);
    std::vector<char *> argv = collect_args(arg, args, nullptr);
    va_end(args);
    return execvpe(file, argv.data(), environ);
}
