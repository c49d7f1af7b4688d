"""Our ClientStorage's blobs through ZODB, against a server with blobs.

Each test runs in both blob modes: "cache" (each client has a blob cache
of its own and blobs cross the connection) and "shared" (the clients use
the server's blob directory).  The server is a subprocess serving a
FileStorage with a blob directory, for each implementation in
`BLOB_SERVER_IMPLS`.
"""

import contextlib
import os
import stat

import pytest
import transaction
import ZODB
import ZODB.blob
from ZODB.POSException import ConflictError, POSKeyError, ReadOnlyError
from ZODB.utils import p64, z64

from conftest import CLIENT_TIMEOUT, server_environment
from server_process import OURS, THEIRS, start_configured_server
from server_process import stop_all
from zeo.ClientStorage import ClientStorage
from zeo.client.blob_cache import Downloads

pytestmark = pytest.mark.timeout(120)

#: The server implementations blobs are tested against, in every
#: test_blob_client* module: ours, and the real ZEO as the reference.
BLOB_SERVER_IMPLS = (OURS, THEIRS)


def start_blob_server(directory, impl):
    """A server on a FileStorage with blobs in `directory`; its
    `blob_dir` attribute is the server's blob directory."""
    blob_dir = os.path.join(directory, "server-blobs")
    section = ("<filestorage 1>\n  path %s\n  blob-dir %s\n</filestorage>"
               % (os.path.join(directory, "Data.fs"), blob_dir))
    server = start_configured_server(directory, storages={"1": section},
                                     impl=impl, env=server_environment())
    server.blob_dir = blob_dir
    return server


@pytest.fixture(params=BLOB_SERVER_IMPLS)
def blob_server(request, tmp_path):
    server = start_blob_server(str(tmp_path), request.param)
    yield server
    assert stop_all([server]) == [0]


@pytest.fixture(params=["cache", "shared"])
def mode(request):
    return request.param


class Clients:
    """Opens our ClientStorages (and DBs on them) in one blob mode; each
    cache-mode client gets a fresh cache unless told which."""

    def __init__(self, server, mode, directory):
        self.server = server
        self.mode = mode
        self._directory = directory
        self._opened = []

    def storage(self, blob_dir=None, **options):
        if self.mode == "shared":
            blob_dir = self.server.blob_dir
        elif blob_dir is None:
            blob_dir = os.path.join(self._directory,
                                    "cache%d" % len(self._opened))
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        storage = ClientStorage(self.server.address, blob_dir=blob_dir,
                                shared_blob_dir=self.mode == "shared",
                                **options)
        self._opened.append(storage)
        return storage

    def db(self, storage=None, **options):
        database = ZODB.DB(storage or self.storage(**options))
        self._opened.append(database)
        return database

    def close(self):
        for thing in reversed(self._opened):
            thing.close()


@pytest.fixture
def clients(blob_server, mode, tmp_path):
    made = Clients(blob_server, mode, str(tmp_path))
    yield made
    made.close()


@contextlib.contextmanager
def opened_root(database):
    """The root of a new connection with a transaction manager of its
    own, and that manager; the connection is closed afterwards."""
    manager = transaction.TransactionManager()
    connection = database.open(manager)
    try:
        yield connection.root(), manager
    finally:
        connection.close()


def commit_blob(database, key, data):
    """Store a new Blob holding `data` under root[key]; return the
    transaction's tid."""
    with opened_root(database) as (root, manager):
        root[key] = ZODB.blob.Blob(data)
        manager.commit()
    return database.lastTransaction()


def update_blob(database, key, data):
    with opened_root(database) as (root, manager):
        with root[key].open("w") as file:
            file.write(data)
        manager.commit()
    return database.lastTransaction()


def read_blob(database, key):
    with opened_root(database) as (root, _manager):
        with root[key].open() as file:
            return file.read()


def blob_oid(database, key):
    with opened_root(database) as (root, _manager):
        return root[key]._p_oid


