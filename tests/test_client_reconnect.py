"""Our ClientStorage losing its server and finding one again.

Every test runs real server subprocesses (ours) on real FileStorages and
stops or restarts them under a connected client.  A server restarted "at
the same address" listens on a fixed port taken from `free_port()`.  The
clients retry every 0.2-0.5 s so that reconnection is quick; every wait
polls with a deadline.
"""

import logging
import shutil
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.POSException import ReadOnlyError
from ZODB.utils import z64

from conftest import (
    CLIENT_TIMEOUT, commit_one, server_environment, wait_until)
from server_process import ServerProcess, free_port
from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected
from zeo.client.manager import RetryPolicy

pytestmark = pytest.mark.timeout(90)

#: How long a test waits for a client to notice a lost or new server.

#: How many objects the tests put under the root.
OBJECTS = 5

FAST_RETRY = {"min_disconnect_poll": 0.2, "max_disconnect_poll": 0.5,
              "wait_timeout": CLIENT_TIMEOUT}


@pytest.fixture
def servers():
    """Factory: start(port, path, *options) -> a server on 127.0.0.1:port
    serving the FileStorage `path`; the ones still running are stopped
    after the test."""
    started = []

    def start(port, path, *options):
        server = ServerProcess(
            ["-a", "127.0.0.1:%d" % port, "-f", str(path)] + list(options),
            env=server_environment())
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients(clients):
    """The shared factory with fast retries and ClientStorage's own
    default wait_timeout."""

    def open_(address, **options):
        for key, value in FAST_RETRY.items():
            options.setdefault(key, value)
        options.setdefault("wait_timeout", None)
        return clients(address, **options)

    return open_


def populate(db):
    """Root keys k0.. holding one persistent mapping each; their oids."""
    with db.transaction() as connection:
        root = connection.root()
        for index in range(OBJECTS):
            root["k%d" % index] = PersistentMapping(value=index)
    with db.transaction() as connection:
        root = connection.root()
        return [root["k%d" % index]._p_oid for index in range(OBJECTS)]


def change_elsewhere(path, changes):
    """Serve `path` on another port and commit `changes` (key -> value),
    one transaction each, with another client; return the last tid."""
    server = ServerProcess(["-a", "127.0.0.1:0", "-f", str(path)],
                           env=server_environment())
    try:
        db = ZODB.DB(ClientStorage(server.address,
                                   wait_timeout=CLIENT_TIMEOUT))
        try:
            for key, value in changes.items():
                with db.transaction() as connection:
                    connection.root()[key]["value"] = value
            return db.storage.lastTransaction()
        finally:
            db.close()
    finally:
        server.stop()


def server_loads(storage):
    """Loads the server has answered for our storage since it started."""
    return storage.server_status()["loads"]


def messages(caplog, level):
    return [record.getMessage() for record in caplog.records
            if record.levelno == level]


def test_retry_policy_grows_by_a_fifth_from_min_to_max_with_jitter():
    delays = RetryPolicy(0.2, 0.4).delays()
    got = [next(delays) for _ in range(200)]
    for delay, base in zip(got, [0.2, 0.24, 0.288, 0.3456, 0.4, 0.4]):
        assert base / 2 <= delay <= base
    assert all(0.2 <= delay <= 0.4 for delay in got[4:])
    assert len(set(got)) == len(got)  # drawn at random, not in step
    with pytest.raises(ValueError):
        RetryPolicy(2, 1)


