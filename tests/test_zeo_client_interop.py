"""The real ZEO 6 ClientStorage against the server under test.

Every test starts its own server subprocess on FileStorages in a fresh temp
dir and talks to it over 127.0.0.1 with the real ``ZEO.ClientStorage`` (or,
where a misbehaving client is the point, with a raw protocol peer).
"""

import binascii
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import transaction
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZEO.Exceptions import ClientDisconnected
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadOnlyError
from ZODB.serialize import referencesf
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import load_current
from ZODB.utils import maxtid
from ZODB.utils import z64

from conftest import CLIENT_TIMEOUT

pytestmark = pytest.mark.timeout(90)

#: The keys of ZEO's server_status() dictionary (PROTOCOL.md 11.1).
STATUS_KEYS = {
    "connections", "loads", "stores", "commits", "aborts", "active_txns",
    "lock_time", "conflicts", "conflicts_resolved", "start", "waiting",
    "timeout-thread-is-alive", "last-transaction",
}


def wait_until(predicate, timeout=CLIENT_TIMEOUT, message="condition"):
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("%s not reached within %ss"
                                 % (message, timeout))
        time.sleep(0.01)


def open_connection(db):
    """A connection with its own transaction manager (one per 'user')."""
    manager = transaction.TransactionManager()
    return db.open(transaction_manager=manager), manager


def commit_objects(storage, objects, description="", user="",
                   extension=None, after_vote=None):
    """Commit `objects` ({oid: (serial, data)}) with the storage API.

    `after_vote`, if given, is called between a successful vote and
    tpc_finish (to make the server's storage fail there).
    """
    meta = TransactionMetaData(user=user, description=description,
                               extension=extension or {})
    storage.tpc_begin(meta)
    try:
        for oid, (serial, data) in objects.items():
            storage.store(oid, serial, data, "", meta)
        storage.tpc_vote(meta)
    except BaseException:
        storage.tpc_abort(meta)
        raise
    if after_vote is not None:
        after_vote()
    return storage.tpc_finish(meta)


def store_new_object(storage, value):
    """Commit one new MinPO object; return (oid, tid)."""
    oid = storage.new_oid()
    data = zodb_pickle(MinPO(value))
    return oid, commit_objects(storage, {oid: (z64, data)})


def commit_outcome(manager):
    """Commit; return "committed" or the exception (for threads)."""
    try:
        manager.commit()
    except Exception as error:
        return error
    return "committed"


def call_with_deadline(function, what, timeout=CLIENT_TIMEOUT):
    """Run `function` in a thread; fail if it does not return in time."""
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(function()),
                              name="deadline-%s" % what, daemon=True)
    worker.start()
    worker.join(timeout)
    assert outcome, "%s did not return within %ss" % (what, timeout)
    return outcome[0]


def open_connection_seeing(db, writer_db):
    """A connection of `db` once it has the invalidations of `writer_db`.

    Invalidations reach other clients asynchronously; a connection opened
    before they arrive rightly shows the older snapshot.
    """
    committed = writer_db.storage.lastTransaction()
    wait_until(lambda: db.storage.lastTransaction() >= committed,
               message="the other client's invalidations")
    return open_connection(db)


def mapping_root_with(db, **items):
    """Open a connection, put `items` into the root, commit."""
    connection, manager = open_connection(db)
    root = connection.root()
    for key, value in items.items():
        root[key] = value
    manager.commit()
    return connection, manager


# --- basic use through ZODB.DB -------------------------------------------

def test_db_creates_root_and_reads_back_a_commit(start_server, open_db):
    server = start_server()
    db = open_db(server)
    connection, manager = open_connection(db)
    root = connection.root()
    assert dict(root) == {}
    root["answer"] = PersistentMapping(value=42)
    manager.commit()
    root_oid = root._p_oid
    connection.close()

    fresh = open_db(server)
    connection, manager = open_connection(fresh)
    assert connection.root()["answer"]["value"] == 42
    assert connection.root()._p_oid == root_oid
    assert fresh.storage.lastTransaction() == db.storage.lastTransaction()


