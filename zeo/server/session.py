"""The per-connection API: what one client may call, and nothing else.

A `Session` knows its storage, its transaction and its iterators.  It does
not know about sockets or listening: it talks to its connection through a
small channel interface (`reply`, `push`, `follow`, `flush`, `close`,
`label`).  Its
transaction calls live in `zeo.server.commit_calls`, its blob calls in
`zeo.server.blob_calls`.

Names a client may call are listed in `BEFORE_REGISTER` and
`AFTER_REGISTER`; everything else, private names included, is unreachable.
"""

import functools
import itertools
import logging
import sys
import threading
import time

import zope.interface
from ZODB.POSException import (ConflictError, POSKeyError, ReadOnlyError,
                                UndoError)
from ZODB.serialize import referencesf

from zeo.server.blob_calls import BlobCalls
from zeo.server.commit_calls import CommitCalls
from zeo.server.outcome import DEFERRED, Reply, run_handoffs
from zeo.error_replies import is_plain
from zeo.wire import short_repr

logger = logging.getLogger(__name__)

#: Outcomes that are part of normal operation, not server errors (an undo
#: of a transaction whose objects changed since is refused every time).
EXPECTED_ERRORS = (ConflictError, POSKeyError, ReadOnlyError, UndoError)

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
#: queue their reply under the storage's publication lock (PROTOCOL.md 9),
#: held shared (`ServedStorage.read_lock`) but for `EXCLUSIVE_READS`.
PUBLISHED_READS = frozenset("""
    register loadBefore getTid lastTransaction history record_iternext
    getInvalidations
""".split())
#: Published reads that change what the server publishes to whom (a
#: session joins) or read what only the exclusive side guards (the
#: invalidation queue): they hold the publication lock exclusively.
EXCLUSIVE_READS = frozenset(["register", "getInvalidations"])


class Session(BlobCalls, CommitCalls):
    """One client connection's view of the server."""

    def __init__(self, server, channel):
        self.server = server
        self.channel = channel
        self.served = None
        self.read_only = server.read_only
        #: Read-only by its client certificate (zeo.tls): unlike on a
        #: read-only server, pack is refused too.
        self.certificate_read_only = False
        self.connected = True
        self._txn = None
        self._txn_lock = threading.RLock()
        self._iterators = {}
        self._last_transaction_seen = {}
        self._iterator_ids = itertools.count()
        #: The blob downloads (`blobs.Downloads`), made by the first
        #: `sendBlob`: most connections never download one.
        self._downloads = None
        self.current_msgid = None
        #: `name -> (function, publication lock or None)` of every call
        #: allowed once registered (set by `register`): the connection's
        #: dispatch without a lookup per message.  Functions, called with
        #: the session, not bound methods: bound methods kept here would
        #: tie the session into a reference cycle (see
        #: `ServerConnection._finish`).
        self.calls = {}
        #: What the client called itself (set_client_label), for the monitor.
        self.client_label = None
        #: Per-client counters for the monitor (and, summed, for
        #: `server_status`).  Only the connection's own thread increments
        #: them (loads and finishes run there), so they need no lock.
        self.loads = 0
        self.commits = 0
        #: Methods this client called with arguments they do not take
        #: (each logged once: a client must not be able to flood the log).
        self._miscalled = set()
        self._slow_load_threshold = server.slow_log.load_threshold

    # -- dispatch -------------------------------------------------------

    def lookup(self, name):
        """The function (called with the session as its first argument)
        for a name callable now, or None."""
        allowed = (AFTER_REGISTER if self.served is not None
                   else BEFORE_REGISTER)
        if name not in allowed:
            return None
        # Interned: the interpreter's attribute cache keeps the name it
        # looked up, and a fresh string per connection (decoded from the
        # message) would outlive the connection there, scattered over the
        # heap so that memory freed when clients leave stays with us.
        return getattr(type(self), sys.intern(name))

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
        self.calls = _registered_calls(type(self), served.publication,
                                       served.read_lock)
        self.log("registered on storage %r%s", storage_name,
                 " (read-only)" if self.read_only else "")
        return served.join(self)

    def restrict_to_reading(self):
        """Make the session read-only, pack included (the client's
        certificate allows no more)."""
        self.read_only = self.certificate_read_only = True

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

    # -- pack ---------------------------------------------------------------

    def pack(self, t, wait=1):
        if self.certificate_read_only:
            raise ReadOnlyError()
        served = self.served
        refusal = served.refused_commit_error()
        if refusal is not None:
            raise refusal
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

    def follow(self, log):
        """Receive the invalidations published to `log` (a
        `zeo.server.fanout.InvalidationLog`; None: stop)."""
        self.channel.follow(log, self)

    def queue_invalidation(self, tid, oids):
        """Queue an invalidation for this session alone (the committer's
        share of what other servers committed); sent with its reply."""
        self.channel.push("invalidateTransaction", (tid, oids),
                          wake_writer=False)

    def send_queued(self):
        """Send what is queued and published, without blocking (the
        fan-out thread's call)."""
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
        # Downloads still running hold it themselves; dropped here, it
        # no longer ties the session and its connection into a cycle.
        self._downloads = None
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
        elif _raised_by_the_call(error):
            if method not in self._miscalled:
                self._miscalled.add(method)
                self.log("called %s with arguments it does not take: %s "
                         "(logged once per method)", method,
                         short_repr(error, 200), level=logging.WARNING)
        else:
            self.log("%s raised", method, level=logging.ERROR, exc_info=error)


def _raised_by_the_call(error):
    """Whether `error` is Python refusing the call's arguments, before the
    method ran: a client's mistake, not the server's, so no traceback.
    (Caught in the dispatching frame, such an error's traceback has no
    frame below it.)"""
    traceback = error.__traceback__
    return (isinstance(error, TypeError) and traceback is not None
            and traceback.tb_next is None)


@functools.lru_cache(maxsize=64)
def _registered_calls(session_class, publication, read_lock):
    """The `Session.calls` table of the sessions of one storage (the one
    whose publication lock is `publication`, taken by reads as
    `read_lock`): every session of that storage shares it."""
    def lock(name):
        if name in EXCLUSIVE_READS:
            return publication
        return read_lock if name in PUBLISHED_READS else None
    return {name: (getattr(session_class, name), lock(name))
            for name in AFTER_REGISTER}


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
