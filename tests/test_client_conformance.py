"""ZODB's storage conformance suites, run through OUR ClientStorage.

`self._storage` is a `zeo.ClientStorage.ClientStorage` connected to a real
server subprocess: ours (``python -m zeo.runzeo``) in one class, the real
ZEO (``python -m ZEO.runzeo``) in the other, so every storage call of
ZODB's mixins crosses the wire protocol in both pairings.

Starting a server per test would dominate the run time, so each class
shares a pool of server processes that serve many FileStorages; every test
gets a storage of its own, fresh and empty.

Not composed: ZODB's MVCCMappingStorage tests, which exercise storages
that implement IMVCCStorage themselves (ClientStorage is wrapped by ZODB's
MVCCAdapter instead); its MVCC behaviour is tested in
test_client_concurrency.py.
"""

import os
import unittest

import pytest
import ZODB
import ZODB.tests.util
from ZODB.tests import PackableStorage
from ZODB.tests import RecoveryStorage
from ZODB.tests import testZODB

from conftest import CLIENT_TIMEOUT, STORAGE_CONFORMANCE_MIXINS
from conftest import filestorage_section, server_environment
from server_process import (OURS, THEIRS, start_configured_server, stop_all,
                            trusting_zodb_test_classes)
from zeo.ClientStorage import ClientStorage

pytestmark = pytest.mark.timeout(120)

#: Storages served by one pooled server process.
STORAGES_PER_SERVER = 100


class StoragePool:
    """Fresh storages on shared server processes of one implementation."""

    def __init__(self, impl, directory):
        self.impl = impl
        self.directory = directory
        self.servers = []
        self._free = []

    def take(self):
        """A `(server, storage_name)` nobody has used yet."""
        if not self._free:
            self._start_server()
        return self._free.pop()

    def _start_server(self):
        directory = os.path.join(self.directory, "server%d"
                                 % len(self.servers))
        os.mkdir(directory)
        names = ["s%d" % number for number in range(STORAGES_PER_SERVER)]
        storages = {name: filestorage_section(
            name, os.path.join(directory, "%s.fs" % name)) for name in names}
        server = start_configured_server(directory,
                                         trusting_zodb_test_classes(self.impl),
                                         storages,
                                         impl=self.impl,
                                         env=server_environment())
        self.servers.append(server)
        self._free.extend((server, name) for name in reversed(names))

    def stop(self):
        """Stop every server; return their exit statuses."""
        return stop_all(self.servers)


@pytest.fixture(scope="class")
def storage_pool(request, tmp_path_factory):
    pool = StoragePool(request.cls.server_impl,
                       str(tmp_path_factory.mktemp("pool")))
    request.cls.pool = pool
    yield pool
    statuses = pool.stop()
    assert statuses == [0] * len(statuses), "server exit statuses"


class ClientStorageConformance(*STORAGE_CONFORMANCE_MIXINS,
                               RecoveryStorage.RecoveryStorage):
    """The mixins, with `self._storage` a client of a pooled storage (and
    `self._dst`, RecoveryStorage's copy destination, of another)."""

    __test__ = False  # abstract: StorageTestBase is a TestCase already
    server_impl = None  # set by the concrete classes below
    client_options = {}

    def setUp(self):
        super().setUp()
        self._server, self._storage_name = self.pool.take()
        self._storage = self._new_client()
        server, name = self.pool.take()
        self._dst = ClientStorage(server.address, name,
                                  wait_timeout=CLIENT_TIMEOUT)

    def tearDown(self):
        self._dst.close()
        super().tearDown()

    def _new_client(self, **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        options.update(self.client_options)
        return ClientStorage(self._server.address, self._storage_name,
                             **options)

    def _new_storage_client(self):
        """Another client of the same storage, for ZODB's race tests."""
        return self._new_client()

    def open(self, read_only=False):
        """Reopen, as ReadOnlyStorage and PersistentStorage do: a new
        client with an empty cache, so what it reads comes from the
        server."""
        self._storage.close()
        self._storage = self._new_client(read_only=read_only)

    def testPackUndoLog(self):
        # The mixin's time_monotonically_increases fakes time.time() in this
        # process only; the server stamps transactions with its real clock,
        # so the faked pack time would lie after every transaction.  Run
        # the undecorated test with real time instead.
        PackableStorage.PackableUndoStorage.testPackUndoLog.__wrapped__(self)


@pytest.mark.usefixtures("storage_pool")
class TestAgainstOurServer(ClientStorageConformance, unittest.TestCase):
    __test__ = True
    server_impl = OURS


@pytest.mark.usefixtures("storage_pool")
class TestAgainstRealZEOServer(ClientStorageConformance, unittest.TestCase):
    __test__ = True
    server_impl = THEIRS


@pytest.mark.usefixtures("storage_pool")
class TestWithoutCacheAgainstOurServer(ClientStorageConformance,
                                       unittest.TestCase):
    """A cache too small to hold any object: every load crosses the wire,
    so the server's answers, not the cache, must satisfy the suites."""
    __test__ = True
    server_impl = OURS
    client_options = {"cache_size": 1}


class DatabaseTestsThroughClient(testZODB.ZODBTests):
    """ZODB's database-level tests (export/import, savepoints, undo, cache
    resets) with a `ZODB.DB` on our client instead of a local FileStorage."""

    __test__ = False
    server_impl = None

    def setUp(self):
        ZODB.tests.util.TestCase.setUp(self)
        server, name = self.pool.take()
        self._storage = ClientStorage(server.address, name,
                                      wait_timeout=CLIENT_TIMEOUT)
        self._db = ZODB.DB(self._storage)


@pytest.mark.usefixtures("storage_pool")
class TestDatabaseAgainstOurServer(DatabaseTestsThroughClient):
    __test__ = True
    server_impl = OURS


@pytest.mark.usefixtures("storage_pool")
class TestDatabaseAgainstRealZEOServer(DatabaseTestsThroughClient):
    __test__ = True
    server_impl = THEIRS
