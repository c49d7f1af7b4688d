"""`make soak`: a server and many client threads for a long time, then
checks that nothing was lost and nothing grew.

One server process (ours, started the way users start it, with a
FileStorage and a blob directory) and several client processes
(bench/soak_client.py: our ClientStorage under ZODB.DB, several threads
each) run a mixed workload for ``--minutes`` (default 30): warm and cold
loads, small and large commits, blobs, conflicting transfers (retried),
undo.  Meanwhile this process, on a schedule scaled to the duration,
restarts the server twice (SIGTERM, then a new process on the same port;
the clients must reconnect by themselves), SIGKILLs a client process and
starts it again, and packs four times (with zeo-pack and through a
ClientStorage, in turn).  The server can import the soak's classes
(bench/ is on its PYTHONPATH), as a production server has the
application's, so that ZODB can try to resolve conflicts.  A sampler
records the server's RSS, threads and open files every few seconds.

At the end it checks: every read saw the bank's total and consistent
stamps; no client hit an unexpected error; every acknowledged commit is
on disk (or a later one); Data.fs passes fstest and fsrefs; every server
exited cleanly and every client reconnected after each restart; the last
server's RSS, threads and files stayed flat after warm-up (see
soak_samples) and came back to the no-client baseline once the clients
closed.  It prints a report, writes it with the samples (CSV, and a PNG
when matplotlib is installed) to the output directory, and exits with
status 1 if any check failed.
"""

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH_DIR)
sys.path[:0] = [BENCH_DIR, REPOSITORY, os.path.join(REPOSITORY, "tests")]

import ZODB  # noqa: E402
from ZODB.serialize import referencesf  # noqa: E402

import soak_checks  # noqa: E402
import soak_samples  # noqa: E402
from server_process import ServerProcess, free_port, write_config  # noqa
from soak_model import populate  # noqa: E402
from zeo.ClientStorage import ClientStorage  # noqa: E402

CLIENT_SCRIPT = os.path.join(BENCH_DIR, "soak_client.py")
#: When each disturbance happens, as a fraction of the run.  The server
#: restarts come first, so the last server runs for most of the soak and
#: its samples say whether it stays flat.
RESTARTS = (0.10, 0.20)
CLIENT_KILL = 0.30
#: Packs, alternately with zeo-pack and through a ClientStorage.
PACKS = (0.40, 0.55, 0.70, 0.85)
#: Seconds between the SIGKILL of a client and its new start.
KILLED_CLIENT_PAUSE = 2
#: Seconds a pack keeps of history (so recent transactions stay undoable).
PACK_KEEPS = 20
#: Seconds every client process has, after a restart, to reconnect.
RECONNECT_BOUND = 60
#: Seconds the clients have to finish after the deadline.
CLIENT_EXIT_GRACE = 120
#: Seconds the server has to come back to its no-client baseline.
SETTLE_SECONDS = 20
#: Distinct server log errors shown in the report.
LOG_KINDS = 5
#: The client part of a server log line ("(label address) ").
_CLIENT = re.compile(r"\([^)]*\) ")


