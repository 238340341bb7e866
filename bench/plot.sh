#!/usr/bin/env bash
# Draws the experiments' plots (SVG, gnuplot) from their CSVs:
#   op-cost.svg                           experiment 1: CPU per send()/recv() call, native
#                                         against offloaded (application + engine), per size
#   latency.svg                           experiment 2: round trip p50 and p99, per tool and size
#   throughput.svg                        experiment 3: Gbit/s and CPU-seconds per GB, native
#                                         against offloaded (applications + engine)
#   apache-http10.svg, apache-http11.svg  replies/s against offered load, native and offloaded,
#                                         medians with the [min-max] of runs (Figures 9-11 of
#                                         the TCP Servers paper)
#   apache-cpu.svg                        CPU used (cores) against offered load: Apache native,
#                                         Apache offloaded, the engine (its Figure 12)
#   cpu-per-request.svg                   CPU per request, native against offloaded split into
#                                         the server's processes and the engine, per experiment
# A plot whose CSV is missing is left out.
#
# Usage: bash bench/plot.sh [RESULTS_DIR [OUT_DIR]]   (default: bench/results for both)
set -euo pipefail
cd "$(dirname "$0")/.."

results=${1:-bench/results}
out=${2:-$results}
command -v gnuplot >/dev/null 2>&1 || { echo "plot.sh: gnuplot is not installed" >&2; exit 1; }
mkdir -p "$out"
data=$(mktemp -d "${TMPDIR:-/tmp}/tcps-plot.XXXXXX")
trap 'rm -rf "$data"' EXIT
python3 bench/webtool.py plot-data "$results" "$data"

common='set terminal svg size 720,440 dynamic font "sans,12" background "white"
set grid
set key top left Left reverse font ",10" samplen 2 spacing 0.9
set style line 1 lc rgb "#1f77b4" lw 2 pt 7 ps 0.8
set style line 2 lc rgb "#d62728" lw 2 pt 5 ps 0.8
set style line 3 lc rgb "#2ca02c" lw 2 pt 9 ps 0.8
set style line 4 lc rgb "#7f7f7f" lw 1 dt 2'

sweep_plot() {  # $1 dat name, $2 title, $3 x label, $4 output
    [[ -s $data/$1 ]] || return 0
    gnuplot <<EOF
$common
set output "$out/$4"
set title "$2"
set xlabel "$3"
set ylabel "replies/s"
set key bottom right
set yrange [0:*]
set xrange [0:*]
plot x ls 4 title "offered", \
     "$data/$1" using 1:2:7:8 with yerrorlines ls 1 title "native", \
     "$data/$1" using 1:3:9:10 with yerrorlines ls 2 title "offloaded (tcpsd)"
EOF
    echo "plot.sh: $out/$4"
}
sweep_plot sweep-http10.dat "Apache, 16 KB file, HTTP/1.0 (httperf, 1 request per connection)" \
    "offered load (connections/s)" apache-http10.svg
sweep_plot sweep-http11.dat "Apache, 16 KB file, HTTP/1.1 (httperf, 6 requests per connection, bursts of 3)" \
    "offered load (requests/s)" apache-http11.svg

cpu_panel() {  # $1 dat name, $2 title, $3 x label: one panel of apache-cpu.svg
    cat <<EOF
set title "$2"
set xlabel "$3"
plot "$data/$1" using (\$1 / 1000):4 with linespoints ls 1 title "native: Apache", \
     "$data/$1" using (\$1 / 1000):5 with linespoints ls 2 title "offloaded: Apache", \
     "$data/$1" using (\$1 / 1000):6 with linespoints ls 3 title "offloaded: engine", \
     "$data/$1" using (\$1 / 1000):(\$5 + \$6) with linespoints ls 4 lw 2 title "offloaded: Apache + engine"
EOF
}
panels=()
[[ -s $data/sweep-http10.dat ]] &&
    panels+=("$(cpu_panel sweep-http10.dat "HTTP/1.0" "offered load (thousand connections/s)")")
[[ -s $data/sweep-http11.dat ]] &&
    panels+=("$(cpu_panel sweep-http11.dat "HTTP/1.1 (6 requests per connection)" "offered load (thousand requests/s)")")
