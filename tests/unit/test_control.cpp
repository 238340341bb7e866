// The control socket protocol (ipc/control.hpp) over an AF_UNIX SOCK_SEQPACKET socketpair.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "control.hpp"

using namespace tcps::ipc;

namespace {

struct SocketPair {
    int engine = -1, client = -1;
    SocketPair() {
        int fds[2];
        REQUIRE(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) == 0);
        engine = fds[0];
        client = fds[1];
    }
    ~SocketPair() {
        if (engine >= 0) close(engine);
        if (client >= 0) close(client);
    }
};

struct Pipe {
    int read_end = -1, write_end = -1;
    Pipe() {
        int fds[2];
        REQUIRE(pipe2(fds, O_CLOEXEC) == 0);
        read_end = fds[0];
        write_end = fds[1];
    }
    ~Pipe() {
        if (read_end >= 0) close(read_end);
        if (write_end >= 0) close(write_end);
    }
    void close_write_end() {
        close(write_end);
        write_end = -1;
    }
};

ControlMessage hello() {
    ControlMessage msg{};
    msg.type = static_cast<uint32_t>(ControlType::kHello);
    msg.version = 1;
    msg.arg = -7;
    msg.session_id = 99;
    return msg;
}

// A pipe's read end sees EOF only when every write end, including received copies, is closed.
bool read_end_sees_eof(int read_end) {
    REQUIRE(fcntl(read_end, F_SETFL, O_NONBLOCK) == 0);
    char byte;
    return read(read_end, &byte, 1) == 0;
}

// Sends `count` copies of `fd` in one SCM_RIGHTS message with a well-formed body.
void send_raw(int sock, const void *body, size_t len, int fd, int count) {
    iovec iov{const_cast<void *>(body), len};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)] = {};
    msghdr header{};
    header.msg_iov = &iov;
    header.msg_iovlen = 1;
    if (count > 0) {
        header.msg_control = control;
        header.msg_controllen = CMSG_SPACE(sizeof(int) * count);
        cmsghdr *cmsg = CMSG_FIRSTHDR(&header);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * count);
        for (int i = 0; i < count; ++i)
            std::memcpy(CMSG_DATA(cmsg) + i * sizeof(int), &fd, sizeof(int));
    }
    REQUIRE(sendmsg(sock, &header, 0) == static_cast<ssize_t>(len));
}

}  // namespace

TEST_CASE("a message without descriptors arrives whole and the fd slots read -1") {
    SocketPair pair;
    REQUIRE(send_control(pair.client, hello(), nullptr, 0) == 0);
    ControlMessage got{};
    int fds[kMaxControlFds] = {5, 5};
    REQUIRE(recv_control(pair.engine, got, fds, kMaxControlFds) == 0);
    CHECK(got.type == static_cast<uint32_t>(ControlType::kHello));
    CHECK(got.version == 1);
    CHECK(got.arg == -7);
    CHECK(got.session_id == 99);
    CHECK(fds[0] == -1);
    CHECK(fds[1] == -1);
}

TEST_CASE("two descriptors arrive close-on-exec and refer to the objects that were sent") {
    SocketPair pair;
    Pipe first, second;
    const int sent[2] = {first.write_end, second.write_end};
    ControlMessage reply{};
    reply.type = static_cast<uint32_t>(ControlType::kHelloReply);
    reply.session_id = 1234;
    REQUIRE(send_control(pair.engine, reply, sent, 2) == 0);
    first.close_write_end();  // only the received copies remain
    second.close_write_end();

    ControlMessage got{};
    int fds[kMaxControlFds];
    REQUIRE(recv_control(pair.client, got, fds, kMaxControlFds) == 0);
    CHECK(got.session_id == 1234);
    REQUIRE(fds[0] >= 0);
    REQUIRE(fds[1] >= 0);
    CHECK((fcntl(fds[0], F_GETFD) & FD_CLOEXEC) != 0);
    CHECK((fcntl(fds[1], F_GETFD) & FD_CLOEXEC) != 0);

    REQUIRE(write(fds[0], "a", 1) == 1);
    REQUIRE(write(fds[1], "b", 1) == 1);
    char byte = 0;
    REQUIRE(read(first.read_end, &byte, 1) == 1);
    CHECK(byte == 'a');
    REQUIRE(read(second.read_end, &byte, 1) == 1);
    CHECK(byte == 'b');
    close(fds[0]);
    close(fds[1]);
    CHECK(read_end_sees_eof(first.read_end));
}

