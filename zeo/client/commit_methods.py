"""The two-phase commit methods of our ClientStorage (PROTOCOL.md 6.5-6.6).

A mixin of `zeo.ClientStorage.ClientStorage`.  A commit is buffered on
the server: `tpc_begin` and every store are one-way calls; `vote` and
`tpc_finish` are the round trips.  A server in client-conflict-resolution
mode answers a vote with the conflicts, which are resolved here with
ZODB's resolver and stored again before the next vote.  One transaction
at a time per storage (the server allows one per connection): a second
`tpc_begin` waits for the first to end.
"""

from ZODB.POSException import (
    ConflictError, ReadOnlyError, StorageTransactionError)

from zeo import wire
from zeo.error_replies import is_plain
from zeo.Exceptions import ClientDisconnected

#: How many times a vote is retried after resolving conflicts client-side
#: (PROTOCOL.md 6.6; ZEO gives up after 9 rounds too).
MAX_VOTE_ROUNDS = 10


class _Commit:
    """The client's side of one transaction between tpc_begin and the end.

    It is bound to the connection it began on: if that connection is lost
    the transaction cannot go on, whatever happens to the client.
    """

    def __init__(self, transaction, connection):
        self.transaction = transaction
        self.connection = connection
        self.txn_id = id(transaction)
        self.stored = {}  # oid -> data stored (None: nothing to cache)
        self.resolved = set()  # oids whose data the server changed
        self.blobs = []  # (oid, file) of each blob uploaded


class CommitMethods:
    """tpc_begin, the stores, undo, tpc_vote, tpc_finish and tpc_abort, for
    a `ClientStorage` (which provides `_commit` and `_commit_changed`, the
    transaction in progress and its condition, `_link`, `_cache`,
    `_blobs`, `_iterator_garbage`, `isReadOnly` and
    `tryToResolveConflict`).
    """

    def tpc_begin(self, txn, tid=None, status=' '):
        """Start committing `txn`; waits while another transaction of this
        storage is in progress (the server allows one per connection)."""
        if self.isReadOnly():
            raise ReadOnlyError()
        extension = dict(txn.extension or {})
        if not is_plain(extension):
            # A ZEO server drops the connection on such a tpc_begin
            # (PROTOCOL.md 15.2, B8): refuse it here, clearly.
            raise TypeError("the transaction extension %s holds values "
                            "other than builtin types, which a ZEO server "
                            "refuses" % wire.short_repr(extension))
        with self._commit_changed:
            if self._commit is not None and \
                    self._commit.transaction is txn:
                raise StorageTransactionError(
                    "Duplicate tpc_begin calls for same transaction")
            while self._commit is not None:
                self._commit_changed.wait()
            commit = _Commit(txn, self._link.connection)
            self._commit = commit
        try:
            commit.connection.oneway(
                "tpc_begin", commit.txn_id, _as_bytes(txn.user),
                _as_bytes(txn.description), extension, tid, status)
        except BaseException:
            self._end_commit(commit)
            raise

    def _commit_for(self, txn):
        commit = self._commit
        if commit is None or commit.transaction is not txn:
            raise StorageTransactionError(self, txn)
        return commit

    def store(self, oid, serial, data, version, txn):
        if self.isReadOnly():
            raise ReadOnlyError()
        if version:
            raise ValueError("versions are not supported")
        commit = self._commit_for(txn)
        commit.connection.oneway("storea", oid, serial, data, commit.txn_id)
        commit.stored[oid] = data

    def restore(self, oid, serial, data, version, prev_txn, txn):
        if version:
            raise ValueError("versions are not supported")
        commit = self._commit_for(txn)
        commit.connection.oneway("restorea", oid, serial, data, prev_txn,
                                 commit.txn_id)
        commit.stored[oid] = None

    def deleteObject(self, oid, serial, txn):
        commit = self._commit_for(txn)
        commit.connection.oneway("deleteObject", oid, serial, commit.txn_id)
        commit.stored[oid] = None

    def checkCurrentSerialInTransaction(self, oid, serial, txn):
        commit = self._commit_for(txn)
        commit.connection.oneway("checkCurrentSerialInTransaction", oid,
                                 serial, commit.txn_id)

    def undo(self, transaction_id, txn):
        """Undo a transaction as part of `txn`; the oids it changes are
        returned by tpc_vote."""
        if self.isReadOnly():
            raise ReadOnlyError()
        commit = self._commit_for(txn)
        commit.connection.oneway("undoa", transaction_id, commit.txn_id)

    def tpc_vote(self, txn):
        """Vote; return the oids whose data the server changed.

        A server in client-conflict-resolution mode answers with conflict
        descriptions instead: we resolve them with ZODB's resolver, store
        the results and vote again.
        """
        commit = self._commit_for(txn)
        for _round in range(MAX_VOTE_ROUNDS):
            try:
                result = commit.connection.call("vote", commit.txn_id)
            except ConflictError as error:
                if error.oid is not None:
                    self._cache.forget(error.oid)
                raise
            conflicts = [item for item in result or ()
                         if isinstance(item, dict)]
            commit.resolved.update(item for item in result or ()
                                   if not isinstance(item, dict))
            if not conflicts:
                return list(commit.resolved)
            for conflict in conflicts:
                self._resolve(commit, conflict)
        raise ConflictError("conflicts still unresolved after %d votes"
                            % MAX_VOTE_ROUNDS)

    def _resolve(self, commit, conflict):
        oid = conflict["oid"]
        committed, read = conflict["serials"]
        data = self.tryToResolveConflict(oid, committed, read,
                                         conflict["data"])
        commit.connection.oneway("storea", oid, committed, data,
                                 commit.txn_id)
        commit.resolved.add(oid)

    def tpc_finish(self, txn, f=None):
        """Finish the commit; return its tid after calling `f(tid)`.

        The cache update and `f` run on the thread that reads the reply,
        before any later invalidation is applied and before the
        new tid becomes `lastTransaction()`, so no reader can see the new
        tid without this commit's invalidations.
        """
        commit = self._commit_for(txn)
        cache = self._cache

        def finished(tid):
            try:
                for oid in commit.resolved:
                    cache.invalidate(oid, tid)
                for oid, data in commit.stored.items():
                    cache.invalidate(oid, tid)
                    if data is not None and oid not in commit.resolved:
                        cache.store(oid, tid, None, data)
                if f is not None:
                    f(tid)
            finally:
                cache.set_last_tid(tid)

        tid = None
        try:
            tid = commit.connection.call("tpc_finish", commit.txn_id,
                                         apply=finished)
            return tid
        finally:
            self._end_commit(commit, tid)

    def tpc_abort(self, txn, timeout=None):
        """Abort `txn` if it is the one in progress (else do nothing)."""
        commit = self._commit
        if commit is None or commit.transaction is not txn:
            return
        try:
            commit.connection.call("tpc_abort", commit.txn_id)
        except ClientDisconnected:
            pass
        finally:
            self._end_commit(commit)

    def tpc_transaction(self):
        """The transaction being committed, or None."""
        commit = self._commit
        return None if commit is None else commit.transaction

    def _end_commit(self, commit, tid=None):
        """`commit` is over: committed as `tid`, or not (None)."""
        with self._commit_changed:
            if self._commit is commit:
                self._commit = None
                self._commit_changed.notify_all()
        if commit.blobs:
            self._blobs.settle(commit.blobs, tid)
        if not commit.connection.closed:
            self._iterator_garbage.flush(commit.connection)


def _as_bytes(value):
    """A transaction's user or description as the bytes ZEO sends."""
    if isinstance(value, str):
        return value.encode("utf-8")
    return value or b""