def test_commit_then_read_from_a_client_with_a_fresh_cache(clients):
    writer = clients.db()
    tid = commit_blob(writer, "blob", b"first blob " * 10000)
    reader_storage = clients.storage()
    reader = ZODB.DB(reader_storage)
    try:
        assert read_blob(reader, "blob") == b"first blob " * 10000
        path = reader_storage.loadBlob(blob_oid(reader, "blob"), tid)
        assert not os.stat(path).st_mode & stat.S_IWUSR  # read-only
        if clients.mode == "cache":
            cache = os.path.dirname(os.path.dirname(path))
            with open(os.path.join(cache, ".layout")) as layout:
                assert layout.read().strip() == "zeocache"
            oid = blob_oid(reader, "blob")
            expected = os.path.join(
                cache, str(int.from_bytes(oid, "big") % 997),
                "%d.%s.blob" % (int.from_bytes(oid, "big") // 997,
                                tid.hex()))
            assert path == expected
            directory = os.listdir(os.path.dirname(path))
            assert ".lock" in directory
            assert not [name for name in directory if name.endswith(".dl")]
        else:
            assert path.startswith(clients.server.blob_dir)
    finally:
        reader.close()


def test_an_updated_blob_keeps_its_old_revision(clients):
    writer = clients.db()
    first = commit_blob(writer, "blob", b"version 1")
    second = update_blob(writer, "blob", b"version 2")
    assert second > first
    storage = clients.storage()
    reader = ZODB.DB(storage)
    try:
        assert read_blob(reader, "blob") == b"version 2"
        oid = blob_oid(reader, "blob")
        with storage.openCommittedBlobFile(oid, first) as file:
            assert file.read() == b"version 1"
        with open(storage.loadBlob(oid, second), "rb") as file:
            assert file.read() == b"version 2"
    finally:
        reader.close()


def test_undo_of_a_blob_transaction(clients):
    database = clients.db()
    commit_blob(database, "blob", b"before")
    update_blob(database, "blob", b"after")
    undone = database.undoLog(0, 1)[0]["id"]
    manager = transaction.TransactionManager()
    database.undo(undone, manager.get())
    manager.commit()
    assert read_blob(database, "blob") == b"before"
    other = ZODB.DB(clients.storage())
    try:
        assert read_blob(other, "blob") == b"before"
    finally:
        other.close()


def test_conflicting_blob_commits(clients):
    first = clients.db()
    second = clients.db(server_sync=True)  # sees first's commits at once
    commit_blob(first, "blob", b"original")
    manager = transaction.TransactionManager()
    connection = second.open(manager)
    manager.begin()  # syncs: the commit is seen
    with connection.root()["blob"].open("w") as file:  # read original
        file.write(b"theirs")
    update_blob(first, "blob", b"ours")
    with pytest.raises(ConflictError):
        manager.commit()
    manager.abort()
    connection.close()
    assert read_blob(second, "blob") == b"ours"
    # The losing upload was cleaned up.
    leftovers = [name for _root, _dirs, files in os.walk(
        os.path.dirname(second.storage.temporaryDirectory()))
        for name in files if name.endswith(".tmp")]
    assert leftovers == []


def test_a_snapshot_reads_the_blob_revision_it_saw(clients):
    writer = clients.db()
    commit_blob(writer, "blob", b"old bytes")
    reader = clients.db(server_sync=True)
    manager = transaction.TransactionManager()
    connection = reader.open(manager)
    blob = connection.root()["blob"]  # the snapshot is set: old revision
    update_blob(writer, "blob", b"new bytes")
    with blob.open() as file:
        assert file.read() == b"old bytes"
    manager.abort()  # a new transaction sees the new revision
    with connection.root()["blob"].open() as file:
        assert file.read() == b"new bytes"
    connection.close()


def test_a_read_only_client_reads_blobs_and_refuses_commits(clients):
    commit_blob(clients.db(), "blob", b"for reading")
    reader = clients.db(read_only=True)
    assert read_blob(reader, "blob") == b"for reading"
    manager = transaction.TransactionManager()
    connection = reader.open(manager)
    connection.root()["other"] = ZODB.blob.Blob(b"refused")
    with pytest.raises(ReadOnlyError):
        manager.commit()
    manager.abort()
    connection.close()


def test_the_uploader_does_not_download_its_own_blob(clients, blob_server):
    storage = clients.storage()
    database = ZODB.DB(storage)
    try:
        tid = commit_blob(database, "blob", b"mine" * 1000)
        oid = blob_oid(database, "blob")
        # Remove the server's copy: a client that asked for it now
        # would get POSKeyError.
        server_helper = ZODB.blob.FilesystemHelper(blob_server.blob_dir)
        server_file = server_helper.getBlobFilename(oid, tid)
        if clients.mode == "cache":
            os.remove(server_file)
        assert os.path.exists(storage.loadBlob(oid, tid))
        assert read_blob(database, "blob") == b"mine" * 1000
        if clients.mode == "cache":
            with pytest.raises(POSKeyError):
                clients.storage().loadBlob(oid, tid)
    finally:
        database.close()