class Soak:
    """The run: the server, the client processes, the schedule."""

    def __init__(self, arguments, directory):
        self.arguments = arguments
        self.directory = directory
        self.port = free_port()
        self.data_path = os.path.join(directory, "Data.fs")
        self.blob_dir = os.path.join(directory, "blobs")
        self.config = write_config(
            directory, "address 127.0.0.1:%d" % self.port,
            {"1": "<filestorage 1>\n  path %s\n  blob-dir %s\n"
                  "</filestorage>" % (self.data_path, self.blob_dir)})
        self.started = time.time()
        self.deadline = self.started + arguments.minutes * 60
        self.servers = []  # every ServerProcess, in order
        self.server_lock = threading.Lock()
        self.server = None  # the running one, None while restarting
        self.clients = {}  # process number -> (Popen, incarnation)
        self.events = []  # (seconds since start, what)
        self.marks = []  # (seconds since start, label) for the plot
        #: (time.time() the old server had exited, and the new one was
        #: seen accepting connections) of each restart.
        self.restarts = []
        self.exit_statuses = []  # (what, status) of every stopped process
        self.sampler = soak_samples.Sampler(
            self._current_server, arguments.sample_interval, self.started,
            directory)

    def _current_server(self):
        with self.server_lock:
            if self.server is None:
                return None
            return len(self.servers), self.server.process.pid

    def mark(self, label):
        self.marks.append((time.time() - self.started, label))

    def event(self, what):
        elapsed = time.time() - self.started
        self.events.append((elapsed, what))
        print("%7.1fs  %s" % (elapsed, what), flush=True)

    # --- the server --------------------------------------------------------

    def start_server(self):
        server = ServerProcess(["-C", self.config],
                               address=("127.0.0.1", self.port),
                               env={"PYTHONPATH": os.pathsep.join(filter(
                                   None, [BENCH_DIR,
                                          os.environ.get("PYTHONPATH")]))})
        with self.server_lock:
            self.servers.append(server)
            self.server = server
        self.event("server %d started (pid %d)"
                   % (len(self.servers), server.process.pid))

    def stop_server(self):
        with self.server_lock:
            server, self.server = self.server, None
        status = server.stop()
        self.exit_statuses.append(("server %d" % len(self.servers), status))
        self.event("server %d stopped (SIGTERM), exit status %s"
                   % (len(self.servers), status))

    def restart_server(self):
        self.mark("server restart")
        self.stop_server()
        stopped = time.time()
        self.start_server()
        self.restarts.append((stopped, time.time()))

    def baseline(self):
        """The server's (threads, fds) with no client connected, once two
        samples in a row agree."""
        previous = None
        for _ in range(int(SETTLE_SECONDS / 0.5)):
            row = self.sampler.sample()
            now = row and (row["threads"], row["fds"])
            if now == previous:
                return now
            previous = now
            time.sleep(0.5)
        return previous

    # --- the clients -------------------------------------------------------

    def start_client(self, number, incarnation=0):
        arguments = self.arguments
        output = open(os.path.join(self.directory, "client-%d-%d.out"
                                   % (number, incarnation)), "w")
        with output:
            process = subprocess.Popen(
                [sys.executable, CLIENT_SCRIPT, "--port", str(self.port),
                 "--process", str(number),
                 "--processes", str(arguments.processes),
                 "--threads", str(arguments.threads),
                 "--until", repr(self.deadline),
                 "--directory", self.directory,
                 "--incarnation", str(incarnation)],
                stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, cwd=self.directory)
        self.clients[number] = (process, incarnation)
        return process

    def kill_client(self, number=0):
        process, incarnation = self.clients[number]
        self.mark("client kill")
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.event("client %d killed (SIGKILL)" % number)
        time.sleep(KILLED_CLIENT_PAUSE)
        self.start_client(number, incarnation + 1)
        self.event("client %d started again" % number)

    def wait_for_clients(self):
        for number, (process, incarnation) in sorted(self.clients.items()):
            timeout = max(0, self.deadline + CLIENT_EXIT_GRACE - time.time())
            try:
                status = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                status = "killed: still running %ds after the deadline" \
                    % CLIENT_EXIT_GRACE
            self.exit_statuses.append(("client %d" % number, status))

    # --- packing -------------------------------------------------------------

    def pack_with_zeopack(self):
        command = os.path.join(os.path.dirname(sys.executable), "zeo-pack")
        self.mark("zeo-pack")
        when = time.time() - PACK_KEEPS
        result = subprocess.run(
            [command, "-t", repr(when), "127.0.0.1:%d" % self.port],
            capture_output=True, text=True, timeout=600)
        self.exit_statuses.append(("zeo-pack", result.returncode))
        self.event("zeo-pack, exit status %d: %s" % (
            result.returncode, (result.stdout + result.stderr).strip()))

    def pack_with_storage(self):
        self.mark("storage.pack")
        storage = ClientStorage(("127.0.0.1", self.port), wait_timeout=60)
        try:
            started = time.monotonic()
            storage.pack(time.time() - PACK_KEEPS, referencesf)
            self.event("ClientStorage.pack done in %.1fs"
                       % (time.monotonic() - started))
        finally:
            storage.close()

    # --- the run -------------------------------------------------------------

    def fill(self):
        client_blobs = os.path.join(self.directory, "blobs-setup")
        db = ZODB.DB(ClientStorage(("127.0.0.1", self.port),
                                   blob_dir=client_blobs, wait_timeout=60))
        try:
            populate(db, self.arguments.processes, self.arguments.threads)
        finally:
            db.close()
        self.event("database filled")

    def schedule(self):
        length = self.deadline - self.started
        plan = [(fraction, self.restart_server) for fraction in RESTARTS]
        plan.append((CLIENT_KILL, self.kill_client))
        packs = (self.pack_with_zeopack, self.pack_with_storage)
        plan += [(fraction, packs[number % 2])
                 for number, fraction in enumerate(PACKS)]
        return [(self.started + fraction * length, action)
                for fraction, action in sorted(plan, key=lambda p: p[0])]

    def run(self):
        """Run the soak; the list of checks."""
        self.start_server()
        self.fill()
        idle = self.baseline()
        self.event("no-client baseline: %d threads, %d open files" % idle)
        for number in range(self.arguments.processes):
            self.start_client(number)
        self.event("%d client processes x %d threads started" % (
            self.arguments.processes, self.arguments.threads))
        for when, action in self.schedule():
            time.sleep(max(0, when - time.time()))
            action()
        time.sleep(max(0, self.deadline - time.time()))
        self.mark("clients stop")
        self.event("deadline: the clients stop")
        self.wait_for_clients()
        self.event("clients exited")
        settled = self.baseline()
        self.event("after the clients: %d threads, %d open files" % settled)
        self.stop_server()
        self.sampler.stop()
        return self.checks(idle, settled)

    def checks(self, idle, settled):
        guarded = soak_checks.guarded
        entries, unreadable = soak_checks.read_journals(self.directory)
        last = [row for row in self.sampler.rows()
                if row["server"] == len(self.servers)
                and row["elapsed"] <= self.deadline - self.started]
        results = soak_checks.journal_checks(entries, unreadable)
        results += guarded("Data.fs content", soak_checks.database_checks,
                           self.data_path, self.blob_dir, entries)
        results += guarded("Data.fs checking scripts",
                           soak_checks.file_checks, self.data_path)
        results.append(self._exit_check())
        results.append(self._reconnect_check(entries))
        results += soak_samples.flatness(last)
        results.append((
            "server back to its no-client threads and files",
            settled == idle, "%d threads, %d files before the clients; "
            "%d, %d after" % (idle + settled)))
        return results

    def _exit_check(self):
        bad = [(what, status) for what, status in self.exit_statuses
               if status != 0]
        return ("every server, client and zeo-pack exited with status 0",
                not bad, "%s" % bad if bad else
                "%d processes" % len(self.exit_statuses))

    def _reconnect_check(self, entries):
        """Each client process recovered by itself after each restart
        (a success after the old server had gone can only come from the
        new one); the detail says how long the slowest took after the
        soak saw the new server accept connections (a client may beat
        the soak to it: 0)."""
        delays, missing = [], []
        for stopped, listened in self.restarts:
            for number in range(self.arguments.processes):
                prefix = "p%dt" % number
                times = [entry["time"] for entry in entries
                         if entry.get("recovered", "").startswith(prefix)
                         and stopped <= entry["time"]
                         <= listened + RECONNECT_BOUND]
                if times:
                    delays.append(max(0, min(times) - listened))
                else:
                    missing.append((number, round(listened - self.started)))
        return ("every client reconnected by itself after each server "
                "restart (within %ds)" % RECONNECT_BOUND, not missing,
                "not (client, restart at s): %s" % missing if missing else
                "first successful operation %.2f-%.2fs after the new "
                "server listened" % (min(delays), max(delays)))


