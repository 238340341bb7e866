// tcps-run: runs a program with its TCP offloaded to tcpsd.
//
//   tcps-run [--socket PATH] [--cores LIST] [--engine PATH] [--lib PATH] -- PROGRAM ARGS...
//
// Uses the engine that answers on the control socket (--socket, $TCPS_ENGINE_SOCKET or the
// default path); if none does, starts a private tcpsd on a socket in a fresh temporary directory
// and stops it when the program has exited. The program runs with libtcps.so prepended to
// LD_PRELOAD and TCPS_ENGINE_SOCKET naming the engine. Exits with the program's status, or
// 128 + signal if a signal killed it; 125 if the engine could not be started, 126/127 if the
// program could not be run (as env(1) and timeout(1) do).
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "control.hpp"

namespace {

volatile sig_atomic_t g_program_pid = 0;
// A signal that arrived before the program ran: tcps-run then stops instead of starting it.
volatile sig_atomic_t g_early_signal = 0;

// Forwards a signal to the program. A terminal's ^C (si_code SI_KERNEL) already reached the
// program through the process group: forwarding it again would deliver it twice.
void forward_signal(int sig, siginfo_t *info, void *) {
    const pid_t pid = g_program_pid;
    if (pid <= 0) {
        g_early_signal = sig;
        return;
    }
    if (info && info->si_code == SI_KERNEL) return;
    kill(pid, sig);
}

constexpr int kForwardedSignals[] = {SIGINT, SIGTERM, SIGHUP};

void install_forwarding() {
    struct sigaction action {};
    action.sa_sigaction = forward_signal;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (int sig : kForwardedSignals) sigaction(sig, &action, nullptr);
}

constexpr int kExitEngineFailed = 125;
constexpr int kExitCannotRun = 126;
constexpr int kExitNotFound = 127;
constexpr auto kEngineReadyTimeout = std::chrono::seconds(5);
constexpr auto kEngineStopTimeout = std::chrono::seconds(5);

struct Options {
    std::string socket_path;
    std::string cores;
    std::string engine;
    std::string lib;
    std::vector<char *> program;  // argv of the program, null-terminated
};

void usage(FILE *out) {
    std::fprintf(out,
                 "usage: tcps-run [--socket PATH] [--cores LIST] [--engine PATH] [--lib PATH] "
                 "-- PROGRAM [ARGS...]\n"
                 "  --socket PATH  engine control socket (default: $TCPS_ENGINE_SOCKET, else the\n"
                 "                 engine's default path); if no engine answers there, a private\n"
                 "                 tcpsd is started for this program\n"
                 "  --cores LIST   cores for a private engine's workers (tcpsd --cores)\n"
                 "  --engine PATH  tcpsd to start (default: $TCPSD, else next to tcps-run)\n"
                 "  --lib PATH     libtcps.so to preload (default: $TCPS_LIB, else the build's or\n"
                 "                 the installed one)\n");
}

// Parses "--name VALUE" and "--name=VALUE". Returns false on a usage error.
bool parse_options(int argc, char **argv, Options &options) {
    int i = 1;
    for (; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--") {
            ++i;
            break;
        }
        if (arg == "-h" || arg == "--help") {
            usage(stdout);
            std::exit(0);
        }
        if (arg.rfind("--", 0) != 0) break;  // the program starts here (no "--" given)
        std::string name = arg, value;
        bool has_value = false;
        if (auto eq = arg.find('='); eq != std::string::npos) {
            name = arg.substr(0, eq);
            value = arg.substr(eq + 1);
            has_value = true;
        }
        std::string *target = nullptr;
        if (name == "--socket") target = &options.socket_path;
        if (name == "--cores") target = &options.cores;
        if (name == "--engine") target = &options.engine;
        if (name == "--lib") target = &options.lib;
        if (!target) {
            std::fprintf(stderr, "tcps-run: unknown option %s\n", arg.c_str());
            return false;
        }
        if (!has_value) {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "tcps-run: %s needs a value\n", name.c_str());
                return false;
            }
            value = argv[++i];
        }
        if (value.empty()) {
            std::fprintf(stderr, "tcps-run: %s needs a non-empty value\n", name.c_str());
            return false;
        }
        *target = value;
    }
    if (i >= argc) {
        std::fprintf(stderr, "tcps-run: no program given\n");
        return false;
    }
    for (; i < argc; ++i) options.program.push_back(argv[i]);
    options.program.push_back(nullptr);
    return true;
}