def test_a_missing_blob_is_a_poskeyerror(clients):
    storage = clients.storage()
    database = ZODB.DB(storage)
    try:
        tid = commit_blob(database, "blob", b"exists")
        with pytest.raises(POSKeyError):
            storage.loadBlob(p64(12345), tid)
        with pytest.raises(POSKeyError):
            storage.openCommittedBlobFile(p64(12345), tid)
        leftovers = [name for _root, _dirs, files in os.walk(
            os.path.dirname(storage.temporaryDirectory()))
            for name in files if name.endswith(".dl")]
        assert leftovers == []
    finally:
        database.close()


def test_ids_that_are_not_8_bytes_are_refused(clients):
    storage = clients.storage()
    with pytest.raises(ValueError, match="8 bytes"):
        storage.loadBlob(b"../../etc", z64)
    with pytest.raises(ValueError, match="8 bytes"):
        storage.openCommittedBlobFile(z64, b"\0" * 9)


def test_blobs_the_client_did_not_ask_for_are_dropped(tmp_path):
    downloads = Downloads()
    downloads.start(z64, z64)
    downloads.chunk(z64, z64, b"unasked")
    downloads.stop(z64, z64)
    target = str(tmp_path / "wanted.blob")
    with downloads.expecting(p64(1), p64(2), target) as download:
        downloads.start(z64, z64)  # not this one
        downloads.start(p64(1), p64(2))
        downloads.chunk(p64(1), p64(2), b"wanted")
        downloads.stop(p64(1), p64(2))
    assert download.complete
    assert os.listdir(tmp_path) == ["wanted.blob"]
    with open(target, "rb") as file:
        assert file.read() == b"wanted"


def test_storeblob_and_restoreblob_copy_a_database(clients, tmp_path):
    source_database = clients.db()
    commit_blob(source_database, "a", b"alpha")
    update_blob(source_database, "a", b"alpha 2")
    commit_blob(source_database, "b", b"beta")
    # A second server (a fresh database) to copy into.
    directory = tmp_path / "target"
    directory.mkdir()
    target_server = start_blob_server(str(directory), clients.server.impl)
    try:
        target_clients = Clients(target_server, clients.mode, str(directory))
        try:
            target = target_clients.storage()
            target.copyTransactionsFrom(source_database.storage)
            copied = target_clients.db(target)
            assert read_blob(copied, "a") == b"alpha 2"
            assert read_blob(copied, "b") == b"beta"
            source_tids = [t.tid for t in source_database.storage.iterator()]
            assert [t.tid for t in target.iterator()] == source_tids
        finally:
            target_clients.close()
    finally:
        assert stop_all([target_server]) == [0]


def test_our_zeocache_layout_computes_the_real_zeo_paths():
    import ZEO.ClientStorage
    from zeo.client.blob_cache import CacheLayout
    ours, theirs = CacheLayout(), ZEO.ClientStorage.BlobCacheLayout()
    assert "zeocache" in ZODB.blob.LAYOUTS
    for number in (0, 1, 996, 997, 998, 123456789, 2 ** 63, 2 ** 64 - 1):
        oid, tid = p64(number), p64(2 ** 64 - 1 - number)
        assert ours.oid_to_path(oid) == theirs.oid_to_path(oid)
        assert ours.getBlobFilePath(oid, tid) == \
            theirs.getBlobFilePath(oid, tid)


def test_a_real_zeo_client_uses_the_blobs_our_client_cached(
        blob_server, tmp_path):
    import ZEO.ClientStorage
    cache = str(tmp_path / "cache")
    ours = ClientStorage(blob_server.address, blob_dir=cache,
                         wait_timeout=CLIENT_TIMEOUT)
    database = ZODB.DB(ours)
    try:
        tid = commit_blob(database, "blob", b"cached by us")
        oid = blob_oid(database, "blob")
        # Only the cache has it now.
        os.remove(ZODB.blob.FilesystemHelper(
            blob_server.blob_dir).getBlobFilename(oid, tid))
        theirs = ZEO.ClientStorage.ClientStorage(
            blob_server.address, blob_dir=cache, wait_timeout=CLIENT_TIMEOUT)
        try:
            with theirs.openCommittedBlobFile(oid, tid) as file:
                assert file.read() == b"cached by us"
        finally:
            theirs.close()
    finally:
        database.close()
