"""ZODB's storage conformance suites through our client, our server and
RelStorage on PostgreSQL, history-preserving and history-free; and the
history-preserving suites through the real ZEO client.

As for FileStorage (test_client_conformance.py), server processes are
pooled: each serves many RelStorages, each on a database of its own,
copied from a template that already holds RelStorage's schema, so every
test gets a fresh, empty storage without a server start.

History-free RelStorage keeps one revision per object: the suites about
undo, history, revisions, iteration and packing old revisions do not
apply to it, as RelStorage's own history-free tests leave them out.

A few tests assert FileStorage's behaviour where RelStorage's differs;
RelStorage's own suite (relstorage/tests/hptestbase.py) replaces or
skips them too, and they are left out here, each with its reason in
`NOT_RELSTORAGE`.  Two more follow from serving a history-free storage to
ZEO clients, whose reads name the tid of their view: once an object has
changed, its older state is gone, and such a read is a ReadConflictError
(the application retries) where ZODB's race tests expect the old state.
"""

import os
import unittest

import pytest
from ZEO.ClientStorage import ClientStorage as ZEOClientStorage
from ZODB.tests import (BasicStorage, ConflictResolution, MTStorage,
                        PersistentStorage, ReadOnlyStorage, StorageTestBase,
                        Synchronization, TransactionalUndoStorage)

from conftest import CLIENT_TIMEOUT
from conftest import server_environment
from postgres_cluster import relstorage_section
from relstorage_fixtures import postgres
from server_process import (OURS, start_configured_server, stop_all,
                            trusting_zodb_test_classes)
from test_client_conformance import ClientStorageConformance
from zeo.ClientStorage import ClientStorage as OurClientStorage

pytestmark = pytest.mark.timeout(120)

__all__ = ["postgres"]  # a fixture, used by name

#: Storages (databases) served by one pooled server process.
STORAGES_PER_SERVER = 20

#: Seconds between polls: one server writes to each database here, so
#: the poller has nothing to find; it need not run often.
POOL_POLL_INTERVAL = 1.0

HISTORY_FREE_MIXINS = (
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    PersistentStorage.PersistentStorage,
)


#: Tests of the suites whose expectations RelStorage does not meet, even
#: when used directly: test name -> reason.
NOT_RELSTORAGE = {
    "testUndoConflictResolution":
        "RelStorage does not resolve conflicts while undoing",
    "testUndoMultipleConflictResolution":
        "RelStorage does not resolve conflicts while undoing",
    "testUndoMultipleConflictResolutionReversed":
        "RelStorage does not resolve conflicts while undoing",
    "testTransactionalUndoIterator":
        "RelStorage's iterator gives undo records no back pointer "
        "(RelStorage replaces this test)",
    "testPackAllRevisions": "RelStorage packs to its own last transaction "
                            "(RelStorage replaces this test)",
    "testPackJustOldRevisions": "as testPackAllRevisions",
    "testPackOnlyOneObject": "as testPackAllRevisions",
    "testPackWithGCOnDestinationAfterRestore": "as testPackAllRevisions",
}

#: Tests that cannot pass through any ZEO server on history-free
#: RelStorage (see the module docstring).
NOT_HISTORY_FREE = {
    "test_race_load_vs_external_invalidate":
        "reads of a state that history-free storage no longer has",
    "test_race_external_invalidate_vs_disconnect":
        "reads of a state that history-free storage no longer has",
}


def leaving_out(names):
    """Class decorator: the named inherited tests are not collected."""
    def leave_out(cls):
        for name in names:
            setattr(cls, name, None)
        return cls
    return leave_out


