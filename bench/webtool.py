#!/usr/bin/env python3
"""Helpers of the web-server benchmarks (bench/apache.sh, bench/conn_rate.sh, bench/plot.sh).

  webtool.py cpu PID...                  CPU ns of each process tree (one line per PID)
  webtool.py httperf REPORT              a CSV fragment from httperf's report
  webtool.py wrk REPORT                  a CSV fragment from wrk --latency's report
  webtool.py sweep-table CSV             tables of an httperf sweep (throughput, latency, CPU)
  webtool.py wrk-table CSV KEY           tables of fixed-concurrency wrk runs, grouped by KEY
  webtool.py plot-data RESULTS_DIR OUT   medians for gnuplot (one .dat file per plot)

CPU of a process tree is user + system time from /proc/PID/stat of every live process in the
tree, plus each one's cutime + cstime: what its children that have exited and been waited for
used. A process that exited is counted once, in its parent; a live one is never in cutime.
"""
import collections
import csv
import os
import re
import statistics
import sys

TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# CPU of process trees

def read_processes():
    """{pid: (ppid, utime + stime + cutime + cstime in ticks)} of every process now."""
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # comm may hold spaces and parentheses: the fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        processes[int(entry)] = (ppid, utime + stime + cutime + cstime)
    return processes


def tree_cpu_ns(root, processes, children):
    if root not in processes:
        return 0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += processes[pid][1]
        todo.extend(children.get(pid, ()))
    return int(total * TICK_NS)


def cmd_cpu(pids):
    processes = read_processes()
    children = collections.defaultdict(list)
    for pid, (ppid, _) in processes.items():
        children[ppid].append(pid)
    for pid in pids:
        print(tree_cpu_ns(int(pid), processes, children))


# ---------------------------------------------------------------------------------------------
# Load generators' reports

def number(pattern, text, group=1, default=None):
    match = re.search(pattern, text)
    if not match:
        if default is None:
            sys.exit(f"webtool: no '{pattern}' in the report")
        return default
    return float(match.group(group))


def cmd_httperf(path):
    """replies,seconds,reply_ms,connection_ms,errors,timeouts,resets,fd_unavail"""
    text = open(path).read()
    seconds = number(r"Total: connections \d+ requests \d+ replies \d+ test-duration ([\d.]+) s",
                     text)
    replies = number(r"Reply status: 1xx=\d+ 2xx=(\d+)", text)
    # No reply at all: httperf prints no reply or connection times.
    reply_ms = number(r"Reply time \[ms\]: response ([\d.]+)", text, default=0.0)
    connection_ms = number(r"Connection time \[ms\]: min [\d.]+ avg [\d.]+ max [\d.]+ median ([\d.]+)",
                           text, default=0.0)
    errors = number(r"Errors: total (\d+)", text)
    timeouts = number(r"client-timo (\d+)", text)
    resets = number(r"connreset (\d+)", text)
    fd_unavail = number(r"fd-unavail (\d+)", text)
    print(f"{int(replies)},{seconds:.3f},{reply_ms:.2f},{connection_ms:.2f},{int(errors)},"
          f"{int(timeouts)},{int(resets)},{int(fd_unavail)}")


def milliseconds(value, unit):
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def cmd_wrk(path):
    """requests,seconds,p50_ms,p99_ms,errors"""
    text = open(path).read()
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    if not match:
        sys.exit("webtool: no request count in wrk's report")
    requests = int(match.group(1))
    seconds = milliseconds(match.group(2), match.group(3)) / 1e3
    latency = {}
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        latency[pct] = milliseconds(*found.groups()) if found else 0.0
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                              text)
    if socket_errors:
        errors += sum(int(v) for v in socket_errors.groups())
    errors += int(number(r"Non-2xx or 3xx responses: (\d+)", text, default=0))
    print(f"{requests},{seconds:.3f},{latency['50']:.3f},{latency['99']:.3f},{errors}")


# ---------------------------------------------------------------------------------------------
# Tables

def fmt(values, digits=0):
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"