def test_second_client_sees_a_commit_after_invalidation(start_server,
                                                        open_db):
    server = start_server()
    writer_db, reader_db = open_db(server), open_db(server)
    writer, writer_manager = mapping_root_with(
        writer_db, counter=PersistentMapping(value=1))
    reader, reader_manager = open_connection_seeing(reader_db, writer_db)
    assert reader.root()["counter"]["value"] == 1

    writer.root()["counter"]["value"] = 2
    writer_manager.commit()
    committed = writer_db.storage.lastTransaction()

    wait_until(lambda: reader_db.storage.lastTransaction() == committed,
               message="invalidation of the commit at the second client")
    reader_manager.begin()
    assert reader.root()["counter"]["value"] == 2


def test_server_sync_client_sees_a_commit_at_its_next_transaction(
        start_server, open_db):
    # A round trip (ping) is answered after every invalidation queued for
    # that connection before it (PROTOCOL.md 9, rule 9): no polling needed.
    server = start_server()
    writer_db = open_db(server)
    reader_db = open_db(server, server_sync=True)
    writer, writer_manager = mapping_root_with(
        writer_db, counter=PersistentMapping(value=1))
    reader, reader_manager = open_connection(reader_db)
    for value in range(2, 7):
        writer.root()["counter"]["value"] = value
        writer_manager.commit()
        reader_manager.begin()
        assert reader.root()["counter"]["value"] == value


# --- conflicts ------------------------------------------------------------

def test_write_conflict_raises_conflict_error(start_server, open_db):
    server = start_server()
    first_db, second_db = open_db(server), open_db(server)
    first, first_manager = mapping_root_with(
        first_db, shared=PersistentMapping(owner="nobody"))
    second, second_manager = open_connection_seeing(second_db, first_db)
    assert second.root()["shared"]["owner"] == "nobody"

    first.root()["shared"]["owner"] = "first"
    second.root()["shared"]["owner"] = "second"
    first_manager.commit()
    with pytest.raises(ConflictError) as conflict:
        second_manager.commit()
    assert conflict.value.oid == first.root()["shared"]._p_oid
    second_manager.abort()

    assert second_db.storage.is_connected()
    wait_until(lambda: second_db.storage.lastTransaction()
               == first_db.storage.lastTransaction(),
               message="invalidation after the conflict")
    second_manager.begin()
    assert second.root()["shared"]["owner"] == "first"
    second.root()["shared"]["owner"] = "second, retried"
    second_manager.commit()


@pytest.mark.parametrize("zeo_options", [
    "", "client-conflict-resolution true"], ids=["server", "client"])
def test_concurrent_length_increments_are_resolved(start_server, open_db,
                                                   zeo_options):
    server = start_server(zeo_options)
    first_db, second_db = open_db(server), open_db(server)
    first, first_manager = mapping_root_with(first_db, length=Length(10))
    second, second_manager = open_connection_seeing(second_db, first_db)
    assert second.root()["length"]() == 10

    first.root()["length"].change(1)
    second.root()["length"].change(2)
    first_manager.commit()
    second_manager.commit()

    checker, _ = open_connection(open_db(server))
    assert checker.root()["length"]() == 13


# --- undo, history, pack, iteration ----------------------------------------

def test_undo_restores_the_previous_value(start_server, open_db):
    server = start_server()
    db = open_db(server)
    connection, manager = mapping_root_with(
        db, item=PersistentMapping(value="original"))
    connection.root()["item"]["value"] = "changed"
    manager.get().note("change the item")
    manager.commit()

    log = db.undoLog(0, 10)
    assert log[0]["description"] == "change the item"
    assert len(log) == 3  # root creation, first commit, change
    db.undo(log[0]["id"], manager.get())
    manager.commit()

    manager.begin()
    assert connection.root()["item"]["value"] == "original"
    assert len(db.undoLog(0, 10)) == 4


def test_history_lists_revisions_newest_first(start_server, open_client):
    server = start_server()
    storage = open_client(server)
    oid = storage.new_oid()
    tids = []
    serial = z64
    for value in range(3):
        serial = commit_objects(
            storage, {oid: (serial, zodb_pickle(MinPO(value)))},
            description="revision %d" % value, user="tester")
        tids.append(serial)

    history = storage.history(oid, 5)
    assert [entry["tid"] for entry in history] == tids[::-1]
    assert [entry["description"] for entry in history] == [
        b"revision 2", b"revision 1", b"revision 0"]
    assert {entry["user_name"] for entry in history} == {b"tester"}
    assert all(entry["size"] > 0 for entry in history)
    assert [entry["tid"] for entry in storage.history(oid, 2)] == tids[:0:-1]
    with pytest.raises(POSKeyError):
        storage.history(b"\0\0\0\0\0\0\1\0", 1)


