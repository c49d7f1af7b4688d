"""Server behaviour a client depends on, method by method (PROTOCOL.md 6).

The server runs in this process on 127.0.0.1 with a real FileStorage, so a
test can restart it on the same file and read its counters directly; the
client is the raw protocol client, so every call is exactly what a real
client sends.
"""

import base64
import logging
import threading
import time

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.utils import maxtid, p64, z64

from conftest import closing_all, wait_until
from raw_client import RawClient, RemoteError
from test_ordering import begin_and_store, commit, connect
from zeo.server import StorageServer
from zeo.server.session import MAX_ITERATORS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def start(tmp_path, caplog):
    """Start a server on tmp_path/Data.fs (again, after a restart)."""

    def start_server(**options):
        storage = FileStorage(str(tmp_path / "Data.fs"))
        server = StorageServer(("127.0.0.1", 0), {"1": storage}, **options)
        server.start()
        # Tests look at what calls log, not at the start-up lines: with
        # the GIL off, the server warns there about the extension
        # modules this test process has loaded.
        caplog.clear()
        return server

    yield from closing_all(start_server)


def status(server):
    return server.storages["1"].status("stub")


def commit_objects(client, txn_id, oids, serials):
    """Commit one new revision of each oid; return the tid."""
    tid = commit(client, txn_id, [(oid, serials.get(oid, z64), txn_id)
                                  for oid in oids])
    serials.update(dict.fromkeys(oids, tid))
    return tid


def test_get_invalidations_answers_from_the_queue_then_gives_up(start):
    server = start(invalidation_queue_size=3)
    client = connect(server)
    serials = {}
    tids = [commit_objects(client, n, [p64(n)], serials) for n in range(1, 5)]
    # The queue holds the last three commits, tids[1:].
    assert client.call("getInvalidations", tids[3]) == (tids[3], [])
    assert client.call("getInvalidations", tids[2]) == (tids[3], [p64(4)])
    newest, oids = client.call("getInvalidations", tids[1])
    assert newest == tids[3] and sorted(oids) == [p64(3), p64(4)]
    # Older than the oldest queued commit: something may be missing.
    assert client.call("getInvalidations", tids[0]) is None


def test_invalidation_age_answers_beyond_the_queue(start):
    server = start(invalidation_queue_size=1, invalidation_age=3600)
    client = connect(server)
    serials = {}
    tids = [commit_objects(client, n, [p64(n)], serials) for n in range(1, 5)]
    newest, oids = client.call("getInvalidations", tids[0])
    assert newest == tids[3]
    assert sorted(oids) == [p64(2), p64(3), p64(4)]


def test_invalidation_queue_survives_a_restart(start):
    server = start(invalidation_queue_size=10)
    client = connect(server)
    serials = {}
    tids = [commit_objects(client, n, [p64(n)], serials) for n in range(1, 4)]
    client.close()
    server.close()
    restarted = start(invalidation_queue_size=10)
    client = connect(restarted)
    newest, oids = client.call("getInvalidations", tids[0])
    assert newest == tids[2] and sorted(oids) == [p64(2), p64(3)]


def test_new_oids_are_clamped_and_refused_read_only(start):
    server = start()
    client = connect(server)
    assert len(client.call("new_oids", 0)) == 1
    many = client.call("new_oids", 500)
    assert len(many) == 100 and len(set(many)) == 100
    assert many == sorted(many)
    reader = RawClient(server.address)
    reader.handshake()
    reader.register("1", True)
    with pytest.raises(RemoteError) as refused:
        reader.call("new_oids")
    assert refused.value.class_name == "ZODB.POSException.ReadOnlyError"


def test_finish_and_abort_of_unknown_transactions_return_none(start):
    client = connect(start())
    assert client.call("tpc_finish", 12345) is None
    assert client.call("tpc_abort", 12345) is None
    begin_and_store(client, 1, [(z64, z64, 1)])
    with pytest.raises(RemoteError) as early:
        client.call("tpc_finish", 1)
    assert early.value.class_name == "builtins.AssertionError"
    assert client.call("tpc_abort", 1) is None


def test_store_outside_a_transaction(start):
    server = start()
    client = connect(server)
    with pytest.raises(RemoteError) as error:
        client.call("storea", z64, z64, b"data", 7)
    assert error.value.class_name == \
        "ZODB.POSException.StorageTransactionError"
    assert error.value.payload == (None, 7)
    client.send_oneway("storea", z64, z64, b"data", 7)
    assert client.is_closed(5)
    wait_until(lambda: status(server)["connections"] == 0,
               "the closed connection is cleaned up", timeout=10)


