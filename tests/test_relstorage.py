"""One server of ours on RelStorage (PostgreSQL): what the real ZEO gets
wrong there (issue 15), through our client and the real ZEO client.

An empty database must open through the server and get its root (its
first load is a POSKeyError that must travel); undo must work though
RelStorage's undo returns None; a missing object must arrive as
POSKeyError; a missing relstorage package must give a one-line error.
"""

import subprocess
import sys

import pytest
import transaction
import ZEO
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import POSKeyError
from ZODB.utils import p64

from conftest import CLIENT_TIMEOUT, server_environment, wait_until
from relstorage_fixtures import (database, postgres, relstorage_config,
                                 start_relstorage_server)
from postgres_cluster import relstorage_section
from server_process import free_port, start_configured_server, write_config
from hostile_pickles import Global
from raw_client import RawClient
from test_conflict_trust import (LENGTH, assert_conflict, calling_pickle,
                                 class_pickle, conflict_on, length)
from test_metrics import scrape, storage_value
from zeo.ClientStorage import ClientStorage

pytestmark = pytest.mark.timeout(120)

__all__ = ["database", "postgres"]  # fixtures, used by name


@pytest.fixture(params=[True, False], ids=["history", "history-free"])
def keep_history(request):
    return request.param


@pytest.fixture
def server(tmp_path, database, keep_history):
    process = start_relstorage_server(str(tmp_path), database, keep_history)
    yield process
    assert process.stop() == 0, process.log


def open_db(address, client="ours"):
    if client == "ours":
        storage = ClientStorage(address, wait_timeout=CLIENT_TIMEOUT)
    else:
        storage = ZEO.client(address, wait_timeout=CLIENT_TIMEOUT)
    return ZODB.DB(storage)


@pytest.mark.parametrize("client", ["ours", "ZEO"])
def test_empty_database_gets_its_root(server, client):
    db = open_db(server.address, client)
    with db.transaction() as connection:
        connection.root()["answer"] = 42
    db.close()
    fresh = open_db(server.address, client)  # nothing cached
    assert fresh.open().root()["answer"] == 42
    fresh.close()


@pytest.mark.parametrize("client", ["ours", "ZEO"])
def test_missing_object_arrives_as_poskeyerror(server, client):
    db = open_db(server.address, client)
    try:
        storage = db.storage
        with pytest.raises(POSKeyError) as raised:
            storage.loadBefore(p64(123456), p64(2 ** 62))
        assert type(raised.value) is POSKeyError
    finally:
        db.close()


def test_undo_through_zeo(tmp_path, database):
    server = start_relstorage_server(str(tmp_path), database, True)
    try:
        db = open_db(server.address)
        with db.transaction() as connection:
            connection.root()["count"] = 1
        with db.transaction() as connection:
            connection.root()["count"] = 2
        undo_id = db.undoLog(0, 1)[0]["id"]
        db.undo(undo_id)
        transaction.commit()
        with db.transaction() as connection:
            assert connection.root()["count"] == 1
        # A second client, cold cache: the server's state, not ours.
        other = open_db(server.address, "ZEO")
        with other.transaction() as connection:
            assert connection.root()["count"] == 1
        other.close()
        db.close()
    finally:
        assert server.stop() == 0, server.log


@pytest.mark.parametrize("shared", ["false", "true"])
def test_blobs_travel(tmp_path, database, shared):
    """RelStorage keeping blobs in PostgreSQL (its blob-dir a cache), or
    in its shared blob directory: a blob uploaded by our client is
    downloaded by ZEO's."""
    options = "  blob-dir %s\n  shared-blob-dir %s" % (tmp_path / "rs",
                                                       shared)
    storages = {"1": "%%import relstorage\n%s" % relstorage_section(
        "1", database, True, options)}
    server = start_configured_server(str(tmp_path), "", storages,
                                     env=server_environment())
    try:
        db = ZODB.DB(ClientStorage(server.address, wait_timeout=10,
                                   blob_dir=str(tmp_path / "ours")))
        with db.transaction() as connection:
            connection.root()["blob"] = blob = Blob()
            with blob.open("w") as blob_file:
                blob_file.write(b"postgres" * 50000)
        db.close()
        db = ZODB.DB(ZEO.client(server.address, wait_timeout=10,
                                blob_dir=str(tmp_path / "theirs")))
        with db.transaction() as connection:
            with connection.root()["blob"].open() as blob_file:
                assert blob_file.read() == b"postgres" * 50000
        db.close()
    finally:
        assert server.stop() == 0, server.log


@pytest.mark.parametrize("hostile", ["committed", "new"])
def test_conflict_resolution_never_runs_a_record(server, tmp_path, hostile):
    """RelStorage resolves conflicts in its own vote code, through the same
    ZODB lookup that zeo restricts (see tests/test_conflict_trust.py).
    Its conformance suite (test_relstorage_conformance) shows that
    legitimate conflicts still resolve.
    """
    marker = tmp_path / "pwned"
    touch = calling_pickle(Global("os", "system"), "touch %s" % marker,
                           "GLOBAL+REDUCE")
    record = class_pickle(*LENGTH) + touch
    with RawClient(server.address) as client:
        client.handshake()
        client.register()
        if hostile == "committed":
            _, outcome = conflict_on(client, record, length(2))
        else:
            _, outcome = conflict_on(client, length(1), record)
        assert_conflict(outcome)
    assert not marker.exists()


def test_size_statistics_reach_the_client(server):
    db = open_db(server.address)
    try:
        with db.transaction() as connection:
            connection.root()["data"] = PersistentMapping(x=1)
        info = db.storage._info
        assert "length" in info and "size" in info
        assert info["size"] >= 0
    finally:
        db.close()


def test_metrics_and_slow_log_on_relstorage(tmp_path, database):
    """Main's operations features keep working on a RelStorage: the
    Prometheus counters and the slow-operation log."""
    options = ("metrics-address 127.0.0.1:%d\nslow-transaction-threshold 0"
               % free_port())
    server = start_relstorage_server(str(tmp_path), database,
                                     zeo_options=options)
    try:
        server.metrics_url = "http://127.0.0.1:%d/metrics" % int(
            server.log.split("metrics on http://127.0.0.1:")[1]
            .split("/")[0])
        db = open_db(server.address)
        for number in range(3):
            with db.transaction() as connection:
                connection.root()["n"] = number
        db.close()
        # The root's creation and three changes.
        assert storage_value(scrape(server), "zeo_commits_total") == 4
        wait_until(lambda: server.log.count("slow transaction (committed)")
                   == 4, "four slow-transaction lines")
    finally:
        assert server.stop() == 0, server.log


def test_missing_relstorage_is_a_one_line_error(tmp_path):
    path = write_config(str(tmp_path), "address 127.0.0.1:0",
                        relstorage_config("host=127.0.0.1 dbname=none"))
    # relstorage made unimportable in the server process only.
    code = ("import sys; sys.modules['relstorage'] = None; "
            "from zeo.runzeo import main; sys.exit(main(['-C', %r]))" % path)
    result = subprocess.run([sys.executable, "-c", code],
                            env=server_environment(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'zeo-threaded[relstorage]'" in lines[0]
