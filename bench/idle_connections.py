"""What idle clients cost a server: resident memory and threads.

GitHub issue 14 asks for at most 64 KB of server RSS per idle registered
connection, at 1,000 and at 5,000.  For each server (ours, then ZEO's),
one server process on an empty FileStorage takes registered raw-protocol
connections (bench/raw_client.py) that then do nothing, in steps up to
5,000.  At each step, once the server's thread count has settled, the
figures are its RSS (VmRSS) and threads from /proc, and the RSS growth
per idle connection since the step with none.  Then all connections
close and, once the server has had time to give freed memory back
(`zeo.server.memory`), the RSS it keeps is shown too.  One pass: the
figures are counts and sizes, not timings, and vary little.
"""

import resource
import shutil
import tempfile
import time

import server_process
from raw_client import RawClient
from table import render_table

STEPS = (0, 100, 500, 1000, 5000)
SIDES = ("ours", "ZEO")
#: Seconds the server's threads are given to settle after a step.
SETTLE = 30
#: Seconds after the last close before the RSS kept is read: ours gives
#: freed memory back once closes have stopped for a second.
AFTER_CLOSE = 3


def _usage(pid):
    return (server_process.memory_kib(pid, "VmRSS"),
            server_process.memory_kib(pid, "Threads"))


def _settled_usage(pid, previous_threads, expected_growth):
    """The server's usage once its threads stopped changing (ours has
    one per connection, ZEO's a fixed few): (RSS KiB, threads)."""
    deadline = time.monotonic() + SETTLE
    usage = _usage(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _usage(pid)
        if now[1] == usage[1] and \
                now[1] in (previous_threads, previous_threads
                           + expected_growth):
            return now
        usage = now
    return usage


def measure_side(impl, scratch):
    """Rows of figures for one server: (idle clients, RSS KiB, threads),
    then ("after close", RSS KiB, threads)."""
    directory = tempfile.mkdtemp(prefix="idle-", dir=scratch)
    # ZEO's server has no connection limit (nor the setting).
    server = server_process.start_configured_server(
        directory, "max-connections %d" % (STEPS[-1] + 50)
        if impl == server_process.OURS else "", impl=impl)
    idle = []
    rows = []
    try:
        pid = server.process.pid
        RawClient(server.address).close()  # warm up
        threads = _settled_usage(pid, _usage(pid)[1], 0)[1]
        for step in STEPS:
            added = step - len(idle)
            while len(idle) < step:
                idle.append(RawClient(server.address))
            rss, now_threads = _settled_usage(pid, threads, added)
            rows.append((step, rss, now_threads))
            threads = now_threads
        for raw in idle:
            raw.close()
        idle = []
        _settled_usage(pid, threads, -STEPS[-1])
        time.sleep(AFTER_CLOSE)
        rss, threads = _usage(pid)
        rows.append(("after close", rss, threads))
    finally:
        for raw in idle:
            raw.close()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def measure_all(options, scratch):
    """{side: rows} for ours and ZEO's server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        return {side: measure_side(
            server_process.OURS if side == "ours" and not options.ours_is_zeo
            else server_process.THEIRS, scratch) for side in SIDES}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def print_report(results):
    print("Idle registered connections: server RSS and threads")
    columns = ("idle clients",) + tuple(
        "%s %s" % (side, what) for side in SIDES
        for what in ("RSS MiB", "KiB/conn", "threads"))
    rows = []
    for index, step in enumerate(STEPS + ("after close",)):
        row = [str(step)]
        for side in SIDES:
            base = results[side][0][1]
            _step, rss, threads = results[side][index]
            per = (rss - base) / step if isinstance(step, int) and step \
                else None
            row += ["%.1f" % (rss / 1024.0),
                    "-" if per is None else "%.1f" % per, str(threads)]
        rows.append(tuple(row))
    print("\n".join(render_table(columns, rows)))
