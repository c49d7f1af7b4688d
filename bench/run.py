"""`make bench`: our server and client against the real ZEO ones, side by side.

A measurement is one workload, one kind of client (raw, ZEO's
ClientStorage or ours) with one or eight concurrent client processes, and
one server (ours or ZEO's).  Each measurement starts the server process on
a fresh copy of a pre-filled FileStorage, runs the clients for a fixed
time window and stops the server.  Repetitions are passes over all
measurements; inside a pass, the measurements of one workload and client
count are made back to back, in an order that is reversed from pass to
pass, so slow drift of the shared machine hits both sides of every
comparison alike.  The tables compare two measurements per line: the same
client on our server and on ZEO's, our client and server against ZEO's
client and server ("pairs"), and our client against ZEO's client, both on
the real ZEO server.  They show the median of the repetitions for each
side and the ratio of the medians.

After each measurement the server's own `server_status()` counters are
compared with what the clients did, which proves that the loads really
reached the server (no client cache in the way) and that every commit
committed.

The last sections time the pairs with persistent client caches
(`persistent_cache.py`: a fresh client's start-up after a server restart,
and warm cached reads), what TLS costs each server (`tls_overhead.py`:
loads, commits and connection set-up over TLS and plain TCP), blob
transfer (`blobs.py`: upload and download throughput, and the server's
memory while a big blob crosses it), reconnection (`reconnect.py`:
how soon a connected client is usable again after a server restart, and
how soon it notices a network partition and fails over), idle clients'
cost (`idle_connections.py`: server RSS and threads) and commits beside
idle clients (`idle_commits.py`: commits/s beside 0 to 1,000 of them).

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

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH_DIR)
sys.path[:0] = [BENCH_DIR, REPOSITORY, os.path.join(REPOSITORY, "tests")]

import blobs  # noqa: E402
import busy_clients  # noqa: E402
import idle_commits  # noqa: E402
import idle_connections  # noqa: E402
import metrics_scrape  # noqa: E402
import pair_interpreters  # noqa: E402
import persistent_cache  # noqa: E402
import reconnect  # noqa: E402
import relstorage_bench  # noqa: E402
from passes import alternating_passes  # noqa: E402
import server_process  # noqa: E402
from server_cpu import ServerCpuMeter  # noqa: E402
import thread_floor  # noqa: E402
import tls_overhead  # noqa: E402
from raw_client import RawClient, RawServerError  # noqa: E402
from storage_template import StorageTemplate  # noqa: E402
from workloads import (  # noqa: E402
    COMMIT, LOAD, OUR_CLIENT, RAW, ZEO_CLIENT, WorkerError, WorkerPool,
    object_record)

CONCURRENCY = 8
#: Distinct server log error messages shown per server.
LOG_EXAMPLES = 3
SERVERS = ("ours", "ZEO")
#: Groups of measurements, in table order: (workload, concurrent clients).
GROUPS = [(workload, clients)
          for workload in (LOAD, COMMIT)
          for clients in (1, CONCURRENCY)]
#: The (client, server) measurements of a group, in the order of the
#: forward passes (every other pass goes backwards).  The two cells of
#: each comparison below are neighbours, except the pairs', which have one
#: measurement between them, so no comparison spans a long stretch of time.
CELLS = [(RAW, "ours"), (RAW, "ZEO"),
         (ZEO_CLIENT, "ours"), (ZEO_CLIENT, "ZEO"),
         (OUR_CLIENT, "ZEO"), (OUR_CLIENT, "ours")]
WORKLOAD_TITLES = {LOAD: "uncached load round trips",
                   COMMIT: "1-object commits"}


class Comparison(collections.namedtuple(
        "Comparison", "label ours theirs")):
    """One line of a table: the "ours" cell against the "theirs" cell."""


#: The same client on our server and on the real ZEO server.
SERVER_COMPARISONS = [Comparison(client, (client, "ours"), (client, "ZEO"))
                      for client in (RAW, ZEO_CLIENT, OUR_CLIENT)]
#: Our client against the ZEO client: each with its own server (what an
#: application gets from either package), and both on the real ZEO server
#: (only the client differs).
CLIENT_COMPARISONS = [
    Comparison("pairs", (OUR_CLIENT, "ours"), (ZEO_CLIENT, "ZEO")),
    Comparison("on ZEO server", (OUR_CLIENT, "ZEO"), (ZEO_CLIENT, "ZEO")),
]


#: The sections a flag ``--NAME-only`` runs alone: name -> what they
#: measure.
ONLY_SECTIONS = {
    "tls": "the TLS measurements",
    "metrics": "the metrics-scraping measurements",
    "blobs": "the blob measurements",
    "reconnect": "the reconnection measurements (server restart, network "
                 "partition)",
    "relstorage": "the RelStorage (PostgreSQL) measurements",
    "idle": "the idle-connection measurements (server RSS and threads "
            "beside 0 to 5,000 idle clients)",
    "fanout": "the commits-beside-idle-clients measurements (commits/s "
              "beside 0 to 1,000 idle clients)",
    "busy": "the busy-clients measurements (1 to 64 raw clients loading; "
            "servers on the GIL and the free-threaded interpreter)",
}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description="Compare our ZEO server and client with the real "
                    "ZEO server and client.")
    parser.add_argument(
        "--quick", action="store_true",
        help="short windows, one repetition: checks that the bench works; "
             "the figures mean little")
    parser.add_argument(
        "--repetitions", type=int,
        help="passes over all measurements (default 5, quick 1)")
    parser.add_argument(
        "--duration", type=float,
        help="seconds of each measurement window (default 1.5, quick 0.2)")
    parser.add_argument(
        "--objects", type=int,
        help="objects in the pre-filled storage (default 2000, quick 200)")
    parser.add_argument(
        "--ours-is-zeo", action="store_true",
        help="stand-in mode: run the real ZEO server and client in the "
             "'ours' columns too (every ratio should then be about 1)")
    parser.add_argument(
        "--restarts", type=int,
        help="passes of the persistent-cache measurements (server restart "
             "+ warm reads; default 3, quick 1)")
    parser.add_argument(
        "--cache-objects", type=int,
        help="objects in the persistent-cache measurements' storage and "
             "client cache (default 10000, quick 2000)")
    parser.add_argument(
        "--blob-passes", type=int,
        help="passes of the blob measurements (default 5, quick 1)")
    parser.add_argument(
        "--reconnect-passes", type=int,
        help="passes of the reconnection measurements (default 5, quick 1)")
    parser.add_argument(
        "--idle-commit-passes", type=int,
        help="passes of the commits-beside-idle-clients measurements "
             "(default 3, quick 1)")
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=2,
        help="our client's heartbeat_timeout in the partition measurement "
             "(default 2 seconds)")
    parser.add_argument(
        "--partition-wait", type=float, default=10,
        help="seconds a partitioned client is given to notice and fail "
             "over (default 10)")
    parser.add_argument(
        "--ft-python", default=os.path.join(REPOSITORY, ".venv-ft", "bin",
                                            "python"),
        help="the free-threaded interpreter of the busy-clients section "
             "(default: .venv-ft's, made by make test-ft)")
    for name, measurements in ONLY_SECTIONS.items():
        parser.add_argument(
            "--%s-only" % name, action="store_true",
            help="run %s only" % measurements)
    options = parser.parse_args(argv)
    chosen = [name for name in ONLY_SECTIONS
              if getattr(options, name + "_only")]
    if len(chosen) > 1:
        parser.error("--%s-only exclude each other"
                     % "-only and --".join(chosen))
    options.only = bool(chosen)
    if options.reconnect_passes is None:
        options.reconnect_passes = 1 if options.quick else 5
    if options.blob_passes is None:
        options.blob_passes = 1 if options.quick else 5
    if options.idle_commit_passes is None:
        options.idle_commit_passes = 1 if options.quick else 3
    defaults = (1, 0.2, 200) if options.quick else (5, 1.5, 2000)
    for name, default in zip(("repetitions", "duration", "objects"),
                             defaults):
        if getattr(options, name) is None:
            setattr(options, name, default)
    cache_defaults = (1, 2000) if options.quick else (3, 10000)
    for name, default in zip(("restarts", "cache_objects"), cache_defaults):
        if getattr(options, name) is None:
            setattr(options, name, default)
    return options


def server_module(side, options):
    """The runzeo package for a table column: "zeo" (ours) or "ZEO"."""
    if side == "ours" and not options.ours_is_zeo:
        return server_process.OURS
    return server_process.THEIRS


def client_kind(client, options):
    """The client a cell really runs: ours is ZEO's with --ours-is-zeo."""
    if client == OUR_CLIENT and options.ours_is_zeo:
        return ZEO_CLIENT
    return client


