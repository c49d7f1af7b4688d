"""Commits per second beside idle clients, ours and ZEO's server.

Every commit sends its invalidation to every other registered client, so
a server's commit rate falls as clients are added even when they do
nothing else.  GitHub issue 14 asks for at least 3x the real ZEO
server's rate beside 500 idle clients.

One measurement: a server process on an empty FileStorage, a holder
process (bench/idle_holder.py) with N registered raw-protocol clients
that read and discard what they are sent (as an idle application's
ClientStorage does), and one raw client in this process that commits a
one-object transaction after another for the window.  The figures are
the commits completed per second and the server's CPU time per commit
(all its threads, so the fan-out's cost shows even where it no longer
delays the committer).  Each pass measures every step for both servers
back to back, alternating which goes first.
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import server_process
from passes import alternating_passes
from raw_client import Z64, RawClient, RawServerError
from server_cpu import ServerCpuMeter
from table import render_table
from workloads import object_record

STEPS = (0, 100, 500, 1000)
SIDES = ("ours", "ZEO")
WARMUP_COMMITS = 20
#: Seconds allowed for the holder to connect its clients.
HOLDER_TIMEOUT = 120


class Holder:
    """The process that keeps `count` idle clients of `address` open."""

    def __init__(self, address, count):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__),
                                          "idle_holder.py"),
             address[0], str(address[1]), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError("the idle holder did not start: %r" % line)

    def stop(self):
        """Close the clients; return (bytes they read, connections the
        server closed), or None if the holder failed."""
        try:
            out, _err = self.process.communicate("", timeout=HOLDER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None
        fields = out.split()
        return tuple(map(int, fields)) if len(fields) == 2 else None


def commit_for(client, seconds):
    """Commit one object again and again for `seconds`; the count."""
    oid = client.new_oids(1)[0]
    data = object_record(0)
    serial = Z64
    for _ in range(WARMUP_COMMITS):
        serial = client.commit([(oid, serial, data)])
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        serial = client.commit([(oid, serial, data)])
        done += 1
    return done


def measure(impl, idle, duration, scratch):
    """(commits/s, server CPU us per commit or None, problems)."""
    directory = tempfile.mkdtemp(prefix="idle-commits-", dir=scratch)
    server = server_process.start_configured_server(
        directory, "max-connections %d" % (idle + 50)
        if impl == server_process.OURS else "", impl=impl)
    problems = []
    holder = None
    done = 0
    meter = (ServerCpuMeter(server.process.pid)
             if ServerCpuMeter.available() else None)
    try:
        holder = Holder(server.address, idle) if idle else None
        with RawClient(server.address) as client:
            if meter is not None:
                meter.start()
            done = commit_for(client, duration)
            if meter is not None:
                meter.stop()
    except (RuntimeError, OSError, RawServerError) as error:
        problems.append("failed: %r" % (error,))
    finally:
        if holder is not None:
            read = holder.stop()
            if read is None:
                problems.append("the idle holder failed")
            elif read[1]:
                problems.append("the server closed %d idle clients"
                                % read[1])
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    cpu = (meter.seconds / (done + WARMUP_COMMITS) * 1e6
           if meter is not None and done else None)
    return done / duration, cpu, problems


def measure_all(options, scratch):
    """{(side, step): [(commits/s, cpu, problems) per pass]}."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cells = [(side, step) for step in STEPS for side in SIDES]
    results = {cell: [] for cell in cells}
    duration = max(options.duration, 1.0)
    try:
        for _number, order in alternating_passes(
                cells, options.idle_commit_passes, "idle commits, "):
            for side, step in order:
                impl = (server_process.OURS
                        if side == "ours" and not options.ours_is_zeo
                        else server_process.THEIRS)
                results[side, step].append(
                    measure(impl, step, duration, scratch))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return results


def _median(values, number_format):
    values = [value for value in values if value is not None]
    return number_format % statistics.median(values) if values else "-"


def print_report(results, options):
    print("Commits beside idle clients (higher is better): one raw client "
          "commits one")
    print("object per transaction; N idle registered clients read the "
          "invalidations.")
    print("Median of %d passes; commits/s range over the passes; server "
          "CPU per commit." % options.idle_commit_passes)
    columns = ("idle clients", "ours commits/s", "ours range",
               "ZEO commits/s", "ZEO range", "ours/ZEO", "per-pass ratios",
               "ours us/commit", "ZEO us/commit")
    rows = []
    for step in STEPS:
        ours = [rate for rate, _cpu, _p in results["ours", step]]
        theirs = [rate for rate, _cpu, _p in results["ZEO", step]]
        ratios = [a / b for a, b in zip(ours, theirs) if b]
        ratio = (statistics.median(ours) / statistics.median(theirs)
                 if statistics.median(theirs) else None)
        rows.append((
            str(step), "%.0f" % statistics.median(ours),
            "%.0f-%.0f" % (min(ours), max(ours)),
            "%.0f" % statistics.median(theirs),
            "%.0f-%.0f" % (min(theirs), max(theirs)),
            "-" if ratio is None else "%.2f" % ratio,
            "%.2f-%.2f" % (min(ratios), max(ratios)) if ratios else "-",
            _median([cpu for _r, cpu, _p in results["ours", step]], "%.0f"),
            _median([cpu for _r, cpu, _p in results["ZEO", step]], "%.0f")))
    print("\n".join(render_table(columns, rows)))


def report_problems(results):
    """Print what went wrong; True if anything did."""
    failed = False
    for (side, step), measurements in results.items():
        for number, (_rate, _cpu, problems) in enumerate(measurements, 1):
            for problem in problems:
                print("PROBLEM with %s server beside %d idle clients, pass "
                      "%d: %s" % (side, step, number, problem))
                failed = True
    return failed