if ((${#panels[@]} > 0)); then
    gnuplot <<EOF
$common
set terminal svg size $((480 * ${#panels[@]})),440 dynamic font "sans,12" background "white"
set output "$out/apache-cpu.svg"
set multiplot layout 1,${#panels[@]} title "Apache, 16 KB file: CPU used against offered load"
set ylabel "CPU (cores)"
set yrange [0:2]
set xrange [0:*]
set key top left Left reverse font ",10" samplen 2 spacing 0.9
$(printf '%s\n' "${panels[@]}")
unset multiplot
EOF
    echo "plot.sh: $out/apache-cpu.svg"
fi

if [[ $(grep -vc '^#' "$data/cpu-bars.dat") -gt 0 ]]; then
    gnuplot <<EOF
$common
set terminal svg size 960,480 dynamic font "sans,11" background "white"
set output "$out/cpu-per-request.svg"
set title "CPU per request: native (left bar) against offloaded (right bar: server + engine)"
set ylabel "CPU µs per request"
set yrange [0:*]
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid noxtics
set key top right
set xtics nomirror
set bmargin 5
plot "$data/cpu-bars.dat" using (3*\$0 + 0.5):(0):xticlabels(strcol(1) . "\n" . strcol(2)) \
         with points ps 0 notitle, \
     "" using (3*\$0):3 with boxes lc rgb "#1f77b4" title "native: server processes", \
     "" using (3*\$0 + 1):(\$4 + \$5) with boxes lc rgb "#2ca02c" title "offloaded: engine", \
     "" using (3*\$0 + 1):4 with boxes lc rgb "#d62728" title "offloaded: server processes"
EOF
    echo "plot.sh: $out/cpu-per-request.svg"
fi

# Experiments 1-3: bars side by side, native left, offloaded right (stacked where the engine
# adds to the application's CPU).
stacked_bars() {  # $1 dat, $2 output, $3 title, $4 y label, $5 native col, $6 app col, $7 engine col
    gnuplot <<EOF
$common
set terminal svg size 960,440 dynamic font "sans,11" background "white"
set output "$out/$2"
set title "$3"
set ylabel "$4"
set yrange [0:*]
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid noxtics
set key top left
set xtics nomirror
plot "$data/$1" using (3*\$0 + 0.5):(0):xticlabels(1) with points ps 0 notitle, \
     "" using (3*\$0):$5 with boxes lc rgb "#1f77b4" title "native", \
     "" using (3*\$0 + 1):(\$$6 + \$$7) with boxes lc rgb "#2ca02c" title "offloaded: engine", \
     "" using (3*\$0 + 1):$6 with boxes lc rgb "#d62728" title "offloaded: application"
EOF
    echo "plot.sh: $out/$2"
}
[[ -s $data/op-cost.dat ]] && stacked_bars op-cost.dat op-cost.svg \
    "Experiment 1: CPU per call on the application's side (and the engine's)" "CPU ns per call" 2 3 4
if [[ -s $data/latency.dat ]]; then
    gnuplot <<EOF
$common
set terminal svg size 960,440 dynamic font "sans,11" background "white"
set output "$out/latency.svg"
set title "Experiment 2: round-trip latency, ping-pong"
set ylabel "µs"
set yrange [0:*]
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set grid noxtics
set key top left
plot "$data/latency.dat" using 2:xticlabels(1) lc rgb "#1f77b4" title "native p50", \
     "" using 3 lc rgb "#d62728" title "offloaded p50", \
     "" using 4 lc rgb "#9ecae1" title "native p99", \
     "" using 5 lc rgb "#fc9272" title "offloaded p99"
EOF
    echo "plot.sh: $out/latency.svg"
fi
if [[ -s $data/throughput.dat ]]; then
    gnuplot <<EOF
$common
set terminal svg size 960,440 dynamic font "sans,11" background "white"
set output "$out/throughput.svg"
set multiplot layout 1,2 title "Experiment 3: bulk throughput, iperf3"
set style fill solid 0.85 border -1
set grid noxtics
set key top left
set yrange [0:*]
set style data histograms
set style histogram clustered gap 1
set title "throughput"
set ylabel "Gbit/s"
plot "$data/throughput.dat" using 2:xticlabels(1) lc rgb "#1f77b4" title "native", \
     "" using 3 lc rgb "#d62728" title "offloaded"
set style data boxes
set boxwidth 0.9
set title "CPU per GB received"
set ylabel "CPU-seconds per GB"
plot "$data/throughput.dat" using (3*\$0 + 0.5):(0):xticlabels(1) with points ps 0 notitle, \
     "" using (3*\$0):4 lc rgb "#1f77b4" title "native: iperf3s", \
     "" using (3*\$0 + 1):(\$5 + \$6) lc rgb "#2ca02c" title "offloaded: engine", \
     "" using (3*\$0 + 1):5 lc rgb "#d62728" title "offloaded: iperf3s"
unset multiplot
EOF
    echo "plot.sh: $out/throughput.svg"
fi
