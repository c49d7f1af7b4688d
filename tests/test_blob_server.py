"""Blobs served by the server under test to the real ZEO 6 client.

Every test starts a server process from a configuration file, as users
do, on a FileStorage with a blob directory in the test's temp dir, and
uses the real ``ZEO.ClientStorage`` in both of its blob modes: a private
blob cache (blobs cross the socket) and a shared blob directory (the
client writes into the server's directory and sends only a file name).
Misbehaving peers are in test_blob_server_hostile.py.
"""

import hashlib
import os
import re
import socket
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.interfaces
from ZEO.ClientStorage import ClientStorage
from ZODB.blob import Blob
from ZODB.POSException import ConflictError, POSKeyError, ReadOnlyError

from conftest import (CLIENT_TIMEOUT, SERVER_IMPL, closing_all,
                      server_environment, wait_until)
from raw_client import RawClient
from server_process import memory_kib, reset_peak_memory
from server_process import start_configured_server, stop_all
from test_monitor import MONITOR_LINE, parse_report, read_report
from test_scripts import run_tool
from zeo.rpc import Outbox
from zeo.wire import frame

pytestmark = pytest.mark.timeout(120)

MODES = ("cache", "shared")


def blob_filestorage_section(directory, name="1"):
    return ("<filestorage %s>\n  path %s\n  blob-dir %s\n</filestorage>"
            % (name, os.path.join(directory, "Data.fs"),
               os.path.join(directory, "blobs")))


@pytest.fixture
def blob_server_impl():
    """The server the tests start: the one under test (conftest)."""
    return SERVER_IMPL


@pytest.fixture
def start_blob_server(tmp_path, blob_server_impl):
    """Factory: a server on a FileStorage with blobs in tmp_path (or in
    `directory`), or on the storage `section` given; stopped after."""
    servers = []

    def start(zeo_options="", section=None, directory=None):
        directory = str(directory or tmp_path)
        os.makedirs(directory, exist_ok=True)
        if section is None:
            section = blob_filestorage_section(directory)
        server = start_configured_server(
            directory, zeo_options, {"1": section}, impl=blob_server_impl,
            env=server_environment())
        server.blob_dir = os.path.join(directory, "blobs")
        servers.append(server)
        return server

    yield start
    statuses = stop_all(servers)
    assert statuses == [-9 if getattr(server, "killed", False) else 0
                        for server in servers], "server exit statuses"


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def open_blob_client(tmp_path):
    """Factory: a real ZEO ClientStorage with blobs, in `mode`; each gets
    a fresh blob cache of its own unless the blob dir is shared.  With
    server_sync, a new transaction sees every commit made before it."""
    caches = iter(range(1, 1000))

    def open_(server, mode, **options):
        if mode == "shared":
            options.update(blob_dir=server.blob_dir, shared_blob_dir=True)
        else:
            options["blob_dir"] = str(tmp_path / ("cache-%d" % next(caches)))
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        options.setdefault("server_sync", True)
        return ClientStorage(server.address, "1", **options)

    yield from closing_all(open_)


@pytest.fixture
def open_blob_db(open_blob_client):
    yield from closing_all(lambda server, mode, **options: ZODB.DB(
        open_blob_client(server, mode, **options)))


def open_connection(db):
    """A connection with its own transaction manager, in a transaction
    begun after the connection was opened (so it sees every commit made
    before: the clients use server_sync)."""
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    manager.begin()
    return connection, manager


def read_blob(blob):
    with blob.open("r") as blob_file:
        return blob_file.read()


def write_blob(blob, data):
    with blob.open("w") as blob_file:
        blob_file.write(data)


def committed_blob_files(blob_dir):
    """Relative paths of the committed blob files in a server blob dir."""
    found = []
    for directory, _names, files in os.walk(blob_dir):
        found.extend(os.path.relpath(os.path.join(directory, name), blob_dir)
                     for name in files if name.endswith(".blob"))
    return sorted(found)


def temporary_files(blob_dir):
    return sorted(os.listdir(os.path.join(blob_dir, "tmp")))


# -- the real ZEO client, both blob modes ------------------------------------


def test_a_blob_written_by_one_client_is_read_and_updated_by_another(
        start_blob_server, open_blob_db, mode):
    server = start_blob_server()
    writer_db, reader_db = (open_blob_db(server, mode),
                            open_blob_db(server, mode))
    writer, writer_txn = open_connection(writer_db)
    writer.root()["blob"] = Blob(b"first version " * 10000)
    writer_txn.commit()

    reader, reader_txn = open_connection(reader_db)
    assert read_blob(reader.root()["blob"]) == b"first version " * 10000
    write_blob(reader.root()["blob"], b"second")
    reader_txn.commit()

    writer_txn.begin()
    assert read_blob(writer.root()["blob"]) == b"second"
    assert len(committed_blob_files(server.blob_dir)) == 2
    assert temporary_files(server.blob_dir) == []


