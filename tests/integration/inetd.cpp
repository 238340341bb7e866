// inetd: the inetd pattern. A server accepts, forks, and the child execs a program with the
// connection as its stdin and stdout; the program's bytes must reach the peer, and the peer must
// see the connection end when the program exits.
//
//   inetd server PORTFILE CONNS keep|strip   the application (preloaded); `strip` removes
//                                            LD_PRELOAD from the exec'd program's environment
//   inetd child                              the program for even connections: reads a line on
//                                            fd 0, writes a greeting and 64 KiB on fd 1
//   inetd client PORT CONNS                  the plain peer: checks every reply byte for byte
//
// Odd connections exec /bin/sh instead, which reads the line with `read` and answers with `echo`:
// an unrelated program that knows nothing of sockets.
#include <signal.h>
#include <sys/wait.h>

#include <string>
#include <vector>

#include "servers_common.hpp"

extern char **environ;

using namespace tcps_test;

namespace {

constexpr size_t kChildPayload = 64 * 1024;
const char *g_self = "/proc/self/exe";

std::string expected_reply(int id) {
    const std::string line = "ping " + std::to_string(id);
    std::string reply = "hello-from-child " + line + "\n";
    if (id % 2 == 0) reply += pattern(static_cast<uint32_t>(id), kChildPayload);
    return reply;
}

// --- the exec'd program ---

int mode_child() {
    // Reads one line from fd 0 (byte by byte: nothing after it may be consumed).
    std::string line;
    const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
    for (;;) {
        char c;
        const ssize_t n = read(STDIN_FILENO, &c, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            wait_ready(STDIN_FILENO, POLLIN, deadline, "child: read stdin");
            continue;
        }
        if (n < 0)
            die("child: read from stdin (%s): %s", fd_target(STDIN_FILENO).c_str(),
                std::strerror(errno));
        if (n == 0) die("child: EOF on stdin before a line");
        if (c == '\n') break;
        line += c;
        if (line.size() > 100) die("child: the line is too long");
    }
    const size_t space = line.rfind(' ');
    const int id = to_int(line.substr(space == std::string::npos ? 0 : space + 1).c_str());
    const std::string reply = expected_reply(id);
    const char *bytes = reply.data();
    size_t left = reply.size();
    while (left > 0) {
        const ssize_t n = write(STDOUT_FILENO, bytes, left);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            wait_ready(STDOUT_FILENO, POLLOUT, deadline, "child: write stdout");
            continue;
        }
        if (n <= 0)
            die("child: write to stdout (%s): %s", fd_target(STDOUT_FILENO).c_str(),
                std::strerror(errno));
        bytes += n;
        left -= static_cast<size_t>(n);
    }
    return 0;
}

// --- the server ---

[[noreturn]] void exec_program(int conn, int listener, int id, bool strip) {
    close(listener);
    if (dup2(conn, STDIN_FILENO) < 0 || dup2(conn, STDOUT_FILENO) < 0)
        die("dup2 of the connection onto stdin/stdout: %s", std::strerror(errno));
    if (conn > STDOUT_FILENO) close(conn);
    std::vector<char *> env;
    for (char **entry = environ; *entry; ++entry)
        if (!strip || std::strncmp(*entry, "LD_PRELOAD=", 11) != 0) env.push_back(*entry);
    env.push_back(nullptr);
    if (id % 2 == 0) {
        char *args[] = {const_cast<char *>(g_self), const_cast<char *>("child"), nullptr};
        execve(g_self, args, env.data());
    } else {
        char *args[] = {const_cast<char *>("/bin/sh"), const_cast<char *>("-c"),
                        const_cast<char *>("read -r line && echo \"hello-from-child $line\""),
                        nullptr};
        execve("/bin/sh", args, env.data());
    }
    die("execve: %s", std::strerror(errno));
}

int mode_server(const char *port_file, int conns, bool strip) {
    const int listener = listen_announced(port_file);
    set_timeouts(listener, kWaitSeconds);
    say("listener fd %d (%s); exec'd programs %s LD_PRELOAD", listener, fd_target(listener).c_str(),
        strip ? "without" : "with");
    for (int id = 0; id < conns; ++id) {
        const int conn = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (conn < 0 && errno == EAGAIN)
            die("no connection %d within %d s (did the client fail?)", id, kWaitSeconds);
        if (conn < 0) die("accept: %s", std::strerror(errno));
        if (id == 0) hold_point("connection");
        std::fflush(stdout);
        const pid_t pid = fork();
        if (pid < 0) die("fork: %s", std::strerror(errno));
        if (pid == 0) exec_program(conn, listener, id, strip);
        close(conn);  // the child's copies are the only ones left
        say("child pid %d execs %s", pid, id % 2 ? "/bin/sh" : "inetd child");
        const auto deadline = Clock::now() + std::chrono::seconds(kWaitSeconds);
        int status = 0;
        for (;;) {
            const pid_t done = waitpid(pid, &status, WNOHANG);
            if (done == pid) break;
            if (done < 0 && errno != EINTR) die("waitpid: %s", std::strerror(errno));
            if (Clock::now() >= deadline) {
                kill(pid, SIGKILL);
                die("connection %d: the exec'd program (pid %d) did not exit", id, pid);
            }
            usleep(2000);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            die("connection %d: the exec'd program (pid %d) failed (status %d)", id, pid, status);
    }
    close(listener);
    say("server: %d connections handed to exec'd programs", conns);
    return 0;
}

// --- the plain peer ---

int mode_client(uint16_t port, int conns) {
    for (int id = 0; id < conns; ++id) {
        const int fd = connect_to(port);
        const std::string line = "ping " + std::to_string(id) + "\n";
        send_all(fd, line.data(), line.size(), "client send");
        // The program's exit must end the connection: read to EOF.
        const std::string reply = recv_until_eof(fd, 1 << 20, "client recv");
        close(fd);
        const std::string expected = expected_reply(id);
        if (reply != expected)
            die("connection %d: %zu bytes back, expected %zu (%s)", id, reply.size(),
                expected.size(), reply.substr(0, reply.find('\n')).c_str());
    }
    say("client: %d replies from exec'd programs, byte for byte, each ended by their exit", conns);
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    g_program = "inetd";
    signal(SIGPIPE, SIG_IGN);
    static char self[4096];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) g_self = self;
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "server" && argc == 5 &&
        (std::string(argv[4]) == "keep" || std::string(argv[4]) == "strip"))
        return mode_server(argv[2], to_int(argv[3]), std::string(argv[4]) == "strip");
    if (mode == "child" && argc == 2) return mode_child();
    if (mode == "client" && argc == 4)
        return mode_client(static_cast<uint16_t>(to_int(argv[2])), to_int(argv[3]));
    std::fprintf(
        stderr,
        "usage: inetd server PORTFILE CONNS keep|strip | inetd child | inetd client PORT CONNS\n");
    return 2;
}
