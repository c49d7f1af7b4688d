"""Persistent client caches: start-up after a server restart, warm reads.

GitHub issue 4 asks what a persistent cache buys an application, measured
on the pairs (our client on our server against the ZEO client on the ZEO
server), each with its own cache file format:

1. A client filled its cache file with every object of the storage and
   closed; the server restarted (stopped by PID, started again on the same
   Data.fs and port); another client changed a few objects.  How long does
   a fresh client process take from `ClientStorage(..., client=, var=)`
   to its first read of an unchanged object through a `ZODB.DB`
   connection?  And how many loads does the server serve while it starts
   and while it reads every object (ideally only the changed ones: the
   cache was verified with `getInvalidations`, not dropped)?
2. With every object in that cache, how many `load` / `loadBefore` calls
   of random oids does one client process make per second?  No load may
   reach the server (checked with its `loads` counter).

Each measurement starts from a fresh copy of a pre-filled FileStorage;
its client processes are `cache_client.py`.  Passes alternate which side
goes first, as in the rest of the bench.
"""

import collections
import contextlib
import json
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

from persistent.mapping import PersistentMapping

import server_process
from passes import alternating_passes
from raw_client import RawClient, RawServerError
from storage_template import StorageTemplate
from table import render_table

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "cache_client.py")
SIDES = ("ours", "ZEO")
#: Objects another client changes while the cached client is away.
CHANGED_OBJECTS = 5
CLIENT_NAME = "bench"
#: Both clients' default cache size; far more than the objects need, so
#: nothing is evicted.
CACHE_BYTES = 20 * 2 ** 20
#: Seconds a client process may take before it is killed (by its PID).
CHILD_TIMEOUT = 120


class CacheBenchError(RuntimeError):
    """A server or client process of a measurement failed."""


def persistent_record(value):
    """A record a ZODB connection can load: a PersistentMapping holding
    {"value": value} (class reference + state, as ZODB writes them)."""
    return (pickle.dumps(PersistentMapping, 3)
            + pickle.dumps({"data": {"value": value}}, 3))


class CacheTemplate(StorageTemplate):
    """A FileStorage with a root and `count` objects, filled once and
    copied for every measurement, and the file of its oids the client
    processes read.  Object number `n` holds the value `n`."""

    def __init__(self, directory, count):
        os.mkdir(directory)
        super().__init__(directory, map(persistent_record, range(count)),
                         root=persistent_record(None))
        self.oids_path = os.path.join(directory, "oids.json")
        with open(self.oids_path, "w") as out:
            json.dump([oid.hex() for oid in self.oids], out)


class CacheMeasurement:
    """One side's figures from one pass (None where the run failed), its
    problems and its servers' error log lines."""

    def __init__(self, figures, problems, log_lines):
        self.figures = figures
        self.problems = problems
        self.log_lines = log_lines


