"""Our ClientStorage against real servers, scripted servers, and alone.

Real servers are subprocesses (ours and the real ZEO) serving FileStorages
in the test's temp dir; a scripted server (a socket driven by the test)
plays the server where a test needs to control exactly what is sent and
when: late replies, invalidations before a reply, a dropped connection.
"""

import datetime
import os
import pickle
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.interfaces
import ZODB.POSException
from BTrees.Length import Length
from zope.interface.verify import verifyObject
from ZODB.Connection import TransactionMetaData
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.POSException import (
    ConflictError, MultipleUndoErrors, POSKeyError, ReadOnlyError,
    StorageTransactionError)
from ZODB.utils import maxtid, p64, u64, z64

import zeo
from conftest import (
    CLIENT_TIMEOUT, RawClient, commit_one, server_environment)
from server_process import (
    OURS, THEIRS, free_port, start_configured_server, stop_all)
from zeo import wire
from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected, ServerException
from zeo.client.cache import ClientCache
from zeo.client.errors import rebuild_exception

pytestmark = pytest.mark.timeout(60)

IMPLS = [OURS, THEIRS]


@pytest.fixture
def servers(tmp_path):
    """Factory: start(impl, zeo_options) -> a server on a FileStorage '1'."""
    started = []

    def start(impl=OURS, zeo_options=""):
        directory = tmp_path / ("server%d" % len(started))
        directory.mkdir()
        storages = {"1": "<filestorage 1>\n  path %s\n</filestorage>"
                    % (directory / "Data.fs")}
        server = start_configured_server(str(directory), zeo_options,
                                         storages, impl=impl,
                                         env=server_environment())
        started.append(server)
        return server

    yield start
    statuses = stop_all(server for server in started
                        if not getattr(server, "killed_by_test", False))
    assert statuses == [0] * len(statuses)


# -- interfaces and the storage API against both servers --------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_provides_the_storage_interfaces(impl, servers, clients):
    storage = clients(servers(impl).address)
    for interface in (ZODB.interfaces.IStorage,
                      ZODB.interfaces.IMultiCommitStorage,
                      ZODB.interfaces.IStorageUndoable,
                      ZODB.interfaces.IStorageIteration,
                      ZODB.interfaces.IPrefetchStorage,
                      ZODB.interfaces.IExternalGC,
                      ZODB.interfaces.IStorageRestoreable,
                      ZODB.interfaces.IStorageCurrentRecordIteration):
        assert interface.providedBy(storage), interface
        assert verifyObject(interface, storage)
    # Blob support follows blob_dir (tests/test_blob_client*.py).
    assert not ZODB.interfaces.IBlobStorage.providedBy(storage)


@pytest.mark.parametrize("impl", IMPLS)
def test_blob_dir_needs_a_server_storage_with_blobs(impl, servers, clients,
                                                    tmp_path):
    storage = clients(servers(impl).address, blob_dir=str(tmp_path / "b"))
    for interface in (ZODB.interfaces.IBlobStorage,
                      ZODB.interfaces.IBlobStorageRestoreable):
        assert verifyObject(interface, storage)
    # This server's FileStorage has no blob-dir.
    with pytest.raises(ZODB.POSException.Unsupported,
                       match="does not support blobs"):
        storage.openCommittedBlobFile(z64, z64)


def test_optional_interfaces_follow_the_server_storage(clients):
    address, stop = zeo.server()  # a MappingStorage: no undo, no GC
    try:
        storage = clients(address)
        assert verifyObject(ZODB.interfaces.IStorage, storage)
        assert not ZODB.interfaces.IStorageUndoable.providedBy(storage)
        assert not ZODB.interfaces.IExternalGC.providedBy(storage)
        assert not storage.supportsUndo()
    finally:
        stop()


