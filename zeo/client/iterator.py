"""Iterating a remote storage's transactions (IStorageIteration).

The server keeps the iteration state; the client holds an iterator id.
`iterator_next` returns one transaction's metadata at a time; its records
come from a second server-side iterator started with
`iterator_record_start` (PROTOCOL.md 6.9).  An exhausted iterator is
forgotten by the server; one the application drops early is reported
with `iterator_gc` after the next commit or abort, which is when ZEO
clients send it, so that a finalizer never writes to the socket itself.
"""

import threading
import weakref

from ZODB.BaseStorage import DataRecord, TransactionRecord


class IteratorGarbage:
    """Server iterator ids dropped by the application, per connection."""

    def __init__(self):
        self._lock = threading.Lock()
        self._dropped = {}  # connection -> [iid, ...]

    def drop(self, connection, iid):
        with self._lock:
            self._dropped.setdefault(connection, []).append(iid)

    def flush(self, connection):
        """Tell the server about dropped iterators of `connection`."""
        with self._lock:
            iids = self._dropped.pop(connection, None)
            for stale in [c for c in self._dropped if c.closed]:
                del self._dropped[stale]
        if iids and not connection.closed:
            connection.oneway("iterator_gc", iids)


class TransactionIterator:
    """Transactions of the remote storage, oldest first."""

    def __init__(self, connection, garbage, start=None, stop=None):
        self._connection = connection
        self._iid = connection.call("iterator_start", start, stop)
        self._ended = False
        self._finalizer = weakref.finalize(self, garbage.drop, connection,
                                           self._iid)

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        metadata = self._connection.call("iterator_next", self._iid)
        if metadata is None:
            self._ended = True
            self._finalizer.detach()
            raise StopIteration
        tid, status, user, description, extension = metadata
        return RemoteTransaction(self._connection, self._iid, tid, status,
                                 user, description, extension)

    def close(self):
        """Stop early; the server is told at the next commit or abort."""
        if not self._ended:
            self._ended = True
            self._finalizer()


class RemoteTransaction(TransactionRecord):
    """One transaction; iterating it fetches its records."""

    def __init__(self, connection, iid, tid, status, user, description,
                 extension):
        TransactionRecord.__init__(self, tid, status, user, description,
                                   extension)
        self._connection = connection
        self._iid = iid

    def __iter__(self):
        connection = self._connection
        record_iid = connection.call("iterator_record_start", self._iid,
                                     self.tid)
        while True:
            record = connection.call("iterator_record_next", record_iid)
            if record is None:
                return
            oid, tid, data, data_txn = record
            yield DataRecord(oid, tid, data, data_txn)