class RelStoragePool:
    """Fresh RelStorages on shared server processes of ours."""

    def __init__(self, cluster, keep_history, directory):
        self.cluster = cluster
        self.keep_history = keep_history
        self.directory = directory
        self.servers = []
        self._running = []  # started and not yet stopped by us
        self.statuses = []
        self._free = []

    def take(self):
        """A `(server, storage_name)` nobody has used yet."""
        if not self._free:
            self._retire_old_servers()
            self._start_server()
        return self._free.pop()

    def _retire_old_servers(self):
        """Stop servers whose storages were all handed out before the
        newest server's: their tests are over (a test takes at most two
        storages, so only the newest server may still serve the running
        one).  Each RelStorage holds database connections.  A server that
        ended by itself meanwhile is counted with its own status (and its
        log printed), so a crash is reported, not skipped."""
        self.statuses += stop_all(self._running[:-1])
        del self._running[:-1]

    def _start_server(self):
        directory = os.path.join(self.directory, "server%d"
                                 % len(self.servers))
        os.mkdir(directory)
        template = self.cluster.relstorage_template(self.keep_history)
        # The %import line first: write_config keeps the order.
        storages = {"import": "%import relstorage"}
        for number in range(STORAGES_PER_SERVER):
            # Not dropped after: the cluster goes as a whole.
            database = self.cluster.create_database(template)
            name = "s%d" % number
            storages[name] = relstorage_section(
                name, self.cluster.dsn(database), self.keep_history)
        server = start_configured_server(directory, "poll-interval %s\n%s"
                                         % (POOL_POLL_INTERVAL,
                                            trusting_zodb_test_classes(OURS)),
                                         storages,
                                         impl=OURS, env=server_environment())
        self.servers.append(server)
        self._running.append(server)
        self._free.extend((server, name) for name in reversed(
            [name for name in storages if name != "import"]))

    def stop(self):
        """Stop every server; return their exit statuses."""
        return self.statuses + stop_all(self._running)


def _pool_fixture(keep_history):
    @pytest.fixture(scope="class")
    def pool(request, postgres, tmp_path_factory):
        made = RelStoragePool(postgres, keep_history,
                              str(tmp_path_factory.mktemp("relstorage")))
        request.cls.pool = made
        yield made
        statuses = made.stop()
        assert statuses == [0] * len(statuses), "server exit statuses"
    return pool


history_preserving_pool = _pool_fixture(True)
history_free_pool = _pool_fixture(False)


@leaving_out(NOT_RELSTORAGE)
@pytest.mark.usefixtures("history_preserving_pool")
class TestHistoryPreservingThroughOurClient(ClientStorageConformance,
                                            unittest.TestCase):
    __test__ = True
    server_impl = OURS


class PooledStorage:
    """`self._storage`: a client of a fresh pooled storage (the set-up of
    `ClientStorageConformance` without RecoveryStorage's second one)."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._server, self._storage_name = self.pool.take()
        self._storage = self._new_client()

    def _new_client(self, **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        return OurClientStorage(self._server.address, self._storage_name,
                                **options)

    def _new_storage_client(self):
        return self._new_client()

    def open(self, read_only=False):
        self._storage.close()
        self._storage = self._new_client(read_only=read_only)


class HistoryFreeConformance(PooledStorage, *HISTORY_FREE_MIXINS):
    """The suites that apply to a storage without history."""

    __test__ = False


@leaving_out(list(NOT_RELSTORAGE) + list(NOT_HISTORY_FREE))
@pytest.mark.usefixtures("history_free_pool")
class TestHistoryFreeThroughOurClient(HistoryFreeConformance,
                                      unittest.TestCase):
    __test__ = True


#: ZODB's race tests (BasicStorage), 10-20 s each: they run through our
#: client above; through ZEO's they would only add minutes.
RACE_TESTS = ["test_race_loadopen_vs_local_invalidate",
              "test_race_load_vs_external_invalidate",
              "test_race_external_invalidate_vs_disconnect"]


class ThroughZEOClient(PooledStorage,
                       StorageTestBase.StorageTestBase,
                       BasicStorage.BasicStorage,
                       Synchronization.SynchronizedStorage,
                       ConflictResolution.ConflictResolvingStorage,
                       TransactionalUndoStorage.TransactionalUndoStorage,
                       PersistentStorage.PersistentStorage):
    """The real ZEO client instead of ours, with the suites about what
    ZEO 6.2 got wrong on RelStorage: root creation and POSKeyError
    (BasicStorage), undo, conflicts.  (The longer ones run through our
    client above.)"""

    __test__ = False

    def _new_client(self, **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        return ZEOClientStorage(self._server.address, self._storage_name,
                                **options)


# testNotUndoable: RelStorage raises a plain UndoError where FileStorage
# raises MultipleUndoErrors; ZEO's client rebuilds the latter from an
# error reply but not the former (it has no factory for it), so the test
# sees ServerException.  Our client rebuilds both (the class above).
@leaving_out(list(NOT_RELSTORAGE) + RACE_TESTS + ["testNotUndoable"])
@pytest.mark.usefixtures("history_preserving_pool")
class TestHistoryPreservingThroughZEOClient(ThroughZEOClient,
                                            unittest.TestCase):
    __test__ = True
