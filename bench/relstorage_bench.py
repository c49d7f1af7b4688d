"""RelStorage on PostgreSQL: our server against the real ZEO server.

Issue 15 asks, through the same private PostgreSQL cluster: 1-object
commits per second and cold loads per second for our server on
RelStorage and for the real ZEO server on RelStorage (the real ZEO
client on both), and our client against our server; and, with two of
our servers on one database, how long a commit through one takes to
reach a client of the other (p50, p99), against the poll interval.

Each measurement gets a fresh database (a copy of a template holding
RelStorage's schema) and a fresh server process.  A commit measurement
is one client committing one object after another for `WINDOW` seconds;
a cold-load measurement loads `LOAD_OBJECTS` objects, each once, through
a client whose cache cannot hold them.  Passes alternate the order.
"""

import os
import statistics
import time

import ZEO
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from conftest import commit_one, commit_stores
from passes import alternating_passes
from postgres_cluster import PostgresCluster, relstorage_section
from server_process import OURS, THEIRS, start_configured_server
from zeo.ClientStorage import ClientStorage

#: Seconds of each commit window (quick: a tenth).
WINDOW = 5.0
LOAD_OBJECTS = 500
#: Commits timed for the visibility latency (quick: a tenth).
VISIBILITY_SAMPLES = 200
POLL_INTERVAL = 0.1
CELLS = [("ZEO client", THEIRS), ("ZEO client", OURS), ("our client", OURS)]


def _client(kind, address):
    if kind == "ZEO client":
        return ZEO.client(address, wait_timeout=30, cache_size=1)
    return ClientStorage(address, wait_timeout=30, cache_size=1)


class Bench:
    def __init__(self, options, scratch):
        self.options = options
        self.scratch = scratch
        self.cluster = PostgresCluster()
        self._servers = 0

    def server(self, dsn, impl=OURS):
        self._servers += 1
        directory = os.path.join(self.scratch, "rs-server-%d" % self._servers)
        os.makedirs(directory)
        options = "poll-interval %s" % POLL_INTERVAL if impl == OURS else ""
        storage = "%%import relstorage\n%s" % relstorage_section(
            "1", dsn, True)
        return start_configured_server(directory, options, {"1": storage},
                                       impl=impl)

    def fresh_dsn(self):
        template = self.cluster.relstorage_template(True)
        return self.cluster.dsn(self.cluster.create_database(template))

    def commits_per_second(self, kind, impl, window):
        server = self.server(self.fresh_dsn(), impl)
        try:
            client = _client(kind, server.address)
            oid, serial, count = client.new_oid(), z64, 0
            deadline = time.perf_counter() + window
            started = time.perf_counter()
            while time.perf_counter() < deadline:
                serial = commit_one(client, oid, serial,
                                    zodb_pickle(MinPO(count)))
                count += 1
            elapsed = time.perf_counter() - started
            client.close()
        finally:
            server.stop()
        return count / elapsed

    def loads_per_second(self, kind, impl, objects):
        server = self.server(self.fresh_dsn(), impl)
        try:
            writer = _client(kind, server.address)
            oids = [writer.new_oid() for _ in range(objects)]
            commit_stores(writer, [(oid, z64, zodb_pickle(MinPO(n)))
                                   for n, oid in enumerate(oids)])
            writer.close()
            reader = _client(kind, server.address)
            started = time.perf_counter()
            for oid in oids:
                reader.load(oid)
            elapsed = time.perf_counter() - started
            reader.close()
        finally:
            server.stop()
        return objects / elapsed

    def visibility(self, samples):
        dsn = self.fresh_dsn()
        a, b = self.server(dsn), self.server(dsn)
        latencies = []
        try:
            writer = ClientStorage(a.address, wait_timeout=30)
            reader = ClientStorage(b.address, wait_timeout=30)
            oid, serial = writer.new_oid(), z64
            for n in range(samples):
                serial = commit_one(writer, oid, serial,
                                    zodb_pickle(MinPO(n)))
                committed = time.perf_counter()
                while reader.lastTransaction() < serial:
                    time.sleep(0.0005)
                latencies.append(time.perf_counter() - committed)
            writer.close()
            reader.close()
        finally:
            a.stop()
            b.stop()
        return latencies

    def close(self):
        self.cluster.stop()


def measure_all(options, scratch):
    quick = options.quick
    window = WINDOW / 10 if quick else WINDOW
    objects = LOAD_OBJECTS // 5 if quick else LOAD_OBJECTS
    bench = Bench(options, scratch)
    results = {"commits": {cell: [] for cell in CELLS},
               "loads": {cell: [] for cell in CELLS}}
    try:
        for _number, cells in alternating_passes(
                CELLS, 1 if quick else 3, "relstorage, "):
            for kind, impl in cells:
                results["commits"][(kind, impl)].append(
                    bench.commits_per_second(kind, impl, window))
                results["loads"][(kind, impl)].append(
                    bench.loads_per_second(kind, impl, objects))
        results["visibility"] = bench.visibility(
            VISIBILITY_SAMPLES // 10 if quick else VISIBILITY_SAMPLES)
    finally:
        bench.close()
    return results


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_report(results):
    print("RelStorage on PostgreSQL (history-preserving), one client, "
          "median of passes")
    print("%-26s %14s %14s" % ("client / server", "commits/s",
                               "cold loads/s"))
    for kind, impl in CELLS:
        print("%-26s %14.0f %14.0f" % (
            "%s / %s server" % (kind, "our" if impl == OURS else "ZEO"),
            statistics.median(results["commits"][(kind, impl)]),
            statistics.median(results["loads"][(kind, impl)])))
    ours = statistics.median(results["commits"][("ZEO client", OURS)])
    theirs = statistics.median(results["commits"][("ZEO client", THEIRS)])
    print("commits/s, our server / ZEO's (ZEO client on both): %.1fx"
          % (ours / theirs))
    latencies = results["visibility"]
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    print("two servers, commit through A seen by a client of B "
          "(poll-interval %gs, %d commits): p50 %.0f ms, p99 %.0f ms "
          "(p99 = %.1f poll intervals)" % (
              POLL_INTERVAL, len(latencies), p50 * 1000, p99 * 1000,
              p99 / POLL_INTERVAL))
