"""The operations the benchmark times, and the worker processes running them.

Each client of a measurement runs in its own worker process, so eight
concurrent clients really are eight processes with their own interpreter
lock, as they would be in production.  A worker lives for the whole bench
run and takes orders from the parent through a pipe:

1. ``("prepare", spec)``: connect, set up, do a few warm-up operations,
   answer ``("ready", None)``.  Connecting is slow (both ClientStorages
   start I/O threads), so it happens before the clock starts.
2. ``("go", start_at, end_at)``: wait until `start_at`, run operations until
   `end_at` (both `time.monotonic()` values, which are system-wide on the
   platforms we run on), disconnect, answer ``("done", result)``: the
   operations completed, the worker's CPU time during the window and the
   threads still alive after disconnecting.
3. ``None``: exit.

All workers of one measurement get the same time window, so the aggregate
throughput is simply the sum of their counts divided by the window.
"""

import importlib
import multiprocessing
import pickle
import ssl
import threading
import time
import traceback

from raw_client import MAXTID, Z64, RawClient

LOAD = "load"
COMMIT = "commit"
RAW = "raw"
ZEO_CLIENT = "ZEO"
OUR_CLIENT = "ours"

#: The module whose `ClientStorage` each storage-API client uses.
CLIENT_MODULES = {ZEO_CLIENT: "ZEO.ClientStorage",
                  OUR_CLIENT: "zeo.ClientStorage"}

#: ClientStorage cache size for the load workload: smaller than any record,
#: so neither client's cache keeps anything and every load reaches the
#: server (checked against the server's `loads` counter by the parent).
NO_CACHE_BYTES = 1
WARMUP_OPERATIONS = 20


def object_record(value):
    """A small, well-formed ZODB record (class pickle + state pickle)."""
    return (pickle.dumps(("persistent.mapping", "PersistentMapping"), 3)
            + pickle.dumps({"data": {"value": value}}, 3))


# --- the clients behind one small interface -------------------------------

class RawSession:
    """The benchmark's operations over `RawClient`."""

    def __init__(self, address):
        self.client = RawClient(address)

    def load(self, oid):
        self.client.load_before(oid, MAXTID)

    def new_oid(self):
        return self.client.new_oids(1)[0]

    def commit_one(self, oid, serial, data):
        return self.client.commit([(oid, serial, data)])

    def close(self):
        self.client.close()


class StorageSession:
    """The benchmark's operations over a `ClientStorage` class.

    The real ZEO client and ours are driven by exactly the same storage
    API calls, so their lines differ in the client and nothing else.
    """

    def __init__(self, storage_class, address, cache_size, tls=None):
        from ZODB.Connection import TransactionMetaData
        self._metadata = TransactionMetaData
        options = {}
        if tls is not None:
            options["ssl"] = client_ssl_context(*tls)
        self.storage = storage_class(
            address, cache_size=cache_size, wait_timeout=60, **options)

    def load(self, oid):
        self.storage.load(oid)

    def new_oid(self):
        return self.storage.new_oid()

    def commit_one(self, oid, serial, data):
        storage = self.storage
        txn = self._metadata()
        storage.tpc_begin(txn)
        storage.store(oid, serial, data, "", txn)
        storage.tpc_vote(txn)
        return storage.tpc_finish(txn)

    def close(self):
        self.storage.close()


def client_ssl_context(ca, certificate, key):
    """A client TLS context from file paths (a spec's "tls"; contexts
    cannot be sent to a worker process)."""
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(certificate, key)
    return context


def open_session(client, address, workload, tls=None):
    """A session of `client`; with `tls` (paths: CA, certificate, key) a
    storage-API client connects with TLS."""
    if client == RAW:
        return RawSession(address)
    storage_class = importlib.import_module(
        CLIENT_MODULES[client]).ClientStorage
    cache_size = NO_CACHE_BYTES if workload == LOAD else 20 * 1024 * 1024
    return StorageSession(storage_class, address, cache_size, tls)


# --- the workloads ---------------------------------------------------------

class LoadWorkload:
    """Load the current revision of distinct oids, round robin.

    Worker `index` of `count` starts at its own offset in the oid list, so
    concurrent workers do not ask for the same object at the same time.
    """

    def __init__(self, session, oids, index, count):
        self.session = session
        self.oids = oids
        self.position = index * len(oids) // count

    def step(self):
        oids = self.oids
        self.session.load(oids[self.position % len(oids)])
        self.position += 1


