// http_check: a plain (never preloaded) HTTP load client that checks every response byte.
//
//   http_check --port P --path /f16k --expect FILE [--requests N] [--concurrency C]
//              [--mode 10|11] [--per-conn K] [--duration-s S] [--host ADDR] [--timeout-s T]
//              [--progress-ms M] [--max-retries R]
//
// C threads each run one connection at a time. --mode 10: HTTP/1.0, one request per connection,
// the body must be followed by the server's close. --mode 11: HTTP/1.1 keep-alive, K requests
// per connection (the last one says "Connection: close"). Each response must be a 200 whose
// Content-Length and body equal FILE byte for byte. It stops after N requests, after S seconds,
// or on SIGTERM/SIGINT (requests in flight are finished), whichever comes first.
//
// A keep-alive connection that the server closes before sending any byte of the next response is
// the race every HTTP client meets (RFC 9112 9.3.1: retry an idempotent request on a new
// connection); such requests are retried once and counted as `retried`. That race needs the
// server to close idle connections (a restart, a keep-alive limit): more than R retries
// (--max-retries, default 0) fail the run.
// Everything else is a failure: connect error, reset, timeout, short or extra body, mismatch.
//
// Prints `requests N ok N failed N retried R bytes B` and exits 0 only when nothing failed, at
// most R requests were retried, and at least one request was made. --progress-ms prints `progress
// ok N failed F` lines.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
    std::string host = "127.0.0.1";
    int port = 0;
    std::string path;
    std::string expect_file;
    long requests = -1;  // -1: no limit (then --duration-s or a signal ends the run)
    int concurrency = 4;
    int mode = 10;
    int per_conn = 100;
    int duration_s = 0;
    int timeout_s = 10;
    int progress_ms = 0;
    long max_retries = 0;
};

Options g_options;
std::vector<char> g_expected;
std::string g_request_keep_alive;
std::string g_request_last;  // HTTP/1.0, or the last request of a keep-alive connection
sockaddr_storage g_address{};
socklen_t g_address_len = 0;

std::atomic<long> g_claimed{0};
std::atomic<long> g_ok{0};
std::atomic<long> g_failed{0};
std::atomic<long> g_retried{0};
std::atomic<uint64_t> g_bytes{0};
std::atomic<bool> g_stop{false};
Clock::time_point g_deadline = Clock::time_point::max();

std::mutex g_report_mutex;
int g_reported = 0;
constexpr int kMaxReported = 10;

[[noreturn]] void usage_error(const char *format, ...) __attribute__((format(printf, 1, 2)));
void usage_error(const char *format, ...) {
    va_list args;
    va_start(args, format);
    std::fputs("http_check: ", stderr);
    std::vfprintf(stderr, format, args);
    va_end(args);
    std::fputs("\n", stderr);
    std::exit(2);
}