def test_an_old_blob_revision_is_read_in_an_mvcc_snapshot(
        start_blob_server, open_blob_db, mode):
    server = start_blob_server()
    db = open_blob_db(server, mode)
    connection, manager = open_connection(db)
    connection.root()["blob"] = Blob(b"old")
    manager.commit()
    old_tid = db.lastTransaction()
    write_blob(connection.root()["blob"], b"new")
    manager.commit()

    fresh_db = open_blob_db(server, mode)  # nothing cached yet
    snapshot = fresh_db.open(at=old_tid)
    assert read_blob(snapshot.root()["blob"]) == b"old"
    current, _ = open_connection(fresh_db)
    assert read_blob(current.root()["blob"]) == b"new"
    snapshot.close()


def test_undoing_a_blob_transaction_restores_the_earlier_blob(
        start_blob_server, open_blob_db, mode):
    server = start_blob_server()
    db = open_blob_db(server, mode)
    connection, manager = open_connection(db)
    connection.root()["blob"] = Blob(b"kept")
    manager.commit()
    write_blob(connection.root()["blob"], b"undone")
    manager.commit()

    db.undo(db.undoLog(0, 1)[0]["id"], manager.get())
    manager.commit()
    assert read_blob(connection.root()["blob"]) == b"kept"
    other, _ = open_connection(open_blob_db(server, mode))
    assert read_blob(other.root()["blob"]) == b"kept"


def test_concurrent_changes_of_one_blob_conflict(
        start_blob_server, open_blob_db, mode):
    server = start_blob_server()
    first_db, second_db = (open_blob_db(server, mode),
                           open_blob_db(server, mode))
    first, first_txn = open_connection(first_db)
    first.root()["blob"] = Blob(b"base")
    first_txn.commit()
    second, second_txn = open_connection(second_db)
    assert read_blob(second.root()["blob"]) == b"base"

    write_blob(first.root()["blob"], b"first wins")
    write_blob(second.root()["blob"], b"second loses")
    first_txn.commit()
    with pytest.raises(ConflictError):
        second_txn.commit()
    second_txn.abort()
    assert read_blob(second.root()["blob"]) == b"first wins"
    wait_until(lambda: temporary_files(server.blob_dir) == [],
               "the losing upload's file is removed", CLIENT_TIMEOUT)


def test_pack_removes_the_blob_files_of_packed_away_revisions(
        start_blob_server, open_blob_db, mode):
    server = start_blob_server()
    db = open_blob_db(server, mode)
    connection, manager = open_connection(db)
    connection.root()["blob"] = Blob(b"revision 0")
    manager.commit()
    for number in 1, 2:
        write_blob(connection.root()["blob"], b"revision %d" % number)
        manager.commit()
    latest = db.lastTransaction()
    connection.root()["gone"] = Blob(b"unreachable soon")
    manager.commit()
    del connection.root()["gone"]
    manager.commit()
    assert len(committed_blob_files(server.blob_dir)) == 4

    time.sleep(0.01)  # pack to a time after the last commit
    db.pack(time.time())
    remaining = committed_blob_files(server.blob_dir)
    assert len(remaining) == 1
    assert remaining[0].endswith("0x%s.blob" % latest.hex())
    other, _ = open_connection(open_blob_db(server, mode))
    assert read_blob(other.root()["blob"]) == b"revision 2"


def test_zeopack_removes_the_blob_files_of_packed_away_revisions(
        start_blob_server, open_blob_db):
    server = start_blob_server()
    db = open_blob_db(server, "cache")
    connection, manager = open_connection(db)
    connection.root()["blob"] = Blob(b"revision 0")
    manager.commit()
    write_blob(connection.root()["blob"], b"revision 1")
    manager.commit()
    latest = db.lastTransaction()
    assert len(committed_blob_files(server.blob_dir)) == 2

    packed = run_tool("zeopack", "%s:%d" % server.address, "-S", "1",
                      "--days", "0")
    assert packed.returncode == 0, packed.stderr
    remaining = committed_blob_files(server.blob_dir)
    assert [os.path.basename(path) for path in remaining] == [
        "0x%s.blob" % latest.hex()]
    reader, _ = open_connection(open_blob_db(server, "cache"))
    assert read_blob(reader.root()["blob"]) == b"revision 1"


