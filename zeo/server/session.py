"""The per-connection API: what one client may call, and nothing else.

A `Session` knows its storage, its transaction and its iterators.  It does
not know about sockets or listening: it talks to its connection through a
small channel interface (`reply`, `push`, `close`, `label`).

Names a client may call are listed in `BEFORE_REGISTER` and
`AFTER_REGISTER`; everything else, private names included, is unreachable.
"""

import functools
import itertools
import logging
import threading
import time

import zope.interface
from ZODB.POSException import (ConflictError, POSKeyError, ReadOnlyError,
                               StorageTransactionError)
from ZODB.serialize import referencesf

from zeo.server import blobs
from zeo.server.blob_calls import BlobCalls
from zeo.server.commit import Buffering, Voted
from zeo.server.outcome import (DEFERRED, Reply, hand_off_then_send,
                                run_handoffs)
from zeo.server.timing import CommitTimes
from zeo.wire import is_plain, short_repr

logger = logging.getLogger(__name__)

#: Outcomes that are part of normal operation, not server errors.
EXPECTED_ERRORS = (ConflictError, POSKeyError, ReadOnlyError)

#: Open iterators one connection may hold (each may hold a file open).
MAX_ITERATORS = 100

BEFORE_REGISTER = frozenset(["register"])
AFTER_REGISTER = frozenset("""
    get_info lastTransaction getInvalidations loadBefore loadSerial getTid
    history record_iternext new_oids new_oid tpc_begin storea deleteObject
    checkCurrentSerialInTransaction restorea undoa vote tpc_finish tpc_abort
    undoLog undoInfo pack iterator_start iterator_next iterator_record_start
    iterator_record_next iterator_gc server_status set_client_label ping
    storeBlobStart storeBlobChunk storeBlobEnd storeBlobShared sendBlob
""".split())

#: Calls whose reply reflects the storage's current state.  They run and
#: queue their reply under the storage's publication lock (PROTOCOL.md 9).
PUBLISHED_READS = frozenset("""
    register loadBefore getTid lastTransaction history record_iternext
    getInvalidations
""".split())


