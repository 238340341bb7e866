// The shim's fd table: a flat array of packed atomic entries indexed by fd number.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <thread>
#include <vector>

#include "fd_table.hpp"
#include "layout.hpp"

using tcps::shim::FdKind;
using tcps::shim::FdRef;
using tcps::shim::FdTable;

TEST_CASE("an fd table entry packs kind, slot and generation into one word") {
    const FdRef socket = FdRef::socket(4095, 0xfffffffeu);
    CHECK(socket.kind() == FdKind::kSocket);
    CHECK(socket.slot() == 4095);
    CHECK(socket.generation() == 0xfffffffeu);
    CHECK_FALSE(socket.empty());
    // The last slot of the last chunk: slot numbers take 20 bits.
    const FdRef last = FdRef::socket(tcps::ipc::kMaxSockets - 1, 7);
    CHECK(last.kind() == FdKind::kSocket);
    CHECK(last.slot() == tcps::ipc::kMaxSockets - 1);
    CHECK(last.generation() == 7);

    const FdRef epoll = FdRef::epoll(0);
    CHECK(epoll.kind() == FdKind::kEpoll);
    CHECK(epoll.id() == 0);
    CHECK_FALSE(epoll.empty());  // id 0 is a valid registry

    CHECK(FdRef::internal().kind() == FdKind::kInternal);
    CHECK(FdRef{}.empty());
    CHECK(FdRef{}.kind() == FdKind::kNone);
    CHECK(FdRef::socket(1, 2) == FdRef::socket(1, 2));
    CHECK_FALSE(FdRef::socket(1, 2) == FdRef::socket(1, 3));
}

TEST_CASE("an uninitialised fd table misses every lookup") {
    FdTable table;
    CHECK(table.size() == 0);
    CHECK(table.get(0).empty());
    CHECK(table.get(-1).empty());
    CHECK_FALSE(table.set(3, FdRef::socket(0, 1)));
}

TEST_CASE("set, get and take an entry; out-of-range fds are refused") {
    FdTable table;
    REQUIRE(table.init(1024));
    CHECK(table.size() == 1024);
    CHECK(table.get(5).empty());
    REQUIRE(table.set(5, FdRef::socket(7, 1)));
    CHECK(table.get(5) == FdRef::socket(7, 1));
    CHECK(table.limit() == 6);

    CHECK_FALSE(table.set(1024, FdRef::socket(7, 1)));
    CHECK_FALSE(table.set(-3, FdRef::socket(7, 1)));
    CHECK(table.get(1024).empty());
    CHECK(table.get(-3).empty());
    CHECK(table.get(1 << 30).empty());

    CHECK(table.take(5) == FdRef::socket(7, 1));
    CHECK(table.get(5).empty());
    CHECK(table.take(5).empty());
    table.destroy();
}

TEST_CASE("take_if clears an entry only if it still names the same socket") {
    FdTable table;
    REQUIRE(table.init(64));
    table.set(9, FdRef::socket(3, 8));
    CHECK_FALSE(table.take_if(9, FdRef::socket(3, 7)));  // an older socket at that number
    CHECK(table.get(9) == FdRef::socket(3, 8));
    CHECK(table.take_if(9, FdRef::socket(3, 8)));
    CHECK(table.get(9).empty());
    table.destroy();
}

TEST_CASE("after fork the table forgets sockets and internal fds but keeps epoll registries") {
    FdTable table;
    REQUIRE(table.init(256));
    table.set(3, FdRef::socket(1, 1));
    table.set(200, FdRef::internal());
    table.set(7, FdRef::epoll(2));
    table.forget_all();
    CHECK(table.get(3).empty());
    CHECK(table.get(200).empty());
    CHECK(table.get(7) == FdRef::epoll(2));
    table.destroy();
}

TEST_CASE("concurrent take_if of one entry succeeds exactly once") {
    FdTable table;
    REQUIRE(table.init(16));
    for (int round = 0; round < 200; ++round) {
        table.set(4, FdRef::socket(2, static_cast<uint32_t>(round)));
        std::atomic<int> winners{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < 4; ++t)
            threads.emplace_back([&] {
                if (table.take_if(4, FdRef::socket(2, static_cast<uint32_t>(round)))) ++winners;
            });
        for (auto &thread : threads) thread.join();
        CHECK(winners.load() == 1);
    }
    table.destroy();
}
