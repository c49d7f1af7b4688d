"""Reconnection after a server restart, and network partitions.

GitHub issue 14 asks how soon a client is usable again, on the pairs
(our client on our server against the ZEO client on the ZEO server):

1. Restart.  A connected client; its server is stopped by its PID
   (SIGTERM) and started again on the same Data.fs and port.  Figure:
   the time from the new server's "listening on" log line (read from its
   stderr as it comes) to the client's first load that succeeds.  The
   client's cache holds 1 byte, so every load needs the server; a thread
   tries one every 2 ms from the moment the old server stopped.  The
   whole outage (stop to usable) is shown too.
2. Partition.  The client reaches its server through a `SilentProxy`
   (tests/silent_proxy.py) and has a second server, on a copy of the same
   file, as the second address of its list; that server starts once the
   client is connected through the proxy (ZEO's client tries all its
   addresses at once and takes the first that answers).  The proxy goes
   silent
   (nothing relayed, nothing closed) and the thread starts loading.
   Figures: the time until a load raises ClientDisconnected (the client
   noticed), and until a load succeeds again (through the second
   server).  Our client runs with `heartbeat_timeout` --heartbeat-timeout;
   ZEO's client has no such setting and is given --partition-wait
   seconds, after which the proxy heals so that its load can end.

Passes alternate which side goes first, as in the rest of the bench.
"""

import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time

import ZEO.Exceptions

import server_process
import zeo.Exceptions
from passes import alternating_passes
from persistent_cache import serving, speed_up
from silent_proxy import SilentProxy
from storage_template import StorageTemplate
from table import render_table
from workloads import CLIENT_MODULES, NO_CACHE_BYTES, object_record

SIDES = ("ours", "ZEO")
DISCONNECTED = (ZEO.Exceptions.ClientDisconnected,
                zeo.Exceptions.ClientDisconnected)
#: Seconds between the probing thread's loads while they fail.
PROBE_INTERVAL = 0.002
#: Seconds a restarted server's client is given to be usable again.
RESTART_WAIT = 30


