"""Our ClientStorage's persistent cache end to end (GitHub issue 4).

Real server subprocesses (ours) on real FileStorages, and real client
processes where the client's own life matters:

* the server restarts under a connected client holding 10,000 objects in
  its persistent cache while another client changes a few of them: after
  reconnecting by itself, the client reloads exactly the changed objects;
* the client process restarts: the second process with the same client
  name loads everything from the cache file (no server load);
* a client process is SIGKILLed while it loads, commits and writes its
  cache: the next process with that client name opens the cache (the dead
  process's lock is not held against it) and reads exactly what the server
  has.

A server restarted "on the same port" listens on a fixed port taken from
`free_port()`.  Every wait polls with a deadline.
"""

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from conftest import REPO_ROOT, server_environment
from conftest import commit_stores, wait_until
from server_process import ServerProcess, free_port, stop_all
from zeo.client.cache_file import cache_file_path

#: How long a test waits for a client to notice a lost or new server.

#: Big enough for every object of these tests: nothing is evicted.
BIG_CACHE = 64 * 2 ** 20

FAST_RETRY = {"min_disconnect_poll": 0.2, "max_disconnect_poll": 0.5}


# -- helpers ------------------------------------------------------------------

@pytest.fixture
def servers():
    """Factory: start(port, path) -> our server on 127.0.0.1:port serving
    the FileStorage `path`.  Every server is stopped after the test (by its
    PID) and must have exited with status 0; logs are printed."""
    started = []

    def start(port, path):
        server = ServerProcess(["-a", "127.0.0.1:%d" % port, "-f", str(path)],
                               env=server_environment())
        started.append(server)
        return server

    yield start
    statuses = stop_all(started)
    assert statuses == [0] * len(started), "server exit statuses"


@pytest.fixture
def clients(clients):
    """The shared factory, addressed by a port on 127.0.0.1."""
    return lambda port, **options: clients(("127.0.0.1", port), **options)


@pytest.fixture
def children():
    """Factory running client child processes (stdout piped, stderr to a
    file); any still running is SIGKILLed by PID after the test and its
    stderr printed."""
    started = []

    def spawn(tmp_path, script, *args):
        log = open(str(tmp_path / ("child-%d.err" % len(started))), "w+")
        child = subprocess.Popen(
            [sys.executable, "-c", script] + [str(arg) for arg in args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            cwd=REPO_ROOT, env=dict(os.environ, **server_environment()),
            text=True)
        child.error_log = log
        started.append(child)
        return child

    yield spawn
    for child in started:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.error_log.seek(0)
        print("---- stderr of child pid %d (status %s) ----\n%s"
              % (child.pid, child.returncode, child.error_log.read()))
        child.error_log.close()


def server_loads(storage):
    """Loads the server has answered for storage "1" since it started."""
    return storage.server_status()["loads"]


def body(number, version):
    return b"object %d version %s" % (number, str(version).encode())


def create_objects(storage, count, batch=2500):
    """`count` new objects in transactions of `batch`; their oids and,
    for each, the tid that created it."""
    oids = [storage.new_oid() for _ in range(count)]
    tids = []
    for first in range(0, count, batch):
        chunk = oids[first:first + batch]
        tid = commit_stores(storage, [(oid, z64, body(first + index, 0))
                                    for index, oid in enumerate(chunk)])
        tids.extend([tid] * len(chunk))
    return oids, tids


def write_oids(path, oids):
    with open(str(path), "w") as out:
        json.dump([oid.hex() for oid in oids], out)


def digest(records):
    """One hash of `(data, tid)` records, as the child scripts print it."""
    hashed = hashlib.sha256()
    for data, tid in records:
        hashed.update(len(data).to_bytes(8, "big") + data + tid)
    return hashed.hexdigest()


# -- 1. the server restarts under a client with a persistent cache -----------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ["changed_before_reconnect",
                                   "changed_after_reconnect"])
