"""Shared fixtures: server subprocesses, real ZEO clients, a raw protocol peer.

The server under test is chosen by the ``ZEO_TEST_SERVER`` environment
variable: ``zeo`` (ours, the default) or ``ZEO`` (the real ZEO server, used
to check that a test itself is right).  Tests marked ``zeo_bug`` document a
bug of the real ZEO server (PROTOCOL.md section 15.2) that ours must not
have; against the real ZEO they are expected to fail (strict xfail), so a
test that does not catch the bug is noticed too.
"""

import itertools
import os
import socket
import tempfile
import time

import pytest
import ZODB
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import MTStorage
from ZODB.tests import PackableStorage
from ZODB.tests import PersistentStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import Synchronization
from ZODB.tests import TransactionalUndoStorage

from server_process import OURS
from server_process import THEIRS
from server_process import impl_from_environment
from server_process import start_configured_server
from server_process import stop_all
from zeo import wire

SERVER_IMPL = impl_from_environment()

#: The repository root, so that ``python -m zeo.runzeo`` finds the package
#: even when a test has changed the working directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Upper bound for a ClientStorage to connect, or for a call to answer.
CLIENT_TIMEOUT = 10

#: Upper bound for a client to notice a lost server or to reconnect.
RECONNECT_TIMEOUT = 20

#: ZODB's storage conformance suites, as composed for every client/server
#: pairing (StorageTestBase first: it is the TestCase they extend).
#: BasicStorage brings ZODB's race tests (`ZODB.tests.racetest`), which
#: hammer loads against invalidations from other clients and against
#: disconnections (the bugs that made ZEO drop its threaded server); they
#: need `_new_storage_client`, a second client of the same storage.
STORAGE_CONFORMANCE_MIXINS = (
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    PackableStorage.PackableStorage,
    PackableStorage.PackableUndoStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    HistoryStorage.HistoryStorage,
    RevisionStorage.RevisionStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    PersistentStorage.PersistentStorage,
)


def commit_stores(storage, stores):
    """Commit `(oid, serial, data)` stores in one transaction through the
    storage API; return its tid."""
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    for oid, serial, data in stores:
        storage.store(oid, serial, data, "", txn)
    storage.tpc_vote(txn)
    return storage.tpc_finish(txn)


def commit_one(storage, oid, serial, data):
    """Store one record in its own transaction; return the new tid."""
    return commit_stores(storage, [(oid, serial, data)])