def run_client(spec):
    """Run one `cache_client.py` process; its JSON answer."""
    child = subprocess.Popen(
        [sys.executable, CLIENT_SCRIPT, json.dumps(spec)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        output, errors = child.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise CacheBenchError("%s client (%s) did not finish in %ss"
                              % (spec["client"], spec["mode"], CHILD_TIMEOUT))
    if child.returncode != 0:
        raise CacheBenchError("%s client (%s) exited with status %s:\n%s"
                              % (spec["client"], spec["mode"],
                                 child.returncode, errors[-2000:]))
    return json.loads(output)


@contextlib.contextmanager
def serving(impl, directory, port, problems, log_lines):
    """A server on `directory`/Data.fs at 127.0.0.1:`port` for the block;
    stopped by its PID afterwards.  A non-zero exit status is a problem;
    its error log lines go to `log_lines`."""
    server = server_process.ServerProcess(
        ["-a", "127.0.0.1:%d" % port,
         "-f", os.path.join(directory, "Data.fs")],
        impl=impl, address=("127.0.0.1", port))
    try:
        yield server
    finally:
        status = server.stop()
        log_lines.extend(server.log_lines)
        if status != 0:
            problems.append("server exited with status %s after SIGTERM"
                            % status)


def change_objects(address, oids):
    """Commit new data for `oids` with the raw client (the same for both
    servers); return the tid and the server's `loads` counter after it
    (the raw client's own loads, for the serials, are counted by then)."""
    with RawClient(address) as raw:
        stores = [(oid, raw.load_before(oid)[1], persistent_record(-1))
                  for oid in oids]
        tid = raw.commit(stores)
        return tid, raw.server_status()["loads"]


def measure(side, client, template, options, scratch, seed):
    """Fill a cache file, restart the server, change a few objects, then
    time a fresh client's start-up and warm reads (see the module
    docstring); the figures of the restarted client process."""
    directory = tempfile.mkdtemp(dir=scratch)
    template.copy_to(directory)
    var = os.path.join(directory, "var")
    os.mkdir(var)
    impl = (server_process.OURS if side == "ours" and not options.ours_is_zeo
            else server_process.THEIRS)
    port = server_process.free_port()
    spec = {"client": client, "port": port, "var": var, "name": CLIENT_NAME,
            "cache_size": CACHE_BYTES, "oids_path": template.oids_path}
    drawn = random.Random(seed).sample(range(len(template.oids)),
                                       CHANGED_OBJECTS + 1)
    first, changed = drawn[0], sorted(drawn[1:])
    problems, log_lines, figures = [], [], None
    try:
        with serving(impl, directory, port, problems, log_lines):
            run_client(dict(spec, mode="fill"))
        with serving(impl, directory, port, problems, log_lines) as server:
            tid, loads = change_objects(
                server.address, [template.oids[index] for index in changed])
            figures = run_client(dict(
                spec, mode="restart", first=first, changed=changed,
                loads_before=loads, duration=options.duration, seed=seed))
        problems.extend(check(figures, first, tid))
    except (RuntimeError, RawServerError, OSError, ValueError) as exc:
        problems.append(str(exc))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return CacheMeasurement(figures, problems, log_lines)


def check(figures, first, tid):
    """What must hold whatever the speed: right data, no stale reads, no
    server load during the warm reads, no thread left after close()."""
    problems = []
    if figures["first_value"] != first:
        problems.append("first read gave %r, not %r"
                        % (figures["first_value"], first))
    stale = [read for read in figures["changed_tids"] if read != tid.hex()]
    if stale:
        problems.append("%d changed objects read at an old tid (stale)"
                        % len(stale))
    if figures["warm_loads"]:
        problems.append("the server served %d loads during the warm reads"
                        % figures["warm_loads"])
    if figures["threads_left"]:
        problems.append("threads still running after close(): %s"
                        % ", ".join(figures["threads_left"]))
    return problems


def measure_all(options, scratch, client_kind):
    """`options.restarts` passes over both sides, alternating which goes
    first; {side: [CacheMeasurement per pass]}.  `client_kind` maps the
    bench's client names to the ones really run (--ours-is-zeo)."""
    template = CacheTemplate(os.path.join(scratch, "cache-template"),
                             options.cache_objects)
    results = {side: [] for side in SIDES}
    for repetition, order in alternating_passes(SIDES, options.restarts,
                                                "persistent cache, "):
        for side in order:
            results[side].append(measure(
                side, client_kind(side, options), template, options,
                scratch, seed=repetition))
    return results


#: Table rows: label, figure, scale, number format, and which way the
#: speed-up goes ("time": ZEO/ours, "rate": ours/ZEO, None: no ratio).
ROWS = [
    ("start to first read, ms", "start_seconds", 1000, "%.1f", "time"),
    ("server loads during start-up", "startup_loads", 1, "%g", None),
    ("server loads reading all {objects}", "read_all_loads", 1, "%g", None),
    ("warm load() reads/s", "load_rate", 1, "%.0f", "rate"),
    ("warm loadBefore() reads/s", "load_before_rate", 1, "%.0f", "rate"),
    ("client CPU per warm load(), us", "load_cpu", 1, "%.2f", "time"),
    ("client CPU per warm loadBefore(), us", "load_before_cpu", 1, "%.2f",
     "time"),
]


def speed_up(ours, theirs, direction):
    """Above 1 when ours is faster, whichever way the figure goes."""
    if direction == "time":
        return theirs / ours if ours else None
    return ours / theirs if theirs else None


def format_table(results, options):
    """The table lines: per-side medians over the passes that worked, the
    speed-up of the medians and the range of the per-pass speed-ups."""
    columns = ("pairs, persistent cache", "ours", "ZEO", "speed-up",
               "per-pass speed-ups")
    rows = []
    for label, name, scale, number_format, direction in ROWS:
        per_pass = [(o.figures[name] * scale, t.figures[name] * scale)
                    for o, t in zip(results["ours"], results["ZEO"])
                    if o.figures is not None and t.figures is not None]
        if not per_pass:
            continue
        ours = statistics.median(pair[0] for pair in per_pass)
        theirs = statistics.median(pair[1] for pair in per_pass)
        ratio = speed_up(ours, theirs, direction) if direction else None
        ratios = [r for r in (speed_up(o, t, direction)
                              for o, t in per_pass) if r is not None] \
            if direction else []
        rows.append((
            label.format(objects=options.cache_objects),
            number_format % ours, number_format % theirs,
            "-" if ratio is None else "%.2f" % ratio,
            "%.2f-%.2f" % (min(ratios), max(ratios)) if ratios else "-"))
    return render_table(columns, rows)


def print_report(results, options):
    print("Persistent client cache of %d objects (GitHub issue 4): our "
          "client on our server"
          % options.cache_objects)
    print("(ours) vs the ZEO client on the ZEO server, median of %d "
          "passes.  The server" % options.restarts)
    print("restarted and %d objects changed before a fresh client process "
          "started with the"
          % CHANGED_OBJECTS)
    print("cache file.  speed-up above 1 means ours is faster: ZEO time / "
          "our time for")
    print("times (ms, us), our reads/s / ZEO reads/s for rates.  Warm "
          "reads: random cached")
    print("oids for %.2fs each, 1 process; loadBefore at the current "
          "snapshot." % options.duration)
    print("\n".join(format_table(results, options)))


def report_problems(results, log_problems, without_timestamp):
    """Print this section's problems and server log summary (with the
    bench's own log filters); True when a check failed."""
    failed = False
    for side in SIDES:
        for number, measurement in enumerate(results[side], 1):
            for problem in measurement.problems:
                failed = True
                print("PROBLEM with %s persistent-cache pass %d: %s"
                      % (side, number, problem))
        messages = collections.Counter(
            without_timestamp(line)
            for measurement in results[side]
            for line in log_problems(measurement.log_lines))
        for message, count in messages.most_common(3):
            print("server log (%s, persistent cache), %d times: %s"
                  % (side, count, message))
    if not failed:
        print("checks: persistent cache: right first read, no stale read, "
              "no server load during the warm reads.")
    return failed