class Measurement:
    """The figures of one server process running one cell of a group once.

    `cpu_per_operation` is the server process's CPU time (all threads,
    user + system) per completed operation in microseconds, or None where
    it cannot be read.  `client_cpu_per_operation` is the same for the
    client processes together, or None when nothing completed.
    """

    def __init__(self, throughput, problems, log_problems,
                 cpu_per_operation=None, client_cpu_per_operation=None):
        self.throughput = throughput
        self.problems = problems
        self.log_problems = log_problems
        self.cpu_per_operation = cpu_per_operation
        self.client_cpu_per_operation = client_cpu_per_operation


def start_server(directory, side, options, tls=None):
    """A server on `directory`/Data.fs; with `tls` (a `PKI` of
    tests/tls_certificates.py) it accepts TLS connections only."""
    impl = server_module(side, options)
    if tls is None:
        return server_process.start_filestorage_server(directory, impl=impl)
    return server_process.start_configured_server(
        directory, tls.server_ssl_section(), impl=impl)


def measure(group, cell, options, template, pool, scratch, tls=None):
    """Start a server on a fresh storage, run a group's cell on it, stop it.

    A server that fails to start or a client that fails gives a zero
    figure and a problem report, and the bench goes on with the next
    measurement.  With `tls` (a `PKI`) server and clients use TLS.
    """
    workload, clients = group
    client, side = cell
    directory = tempfile.mkdtemp(dir=scratch)
    template.copy_to(directory)
    try:
        server = start_server(directory, side, options, tls)
    except RuntimeError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        return Measurement(0.0, ["server did not start: %s" % exc], [])
    problems = []
    completed = 0
    cpu_per_operation = client_cpu_per_operation = None
    try:
        specs = [{"client": client_kind(client, options),
                  "address": server.address,
                  "workload": workload, "oids": template.oids,
                  "index": index, "count": clients,
                  "tls": tls and (tls.ca,) + tls.client}
                 for index in range(clients)]
        meter = (ServerCpuMeter(server.process.pid)
                 if ServerCpuMeter.available() else None)
        results = pool.run(specs, options.duration, meter)
        completed = sum(result["completed"] for result in results)
        if meter is not None and completed:
            cpu_per_operation = meter.seconds / completed * 1e6
        if completed:
            client_cpu_per_operation = (
                sum(result["cpu"] for result in results) / completed * 1e6)
        late = max(result["late"] for result in results)
        if late > options.duration * 0.05:
            problems.append("a client started %.3fs late" % late)
        for result in results:
            if result["threads_left"]:
                problems.append("threads still running after close(): %s"
                                % ", ".join(result["threads_left"]))
        problems.extend(check_counters(
            workload, results, server.address,
            tls and tls.client_context()))
    except WorkerError as exc:
        problems.append(str(exc))
    finally:
        status = server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if status != 0:
        problems.append("server exited with status %s after SIGTERM"
                        % status)
    return Measurement(completed / options.duration, problems,
                       log_problems(server.log_lines), cpu_per_operation,
                       client_cpu_per_operation)


