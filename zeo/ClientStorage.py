"""ClientStorage: a ZODB storage served by a ZEO server.

Reads go through an in-memory cache of object revisions
(`zeo.client.cache`); misses become `loadBefore` calls.  Commits are
buffered on the server (one-way `storea` calls) and voted and finished
with two-way calls (`zeo.client.commit_methods`).  The connection layer (`zeo.client.connection` and
`zeo.client.manager`) does the I/O: whichever thread reads the socket
(a caller waiting for its reply, or the connection's reader thread)
applies replies and the server's invalidations to the cache in wire
order, which is what gives every ZODB connection of a `ZODB.DB` on this
storage a consistent MVCC snapshot.

With a `blob_dir` it is a blob storage too (`zeo.client.blobs`): blobs
are downloaded into a local cache on first use and streamed to the
server on commit, or, with `shared_blob_dir`, read and written in a
directory the server shares.

When the connection drops, reads the cache can answer go on (as of the
last transaction the cache knows), everything else raises
`ClientDisconnected`, and the connection layer reconnects in the
background.  Each new connection first verifies the cache against the
server (`_verify`, PROTOCOL.md 8.1), so that nothing stale is served
after it.
"""

import logging
import threading
import time

import zope.interface
import ZODB.BaseStorage
import ZODB.blob
import ZODB.interfaces
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.utils import maxtid, z64

from zeo.Exceptions import ClientStorageError
from zeo.client.blob_cache import Downloads
from zeo.client.blob_methods import BlobMethods
from zeo.client.blobs import open_blobs
from zeo.client.commit_methods import CommitMethods
from zeo.client.cache import ClientCache, next_tid
from zeo.client.cache_file import FileClientCache, cache_file_path
from zeo.client.connection import DEFAULT_BUSY_POLL
from zeo.client.iterator import IteratorGarbage, TransactionIterator
from zeo.client.manager import (
    CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, ConnectionManager,
    RetryPolicy, normalize_addresses)
from zeo.client.trace import open_tracer, trace_path

logger = logging.getLogger(__name__)

#: Seconds the constructor waits for a connection when `wait_timeout` is
#: None (ZEO's default too).
DEFAULT_WAIT_TIMEOUT = 30

#: Interfaces the client provides when the server's storage lists them in
#: `get_info()['interfaces']` (PROTOCOL.md 6.3).  Blob interfaces are not
#: here: they follow the `blob_dir` argument, so that ZODB knows whether
#: to use blobs before we are connected.
OPTIONAL_INTERFACES = (
    ZODB.interfaces.IStorageUndoable,
    ZODB.interfaces.IStorageIteration,
    ZODB.interfaces.IStorageRestoreable,
    ZODB.interfaces.IStorageCurrentRecordIteration,
    ZODB.interfaces.IExternalGC,
)


@zope.interface.implementer(ZODB.interfaces.IMultiCommitStorage,
                            ZODB.interfaces.IPrefetchStorage)