@pytest.mark.timeout(90)
def test_restart_reconnects_and_reloads_only_what_changed(
        tmp_path, servers, clients, caplog):
    caplog.set_level(logging.INFO, logger="zeo")
    port, path = free_port(), tmp_path / "Data.fs"
    server = servers(port, path)
    storage = clients(port)
    db = ZODB.DB(storage)
    oids = populate(db)
    cached = {oid: storage.load(oid) for oid in [z64] + oids}
    manager = transaction.TransactionManager()
    held = db.open(manager)
    kept, changed = held.root()["k0"], held.root()["k2"]
    assert kept["value"] == 0 and changed["value"] == 2
    before = storage.lastTransaction()

    server.stop()
    wait_until(lambda: not storage.is_connected(), "the client notices")
    # Reads the cache can answer go on; anything else needs the server.
    assert storage.load(oids[1]) == cached[oids[1]]
    with pytest.raises(ClientDisconnected):
        storage.server_status()
    with pytest.raises(ClientDisconnected):
        with db.transaction() as connection:
            connection.root()["k0"]["value"] = "never committed"

    last = change_elsewhere(path, {"k2": "changed while away"})
    assert last > before
    servers(port, path)
    wait_until(storage.is_connected, "the client reconnects by itself")
    assert storage.lastTransaction() == last

    loads = server_loads(storage)
    data = {oid: storage.load(oid) for oid in [z64] + oids}
    assert server_loads(storage) - loads == 1  # only k2 came from the server
    assert data[oids[2]][1] == last
    assert all(data[oid] == cached[oid]
               for oid in [z64] + oids if oid != oids[2])
    manager.begin()  # ZODB was told which objects changed, and only those
    assert kept._p_status == "saved" and changed._p_status == "ghost"
    assert held.root()["k2"]["value"] == "changed while away"
    assert held.root()["k0"]["value"] == 0
    assert server_loads(storage) - loads == 1
    assert any("quick verification: 1 objects changed" in message
               for message in messages(caplog, logging.INFO))
    manager.abort()
    held.close()
    db.close()


@pytest.mark.timeout(60)
def test_restarted_server_is_used_again_within_a_second(
        tmp_path, servers, request):
    """With the default retry policy (no FAST_RETRY), a client is usable
    again soon after its server listens again on the same port: the
    first retry comes at once, the next ones after short waits that grow
    slowly.  The bench times it (0.3 s is the target there); this bound
    leaves room for a busy machine."""
    port, path = free_port(), tmp_path / "Data.fs"
    server = servers(port, path)
    storage = ClientStorage(port, wait_timeout=CLIENT_TIMEOUT)
    request.addfinalizer(storage.close)
    oid = storage.new_oid()
    tid = commit_one(storage, oid, z64, b"before the restart")
    for _restart in range(2):
        server.stop()
        wait_until(lambda: not storage.is_connected(), "the client notices")
        server = servers(port, path)  # returns once it accepts connections
        listening = time.monotonic()
        while True:
            try:
                assert storage.getTid(oid) == tid  # needs the server
                break
            except ClientDisconnected:
                assert time.monotonic() - listening < 1
                time.sleep(0.005)


@pytest.mark.timeout(60)
def test_unreachable_at_start_with_wait_false(tmp_path, servers, clients):
    port = free_port()
    storage = clients(port, wait=False)
    assert not storage.is_connected()
    for call in (storage.server_status, lambda: storage.load(z64),
                 storage.new_oid):
        with pytest.raises(ClientDisconnected):
            call()
    servers(port, tmp_path / "Data.fs")
    wait_until(storage.is_connected, "the server comes up")
    oid = storage.new_oid()
    tid = commit_one(storage, oid, z64, b"after a late start")
    assert storage.load(oid) == (b"after a late start", tid)


@pytest.mark.timeout(60)
def test_read_only_fallback_switches_to_a_writable_server(
        tmp_path, servers, clients, caplog):
    caplog.set_level(logging.INFO, logger="zeo")
    read_only_path = tmp_path / "ReadOnly.fs"
    writable_path = tmp_path / "Writable.fs"
    ZODB.DB(str(read_only_path)).close()  # a database with its root
    shutil.copy(read_only_path, writable_path)
    read_only_server = servers(free_port(), read_only_path, "-r")
    writable_port = free_port()
    storage = clients([read_only_server.address,
                       ("127.0.0.1", writable_port)],
                      read_only_fallback=True)
    assert storage.is_connected() and storage.isReadOnly()
    with pytest.raises(ReadOnlyError):
        storage.new_oid()

    servers(writable_port, writable_path)
    wait_until(lambda: not storage.isReadOnly(), "the client switches")
    oid = storage.new_oid()
    tid = commit_one(storage, oid, z64, b"written after the switch")
    assert storage.load(oid) == (b"written after the switch", tid)
    assert any("leaving read-only server" in message
               for message in messages(caplog, logging.INFO))


