#!/usr/bin/env bash
# PostgreSQL under the shim (a cluster made with initdb in the test directory, run as the
# postgres user, listening on a loopback TCP port), with the engine on its own core. The
# postmaster forks a backend per connection, each a member of the postmaster's tcps session.
# pgbench -i loads the tables over TCP (COPY), then pgbench runs TPC-B-like transactions: plain
# (8 clients), preloaded (8 clients), and preloaded with a new connection, so a new backend,
# per transaction (-C). pgbench must report every transaction processed and none failed, and
# the balances must add up afterwards (every account, teller and branch change equals the
# history). Through psql over offloaded TCP, a 16 MB COPY in and out must give back what went
# in, and a 2.7 MB query result must equal the same through the Unix socket (kernel, not TCP).
# ss proves that the listener and the backends' connections were tcpsd's; PostgreSQL must log
# no error, and after a fast shutdown the engine holds nothing.
#
# Development knob: TCPS_NATIVE=1 (kernel TCP, see servers_lib.sh).
set -euo pipefail
# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

pg_bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
    sort -V | tail -n 1)
[[ -n $pg_bin && -x $pg_bin/postgres && -x $pg_bin/pgbench ]] ||
    skip "PostgreSQL's server and pgbench are not installed (bash scripts/setup.sh)"
for tool in initdb psql pg_isready; do
    [[ -x $pg_bin/$tool ]] || skip "$pg_bin/$tool is missing"
done
((EUID == 0)) || skip "needs root, to run PostgreSQL as the postgres user"
id postgres >/dev/null 2>&1 || skip "there is no postgres user"
need_tool ss timeout setpriv sha256sum base64
[[ -n $PYTHON ]] || skip "python3 is not installed"

dir=$TCPS_TEST_DIR
data=$dir/pgdata
sockets=$dir/pgsocket
mkdir -p "$data" "$sockets"
chmod 755 "$dir"  # the postgres user must reach its directories
chown postgres: "$data" "$sockets"
chmod 700 "$data"
as_postgres=(setpriv --reuid postgres --regid postgres --init-groups --)

log "initdb ($("$pg_bin/postgres" --version))"
"${as_postgres[@]}" "$pg_bin/initdb" -D "$data" -U postgres -A trust --no-sync \
    >"$dir/initdb.log" 2>&1 || fail "initdb failed: $(tail -n 5 "$dir/initdb.log")"

start_offload
port=$(free_port)
# fsync off: the test is about the network, not the disk.
"${as_postgres[@]}" "${OFFLOAD[@]}" "$pg_bin/postgres" -D "$data" -p "$port" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories="$sockets" -c max_connections=40 \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB \
    >"$dir/postgres.log" 2>&1 &
server_pid=$!
track "$server_pid"
pg_ready() { "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 1; }
wait_until 30 pg_ready ||
    fail "PostgreSQL does not accept connections: $(tail -n 5 "$dir/postgres.log")"
log "postmaster pid $server_pid on port $port"
if offloaded; then
    expect_engine_listener "$port" "$server_pid"
fi

# psql over TCP (plain or preloaded: $1) or over the Unix socket (unix); the rest are psql's.
sql() {
    local how=$1 runner=()
    shift
    case $how in
        preloaded) runner=("${OFFLOAD[@]}" "$pg_bin/psql" -h 127.0.0.1 -p "$port") ;;
        plain) runner=("$pg_bin/psql" -h 127.0.0.1 -p "$port") ;;
        unix) runner=("$pg_bin/psql" -h "$sockets" -p "$port") ;;
    esac
    timeout 120 "${runner[@]}" -U postgres -d postgres -X -q -At -v ON_ERROR_STOP=1 "$@"
}

# pgbench under runner $1 (plain or preloaded), name $2, its options $3...; the server side of
# port $port is recorded while it runs, and nobody but tcpsd may own it.
PGBENCH_TX=0
bench() {
    local how=$1 name=$2 runner=() status=0 pid out=$dir/pgbench-$2.out
    shift 2
    if [[ $how == preloaded ]]; then runner=("${OFFLOAD[@]}"); fi
    "${runner[@]}" "$pg_bin/pgbench" -h 127.0.0.1 -p "$port" -U postgres "$@" postgres \
        >"$out" 2>&1 &
    pid=$!
    track "$pid"
    record_server_side "$port" "$pid" 120 "$dir/ss-$name.txt"
    wait_pid "$pid" 120 || status=$?
    grep -E '^(number of|latency average|tps|done in)' "$out" | sed 's/^/  pgbench: /'
    ((status == 0)) || fail "pgbench $name exited with status $status: $(tail -n 5 "$out")"
    expect_no_strangers "$dir/ss-$name.txt" "$port"
    if offloaded; then
        grep -q "pid=$ENGINE_PID," "$dir/ss-$name.txt" ||
            fail "no backend connection of tcpsd's was seen while pgbench $name ran"
    fi
}
# Every transaction pgbench $1 asked for ($2 of them) was processed, and none failed.
expect_all_done() {
    local out=$dir/pgbench-$1.out want=$2
    grep -q "^number of transactions actually processed: $want/$want\$" "$out" ||
        fail "pgbench $1 did not process all $want transactions"
    grep -q '^number of failed transactions: 0 ' "$out" || fail "pgbench $1 had failed transactions"
    PGBENCH_TX=$((PGBENCH_TX + want))
}