def wait_until(predicate, what, timeout=RECONNECT_TIMEOUT):
    """Poll `predicate` every 50 ms; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out after %ss waiting until %s"
                        % (timeout, what))
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def restored_temporary_directory_and_cwd():
    """Put `tempfile.tempdir` and the working directory back after every
    test.

    ZODB's test set-up points both at a fresh directory, and only its
    tearDown restores them; unittest skips tearDown when setUp fails (a
    client that cannot connect, say), and every later test then made its
    directories inside that one, nested deeper and deeper until paths
    were too long for initdb and Unix sockets: one failed set-up in
    `make test-ft` became 21 failures."""
    tempdir, cwd = tempfile.tempdir, os.getcwd()
    yield
    tempfile.tempdir = tempdir
    os.chdir(cwd)


@pytest.fixture
def clients():
    """Factory opening OUR ClientStorages (``wait_timeout`` CLIENT_TIMEOUT
    unless given); all closed after the test."""
    from zeo.ClientStorage import ClientStorage as OurClientStorage

    def open_(address, **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        return OurClientStorage(address, **options)

    yield from closing_all(open_)


def closing_all(make):
    """The body of a factory fixture: yields `make`, wrapped so that
    everything it made is closed, in order, when the test is over."""
    made = []

    def make_and_remember(*args, **kwargs):
        thing = make(*args, **kwargs)
        made.append(thing)
        return thing

    yield make_and_remember
    for thing in made:
        thing.close()


@pytest.fixture
def make_server(tmp_path):
    """Factory of servers in this process (real sockets on 127.0.0.1, a
    FileStorage each), for tests that reach into the server to pause it
    at a chosen point; keyword arguments go to `StorageServer`."""
    from ZODB.FileStorage import FileStorage

    from zeo.server import StorageServer
    files = (str(tmp_path / ("Data%d.fs" % number))
             for number in itertools.count())

    def make(**options):
        storage = FileStorage(next(files))
        server = StorageServer(("127.0.0.1", 0), {"1": storage}, **options)
        server.start()
        return server

    yield from closing_all(make)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "zeo_bug(reason): the real ZEO server has this bug; "
        "the test is a strict xfail when run against it")


def pytest_collection_modifyitems(config, items):
    if SERVER_IMPL != THEIRS:
        return
    for item in items:
        marker = item.get_closest_marker("zeo_bug")
        if marker is not None:
            item.add_marker(pytest.mark.xfail(
                reason="bug of the real ZEO server: %s" % marker.args[0],
                strict=True))


def server_environment():
    """Environment for server subprocesses: our package importable, and
    the GIL as in this process (`make test-ft` turns it off)."""
    path = os.environ.get("PYTHONPATH")
    environment = {"PYTHONPATH": REPO_ROOT + (os.pathsep + path if path
                                              else "")}
    if "PYTHON_GIL" in os.environ:
        environment["PYTHON_GIL"] = os.environ["PYTHON_GIL"]
    return environment


def filestorage_section(name, path):
    return "<filestorage %s>\n  path %s\n</filestorage>" % (name, path)


def start_test_server(directory, zeo_options="", storage_names=("1",)):
    """Start the server under test on FileStorages in `directory`.

    Returns the `ServerProcess`; its `paths` attribute maps each storage
    name to its Data.fs path.
    """
    paths = {name: os.path.join(directory, "Data-%s.fs" % name)
             for name in storage_names}
    storages = {name: filestorage_section(name, path)
                for name, path in paths.items()}
    server = start_configured_server(
        directory, zeo_options, storages, impl=SERVER_IMPL,
        env=server_environment())
    server.paths = paths
    return server


@pytest.fixture
def start_server(tmp_path):
    """Factory starting servers in the test's temp dir; stops them after.

    Every server must stop cleanly (status 0) on SIGTERM.  Its log is
    printed, so pytest shows it when the test fails.
    """
    servers = []

    def start(zeo_options="", storage_names=("1",)):
        server = start_test_server(str(tmp_path), zeo_options, storage_names)
        servers.append(server)
        return server

    yield start
    statuses = stop_all(servers)
    assert statuses == [0] * len(servers), "server exit statuses"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """The TLS tests' certificates (tests/tls_certificates.py)."""
    from tls_certificates import make_pki
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def tls_servers(tmp_path):
    """Factory starting a server (ours unless `impl` says) with the
    `ssl_section` given, on a FileStorage with blobs in the test's temp
    dir; every server must stop with status 0 after the test."""
    servers = []

    def start(ssl_section, zeo_options="", impl=OURS):
        directory = str(tmp_path / ("server-%d" % len(servers)))
        os.makedirs(directory)
        storage = ("<filestorage 1>\n  path %s\n  blob-dir %s\n"
                   "</filestorage>" % (os.path.join(directory, "Data.fs"),
                                       os.path.join(directory, "blobs")))
        server = start_configured_server(
            directory, "%s\n%s" % (zeo_options, ssl_section), {"1": storage},
            impl=impl, env=server_environment())
        servers.append(server)
        return server

    yield start
    assert stop_all(servers) == [0] * len(servers), "server exit statuses"


@pytest.fixture
def open_client():
    """Factory opening real ZEO ClientStorages; closes them after the test."""

    def open_(server, storage="1", **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        return ClientStorage(server.address, storage, **options)

    yield from closing_all(open_)


@pytest.fixture
def open_db(open_client):
    """Factory opening a ZODB.DB on a real ZEO ClientStorage."""
    yield from closing_all(lambda server, storage="1", **options: ZODB.DB(
        open_client(server, storage, **options)))


class RawServerError(Exception):
    """The server answered a raw call with an error reply."""


class RawClient:
    """A blocking ZEO 5 peer speaking the protocol by hand.

    For scenarios a real client cannot be made to produce, such as a
    client that votes and then goes silent while holding the commit lock.
    """

    def __init__(self, address, timeout=CLIENT_TIMEOUT):
        self.timeout = timeout
        self.socket = socket.create_connection(address, timeout=timeout)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = wire.FrameReader()
        self.codec = wire.PickleCodec()
        self.pending = []
        self.notifications = []
        self.greeting = None
        self._next_msgid = 1

    def _read_frame(self):
        while not self.pending:
            data = self.socket.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def handshake(self, storage="1", read_only=False):
        """Read the greeting, answer Z5, register; return the last tid."""
        self.greeting = self._read_frame()
        self.socket.sendall(wire.frame(wire.PICKLE_PROTOCOL))
        return self.call("register", storage, read_only)

    def send_oneway(self, method, *args):
        payload = self.codec.encode(0, wire.ONEWAY, method, args)
        self.socket.sendall(wire.frame(payload))

    def call(self, method, *args):
        """A two-way call; server one-way messages are kept aside."""
        msgid = self._next_msgid
        self._next_msgid += 1
        payload = self.codec.encode(msgid, wire.CALL, method, args)
        self.socket.sendall(wire.frame(payload))
        while True:
            message = self.codec.decode(self._read_frame())
            if message.name != wire.REPLY_NAME:
                self.notifications.append(message)
            elif message.msgid == msgid:
                if message.flag:
                    raise RawServerError(message.args)
                return message.args

    def wait_closed(self, timeout):
        """Read until the server closes the connection; True if it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.socket.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def close(self):
        self.socket.close()


@pytest.fixture
def raw_client():
    """Factory for `RawClient` connections; closes them after the test."""
    connections = []

    def connect(server):
        connection = RawClient(server.address)
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.close()