def test_pack_removes_old_revisions_and_unreachable_objects(
        start_server, open_db, open_client):
    server = start_server()
    db = open_db(server)
    storage = db.storage
    connection, manager = mapping_root_with(
        db, doomed=PersistentMapping(payload="x" * 10000))
    doomed_oid = connection.root()["doomed"]._p_oid
    doomed_serial = connection.root()["doomed"]._p_serial
    root_oid = connection.root()._p_oid
    old_root_serial = connection.root()._p_serial
    del connection.root()["doomed"]
    manager.commit()
    path = server.paths["1"]
    size_before = os.path.getsize(path)
    assert storage.getSize() == size_before
    assert storage.loadSerial(doomed_oid, doomed_serial)

    last_commit_time = TimeStamp(storage.lastTransaction()).timeTime()
    wait_until(lambda: time.time() > last_commit_time,
               message="a pack time after the last commit")
    db.pack()

    assert os.path.getsize(path) < size_before
    assert storage.getSize() == os.path.getsize(path)
    fresh = open_client(server)
    with pytest.raises(POSKeyError):
        fresh.loadSerial(root_oid, old_root_serial)
    with pytest.raises(POSKeyError):
        fresh.loadSerial(doomed_oid, doomed_serial)
    with pytest.raises(POSKeyError):
        fresh.load(doomed_oid)
    manager.begin()
    assert "doomed" not in connection.root()


def test_iterator_yields_every_committed_transaction(start_server,
                                                     open_client):
    server = start_server()
    storage = open_client(server)
    first, second = storage.new_oid(), storage.new_oid()
    committed = []
    serials = {first: z64, second: z64}
    for number, oids in enumerate([(first,), (first, second), (second,)]):
        objects = {oid: (serials[oid], zodb_pickle(MinPO((number, oid))))
                   for oid in oids}
        tid = commit_objects(storage, objects, description="txn %d" % number,
                             user="user %d" % number,
                             extension={"number": number})
        serials.update(dict.fromkeys(oids, tid))
        committed.append((tid, {oid: data for oid, (_, data)
                                in objects.items()}, number))

    seen = []
    for info in storage.iterator():
        records = {record.oid: record.data for record in info}
        assert all(record.tid == info.tid for record in info)
        seen.append((info.tid, records, info.extension["number"]))
        assert info.description == b"txn %d" % info.extension["number"]
        assert info.user == b"user %d" % info.extension["number"]
    assert seen == committed

    middle = [info.tid for info in storage.iterator(committed[1][0],
                                                    committed[1][0])]
    assert middle == [committed[1][0]]


def test_record_iternext_visits_every_current_record(start_server,
                                                     open_client):
    server = start_server()
    storage = open_client(server)
    expected = {}
    for value in range(5):
        oid, tid = store_new_object(storage, value)
        expected[oid] = (tid, zodb_pickle(MinPO(value)))
    oid = next(iter(expected))
    data = zodb_pickle(MinPO("newer"))
    newer = commit_objects(storage, {oid: (expected[oid][0], data)})
    expected[oid] = (newer, data)

    seen = {}
    cursor = None
    for _ in range(len(expected) + 1):
        oid, tid, data, cursor = storage.record_iternext(cursor)
        seen[oid] = (tid, data)
        if cursor is None:
            break
    assert cursor is None
    assert seen == expected


def test_new_oid_hands_out_unique_oids(start_server, open_client):
    server = start_server()
    first, second = open_client(server), open_client(server)
    # More than one batch of 100 from each client.
    oids = [first.new_oid() for _ in range(150)]
    oids += [second.new_oid() for _ in range(150)]
    assert all(len(oid) == 8 for oid in oids)
    assert len(set(oids)) == len(oids)
    assert z64 not in oids  # the root's oid is never allocated


