"""`make bench`: our server against the real ZEO server, side by side.

Every line of the table is one workload driven by one kind of client with
one or eight concurrent client processes.  Each measurement starts a server
process (ours or ZEO's) on a fresh copy of a pre-filled FileStorage, runs
the clients for a fixed time window and stops the server.  Repetitions are
passes over all lines; inside a pass, the two servers of a line are measured
back to back and the one that goes first alternates from pass to pass, so
slow drift of the shared machine hits both sides alike.  The table shows
the median of the repetitions for each side and the ratio of the medians.

After each measurement the server's own `server_status()` counters are
compared with what the clients did, which proves that the loads really
reached the server (no client cache in the way) and that every commit
committed.

See bench/README.md for how to read the output.
"""

import argparse
import collections
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import version

from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH_DIR)
sys.path[:0] = [BENCH_DIR, REPOSITORY, os.path.join(REPOSITORY, "tests")]

import server_process  # noqa: E402
from raw_client import Z64, RawClient, RawServerError  # noqa: E402
from workloads import (  # noqa: E402
    COMMIT, LOAD, RAW, ZEO_CLIENT, WorkerError, WorkerPool, object_record)

CONCURRENCY = 8
#: Distinct server log error messages shown per server.
LOG_EXAMPLES = 3
SERVERS = ("ours", "ZEO")
#: The table's lines, in order: (workload, client, concurrent clients).
LINES = [
    (workload, client, clients)
    for workload in (LOAD, COMMIT)
    for clients in (1, CONCURRENCY)
    for client in (RAW, ZEO_CLIENT)
]
WORKLOAD_TITLES = {LOAD: "uncached load round trips",
                   COMMIT: "1-object commits"}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description="Compare our ZEO server with the real ZEO server.")
    parser.add_argument(
        "--quick", action="store_true",
        help="short windows, one repetition: checks that the bench works; "
             "the figures mean little")
    parser.add_argument(
        "--repetitions", type=int,
        help="measurements per line and server (default 5, quick 1)")
    parser.add_argument(
        "--duration", type=float,
        help="seconds of each measurement window (default 1.5, quick 0.3)")
    parser.add_argument(
        "--objects", type=int,
        help="objects in the pre-filled storage (default 2000, quick 200)")
    parser.add_argument(
        "--ours-is-zeo", action="store_true",
        help="stand-in mode: run the real ZEO server in the 'ours' column "
             "too (to develop the bench while our server does not run)")
    options = parser.parse_args(argv)
    defaults = (1, 0.3, 200) if options.quick else (5, 1.5, 2000)
    for name, default in zip(("repetitions", "duration", "objects"),
                             defaults):
        if getattr(options, name) is None:
            setattr(options, name, default)
    return options


def server_module(side, options):
    """The runzeo package for a table column: "zeo" (ours) or "ZEO"."""
    if side == "ours" and not options.ours_is_zeo:
        return server_process.OURS
    return server_process.THEIRS


class Template:
    """A FileStorage filled once, copied for every measurement.

    Copying the file (with its index) is much faster than filling a new
    storage each time, and every measurement still starts from the same
    fresh state.
    """

    def __init__(self, directory, object_count):
        self.path = os.path.join(directory, "Data.fs")
        storage = FileStorage(self.path, create=True)
        try:
            txn = TransactionMetaData()
            storage.tpc_begin(txn)
            self.oids = []
            for number in range(object_count):
                oid = storage.new_oid()
                storage.store(oid, Z64, object_record(number), "", txn)
                self.oids.append(oid)
            storage.tpc_vote(txn)
            storage.tpc_finish(txn)
        finally:
            storage.close()

    def copy_to(self, directory):
        for suffix in ("", ".index"):
            shutil.copy(self.path + suffix, directory)


class Measurement:
    """The figures of one server process running one line once.

    `cpu_per_operation` is the server process's CPU time (all threads,
    user + system) per completed operation in microseconds, or None where
    it cannot be read.
    """

    def __init__(self, throughput, problems, log_problems,
                 cpu_per_operation=None):
        self.throughput = throughput
        self.problems = problems
        self.log_problems = log_problems
        self.cpu_per_operation = cpu_per_operation


