#!/usr/bin/env bash
# Installs what tcps needs to build, test and demo on Debian 12. Idempotent and quiet: when
# everything is already installed it touches nothing (no apt-get update) and needs no root.
set -euo pipefail

packages=(meson ninja-build pkg-config g++ libfabric-dev liburing-dev catch2 libboost-dev python3
    curl redis-server redis-tools iperf3 iproute2 clang-format wrk procps strace sockperf
    apache2 nginx-light httperf gnuplot-nox nftables memcached libmemcached-tools lighttpd haproxy
    nodejs postgresql linux-perf)

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0

if ((EUID != 0)); then
    echo "setup.sh: missing packages: ${missing[*]}" >&2
    echo "run as root:  sudo bash scripts/setup.sh" >&2
    echo "or install:   sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Packages such as redis-server start their service from the maintainer scripts. A policy-rc.d
# that answers 101 ("action forbidden") keeps invoke-rc.d from starting anything during the
# install; the tests run their own servers on their own ports.
policy=/usr/sbin/policy-rc.d
installed_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    installed_policy=1
fi
remove_policy() { ((installed_policy)) && rm -f "$policy"; return 0; }
trap remove_policy EXIT

log=$(mktemp)
if ! { apt-get -qq update && apt-get -qq install -y --no-install-recommends "${missing[@]}"; } \
    >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup.sh: apt-get failed" >&2
    exit 1
fi
rm -f "$log"

# Under systemd the units were still enabled for the next boot: disable the services this run
# installed (never ones the machine had before), and stop them if anything started them.
for entry in redis-server:redis-server iperf3:iperf3 apache2:apache2 nginx-light:nginx \
    memcached:memcached lighttpd:lighttpd haproxy:haproxy postgresql:postgresql; do
    package=${entry%%:*} service=${entry#*:}
    [[ " ${missing[*]} " == *" $package "* ]] || continue
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
    if [[ -x /etc/init.d/$service ]]; then
        /etc/init.d/"$service" stop >/dev/null 2>&1 || true
    fi
done
exit 0
