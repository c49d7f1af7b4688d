"""The client process of the persistent-cache measurements.

Run by `persistent_cache.py` as ``python cache_client.py SPEC``, where SPEC
is a JSON object; prints one JSON object (the results) on stdout.  It is a
separate, fresh process every time because the figure it measures, the
start-up of a client with a persistent cache, is what an application
process pays when it starts: nothing may be warm in it but the imports.

Two modes, both with ``ClientStorage(address, client=NAME, var=DIR)`` of
the client kind named in the spec (ours or ZEO's):

* ``fill``: load the root and every object, so they are all in the cache
  file, and close.
* ``restart``: the timed start-up (constructor, `ZODB.DB`, first read of an
  unchanged object through a ZODB connection), then a read of every object
  and two windows of warm-cache reads, with the server's `loads` counter
  read between the phases.
"""

import importlib
import json
import random
import sys
import threading
import time

import ZODB
from ZODB.utils import p64, u64, z64

CLIENT_MODULES = {"ours": "zeo.ClientStorage", "ZEO": "ZEO.ClientStorage"}
#: Oids drawn (at random, once) for the warm-read windows: the windows walk
#: this list again and again, so drawing costs nothing inside the clock.
WARM_SEQUENCE_LENGTH = 1 << 16
#: Reads between two looks at the clock in a warm-read window.
WARM_BATCH = 256


def open_storage(spec):
    module = importlib.import_module(CLIENT_MODULES[spec["client"]])
    return module.ClientStorage(
        ("127.0.0.1", spec["port"]), client=spec["name"], var=spec["var"],
        cache_size=spec["cache_size"], wait_timeout=30)


def server_loads(storage):
    return storage.server_status()["loads"]


def fill(spec, oids):
    """Put the root and every object into the client's cache file."""
    storage = open_storage(spec)
    try:
        for oid in [z64] + oids:
            storage.load(oid)
    finally:
        storage.close()
    return {}


def warm_reads(read, sequence, duration):
    """Reads per second and client CPU microseconds per read of `read` over
    `sequence`, repeated for `duration` seconds (all threads' CPU: a
    client's I/O thread is charged to it)."""
    batches = [sequence[first:first + WARM_BATCH]
               for first in range(0, len(sequence), WARM_BATCH)]
    clock = time.perf_counter
    done = batch_number = 0
    cpu_started = time.process_time()
    started = clock()
    end = started + duration
    while clock() < end:
        batch = batches[batch_number % len(batches)]
        for oid in batch:
            read(oid)
        done += len(batch)
        batch_number += 1
    elapsed = clock() - started
    cpu = time.process_time() - cpu_started
    return done / elapsed, cpu / done * 1e6


def restart(spec, oids):
    """Time the start-up, then count server loads and time warm reads."""
    first_oid = oids[spec["first"]]
    started = time.perf_counter()
    storage = open_storage(spec)
    db = ZODB.DB(storage)
    connection = db.open()
    value = connection.get(first_oid)["value"]
    start_seconds = time.perf_counter() - started
    try:
        startup_loads = server_loads(storage) - spec["loads_before"]
        before = server_loads(storage)
        records = [storage.load(oid) for oid in oids]
        read_all_loads = server_loads(storage) - before
        snapshot = p64(u64(storage.lastTransaction()) + 1)
        rng = random.Random(spec["seed"])
        sequence = [oids[rng.randrange(len(oids))]
                    for _ in range(WARM_SEQUENCE_LENGTH)]
        before = server_loads(storage)
        load_rate, load_cpu = warm_reads(
            storage.load, sequence, spec["duration"])
        load_before = storage.loadBefore
        load_before_rate, load_before_cpu = warm_reads(
            lambda oid: load_before(oid, snapshot), sequence,
            spec["duration"])
        warm_loads = server_loads(storage) - before
    finally:
        connection.close()
        db.close()
    return {
        "start_seconds": start_seconds,
        "first_value": value,
        "startup_loads": startup_loads,
        "read_all_loads": read_all_loads,
        "changed_tids": [records[index][1].hex()
                         for index in spec["changed"]],
        "load_rate": load_rate, "load_cpu": load_cpu,
        "load_before_rate": load_before_rate,
        "load_before_cpu": load_before_cpu,
        "warm_loads": warm_loads,
        "threads_left": sorted(
            thread.name for thread in threading.enumerate()
            if thread is not threading.main_thread()),
    }


def main():
    spec = json.loads(sys.argv[1])
    with open(spec["oids_path"]) as source:
        oids = [bytes.fromhex(text) for text in json.load(source)]
    # Import the client's module before any clock starts: the start-up
    # figure is the client's work, not the interpreter's imports.
    importlib.import_module(CLIENT_MODULES[spec["client"]])
    mode = {"fill": fill, "restart": restart}[spec["mode"]]
    print(json.dumps(mode(spec, oids)))


if __name__ == "__main__":
    main()