def test_last_transaction_len_and_size(start_server, open_client):
    server = start_server()
    storage = open_client(server)
    assert storage.lastTransaction() == z64
    assert len(storage) == 0
    tids = [store_new_object(storage, value)[1] for value in range(3)]
    assert storage.lastTransaction() == tids[-1]
    assert tids == sorted(tids)
    assert len(storage) == 3
    assert storage.getSize() == os.path.getsize(server.paths["1"])

    other = open_client(server)
    assert other.lastTransaction() == tids[-1]
    assert len(other) == 3


# --- read-only -------------------------------------------------------------

def _populate(start_server, open_db):
    """Commit some data with a writable server, then stop it."""
    server = start_server()
    db = open_db(server)
    connection, manager = mapping_root_with(
        db, item=PersistentMapping(value="written"))
    connection.root()["item"]["value"] = "rewritten"
    manager.commit()
    oid = connection.root()["item"]._p_oid
    db.close()
    server.stop()
    return oid


def test_read_only_server_refuses_a_writable_client(start_server,
                                                    open_client):
    server = start_server("read-only true")
    started = time.monotonic()
    with pytest.raises(ClientDisconnected):
        open_client(server, wait_timeout=3)
    assert time.monotonic() - started < 3 + CLIENT_TIMEOUT


def test_read_only_client_reads_but_cannot_commit(start_server, open_db,
                                                  open_client):
    _populate(start_server, open_db)
    server = start_server("read-only true")
    db = open_db(server, read_only=True)
    assert db.storage.isReadOnly()
    connection, manager = open_connection(db)
    assert connection.root()["item"]["value"] == "rewritten"

    connection.root()["item"]["value"] = "forbidden"
    with pytest.raises(ReadOnlyError):
        manager.commit()
    manager.abort()
    with pytest.raises(ReadOnlyError):
        db.storage.new_oid()

    fallback = open_client(server, read_only_fallback=True)
    assert fallback.is_connected()
    assert fallback.isReadOnly()
    assert load_current(fallback, connection.root()._p_oid)
    with pytest.raises(ReadOnlyError):
        fallback.tpc_begin(TransactionMetaData())


def test_pack_is_allowed_on_a_read_only_server(start_server, open_db,
                                               open_client):
    oid = _populate(start_server, open_db)
    server = start_server("read-only true")
    storage = open_client(server, read_only=True)
    history = storage.history(oid, 5)
    assert len(history) == 2
    old_serial = history[1]["tid"]
    assert storage.loadSerial(oid, old_serial)

    storage.pack(time.time(), referencesf)

    with pytest.raises(POSKeyError):
        storage.loadSerial(oid, old_serial)
    assert len(storage.history(oid, 5)) == 1


# --- several storages ---------------------------------------------------

def test_two_storages_are_isolated(start_server, open_db, open_client):
    server = start_server(storage_names=("1", "2"))
    one, two = open_db(server, "1"), open_db(server, "2")
    watcher_one, watcher_two = open_client(server, "1"), open_client(
        server, "2")
    connection_one, manager_one = mapping_root_with(one, name="one")
    connection_two, manager_two = mapping_root_with(two, name="two")

    fresh_one, fresh_two = open_db(server, "1"), open_db(server, "2")
    assert open_connection(fresh_one)[0].root()["name"] == "one"
    assert open_connection(fresh_two)[0].root()["name"] == "two"

    two_before = watcher_two.lastTransaction()
    connection_one.root()["only_in_one"] = PersistentMapping()
    manager_one.commit()
    new_oid = connection_one.root()["only_in_one"]._p_oid
    wait_until(lambda: watcher_one.lastTransaction()
               == one.storage.lastTransaction(),
               message="invalidation on storage 1")
    # A round trip on storage 2's connection flushes anything queued for it.
    watcher_two.server_status()
    assert watcher_two.lastTransaction() == two_before
    assert one.storage.lastTransaction() != two_before
    with pytest.raises(POSKeyError):
        watcher_two.load(new_oid)
    assert os.path.getsize(server.paths["1"]) > os.path.getsize(
        server.paths["2"])


# --- misbehaving peers ------------------------------------------------------