def per_request_us(rows, key, count_key):
    """Median of CPU µs per request over runs (runs without a reply are left out)."""
    values = [float(r[key]) / float(r[count_key]) / 1e3 for r in rows if float(r[count_key]) > 0]
    return statistics.median(values) if values else 0.0


def pairs(rows, *keys):
    """(group, native rows, offloaded rows) for each value of the columns `keys` (a tuple), in
    the order first seen, leaving out groups that lack either mode."""
    for group in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        native, off = ([r for r in rows if tuple(r[k] for k in keys) == group and r["mode"] == mode]
                       for mode in ("native", "offloaded"))
        if native and off:
            yield group, native, off


def load_points(rows, workload):
    """(offered load, native rows, offloaded rows) of one httperf workload, lowest load first."""
    return sorted((int(group[0]), native, off) for group, native, off in
                  pairs([r for r in rows if r["workload"] == workload], "offered"))


def cores_used(rows, key):
    return statistics.median([float(r[key]) / float(r["wall_ns"]) for r in rows])


def disturbance(rows):
    """A line saying how much CPU the rest of the machine took during these runs."""
    if not rows or "other_cpu_ns" not in rows[0]:
        return ""
    other = [max(0.0, float(r["other_cpu_ns"])) / float(r["wall_ns"]) for r in rows]
    return (f"other processes on the machine during these runs: median {statistics.median(other):.2f}"
            f" cores, max {max(other):.2f}")


def cmd_sweep_table(path):
    rows = list(csv.DictReader(open(path)))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        points = load_points(rows, workload)
        unit = "conn/s" if workload == "http1.0" else "req/s"
        print(f"\n{workload}: replies/s against offered load ({unit}), median [min-max] of runs;"
              f" latency: httperf's reply time (ms, mean of the run), median of runs")
        print(f"{'offered':>8} {'native replies/s':>22} {'offloaded replies/s':>22} {'ratio':>5}"
              f" {'native ms':>9} {'offl. ms':>9} {'ratio':>5} {'errors n/o':>11}")
        for offered, native, off in points:
            n_rps = [float(r["replies_per_s"]) for r in native]
            o_rps = [float(r["replies_per_s"]) for r in off]
            n_ms = statistics.median(float(r["reply_ms"]) for r in native)
            o_ms = statistics.median(float(r["reply_ms"]) for r in off)
            errors = (f"{int(statistics.median(int(r['errors']) for r in native))}/"
                      f"{int(statistics.median(int(r['errors']) for r in off))}")
            print(f"{offered:>8} {fmt(n_rps):>22} {fmt(o_rps):>22} "
                  f"{ratio(statistics.median(o_rps), statistics.median(n_rps)):>5} "
                  f"{n_ms:9.2f} {o_ms:9.2f} {ratio(o_ms, n_ms):>5} {errors:>11}")
        print(f"\n{workload}: CPU per reply (µs, medians) and CPU used (cores, medians);"
              f" apps = the server's process tree")
        print(f"{'offered':>8} {'native apps':>11} {'offl. apps':>10} {'engine':>6}"
              f" {'offl. total':>11} {'total ratio':>11}  {'native cores':>12}"
              f" {'offl. apps':>10} {'engine':>6} {'offl. total':>11}")
        for offered, native, off in points:
            n_app = per_request_us(native, "server_cpu_ns", "replies")
            o_app = per_request_us(off, "server_cpu_ns", "replies")
            o_eng = per_request_us(off, "engine_cpu_ns", "replies")
            print(f"{offered:>8} {n_app:11.1f} {o_app:10.1f} {o_eng:6.1f} {o_app + o_eng:11.1f}"
                  f" {ratio(o_app + o_eng, n_app):>11}  {cores_used(native, 'server_cpu_ns'):12.2f}"
                  f" {cores_used(off, 'server_cpu_ns'):10.2f} {cores_used(off, 'engine_cpu_ns'):6.2f}"
                  f" {cores_used(off, 'server_cpu_ns') + cores_used(off, 'engine_cpu_ns'):11.2f}")
        print(disturbance([r for r in rows if r["workload"] == workload]))