TEST_CASE("a message of the wrong size is EPROTO and its descriptors are closed") {
    SocketPair pair;
    Pipe pipe;
    const char short_body[16] = {};
    send_raw(pair.client, short_body, sizeof(short_body), pipe.write_end, 1);
    pipe.close_write_end();
    ControlMessage got{};
    int fds[kMaxControlFds];
    CHECK(recv_control(pair.engine, got, fds, kMaxControlFds) == -EPROTO);
    CHECK(fds[0] == -1);
    CHECK(read_end_sees_eof(pipe.read_end));
}

TEST_CASE("a message longer than a control message is EPROTO") {
    SocketPair pair;
    const char long_body[sizeof(ControlMessage) + 8] = {};
    REQUIRE(send(pair.client, long_body, sizeof(long_body), 0) ==
            static_cast<ssize_t>(sizeof(long_body)));
    ControlMessage got{};
    int fds[kMaxControlFds];
    CHECK(recv_control(pair.engine, got, fds, kMaxControlFds) == -EPROTO);
}

TEST_CASE("the peer's close reads as ECONNRESET") {
    SocketPair pair;
    close(pair.client);
    pair.client = -1;
    ControlMessage got{};
    int fds[kMaxControlFds];
    CHECK(recv_control(pair.engine, got, fds, kMaxControlFds) == -ECONNRESET);
}

TEST_CASE("more descriptors than the receiver asked for is EPROTO and every one is closed") {
    SocketPair pair;
    Pipe pipe;
    const ControlMessage msg = hello();
    send_raw(pair.client, &msg, sizeof(msg), pipe.write_end, 3);
    pipe.close_write_end();
    ControlMessage got{};
    int fds[1];
    CHECK(recv_control(pair.engine, got, fds, 1) == -EPROTO);
    CHECK(fds[0] == -1);
    CHECK(read_end_sees_eof(pipe.read_end));  // the kept one and the extras: all closed
}

TEST_CASE("a receiver that asks for no descriptors rejects a message that carries one") {
    SocketPair pair;
    Pipe pipe;
    const ControlMessage msg = hello();
    REQUIRE(send_control(pair.client, msg, &pipe.write_end, 1) == 0);
    pipe.close_write_end();
    ControlMessage got{};
    CHECK(recv_control(pair.engine, got, nullptr, 0) == -EPROTO);
    CHECK(read_end_sees_eof(pipe.read_end));
}

TEST_CASE("sending more than kMaxControlFds descriptors is refused with EINVAL") {
    SocketPair pair;
    const int fds[3] = {0, 1, 2};
    CHECK(send_control(pair.client, hello(), fds, kMaxControlFds + 1) == -EINVAL);
    CHECK(send_control(pair.client, hello(), fds, -1) == -EINVAL);
}

TEST_CASE("a non-blocking receive with nothing queued is EAGAIN") {
    SocketPair pair;
    ControlMessage got{};
    int fds[kMaxControlFds];
    CHECK(recv_control(pair.engine, got, fds, kMaxControlFds, MSG_DONTWAIT) == -EAGAIN);
}

TEST_CASE("sending to a closed peer is EPIPE without killing the process") {
    SocketPair pair;
    close(pair.engine);
    pair.engine = -1;
    CHECK(send_control(pair.client, hello(), nullptr, 0) == -EPIPE);  // MSG_NOSIGNAL
}

TEST_CASE("a bad descriptor gives EBADF on both sides") {
    ControlMessage got{};
    int fds[kMaxControlFds];
    CHECK(send_control(-1, hello(), nullptr, 0) == -EBADF);
    CHECK(recv_control(-1, got, fds, kMaxControlFds) == -EBADF);
}

TEST_CASE("the engine socket path comes from TCPS_ENGINE_SOCKET when set, else the default") {
    const char *saved = std::getenv(kEngineSocketEnv);
    const std::string restore = saved ? saved : "";
    setenv(kEngineSocketEnv, "/tmp/some/engine.sock", 1);
    CHECK(engine_socket_path() == "/tmp/some/engine.sock");
    setenv(kEngineSocketEnv, "", 1);
    CHECK(engine_socket_path() == default_engine_socket_path());
    unsetenv(kEngineSocketEnv);
    CHECK(engine_socket_path() == default_engine_socket_path());
    if (getuid() == 0) CHECK(default_engine_socket_path() == "/run/tcps/engine.sock");
    if (saved) setenv(kEngineSocketEnv, restore.c_str(), 1);
}