class ServerCpuMeter:
    """CPU seconds a server process uses during the measurement window.

    Throughput on a shared machine depends on what else runs; the CPU a
    server spends per operation much less so, which makes it the steadier
    figure for comparing two servers.  Read from /proc (Linux only).
    """

    def __init__(self, pid):
        self._stat_path = "/proc/%d/stat" % pid
        self._ticks_per_second = os.sysconf("SC_CLK_TCK")
        self._started = None
        self.seconds = None

    @staticmethod
    def available():
        return os.path.exists("/proc/self/stat")

    def _read(self):
        with open(self._stat_path) as stat:
            # Fields after the parenthesised command name; utime and stime
            # are the 14th and 15th fields of the whole line.
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks_per_second

    def start(self):
        self._started = self._read()

    def stop(self):
        self.seconds = self._read() - self._started


def measure(line, side, options, template, pool, scratch):
    """Start a server on a fresh storage, run `line` on it, stop it.

    A server that fails to start or a client that fails gives a zero
    figure and a problem report, and the bench goes on with the next
    measurement.
    """
    workload, client, clients = line
    directory = tempfile.mkdtemp(dir=scratch)
    template.copy_to(directory)
    try:
        server = server_process.start_filestorage_server(
            directory, impl=server_module(side, options))
    except RuntimeError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        return Measurement(0.0, ["server did not start: %s" % exc], [])
    problems = []
    completed = 0
    cpu_per_operation = None
    try:
        specs = [{"client": client, "address": server.address,
                  "workload": workload, "oids": template.oids,
                  "index": index, "count": clients}
                 for index in range(clients)]
        meter = (ServerCpuMeter(server.process.pid)
                 if ServerCpuMeter.available() else None)
        results = pool.run(specs, options.duration, meter)
        completed = sum(result["completed"] for result in results)
        if meter is not None and completed:
            cpu_per_operation = meter.seconds / completed * 1e6
        late = max(result["late"] for result in results)
        if late > options.duration * 0.05:
            problems.append("a client started %.3fs late" % late)
        problems.extend(check_counters(workload, results, server.address))
    except WorkerError as exc:
        problems.append(str(exc))
    finally:
        status = server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if status != 0:
        problems.append("server exited with status %s after SIGTERM"
                        % status)
    return Measurement(completed / options.duration, problems,
                       log_problems(server.log_lines), cpu_per_operation)


def check_counters(workload, results, address):
    """Compare the server's statistics with what the clients did.

    Loads: every `load` of the clients must be one `loadBefore` on the
    server, otherwise a client cache answered and the line measures the
    wrong thing.  Commits: each client made one setup commit, then
    `issued` more, all of which must have committed.
    """
    issued = sum(result["issued"] for result in results)
    try:
        with RawClient(address) as client:
            status = client.server_status()
    except (RawServerError, OSError) as exc:
        return ["server_status failed: %r" % (exc,)]
    if workload == LOAD:
        counter, expected = "loads", issued
    else:
        counter, expected = "commits", issued + len(results)
    counted = status.get(counter)
    if counted != expected:
        return ["server counted %s %s, clients did %d"
                % (counted, counter, expected)]
    return []


def log_problems(lines):
    """Server log lines that say something went wrong."""
    markers = ("ERROR", "CRITICAL", "Traceback", "Exception")
    return [line for line in lines if any(m in line for m in markers)]


def header(options):
    ours = ("the real ZEO server as a STAND-IN (--ours-is-zeo)"
            if options.ours_is_zeo else "zeo.runzeo (this repository)")
    return [
        "zeo benchmark: our server vs the real ZEO server",
        "Python %s (%s), %d CPUs, %s" % (
            platform.python_version(), platform.python_implementation(),
            os.cpu_count(), platform.platform()),
        "ZODB %s, ZEO %s; ours = %s" % (
            version("ZODB"), version("ZEO"), ours),
        "%d repetitions per line and server, %.2fs windows, "
        "%d objects pre-filled, FileStorage, 127.0.0.1%s" % (
            options.repetitions, options.duration, options.objects,
            ", QUICK MODE" if options.quick else ""),
    ]


def line_label(line):
    workload, client, clients = line
    return "%s, %d client%s" % (WORKLOAD_TITLES[workload], clients,
                                "s" if clients > 1 else "")