def report(soak, results, output):
    """The report's lines."""
    counts = soak_checks.read_counts(soak.directory)
    rows = soak.sampler.rows()
    lines = ["zeo soak: %.1f minutes, %d client processes x %d threads, "
             "%d servers" % (soak.arguments.minutes, soak.arguments.processes,
                             soak.arguments.threads, len(soak.servers)),
             "", "Timeline (seconds since start):"]
    lines += ["  %7.1f  %s" % event for event in soak.events]
    lines += ["", "Client operations (all processes; a killed process's "
              "last few seconds are not counted):"]
    lines += ["  %-28s %9d" % item for item in sorted(counts.items())]
    lines += ["", "Server samples (RSS MiB / threads / open files):"]
    for number in range(1, len(soak.servers) + 1):
        mine = [row for row in rows if row["server"] == number]
        if mine:
            lines.append("  server %d: first %s, last %s, peak RSS %.1f, "
                         "%d samples" % (
                             number, _triple(mine[0]), _triple(mine[-1]),
                             max(row["rss_kib"] for row in mine) / 1024,
                             len(mine)))
    if rows:
        lines.append("  least free disk space: %d MiB" % min(
            row["disk_free_mib"] for row in rows))
    if os.path.exists(soak.data_path):
        lines.append("  Data.fs at the end: %.1f MiB"
                     % (os.path.getsize(soak.data_path) / 2 ** 20))
    lines += ["", "Server log ERROR lines (count, message):"]
    lines += ["  %6d  %s" % (count, message) for message, count in
              server_errors(soak.servers).most_common(LOG_KINDS)]
    lines += ["", "Checks:"]
    for name, passed, detail in results:
        lines.append("  %s  %s: %s" % ("PASS" if passed else "FAIL", name,
                                       detail))
    lines += ["", "Output in %s" % output]
    return lines