@pytest.mark.timeout(60)
def test_tries_every_address(tmp_path, servers, clients):
    path = tmp_path / "Data.fs"
    first_port = free_port()
    second = servers(free_port(), path)
    storage = clients([("127.0.0.1", first_port), second.address])
    oid = storage.new_oid()
    tid = commit_one(storage, oid, z64, b"through the second")

    second.stop()
    wait_until(lambda: not storage.is_connected(), "the second is gone")
    servers(first_port, path)
    wait_until(storage.is_connected, "the client finds the first")
    assert storage.load(oid) == (b"through the second", tid)
    assert commit_one(storage, oid, tid, b"through the first") > tid
    storage.close()  # stops the connector, heartbeat and reader threads
    assert not [thread.name for thread in threading.enumerate()
                if thread.name.startswith("zeo-client")]


@pytest.mark.timeout(90)
def test_server_behind_the_cache_is_refused_until_a_current_one_is_back(
        tmp_path, servers, clients, caplog):
    port, path = free_port(), tmp_path / "Data.fs"
    backup = tmp_path / "Backup.fs"
    server = servers(port, path)
    storage = clients(port)
    oid = storage.new_oid()
    first = commit_one(storage, oid, z64, b"backed up")
    shutil.copy(path, backup)  # FileStorage flushed the commit
    second = commit_one(storage, oid, first, b"newer than the backup")

    server.stop()
    wait_until(lambda: not storage.is_connected(), "the client notices")
    restored = servers(port, backup)
    wait_until(lambda: len(messages(caplog, logging.CRITICAL)) >= 2,
               "the client refused the restored server twice")
    assert not storage.is_connected()
    assert "older than the cache's" in messages(caplog, logging.CRITICAL)[0]
    assert storage.load(oid) == (b"newer than the backup", second)

    restored.stop()
    servers(port, path)
    wait_until(storage.is_connected, "the client accepts the current one")
    assert storage.lastTransaction() == second
    assert storage.load(oid) == (b"newer than the backup", second)


@pytest.mark.timeout(90)
def test_gap_longer_than_the_invalidation_queue(
        tmp_path, servers, clients, caplog, request):
    """getInvalidations answers None: a drop-cache-rather-verify client
    (configured with ZConfig) drops its cache and ZODB's; the other one
    reads what changed from the server's history, which costs less here
    than reloading its cache."""
    caplog.set_level(logging.INFO, logger="zeo")
    port, path = free_port(), tmp_path / "Data.fs"
    server = servers(port, path, "--invalidation-queue-size", "2")
    dropping = ZODB.config.storageFromString(
        "%%import zeo\n<clientstorage>\n  server 127.0.0.1:%d\n"
        "  min-disconnect-poll 1\n  max-disconnect-poll 1\n"
        "  drop-cache-rather-verify true\n</clientstorage>\n" % port)
    request.addfinalizer(dropping.close)
    verifying = clients(port)
    db = ZODB.DB(dropping)
    oids = [z64] + populate(db)
    for oid in oids:
        dropping.load(oid)
        verifying.load(oid)
    manager = transaction.TransactionManager()
    held = db.open(manager)
    kept = held.root()["k0"]
    assert kept["value"] == 0
    before = verifying.lastTransaction()

    server.stop()
    wait_until(lambda: not (dropping.is_connected()
                            or verifying.is_connected()),
               "both clients notice")
    last = change_elsewhere(path, {"k1": 10, "k2": 20, "k3": 30})
    servers(port, path, "--invalidation-queue-size", "2")
    wait_until(lambda: dropping.is_connected() and verifying.is_connected(),
               "both clients reconnect")
    assert dropping.lastTransaction() == verifying.lastTransaction() == last

    loads = server_loads(dropping)
    for oid in oids:
        dropping.load(oid)
    assert server_loads(dropping) - loads == len(oids)  # all of them
    manager.begin()  # db.invalidateCache(): ZODB dropped its objects too
    assert kept._p_status == "ghost"
    assert held.root()["k3"]["value"] == 30

    loads = server_loads(verifying)
    data = {oid: verifying.load(oid) for oid in oids}
    assert server_loads(verifying) - loads == 3  # k1, k2, k3 only
    # oids: the root, then k0 to k4
    assert [data[oid][1] > before for oid in oids] == [
        False, False, True, True, True, False]
    infos = messages(caplog, logging.INFO)
    assert any("cache too old" in message for message in infos)
    assert any("verified from the server's history: 3 objects" in message
               for message in infos)
    manager.abort()
    held.close()
    db.close()