def format_table(results, figure, unit, number_format):
    """One table: per-server medians of `figure`, their ratio, its range.

    `figure` extracts the value from a Measurement.  Lines without values
    (no CPU figures off Linux) are left out.
    """
    columns = ("workload", "client", "ours " + unit, "ZEO " + unit,
               "ours/ZEO", "per-pass ratios")
    rows = []
    for line in LINES:
        ours = [figure(m) for m in results[line]["ours"]]
        theirs = [figure(m) for m in results[line]["ZEO"]]
        if None in ours or None in theirs:
            continue
        ours_median = statistics.median(ours)
        theirs_median = statistics.median(theirs)
        pass_ratios = [a / b for a, b in zip(ours, theirs) if b]
        rows.append((
            line_label(line),
            line[1],
            number_format % ours_median,
            number_format % theirs_median,
            "%.2f" % (ours_median / theirs_median) if theirs_median else "-",
            "%.2f-%.2f" % (min(pass_ratios), max(pass_ratios))
            if pass_ratios else "-",
        ))
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows + [columns])
              for i in range(len(columns))]

    def render(row):
        cells = [cell.ljust(width) if index < 2 else cell.rjust(width)
                 for index, (cell, width) in enumerate(zip(row, widths))]
        return " | ".join(cells)
    rule = "-+-".join("-" * width for width in widths)
    return [render(columns), rule] + [render(row) for row in rows]


def run(options):
    lines = header(options)
    print("\n".join(lines), flush=True)
    results = {line: {side: [] for side in SERVERS} for line in LINES}
    scratch = tempfile.mkdtemp(prefix="zeo-bench-")
    pool = WorkerPool(CONCURRENCY)
    started = time.monotonic()
    try:
        template = Template(scratch, options.objects)
        for repetition in range(options.repetitions):
            order = SERVERS if repetition % 2 == 0 else SERVERS[::-1]
            print("pass %d/%d ..." % (repetition + 1, options.repetitions),
                  file=sys.stderr, flush=True)
            for line in LINES:
                for side in order:
                    results[line][side].append(
                        measure(line, side, options, template, pool,
                                scratch))
    finally:
        pool.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("Throughput (higher is better): operations completed per second "
          "by all clients")
    print("of the line together, median of %d windows."
          % options.repetitions)
    print("\n".join(format_table(
        results, lambda m: m.throughput, "ops/s", "%.0f")))
    cpu_table = format_table(
        results, lambda m: m.cpu_per_operation, "us/op", "%.1f")
    if cpu_table:
        print()
        print("Server CPU time per operation (lower is better): user + "
              "system time of the")
        print("server process during the window / operations completed, "
              "median; here")
        print("ours/ZEO above 1 means our server spends more CPU per "
              "operation.")
        print("\n".join(cpu_table))
    print()
    print("whole run: %.0fs" % (time.monotonic() - started))
    return report_problems(results)


def report_problems(results):
    """Print what the checks found; return the process exit status.

    Failed checks make the run fail.  Error lines in the server logs are
    only summarised (per server, most frequent first): clients that close
    while the server still has invalidations to send them make both
    servers log resets, which is the benchmark's doing, not a fault.
    """
    places = collections.defaultdict(list)
    for line in LINES:
        for side in SERVERS:
            for number, measurement in enumerate(results[line][side], 1):
                for problem in measurement.problems:
                    places[side, problem].append(
                        "%s, %s client, pass %d"
                        % (line_label(line), line[1], number))
    for (side, problem), where in places.items():
        print("PROBLEM with %s server in %d measurement%s (first: %s): %s"
              % (side, len(where), "s" if len(where) > 1 else "", where[0],
                 problem))
    failed = bool(places)
    if not failed:
        print("checks: in every measurement the server counted exactly the "
              "loads/commits the clients made.")
    for side in SERVERS:
        messages = collections.Counter(
            without_timestamp(log_line)
            for line in LINES
            for measurement in results[line][side]
            for log_line in measurement.log_problems)
        for message, count in messages.most_common(LOG_EXAMPLES):
            print("server log (%s), %d times: %s" % (side, count, message))
    return 1 if failed else 0


def without_timestamp(log_line):
    """A log line without its leading ISO timestamp, for counting."""
    first, _, rest = log_line.partition(" ")
    return rest if first[:1].isdigit() else log_line


def main(argv=None):
    options = parse_arguments(argv)
    if (not options.ours_is_zeo
            and importlib.util.find_spec("zeo.runzeo") is None):
        sys.exit("bench: zeo.runzeo does not exist yet; run with "
                 "--ours-is-zeo to compare ZEO with itself")
    sys.exit(run(options))


if __name__ == "__main__":
    main()