def cmd_wrk_table(path, key):
    rows = list(csv.DictReader(open(path)))
    print(f"requests/s and latency (ms), median [min-max] of runs; CPU per request (µs, medians):"
          f" apps = the server's process tree")
    print(f"{key:>12} {'native req/s':>22} {'offloaded req/s':>22} {'ratio':>5}"
          f" {'native p50':>10} {'offl. p50':>9} {'native p99':>10} {'offl. p99':>9}"
          f" {'p99 ratio':>9}  {'native apps':>11} {'offl. apps':>10} {'engine':>6}"
          f" {'offl. total':>11} {'total ratio':>11}")
    for (group,), native, off in pairs(rows, key):
        n_rps = [float(r["requests_per_s"]) for r in native]
        o_rps = [float(r["requests_per_s"]) for r in off]
        med = lambda rs, k: statistics.median(float(r[k]) for r in rs)  # noqa: E731
        n_app = per_request_us(native, "server_cpu_ns", "requests")
        o_app = per_request_us(off, "server_cpu_ns", "requests")
        o_eng = per_request_us(off, "engine_cpu_ns", "requests")
        print(f"{group:>12} {fmt(n_rps):>22} {fmt(o_rps):>22} "
              f"{ratio(statistics.median(o_rps), statistics.median(n_rps)):>5}"
              f" {med(native, 'p50_ms'):10.2f} {med(off, 'p50_ms'):9.2f}"
              f" {med(native, 'p99_ms'):10.2f} {med(off, 'p99_ms'):9.2f}"
              f" {ratio(med(off, 'p99_ms'), med(native, 'p99_ms')):>9}  {n_app:11.1f}"
              f" {o_app:10.1f} {o_eng:6.1f} {o_app + o_eng:11.1f} {ratio(o_app + o_eng, n_app):>11}")
    print(disturbance(rows))


# ---------------------------------------------------------------------------------------------
# Data for gnuplot

def cmd_plot_data(results, out):
    """Writes OUT/sweep-<workload>.dat (offered, medians per mode of replies/s and of cores)
    and OUT/cpu-bars.dat (a label in two parts, native apps, offloaded apps, engine: µs per
    request)."""
    bars = []
    sweep_csv = os.path.join(results, "apache_httperf.csv")
    if os.path.exists(sweep_csv):
        rows = list(csv.DictReader(open(sweep_csv)))
        for workload in dict.fromkeys(r["workload"] for r in rows):
            name = workload.replace(".", "")
            # The highest load that both modes still kept up with in every run: no error and
            # at least 95% of the offered load served.
            best = None
            with open(os.path.join(out, f"sweep-{name}.dat"), "w") as f:
                f.write("# offered native_rps offloaded_rps native_cores offl_app_cores"
                        " engine_cores native_rps_min native_rps_max offl_rps_min offl_rps_max\n")
                for offered, native, off in load_points(rows, workload):
                    n_rps = [float(r["replies_per_s"]) for r in native]
                    o_rps = [float(r["replies_per_s"]) for r in off]
                    f.write(f"{offered} {statistics.median(n_rps):.0f} {statistics.median(o_rps):.0f}"
                            f" {cores_used(native, 'server_cpu_ns'):.3f}"
                            f" {cores_used(off, 'server_cpu_ns'):.3f}"
                            f" {cores_used(off, 'engine_cpu_ns'):.3f}"
                            f" {min(n_rps):.0f} {max(n_rps):.0f} {min(o_rps):.0f} {max(o_rps):.0f}\n")
                    if all(int(r["errors"]) == 0 and float(r["replies_per_s"]) >= 0.95 * offered
                           for r in native + off):
                        best = (offered, native, off)
            if best:
                offered, native, off = best
                bars.append((f"Apache {workload.upper().replace('HTTP', 'HTTP/')}", f"httperf {offered}/s",
                             per_request_us(native, "server_cpu_ns", "replies"),
                             per_request_us(off, "server_cpu_ns", "replies"),
                             per_request_us(off, "engine_cpu_ns", "replies")))
    for name, key, label in (("apache_wrk.csv", "connections", "Apache keep-alive|wrk -c{}"),
                             ("conn_rate.csv", "server", "{} HTTP/1.0|conn/s, tiny file")):
        path = os.path.join(results, name)
        if not os.path.exists(path):
            continue
        rows = list(csv.DictReader(open(path)))
        for (group,), native, off in pairs(rows, key):
            server = {"apache": "Apache"}.get(group, group)
            bars.append((*label.format(server).split("|"),
                         per_request_us(native, "server_cpu_ns", "requests"),
                         per_request_us(off, "server_cpu_ns", "requests"),
                         per_request_us(off, "engine_cpu_ns", "requests")))
    with open(os.path.join(out, "cpu-bars.dat"), "w") as f:
        f.write("# label (2 lines) native_apps offloaded_apps engine (CPU µs per request)\n")
        for label, label2, n_app, o_app, o_eng in bars:
            f.write(f'"{label}" "{label2}" {n_app:.2f} {o_app:.2f} {o_eng:.2f}\n')
    write_micro_bars(results, out)