std::string self_dir() {
    char buf[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
    if (n <= 0) return ".";
    buf[n] = '\0';
    std::string path(buf);
    auto slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

const char *env_or_null(const char *name) {
    const char *value = std::getenv(name);
    return value && *value ? value : nullptr;
}

bool is_executable(const std::string &path) {
    return access(path.c_str(), X_OK) == 0;
}
bool is_readable(const std::string &path) {
    return access(path.c_str(), R_OK) == 0;
}

std::string absolute(const std::string &path) {
    char buf[PATH_MAX];
    return realpath(path.c_str(), buf) ? std::string(buf) : path;
}

// tcpsd: --engine, $TCPSD, next to this executable, ../engine/tcpsd from it, else $PATH.
std::string find_engine(const Options &options) {
    if (!options.engine.empty()) return options.engine;
    if (const char *env = env_or_null("TCPSD")) return env;
    const std::string dir = self_dir();
    for (const std::string &candidate : {dir + "/tcpsd", dir + "/../engine/tcpsd"})
        if (is_executable(candidate)) return absolute(candidate);
    return "tcpsd";  // execvp searches $PATH
}

// libtcps.so: --lib, $TCPS_LIB, the build tree, the install tree, else the loader's search path.
std::string find_library(const Options &options) {
    if (!options.lib.empty()) return absolute(options.lib);
    if (const char *env = env_or_null("TCPS_LIB")) return absolute(env);
    const std::string dir = self_dir();
    std::vector<std::string> candidates = {dir + "/../preload/libtcps.so"};
#ifdef TCPS_INSTALL_LIBDIR
    candidates.push_back(std::string(TCPS_INSTALL_LIBDIR) + "/libtcps.so");
#endif
    for (const char *libdir :
         {"/../lib/x86_64-linux-gnu", "/../lib/aarch64-linux-gnu", "/../lib64", "/../lib"})
        candidates.push_back(dir + libdir + "/libtcps.so");
    for (const std::string &candidate : candidates)
        if (is_readable(candidate)) return absolute(candidate);
    return "libtcps.so";
}

// True if an engine the program may trust (ipc::check_engine_identity) accepts connections on
// the control socket. A full backlog (EAGAIN) still means an engine is there. One that answers
// but may not be trusted is said on stderr and not used.
bool engine_answers(const std::string &path) {
    sockaddr_un address{};
    if (path.size() >= sizeof(address.sun_path)) return false;
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0) return false;
    int rc = connect(sock, reinterpret_cast<sockaddr *>(&address), sizeof(address));
    bool answers = rc == 0 || errno == EAGAIN || errno == EINPROGRESS;
    char why[256];
    // (Behind a full backlog there is no peer to ask: the shim asks again when it connects.)
    if (rc == 0 && tcps::ipc::check_engine_identity(sock, path.c_str(), why, sizeof(why)) != 0) {
        std::fprintf(stderr, "tcps-run: not using the engine on %s: %s\n", path.c_str(), why);
        answers = false;
    }
    close(sock);
    return answers;
}

int milliseconds_left(std::chrono::steady_clock::time_point deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

// Waits for `pid` to exit until the deadline. Returns its wait status, or nullopt on timeout.
std::optional<int> wait_with_deadline(pid_t pid, std::chrono::steady_clock::time_point deadline) {
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    for (;;) {
        int status = 0;
        pid_t rc = waitpid(pid, &status, WNOHANG);
        if (rc == pid) {
            if (pidfd >= 0) close(pidfd);
            return status;
        }
        if (rc < 0 && errno != EINTR) {
            if (pidfd >= 0) close(pidfd);
            return 0;  // not our child any more: nothing to wait for
        }
        const int left = milliseconds_left(deadline);
        if (left == 0) {
            if (pidfd >= 0) close(pidfd);
            return std::nullopt;
        }
        if (pidfd >= 0) {
            pollfd entry{pidfd, POLLIN, 0};
            poll(&entry, 1, left);
        } else {
            // No pidfd (a kernel before 5.3): re-check every few milliseconds until the deadline.
            usleep(5000);
        }
    }
}

class PrivateEngine {
  public:
    ~PrivateEngine() { stop(); }

    // Starts tcpsd on dir/engine.sock and waits (bounded) for its "ready" line.
    bool start(const std::string &engine, const std::string &cores) {
        const char *tmp = env_or_null("TMPDIR");
        std::string pattern = std::string(tmp ? tmp : "/tmp") + "/tcps-run.XXXXXX";
        std::vector<char> buf(pattern.begin(), pattern.end());
        buf.push_back('\0');
        if (!mkdtemp(buf.data())) {
            std::fprintf(stderr, "tcps-run: mkdtemp %s: %s\n", pattern.c_str(),
                         std::strerror(errno));
            return false;
        }
        dir_ = buf.data();
        socket_path_ = dir_ + "/engine.sock";

        int ready[2];
        if (pipe2(ready, O_CLOEXEC) != 0) {
            std::perror("tcps-run: pipe2");
            return false;
        }
        std::string ready_fd = std::to_string(ready[1]);
        std::vector<std::string> args = {engine, "--socket", socket_path_, "--ready-fd", ready_fd};
        if (!cores.empty()) {
            args.push_back("--cores");
            args.push_back(cores);
        }
        std::vector<char *> argv;
        for (auto &arg : args) argv.push_back(arg.data());
        argv.push_back(nullptr);

        pid_ = fork();
        if (pid_ < 0) {
            std::perror("tcps-run: fork");
            close(ready[0]);
            close(ready[1]);
            return false;
        }
        if (pid_ == 0) {
            // Its own process group, so a terminal's ^C reaches the program, not the engine;
            // and it goes when tcps-run goes, even if tcps-run is SIGKILLed.
            setpgid(0, 0);
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() == 1) _exit(kExitEngineFailed);  // tcps-run died before prctl
            struct sigaction original {};
            original.sa_handler = SIG_DFL;
            for (int sig : kForwardedSignals) sigaction(sig, &original, nullptr);
            sigset_t none;
            sigemptyset(&none);
            sigprocmask(SIG_SETMASK, &none, nullptr);
            fcntl(ready[1], F_SETFD, 0);
            execvp(argv[0], argv.data());
            std::fprintf(stderr, "tcps-run: cannot run engine %s: %s\n", argv[0],
                         std::strerror(errno));
            _exit(kExitEngineFailed);
        }
        close(ready[1]);
        const bool ok = wait_ready(ready[0]);
        close(ready[0]);
        if (!ok) stop();
        return ok;
    }

    const std::string &socket_path() const { return socket_path_; }

    // SIGTERM, a bounded wait, then SIGKILL; removes the temporary directory.
    void stop() {
        if (pid_ > 0) {
            kill(pid_, SIGTERM);
            if (!wait_with_deadline(pid_, std::chrono::steady_clock::now() + kEngineStopTimeout)) {
                std::fprintf(stderr, "tcps-run: engine did not stop in time; killing it\n");
                kill(pid_, SIGKILL);
                wait_with_deadline(pid_, std::chrono::steady_clock::now() + kEngineStopTimeout);
            }
            pid_ = -1;
        }
        if (!dir_.empty()) {
            remove_tree(dir_);
            dir_.clear();
        }
    }

  private:
    bool wait_ready(int fd) {
        const auto deadline = std::chrono::steady_clock::now() + kEngineReadyTimeout;
        std::string seen;
        for (;;) {
            if (g_early_signal) return false;
            const int left = milliseconds_left(deadline);
            if (left == 0) {
                std::fprintf(stderr, "tcps-run: engine not ready after %lld s\n",
                             static_cast<long long>(kEngineReadyTimeout.count()));
                return false;
            }
            pollfd entry{fd, POLLIN, 0};
            int rc = poll(&entry, 1, left);
            if (rc < 0 && errno != EINTR) return false;
            if (rc <= 0) continue;
            char buf[128];
            ssize_t n = read(fd, buf, sizeof(buf));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                std::fprintf(stderr, "tcps-run: engine exited before it was ready\n");
                return false;
            }
            seen.append(buf, static_cast<size_t>(n));
            if (seen.find("ready") != std::string::npos) return true;
            if (seen.size() > 4096) seen.erase(0, seen.size() - 16);
        }
    }

    // The directory holds only what the engine made there (its socket); one level is enough.
    static void remove_tree(const std::string &dir) {
        if (DIR *stream = opendir(dir.c_str())) {
            while (dirent *entry = readdir(stream)) {
                if (!std::strcmp(entry->d_name, ".") || !std::strcmp(entry->d_name, "..")) continue;
                unlink((dir + "/" + entry->d_name).c_str());
            }
            closedir(stream);
        }
        rmdir(dir.c_str());
    }

    pid_t pid_ = -1;
    std::string dir_;
    std::string socket_path_;
};

