// fork_accept: a listener shared by forked children that accept concurrently (the prefork
// pattern of Apache and nginx), checked end to end.
//
//   fork_accept server PORTFILE CHILDREN CONNS PARENT_CONNS   (the application, preloaded)
//   fork_accept client PORT CHILDREN CONNS PARENT_CONNS       (its plain peer)
//
// The server creates one listener, announces its port, and runs two rounds of CHILDREN forked
// children each, then serves PARENT_CONNS connections itself:
//   round "blocking":    the listener is blocking; even children block in accept(), odd ones
//                        poll() it and then accept4(SOCK_NONBLOCK) and serve non-blocking;
//   round "nonblocking": the listener is O_NONBLOCK (set in the parent, shared by all); every
//                        child polls and accepts, and a child that loses the race gets EAGAIN;
//   parent:              after the children exited, the parent's own listener still accepts.
// Each connection carries "ROUND ID\n" and a payload; the server echoes it all back and closes.
// A "quit\n" connection makes a child echo it and exit: the client sends one per child. Each
// child reports the ids it served through a pipe, and the parent checks that every id of the
// round was served exactly once. The client checks every echo byte for byte.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "servers_common.hpp"

using namespace tcps_test;

namespace {

constexpr size_t kPayloadBytes = 3000;
constexpr size_t kMaxMessage = 64 * 1024;

enum class AcceptStyle { kBlocking, kPollThenAccept, kPollNonblocking };

const char *style_name(AcceptStyle style) {
    switch (style) {
        case AcceptStyle::kBlocking:
            return "blocking accept";
        case AcceptStyle::kPollThenAccept:
            return "poll + accept4(SOCK_NONBLOCK)";
        case AcceptStyle::kPollNonblocking:
            return "poll + non-blocking accept";
    }
    return "?";
}

std::string message_for(const std::string &round, int id) {
    return round + " " + std::to_string(id) + "\n" +
           pattern(static_cast<uint32_t>(id), kPayloadBytes);
}

// Accepts one connection the given way; deadline-bound. Counts EAGAINs of the non-blocking way.
int accept_one(int listener, AcceptStyle style, int &lost_races) {
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    for (;;) {
        if (style != AcceptStyle::kBlocking)
            wait_ready(listener, POLLIN, deadline, "poll on the listener");
        const int flags =
            style == AcceptStyle::kBlocking ? SOCK_CLOEXEC : SOCK_CLOEXEC | SOCK_NONBLOCK;
        const int fd = accept4(listener, nullptr, nullptr, flags);
        if (fd >= 0) return fd;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            // Another child took it (or SO_RCVTIMEO ran out on a blocking accept).
            if (style == AcceptStyle::kPollNonblocking) ++lost_races;
            if (Clock::now() >= deadline) die("accept: nothing to accept for 60 s");
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED) continue;
        die("accept (%s): %s", style_name(style), std::strerror(errno));
    }
}

// Serves one connection: reads to EOF, echoes everything, closes. Returns the id it carried,
// or -1 for "quit".
int serve_one(int fd, const std::string &round) {
    set_timeouts(fd, kWaitSeconds);
    const std::string message = recv_until_eof(fd, kMaxMessage, "server recv");
    send_all(fd, message.data(), message.size(), "server send");
    close(fd);
    if (message == "quit\n") return -1;
    const size_t space = message.find(' ');
    const size_t newline = message.find('\n');
    if (space == std::string::npos || newline == std::string::npos || space > newline)
        die("a message without its header (%zu bytes)", message.size());
    if (message.compare(0, space, round) != 0)
        die("round '%s' got a message of round '%s'", round.c_str(),
            message.substr(0, space).c_str());
    const int id = to_int(message.substr(space + 1, newline - space - 1).c_str());
    if (message != message_for(round, id)) die("connection %d: the message is corrupt", id);
    return id;
}

