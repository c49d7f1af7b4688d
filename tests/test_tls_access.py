"""Access by certificate (issue 13, item 3): certificates from the
read-only CA, or whose name matches a read-only pattern, load and iterate
but never write or pack, while a writable certificate commits on the same
server at the same time.  Subjects show in the log and the monitor.
"""

import re
import time

import pytest
import transaction
import ZODB
from ZODB.POSException import ReadOnlyError
from ZODB.utils import p64, z64

from conftest import CLIENT_TIMEOUT
from raw_client import RawClient, RemoteError
from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected

READ_ONLY_SSL = ("read-only-authenticate {pki.read_only_ca}",
                 "read-only-subjects backup-*",
                 "read-only-subjects report?ng")

#: Calls a read-only certificate may not make, sent as two-way calls so
#: that the refusal comes back as an error reply.
REFUSED_CALLS = [
    ("tpc_begin", 1, b"", b"", {}),
    ("storea", p64(1), z64, b"data", 1),
    ("undoa", p64(1), 1),
    ("new_oids", 1),
    ("pack", time.time(), 1),
]


def start_server(pki, tls_servers, zeo_options=""):
    lines = [line.format(pki=pki) for line in READ_ONLY_SSL]
    return tls_servers(pki.server_ssl_section(*lines), zeo_options)


def reader_pairs(pki):
    return {"read-only CA": (pki.client_read_only_ca, "CN=reporter"),
            "read-only name": (pki.client_read_only_name,
                               "CN=backup-nightly")}


@pytest.mark.parametrize("case", ["read-only CA", "read-only name"])
def test_read_only_certificates_read_while_a_writer_commits(
        pki, tls_servers, case):
    server = start_server(pki, tls_servers)
    pair, subject = reader_pairs(pki)[case]
    writer_db = ZODB.DB(ClientStorage(
        server.address, ssl=pki.client_context(), wait_timeout=CLIENT_TIMEOUT))
    reader_storage = ClientStorage(
        server.address, ssl=pki.client_context(pair), read_only=True,
        server_sync=True, wait_timeout=CLIENT_TIMEOUT)
    reader_db = ZODB.DB(reader_storage)
    try:
        writer = writer_db.open()
        reader_txn = transaction.TransactionManager()
        reader = reader_db.open(reader_txn)
        for value in range(3):  # both connected at the same time
            writer.root()["value"] = value
            transaction.commit()
            reader_txn.begin()
            assert reader.root()["value"] == value
        assert len(list(reader_storage.iterator())) == 4  # with the root's
        reader.root()["value"] = "refused"
        with pytest.raises(ReadOnlyError):
            reader_txn.commit()
        reader_txn.abort()
    finally:
        writer_db.close()
        reader_db.close()
    assert "[O=zeo tests,%s]) registered on storage '1' (read-only)" \
        % subject in server.log
    assert "[O=zeo tests,CN=writer]) registered on storage '1'\n" \
        in server.log


@pytest.mark.parametrize("case", ["read-only CA", "read-only name"])
def test_the_server_refuses_writes_of_read_only_certificates(
        pki, tls_servers, case):
    """The refusals come from the server, whatever the client believes:
    a writable register, and every writing call."""
    server = start_server(pki, tls_servers)
    pair, _subject = reader_pairs(pki)[case]
    with pytest.raises(ClientDisconnected) as refused:
        ClientStorage(server.address, ssl=pki.client_context(pair),
                      wait_timeout=2, min_disconnect_poll=1)
    assert "ReadOnlyError" in str(refused.value)
    client = RawClient(server.address, ssl_context=pki.client_context(pair))
    try:
        client.handshake()
        client.register("1", True)
        for call in REFUSED_CALLS:
            with pytest.raises(RemoteError) as error:
                client.call(*call)
            assert error.value.class_name == "ZODB.POSException.ReadOnlyError"
        assert client.call("lastTransaction") == z64
    finally:
        client.close()


def test_a_writable_certificate_may_pack(pki, tls_servers):
    server = start_server(pki, tls_servers)
    client = RawClient(server.address, ssl_context=pki.client_context())
    try:
        client.handshake()
        client.register("1", False)
        assert client.call("pack", time.time(), 1) is None
    finally:
        client.close()


def test_the_monitor_lists_certificate_subjects(pki, tls_servers):
    from test_monitor import MONITOR_LINE, read_report
    server = start_server(pki, tls_servers, "monitor-address 127.0.0.1:0")
    host, _, port = MONITOR_LINE.search(server.log).group(1).rpartition(":")
    reader = ClientStorage(server.address,
                           ssl=pki.client_context(pki.client_read_only_ca),
                           read_only=True, wait_timeout=CLIENT_TIMEOUT)
    writer = ClientStorage(server.address, ssl=pki.client_context(),
                           wait_timeout=CLIENT_TIMEOUT)
    try:
        report = read_report((host, int(port)))
    finally:
        reader.close()
        writer.close()
    clients = re.findall(r"^Client: (.*)$", report, re.MULTILINE)
    assert len(clients) == 2
    assert any(re.match(r"127\.0\.0\.1:\d+ \[O=zeo tests,CN=reporter\], "
                        r"read-only certificate, ", line) for line in clients)
    assert any(re.match(r"127\.0\.0\.1:\d+ \[O=zeo tests,CN=writer\], "
                        r"connected since", line) for line in clients)