def server_errors(servers):
    """How often each ERROR message (without time and client) appeared."""
    messages = collections.Counter()
    for server in servers:
        for line in server.log_lines:
            if " ERROR " in line:
                messages[_CLIENT.sub("", line.split(" ERROR ", 1)[1])] += 1
    return messages


def _triple(row):
    return "%.1f/%d/%d" % (row["rss_kib"] / 1024, row["threads"], row["fds"])


def save(soak, output):
    """Write the samples and the server logs; the plot's problem or None."""
    rows = soak.sampler.rows()
    soak_samples.write_csv(rows, os.path.join(output, "server-samples.csv"))
    for number, server in enumerate(soak.servers, 1):
        with open(os.path.join(output, "server-%d.log" % number), "w") as log:
            log.write(server.log + "\n")
    return soak_samples.write_plot(
        rows, soak.marks, os.path.join(output, "server-samples.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Soak a server with many clients; see bench/soak.py.")
    parser.add_argument("--minutes", type=float, default=30,
                        help="how long the clients run (default 30)")
    parser.add_argument("--processes", type=int, default=4,
                        help="client processes (default 4)")
    parser.add_argument("--threads", type=int, default=4,
                        help="worker threads per client process (default 4)")
    parser.add_argument("--sample-interval", type=float, default=2,
                        help="seconds between server samples (default 2)")
    parser.add_argument("--output", default=os.path.join(
        REPOSITORY, "var", time.strftime("soak-%Y%m%d-%H%M%S")),
        help="directory for the report, samples, plot and server logs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database and client journals even "
                             "when every check passes")
    arguments = parser.parse_args(argv)
    if arguments.minutes <= 0 or arguments.processes < 1 \
            or arguments.threads < 1 or arguments.sample_interval <= 0:
        parser.error("--minutes, --processes, --threads and "
                     "--sample-interval must be positive")
    os.makedirs(arguments.output, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="zeo-soak-")
    soak = Soak(arguments, directory)
    try:
        results = soak.run()
    finally:
        for process, _ in soak.clients.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        if soak.server is not None:
            soak.stop_server()
        plot_problem = save(soak, arguments.output)
    lines = report(soak, results, arguments.output)
    if plot_problem:
        lines.append(plot_problem)
    failed = [name for name, passed, _ in results if not passed]
    if failed or arguments.keep:
        lines.append("Database, journals and client output kept in %s"
                     % directory)
    else:
        shutil.rmtree(directory)
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(arguments.output, "report.txt"), "w") as output:
        output.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