log "pgbench -i -s 2 (plain): 200,000 accounts loaded with COPY over TCP"
bench plain init -i -s 2 -q
sql plain -c 'select count(*) from pgbench_accounts' | grep -qx 200000 ||
    fail "pgbench_accounts does not have 200,000 rows"

log "pgbench (plain): 8 clients, 2 threads, 250 transactions each"
bench plain plain -n -c 8 -j 2 -t 250
expect_all_done plain 2000
log "pgbench (preloaded): 8 clients, 2 threads, 250 transactions each"
bench preloaded preloaded -n -c 8 -j 2 -t 250
expect_all_done preloaded 2000
log "pgbench (preloaded) -C: a new connection and backend per transaction, 4 clients x 50"
bench preloaded connect -n -C -c 4 -j 2 -t 50
expect_all_done connect 200

log "the balances add up after $PGBENCH_TX transactions"
sums=$(sql preloaded -F ' ' -c "select (select count(*) from pgbench_history),
    (select coalesce(sum(delta), 0) from pgbench_history),
    (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers),
    (select sum(bbalance) from pgbench_branches)")
log "  history rows, sum(delta), sum(abalance), sum(tbalance), sum(bbalance): $sums"
read -r rows delta accounts tellers branches <<<"$sums"
((rows == PGBENCH_TX)) || fail "pgbench_history has $rows rows, expected $PGBENCH_TX"
[[ $accounts == "$delta" && $tellers == "$delta" && $branches == "$delta" ]] ||
    fail "the balances do not add up: $sums"

log "bytes both ways: 16 MB COPY in and out and a 2.7 MB result, over TCP and the Unix socket"
head -c $((12 << 20)) /dev/urandom | base64 -w 1000 >"$dir/lines.txt"
sql preloaded -c 'create table lines (n serial primary key, line text not null)'
sql preloaded -c '\copy lines (line) from stdin' <"$dir/lines.txt"
sql preloaded -c 'copy (select line from lines order by n) to stdout' >"$dir/lines-tcp.txt"
[[ $(sha256_of "$dir/lines-tcp.txt") == "$(sha256_of "$dir/lines.txt")" ]] ||
    fail "COPY out over TCP differs from what COPY in sent"
query="select i, md5(i::text), repeat(md5((i * 7)::text), 3) from generate_series(1, 20000) i"
sql preloaded -c "$query" >"$dir/query-tcp.txt"
sql unix -c "$query" >"$dir/query-unix.txt"
[[ -s $dir/query-tcp.txt &&
    $(sha256_of "$dir/query-tcp.txt") == "$(sha256_of "$dir/query-unix.txt")" ]] ||
    fail "the query's result over TCP differs from the same over the Unix socket"
log "  $(wc -c <"$dir/lines.txt") bytes in and out," \
    "$(wc -c <"$dir/query-tcp.txt") bytes of result: identical"

# The postmaster still counts on its children: no backend died (a crash restarts them all).
if grep -Eq 'terminated by signal|was terminated|server process .* exited with exit code [^0]' \
    "$dir/postgres.log"; then
    grep -E 'terminated|exited with exit code' "$dir/postgres.log" | head -n 5 >&2
    fail "a PostgreSQL process died"
fi

# Nor did any complain about its sockets (a setsockopt or getsockname that failed, a reset).
# pg_isready may have come while the server was starting up: that answer is no error.
complaints=$(grep -E 'could not|WARNING|ERROR|FATAL|PANIC' "$dir/postgres.log" |
    grep -v 'FATAL:  the database system is starting up' || true)
[[ -z $complaints ]] || fail "PostgreSQL logged errors: $(head -n 5 <<<"$complaints")"

log "fast shutdown (SIGINT)"
kill -INT "$server_pid"
status=0
wait_pid "$server_pid" 30 || status=$?
((status == 0)) || fail "postgres exited with status $status: $(tail -n 5 "$dir/postgres.log")"
expect_engine_empty 20 "$port"
if offloaded; then stop_engine; fi
log "postgresql: all checks passed"