[[noreturn]] void run_child(int listener, int report_fd, const std::string &round, int index,
                            AcceptStyle style) {
    std::vector<uint32_t> served;
    int lost_races = 0;
    for (;;) {
        const int fd = accept_one(listener, style, lost_races);
        const int id = serve_one(fd, round);
        if (id < 0) break;
        served.push_back(static_cast<uint32_t>(id));
    }
    // The report: [count, lost races, ids...]; the parent reads it to EOF.
    std::vector<uint32_t> report{static_cast<uint32_t>(served.size()),
                                 static_cast<uint32_t>(lost_races)};
    report.insert(report.end(), served.begin(), served.end());
    const auto *bytes = reinterpret_cast<const char *>(report.data());
    size_t left = report.size() * sizeof(uint32_t);
    while (left > 0) {
        const ssize_t n = write(report_fd, bytes, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("child %d: writing its report: %s", index, std::strerror(errno));
        bytes += n;
        left -= static_cast<size_t>(n);
    }
    close(report_fd);
    std::fflush(stdout);
    _exit(0);
}

// Reads a child's whole report (to EOF) within the deadline.
std::vector<uint32_t> read_report(int fd, Clock::time_point deadline, int index) {
    std::string bytes;
    char buffer[4096];
    for (;;) {
        wait_ready(fd, POLLIN, deadline, "a child's report");
        const ssize_t n = read(fd, buffer, sizeof(buffer));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("reading child %d's report: %s", index, std::strerror(errno));
        if (n == 0) break;
        bytes.append(buffer, static_cast<size_t>(n));
    }
    close(fd);
    if (bytes.size() % sizeof(uint32_t) || bytes.size() < 2 * sizeof(uint32_t))
        die("child %d sent no report (%zu bytes): it failed", index, bytes.size());
    std::vector<uint32_t> report(bytes.size() / sizeof(uint32_t));
    std::memcpy(report.data(), bytes.data(), bytes.size());
    if (report[0] != report.size() - 2) die("child %d: a report of the wrong length", index);
    return report;
}

// Waits for `pid` to exit within the deadline and requires status 0.
void reap(pid_t pid, Clock::time_point deadline, int index) {
    for (;;) {
        int status = 0;
        const pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid) {
            if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
            if (WIFSIGNALED(status))
                die("child %d (pid %d) died of signal %d", index, pid, WTERMSIG(status));
            die("child %d (pid %d) exited with status %d", index, pid, WEXITSTATUS(status));
        }
        if (done < 0 && errno != EINTR) die("waitpid: %s", std::strerror(errno));
        if (Clock::now() >= deadline) {
            kill(pid, SIGKILL);
            die("child %d (pid %d) did not exit", index, pid);
        }
        usleep(5000);
    }
}