// Counts a failed request and describes the first few on stderr.
void report_failure(const char *format, ...) __attribute__((format(printf, 1, 2)));
void report_failure(const char *format, ...) {
    g_failed.fetch_add(1);
    std::lock_guard lock(g_report_mutex);
    if (g_reported++ >= kMaxReported) return;
    char line[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(line, sizeof(line), format, args);
    va_end(args);
    std::fprintf(stderr, "http_check: request failed: %s\n", line);
}

long to_number(const char *name, const char *text, long low, long high) {
    char *end = nullptr;
    errno = 0;
    const long value = std::strtol(text, &end, 10);
    if (!*text || *end || errno || value < low || value > high)
        usage_error("bad value '%s' for %s", text, name);
    return value;
}

void parse_options(int argc, char **argv) {
    Options &o = g_options;
    for (int i = 1; i < argc; ++i) {
        const std::string_view name = argv[i];
        if (i + 1 >= argc) usage_error("%s needs a value", argv[i]);
        const char *value = argv[++i];
        if (name == "--host") {
            o.host = value;
        } else if (name == "--port") {
            o.port = static_cast<int>(to_number(argv[i - 1], value, 1, 65535));
        } else if (name == "--path") {
            o.path = value;
        } else if (name == "--expect") {
            o.expect_file = value;
        } else if (name == "--requests") {
            o.requests = to_number(argv[i - 1], value, 1, 1'000'000'000);
        } else if (name == "--concurrency") {
            o.concurrency = static_cast<int>(to_number(argv[i - 1], value, 1, 1024));
        } else if (name == "--mode") {
            o.mode = static_cast<int>(to_number(argv[i - 1], value, 10, 11));
        } else if (name == "--per-conn") {
            o.per_conn = static_cast<int>(to_number(argv[i - 1], value, 1, 1'000'000));
        } else if (name == "--duration-s") {
            o.duration_s = static_cast<int>(to_number(argv[i - 1], value, 1, 3600));
        } else if (name == "--timeout-s") {
            o.timeout_s = static_cast<int>(to_number(argv[i - 1], value, 1, 600));
        } else if (name == "--max-retries") {
            o.max_retries = to_number(argv[i - 1], value, 0, 1'000'000'000);
        } else if (name == "--progress-ms") {
            o.progress_ms = static_cast<int>(to_number(argv[i - 1], value, 10, 60'000));
        } else {
            usage_error("unknown option %s", argv[i - 1]);
        }
    }
    if (!o.port || o.path.empty() || o.path[0] != '/' || o.expect_file.empty())
        usage_error(
            "usage: http_check --port P --path /PATH --expect FILE [--requests N] "
            "[--concurrency C] [--mode 10|11] [--per-conn K] [--duration-s S] "
            "[--host ADDR] [--timeout-s T] [--progress-ms M] [--max-retries R]");
    if (o.requests < 0 && !o.duration_s)
        usage_error("give --requests, --duration-s or both: the run must be bounded");
    if (o.mode == 10) o.per_conn = 1;
}

void load_expected() {
    const int fd = open(g_options.expect_file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) usage_error("%s: %s", g_options.expect_file.c_str(), std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0) usage_error("fstat: %s", std::strerror(errno));
    g_expected.resize(static_cast<size_t>(st.st_size));
    size_t done = 0;
    while (done < g_expected.size()) {
        const ssize_t n = read(fd, g_expected.data() + done, g_expected.size() - done);
        if (n <= 0) usage_error("read %s: %s", g_options.expect_file.c_str(), std::strerror(errno));
        done += static_cast<size_t>(n);
    }
    close(fd);
}

void resolve_address() {
    auto *v4 = reinterpret_cast<sockaddr_in *>(&g_address);
    auto *v6 = reinterpret_cast<sockaddr_in6 *>(&g_address);
    if (inet_pton(AF_INET, g_options.host.c_str(), &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(static_cast<uint16_t>(g_options.port));
        g_address_len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, g_options.host.c_str(), &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(static_cast<uint16_t>(g_options.port));
        g_address_len = sizeof(*v6);
    } else {
        usage_error("--host %s is not a numeric address", g_options.host.c_str());
    }
}

void build_requests() {
    const std::string host = g_options.host + ":" + std::to_string(g_options.port);
    if (g_options.mode == 10) {
        g_request_last = "GET " + g_options.path + " HTTP/1.0\r\nHost: " + host + "\r\n\r\n";
    } else {
        const std::string head = "GET " + g_options.path + " HTTP/1.1\r\nHost: " + host + "\r\n";
        g_request_keep_alive = head + "\r\n";
        g_request_last = head + "Connection: close\r\n\r\n";
    }
}

// Takes the next request number, or returns false when the run is over.
bool claim_request() {
    if (g_stop.load(std::memory_order_relaxed) || Clock::now() >= g_deadline) return false;
    const long n = g_claimed.fetch_add(1);
    if (g_options.requests >= 0 && n >= g_options.requests) {
        g_claimed.fetch_sub(1);
        return false;
    }
    return true;
}

bool more_requests_left() {
    if (g_stop.load(std::memory_order_relaxed) || Clock::now() >= g_deadline) return false;
    return g_options.requests < 0 || g_claimed.load() < g_options.requests;
}

// A connection's outcome for one request.
enum class Outcome {
    kOk,         // a correct response; the connection may carry another
    kOkClosed,   // a correct response, and the server closes the connection after it
    kRetryable,  // the server closed a reused connection before any response byte
    kFailed,     // reported already
};

class Connection {
  public:
    ~Connection() { close_socket(); }

    bool open() {
        fd_ = socket(g_address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd_ < 0) {
            report_failure("socket: %s", std::strerror(errno));
            return false;
        }
        // SO_SNDTIMEO bounds connect() too; SO_RCVTIMEO every recv.
        timeval timeout{g_options.timeout_s, 0};
        setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
        setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
        const int one = 1;
        setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd_, reinterpret_cast<const sockaddr *>(&g_address), g_address_len) != 0) {
            report_failure("connect: %s", std::strerror(errno));
            close_socket();
            return false;
        }
        used_ = 0;
        buffered_ = 0;
        return true;
    }

    void close_socket() {
        if (fd_ >= 0) close(fd_);
        fd_ = -1;
    }

    int requests_made() const { return used_; }

    Outcome exchange(bool last) {
        const bool reused = used_ > 0;
        ++used_;
        const std::string &request =
            (g_options.mode == 10 || last) ? g_request_last : g_request_keep_alive;
        if (!send_all(request)) {
            if (reused && (errno == EPIPE || errno == ECONNRESET)) return Outcome::kRetryable;
            report_failure("send: %s", std::strerror(errno));
            return Outcome::kFailed;
        }
        return read_response(reused);
    }

  private:
    bool send_all(const std::string &data) {
        size_t done = 0;
        while (done < data.size()) {
            const ssize_t n = send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return false;
            done += static_cast<size_t>(n);
        }
        return true;
    }

    // Reads more bytes into buffer_ after the `buffered_` already there. Returns the count,
    // 0 at EOF, -1 with errno on an error (EAGAIN: the timeout).
    ssize_t fill() {
        for (;;) {
            const ssize_t n = recv(fd_, buffer_.data() + buffered_, buffer_.size() - buffered_, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n > 0) buffered_ += static_cast<size_t>(n);
            return n;
        }
    }

    static const char *error_text(ssize_t n) {
        if (n == 0) return "EOF";
        if (errno == EAGAIN || errno == EWOULDBLOCK) return "timed out";
        return std::strerror(errno);
    }

    Outcome read_response(bool reused) {
        // Head: up to the blank line, all of it in buffer_.
        size_t head_end = 0;
        for (;;) {
            const std::string_view seen(buffer_.data(), buffered_);
            const size_t blank = seen.find("\r\n\r\n");
            if (blank != std::string_view::npos) {
                head_end = blank + 4;
                break;
            }
            if (buffered_ == buffer_.size()) {
                report_failure("response head longer than %zu bytes", buffer_.size());
                return Outcome::kFailed;
            }
            const ssize_t n = fill();
            if (n <= 0) {
                if (reused && buffered_ == 0 && (n == 0 || errno == ECONNRESET))
                    return Outcome::kRetryable;
                report_failure("reading the response head (%zu bytes in): %s", buffered_,
                               error_text(n));
                return Outcome::kFailed;
            }
        }
        bool server_closes = g_options.mode == 10;
        long content_length = -1;
        if (!parse_head(std::string_view(buffer_.data(), head_end), content_length, server_closes))
            return Outcome::kFailed;
        if (content_length != static_cast<long>(g_expected.size())) {
            report_failure("Content-Length %ld, expected %zu", content_length, g_expected.size());
            return Outcome::kFailed;
        }
        // Body: compare in place as it arrives; buffer_ is reused from its start.
        size_t body_seen = 0;
        size_t available = buffered_ - head_end;
        size_t from = head_end;
        const size_t body_bytes = g_expected.size();
        for (;;) {
            const size_t take = std::min(available, body_bytes - body_seen);
            if (take && std::memcmp(buffer_.data() + from, g_expected.data() + body_seen, take)) {
                report_failure("body differs within bytes [%zu, %zu)", body_seen, body_seen + take);
                return Outcome::kFailed;
            }
            body_seen += take;
            if (body_seen == body_bytes) {
                // Whatever follows belongs to the next response (none should, unpipelined).
                const size_t extra = available - take;
                if (extra) {
                    report_failure("%zu bytes after the body", extra);
                    return Outcome::kFailed;
                }
                buffered_ = 0;
                break;
            }
            buffered_ = 0;
            const ssize_t n = fill();
            if (n <= 0) {
                report_failure("body cut short at %zu of %zu bytes: %s", body_seen, body_bytes,
                               error_text(n));
                return Outcome::kFailed;
            }
            from = 0;
            available = buffered_;
        }
        buffered_ = 0;
        g_bytes.fetch_add(body_bytes, std::memory_order_relaxed);
        if (!server_closes) return Outcome::kOk;
        // The server said it closes: its FIN must follow the body, and nothing else.
        const ssize_t n = fill();
        if (n != 0) {
            report_failure("expected the server's close after the body, got %s",
                           n > 0 ? "more bytes" : error_text(n));
            return Outcome::kFailed;
        }
        return Outcome::kOkClosed;
    }

    static bool equals_lower(std::string_view text, std::string_view lower) {
        if (text.size() != lower.size()) return false;
        for (size_t i = 0; i < text.size(); ++i)
            if (std::tolower(static_cast<unsigned char>(text[i])) != lower[i]) return false;
        return true;
    }

    static std::string_view trim(std::string_view text) {
        while (!text.empty() && (text.front() == ' ' || text.front() == '\t'))
            text.remove_prefix(1);
        while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
        return text;
    }

    static bool parse_head(std::string_view head, long &content_length, bool &server_closes) {
        size_t line_end = head.find("\r\n");
        const std::string_view status_line = head.substr(0, line_end);
        if (status_line.size() < 12 || status_line.substr(0, 7) != "HTTP/1." ||
            status_line.substr(8, 5) != " 200 ") {
            report_failure("status line '%.*s'", static_cast<int>(status_line.size()),
                           status_line.data());
            return false;
        }
        // An HTTP/1.0 response closes unless it says keep-alive; we never ask for that.
        if (status_line.substr(0, 8) == "HTTP/1.0") server_closes = true;
        while (line_end + 2 < head.size()) {
            const size_t start = line_end + 2;
            line_end = head.find("\r\n", start);
            const std::string_view line = head.substr(start, line_end - start);
            if (line.empty()) break;
            const size_t colon = line.find(':');
            if (colon == std::string_view::npos) continue;
            const std::string_view name = line.substr(0, colon);
            const std::string_view value = trim(line.substr(colon + 1));
            if (equals_lower(name, "content-length")) {
                content_length = 0;
                for (char c : value) {
                    if (c < '0' || c > '9' || content_length > (1L << 40)) {
                        report_failure("bad Content-Length '%.*s'", static_cast<int>(value.size()),
                                       value.data());
                        return false;
                    }
                    content_length = content_length * 10 + (c - '0');
                }
            } else if (equals_lower(name, "transfer-encoding")) {
                report_failure("unexpected Transfer-Encoding '%.*s'",
                               static_cast<int>(value.size()), value.data());
                return false;
            } else if (equals_lower(name, "connection") && equals_lower(value, "close")) {
                server_closes = true;
            }
        }
        return true;
    }

    int fd_ = -1;
    int used_ = 0;
    size_t buffered_ = 0;
    std::vector<char> buffer_ = std::vector<char>(256 * 1024);
};

void run_client() {
    Connection connection;
    bool open = false;
    bool retrying = false;  // the claimed request is being retried on a fresh connection
    while (retrying || claim_request()) {
        if (!open) {
            if (!connection.open()) {
                retrying = false;
                continue;
            }
            open = true;
        }
        const bool last = connection.requests_made() + 1 >= g_options.per_conn;
        const Outcome outcome = connection.exchange(last);
        if (outcome == Outcome::kRetryable && !retrying) {
            g_retried.fetch_add(1);
            retrying = true;
            connection.close_socket();
            open = false;
            continue;
        }
        if (outcome == Outcome::kRetryable) report_failure("closed again before any response");
        retrying = false;
        if (outcome == Outcome::kOk || outcome == Outcome::kOkClosed)
            g_ok.fetch_add(1, std::memory_order_relaxed);
        const bool keep = outcome == Outcome::kOk && !last && more_requests_left();
        if (!keep) {
            connection.close_socket();
            open = false;
        }
    }
}

void on_stop_signal(int) {
    g_stop.store(true);
}

}  // namespace

int main(int argc, char **argv) {
    parse_options(argc, argv);
    load_expected();
    resolve_address();
    build_requests();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGINT, &action, nullptr);

    const auto start = Clock::now();
    if (g_options.duration_s) g_deadline = start + std::chrono::seconds(g_options.duration_s);
    std::atomic<int> running{g_options.concurrency};
    std::vector<std::thread> threads;
    for (int i = 0; i < g_options.concurrency; ++i)
        threads.emplace_back([&running] {
            run_client();
            running.fetch_sub(1);
        });
    auto next_progress = start + std::chrono::milliseconds(g_options.progress_ms);
    while (running.load() > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (g_options.progress_ms && Clock::now() >= next_progress) {
            std::printf("progress ok %ld failed %ld\n", g_ok.load(), g_failed.load());
            std::fflush(stdout);
            next_progress += std::chrono::milliseconds(g_options.progress_ms);
        }
    }
    for (auto &thread : threads) thread.join();

    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const long ok = g_ok.load(), failed = g_failed.load(), retried = g_retried.load();
    std::printf("requests %ld ok %ld failed %ld retried %ld bytes %llu\n", ok + failed, ok, failed,
                retried, static_cast<unsigned long long>(g_bytes.load()));
    std::fprintf(stderr, "http_check: %.2f s, %.0f requests/s\n", seconds,
                 seconds > 0 ? static_cast<double>(ok) / seconds : 0.0);
    if (retried > g_options.max_retries)
        std::fprintf(stderr,
                     "http_check: %ld requests needed a retry, more than --max-retries %ld\n",
                     retried, g_options.max_retries);
    std::fflush(stdout);
    return (failed == 0 && ok > 0 && retried <= g_options.max_retries) ? 0 : 1;
}
