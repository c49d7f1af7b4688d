"""A session's transaction, from tpc_begin to finish or abort.

The client streams its changes as one-way calls long before it votes.  We
only record them (`TransactionLog`), and touch the storage when the commit
lock is ours: the lock is then held for the replay, the vote and the
client's round trip to tpc_finish, never for the upload.

The phases are explicit objects: `Buffering` accepts changes, `Voted` holds
the commit lock and can only finish or abort.  A call that does not belong
to the current phase is refused by construction.
"""

import itertools
import logging
import pickle
import tempfile

from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError, StorageTransactionError

from zeo.server import conflict_globals, mvcc
from zeo.server.blobs import TransactionBlobs

logger = logging.getLogger(__name__)

#: Buffered changes above this many bytes spill from memory to a temp file.
SPILL_THRESHOLD = 1024 * 1024


class TransactionLog:
    """The changes of one transaction, in the order the client sent them.

    Kept in memory while small; past `spill_threshold` bytes everything is
    pickled into an anonymous temporary file, so a huge upload costs disk,
    not server memory.
    """

    def __init__(self, spill_threshold=SPILL_THRESHOLD):
        self._spill_threshold = spill_threshold
        self._entries = []
        self._file = None
        self.size = 0
        self.count = 0

    def append(self, operation, *args):
        self.count += 1
        self.size += sum(len(arg) for arg in args
                         if isinstance(arg, (bytes, bytearray)))
        if self._file is not None:
            pickle.dump((operation, args), self._file, 4)
            return
        self._entries.append((operation, args))
        if self.size > self._spill_threshold:
            self._spill()

    def _spill(self):
        self._file = tempfile.TemporaryFile(prefix="zeo-txn-")
        for entry in self._entries:
            pickle.dump(entry, self._file, 4)
        self._entries = []

    def __iter__(self):
        if self._file is None:
            yield from self._entries
            return
        self._file.seek(0)
        unpickler = pickle.Unpickler(self._file)
        for _ in range(self.count):
            yield unpickler.load()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        self._entries = []


class Buffering:
    """Between tpc_begin and a successful vote: changes are only recorded."""

    def __init__(self, txn_id, user, description, extension, tid=None,
                 status=" "):
        self.txn_id = txn_id
        self.metadata = TransactionMetaData(user, description, extension)
        self.tid = tid
        self.status = status
        self.log = TransactionLog()
        #: Stored after the log at vote (PROTOCOL.md 10.1).
        self.blobs = TransactionBlobs(TransactionLog())
        self.voting = False  # parked for the commit lock or voting
        self.refused = None  # why this transaction can never commit
        #: Its phases' times (`CommitTimes`), from the vote on.
        self.times = None

    def record(self, operation, *args):
        if self.voting:
            raise StorageTransactionError("Already voting")
        self.log.append(operation, *args)

    def vote(self, served, conflict_resolution_by_client):
        """Replay the log into the storage and vote.  Needs the commit lock.

        Returns `Voted` on success.  With client conflict resolution, the
        list of conflicts instead (the storage transaction aborted).  Any
        error aborts the storage transaction and propagates.
        """
        if self.refused is not None:
            raise self.refused
        refusal = served.refused_commit_error()
        if refusal is not None:
            raise refusal
        served.failed_write.cut()
        storage = served.storage
        changed = []  # oids to invalidate
        resolved_or_undone = []  # oids the client must not cache from its data
        conflicts = {}
        resolved = None
        with served.access, conflict_globals.resolving_with(
                served.trusted_globals):
            served.before_vote()
            if self.tid is not None or self.status != " ":
                storage.tpc_begin(self.metadata, self.tid, self.status)
            else:
                storage.tpc_begin(self.metadata)
            try:
                for operation, args in itertools.chain(
                        self.log,
                        self.blobs.replay(conflict_resolution_by_client)):
                    replay = _REPLAY[operation]
                    try:
                        oids = replay(storage, self.metadata, *args)
                    except ConflictError as error:
                        if not (conflict_resolution_by_client
                                and operation in _STORES and error.serials):
                            raise
                        oid, data = args[0], args[2]
                        conflicts[oid] = {"oid": oid, "serials": error.serials,
                                          "data": data}
                        continue
                    if operation in _STORES:
                        conflicts.pop(args[0], None)
                    if oids:
                        changed.extend(oids)
                        if operation == "undo":
                            resolved_or_undone.extend(oids)
                self.times.mark("stored")
                if not conflicts:
                    resolved = self._storage_vote(
                        storage, conflicts, conflict_resolution_by_client)
                if conflicts:
                    storage.tpc_abort(self.metadata)
                    return list(conflicts.values())
            except BaseException as error:
                _abort_keeping_the_error(storage, self.metadata)
                served.failed_write.after_failed_vote(error)
                conflict = served.mvcc and mvcc.view_conflict(error,
                                                              self.log)
                if conflict:
                    raise conflict from error
                raise
        resolved = [oid for oid in resolved or () if isinstance(oid, bytes)]
        # A storage whose undo returned None names the undone oids here.
        listed = set(changed)
        changed.extend(oid for oid in resolved if oid not in listed)
        return Voted(self, changed, resolved, resolved_or_undone)

    def _storage_vote(self, storage, conflicts, conflict_resolution_by_client):
        try:
            return storage.tpc_vote(self.metadata)
        except ConflictError as error:
            if (conflict_resolution_by_client and error.oid
                    and error.serials and getattr(error, "data", None)):
                conflicts[error.oid] = {"oid": error.oid,
                                        "serials": error.serials,
                                        "data": error.data}
                return None
            raise

    def abort(self, served):
        self.close()

    @property
    def size(self):
        """`(records, bytes)` buffered: data records (their bytes with
        their oids and serials) and blobs (with their files' bytes)."""
        return (self.log.count + self.blobs.count,
                self.log.size + self.blobs.size)

    def close(self):
        self.log.close()
        self.blobs.close()