def _hold_commit_lock(raw):
    """Drive a raw connection to a successful vote; return the stored oid."""
    raw.handshake()
    oid = raw.call("new_oids")[0]
    txn_id = 4242
    raw.send_oneway("tpc_begin", txn_id, b"", b"stuck", {}, None, " ")
    raw.send_oneway("storea", oid, z64, zodb_pickle(MinPO("stuck")), txn_id)
    assert list(raw.call("vote", txn_id)) == []
    return oid


@pytest.mark.zeo_bug("B1: a transaction timeout never releases the lock")
def test_watchdog_breaks_a_stuck_commit_lock(start_server, open_db,
                                             raw_client, open_client):
    timeout = 2
    server = start_server("transaction-timeout %d" % timeout)
    db = open_db(server)
    connection, manager = mapping_root_with(db, value=1)
    raw = raw_client(server)
    stuck_oid = _hold_commit_lock(raw)
    locked_at = time.monotonic()

    connection.root()["value"] = 2
    outcome = []
    committer = threading.Thread(
        target=lambda: outcome.append(commit_outcome(manager)),
        name="committer-behind-stuck-lock", daemon=True)
    committer.start()
    committer.join(timeout + 5)
    waited = time.monotonic() - locked_at
    assert not committer.is_alive(), "the commit lock was never broken"
    assert outcome == ["committed"]
    assert waited >= timeout - 0.5, "the lock was broken too early"

    assert raw.wait_closed(5), "the stuck connection was not closed"
    wait_until(lambda: re.search(r"time(d)?[ -]?out", server.log,
                                 re.IGNORECASE),
               message="a log line about the transaction timeout")
    fresh = open_client(server)
    with pytest.raises(POSKeyError):
        fresh.load(stuck_oid)
    checker, _ = open_connection(open_db(server))
    assert checker.root()["value"] == 2


_VOTE_THEN_WAIT = """
import sys, time
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import z64
storage = ClientStorage(("127.0.0.1", int(sys.argv[1])), wait_timeout=10)
meta = TransactionMetaData(description="doomed")
storage.tpc_begin(meta)
storage.store(storage.new_oid(), z64, zodb_pickle(MinPO("doomed")), "", meta)
storage.tpc_vote(meta)
print("voted", flush=True)
time.sleep(60)
"""


class _VotedClientProcess:
    """A real ZEO client in a subprocess that votes and then waits."""

    def __init__(self, server):
        self.process = subprocess.Popen(
            [sys.executable, "-c", _VOTE_THEN_WAIT, str(server.address[1])],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)

    def wait_voted(self):
        line = self.process.stdout.readline()
        assert line.strip() == "voted"

    def vanish(self):
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(CLIENT_TIMEOUT)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class _VotedRawClient:
    """A raw client that votes and then closes its socket."""

    def __init__(self, server, raw_client):
        self.raw = raw_client(server)

    def wait_voted(self):
        _hold_commit_lock(self.raw)

    def vanish(self):
        self.raw.close()

    def close(self):
        self.raw.close()


@pytest.mark.parametrize("how", ["socket-closed", "process-killed"])
def test_a_commit_proceeds_when_the_lock_holder_vanishes(
        start_server, open_db, raw_client, how):
    server = start_server()
    db = open_db(server)
    connection, manager = mapping_root_with(db, value=1)
    if how == "socket-closed":
        holder = _VotedRawClient(server, raw_client)
    else:
        holder = _VotedClientProcess(server)
    try:
        holder.wait_voted()
        connection.root()["value"] = 2
        outcome = []
        committer = threading.Thread(
            target=lambda: outcome.append(commit_outcome(manager)),
            name="waiting-committer", daemon=True)
        committer.start()
        # The committer's vote waits for the lock; its connection still
        # answers other calls meanwhile (PROTOCOL.md 3.9).
        wait_until(lambda: db.storage.server_status()["waiting"] == 1,
                   message="the second vote waiting for the lock")
        assert committer.is_alive()
        holder.vanish()
        committer.join(CLIENT_TIMEOUT)
        assert not committer.is_alive(), "the waiting commit never finished"
        assert outcome == ["committed"]
    finally:
        holder.close()
    status = db.storage.server_status()
    assert status["waiting"] == 0
    assert status["lock_time"] is None
    checker, _ = open_connection(open_db(server))
    assert checker.root()["value"] == 2