class CommitWorkload:
    """One transaction storing one small object per step.

    Each worker updates an object of its own, created during setup, so
    concurrent committers never conflict and every commit succeeds.
    """

    def __init__(self, session, oids, index, count):
        self.session = session
        self.oid = session.new_oid()
        self.revision = 0
        self.serial = session.commit_one(self.oid, Z64, object_record(0))

    def step(self):
        self.revision += 1
        self.serial = self.session.commit_one(
            self.oid, self.serial, object_record(self.revision))


WORKLOADS = {LOAD: LoadWorkload, COMMIT: CommitWorkload}


def run_timed(workload, start_at, end_at):
    """Run steps in [start_at, end_at).

    Returns the number of steps completed and the CPU seconds this worker
    process spent on them: `time.process_time()` counts every thread of
    the process (user + system), so a client's reader or event-loop thread
    is charged to the client, which is the point of the figure.
    """
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    step = workload.step
    clock = time.monotonic
    completed = 0
    cpu_started = time.process_time()
    while clock() < end_at:
        step()
        completed += 1
    return completed, time.process_time() - cpu_started


# --- the worker process ----------------------------------------------------

def worker_main(pipe):
    """Serve prepare/go orders from the parent until told to stop."""
    while True:
        order = pipe.recv()
        if order is None:
            return
        try:
            _, spec = order
            session = open_session(
                spec["client"], spec["address"], spec["workload"],
                spec.get("tls"))
            try:
                workload = WORKLOADS[spec["workload"]](
                    session, spec["oids"], spec["index"], spec["count"])
                for _ in range(WARMUP_OPERATIONS):
                    workload.step()
                pipe.send(("ready", None))
                _, start_at, end_at = pipe.recv()
                late = max(0.0, time.monotonic() - start_at)
                completed, cpu = run_timed(workload, start_at, end_at)
            finally:
                session.close()
            pipe.send(("done", {
                "completed": completed,
                "issued": completed + WARMUP_OPERATIONS,
                "late": late,
                "cpu": cpu,
                # A thread a client leaves behind after close() would
                # keep running in this worker, into later measurements.
                "threads_left": sorted(
                    thread.name for thread in threading.enumerate()
                    if thread is not threading.main_thread()),
            }))
        except Exception:
            pipe.send(("error", traceback.format_exc()))


class WorkerError(RuntimeError):
    """A worker reported an exception; the pool is still usable."""


class WorkerPool:
    """A fixed set of named worker processes, started once per bench run."""

    def __init__(self, size):
        context = multiprocessing.get_context("spawn")
        self._workers = []
        for number in range(size):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main, args=(child_end,),
                name="bench-worker-%d" % number, daemon=True)
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))

    def run(self, specs, duration, meter=None, timeout=120):
        """Run one measurement: one spec per worker, same time window.

        Returns the list of per-worker result dicts.  `meter`, if given,
        has its `start()` called once every worker is ready and its
        `stop()` once every worker is done, so what it measures covers
        the window and not the connecting.  If any worker fails to
        prepare, the others get an empty window (so they disconnect and
        go back to waiting for orders) and WorkerError is raised.
        """
        active = self._workers[:len(specs)]
        for (_, pipe), spec in zip(active, specs):
            pipe.send(("prepare", spec))
        ready, errors = [], []
        for process, pipe in active:
            kind, detail = self._receive(process, pipe, timeout)
            if kind == "ready":
                ready.append((process, pipe))
            else:
                errors.append(detail)
        if meter is not None:
            meter.start()
        start_at = time.monotonic() + 0.05
        end_at = start_at + (0.0 if errors else duration)
        for _, pipe in ready:
            pipe.send(("go", start_at, end_at))
        results = []
        for process, pipe in ready:
            kind, detail = self._receive(process, pipe, timeout + duration)
            if kind == "done":
                results.append(detail)
            else:
                errors.append(detail)
        if meter is not None:
            meter.stop()
        if errors:
            raise WorkerError("worker failed:\n" + "\n".join(errors))
        return results

    @staticmethod
    def _receive(process, pipe, timeout):
        if not pipe.poll(timeout):
            raise RuntimeError("%s did not answer in %ss"
                               % (process.name, timeout))
        return pipe.recv()

    def close(self):
        for process, pipe in self._workers:
            pipe.send(None)
        for process, pipe in self._workers:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join()
