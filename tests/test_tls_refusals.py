"""TLS refusals (issue 13, item 2): each bad certificate is refused with
the expected error on the expected side, none hangs, and clients that
never start the handshake cost the others nothing.
"""

import socket
import time

import pytest
import transaction
import ZODB

from conftest import CLIENT_TIMEOUT, wait_until
from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected

#: The handshake timeout of the silent-connection tests (seconds): the
#: bound within which a normal client's work must be done, long enough
#: for a loaded test machine.
HANDSHAKE_TIMEOUT = 10
#: Silent connections opened at once.
SILENT_CLIENTS = 200


def refused_client(server, context, **options):
    """Open a ClientStorage that must fail; its ClientDisconnected text
    (which carries the last connection error)."""
    with pytest.raises(ClientDisconnected) as refused:
        ClientStorage(server.address, ssl=context, wait_timeout=3,
                      min_disconnect_poll=1, max_disconnect_poll=1,
                      **options)
    return str(refused.value)


@pytest.mark.parametrize("case, client_says, server_says", [
    ("expired", "the peer refused the handshake: certificate expired",
     "certificate refused: certificate has expired"),
    ("other CA", "the peer refused the handshake: unknown ca",
     "certificate refused: unable to get local issuer certificate"),
    ("no certificate", "the peer refused the handshake: certificate "
     "required", "no client certificate"),
])
def test_bad_client_certificates_are_refused_by_the_server(
        pki, tls_servers, case, client_says, server_says):
    server = tls_servers(pki.server_ssl_section())
    pair = {"expired": pki.client_expired, "other CA": pki.client_other_ca,
            "no certificate": False}[case]
    message = refused_client(server, pki.client_context(pair))
    assert "TLS: " + client_says in message
    wait_until(lambda: "TLS handshake failed: " + server_says in server.log,
               "the server logs why")
    assert "connected" not in server.log.split("listening on")[1]


def test_a_server_certificate_for_another_host_is_refused_by_the_client(
        pki, tls_servers):
    server = tls_servers(pki.server_ssl_section(
        server=pki.server_other_host))
    message = refused_client(server, pki.client_context())
    assert "TLS handshake failed: certificate refused: IP address " \
        "mismatch, certificate is not valid for '127.0.0.1'" in message
    wait_until(lambda: "TLS handshake failed: the peer refused the "
               "handshake: bad certificate" in server.log,
               "the server logs the client's refusal")
    # The same server is fine for a client told the name to expect.
    storage = ClientStorage(server.address, ssl=pki.client_context(),
                            ssl_server_hostname="db.example.org",
                            wait_timeout=CLIENT_TIMEOUT)
    try:
        assert storage.is_connected()
    finally:
        storage.close()


def silent_connections(address, count):
    """`count` TCP connections that never send a byte."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
        sockets.append(sock)
    return sockets


def is_open(sock):
    """Whether the server still holds `sock` open (nothing to read, no
    end of stream)."""
    sock.settimeout(0)  # with a timeout, recv would wait for data
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def closed_by_server(sock, timeout):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("silent_count", [1, SILENT_CLIENTS])
def test_silent_connections_delay_nobody_and_are_closed(
        pki, tls_servers, tmp_path, silent_count):
    """While `silent_count` connections sit before their handshake, a TLS
    client connects, commits and loads: it finishes while all of them
    are still open (so it never waited for their timeout), within the
    stated bound of one handshake timeout; then each silent one is closed
    after the timeout."""
    server = tls_servers(pki.server_ssl_section(
        "handshake-timeout %d" % HANDSHAKE_TIMEOUT))
    silent = silent_connections(server.address, silent_count)
    try:
        started = time.monotonic()
        db = ZODB.DB(ClientStorage(server.address, ssl=pki.client_context(),
                                   wait_timeout=CLIENT_TIMEOUT))
        try:
            connection = db.open()
            connection.root()["counter"] = 0
            transaction.commit()
            for count in range(1, 21):
                connection.root()["counter"] = count
                transaction.commit()
                connection.cacheMinimize()
                assert connection.root()["counter"] == count
            connection.close()
        finally:
            db.close()
        elapsed = time.monotonic() - started
        assert all(is_open(sock) for sock in silent)
        assert elapsed < HANDSHAKE_TIMEOUT
        for sock in silent:
            assert closed_by_server(sock, HANDSHAKE_TIMEOUT + CLIENT_TIMEOUT)
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: "TLS handshake failed: no TLS handshake within %d "
               "seconds" % HANDSHAKE_TIMEOUT in server.log,
               "the server logs the timeouts")
    # The log is rate limited: a scan does not flood it.
    assert server.log.count("TLS handshake failed") <= 20