class ClientStorage(CommitMethods, BlobMethods, ConflictResolvingStorage):
    """A storage on a ZEO server (see the HOWTO, "Configuring client").

    `addr` is `(host, port)`, a Unix socket path, a port number on
    127.0.0.1, or a list of those; `storage` the storage's name on the
    server.  `cache_size` bounds the object cache (bytes); with `client`
    the cache persists in the file ``<client>-<storage>.zec`` in the
    directory `var` (default: the current one), otherwise it is in memory.
    `cache_trace` is a file to which every cache event is appended (see
    `zeo.client.trace`; without it, a non-empty ``ZEO_CACHE_TRACE``
    environment variable traces a persistent cache to its file name plus
    ``.trace``).  `wait` makes the constructor connect before returning,
    for up to `wait_timeout` seconds (30 when None); otherwise it
    connects in the background.  A lost connection is retried at once,
    then after waits growing from `min_disconnect_poll` seconds up to
    `max_disconnect_poll` (see `zeo.client.manager.RetryPolicy`).
    `heartbeat_timeout` (seconds; 0 or None: never): a server silent
    this long (it is pinged after a third of it) is taken for gone: the
    connection is closed, waiting callers get ClientDisconnected, and
    the client reconnects, trying its other addresses first.
    `read_only_fallback` accepts a
    read-only server while it keeps looking for a writable one;
    `server_sync` makes `sync()` a round trip; `client_label` names the
    client in the server's log.
    `drop_cache_rather_verify`: when a reconnecting client missed more
    transactions than the server remembers, drop the whole cache at once
    instead of reading the server's history to find what changed.
    `busy_poll` (microseconds; 0 turns it off): how long a thread waiting
    alone for a reply polls the socket before it sleeps, which saves a
    wake-up per round trip when the server answers quickly (see
    `zeo.client.connection`).
    `ssl` (an `ssl.SSLContext` for a client, e.g. from
    `ssl.create_default_context`) connects with TLS; the server's
    certificate must be for `ssl_server_hostname`, by default the host of
    the address (see zeo.tls).
    `blob_dir` makes it a blob storage: the directory is the client's
    blob cache, or with `shared_blob_dir` the server's own blob
    directory, shared.  `blob_cache_size` (bytes; None: no limit) bounds
    the cache, which is trimmed once the blobs added since the last trim
    exceed `blob_cache_size_check` percent of it (see
    `zeo.client.blob_trim`).
    """

    def __init__(self, addr, storage='1', cache_size=20 * 2 ** 20, name='',
                 client=None, var=None, min_disconnect_poll=0.05,
                 max_disconnect_poll=300, wait=True, wait_timeout=None,
                 read_only=False, read_only_fallback=False, blob_dir=None,
                 shared_blob_dir=False, blob_cache_size=None,
                 blob_cache_size_check=10, server_sync=False,
                 client_label=None, drop_cache_rather_verify=False,
                 cache_trace=None, busy_poll=DEFAULT_BUSY_POLL,
                 heartbeat_timeout=DEFAULT_HEARTBEAT_TIMEOUT, ssl=None,
                 ssl_server_hostname=None, **ignored):
        if busy_poll < 0:
            raise ClientStorageError("busy_poll cannot be negative")
        if heartbeat_timeout is not None and heartbeat_timeout < 0:
            raise ClientStorageError("heartbeat_timeout cannot be negative")
        # Checked before the cache file is opened (and locked).
        retry = RetryPolicy(min_disconnect_poll, max_disconnect_poll)
        tls = None
        if ssl is not None:
            from zeo.tls import ClientTLS
            tls = ClientTLS(ssl, ssl_server_hostname)
        if ignored:
            logger.debug("ignoring ClientStorage options %s", sorted(ignored))
        addresses = normalize_addresses(addr)
        self._storage_name = storage
        self._name = name or "%s %s" % (
            ", ".join(map(str, addresses)), storage)
        self._read_only = bool(read_only)
        self._server_sync = bool(server_sync)
        self._drop_cache_rather_verify = bool(drop_cache_rather_verify)
        if client is None:
            cache_path = None
            self._cache = ClientCache(cache_size)
        else:
            cache_path = cache_file_path(client, storage, var)
            self._cache = FileClientCache(cache_path, cache_size)
        self._tracer = open_tracer(trace_path(cache_trace, cache_path))
        if self._tracer is not None:
            self._cache.set_tracer(self._tracer)
        self._blobs = None
        if blob_dir is not None:
            try:
                self._blobs = open_blobs(
                    blob_dir, shared_blob_dir, blob_cache_size,
                    blob_cache_size_check, name or str(addresses[0]))
            except ValueError as error:
                self._close_cache()
                raise ClientStorageError(str(error)) from None
            self.fshelper = self._blobs.fshelper  # ZODB's blob copy uses it
            zope.interface.alsoProvides(
                self, ZODB.interfaces.IBlobStorageRestoreable)
        self._db = None
        self._info = {"length": 0, "size": 0, "supportsUndo": False,
                      "interfaces": ()}
        #: `(module, name)` of the server storage's interfaces (from
        #: get_info at each connection; empty before the first).
        self._server_interfaces = set()
        self._oids = []
        self._oid_lock = threading.Lock()
        self._commit = None
        self._commit_changed = threading.Condition()
        self._iterator_garbage = IteratorGarbage()
        self._closed = False
        self._link = ConnectionManager(
            addresses, storage, _ServerEvents(self),
            read_only=self._read_only, read_only_fallback=read_only_fallback,
            client_label=client_label,
            retry=retry,
            name=name or str(addresses[0]), busy_poll=busy_poll,
            heartbeat_timeout=heartbeat_timeout, tls=tls)
        try:
            self._link.connect(wait, DEFAULT_WAIT_TIMEOUT
                               if wait_timeout is None else wait_timeout)
        except BaseException:
            self.close()
            raise

    # -- connection ----------------------------------------------------------

    def is_connected(self, test=False):
        """Whether the storage has a usable connection to a server."""
        return self._link.is_connected()

    def new_addr(self, addr):
        """Use `addr` (same forms as the constructor's) from the next
        connection on."""
        self._link.addresses = normalize_addresses(addr)

    def server_status(self):
        """The server's statistics for our storage (PROTOCOL.md 11.1)."""
        return self._call("server_status")

    def sync(self, force=True):
        """With `server_sync`, a round trip that brings in every
        invalidation the server sent before it (PROTOCOL.md 9, rule 9)."""
        if self._server_sync:
            self._call("ping")

    def _call(self, method, *args):
        return self._link.connection.call(method, *args)

    # -- IStorage: information ------------------------------------------------

    def getName(self):
        return self._name

    def sortKey(self):
        return "%s:%s" % (self._storage_name, self._name)

    def getSize(self):
        return self._info.get("size", 0)

    def __len__(self):
        return self._info.get("length", 0)

    def isReadOnly(self):
        return self._read_only or (self._link.is_connected()
                                   and self._link.is_read_only())

    def supportsUndo(self):
        return bool(self._info.get("supportsUndo"))

    def lastTransaction(self):
        return self._cache.last_tid() or z64

    def registerDB(self, db):
        """Remember the database to tell about invalidations."""
        self._db = db
        ConflictResolvingStorage.registerDB(self, db)

    def history(self, oid, size=1):
        return self._call("history", oid, size)

    def record_iternext(self, next=None):
        return self._call("record_iternext", next)

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self._name)

    # -- IStorage: loads ------------------------------------------------------

    def loadBefore(self, oid, tid):
        """`(data, start, end)` of the revision before `tid`, or None."""
        cached = self._cache.load_before(oid, tid)
        if cached is not None:
            return cached
        waiter = self._link.connection.load_before(
            oid, tid, apply=self._loaded(oid))
        return waiter.wait()

    def _loaded(self, oid):
        """The reply handler of a load: caches the revision, on the reader
        thread, before the caller is woken."""
        cache = self._cache

        def apply(result):
            if result is not None and result[0] is not None:
                data, start, end = result
                cache.store(oid, start, end, data)
        return apply

    def load(self, oid, version=''):
        """`(data, tid)` of the current revision of `oid`."""
        cached = self._cache.load_current(oid)
        if cached is not None:
            return cached[:2]
        # No cached revision answers maxtid: ask the server directly.
        result = self._link.connection.load_before(
            oid, maxtid, apply=self._loaded(oid)).wait()
        if result is None:
            raise POSKeyError(oid)
        return result[:2]

    def loadSerial(self, oid, serial):
        return self._call("loadSerial", oid, serial)

    def getTid(self, oid):
        """The tid of the current revision of `oid` (from the server)."""
        return self._call("getTid", oid)

    def prefetch(self, oids, tid):
        """Start loading `oids` as of before `tid` without waiting."""
        connection = self._link.connection
        for oid in oids:
            if self._cache.load_before(oid, tid) is None:
                connection.load_before(oid, tid, apply=self._loaded(oid))

    # -- IStorage: oids -------------------------------------------------------

    def new_oid(self):
        """The next oid, from batches of 100 the server allocates."""
        if self.isReadOnly():
            raise ReadOnlyError()
        with self._oid_lock:
            if not self._oids:
                self._oids = list(reversed(self._call("new_oids")))
            return self._oids.pop()

    # -- undo, pack, iteration ------------------------------------------------

    def undoLog(self, first=0, last=-20, filter=None):
        if filter is not None:
            return []
        return self._call("undoLog", first, last)

    def undoInfo(self, first=0, last=-20, specification=None):
        return self._call("undoInfo", first, last, specification)

    def pack(self, t=None, referencesf=None, wait=True, days=0):
        """Pack the server's storage to time `t` minus `days` (the server
        finds references itself, so `referencesf` is ignored)."""
        if t is None:
            t = time.time()
        return self._call("pack", t - days * 86400, wait)

    def iterator(self, start=None, stop=None):
        return TransactionIterator(self._link.connection,
                                   self._iterator_garbage, start, stop)

    def copyTransactionsFrom(self, other, verbose=0):
        """Copy every transaction of `other` into this storage (with
        their blobs, if we have a blob directory)."""
        if self._blobs is not None:
            ZODB.blob.copyTransactionsFromTo(other, self)
        else:
            ZODB.BaseStorage.copy(other, self, verbose)

    # -- closing --------------------------------------------------------------

    def close(self):
        """Disconnect and stop every thread of this storage.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._link.close()
        self._close_cache()
        if self._blobs is not None:
            self._blobs.close()

    def _close_cache(self):
        """Close the cache trace and release a persistent cache's file and
        lock (after the link is closed: whoever reads the socket writes to
        the cache)."""
        if self._tracer is not None:
            self._cache.set_tracer(None)
            self._tracer.close()
        if isinstance(self._cache, FileClientCache):
            self._cache.close()

    # -- what the connection layer tells us -----------------------------------

    def _verify(self, connection, server_tid):
        """Bring the cache up to date with a server we just registered
        with; return the tid it is now current to (PROTOCOL.md 8.1).

        Only what changed is invalidated when the server can tell
        (`getInvalidations`); otherwise the changes are read from the
        server's history when that costs less than reloading the cache,
        else the cache is dropped and ZODB told to drop its object caches
        too.  A server whose last transaction is older than the cache's
        (restored from a backup, or another database) is refused: using
        it would serve data the application has seen replaced.
        """
        cache = self._cache
        cache_tid = cache.last_tid()
        name = self.getName()
        if cache_tid is None:
            if len(cache):
                self._drop_cache("%s: the cache has no last transaction; "
                                 "dropped it" % name)
            else:
                logger.info("%s: empty cache, nothing to verify", name)
            cache.set_last_tid(server_tid)
            return server_tid
        if cache_tid > server_tid:
            message = ("%s: refusing server %s: its last transaction %s is "
                       "older than the cache's %s (restored from a backup, "
                       "or a different database?); will keep retrying"
                       % (name, connection.label, server_tid.hex(),
                          cache_tid.hex()))
            logger.critical(message)
            raise ServerBehindCache(message)
        if cache_tid == server_tid:
            logger.info("%s: cache is current at %s", name, cache_tid.hex())
            return server_tid
        answer = connection.call("getInvalidations", cache_tid,
                                 timeout=CONNECT_TIMEOUT)
        if answer is not None:
            tid, oids = answer
            self._invalidate_missed(cache_tid, tid, oids)
            logger.info("%s: quick verification: %d objects changed "
                        "between %s and %s", name, len(oids), cache_tid.hex(),
                        tid.hex())
            return tid
        if not self._drop_cache_rather_verify:
            changes = self._changes_since(connection, cache_tid, len(cache))
            if changes is not None:
                tid, oids = changes
                self._invalidate_missed(cache_tid, tid, oids)
                logger.info("%s: verified from the server's history: %d "
                            "objects changed between %s and %s", name,
                            len(oids), cache_tid.hex(), tid.hex())
                return tid
        self._drop_cache("%s: cache too old (last transaction %s, the "
                         "server's %s); dropped it"
                         % (name, cache_tid.hex(), server_tid.hex()))
        cache.set_last_tid(server_tid)
        return server_tid

    def _invalidate_missed(self, cache_tid, tid, oids):
        """Transactions after `cache_tid` up to `tid` changed `oids`.

        We do not know at which tid each one changed, so its cached
        revision is kept only for snapshots up to `cache_tid`.
        """
        valid_until = next_tid(cache_tid)
        oids = list(oids)
        for oid in oids:
            self._cache.invalidate(oid, valid_until)
        if self._db is not None:
            self._db.invalidate(tid, oids)
        self._cache.set_last_tid(tid)

    def _changes_since(self, connection, cache_tid, budget):
        """`(last tid, oids)` of the transactions after `cache_tid`, read
        from the server's history; None once that has read more than
        `budget` records (reloading the cache would be cheaper)."""
        oids = set()
        last_tid = None
        records = 0
        transactions = TransactionIterator(
            connection, self._iterator_garbage, next_tid(cache_tid), None)
        try:
            for transaction_record in transactions:
                for record in transaction_record:
                    records += 1
                    if records > budget:
                        return None
                    oids.add(record.oid)
                last_tid = transaction_record.tid
        finally:
            transactions.close()
        if last_tid is None:
            return None
        return last_tid, oids

    def _drop_cache(self, message):
        """Forget every cached object, here and in ZODB's object caches."""
        self._cache.clear()
        if self._db is not None:
            self._db.invalidateCache()
        logger.info(message)

    def _connected(self, info, read_only):
        self._info.update(info)
        provided = self._server_interfaces = {
            tuple(pair) for pair in info.get("interfaces", ())}
        for interface in OPTIONAL_INTERFACES:
            if (interface.__module__, interface.__name__) in provided:
                zope.interface.alsoProvides(self, interface)
        if self._blobs is not None and self._server_lacks_blobs():
            logger.warning("%s: the server's storage does not support "
                           "blobs: blob operations will fail",
                           self.getName())

    def _invalidate_transaction(self, tid, oids):
        """Another client committed `tid`: end our cached revisions, tell
        ZODB, then advance the last tid (in that order; see tpc_finish)."""
        for oid in oids:
            self._cache.invalidate(oid, tid)
        if self._db is not None:
            self._db.invalidate(tid, oids)
        self._cache.set_last_tid(tid)


class _ServerEvents:
    """The connection layer's view of a ClientStorage: the server's
    one-way calls and the connection's life cycle, kept out of the
    storage's public API."""

    def __init__(self, storage):
        self._storage = storage
        self._downloads = (Downloads() if storage._blobs is None
                           else storage._blobs.downloads)

    def invalidateTransaction(self, tid, oids):
        self._storage._invalidate_transaction(tid, list(oids))

    def info(self, info):
        self._storage._info.update(info)

    def receiveBlobStart(self, oid, tid):
        self._downloads.start(oid, tid)

    def receiveBlobChunk(self, oid, tid, chunk):
        self._downloads.chunk(oid, tid, chunk)

    def receiveBlobStop(self, oid, tid):
        self._downloads.stop(oid, tid)

    def verify(self, connection, server_tid):
        return self._storage._verify(connection, server_tid)

    def connected(self, info, read_only):
        self._storage._connected(info, read_only)

    def disconnected(self):
        logger.warning("%s: disconnected; reconnecting in the background",
                       self._storage.getName())


class ServerBehindCache(ClientStorageError):
    """The server's last transaction is older than the client cache's."""
