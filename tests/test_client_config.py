"""The `<clientstorage>` section: ZConfig round trips and clear errors."""

import os

import pytest
import transaction
import ZConfig
import ZODB.config
import ZODB.interfaces
import ZODB.POSException
from ZODB.utils import z64

import zeo
from server_process import free_port
from zeo.Exceptions import ClientStorageError

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def served():
    """An in-process server on a MappingStorage: its (host, port)."""
    address, stop = zeo.server()
    yield address
    stop()


def client_config(body):
    return "%%import zeo\n<clientstorage>\n%s\n</clientstorage>\n" % body


def test_storage_from_string_round_trip(served):
    dead = free_port()
    storage = ZODB.config.storageFromString(client_config("""
        server 127.0.0.1:%d
        server 127.0.0.1:%d
        storage 1
        name configured
        cache-size 1MB
        min-disconnect-poll 0.5
        max-disconnect-poll 2
        heartbeat-timeout 7.5
        wait-timeout 10
        server-sync true
        client-label from-config
        busy-poll 50
    """ % (dead, served[1])))
    try:
        assert type(storage).__module__ == "zeo.ClientStorage"
        assert storage._link.busy_poll == 50
        assert storage._link.heartbeat_timeout == 7.5
        assert (storage._link.retry.minimum,
                storage._link.retry.maximum) == (0.5, 2)
        assert storage.is_connected()
        assert storage.getName() == "configured"
        assert not storage.isReadOnly()
        oid = storage.new_oid()
        txn = ZODB.Connection.TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, z64, b"configured", '', txn)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
        assert storage.load(oid) == (b"configured", tid)
    finally:
        storage.close()


def test_database_from_string_and_read_only(served):
    database = ZODB.config.databaseFromString(
        "%%import zeo\n<zodb>\n<clientstorage>\nserver 127.0.0.1:%d\n"
        "</clientstorage>\n</zodb>\n" % served[1])
    try:
        connection = database.open()
        connection.root()["key"] = "value"
        transaction.commit()
        connection.close()
    finally:
        database.close()
    storage = ZODB.config.storageFromString(client_config(
        "server 127.0.0.1:%d\nread-only true" % served[1]))
    try:
        assert storage.isReadOnly()
        assert storage.lastTransaction() != z64
    finally:
        storage.close()


def test_example_client_conf_parses():
    schema = ZODB.config.getDbSchema()
    path = os.path.join(REPO_ROOT, "conf", "client.conf")
    config, _handler = ZConfig.loadConfigFile(schema, open(path))
    (database,) = config.database
    section = database.config.storage.config
    assert [server.address for server in section.server] == [
        ("127.0.0.1", 8090)]
    assert section.cache_size == 20 * 2 ** 20
    assert section.client_label == "example-client"
    assert section.wait_timeout == 30
    assert section.read_only_fallback is False


@pytest.mark.parametrize("body, message", [
    ("storage 1", "server"),
    ("server 127.0.0.1:1\nread-only maybe", "boolean"),
    ("server 127.0.0.1:1\ncache-size lots", "'lots' (line 4)"),
    ("server 127.0.0.1:1\ncolour blue", "colour"),
    ("server 127.0.0.1:1\nread-only true\nread-only-fallback true",
     "read-only-fallback"),
    ("server 127.0.0.1:1\nmin-disconnect-poll 10\nmax-disconnect-poll 5",
     "max-disconnect-poll"),
    ("server 127.0.0.1:1\nbusy-poll -1", "busy-poll"),
    ("server 127.0.0.1:1\nheartbeat-timeout -1", "heartbeat-timeout"),
    ("server 127.0.0.1:1\nheartbeat-timeout soon", "'soon'"),
])
def test_bad_configuration_is_reported_clearly(body, message):
    with pytest.raises(ZConfig.ConfigurationError) as caught:
        ZODB.config.storageFromString(client_config(body))
    assert message in str(caught.value)


def test_blob_dir_makes_a_blob_storage_that_needs_a_blob_server(
        served, tmp_path):
    storage = ZODB.config.storageFromString(client_config(
        "server 127.0.0.1:%d\nblob-dir %s" % (served[1], tmp_path)))
    try:
        assert ZODB.interfaces.IBlobStorage.providedBy(storage)
        # A MappingStorage has no blobs: the server does not announce
        # IBlobStorage, so blob operations are refused, clearly.
        with pytest.raises(ZODB.POSException.Unsupported,
                           match="does not support blobs"):
            storage.loadBlob(z64, z64)
    finally:
        storage.close()


@pytest.mark.parametrize("argument", ["busy_poll", "heartbeat_timeout"])
def test_negative_argument_is_refused(argument):
    with pytest.raises(ClientStorageError, match=argument):
        zeo.ClientStorage.ClientStorage(("127.0.0.1", 1), wait=False,
                                        **{argument: -5})


def test_heartbeat_timeout_zero_turns_the_check_off():
    storage = zeo.ClientStorage.ClientStorage(
        ("127.0.0.1", 1), wait=False, heartbeat_timeout=0)
    try:
        assert storage._link.heartbeat_timeout is None
    finally:
        storage.close()


def test_unreachable_server_fails_after_wait_timeout():
    with pytest.raises(zeo.Exceptions.ClientDisconnected):
        ZODB.config.storageFromString(client_config(
            "server 127.0.0.1:%d\nwait-timeout 1\nmin-disconnect-poll 1"
            % free_port()))