def median_of(rows, value):
    return statistics.median([value(r) for r in rows])


def write_micro_bars(results, out):
    """Experiments 1-3 (op_cost.csv, latency.csv, throughput.csv): one .dat of medians each,
    a row per configuration with the native and the offloaded values side by side."""
    def groups(name, keys):
        path = os.path.join(results, name)
        if not os.path.exists(path):
            return []
        return list(pairs(list(csv.DictReader(open(path))), *keys))

    op_cost = groups("op_cost.csv", ("op", "size"))
    if op_cost:
        with open(os.path.join(out, "op-cost.dat"), "w") as f:
            f.write("# label native_app offloaded_app engine (CPU ns per call)\n")
            for (op, size), native, off in op_cost:
                f.write(f'"{op} {size} B" {median_of(native, lambda r: float(r["app_cpu_ns_per_call"])):.1f}'
                        f' {median_of(off, lambda r: float(r["app_cpu_ns_per_call"])):.1f}'
                        f' {median_of(off, lambda r: float(r["engine_cpu_ns_per_call"])):.1f}\n')
    latency = groups("latency.csv", ("tool", "size"))
    if latency:
        with open(os.path.join(out, "latency.dat"), "w") as f:
            f.write("# label native_p50 offloaded_p50 native_p99 offloaded_p99 (µs)\n")
            for (tool, size), native, off in latency:
                f.write(f'"{tool} {size} B"'
                        + "".join(f" {median_of(rows, lambda r: float(r[key])):.1f}"
                                  for key in ("p50_us", "p99_us") for rows in (native, off))
                        + "\n")
    throughput = groups("throughput.csv", ("streams",))
    if throughput:
        with open(os.path.join(out, "throughput.dat"), "w") as f:
            f.write("# label native_gbit offloaded_gbit native_apps offloaded_apps engine"
                    " (CPU-seconds per GB)\n")
            apps = lambda r: (float(r["server_cpu_ns"]) + float(r["client_cpu_ns"])) / float(r["bytes"])
            for (streams,), native, off in throughput:
                f.write(f'"{streams} stream{"s" if streams != "1" else ""}"'
                        f' {median_of(native, lambda r: float(r["gbit_per_s"])):.2f}'
                        f' {median_of(off, lambda r: float(r["gbit_per_s"])):.2f}'
                        f' {median_of(native, apps):.3f} {median_of(off, apps):.3f}'
                        f' {median_of(off, lambda r: float(r["engine_cpu_ns"]) / float(r["bytes"])):.3f}\n')


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    handlers = {"cpu": lambda: cmd_cpu(args),
                "httperf": lambda: cmd_httperf(args[0]),
                "wrk": lambda: cmd_wrk(args[0]),
                "sweep-table": lambda: cmd_sweep_table(args[0]),
                "wrk-table": lambda: cmd_wrk_table(args[0], args[1]),
                "plot-data": lambda: cmd_plot_data(args[0], args[1])}
    if command not in handlers:
        sys.exit(__doc__)
    handlers[command]()


if __name__ == "__main__":
    main()