def test_a_read_only_client_cannot_store_a_blob(
        start_blob_server, open_blob_db, mode):
    server = start_blob_server()
    writer, writer_txn = open_connection(open_blob_db(server, mode))
    writer.root()["blob"] = Blob(b"readable")
    writer_txn.commit()

    reader, reader_txn = open_connection(
        open_blob_db(server, mode, read_only=True))
    assert read_blob(reader.root()["blob"]) == b"readable"
    write_blob(reader.root()["blob"], b"refused")
    with pytest.raises(ReadOnlyError):
        reader_txn.commit()
    reader_txn.abort()
    assert temporary_files(server.blob_dir) == []


def announced_interfaces(server):
    with RawClient(server.address) as client:
        client.handshake()
        client.register()
        return {name for _module, name in client.call("get_info")[
            "interfaces"]}


def test_the_blob_interfaces_are_announced_only_by_blob_storages(
        start_blob_server, open_client, tmp_path):
    with_blobs = start_blob_server(directory=tmp_path / "with")
    assert {"IBlobStorage", "IBlobStorageRestoreable"} <= (
        announced_interfaces(with_blobs))
    client = open_client(with_blobs, blob_dir=str(tmp_path / "cache"))
    assert ZODB.interfaces.IBlobStorage.providedBy(client)

    without = start_blob_server(
        directory=tmp_path / "without",
        section="<filestorage 1>\n  path %s\n</filestorage>"
        % (tmp_path / "without" / "Data.fs"))
    announced = announced_interfaces(without)
    assert "IStorageUndoable" in announced
    assert not announced & {"IBlobStorage", "IBlobStorageRestoreable"}
    assert not ZODB.interfaces.IBlobStorage.providedBy(open_client(without))


def test_the_blobstorage_wrapper_is_served(
        start_blob_server, open_blob_db, mode, tmp_path):
    """ZODB's <blobstorage> section gives blobs to a storage without them
    (here a MappingStorage)."""
    blob_dir = tmp_path / "blobs"
    server = start_blob_server(
        section="<blobstorage 1>\n  blob-dir %s\n  <mappingstorage>\n"
        "  </mappingstorage>\n</blobstorage>" % blob_dir)
    writer, writer_txn = open_connection(open_blob_db(server, mode))
    writer.root()["blob"] = Blob(b"wrapped")
    writer_txn.commit()
    reader, _ = open_connection(open_blob_db(server, mode))
    assert read_blob(reader.root()["blob"]) == b"wrapped"
    assert len(committed_blob_files(str(blob_dir))) == 1


def test_a_missing_blob_file_is_a_poskeyerror(
        start_blob_server, open_blob_client, mode):
    server = start_blob_server()
    db = ZODB.DB(open_blob_client(server, mode))
    connection, manager = open_connection(db)
    connection.root()["blob"] = Blob(b"soon lost")
    manager.commit()
    oid, serial = connection.root()["blob"]._p_oid, db.lastTransaction()
    for path in committed_blob_files(server.blob_dir):
        os.remove(os.path.join(server.blob_dir, path))
    reader = open_blob_client(server, mode)
    with pytest.raises(POSKeyError):
        reader.loadBlob(oid, serial)
    assert reader.is_connected()


@pytest.mark.zeo_bug("unfinished uploads stay in the blob temporary "
                     "directory for ever")
def test_a_restart_removes_unfinished_uploads_and_nothing_else(
        start_blob_server):
    server = start_blob_server()
    with RawClient(server.address) as client:
        client.handshake()
        client.register()
        client.send_oneway("tpc_begin", 1, b"", b"", {}, None, " ")
        client.send_oneway("storeBlobStart")
        client.send_oneway("storeBlobChunk", b"never finished")
        client.call("ping")
        [unfinished] = temporary_files(server.blob_dir)
        server.kill()  # a crash: nothing cleans up
        server.killed = True
    tmp = os.path.join(server.blob_dir, "tmp")
    assert os.listdir(tmp) == [unfinished]
    # What a crash in a repeated vote leaves (see TransactionBlobs.replay),
    # and what others put there: a local ZODB's uncommitted blob, files
    # merely looking like ours.
    others = ["BUCabc123", "zeo-blob-x.blob", "mine.part"]
    for name in others + [unfinished + ".vote.part"]:
        with open(os.path.join(tmp, name), "wb") as handle:
            handle.write(b"x")
    os.mkdir(os.path.join(tmp, "zeo-blob-dir.part"))

    restarted = start_blob_server()
    assert temporary_files(restarted.blob_dir) == sorted(
        others + ["zeo-blob-dir.part"])
    assert "removed 2 unfinished blob upload(s)" in restarted.log