@pytest.mark.parametrize("impl", IMPLS)
def test_server_errors_are_rebuilt(impl, servers, clients):
    server = servers(impl)
    storage = clients(server.address)
    other = clients(server.address)
    oid = storage.new_oid()
    with pytest.raises(POSKeyError):
        storage.loadBefore(oid, maxtid)
    first = commit_one(storage, oid, z64, b"first")
    second = commit_one(other, oid, first, b"second")
    with pytest.raises(ConflictError) as caught:
        commit_one(storage, oid, first, b"stale")
    assert caught.value.oid == oid
    assert caught.value.serials == (second, first)
    # A failed vote leaves the transaction to tpc_abort, as ZODB expects.
    storage.tpc_abort(storage.tpc_transaction())
    assert storage.tpc_transaction() is None
    with pytest.raises(POSKeyError):
        storage.loadSerial(oid, p64(1))
    with pytest.raises(POSKeyError):
        storage.history(p64(12345))


@pytest.mark.parametrize("impl", IMPLS)
def test_commit_calls_back_and_caches_the_new_revision(impl, servers,
                                                       clients):
    server = servers(impl)
    storage = clients(server.address)
    oid = storage.new_oid()
    seen = []
    txn = TransactionMetaData(u"alice", u"first", {"k": 1})
    storage.tpc_begin(txn)
    storage.store(oid, z64, b"data", '', txn)
    assert storage.tpc_vote(txn) == []
    tid = storage.tpc_finish(txn, seen.append)
    assert seen == [tid]
    assert storage.lastTransaction() == tid
    assert storage.load(oid) == (b"data", tid)
    loads = storage.server_status()["loads"]
    assert storage.loadBefore(oid, p64(u64(tid) + 1)) == (b"data", tid, None)
    assert storage.server_status()["loads"] == loads  # served by the cache
    (record,) = storage.history(oid)
    assert record["tid"] == tid and record["description"] == b"first"
    # Records are fetched while the iteration is at their transaction.
    transactions = [(info.tid, info.extension, [r.data for r in info])
                    for info in storage.iterator()]
    assert transactions == [(tid, {"k": 1}, [b"data"])]


@pytest.mark.parametrize("impl", IMPLS)
def test_extension_with_non_builtin_values_is_refused_locally(
        impl, servers, clients):
    storage = clients(servers(impl).address)
    txn = TransactionMetaData(u"", u"", {"when": datetime.date(2026, 1, 1)})
    with pytest.raises(TypeError) as caught:
        storage.tpc_begin(txn)
    assert "extension" in str(caught.value)
    assert storage.tpc_transaction() is None
    tid = commit_one(storage, storage.new_oid(), z64, b"still connected")
    assert storage.lastTransaction() == tid


@pytest.mark.parametrize("impl", IMPLS)
def test_new_oids_come_in_server_batches(impl, servers, clients):
    server = servers(impl)
    first = clients(server.address)
    second = clients(server.address)
    oids = [u64(first.new_oid()) for _ in range(101)]
    assert oids == list(range(oids[0], oids[0] + 101))
    # The second client's batch starts after the first client's two.
    assert u64(second.new_oid()) == oids[0] + 200


@pytest.mark.parametrize("impl", IMPLS)
def test_client_conflict_resolution(impl, servers, clients):
    server = servers(impl, "client-conflict-resolution true")
    databases = [ZODB.DB(clients(server.address, server_sync=True))
                 for _ in range(2)]
    managers = [transaction.TransactionManager() for _ in databases]
    connections = [db.open(transaction_manager=tm)
                   for db, tm in zip(databases, managers)]
    connections[0].root()["length"] = Length()
    managers[0].commit()
    connections[1].sync()
    lengths = [conn.root()["length"] for conn in connections]
    lengths[0].change(1)
    lengths[1].change(10)
    managers[0].commit()
    managers[1].commit()  # conflicts; resolved by this client, re-voted
    connections[0].sync()
    assert connections[0].root()["length"]() == 11
    for database in databases:
        database.close()