def test_server_restart_reloads_only_the_changed_objects(
        tmp_path, servers, clients, caplog, order):
    """10,000 objects cached in a persistent cache; the server restarts on
    the same port and Data.fs; 5 objects change, either in Data.fs while no
    server runs (only verification can tell the client) or through another
    client once the first is back (invalidations); the first client
    reconnects by itself and serves all 10,000 with exactly 5 server
    loads, none of them stale."""
    caplog.set_level(logging.INFO, logger="zeo")
    count, changed_count = 10000, 5
    port, path = free_port(), tmp_path / "Data.fs"
    server = servers(port, path)
    writer = clients(port)
    oids, created = create_objects(writer, count)
    assert len(set(created)) == 4  # a few large transactions
    writer.close()

    storage = clients(port, client="c1", var=str(tmp_path),
                      cache_size=BIG_CACHE, **FAST_RETRY)
    loads = server_loads(storage)
    cached = [storage.load(oid) for oid in oids]
    assert cached == [(body(index, 0), created[index])
                      for index in range(count)]
    assert server_loads(storage) - loads == count  # all came from the server
    assert [storage.load(oid) for oid in oids[::97]] == cached[::97]
    assert server_loads(storage) - loads == count  # ... and are cached now

    assert server.stop() == 0
    wait_until(lambda: not storage.is_connected(), "the client notices")
    assert storage.load(oids[3]) == cached[3]  # served by the cache alone

    changed = sorted(random.Random(4).sample(range(count), changed_count))
    changes = [(oids[index], created[index], body(index, 1))
               for index in changed]
    if order == "changed_before_reconnect":
        # Changed while no server runs: only verification can tell.
        offline = FileStorage(str(path))
        last = commit_stores(offline, changes)
        offline.close()
        servers(port, path)  # the same port and the same Data.fs
    else:
        servers(port, path)
        wait_until(storage.is_connected, "the client reconnects by itself")
        last = commit_stores(clients(port), changes)
    wait_until(storage.is_connected, "the client reconnects by itself")
    wait_until(lambda: storage.lastTransaction() == last,
               "the client knows the last transaction %s (it has %s)"
               % (last.hex(), storage.lastTransaction().hex()))

    loads = server_loads(storage)  # counted from the new server's start
    assert loads == 0
    after = [storage.load(oid) for oid in oids]
    stale = [(index, after[index]) for index in changed
             if after[index] != (body(index, 1), last)]
    assert not stale, "stale reads of changed objects"
    wrong = [index for index in range(count)
             if index not in changed and after[index] != cached[index]]
    assert not wrong, "unchanged objects read differently: %s" % wrong[:10]
    assert server_loads(storage) - loads == changed_count
    if order == "changed_before_reconnect":
        assert any("quick verification: %d objects changed" % changed_count
                   in record.getMessage() for record in caplog.records)


# -- 2. the client process restarts ------------------------------------------

LOADER = textwrap.dedent("""
    import hashlib, json, sys
    from zeo.ClientStorage import ClientStorage

    port, var, oids_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(oids_path) as source:
        oids = [bytes.fromhex(text) for text in json.load(source)]
    storage = ClientStorage(("127.0.0.1", port), client="c2", var=var,
                            cache_size=64 * 2 ** 20, wait_timeout=10)
    try:
        before = storage.server_status()["loads"]
        hashed = hashlib.sha256()
        for oid in oids:
            data, tid = storage.load(oid)
            hashed.update(len(data).to_bytes(8, "big") + data + tid)
        after = storage.server_status()["loads"]
        last = storage.lastTransaction().hex()
    finally:
        storage.close()
    print(json.dumps({"loads": after - before, "digest": hashed.hexdigest(),
                      "last": last}))
""")


def run_loader(tmp_path, children, port, oids_path):
    child = children(tmp_path, LOADER, port, tmp_path, oids_path)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 0, "loader child failed (stderr below)"
    return json.loads(output)


@pytest.mark.timeout(90)
def test_restarted_client_process_loads_from_its_cache_file(
        tmp_path, servers, clients, children):
    count = 3000
    port, path = free_port(), tmp_path / "Data.fs"
    servers(port, path)
    writer = clients(port)
    oids, created = create_objects(writer, count)
    last = writer.lastTransaction()
    expected = digest((body(index, 0), created[index])
                      for index in range(count))
    oids_path = tmp_path / "oids.json"
    write_oids(oids_path, oids)

    first = run_loader(tmp_path, children, port, oids_path)
    assert first == {"loads": count, "digest": expected, "last": last.hex()}
    assert os.path.exists(cache_file_path("c2", "1", str(tmp_path)))
    loads = server_loads(writer)

    second = run_loader(tmp_path, children, port, oids_path)
    assert second == {"loads": 0, "digest": expected, "last": last.hex()}
    assert server_loads(writer) == loads  # nothing loaded while it ran

    # A third process after a change: only the changed object is loaded.
    tid = commit_stores(writer, [(oids[11], created[11], body(11, 1))])
    third = run_loader(tmp_path, children, port, oids_path)
    assert third == {
        "loads": 1, "last": tid.hex(),
        "digest": digest((body(index, 1), tid) if index == 11
                         else (body(index, 0), created[index])
                         for index in range(count))}