class Session(BlobCalls):
    """One client connection's view of the server."""

    def __init__(self, server, channel):
        self.server = server
        self.channel = channel
        self.served = None
        self.read_only = server.read_only
        self.connected = True
        self._txn = None
        self._txn_lock = threading.RLock()
        self._iterators = {}
        self._last_transaction_seen = {}
        self._iterator_ids = itertools.count()
        self._downloads = blobs.Downloads(server, channel, self._blob_sent)
        self.current_msgid = None
        #: `name -> (bound method, publication lock or None)` of every call
        #: allowed once registered (filled by `register`): the connection's
        #: dispatch without a lookup per message.
        self.calls = {}
        #: What the client called itself (set_client_label), for the monitor.
        self.client_label = None
        #: Per-client counters for the monitor (and, summed, for
        #: `server_status`).  Only the connection's own thread increments
        #: them (loads and finishes run there), so they need no lock.
        self.loads = 0
        self.commits = 0
        self._slow_load_threshold = server.slow_log.load_threshold

    # -- dispatch -------------------------------------------------------

    def lookup(self, name):
        """The bound method for a name callable now, or None."""
        allowed = (AFTER_REGISTER if self.served is not None
                   else BEFORE_REGISTER)
        if name not in allowed:
            return None
        return getattr(self, name)

    def publication_lock(self, name, args):
        """The lock a call must hold while it runs and queues its reply."""
        if name not in PUBLISHED_READS:
            return None
        served = self.served
        if served is None and args and isinstance(args[0], str):
            served = self.server.storages.get(args[0])
        return served.publication if served is not None else None

    @property
    def stats(self):
        return self.served.stats

    def log(self, message, *args, level=logging.INFO, exc_info=False):
        logger.log(level, "(%s) " + message, self.channel.label, *args,
                   exc_info=exc_info)

    # -- registration and information -----------------------------------

    def register(self, storage_name, read_only):
        served = self.server.storages.get(storage_name)
        if served is None:
            self.log("unknown storage %s", short_repr(storage_name),
                     level=logging.WARNING)
            raise ValueError("unknown storage: %s" % (storage_name,))
        if not read_only and (self.read_only or served.read_only):
            raise ReadOnlyError()
        self.read_only = self.read_only or bool(read_only)
        self.served = served
        self.calls = {
            name: (getattr(self, name),
                   served.publication if name in PUBLISHED_READS else None)
            for name in AFTER_REGISTER}
        self.log("registered on storage %r%s", storage_name,
                 " (read-only)" if self.read_only else "")
        return served.join(self)

    def get_info(self):
        storage = self.served.storage
        supports_undo = getattr(storage, "supportsUndo", None)
        interfaces = zope.interface.providedBy(storage).__iro__
        info = dict(self.served.size_info())
        info.update(
            name=storage.getName(),
            supportsUndo=bool(supports_undo and supports_undo()),
            supports_record_iternext=hasattr(storage, "record_iternext"),
            interfaces=tuple((interface.__module__, interface.__name__)
                             for interface in interfaces),
        )
        return info

    def lastTransaction(self):
        return self.served.synced_last_transaction()

    def getInvalidations(self, tid):
        answer = self.served.get_invalidations(tid)
        if answer is not None:
            self.log("returning %d invalidations since %s", len(answer[1]),
                     tid.hex(), level=logging.DEBUG)
        return answer

    def server_status(self):
        return self.served.status(self.server.watchdog_status())

    def set_client_label(self, label):
        self.client_label = label
        self.channel.label = "%s %s" % (label, self.channel.peer)

    def ping(self):
        return None

    # -- reads ------------------------------------------------------------

    def loadBefore(self, oid, tid):
        self.loads += 1
        threshold = self._slow_load_threshold
        if threshold is None:
            return self._load_before(oid, tid)
        started = time.monotonic()
        result = self._load_before(oid, tid)
        took = time.monotonic() - started
        if took >= threshold:
            self.server.slow_log.load(self, oid, took,
                                      len(result[0]) if result else 0)
        return result

    def _load_before(self, oid, tid):
        served = self.served
        if served.serialized:
            with served.access:
                result = served.storage.loadBefore(oid, tid)
        else:
            result = served.storage.loadBefore(oid, tid)
        if served.after_load_read is not None:
            served.after_load_read(self, oid)
        return result

    def loadSerial(self, oid, serial):
        with self.served.access:
            return self.served.storage.loadSerial(oid, serial)

    def getTid(self, oid):
        with self.served.access:
            return self.served.storage.getTid(oid)

    def history(self, oid, size=1):
        with self.served.access:
            return self.served.storage.history(oid, size=size)

    def record_iternext(self, next=None):
        record_iternext = getattr(self.served.storage, "record_iternext", None)
        if record_iternext is None:
            raise AttributeError("storage does not support record_iternext")
        with self.served.access:
            return record_iternext(next)

    def undoLog(self, first, last):
        if not self._supports_undo():
            return ()
        with self.served.access:
            return _readable(self.served.storage.undoLog(first, last))

    def undoInfo(self, first, last, spec):
        if not self._supports_undo():
            return ()
        with self.served.access:
            return _readable(self.served.storage.undoInfo(first, last, spec))

    def _supports_undo(self):
        supports_undo = getattr(self.served.storage, "supportsUndo", None)
        return bool(supports_undo and supports_undo())

    # -- oids -------------------------------------------------------------

    def new_oids(self, n=100):
        if self.read_only:
            raise ReadOnlyError()
        count = min(max(int(n), 1), 100)
        with self.served.access:
            return [self.served.storage.new_oid() for _ in range(count)]

    def new_oid(self):
        return self.new_oids(1)[0]

    # -- the transaction ----------------------------------------------------

    def tpc_begin(self, txn_id, user, description, extension, tid=None,
                  status=" "):
        if self.read_only:
            raise ReadOnlyError()
        with self._txn_lock:
            if self._txn is not None:
                if self._txn.txn_id == txn_id:
                    self.log("duplicate tpc_begin(%s) ignored",
                             short_repr(txn_id), level=logging.WARNING)
                    return
                raise StorageTransactionError(
                    "Multiple simultaneous tpc_begin requests from one "
                    "client.")
            self._txn = Buffering(txn_id, user, description, extension, tid,
                                  status)
        self.stats.add("active_txns")

    def tpc_begin_refused(self, txn_id, error):
        """Open a transaction that will fail at vote with `error`.

        tpc_begin is one-way, so this is the first point where the client
        can hear why its transaction cannot commit.
        """
        self.tpc_begin(txn_id, b"", b"", {})
        self._txn.refused = error

    def _buffering(self, txn_id):
        """The open, not yet voting transaction `txn_id`, or an error."""
        if self.read_only:
            raise ReadOnlyError()
        txn = self._txn
        if txn is None or txn.txn_id != txn_id:
            raise StorageTransactionError(txn and txn.txn_id, txn_id)
        return txn

    def storea(self, oid, serial, data, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("store", oid, serial, data)
        self.stats.add("stores")

    def deleteObject(self, oid, serial, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("delete", oid, serial)
        self.stats.add("stores")

    def checkCurrentSerialInTransaction(self, oid, serial, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("checkread", oid, serial)

    def restorea(self, oid, serial, data, prev_txn, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("restore", oid, serial, data,
                                           prev_txn)
        self.stats.add("stores")

    def undoa(self, undo_id, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("undo", undo_id)

    def vote(self, txn_id):
        with self._txn_lock:
            txn = self._buffering(txn_id)
            if txn.voting:
                holder = self.served.commit_lock.holder is self
                raise StorageTransactionError(
                    "Already voting (%s)"
                    % ("locked" if holder else "waiting"))
            txn.voting = True
            txn.times = CommitTimes()
            granted = functools.partial(self._vote_when_granted, txn,
                                        self.current_msgid)
            if not self.served.commit_lock.acquire_or_park(self, granted):
                self.log("vote waits for the commit lock (%d waiting)",
                         self.served.commit_lock.waiting, level=logging.DEBUG)
                return DEFERRED
            return self._vote_holding_lock(txn)

    def _vote_when_granted(self, txn, msgid):
        """Run a parked vote now that the lock is ours (any thread)."""
        with self._txn_lock:
            if self._txn is not txn or not self.connected:
                return self.served.commit_lock.release(self)
            reply = self._vote_holding_lock(txn)
        self.channel.reply(msgid, reply)
        return reply.after

    def _vote_holding_lock(self, txn):
        served = self.served
        txn.times.mark("granted")
        try:
            outcome = txn.vote(served, served.client_conflict_resolution)
        except Exception as error:
            self._discard_transaction()
            if isinstance(error, ConflictError):
                served.stats.add("conflicts")
            self.log_error("vote", error)
            return Reply(error=error,
                         after=self._release_commit_lock(txn, "vote failed"))
        txn.times.mark("voted")
        if isinstance(outcome, Voted):
            self._txn = outcome
            if outcome.resolved:
                served.stats.add("conflicts_resolved", len(outcome.resolved))
            return Reply(outcome.vote_result)
        # Conflicts for the client to resolve: it will store again and vote.
        txn.voting = False
        served.stats.add("conflicts")
        return Reply(outcome, after=self._release_commit_lock(
            txn, "conflicts for the client"))

    def _release_commit_lock(self, txn, outcome):
        """Release the commit lock that `txn` holds (the transaction lock
        held), log it if it was slow, and return the hand-off."""
        granted = self.served.commit_lock.release(self)
        txn.times.mark("released")
        self.server.slow_log.transaction_ended(self, txn.times, *txn.size,
                                               outcome)
        return granted

    def tpc_finish(self, txn_id):
        with self._txn_lock:
            txn = self._txn
            if txn is None or txn.txn_id != txn_id:
                return None
            if not isinstance(txn, Voted):
                raise AssertionError("finished called wo lock")
            self._txn = None
            self.stats.add("active_txns", -1)
            txn.times.mark("finish_called")
            informed = ()
            try:
                tid, informed = txn.finish(self.served, self)
                outcome = Reply(tid)
            except Exception as error:
                self.log_error("tpc_finish", error)
                outcome = Reply(error=error)
            txn.times.mark("finished")
            outcome.after = self._after_commit(txn, informed, outcome)
        if outcome.error is None:
            self.commits += 1
            # The connection's thread sends it with the reply, right after.
            self.channel.push("info", (self.served.size_info(),),
                              wake_writer=False)
            self.log("committed %s", outcome.value.hex(), level=logging.DEBUG)
        return outcome

    def _after_commit(self, txn, informed, outcome):
        """Release the commit lock; return what runs once the reply is
        queued: the hand-off, the invalidations, then the slow log (which
        then knows how long the invalidations took)."""
        granted = self.served.commit_lock.release(self)
        txn.times.mark("released")
        send = hand_off_then_send(granted, self.served, informed, txn.times)

        def after():
            try:
                send()
            finally:
                self.server.slow_log.transaction_ended(
                    self, txn.times, *txn.size,
                    "committed" if outcome.error is None else "failed")
        return after

    def tpc_abort(self, txn_id):
        with self._txn_lock:
            txn = self._txn
            if txn is None or txn.txn_id != txn_id:
                return None
            granted = self._abort_transaction()
        return Reply(None, after=granted)

    def _abort_transaction(self):
        """Abort the open transaction and give up the commit lock.

        Called with the transaction lock held; returns the lock hand-off.
        The lock is released even if the storage fails to abort.
        """
        txn = self._txn
        try:
            txn.abort(self.served)
        except Exception:
            self.log("tpc_abort failed", level=logging.ERROR, exc_info=True)
        self._discard_transaction()
        self.stats.add("aborts")
        if txn.times is None:  # it never voted: no lock to release
            return self.served.commit_lock.release(self)
        return self._release_commit_lock(txn, "aborted")

    def _discard_transaction(self):
        if self._txn is not None:
            self._txn.close()
            self._txn = None
            self.stats.add("active_txns", -1)

    # -- pack ---------------------------------------------------------------

    def pack(self, t, wait=1):
        served = self.served
        if not served.packing.acquire(blocking=False):
            raise ValueError("storage %s is already being packed"
                             % served.name)
        msgid = self.current_msgid
        self.server.start_worker(
            "pack-%s" % served.name,
            functools.partial(self._pack, t, msgid if wait else None))
        if wait:
            return DEFERRED
        return None

    def _pack(self, t, msgid):
        """The pack worker: one per storage at a time (`packing` is held
        from `pack` until this ends)."""
        served = self.served
        self.log("pack(%s) started", short_repr(t))
        try:
            served.pack(t, referencesf)
        except Exception as error:
            self.log_error("pack", error)
            if msgid is not None:
                self.channel.reply(msgid, Reply(error=error))
            return
        finally:
            served.packing.release()
        self.log("pack(%s) done", short_repr(t))
        served.forget_size_info()
        served.broadcast("info", served.size_info())
        if msgid is not None:
            self.channel.reply(msgid, Reply(None))

    # -- iteration ----------------------------------------------------------

    def _new_iterator(self, iterator):
        if len(self._iterators) >= MAX_ITERATORS:
            raise ValueError("too many open iterators (limit %d); "
                             "release some with iterator_gc" % MAX_ITERATORS)
        iid = next(self._iterator_ids)
        self._iterators[iid] = iterator
        return iid

    def iterator_start(self, start, stop):
        with self.served.access:
            return self._new_iterator(iter(self.served.storage.iterator(
                start, stop)))

    def iterator_next(self, iid):
        iterator = self._iterators[iid]
        with self.served.access:
            info = next(iterator, None)
        if info is None:
            self._forget_iterator(iid)
            return None
        self._last_transaction_seen[iid] = info
        return (info.tid, info.status, info.user, info.description,
                _readable_values(info.extension))

    def iterator_record_start(self, txn_iid, tid):
        info = self._last_transaction_seen[txn_iid]
        if info.tid != tid:
            raise ValueError(
                "Out-of-order request for record iterator for transaction %s"
                % short_repr(tid))
        return self._new_iterator(iter(info))

    def iterator_record_next(self, iid):
        iterator = self._iterators[iid]
        with self.served.access:
            record = next(iterator, None)
        if record is None:
            self._forget_iterator(iid)
            return None
        return (record.oid, record.tid, record.data, record.data_txn)

    def iterator_gc(self, iids):
        for iid in iids:
            self._forget_iterator(iid)

    def _forget_iterator(self, iid):
        iterator = self._iterators.pop(iid, None)
        self._last_transaction_seen.pop(iid, None)
        close = getattr(iterator, "close", None)
        if close is not None:
            close()

    # -- messages to the client -----------------------------------------------

    def push(self, method, *args):
        self.channel.push(method, args)

    def queue_invalidation(self, tid, oids, encoded=None):
        """Queue a commit's invalidation; the committer calls
        `send_queued` once it has left the commit lock.  (`encoded`: see
        `ServerConnection.push`.)"""
        self.channel.push("invalidateTransaction", (tid, oids),
                          wake_writer=False, encoded=encoded)

    def send_queued(self):
        self.channel.flush()

    # -- the end --------------------------------------------------------------

    def break_commit(self, reason, acquired_at):
        """Abort the transaction holding the lock since `acquired_at`, then
        disconnect.

        Used by the transaction-timeout watchdog: the lock is free again
        before the connection goes (ZEO 6.2 forgot this and wedged).
        """
        with self._txn_lock:
            if self.served.commit_lock.held() != (self, acquired_at):
                return  # finished or aborted meanwhile
            self.log("%s: aborting the transaction and disconnecting", reason,
                     level=logging.CRITICAL)
            granted = self._abort_transaction()
        run_handoffs(granted)
        self.disconnect(reason)

    def disconnect(self, reason):
        """Close the connection; its thread then runs `closed`."""
        self.channel.close(reason)

    def closed(self):
        """Release everything the connection held.  Runs once per session,
        whatever ended the connection."""
        self.connected = False
        granted = self._abort_on_disconnect()
        for iid in list(self._iterators):
            self._forget_iterator(iid)
        if self.served is not None:
            self.served.leave(self)
        run_handoffs(granted)

    def _abort_on_disconnect(self):
        with self._txn_lock:
            if self._txn is None:
                return None
            locked = self.served.commit_lock.holder is self
            self.log("disconnected during %s transaction",
                     "locked" if locked else "unlocked",
                     level=logging.WARNING)
            return self._abort_transaction()

    def log_error(self, method, error):
        if isinstance(error, EXPECTED_ERRORS):
            self.log("%s: %s", method, short_repr(error, 200),
                     level=logging.DEBUG)
        else:
            self.log("%s raised", method, level=logging.ERROR, exc_info=error)


def _readable(descriptions):
    """Undo descriptions every client can decode.

    A transaction extension written by other means (a local FileStorage
    user, an old server) may hold objects such as datetimes.  ZEO clients
    refuse to unpickle those and would lose the whole reply, so such
    values are sent as their repr.
    """
    return [_readable_values(description) for description in descriptions]


def _readable_values(mapping):
    if is_plain(mapping):
        return mapping
    return {key: value if is_plain(value) else repr(value)
            for key, value in mapping.items()}