@pytest.mark.parametrize("encoding", ["", "msgpack true"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nested_undo_errors_are_rebuilt(impl, encoding, servers, clients):
    storage = clients(servers(impl, encoding).address)
    oid = storage.new_oid()
    tid = commit_one(storage, oid, z64, b"one")
    commit_one(storage, oid, tid, b"two")
    undo_id = storage.undoLog(0, 5)[-1]["id"]
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.undo(undo_id, txn)  # undoing the creation fails now
    with pytest.raises(MultipleUndoErrors) as caught:
        storage.tpc_vote(txn)
    storage.tpc_abort(txn)
    assert "Can't undo an add transaction" in str(caught.value)
    ((error_oid, error),) = caught.value._errs
    assert error_oid == oid and type(error).__name__ == "UndoError"


@pytest.mark.parametrize("impl", IMPLS)
def test_read_only_fallback(impl, servers, clients):
    server = servers(impl, "read-only true")
    with pytest.raises(ClientDisconnected):
        ClientStorage(server.address, wait_timeout=1, min_disconnect_poll=1,
                      max_disconnect_poll=1)
    storage = clients(server.address, read_only_fallback=True)
    assert storage.is_connected() and storage.isReadOnly()
    with pytest.raises(ReadOnlyError):
        storage.new_oid()
    with pytest.raises(ReadOnlyError):
        storage.tpc_begin(TransactionMetaData())


@pytest.mark.parametrize("impl", IMPLS)
def test_msgpack_server(impl, servers, clients):
    server = servers(impl, "msgpack true")
    storage = clients(server.address)
    other = clients(server.address, server_sync=True)
    oid = storage.new_oid()
    data = zodb_pickle(MinPO("packed"))
    tid = commit_one(storage, oid, z64, data)
    other.sync()
    assert other.load(oid) == (data, tid)
    assert storage.undoLog(0, 1)[0]["id"]
    with pytest.raises(ConflictError) as caught:
        commit_one(other, oid, z64, zodb_pickle(MinPO("conflict")))
    assert caught.value.oid == oid


@pytest.mark.parametrize("impl", IMPLS)
def test_server_sync_brings_in_other_commits(impl, servers, clients):
    server = servers(impl)
    writer = clients(server.address)
    reader = clients(server.address, server_sync=True)
    for _ in range(5):
        tid = commit_one(writer, writer.new_oid(), z64, b"x")
        reader.sync()
        assert reader.lastTransaction() == tid


def test_client_label_reaches_the_server_log(servers, clients):
    server = servers(OURS)
    storage = clients(server.address, client_label="label-for-the-log")
    storage.server_status()  # a round trip: the label was handled before
    server.signal(15)
    server.process.wait(30)
    assert "label-for-the-log" in server.log


def test_addresses_int_port_list_and_unix_socket(tmp_path, clients):
    address, stop = zeo.server()
    try:
        dead = ("127.0.0.1", free_port())
        storage = clients([dead, address], min_disconnect_poll=1)
        assert storage.is_connected()
        assert clients(address[1]).is_connected()
    finally:
        stop()
    path = str(tmp_path / "zeo.sock")
    from zeo.server import StorageServer
    from ZODB.MappingStorage import MappingStorage
    server = StorageServer(path, {"1": MappingStorage()})
    server.start()
    try:
        storage = clients(path)
        commit_one(storage, storage.new_oid(), z64, b"over a unix socket")
        assert storage.lastTransaction() != z64
    finally:
        server.close()
    with pytest.raises(ValueError):
        ClientStorage(("127.0.0.1", "port"))


def test_convenience_api_with_a_filestorage(tmp_path):
    path = str(tmp_path / "Data.fs")
    address, stop = zeo.server(path)
    try:
        connection = zeo.connection(address)
        connection.root()["key"] = "value"
        transaction.commit()
        storage = connection.db().storage
        connection.close()  # closes its database and storage too
        assert not storage.is_connected()
    finally:
        stop()
    address, stop = zeo.server(path)  # the data survived the server
    try:
        database = zeo.DB(address, name="convenient")
        with database.transaction() as connection:
            assert connection.root()["key"] == "value"
        assert database.storage.getName() == "convenient"
        database.close()
        storage = zeo.client(address)
        assert isinstance(storage, ClientStorage) and storage.is_connected()
        storage.close()
    finally:
        stop()


def test_unknown_storage_name_is_reported(clients):
    address, stop = zeo.server()
    try:
        with pytest.raises(ClientDisconnected) as caught:
            ClientStorage(address, "no-such-storage", wait_timeout=0.5,
                          min_disconnect_poll=1)
        assert "no-such-storage" in str(caught.value)
        assert "ValueError" in str(caught.value)
    finally:
        stop()


def test_close_is_idempotent_and_stops_threads(clients):
    address, stop = zeo.server()
    try:
        storage = clients(address, name="closing")
        names = [t.name for t in threading.enumerate()
                 if t.name.startswith("zeo-client")]
        assert any("heartbeat-closing" in name for name in names)
        assert any("reader" in name for name in names)
        storage.close()
        storage.close()
        assert not [t for t in threading.enumerate()
                    if t.name.startswith("zeo-client")]
        with pytest.raises(ClientDisconnected):
            storage.load(z64)
    finally:
        stop()


def test_wait_false_connects_in_the_background_to_a_new_address(clients):
    storage = clients(free_port(), wait=False, min_disconnect_poll=1,
                      max_disconnect_poll=1)
    assert not storage.is_connected()
    with pytest.raises(ClientDisconnected):
        storage.new_oid()
    port = free_port()
    storage.new_addr(port)
    address, stop = zeo.server(port=port)
    try:
        deadline = time.monotonic() + 20
        while not storage.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storage.is_connected()
        commit_one(storage, storage.new_oid(), z64, b"late")
    finally:
        storage.close()
        stop()


@pytest.mark.parametrize("impl", IMPLS)
def test_waiting_vote_does_not_block_loads_then_fails_on_drop(
        impl, servers, clients):
    server = servers(impl)
    storage = clients(server.address)
    oid = storage.new_oid()
    commit_one(storage, oid, z64, b"visible")
    holder = RawClient(server.address)
    try:
        holder.handshake()
        holder.send_oneway("tpc_begin", 1, b"", b"", {}, None, " ")
        holder.send_oneway("storea", p64(999), z64, b"x", 1)
        assert holder.call("vote", 1) == []  # holds the commit lock
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(storage.new_oid(), z64, b"waits", '', txn)
        outcome = []

        def vote():
            try:
                outcome.append(storage.tpc_vote(txn))
            except Exception as error:
                outcome.append(error)

        voter = threading.Thread(target=vote, name="test-voter", daemon=True)
        voter.start()
        time.sleep(0.2)
        assert voter.is_alive() and not outcome
        fresh = ClientStorage(server.address, wait_timeout=CLIENT_TIMEOUT)
        try:
            assert fresh.load(oid)[0] == b"visible"
        finally:
            fresh.close()
        assert storage.loadBefore(oid, maxtid)[0] == b"visible"
        assert voter.is_alive()
        server.kill()
        voter.join(10)
        assert not voter.is_alive()
        assert isinstance(outcome[0], ClientDisconnected)
        assert not storage.is_connected()
        server.killed_by_test = True
        started = time.monotonic()
        with pytest.raises(ClientDisconnected):
            storage.server_status()
        assert time.monotonic() - started < 1
        storage.tpc_abort(txn)  # ignores the lost connection
    finally:
        holder.close()


# -- the cache ----------------------------------------------------------------

def test_cache_serves_current_and_old_revisions():
    cache = ClientCache(10 ** 6)
    oid, t1, t2, t3 = p64(1), p64(10), p64(20), p64(30)
    cache.store(oid, t1, None, b"one")
    assert cache.load_before(oid, t2) is None  # no last tid known yet
    cache.set_last_tid(t2)
    assert cache.load_before(oid, p64(21)) == (b"one", t1, None)
    assert cache.load_before(oid, p64(22)) is None  # beyond what we know
    assert cache.load_before(oid, t1) is None
    cache.invalidate(oid, t3)
    cache.set_last_tid(t3)
    assert cache.load_before(oid, p64(25)) == (b"one", t1, t3)
    assert cache.load_before(oid, p64(31)) is None
    cache.store(oid, t3, None, b"three")
    assert cache.load_before(oid, p64(31)) == (b"three", t3, None)
    assert cache.load_before(oid, t3) == (b"one", t1, t3)
    cache.set_last_tid(t1)
    assert cache.last_tid() == t3  # never goes back


def test_cache_evicts_least_recently_used():
    cache = ClientCache(3 * (1000 + 100))
    cache.set_last_tid(p64(5))
    for number in range(3):
        cache.store(p64(number), p64(1), None, b"x" * 1000)
    assert cache.load_before(p64(0), p64(6)) is not None  # 0 is now recent
    cache.store(p64(3), p64(1), None, b"x" * 1000)
    assert len(cache) == 3 and cache.size <= cache.limit
    assert cache.load_before(p64(1), p64(6)) is None  # evicted
    assert cache.load_before(p64(0), p64(6)) is not None


# -- error replies and the client's unpickler -------------------------------

def test_rebuild_exception_table():
    error = rebuild_exception(("ZODB.POSException.ConflictError", {
        "message": "database conflict error", "oid": p64(1),
        "class_name": "x.Y", "serials": (p64(3), p64(2))}))
    assert type(error) is ConflictError
    assert (error.oid, error.serials, error.class_name) == (
        p64(1), (p64(3), p64(2)), "x.Y")
    assert "database conflict error" in str(error)
    error = rebuild_exception(("ZODB.POSException.StorageTransactionError",
                               (None, 12)))
    assert type(error) is StorageTransactionError and error.args == (None, 12)
    assert type(rebuild_exception(("builtins.ValueError", ("v",)))) \
        is ValueError
    error = rebuild_exception(("os.system", ("rm -rf /",)))
    assert type(error) is ServerException
    assert error.remote_class_name == "os.system"


def test_client_unpickler_resolves_only_its_table():
    codec = wire.PickleCodec(wire.CLIENT_GLOBALS)
    reply = (1, 2, ".reply", ("ZODB.POSException.MultipleUndoErrors",
                              MultipleUndoErrors([(p64(1), "no")])))
    decoded = codec.decode(wire.PickleCodec().encode(*reply))
    assert isinstance(decoded.args[1], MultipleUndoErrors)
    assert decoded.args[1]._errs == [(p64(1), "no")]
    ran = []
    hostile = pickle.dumps((1, 2, ".reply", Hostile(ran)), 3)
    with pytest.raises(wire.RefusedGlobals) as caught:
        codec.decode(hostile)
    assert caught.value.names == ["%s.record" % __name__]
    assert ran == []


def record(ran):
    ran.append(True)


class Hostile:
    """Pickles as a call of a function no client should resolve."""

    def __init__(self, ran):
        self.ran = ran

    def __reduce__(self):
        return (record, (self.ran,))


def test_environment_has_no_real_zeo_in_the_package():
    """The zeo package must never import the real ZEO."""
    import subprocess
    import sys
    code = ("import sys, zeo, zeo.ClientStorage, zeo.client.config; "
            "print('ZEO' in sys.modules)")
    output = subprocess.run([sys.executable, "-c", code], check=True,
                            capture_output=True, text=True,
                            env=dict(os.environ)).stdout
    assert output.strip() == "False"