void set_environment(const std::string &library, const std::string &socket_path) {
    std::string preload = library;
    if (const char *existing = env_or_null("LD_PRELOAD")) preload += std::string(":") + existing;
    setenv("LD_PRELOAD", preload.c_str(), 1);
    setenv(tcps::ipc::kEngineSocketEnv, socket_path.c_str(), 1);
}

// Runs the program and returns the exit status tcps-run should return.
int run_program(std::vector<char *> &argv) {
    sigset_t forwarded, previous;
    sigemptyset(&forwarded);
    for (int sig : kForwardedSignals) sigaddset(&forwarded, sig);
    sigprocmask(SIG_BLOCK, &forwarded, &previous);
    if (g_early_signal) {
        sigprocmask(SIG_SETMASK, &previous, nullptr);
        return 128 + g_early_signal;
    }

    // The child reports a failed exec through this close-on-exec pipe: EOF means exec worked.
    int exec_status[2];
    if (pipe2(exec_status, O_CLOEXEC) != 0) {
        std::perror("tcps-run: pipe2");
        return kExitCannotRun;
    }
    const pid_t pid = fork();
    if (pid < 0) {
        std::perror("tcps-run: fork");
        return kExitCannotRun;
    }
    if (pid == 0) {
        struct sigaction original {};
        original.sa_handler = SIG_DFL;
        for (int sig : kForwardedSignals) sigaction(sig, &original, nullptr);
        sigprocmask(SIG_SETMASK, &previous, nullptr);
        close(exec_status[0]);
        execvp(argv[0], argv.data());
        int error = errno;
        (void)!write(exec_status[1], &error, sizeof(error));
        _exit(error == ENOENT ? kExitNotFound : kExitCannotRun);
    }
    g_program_pid = pid;
    sigprocmask(SIG_SETMASK, &previous, nullptr);
    close(exec_status[1]);

    int exec_error = 0;
    ssize_t n;
    do {
        n = read(exec_status[0], &exec_error, sizeof(exec_error));
    } while (n < 0 && errno == EINTR);
    close(exec_status[0]);

    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    g_program_pid = 0;
    if (n == static_cast<ssize_t>(sizeof(exec_error))) {
        std::fprintf(stderr, "tcps-run: %s: %s\n", argv[0], std::strerror(exec_error));
        return exec_error == ENOENT ? kExitNotFound : kExitCannotRun;
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return kExitCannotRun;
}

}  // namespace

int main(int argc, char **argv) {
    Options options;
    if (!parse_options(argc, argv, options)) {
        usage(stderr);
        return kExitCannotRun;
    }
    install_forwarding();
    const std::string library = find_library(options);

    // A local setting wins over the environment for the engine lookup.
    if (!options.socket_path.empty())
        setenv(tcps::ipc::kEngineSocketEnv, options.socket_path.c_str(), 1);
    std::string socket_path = tcps::ipc::engine_socket_path();

    PrivateEngine engine;
    if (!engine_answers(socket_path)) {
        if (!engine.start(find_engine(options), options.cores))
            return g_early_signal ? 128 + g_early_signal : kExitEngineFailed;
        socket_path = engine.socket_path();
    } else if (!options.cores.empty()) {
        std::fprintf(stderr, "tcps-run: an engine already runs at %s; --cores ignored\n",
                     socket_path.c_str());
    }

    set_environment(library, socket_path);
    const int status = run_program(options.program);
    engine.stop();
    return status;
}
