"""ZODB's storage conformance suites, run through the real ZEO client.

`self._storage` is a real ``ZEO.ClientStorage`` connected to the server
under test (a subprocess serving a FileStorage in the test's temp dir), so
every storage API call of ZODB's mixins crosses the wire protocol.
"""

import os
import threading

import pytest
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.tests import PackableStorage

from conftest import CLIENT_TIMEOUT, STORAGE_CONFORMANCE_MIXINS
from conftest import SERVER_IMPL, start_test_server
from server_process import trusting_zodb_test_classes

pytestmark = pytest.mark.timeout(120)


class ZEOClientStorageConformance(*STORAGE_CONFORMANCE_MIXINS):
    """Each test gets its own server process and FileStorage."""

    def setUp(self):
        # Changes into a fresh temp dir, removed again by tearDown.
        super().setUp()
        self._directory = os.getcwd()
        self._server = None
        try:
            self._start_server()
            self._storage = self._new_client()
        except BaseException:
            self.tearDown()  # unittest skips it when setUp fails
            raise

    def _close(self):
        # Called by tearDown before the temp dir is removed.
        super()._close()
        self._stop_server()

    def _start_server(self):
        self._server = start_test_server(
            self._directory, trusting_zodb_test_classes(SERVER_IMPL))

    def _stop_server(self):
        server, self._server = self._server, None
        if server is not None:
            status = server.stop()
            print("---- log of %s server (pid %d) ----\n%s"
                  % (server.impl, server.process.pid, server.log))
            self.assertEqual(status, 0, "server exit status")

    def _new_client(self, **options):
        options.setdefault("wait_timeout", CLIENT_TIMEOUT)
        return ClientStorage(self._server.address, "1", **options)

    def _new_storage_client(self):
        """Another client of the same server, for ZODB's race tests."""
        return self._new_client()

    def open(self, read_only=False):
        """Reopen the storage, as ReadOnlyStorage and PersistentStorage do.

        The server is restarted on the same Data.fs, so what the reopened
        client reads has really been written to the file.
        """
        self._storage.close()
        self._stop_server()
        self._start_server()
        self._storage = self._new_client(read_only=read_only)

    def _do_store_in_separate_thread(self, oid, revid, voted):
        # The mixin's version reuses self._storage, whose client-side commit
        # lock would serialize the two transactions before they reach the
        # server; a second client makes the server arbitrate.
        errors = []

        def store():
            other = self._new_client()
            try:
                meta = TransactionMetaData()
                other.tpc_begin(meta)
                other.store(oid, revid, b"x", "", meta)
                other.tpc_vote(meta)
                other.tpc_finish(meta)
            except Exception as error:
                errors.append(error)
            finally:
                other.close()

        thread = threading.Thread(target=store, name="competing-store",
                                  daemon=True)
        thread.start()
        # If we voted, the competitor waits for our lock: let it get there.
        thread.join(0.1 if voted else CLIENT_TIMEOUT)
        if errors:
            raise errors[0]
        return thread

    def testPackUndoLog(self):
        # The mixin's time_monotonically_increases fakes time.time() in this
        # process only; the server stamps transactions with its real clock,
        # so the faked pack time would lie after every transaction.  Run
        # the undecorated test with real time instead.
        PackableStorage.PackableUndoStorage.testPackUndoLog.__wrapped__(self)
