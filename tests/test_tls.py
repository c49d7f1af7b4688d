"""TLS (issue 13, items 1 and 2): round trips between our client, our
server and the real ZEO on both sides, and mismatched peers.

The certificates come from the `pki` fixture (tests/tls_certificates.py);
servers are real processes started from a configuration file with an
``<ssl>`` section, the way users start them.
"""

import logging
import os
import subprocess
import sys

import pytest
import transaction
import ZConfig
import ZODB
import ZODB.config
from ZEO.ClientStorage import ClientStorage as TheirClientStorage
from ZODB.blob import Blob

from conftest import CLIENT_TIMEOUT, REPO_ROOT, server_environment
from conftest import wait_until
from raw_client import RawClient
from server_process import OURS, THEIRS, write_config
from zeo import tls
from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected

#: A blob spread over many chunks and records.
BLOB_SIZE = 3 * 1024 * 1024 + 17


def open_db(make_storage, tmp_path, name):
    """A DB whose transactions start with a round trip (server_sync), so
    that it sees the other client's last commit."""
    return ZODB.DB(make_storage(blob_dir=str(tmp_path / ("blobs-" + name)),
                                server_sync=True))


def check_round_trips(make_storage, tmp_path):
    """Commit an object and a blob with one client, load them with
    another, and see the first's next commit reach the second."""
    data = os.urandom(BLOB_SIZE)
    writer_db = open_db(make_storage, tmp_path, "writer")
    reader_db = open_db(make_storage, tmp_path, "reader")
    try:
        writer = writer_db.open()
        writer.root()["value"] = 1
        writer.root()["blob"] = Blob(data)
        transaction.commit()
        reader_txn = transaction.TransactionManager()
        reader = reader_db.open(reader_txn)
        reader_txn.begin()  # a round trip: the commit is seen
        assert reader.root()["value"] == 1
        with reader.root()["blob"].open() as blob:
            assert blob.read() == data
        writer.root()["value"] = 2
        transaction.commit()
        reader_txn.begin()
        assert reader.root()["value"] == 2
        writer.close()
        reader.close()
    finally:
        writer_db.close()
        reader_db.close()


def our_storage(server, context, **options):
    options.setdefault("wait_timeout", CLIENT_TIMEOUT)
    return ClientStorage(server.address, ssl=context, **options)


def their_storage(server, context, **options):
    options.setdefault("wait_timeout", CLIENT_TIMEOUT)
    return TheirClientStorage(server.address, ssl=context, **options)


@pytest.mark.parametrize("client, server_impl", [
    (our_storage, OURS), (their_storage, OURS), (our_storage, THEIRS)],
    ids=["ours-ours", "zeo-client-ours", "ours-zeo-server"])
def test_round_trips_over_tls(pki, tls_servers, tmp_path, client,
                              server_impl):
    server = tls_servers(pki.server_ssl_section(), impl=server_impl)
    check_round_trips(
        lambda **options: client(server, pki.client_context(), **options),
        tmp_path)
    if server_impl == OURS:
        assert "(TLS)" in server.log
        assert "[O=zeo tests,CN=writer]) registered" in server.log


def test_without_authenticate_any_client_gets_tls(pki, tls_servers,
                                                  tmp_path):
    """Our decision (README): a server <ssl> without authenticate asks
    for no client certificate."""
    server = tls_servers(pki.server_ssl_section(authenticate=False))
    check_round_trips(
        lambda **options: our_storage(
            server, pki.client_context(pair=False), **options), tmp_path)
    assert "CN=" not in server.log


def test_client_configuration_section(pki, tls_servers, tmp_path):
    server = tls_servers(pki.server_ssl_section())
    certificate, key = pki.client
    config = """
        %%import zeo
        <zodb>
          <clientstorage>
            server %s:%d
            wait-timeout %d
            <ssl>
              certificate %s
              key %s
              authenticate %s
              server-hostname localhost
            </ssl>
          </clientstorage>
        </zodb>
        """ % (server.address + (CLIENT_TIMEOUT, certificate, key, pki.ca))
    db = ZODB.config.databaseFromString(config)
    try:
        connection = db.open()
        connection.root()["configured"] = True
        transaction.commit()
        connection.close()
    finally:
        db.close()
    assert "CN=writer]) registered" in server.log


@pytest.mark.parametrize("ssl_lines, message", [
    ("certificate /nonexistent/cert.pem",
     "clientstorage: ssl: certificate /nonexistent/cert.pem: no such file"),
    ("handshake-timeout 1",
     "clientstorage: ssl: handshake-timeout is not a key for a client"),
])
def test_client_configuration_errors(ssl_lines, message):
    config = ("%%import zeo\n<zodb>\n<clientstorage>\nserver 127.0.0.1:1\n"
              "<ssl>\n%s\n</ssl>\n</clientstorage>\n</zodb>\n" % ssl_lines)
    with pytest.raises(ZConfig.ConfigurationError) as error:
        ZODB.config.databaseFromString(config)
    assert str(error.value).startswith(message)  # ZConfig adds the line


def run_server_with(directory, ssl_section):
    """Start our server with `ssl_section`; its exit status and stderr."""
    path = write_config(directory, "address 127.0.0.1:0\n" + ssl_section)
    environment = dict(os.environ, **server_environment())
    finished = subprocess.run(
        [sys.executable, "-m", "zeo.runzeo", "-C", path], cwd=REPO_ROOT,
        env=environment, capture_output=True, text=True, timeout=60)
    return finished.returncode, finished.stderr


