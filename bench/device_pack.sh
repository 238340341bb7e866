#!/usr/bin/env bash
# Packs what bench/device_run.sh needs into .device/ (ignored by git) for a machine that has
# neither our build nor the packages and reaches no registry (the 16-core device machine):
# tcpsd, libtcps.so and the benchmark programs, Apache (the binary, the modules it loads,
# mime.types), wrk, curl, ss and pgrep, each with the shared libraries it loads except glibc's own
# (the machine's newer glibc runs what was built against Debian 12's). Each program runs
# through a wrapper in .device/bin (or at its place under .device/build) that points
# LD_LIBRARY_PATH at .device/lib for that program alone, so the machine's own programs keep
# their libraries. About 20 MB; the device tool carries it with `carry: [".device"]`.
#
# Usage: bash bench/device_pack.sh [BUILD_DIR [OUT_DIR]]   (default: build .device; run
#        bash scripts/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-build}
out=${2:-.device}
die() { echo "device_pack: $*" >&2; exit 1; }
for tool in apache2 wrk curl ss pgrep; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (bash scripts/setup.sh)"
done
for file in engine/tcpsd preload/libtcps.so bench/pingpong bench/op_cost preload/libtcps_memnet.so; do
    [[ -f $build/$file ]] || die "$build/$file is missing (bash scripts/build.sh)"
done

rm -rf "$out"
mkdir -p "$out/bin" "$out/real" "$out/lib" "$out/apache2/modules" "$out/build/engine" \
    "$out/build/preload" "$out/build/bench"

# The libraries $1 loads, glibc's own left out.
copy_libraries() {
    local lib
    for lib in $(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }'); do
        case $(basename "$lib") in
        libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libresolv.so.* | \
            libutil.so.* | libanl.so.* | ld-linux*) continue ;;
        esac
        [[ -e $out/lib/$(basename "$lib") ]] || cp -L "$lib" "$out/lib/"
    done
}

# $1 the program, $2 where its wrapper goes.
wrap() {
    local program=$1 wrapper=$2 real
    real=$out/real/$(basename "$program")
    cp -L "$program" "$real"
    copy_libraries "$program"
    # The wrapper finds .device from its own place, wherever the tree was copied to.
    cat >"$wrapper" <<EOF
#!/bin/sh
device=\$(dirname "\$(readlink -f "\$0")")
while [ ! -d "\$device/real" ]; do
    [ "\$device" = / ] && { echo "\$0: no .device/real above it" >&2; exit 127; }
    device=\$(dirname "\$device")
done
LD_LIBRARY_PATH="\$device/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$device/real/$(basename "$program")" "\$@"
EOF
    chmod +x "$wrapper"
}

for tool in apache2 wrk curl ss pgrep; do wrap "$(command -v "$tool")" "$out/bin/$tool"; done
wrap "$build/engine/tcpsd" "$out/build/engine/tcpsd"
wrap "$build/bench/pingpong" "$out/build/bench/pingpong"
wrap "$build/bench/op_cost" "$out/build/bench/op_cost"
# Preloaded or linked by path: needs only libgcc_s and glibc (checked here), no wrapper.
cp "$build/preload/libtcps.so" "$build/preload/libtcps_memnet.so" "$out/build/preload/"
copy_libraries "$build/preload/libtcps.so"
for module in mpm_event mpm_worker mpm_prefork authz_core mime; do
    cp "/usr/lib/apache2/modules/mod_$module.so" "$out/apache2/modules/"
    copy_libraries "/usr/lib/apache2/modules/mod_$module.so"
done
cp /etc/mime.types "$out/mime.types"
# Debug sections are most of the size and of no use there (it has no perf or gdb).
find "$out" -type f \( -name '*.so*' -o -path "$out/real/*" \) -exec chmod u+w {} + \
    -exec strip --strip-debug {} +
echo "device_pack: $(du -sh "$out" | cut -f1) in $out" >&2