def check_counters(workload, results, address, ssl_context=None):
    """Compare the server's statistics with what the clients did.

    Loads: every `load` of the clients must be one `loadBefore` on the
    server, otherwise a client cache answered and the line measures the
    wrong thing.  Commits: each client made one setup commit, then
    `issued` more, all of which must have committed.
    """
    issued = sum(result["issued"] for result in results)
    try:
        with RawClient(address, ssl_context=ssl_context) as client:
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
    ours = ("the real ZEO server and client as STAND-INS (--ours-is-zeo)"
            if options.ours_is_zeo
            else "zeo.runzeo and zeo.ClientStorage (this repository)")
    return [
        "zeo benchmark: our server and client vs the real ZEO server and "
        "client",
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


def group_label(group):
    workload, clients = group
    return "%s, %d client%s" % (WORKLOAD_TITLES[workload], clients,
                                "s" if clients > 1 else "")


def format_table(results, comparisons, second_column, figure, unit,
                 number_format):
    """One table: per-side medians of `figure`, their ratio, its range.

    One line per group and comparison.  `figure` extracts the value from
    a Measurement.  Lines without values (no server CPU figures off Linux)
    are left out.  The per-pass ratios pair the two cells' measurements of
    the same pass.
    """
    columns = ("workload", second_column, "ours " + unit, "ZEO " + unit,
               "ours/ZEO", "per-pass ratios")
    rows = []
    for group in GROUPS:
        for comparison in comparisons:
            ours = [figure(m) for m in results[group][comparison.ours]]
            theirs = [figure(m) for m in results[group][comparison.theirs]]
            if None in ours or None in theirs:
                continue
            ours_median = statistics.median(ours)
            theirs_median = statistics.median(theirs)
            pass_ratios = [a / b for a, b in zip(ours, theirs) if b]
            rows.append((
                group_label(group),
                comparison.label,
                number_format % ours_median,
                number_format % theirs_median,
                "%.2f" % (ours_median / theirs_median)
                if theirs_median else "-",
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


def print_servers_and_clients(results, figure, unit, number_format,
                              servers_caption, clients_caption):
    """One figure's Servers table, then its Clients table, each after a
    blank line and its caption."""
    for caption, comparisons, second_column in (
            (servers_caption, SERVER_COMPARISONS, "client"),
            (clients_caption, CLIENT_COMPARISONS, "compared")):
        print()
        print(caption)
        print("\n".join(format_table(results, comparisons, second_column,
                                     figure, unit, number_format)))


def run(options):
    lines = header(options)
    print("\n".join(lines), flush=True)
    scratch = tempfile.mkdtemp(prefix="zeo-bench-")
    started = time.monotonic()
    status = 0
    blob_results = reconnect_results = idle_results = busy_results = None
    fanout_results = pair_results = floor_results = None
    only = options.only
    try:
        if not only:
            status = run_throughput_and_cache(options, scratch)
        if not only or options.tls_only:
            status |= tls_overhead.run_section(options, scratch, measure,
                                               start_server)
        if not only or options.metrics_only:
            if run_metrics_scraping(options, scratch):
                status = 1
        if not only or options.blobs_only:
            blob_results = blobs.measure_all(options, scratch)
        if not only or options.reconnect_only:
            reconnect_results = reconnect.measure_all(options, scratch,
                                                      client_kind)
        if not only or options.relstorage_only:
            relstorage_results = relstorage_bench.measure_all(options,
                                                              scratch)
            print()
            relstorage_bench.print_report(relstorage_results)
        if not only or options.idle_only:
            idle_results = idle_connections.measure_all(options, scratch)
        if not only or options.fanout_only:
            fanout_results = idle_commits.measure_all(options, scratch)
        if not only or options.busy_only:
            template = busy_clients.make_template(options, scratch)
            busy_results = busy_clients.measure_all(options, scratch,
                                                    template)
            pair_results = pair_interpreters.measure_all(options, scratch,
                                                         template)
            floor_results = thread_floor.measure_all(options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # (results, how to print them, whether they hold problems or None)
    reports = [
        (blob_results, lambda results: blobs.print_report(results, options),
         blobs.report_problems),
        (reconnect_results,
         lambda results: reconnect.print_report(results, options),
         lambda results: reconnect.report_problems(results, log_problems)),
        (idle_results, idle_connections.print_report, None),
        (fanout_results,
         lambda results: idle_commits.print_report(results, options),
         idle_commits.report_problems),
        (busy_results, busy_clients.print_report, None),
        (pair_results, pair_interpreters.print_report, None),
        (floor_results, thread_floor.print_report, None),
    ]
    for results, print_report, has_problems in reports:
        if results is None:
            continue
        print()
        print_report(results)
        if has_problems is not None and has_problems(results):
            status = 1
    print()
    print("whole run: %.0fs" % (time.monotonic() - started))
    return status


def run_metrics_scraping(options, scratch):
    """The metrics-scraping section; True if it found problems."""
    pool = WorkerPool(CONCURRENCY)
    try:
        results = metrics_scrape.measure_all(options, pool, CONCURRENCY,
                                             scratch)
    finally:
        pool.close()
    print()
    return metrics_scrape.print_report(results, CONCURRENCY)


def run_throughput_and_cache(options, scratch):
    """The throughput tables and the persistent-cache section; returns
    the exit status their checks call for."""
    results = {group: {cell: [] for cell in CELLS} for group in GROUPS}
    pool = WorkerPool(CONCURRENCY)
    try:
        template = StorageTemplate(
            scratch, map(object_record, range(options.objects)))
        for _number, order in alternating_passes(CELLS,
                                                 options.repetitions):
            for group in GROUPS:
                for cell in order:
                    results[group][cell].append(
                        measure(group, cell, options, template, pool,
                                scratch))
        cache_results = persistent_cache.measure_all(
            options, scratch, client_kind)
    finally:
        pool.close()
    print()
    print("Throughput (higher is better): operations completed per second "
          "by all clients")
    print("of the line together, median of %d windows."
          % options.repetitions)
    print_servers_and_clients(
        results, lambda m: m.throughput, "ops/s", "%.0f",
        "Servers: the same client on our server (ours) and on the real "
        "ZEO server.",
        "Clients: pairs = our client on our server (ours) vs the ZEO "
        "client on the ZEO\nserver; on ZEO server = our client (ours) vs "
        "the ZEO client, both on the ZEO server.")
    server_cpu = format_table(
        results, SERVER_COMPARISONS, "client",
        lambda m: m.cpu_per_operation, "us/op", "%.1f")
    if server_cpu:
        print()
        print("Server CPU time per operation (lower is better): user + "
              "system time of the")
        print("server process during the window / operations completed, "
              "median; here")
        print("ours/ZEO above 1 means our server spends more CPU per "
              "operation.")
        print("\n".join(server_cpu))
    print()
    print("Client CPU time per operation (lower is better): user + system "
          "time of the client")
    print("processes (all their threads) during the window / operations "
          "completed, median.")
    print_servers_and_clients(
        results, lambda m: m.client_cpu_per_operation, "us/op", "%.1f",
        "Servers: the same client on our server and on ZEO's; ours/ZEO "
        "above 1 means the\nclient works more per operation with our "
        "server.  On a machine of N CPUs that\nthe clients fill, no line "
        "can pass N / (client + server CPU per operation).",
        "Clients: ours/ZEO above 1 means our client spends more CPU per "
        "operation.")
    print()
    persistent_cache.print_report(cache_results, options)
    status = report_problems(results)
    if persistent_cache.report_problems(cache_results, log_problems,
                                        without_timestamp):
        status = 1
    return status


def report_problems(results):
    """Print what the checks found; return the process exit status.

    Failed checks make the run fail.  Error lines in the server logs are
    only summarised (per server, most frequent first): clients that close
    while the server still has invalidations to send them make both
    servers log resets, which is the benchmark's doing, not a fault.
    """
    places = collections.defaultdict(list)
    for group in GROUPS:
        for client, side in CELLS:
            for number, measurement in enumerate(
                    results[group][client, side], 1):
                for problem in measurement.problems:
                    places[side, problem].append(
                        "%s, %s client, pass %d"
                        % (group_label(group), client, number))
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
            for group in GROUPS
            for cell in CELLS if cell[1] == side
            for measurement in results[group][cell]
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
    missing = [module for module in ("zeo.runzeo", "zeo.ClientStorage")
               if importlib.util.find_spec(module) is None]
    if missing and not options.ours_is_zeo:
        sys.exit("bench: %s does not exist yet; run with --ours-is-zeo "
                 "to compare ZEO with itself" % " and ".join(missing))
    sys.exit(run(options))


if __name__ == "__main__":
    main()