class Probe:
    """A named thread loading `oid` until a load succeeds or `deadline`
    (time.monotonic()) passes; it notes when a load first raised
    ClientDisconnected and when one first succeeded (None: never before
    the deadline)."""

    def __init__(self, storage, oid, deadline):
        self.disconnected_at = self.usable_at = None
        self.errors = []
        #: Set when the thread ends.
        self.done = threading.Event()
        self._storage, self._oid, self._deadline = storage, oid, deadline
        self._thread = threading.Thread(target=self._run, name="bench-probe",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self._load_until_usable()
        finally:
            self.done.set()

    def _load_until_usable(self):
        while time.monotonic() < self._deadline:
            try:
                self._storage.load(self._oid)
            except DISCONNECTED:
                if self.disconnected_at is None:
                    self.disconnected_at = time.monotonic()
                time.sleep(PROBE_INTERVAL)
                continue
            except Exception as exc:  # reported, not hidden
                self.errors.append(repr(exc))
                return
            now = time.monotonic()
            if now < self._deadline:
                self.usable_at = now
            return

    def join(self, timeout):
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.errors.append("a load was still waiting %ss after the "
                               "deadline" % timeout)


class Outcome:
    """One side's figures from one pass (None where the run failed), its
    problems and its servers' log lines."""

    def __init__(self, figures, problems, log_lines):
        self.figures = figures
        self.problems = problems
        self.log_lines = log_lines


def server_impl(side, options):
    if side == "ours" and not options.ours_is_zeo:
        return server_process.OURS
    return server_process.THEIRS


def open_client(kind, addresses, options):
    """A ClientStorage of `kind` ("ours" or "ZEO") with a 1-byte cache;
    ours with the bench's heartbeat timeout."""
    module = __import__(CLIENT_MODULES[kind], fromlist=["ClientStorage"])
    extra = ({"heartbeat_timeout": options.heartbeat_timeout}
             if kind == "ours" else {})
    return module.ClientStorage(addresses, cache_size=NO_CACHE_BYTES,
                                wait_timeout=30, **extra)


@contextlib.contextmanager
def fresh_copies(template, scratch, count):
    """`count` directories, each with a copy of the template's file."""
    directories = [tempfile.mkdtemp(dir=scratch) for _ in range(count)]
    for directory in directories:
        template.copy_to(directory)
    try:
        yield directories
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


def measure_restart(side, kind, template, options, scratch):
    problems, log_lines, figures = [], [], None
    impl, port, oid = server_impl(side, options), server_process.free_port(), \
        template.oids[0]
    with fresh_copies(template, scratch, 1) as (directory,):
        try:
            with serving(impl, directory, port, problems, log_lines) as old:
                storage = open_client(kind, [("127.0.0.1", port)], options)
                storage.load(oid)
                old.stop()
                stopped = time.monotonic()
            probe = Probe(storage, oid, stopped + RESTART_WAIT)
            try:
                with serving(impl, directory, port, problems,
                             log_lines) as new:
                    probe.join(RESTART_WAIT + 5)
            finally:
                storage.close()
            problems.extend(probe.errors)
            if probe.usable_at is None:
                problems.append("not usable %ss after the restart"
                                % RESTART_WAIT)
            else:
                figures = {"listening_to_usable":
                           probe.usable_at - new.listening_at,
                           "outage": probe.usable_at - stopped}
        except (RuntimeError, OSError) + DISCONNECTED as exc:
            problems.append(repr(exc))
    return Outcome(figures, problems, log_lines)


def measure_partition(side, kind, template, options, scratch):
    problems, log_lines, figures = [], [], None
    impl, oid = server_impl(side, options), template.oids[0]
    ports = [server_process.free_port() for _ in range(2)]
    wait = options.partition_wait
    with fresh_copies(template, scratch, 2) as directories, \
            contextlib.ExitStack() as stack:
        try:
            first = stack.enter_context(serving(
                impl, directories[0], ports[0], problems, log_lines))
            proxy = stack.enter_context(SilentProxy(first.address))
            storage = open_client(
                kind, [proxy.address, ("127.0.0.1", ports[1])], options)
            try:
                storage.load(oid)  # through the proxy: nothing else listens
                stack.enter_context(serving(
                    impl, directories[1], ports[1], problems, log_lines))
                proxy.silence()
                silenced = time.monotonic()
                probe = Probe(storage, oid, silenced + wait)
                probe.done.wait(wait)  # ends early once usable again
                proxy.heal()  # lets a load still waiting end
                probe.join(30)
            finally:
                storage.close()
            problems.extend(probe.errors)
            figures = {name: None if at is None else at - silenced
                       for name, at in (("detected", probe.disconnected_at),
                                        ("usable", probe.usable_at))}
        except (RuntimeError, OSError) + DISCONNECTED as exc:
            problems.append(repr(exc))
    return Outcome(figures, problems, log_lines)


MEASUREMENTS = (("restart", measure_restart),
                ("partition", measure_partition))


def measure_all(options, scratch, client_kind):
    """{(measurement, side): [Outcome per pass]}.  `client_kind` maps a
    side to the client really run (--ours-is-zeo)."""
    directory = os.path.join(scratch, "reconnect-template")
    os.mkdir(directory)
    template = StorageTemplate(directory, [object_record(0)])
    results = {(name, side): [] for name, _ in MEASUREMENTS
               for side in SIDES}
    for _number, order in alternating_passes(
            SIDES, options.reconnect_passes, "reconnect, "):
        for name, measure in MEASUREMENTS:
            for side in order:
                results[name, side].append(measure(
                    side, client_kind(side, options), template, options,
                    scratch))
    return results


#: Table rows: measurement, figure, label.
ROWS = [
    ("restart", "listening_to_usable",
     "restart: server listening to client usable"),
    ("restart", "outage", "restart: server stopped to client usable"),
    ("partition", "detected", "partition: silent to ClientDisconnected"),
    ("partition", "usable", "partition: silent to usable on 2nd server"),
]


def format_table(results, options):
    """Per-side medians in ms (a figure never reached within the wait
    shows as "> wait"), ZEO time / our time, and its per-pass range."""
    never = "> %g" % (options.partition_wait * 1000)
    columns = ("pairs, reconnecting (ms)", "ours", "ZEO", "speed-up",
               "per-pass speed-ups")
    rows = []
    for measurement, name, label in ROWS:
        per_pass = [(o.figures[name], t.figures[name]) for o, t in zip(
            results[measurement, "ours"], results[measurement, "ZEO"])
            if o.figures is not None and t.figures is not None]
        if not per_pass:
            continue
        medians = []
        for values in zip(*per_pass):
            reached = [value for value in values if value is not None]
            medians.append(statistics.median(reached) * 1000
                           if len(reached) * 2 > len(values) else None)
        ratios = [speed_up(o, t, "time") for o, t in per_pass
                  if o is not None and t is not None]
        ratio = (speed_up(medians[0], medians[1], "time")
                 if None not in medians else None)
        rows.append((
            label,
            *("%.0f" % value if value is not None else never
              for value in medians),
            "-" if ratio is None else "%.2f" % ratio,
            "%.2f-%.2f" % (min(ratios), max(ratios)) if ratios else "-"))
    return render_table(columns, rows)


def print_report(results, options):
    print("Reconnecting (GitHub issue 14): our client on our server (ours) "
          "vs the ZEO client")
    print("on the ZEO server, median of %d passes; speed-up = ZEO time / "
          "our time." % options.reconnect_passes)
    print("Restart: SIGTERM, then the same port and file.  Partition: a "
          "proxy stops relaying")
    print("without closing; the client has a second server.  Ours: "
          "heartbeat-timeout %g s;" % options.heartbeat_timeout)
    print("ZEO's client is waited for %g s, then the proxy heals."
          % options.partition_wait)
    print("\n".join(format_table(results, options)))


def report_problems(results, log_problems):
    """Print this section's problems and count its servers' error log
    lines; True when a check failed."""
    failed = False
    for (name, side), outcomes in results.items():
        for number, outcome in enumerate(outcomes, 1):
            for problem in outcome.problems:
                failed = True
                print("PROBLEM with %s %s pass %d: %s"
                      % (side, name, number, problem))
            errors = log_problems(outcome.log_lines)
            if errors:
                print("server log (%s, %s pass %d): %d error lines, first: %s"
                      % (side, name, number, len(errors), errors[0]))
    if not failed:
        print("checks: reconnect: every client was usable again after each "
              "restart.")
    return failed