class Voted:
    """The commit lock is held and the storage has voted yes."""

    voting = True

    def __init__(self, buffering, changed, resolved, undone):
        self.txn_id = buffering.txn_id
        self.metadata = buffering.metadata
        self.times = buffering.times
        self.size = buffering.size
        self._buffering = buffering
        self.changed = changed
        self.resolved = resolved
        self.vote_result = _unique(resolved + undone)

    def finish(self, served, committer):
        """Commit; returns what `ServedStorage.finish` does."""
        try:
            return served.finish(committer, self.metadata, self.changed)
        finally:
            self.close()

    def abort(self, served):
        try:
            with served.access:
                served.storage.tpc_abort(self.metadata)
        finally:
            self.close()

    def close(self):
        self._buffering.close()


def _abort_keeping_the_error(storage, metadata):
    """Abort after a failed replay or vote without hiding why it failed.

    The abort can fail for the same reason the vote did: FileStorage,
    after a write failed with ENOSPC or EFBIG, may fail again flushing
    what it buffered (it releases its own commit lock all the same).  The
    vote's error is the one the client must hear, so the abort's is only
    logged.
    """
    try:
        storage.tpc_abort(metadata)
    except Exception:
        logger.error("tpc_abort after a failed vote failed as well",
                     exc_info=True)


def _unique(oids):
    seen = set()
    return [oid for oid in oids if not (oid in seen or seen.add(oid))]


def _store(storage, txn, oid, serial, data):
    storage.store(oid, serial, data, "", txn)
    return (oid,)


def _delete(storage, txn, oid, serial):
    storage.deleteObject(oid, serial, txn)


def _check_read(storage, txn, oid, serial):
    storage.checkCurrentSerialInTransaction(oid, serial, txn)


def _restore(storage, txn, oid, serial, data, prev_txn):
    storage.restore(oid, serial, data, "", prev_txn, txn)


def _store_blob(storage, txn, oid, serial, data, path):
    storage.storeBlob(oid, serial, data, path, "", txn)
    return (oid,)


def _undo(storage, txn, undo_id):
    # None is allowed: the storage then returns the oids from tpc_vote.
    result = storage.undo(undo_id, txn)
    return result[1] if result else ()


_REPLAY = {
    "store": _store,
    "delete": _delete,
    "checkread": _check_read,
    "restore": _restore,
    "undo": _undo,
    "blob": _store_blob,
}
_STORES = ("store", "blob")