# -- 3. a client process killed while it writes its cache --------------------

WORKER = textwrap.dedent("""
    import json, random, sys
    from ZODB.Connection import TransactionMetaData
    from ZODB.POSException import ConflictError
    from zeo.ClientStorage import ClientStorage

    port, var, oids_path, cache_size = (
        int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
    with open(oids_path) as source:
        oids = [bytes.fromhex(text) for text in json.load(source)]
    mine = oids[:len(oids) // 2]  # the parent writes only the other half
    storage = ClientStorage(("127.0.0.1", port), client="c3", var=var,
                            cache_size=cache_size, wait_timeout=10)
    rng = random.Random(3)
    step = 0
    while True:
        for _ in range(20):
            storage.load(oids[rng.randrange(len(oids))])
        targets = rng.sample(mine, 3)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        try:
            for oid in targets:
                data, serial = storage.load(oid)
                new = b"%s child %d" % (oid.hex().encode(), step)
                storage.store(oid, serial, new + b"." * rng.randrange(200),
                              "", txn)
            storage.tpc_vote(txn)
            storage.tpc_finish(txn)
        except ConflictError:
            storage.tpc_abort(txn)
            raise
        print(step, flush=True)
        step += 1
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cache_size", [BIG_CACHE, 150000],
                         ids=["no_eviction", "evicting_and_compacting"])
def test_client_killed_while_writing_its_cache(
        tmp_path, servers, clients, children, cache_size):
    count = 2000
    port, path = free_port(), tmp_path / "Data.fs"
    servers(port, path)
    writer = clients(port)
    oids, _created = create_objects(writer, count, batch=1000)
    oids_path = tmp_path / "oids.json"
    write_oids(oids_path, oids)
    theirs = oids[count // 2:]
    rng = random.Random(5)

    child = children(tmp_path, WORKER, port, tmp_path, oids_path, cache_size)
    step = -1
    for line in child.stdout:
        step = int(line)
        if step % 10 == 0:  # invalidations reach the child as it works
            oid = rng.choice(theirs)
            commit_stores(writer, [(oid, writer.load(oid)[1],
                                  b"parent %d" % step)])
        if step >= 150:
            break
    os.kill(child.pid, signal.SIGKILL)  # mid-loop: it does not stop itself
    assert child.wait(10) == -signal.SIGKILL
    assert step >= 150, "the worker did not get going (stderr below)"
    assert os.path.exists(cache_file_path("c3", "1", str(tmp_path)))

    # Changes while no c3 client runs: its verification must catch them.
    changed_after = rng.sample(oids, 7)
    commit_stores(writer, [(oid, writer.load(oid)[1], b"after the kill")
                         for oid in changed_after])

    reference = clients(port)  # an in-memory cache: everything from the server
    truth = {oid: reference.load(oid) for oid in oids}
    assert all(truth[oid][0] == b"after the kill" for oid in changed_after)
    child_written = [oid for oid in oids[:count // 2]
                     if truth[oid][0].startswith(oid.hex().encode())]
    assert len(child_written) > 100  # the child did commit

    reopened = clients(port, client="c3", var=str(tmp_path),
                       cache_size=cache_size)  # the dead child's lock is free
    assert reopened.lastTransaction() == reference.lastTransaction()
    loads = server_loads(reopened)
    got = {oid: reopened.load(oid) for oid in oids}
    different = [(oid.hex(), got[oid], truth[oid]) for oid in oids
                 if got[oid] != truth[oid]]
    assert not different, "reads differ from the server: %s" % different[:5]
    from_server = server_loads(reopened) - loads
    # The cache file survived and served reads (the child had read most
    # objects; a small cache keeps fewer of them).
    assert from_server < (count // 2 if cache_size == BIG_CACHE else count)
    # Spot-check against the server's own records too.
    for oid in rng.sample(oids, 50):
        assert reopened.loadSerial(oid, got[oid][1]) == got[oid][0]
