#include "control_listener.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "log.hpp"

namespace tcps::engine {

namespace {

// mkdir -p for the socket's directory; new directories get 0755.
bool make_parent_dirs(const std::string &path, std::string &error) {
    const size_t slash = path.rfind('/');
    if (slash == std::string::npos || slash == 0) return true;
    const std::string dir = path.substr(0, slash);
    for (size_t pos = 1; pos <= dir.size(); ++pos) {
        if (pos != dir.size() && dir[pos] != '/') continue;
        const std::string prefix = dir.substr(0, pos);
        if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
            error = "cannot create " + prefix + ": " + std::strerror(errno);
            return false;
        }
    }
    return true;
}

}  // namespace

ListenResult open_control_socket(const std::string &path, int &listener, ino_t &inode,
                                 std::string &error) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof(addr.sun_path)) {
        error = "socket path too long: " + path;
        return ListenResult::kFailed;
    }
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (!make_parent_dirs(path, error)) return ListenResult::kFailed;

    struct stat st;
    if (lstat(path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            error = path + " exists and is not a socket";
            return ListenResult::kFailed;
        }
        // A live engine answers; only a dead one's file may be removed.
        const int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (probe >= 0) {
            const int rc = connect(probe, reinterpret_cast<sockaddr *>(&addr), sizeof(addr));
            close(probe);
            if (rc == 0) {
                error = "another engine is already serving " + path;
                return ListenResult::kBusy;
            }
        }
        if (unlink(path.c_str()) != 0 && errno != ENOENT) {
            error = "cannot remove stale " + path + ": " + std::strerror(errno);
            return ListenResult::kFailed;
        }
        log_line("removed stale control socket %s", path.c_str());
    }

    listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener < 0) {
        error = std::string("socket: ") + std::strerror(errno);
        return ListenResult::kFailed;
    }
    if (bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0) {
        error = "bind " + path + ": " + std::strerror(errno);
        return errno == EADDRINUSE ? ListenResult::kBusy : ListenResult::kFailed;
    }
    // Any local user may use the engine; what each may do is checked per client.
    if (chmod(path.c_str(), 0666) != 0) {
        error = "chmod " + path + ": " + std::strerror(errno);
        return ListenResult::kFailed;
    }
    if (listen(listener, 128) != 0) {
        error = std::string("listen: ") + std::strerror(errno);
        return ListenResult::kFailed;
    }
    inode = lstat(path.c_str(), &st) == 0 ? st.st_ino : 0;
    return ListenResult::kOk;
}

}  // namespace tcps::engine