def test_tpc_begin_twice(start):
    server = start()
    client = connect(server)
    client.send_oneway("tpc_begin", 1, b"", b"", {}, None, " ")
    client.send_oneway("tpc_begin", 1, b"", b"", {}, None, " ")  # ignored
    client.call("ping")
    assert status(server)["active_txns"] == 1
    client.send_oneway("tpc_begin", 2, b"", b"", {}, None, " ")
    assert client.is_closed(5)
    wait_until(lambda: status(server)["active_txns"] == 0,
               "the transaction is aborted", timeout=10)
    assert status(server)["aborts"] == 1


def test_read_only_connection_refuses_writes(start):
    server = start()
    reader = RawClient(server.address)
    reader.handshake()
    reader.register("1", True)
    with pytest.raises(RemoteError) as refused:
        reader.call("tpc_begin", 1, b"", b"", {}, None, " ")
    assert refused.value.class_name == "ZODB.POSException.ReadOnlyError"
    reader.send_oneway("tpc_begin", 1, b"", b"", {}, None, " ")
    assert reader.is_closed(5)


def test_a_blob_like_double_store_commits_the_last_and_lists_it_twice(start):
    server = start()
    writer, watcher = connect(server), connect(server)
    begin_and_store(writer, 1, [(z64, z64, "first"), (z64, z64, "second")])
    assert writer.call("vote", 1) == []
    tid = writer.call("tpc_finish", 1)
    watcher.call("ping")
    assert [(m.name, m.args) for m in watcher.server_calls] == [
        ("invalidateTransaction", (tid, [z64, z64]))]
    assert b"second" in watcher.call("loadBefore", z64, maxtid)[0]


def test_delete_only_transaction_broadcasts_an_empty_list(start):
    server = start()
    writer, watcher = connect(server), connect(server)
    first = commit(writer, 1, [(z64, z64, 1)])
    writer.send_oneway("tpc_begin", 2, b"", b"", {}, None, " ")
    writer.send_oneway("deleteObject", z64, first, 2)
    writer.call("vote", 2)
    tid = writer.call("tpc_finish", 2)
    watcher.call("ping")
    assert ("invalidateTransaction", (tid, [])) in [
        (m.name, m.args) for m in watcher.server_calls]
    with pytest.raises(RemoteError) as gone:
        watcher.call("loadBefore", z64, maxtid)
    assert gone.value.class_name == "ZODB.POSException.POSKeyError"


def test_open_iterators_are_capped_and_released(start):
    server = start()
    client = connect(server)
    commit(client, 1, [(z64, z64, 1)])
    iids = [client.call("iterator_start", None, None)
            for _ in range(MAX_ITERATORS)]
    with pytest.raises(RemoteError) as capped:
        client.call("iterator_start", None, None)
    assert capped.value.class_name == "builtins.ValueError"
    assert "too many open iterators" in capped.value.payload[0]
    client.send_oneway("iterator_gc", iids[:10])
    assert isinstance(client.call("iterator_start", None, None), int)
    with pytest.raises(RemoteError) as unknown:
        client.call("iterator_next", iids[0])
    assert unknown.value.class_name == "builtins.KeyError"


def test_every_server_initiated_close_cleans_up(start):
    """ZEO 6.2 leaked sessions it closed itself (PROTOCOL.md 15.2, B2)."""
    server = start()
    survivor = connect(server)
    commit(survivor, 1, [(z64, z64, 1)])
    closers = [
        lambda c: c.send_message(5, False, "no_such_method", ()),
        lambda c: c.send_oneway("storea", z64, z64, b"", 99),
        lambda c: c.send_raw_frame(b"\x80\x03garbage"),
    ]
    for close in closers:
        client = connect(server)
        client.send_oneway("tpc_begin", 3, b"", b"", {}, None, " ")
        client.send_oneway("storea", p64(9), z64, b"x", 3)
        close(client)
        assert client.is_closed(5)
    wait_until(lambda: status(server)["connections"] == 1,
               "every closed connection is cleaned up",
               timeout=10)
    assert status(server)["active_txns"] == 0
    assert status(server)["aborts"] == len(closers)
    assert len(server.storages["1"].sessions) == 1


