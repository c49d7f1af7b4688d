"""The blob cache of our ClientStorage: sharing, trimming, configuration.

Against a real server with blobs (each of `BLOB_SERVER_IMPLS`); the
processes that share a cache are real subprocesses.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import transaction
import ZODB
import ZODB.blob
import ZODB.config
import ZODB.interfaces

from conftest import CLIENT_TIMEOUT, server_environment, wait_until
from server_process import stop_all
from test_blob_client import BLOB_SERVER_IMPLS, start_blob_server
from zeo.ClientStorage import ClientStorage

pytestmark = pytest.mark.timeout(120)

#: A client process: loads the blobs given on the command line from the
#: shared cache once the go file exists, and prints how many it
#: downloaded and the hash of each.
CLIENT_PROCESS = r"""
import hashlib, json, logging, os, sys, time
from zeo.ClientStorage import ClientStorage

address, cache, go, blobs = json.loads(sys.argv[1])
downloads = []

class Count(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("downloaded blob"):
            downloads.append(record.getMessage())

logger = logging.getLogger("zeo.client.blob_cache")
logger.setLevel(logging.DEBUG)
logger.addHandler(Count())
storage = ClientStorage(tuple(address), blob_dir=cache, wait_timeout=10)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
hashes = []
for oid, tid in blobs:
    with storage.openCommittedBlobFile(bytes.fromhex(oid),
                                       bytes.fromhex(tid)) as file:
        hashes.append(hashlib.sha256(file.read()).hexdigest())
storage.close()
print(json.dumps({"downloads": len(downloads), "hashes": hashes}))
"""


@pytest.fixture(params=BLOB_SERVER_IMPLS)
def blob_server(request, tmp_path):
    server = start_blob_server(str(tmp_path), request.param)
    yield server
    assert stop_all([server]) == [0]


@pytest.fixture
def storages():
    """Factory opening our ClientStorages; closed after the test."""
    opened = []

    def open_(server, **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        storage = ClientStorage(server.address, **options)
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        storage.close()


def commit_blobs(storage, contents):
    """Commit one Blob per item of `contents`, each in its own
    transaction; return their `(oid, tid)`."""
    database = ZODB.DB(storage)
    manager = transaction.TransactionManager()
    connection = database.open(manager)
    ids = []
    for index, data in enumerate(contents):
        blob = connection.root()[index] = ZODB.blob.Blob(data)
        manager.commit()
        ids.append((blob._p_oid, database.lastTransaction()))
    connection.close()
    return ids


def cached_bytes(directory):
    total = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            if name.endswith(".blob"):
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except FileNotFoundError:
                    pass  # trimmed between the listing and now
    return total


def trimming_threads():
    return [thread for thread in threading.enumerate()
            if thread.name.startswith("zeo-blob-cache-trim")]


def test_two_processes_sharing_a_cache_download_each_blob_once(
        blob_server, storages, tmp_path):
    contents = [os.urandom(1024 * 1024) for _ in range(6)]
    ids = commit_blobs(storages(blob_server, blob_dir=str(tmp_path / "w")),
                       contents)
    cache = str(tmp_path / "shared-cache")
    go = str(tmp_path / "go")
    argument = json.dumps([blob_server.address, cache, go,
                           [(oid.hex(), tid.hex()) for oid, tid in ids]])
    environment = dict(os.environ, **server_environment())
    processes = [subprocess.Popen(
        [sys.executable, "-c", CLIENT_PROCESS, argument],
        stdout=subprocess.PIPE, text=True, env=environment)
        for _ in range(2)]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        open(go, "w").close()  # both load the same blobs at once
        results = [json.loads(process.communicate(timeout=60)[0])
                   for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in processes] == [0, 0]
    expected = [hashlib.sha256(data).hexdigest() for data in contents]
    assert [result["hashes"] for result in results] == [expected] * 2
    assert sum(result["downloads"] for result in results) == len(contents)
    assert cached_bytes(cache) == sum(map(len, contents))


def test_trimming_spares_open_files_and_removed_blobs_come_back(
        blob_server, storages, tmp_path):
    size = 256 * 1024
    contents = [bytes([index]) * size for index in range(8)]
    ids = commit_blobs(storages(blob_server, blob_dir=str(tmp_path / "w")),
                       contents)
    cache = str(tmp_path / "small-cache")
    limit = 600 * 1024
    storage = storages(blob_server, blob_dir=cache, blob_cache_size=limit,
                       blob_cache_size_check=10)
    opened = threading.Event()
    go_on = threading.Event()
    read = []

    def reader():
        with storage.openCommittedBlobFile(*ids[0]) as file:
            read.append(file.read(1))
            opened.set()
            go_on.wait(60)
            read.append(file.read())

    thread = threading.Thread(target=reader, name="blob-reader")
    thread.start()
    try:
        assert opened.wait(30)
        first_path = storage.loadBlob(*ids[0])
        for oid, tid in ids[1:]:
            with storage.openCommittedBlobFile(oid, tid) as file:
                assert file.read() == contents[ids.index((oid, tid))]
        wait_until(lambda: cached_bytes(cache) <= limit,
                   "the cache is trimmed to its size")
        assert not os.path.exists(first_path)  # the least recently used
    finally:
        go_on.set()
        thread.join(60)
    assert b"".join(read) == contents[0]
    # A blob removed while the client runs is downloaded again.
    last = storage.loadBlob(*ids[-1])
    os.remove(last)
    with storage.openCommittedBlobFile(*ids[-1]) as file:
        assert file.read() == contents[-1]
    assert os.path.exists(last)
    with open(storage.loadBlob(*ids[0]), "rb") as file:
        assert file.read() == contents[0]
    storage.close()
    assert trimming_threads() == []


def test_a_full_cache_is_trimmed_when_the_client_starts(
        blob_server, storages, tmp_path):
    cache = str(tmp_path / "cache")
    contents = [os.urandom(100 * 1024) for _ in range(5)]
    commit_blobs(storages(blob_server, blob_dir=cache), contents)
    assert cached_bytes(cache) == 500 * 1024  # our own uploads
    storages(blob_server, blob_dir=cache, blob_cache_size=250 * 1024)
    wait_until(lambda: cached_bytes(cache) <= 250 * 1024,
               "the cache is trimmed at start")


def client_config(address, body):
    return ("%%import zeo\n<clientstorage>\n  server %s:%d\n%s\n"
            "</clientstorage>\n" % (address[0], address[1], body))


def test_clientstorage_section_with_the_blob_keys(
        blob_server, storages, tmp_path):
    contents = [os.urandom(200 * 1024) for _ in range(6)]
    ids = commit_blobs(storages(blob_server, blob_dir=str(tmp_path / "w")),
                       contents)
    cache = str(tmp_path / "configured-cache")
    storage = ZODB.config.storageFromString(client_config(
        blob_server.address, "  blob-dir %s\n  shared-blob-dir false\n"
        "  blob-cache-size 500KB\n  blob-cache-size-check 20" % cache))
    try:
        assert ZODB.interfaces.IBlobStorage.providedBy(storage)
        for (oid, tid), data in zip(ids, contents):
            with storage.openCommittedBlobFile(oid, tid) as file:
                assert file.read() == data
        wait_until(lambda: cached_bytes(cache) <= 500 * 1024,
                   "the configured cache size is kept")
        with open(os.path.join(cache, ".layout")) as layout:
            assert layout.read() == "zeocache"
    finally:
        storage.close()
    shared = ZODB.config.storageFromString(client_config(
        blob_server.address, "  blob-dir %s\n  shared-blob-dir true"
        % blob_server.blob_dir))
    try:
        path = shared.loadBlob(*ids[0])
        assert path.startswith(blob_server.blob_dir)
        with open(path, "rb") as file:
            assert file.read() == contents[0]
    finally:
        shared.close()


def test_blob_cache_size_check_must_be_a_percentage(tmp_path):
    with pytest.raises(ZODB.config.ZConfig.ConfigurationError,
                       match="percentage"):
        ZODB.config.storageFromString(client_config(
            ("127.0.0.1", 1), "  blob-dir %s\n  blob-cache-size 1MB\n"
            "  blob-cache-size-check 100\n  wait false" % tmp_path))


def test_threads_loading_one_missing_blob_download_it_once(
        blob_server, storages, tmp_path, caplog):
    data = os.urandom(3 * 1024 * 1024)
    [(oid, tid)] = commit_blobs(
        storages(blob_server, blob_dir=str(tmp_path / "w")), [data])
    storage = storages(blob_server, blob_dir=str(tmp_path / "cache"))
    caplog.set_level("DEBUG", logger="zeo.client.blob_cache")
    start = threading.Barrier(6)
    read = []

    def load():
        start.wait()
        with storage.openCommittedBlobFile(oid, tid) as file:
            read.append(file.read())

    threads = [threading.Thread(target=load, name="blob-loader-%d" % index)
               for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert read == [data] * 6
    downloads = [record for record in caplog.records
                 if record.getMessage().startswith("downloaded blob")]
    assert len(downloads) == 1


def test_our_uploads_are_adopted_even_after_the_cache_was_emptied_by_hand(
        blob_server, storages, tmp_path, caplog):
    """Adoption renames without the directory lock and remembers which
    directories exist; a directory removed by hand is made again, and
    what we uploaded is still never downloaded."""
    cache = tmp_path / "cache"
    storage = storages(blob_server, blob_dir=str(cache))
    caplog.set_level("DEBUG", logger="zeo.client.blob_cache")
    database = ZODB.DB(storage)
    manager = transaction.TransactionManager()
    connection = database.open(manager)
    contents = [os.urandom(1000) for _ in range(3)]
    for round_number, data in enumerate(contents):
        if round_number == 0:
            connection.root()["blob"] = ZODB.blob.Blob()
        with connection.root()["blob"].open("w") as file:
            file.write(data)  # a new revision of the same oid, directory
        if round_number == 1:
            for directory in cache.iterdir():
                if directory.is_dir() and directory.name.isdigit():
                    for path in directory.iterdir():
                        path.unlink()
                    directory.rmdir()
        manager.commit()
        path = storage.loadBlob(connection.root()["blob"]._p_oid,
                                database.lastTransaction())
        assert path.startswith(str(cache))
        with open(path, "rb") as file:
            assert file.read() == data
        assert not os.stat(path).st_mode & 0o222  # read-only, as committed
    assert not [record for record in caplog.records
                if record.getMessage().startswith("downloaded blob")]
    connection.close()


def test_a_blob_whose_directory_was_removed_by_hand_is_downloaded_again(
        blob_server, storages, tmp_path, caplog):
    """The cache remembers which directories it made; one removed by hand
    since is made again for the next download, not reported missing."""
    data = os.urandom(5000)
    [(oid, tid)] = commit_blobs(
        storages(blob_server, blob_dir=str(tmp_path / "w")), [data])
    cache = tmp_path / "cache"
    storage = storages(blob_server, blob_dir=str(cache))
    caplog.set_level("DEBUG", logger="zeo.client.blob_cache")
    for _round in range(2):
        path = storage.loadBlob(oid, tid)
        with open(path, "rb") as file:
            assert file.read() == data
        directory = os.path.dirname(path)
        for name in os.listdir(directory):
            os.chmod(os.path.join(directory, name), 0o600)
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    downloads = [record for record in caplog.records
                 if record.getMessage().startswith("downloaded blob")]
    assert len(downloads) == 2