def bad_file(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w") as file:
        file.write(text)
    return path


@pytest.mark.parametrize("case", [
    "missing certificate", "key of another certificate", "not a key",
    "missing CA", "client key", "subjects without CA", "same CA twice",
    "DYNAMIC",
])
def test_server_configuration_errors_are_one_line(pki, tmp_path, case):
    directory = str(tmp_path)
    certificate, key = pki.server
    garbage = bad_file(directory, "garbage.pem", "not a key\n")
    lines, expected = {
        "missing certificate": (
            ["certificate %s/none.pem" % directory, "key %s" % key],
            "Error: ssl: certificate %s/none.pem: no such file" % directory),
        "key of another certificate": (
            ["certificate %s" % certificate, "key %s" % pki.client[1]],
            "Error: ssl: cannot use certificate %s with key %s"
            % (certificate, pki.client[1])),
        "not a key": (
            ["certificate %s" % certificate, "key %s" % garbage],
            "Error: ssl: cannot use certificate %s with key %s"
            % (certificate, garbage)),
        "missing CA": (
            ["certificate %s" % certificate, "key %s" % key,
             "authenticate %s/ca.pem" % directory],
            "Error: ssl: CA file %s/ca.pem: no such file" % directory),
        "client key": (
            ["certificate %s" % certificate, "key %s" % key,
             "server-hostname localhost"],
            "Error: ssl: server-hostname is not a key for a server"),
        "subjects without CA": (
            ["certificate %s" % certificate, "key %s" % key,
             "read-only-subjects backup-*"],
            "Error: ssl: read-only-subjects needs client certificates"),
        "same CA twice": (
            ["certificate %s" % certificate, "key %s" % key,
             "authenticate %s" % pki.ca, "read-only-authenticate %s"
             % pki.ca],
            "Error: ssl: CA O=zeo tests,CN=zeo-test is in both "
            "authenticate and read-only-authenticate"),
        "DYNAMIC": (
            ["certificate %s" % certificate, "key %s" % key,
             "authenticate DYNAMIC"],
            "Error: ssl: authenticate DYNAMIC (ZEO's hook for loading CAs "
            "in code) is not supported"),
    }[case]
    status, stderr = run_server_with(
        directory, "<ssl>\n  %s\n</ssl>" % "\n  ".join(lines))
    assert status == 2
    error_lines = [line for line in stderr.splitlines()
                   if line.startswith("Error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(expected)
    assert "Traceback" not in stderr


def test_a_plain_client_is_closed_after_the_handshake_timeout(
        pki, tls_servers):
    server = tls_servers(pki.server_ssl_section("handshake-timeout 1"))
    plain = RawClient(server.address)
    try:
        # A ZEO client waits for the server's greeting, which never comes.
        assert plain.is_closed(timeout=CLIENT_TIMEOUT)
    finally:
        plain.close()
    with pytest.raises(ClientDisconnected) as refused:
        ClientStorage(server.address, wait_timeout=3)
    assert "before its greeting" in str(refused.value)
    assert "TLS handshake failed: no TLS handshake within 1 seconds" \
        in server.log


def test_a_plain_client_that_talks_is_refused_at_once(pki, tls_servers):
    server = tls_servers(pki.server_ssl_section("handshake-timeout 60"))
    plain = RawClient(server.address)
    try:
        plain.send_raw_bytes(b"\x00\x00\x00\x02Z5")
        assert plain.is_closed(timeout=CLIENT_TIMEOUT)
    finally:
        plain.close()
    # The server logs it after closing: the line may come a little later.
    wait_until(lambda: "TLS handshake failed: the peer does not speak TLS"
               in server.log, "the handshake failure line")


def test_a_tls_client_is_refused_by_a_plain_server(pki, tls_servers):
    server = tls_servers("")
    with pytest.raises(ClientDisconnected) as refused:
        our_storage(server, pki.client_context(), wait_timeout=3)
    assert "TLS handshake failed: the peer does not speak TLS" \
        in str(refused.value)
    assert "a TLS client on a server without <ssl> (frame of" in server.log


def test_password_function_unlocks_the_key(pki, tls_servers, tmp_path):
    certificate, key = pki.server_encrypted
    server = tls_servers(
        "<ssl>\n  certificate %s\n  key %s\n  authenticate %s\n"
        "  password-function tests.tls_certificates.password\n</ssl>"
        % (certificate, key, pki.ca))
    check_round_trips(
        lambda **options: our_storage(server, pki.client_context(),
                                      **options), tmp_path)


@pytest.mark.parametrize("function, message", [
    ("tls_certificates.wrong_password", "ssl: cannot use certificate"),
    ("tls_certificates.nothing", "ssl: password-function "
     "tls_certificates.nothing cannot be imported"),
])
def test_a_bad_password_function_is_a_configuration_error(
        pki, function, message):
    certificate, key = pki.server_encrypted
    with pytest.raises(tls.TLSConfigError) as error:
        tls.server_context(certificate, key, function)
    assert str(error.value).startswith(message)


def test_handshake_failures_are_rate_limited(caplog):
    now = [0.0]
    failures = tls.FailureLog(clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="zeo.tls"):
        for number in range(failures.BURST + 5):
            failures.failed("10.0.0.%d:1" % number, "no client certificate")
        failures.hung_up("10.0.0.99:1")
        now[0] += failures.PERIOD
        failures.failed("10.0.0.100:1", "no client certificate")
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == failures.BURST + 1
    assert warnings[0] == ("(10.0.0.0:1) TLS handshake failed: no client "
                           "certificate")
    assert warnings[-1] == ("(10.0.0.100:1) TLS handshake failed: no client "
                            "certificate (5 more failures not logged)")
    assert [record.getMessage() for record in caplog.records
            if record.levelno == logging.DEBUG] == [
        "(10.0.0.99:1) closed before the TLS handshake"]