@pytest.mark.zeo_bug("B8: a datetime in the extension drops the client")
def test_datetime_in_transaction_extension_keeps_the_client_working(
        start_server, open_db):
    server = start_server()
    db = open_db(server)
    connection, manager = mapping_root_with(db, value=1)
    when = datetime.datetime(2026, 11, 24, 12, 30)
    connection.root()["value"] = 2
    manager.get().setExtendedInfo("when", when)
    outcome = commit_outcome(manager)
    if outcome != "committed":
        manager.abort()
        # A refusal is acceptable if it is clear, not a lost connection.
        assert not isinstance(outcome, ClientDisconnected), repr(outcome)
        assert "datetime" in str(outcome), repr(outcome)
    assert db.storage.is_connected()

    connection.root()["value"] = 3
    manager.commit()
    manager.begin()
    assert connection.root()["value"] == 3
    # Reading the transaction metadata back must work too: the real client
    # never answers a call whose reply it cannot decode, hence the deadline.
    undo_log = call_with_deadline(lambda: db.undoLog(0, 10), "undoLog")
    transactions = call_with_deadline(
        lambda: list(db.storage.iterator()), "iterator")
    expected = 4 if outcome == "committed" else 3
    assert len(undo_log) == len(transactions) == expected
    if outcome == "committed":
        assert "when" in undo_log[1]
        assert "when" in transactions[-2].extension


def _status_counts(storage):
    status = storage.server_status()
    return {key: status[key] for key in (
        "loads", "stores", "commits", "aborts", "conflicts")}


def test_server_status_has_zeo_keys_and_counts(start_server, open_client):
    server = start_server()
    writer = open_client(server)
    initial = writer.server_status()
    assert set(initial) == STATUS_KEYS
    assert initial["connections"] == 1
    assert initial["timeout-thread-is-alive"] == "stub"
    assert initial["last-transaction"] == "0" * 16
    assert isinstance(initial["start"], str)

    before = _status_counts(writer)
    serials = {}
    for number in range(3):
        objects = {writer.new_oid(): (z64, zodb_pickle(MinPO(number)))
                   for _ in range(2)}
        tid = commit_objects(writer, objects)
        serials.update(dict.fromkeys(objects, tid))
    reader = open_client(server)
    for oid in serials:
        load_current(reader, oid)
    stale_oid = next(iter(serials))
    with pytest.raises(ConflictError):
        commit_objects(writer, {stale_oid: (z64, zodb_pickle(MinPO("old")))})
    meta = TransactionMetaData()
    writer.tpc_begin(meta)
    writer.store(writer.new_oid(), z64, zodb_pickle(MinPO("gone")), "", meta)
    writer.tpc_abort(meta)

    after = _status_counts(writer)
    assert {key: after[key] - before[key] for key in after} == {
        "loads": 6, "stores": 6 + 1 + 1, "commits": 3, "aborts": 1,
        "conflicts": 1}
    status = reader.server_status()
    assert set(status) == STATUS_KEYS
    assert status["connections"] == 2
    assert status["active_txns"] == 0
    assert status["waiting"] == 0
    assert status["lock_time"] is None
    assert status["last-transaction"] == binascii.hexlify(
        writer.lastTransaction()).decode()
    assert status["start"] == initial["start"]


def test_msgpack_server_serves_the_zeo_client(start_server, open_db,
                                              raw_client):
    server = start_server("msgpack true")
    raw = raw_client(server)
    raw.handshake()
    assert raw.greeting == b"M5"
    writer_db, reader_db = open_db(server), open_db(server)
    writer, writer_manager = mapping_root_with(
        writer_db, item=PersistentMapping(value="packed"))
    reader, reader_manager = open_connection_seeing(reader_db, writer_db)
    assert reader.root()["item"]["value"] == "packed"
    writer.root()["item"]["value"] = "repacked"
    writer_manager.commit()
    wait_until(lambda: reader_db.storage.lastTransaction()
               == writer_db.storage.lastTransaction(),
               message="invalidation in msgpack mode")
    reader_manager.begin()
    assert reader.root()["item"]["value"] == "repacked"
    assert reader_db.storage.loadBefore(
        reader.root()._p_oid, maxtid)[2] is None