def test_the_monitor_counts_blobs_received_and_sent(
        start_blob_server, open_blob_db):
    server = start_blob_server("monitor-address 127.0.0.1:0")
    host, _, port = MONITOR_LINE.search(server.log).group(1).rpartition(":")
    writer, writer_txn = open_connection(open_blob_db(server, "cache"))
    writer.root()["blob"] = Blob(b"b" * 100000)
    writer_txn.commit()
    reader, _ = open_connection(open_blob_db(server, "cache"))
    assert read_blob(reader.root()["blob"]) == b"b" * 100000

    _, storages = parse_report(read_report((host, int(port))))
    assert storages["1"]["Blobs received"] == "1 (100000 bytes)"
    assert storages["1"]["Blobs sent"] == "1 (100000 bytes)"


# -- a big blob: memory stays bounded ----------------------------------------


def test_outbox_wait_for_room_follows_the_reader_and_the_close():
    """The backpressure a download relies on: a waiter returns once the
    peer has read enough, and at once (False) when the outbox closes."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outbox = Outbox(ours, "test-backpressure")
    body = frame(b"x" * 65536)
    for _ in range(64):  # far more than the socket takes
        outbox.put(body, wake_writer=False)
    outbox.send_pending()
    assert outbox.pending > 65536
    assert outbox.wait_for_room(65536, timeout=0.2) is False  # timed out

    def read_all():
        while theirs.recv(1 << 20):
            pass

    reader = threading.Thread(target=read_all, name="test-outbox-reader")
    reader.start()
    assert outbox.wait_for_room(65536, timeout=CLIENT_TIMEOUT) is True
    assert outbox.pending <= 65536

    for _ in range(64):
        outbox.put(body, wake_writer=False)
    closer = threading.Timer(0.2, outbox.close)
    closer.start()
    # Once closed there is no room to wait for, whatever is pending.
    assert outbox.wait_for_room(0, timeout=CLIENT_TIMEOUT) is False
    assert outbox.put(body) is False
    closer.join()
    ours.close()
    reader.join(CLIENT_TIMEOUT)
    theirs.close()


BIG_BLOB_SIZE = 1024 ** 3
#: What the server's peak resident memory may grow by while it receives
#: and sends BIG_BLOB_SIZE bytes.
RSS_BOUND = 32 * 1024 ** 2


def write_big_blob(blob, size):
    """Fill `blob` with `size` pseudo-random bytes, a MiB at a time;
    return their SHA-256."""
    digest = hashlib.sha256()
    block = bytearray(os.urandom(1024 ** 2))
    with blob.open("w") as blob_file:
        for number in range(size // len(block)):
            block[:8] = number.to_bytes(8, "big")
            digest.update(block)
            blob_file.write(block)
    return digest.hexdigest()


def hash_blob(blob):
    digest = hashlib.sha256()
    with blob.open("r") as blob_file:
        for chunk in iter(lambda: blob_file.read(1024 ** 2), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.timeout(300)
def test_a_1_gb_blob_goes_up_and_down_in_bounded_server_memory(
        start_blob_server, open_blob_db):
    server = start_blob_server()
    pid = server.process.pid
    writer, writer_txn = open_connection(open_blob_db(server, "cache"))
    writer.root()["small"] = Blob(b"warm up")
    writer_txn.commit()
    reader, reader_txn = open_connection(open_blob_db(server, "cache"))
    assert read_blob(reader.root()["small"]) == b"warm up"
    baseline = memory_kib(pid, "VmRSS") * 1024
    reset_peak_memory(pid)

    writer.root()["big"] = Blob()
    digest = write_big_blob(writer.root()["big"], BIG_BLOB_SIZE)
    started = time.monotonic()
    writer_txn.commit()
    uploaded = time.monotonic()
    reader_txn.begin()
    assert hash_blob(reader.root()["big"]) == digest
    downloaded = time.monotonic()

    peak = memory_kib(pid, "VmHWM") * 1024
    print("1 GiB blob: upload %.1f s, download and hash %.1f s; server RSS "
          "%.1f MiB before, peak %.1f MiB (+%.1f MiB)"
          % (uploaded - started, downloaded - uploaded, baseline / 2 ** 20,
             peak / 2 ** 20, (peak - baseline) / 2 ** 20))
    assert peak - baseline < RSS_BOUND
    assert temporary_files(server.blob_dir) == []


def test_blob_traffic_logs_no_warning_or_error(
        start_blob_server, open_blob_db, mode):
    """Blob traffic in both modes leaves no warning or error in the log."""
    server = start_blob_server()
    writer, writer_txn = open_connection(open_blob_db(server, mode))
    writer.root()["blob"] = Blob(b"quiet")
    writer_txn.commit()
    reader, _ = open_connection(open_blob_db(server, mode))
    assert read_blob(reader.root()["blob"]) == b"quiet"
    assert not re.search(r" (WARNING|ERROR|CRITICAL) ", server.log)