def test_pack_without_waiting_answers_at_once_and_broadcasts_info(start):
    server = start()
    client, other = connect(server), connect(server)
    serial = z64
    for txn_id in range(1, 4):
        serial = commit(client, txn_id, [(z64, serial, "x" * 1000)])
    other.call("ping")
    other.server_calls.clear()
    assert client.call("pack", time.time() + 1, 0) is None
    deadline = time.monotonic() + 10
    while not any(m.name == "info" for m in other.server_calls):
        assert time.monotonic() < deadline, "no info after pack"
        other.call("ping")
    with pytest.raises(RemoteError):
        other.call("loadSerial", z64, p64(1))


def test_expected_errors_are_not_logged_as_errors(start, caplog):
    server = start()
    first, second = connect(server), connect(server)
    base = commit(first, 1, [(z64, z64, 1)])
    commit(first, 2, [(z64, base, 2)])
    caplog.set_level(logging.DEBUG, logger="zeo")
    begin_and_store(second, 3, [(z64, base, 3)])
    with pytest.raises(RemoteError) as conflict:
        second.call("vote", 3)
    assert conflict.value.class_name == "ZODB.POSException.ConflictError"
    with pytest.raises(RemoteError):
        second.call("loadBefore", p64(77), maxtid)
    errors = [record for record in caplog.records
              if record.levelno >= logging.WARNING]
    assert errors == []
    assert status(server)["conflicts"] == 1


def test_a_refused_undo_is_not_logged_as_an_error(start, caplog):
    server = start()
    client = connect(server)
    first = commit(client, 1, [(z64, z64, 1)])
    commit(client, 2, [(z64, first, 2)])
    caplog.set_level(logging.DEBUG, logger="zeo")
    client.send_oneway("tpc_begin", 3, b"", b"", {}, None, " ")
    client.send_oneway("undoa", base64.encodebytes(first).rstrip(), 3)
    with pytest.raises(RemoteError) as refused:
        client.call("vote", 3)
    assert "UndoError" in refused.value.class_name
    assert [record for record in caplog.records
            if record.levelno >= logging.WARNING] == []


def test_wrong_arguments_are_logged_once_per_method_without_traceback(
        start, caplog):
    server = start()
    client = connect(server)
    caplog.set_level(logging.DEBUG, logger="zeo")
    for _ in range(3):
        for call in [("loadBefore", z64), ("history", z64, 1, 2, 3)]:
            with pytest.raises(RemoteError) as refused:
                client.call(*call)
            assert refused.value.class_name == "builtins.TypeError"
    logged = [record for record in caplog.records
              if record.levelno >= logging.WARNING]
    assert [record.getMessage().split(") ", 1)[1].split(" with")[0]
            for record in logged] == ["called loadBefore", "called history"]
    assert not any(record.exc_info for record in logged)
    assert client.call("lastTransaction") != b""  # still usable


def test_one_pack_at_a_time(start):
    server = start()
    client, other = connect(server), connect(server)
    commit(client, 1, [(z64, z64, 1)])
    storage = server.storages["1"].storage
    packing = threading.Event()
    may_finish = threading.Event()
    real_pack = storage.pack

    def slow_pack(t, referencesf):
        packing.set()
        assert may_finish.wait(10)
        return real_pack(t, referencesf)

    storage.pack = slow_pack
    client.send_message(40, False, "pack", (time.time(), 1))
    assert packing.wait(10)
    with pytest.raises(RemoteError) as busy:
        other.call("pack", time.time(), 1)
    assert "already being packed" in busy.value.payload[0]
    may_finish.set()
    assert client.wait_reply(40, 10) is None
    assert other.call("pack", time.time(), 1) is None


def test_extension_values_clients_cannot_decode_are_sent_as_text(tmp_path):
    """A datetime written into Data.fs by a local user reaches clients as
    its repr in undoLog and the iterator, instead of breaking the reply."""
    import datetime
    import transaction
    import ZODB
    when = datetime.datetime(2026, 11, 24, 12, 0)
    db = ZODB.DB(str(tmp_path / "Data.fs"))
    with db.transaction() as conn:
        conn.root()["x"] = 1
        conn.transaction_manager.get().setExtendedInfo("when", when)
    db.close()
    transaction.abort()
    storage = FileStorage(str(tmp_path / "Data.fs"))
    server = StorageServer(("127.0.0.1", 0), {"1": storage})
    server.start()
    try:
        client = connect(server)
        described = client.call("undoLog", 0, 10)
        assert described[0]["when"] == repr(when)
        iid = client.call("iterator_start", None, None)
        extensions = []
        while True:
            item = client.call("iterator_next", iid)
            if item is None:
                break
            extensions.append(item[4])
        assert {"when": repr(when)} in extensions
    finally:
        server.close()