void run_round(int listener, const std::string &round, int children, int conns) {
    std::vector<pid_t> pids;
    std::vector<int> reports;
    std::vector<AcceptStyle> styles;
    std::fflush(stdout);
    for (int k = 0; k < children; ++k) {
        AcceptStyle style = AcceptStyle::kPollNonblocking;
        if (round == "blocking")
            style = k % 2 == 0 ? AcceptStyle::kBlocking : AcceptStyle::kPollThenAccept;
        int pipe_fds[2];
        if (pipe2(pipe_fds, O_CLOEXEC) != 0) die("pipe2: %s", std::strerror(errno));
        const pid_t pid = fork();
        if (pid < 0) die("fork: %s", std::strerror(errno));
        if (pid == 0) {
            close(pipe_fds[0]);
            for (int fd : reports) close(fd);  // the other children's report pipes
            run_child(listener, pipe_fds[1], round, k, style);
        }
        close(pipe_fds[1]);
        pids.push_back(pid);
        reports.push_back(pipe_fds[0]);
        styles.push_back(style);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(90);
    std::vector<int> times_served(static_cast<size_t>(conns), 0);
    std::string distribution;
    int served_total = 0;
    for (int k = 0; k < children; ++k) {
        const std::vector<uint32_t> report =
            read_report(reports[static_cast<size_t>(k)], deadline, k);
        reap(pids[static_cast<size_t>(k)], deadline, k);
        for (size_t i = 2; i < report.size(); ++i) {
            if (report[i] >= static_cast<uint32_t>(conns))
                die("child %d served id %u", k, report[i]);
            ++times_served[report[i]];
        }
        served_total += static_cast<int>(report[0]);
        distribution += " " + std::to_string(report[0]);
        say("  child %d (pid %d, %s): %u connections, %u lost races", k,
            pids[static_cast<size_t>(k)], style_name(styles[static_cast<size_t>(k)]), report[0],
            report[1]);
    }
    for (int id = 0; id < conns; ++id) {
        const int times = times_served[static_cast<size_t>(id)];
        if (times != 1)
            die("round %s: connection %d was served %d times", round.c_str(), id, times);
    }
    say("round %s: %d connections, each served exactly once (per child:%s)", round.c_str(),
        served_total, distribution.c_str());
}

int mode_server(const char *port_file, int children, int conns, int parent_conns) {
    const int listener = listen_announced(port_file);
    // Bounds blocking accepts too (accept honours SO_RCVTIMEO on Linux).
    set_timeouts(listener, kWaitSeconds);
    say("listener fd %d (%s)", listener, fd_target(listener).c_str());
    // The children start once the first connection is pending: until then the test can look
    // at the listener, whatever becomes of the children.
    wait_ready(listener, POLLIN, Clock::now() + std::chrono::seconds(60), "the first connection");

    run_round(listener, "blocking", children, conns);

    const int flags = fcntl(listener, F_GETFL);
    if (flags < 0 || fcntl(listener, F_SETFL, flags | O_NONBLOCK) != 0)
        die("setting O_NONBLOCK on the listener: %s", std::strerror(errno));
    run_round(listener, "nonblocking", children, conns);

    // Every child has exited: the parent's listener must still work, and blocking again.
    if (fcntl(listener, F_SETFL, flags & ~O_NONBLOCK) != 0)
        die("clearing O_NONBLOCK on the listener: %s", std::strerror(errno));
    std::vector<int> times_served(static_cast<size_t>(parent_conns), 0);
    int lost_races = 0;
    for (int k = 0; k < parent_conns; ++k) {
        const int id =
            serve_one(accept_one(listener, AcceptStyle::kBlocking, lost_races), "parent");
        if (id < 0 || id >= parent_conns) die("the parent got an unexpected connection (%d)", id);
        ++times_served[static_cast<size_t>(id)];
    }
    for (int id = 0; id < parent_conns; ++id)
        if (times_served[static_cast<size_t>(id)] != 1)
            die("parent: connection %d not served once", id);
    say("parent: %d connections after its children exited", parent_conns);
    close(listener);
    // Exit only once the client has read everything: when a process exits, tcpsd resets the
    // connections it closed but has not finished closing, so the last FIN could arrive as an RST
    // (an engine issue, reported; Linux finishes such closes gracefully).
    hold_point("exit");
    return 0;
}

// ---------------------------------------------------------------------------------------------
// The plain client

void exchange(uint16_t port, const std::string &message, const char *hold = nullptr) {
    const int fd = connect_to(port);
    send_all(fd, message.data(), message.size(), "client send");
    if (hold) hold_point(hold);  // the connection is open, a child has it or is about to
    if (shutdown(fd, SHUT_WR) != 0) die("shutdown: %s", std::strerror(errno));
    const std::string echo = recv_until_eof(fd, kMaxMessage, "client recv");
    close(fd);
    if (echo != message)
        die("echo of '%s' differs: %zu bytes back for %zu sent",
            message.substr(0, message.find('\n')).c_str(), echo.size(), message.size());
}

// CONCURRENCY threads make `conns` connections of the round between them.
void client_round(uint16_t port, const std::string &round, int conns, int concurrency) {
    std::atomic<int> next{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < concurrency; ++t)
        threads.emplace_back([&] {
            for (int id = next++; id < conns; id = next++)
                exchange(port, message_for(round, id),
                         id == 0 && round == "blocking" ? "connection" : nullptr);
        });
    for (auto &thread : threads) thread.join();
}

int mode_client(uint16_t port, int children, int conns, int parent_conns) {
    for (const char *round : {"blocking", "nonblocking"}) {
        client_round(port, round, conns, children);
        for (int k = 0; k < children; ++k) exchange(port, "quit\n");
        say("client: round %s: %d connections echoed byte for byte, %d children told to quit",
            round, conns, children);
    }
    client_round(port, "parent", parent_conns, 1);
    say("client: %d connections to the parent echoed", parent_conns);
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    g_program = "fork_accept";
    signal(SIGPIPE, SIG_IGN);
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "server" && argc == 6)
        return mode_server(argv[2], to_int(argv[3]), to_int(argv[4]), to_int(argv[5]));
    if (mode == "client" && argc == 6)
        return mode_client(static_cast<uint16_t>(to_int(argv[2])), to_int(argv[3]), to_int(argv[4]),
                           to_int(argv[5]));
    std::fprintf(stderr,
                 "usage: fork_accept server PORTFILE CHILDREN CONNS PARENT_CONNS\n"
                 "       fork_accept client PORT CHILDREN CONNS PARENT_CONNS\n");
    return 2;
}
