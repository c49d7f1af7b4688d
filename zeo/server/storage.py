"""One served storage: its commit lock, publication lock, invalidations.

Every session registered on a storage shares one `ServedStorage`.  It owns
the three things that make a shared storage consistent for many clients:

* the commit lock (`CommitLock`), taken at vote and released at finish or
  abort, with a FIFO of parked voters;
* the publication lock: "apply a commit and publish its invalidation to
  every other session" (`zeo.server.fanout`) is atomic with respect to
  "read the storage for a reply and queue that reply" (PROTOCOL.md
  section 9, rules 2, 3, 6, 7);
* the invalidation queue that answers `getInvalidations`.
"""

import binascii
import collections
import contextlib
import logging
import threading
import time

import ZODB.FileStorage
import ZODB.MappingStorage
import ZODB.utils
from ZODB.POSException import ConflictError, StorageError

from zeo.server import blobs, conflict_globals, fanout, mvcc, publication
from zeo.server.commit_lock import CommitLock
from zeo.server.failed_writes import FailedWrite

logger = logging.getLogger(__name__)

z64 = ZODB.utils.z64

#: Storages whose methods may be called from many threads at once.  Calls
#: into any other storage are serialized by a per-storage lock.
THREAD_SAFE_STORAGES = (
    ZODB.FileStorage.FileStorage,
    ZODB.MappingStorage.MappingStorage,
)


class Statistics:
    """The counters of one storage, as `server_status` reports them.

    Loads are not counted here: each session counts its own (only its
    connection's thread loads, so that counter needs no lock) and
    `ServedStorage.status` adds them up.
    """

    COUNTERS = ("stores", "commits", "aborts", "active_txns", "conflicts",
                "conflicts_resolved")
    #: Ours, shown by the monitor only: server_status keeps ZEO's keys.
    BLOB_COUNTERS = ("blobs_received", "blob_bytes_received", "blobs_sent",
                     "blob_bytes_sent")

    def __init__(self):
        self._lock = threading.Lock()
        self.start = time.ctime()
        for name in self.COUNTERS + self.BLOB_COUNTERS:
            setattr(self, name, 0)

    def add(self, name, amount=1):
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self, names=COUNTERS):
        with self._lock:
            return {name: getattr(self, name) for name in names}


def never_resolve(oid, committed_serial, old_serial, new_pickle,
                  committed_data=b""):
    """Stand-in resolver for `client-conflict-resolution`: report, resolve
    nothing, so the storage never imports application classes."""
    raise ConflictError(oid=oid, serials=(committed_serial, old_serial),
                        data=new_pickle)


class ServedStorage:
    """A storage as the server shares it between sessions."""

    def __init__(self, name, storage, read_only=False,
                 invalidation_queue_size=100, invalidation_age=None,
                 client_conflict_resolution=False, trusted_globals=None):
        self.name = name
        self.storage = storage
        self.read_only = read_only or storage.isReadOnly()
        self.invalidation_age = invalidation_age
        self.client_conflict_resolution = client_conflict_resolution
        #: What the records of a resolved conflict may name (a
        #: `conflict_globals.TrustedGlobals`), in force while voting.
        self.trusted_globals = (trusted_globals
                                or conflict_globals.TrustedGlobals())
        if client_conflict_resolution:
            storage.tryToResolveConflict = never_resolve
            self.trusted_globals = conflict_globals.NOTHING_TRUSTED
        conflict_globals.install()
        #: Whether the storage has blobs (asked once: every blob call
        #: checks, and asking the interface costs more than the check).
        self.has_blobs = blobs.serves_blobs(storage)
        if self.has_blobs:
            blobs.remove_orphans(storage)
        self.stats = Statistics()
        self.commit_lock = CommitLock()
        #: Held while a pack runs: one pack per storage at a time.
        self.packing = threading.Lock()
        self.publication = publication.new_lock()
        #: An IMVCCStorage (RelStorage): one instance, its view moved by
        #: polls (see zeo/server/mvcc.py).
        self.mvcc = mvcc.is_mvcc(storage)
        #: Whether calls into the storage must hold `access` (a hot path
        #: may then skip even a no-op context manager).
        self.serialized = self.mvcc or not isinstance(storage,
                                                      THREAD_SAFE_STORAGES)
        if self.mvcc:
            # What a read saw and what was published must be one fact.
            self.access = self.publication
        elif self.serialized:
            self.access = threading.RLock()
        else:
            self.access = contextlib.nullcontext()
        #: What a published read holds while it reads and queues its reply
        #: (`zeo.server.publication`): the lock shared where it has a
        #: shared side (GIL off), so reads run in parallel, or exclusively
        #: for an IMVCCStorage, whose reads hold `access` (the same lock)
        #: and move its one view.
        self.read_lock = (self.publication if self.mvcc
                          else publication.read_side(self.publication))
        self.sessions = []
        #: Commits published to the sessions, and the thread sending them.
        self._published = fanout.InvalidationLog()
        self._fanout = fanout.Fanout(name, self.sessions)
        #: Loads of the sessions that left (see `loads`).
        self._loads_of_gone_sessions = 0
        self._invalidations = collections.deque(
            maxlen=max(invalidation_queue_size, 1))
        self._fill_invalidation_queue()
        #: Test hook: called with (session, oid) between a load's storage
        #: read and the queueing of its reply, under the publication lock.
        self.after_load_read = None
        self._size_info = None
        self._size_lock = threading.Lock()
        #: Why commits are refused (set once a tpc_finish failed), and
        #: since when; None while the storage commits normally.
        self.commit_refusal = None
        self.refusing_since = None
        #: What a vote that failed to write may have left in the file.
        self.failed_write = FailedWrite(name, storage)

    def _fill_invalidation_queue(self):
        last_invalidations = getattr(self.storage, "lastInvalidations", None)
        entries = []
        if last_invalidations is not None:
            entries = last_invalidations(self._invalidations.maxlen)
        if not entries:
            entries = [(self.storage.lastTransaction() or z64, [])]
        self._invalidations.clear()
        self._invalidations.extend(entries)

    # -- sessions -----------------------------------------------------------

    def join(self, session):
        """Add a session to the broadcast list; return the last tid.

        Both happen under the publication lock, so a commit lands either
        before (its tid <= the one returned) or after (its invalidation is
        queued to the new session): none is lost (rule 6).
        """
        with self.publication:
            self.sessions.append(session)
            session.follow(self._published)
            return self.last_transaction()

    def leave(self, session):
        with self.publication:
            if session in self.sessions:
                self.sessions.remove(session)
                session.follow(None)
                self._loads_of_gone_sessions += session.loads

    def loads(self):
        """Loads served since start: those of the sessions that left and
        those of the registered ones, counted together under the
        publication lock, so a leaving session is counted exactly once."""
        with self.publication:
            return self._loads_of_gone_sessions + sum(
                session.loads for session in self.sessions)

    def loads_without_waiting(self):
        """`loads()` for a metrics scrape, which must not take the
        publication lock.  While a session leaves, this may miss its
        loads for a moment (it is out of the list, its loads not yet
        added): the caller keeps the counter from going back."""
        return self._loads_of_gone_sessions + sum(
            session.loads for session in list(self.sessions))

    def last_transaction(self):
        if self.mvcc:
            # The storage's view may be ahead of what we published: a
            # client told that newer tid would refuse the invalidations
            # still due before it.
            return self._invalidations[-1][0]
        return self.storage.lastTransaction() or z64

    def synced_last_transaction(self):
        """The last tid, after publishing what other servers committed
        (a client's server sync must see those too)."""
        if self.mvcc:
            with self.publication:
                published = self._catch_up()
            if published:
                self._fanout.wake()
        return self.last_transaction()

    def before_vote(self):
        """An IMVCCStorage votes from a view at least as new as every
        other server's last commit (RelStorage checks conflicts and its
        cache against that view), and those commits are published
        first; `access` held."""
        if self.mvcc and self._catch_up():
            self._fanout.wake()

    def poll_database(self):
        """Publish the commits other servers made since our last poll."""
        with self.publication:
            published = self._catch_up()
        if published:
            self._fanout.wake()

    def _catch_up(self):
        """Poll an IMVCCStorage and publish what others committed to every
        session, as one invalidation (publication lock held).  Returns
        whether there was any."""
        tid, oids = mvcc.changes_since(self.storage, self.last_transaction())
        if tid is None:
            return False
        self._publish(tid, oids)
        return True

    # -- commits ------------------------------------------------------------

    def finish(self, committer, transaction, changed_oids):
        """Commit a voted transaction and publish it.

        Under the publication lock: the storage's tpc_finish, the queue
        append, and the invalidation published to every other session.  No
        load reply computed before the commit can then follow its
        invalidation.

        Returns the tid.  The invalidation is published, not sent: the
        fan-out thread sends it (`zeo.server.fanout`), and neither the
        committer nor the next voter waits for that.
        """
        tids = []
        with self.publication:
            try:
                with self.access:
                    returned = self.storage.tpc_finish(transaction,
                                                       tids.append)
            except Exception as error:
                failure = error
            else:
                failure = None
                tid = tids[0] if tids else returned
                if self.mvcc:
                    changed_oids = self._with_foreign_changes(
                        tid, changed_oids, committer)
                self._publish(tid, changed_oids, committer)
        if failure is not None:
            raise self._refuse_commits(failure) from failure
        self._fanout.wake()
        self.stats.add("commits")
        if not self.mvcc:  # refreshed by the poller, never in the lock
            self._size_info = None
        return tid

    def _refuse_commits(self, failure):
        """A voted transaction failed to finish: stop committing.

        The storage said yes at vote, so the transaction may be written in
        part, or in full, or the storage may have closed itself (FileStorage
        does); ZODB calls its state unknown.  Going on could pile commits on
        a damaged file, so every later vote is refused until an operator
        restarts the server, which reopens (and so checks and repairs) the
        storage.  Loads go on.  Runs before the commit lock is released, so
        no parked voter slips through.  Returns the committer's error.
        """
        # Since first: the monitor reads the two without a lock.
        self.refusing_since = time.time()
        self.commit_refusal = (
            "a voted transaction failed to finish (%s: %s); the storage may "
            "be in an unknown state" % (type(failure).__name__, failure))
        logger.critical(
            "storage %s: %s.  Refusing every commit to it until an operator "
            "checks the storage and restarts the server; loads go on.",
            self.name, self.commit_refusal, exc_info=failure)
        return StorageError(
            "storage %s: the transaction failed after the vote (%s: %s); it "
            "may or may not be committed.  The server refuses commits to "
            "this storage until an operator restarts it."
            % (self.name, type(failure).__name__, failure))

    def could_not_write(self, error):
        """The error a client gets when its vote failed on an `OSError`.

        Typically ENOSPC or EFBIG from a full disk or a file-size limit.
        The vote was aborted, so nothing was written, and commits work
        again once the storage can write: the message says so, with the
        system's own words, since a bare OSError would not tell the client
        whether its transaction is in.
        """
        return StorageError(
            "storage %s could not write the transaction: %s; nothing was "
            "committed" % (self.name, error))

    def refused_commit_error(self):
        """The error for a commit (or pack) while commits are refused, or
        None."""
        if self.commit_refusal is None:
            return None
        return StorageError(
            "storage %s refuses commits since %s: %s; an operator must "
            "restart the server" % (self.name, time.ctime(
                self.refusing_since), self.commit_refusal))

    def _with_foreign_changes(self, tid, changed_oids, committer):
        """Add to our commit's invalidation what other servers committed
        since our last poll, and queue those to the committer, before
        its reply (publication lock held).

        They may be older than our tid or, if they came right after it,
        newer: invalidating an object sooner than needed only drops it
        from caches, and the next poll publishes the newer ones again at
        their own tid.
        """
        _newest, foreign = mvcc.changes_since(self.storage,
                                              self.last_transaction())
        ours = set(changed_oids)
        foreign = [oid for oid in foreign if oid not in ours]
        if not foreign:
            return changed_oids
        committer.queue_invalidation(tid, foreign)
        return list(changed_oids) + foreign

    def _publish(self, tid, oids, committer=None):
        """Record a commit and publish its invalidation to every session
        but the committer's (publication lock held)."""
        self._invalidations.append((tid, oids))
        self._published.append(tid, oids, committer)

    def publish_foreign_commit(self, tid, oids):
        """A commit made behind our back (the storage is itself a client
        of another server): queue it and tell every session."""
        with self.publication:
            self._publish(tid, oids)
        self._fanout.wake()
        self._size_info = None

    @property
    def invalidation_queue_length(self):
        return len(self._invalidations)

    def newest_queued_transaction(self):
        """The last transaction published, read without a lock (for a
        metrics scrape); None if the queue is being refilled."""
        try:
            return self._invalidations[-1][0]
        except IndexError:
            return None

    def get_invalidations(self, tid):
        """`(latest_tid, oids)` committed after `tid`, or None if unknown."""
        with self.publication:
            entries = list(self._invalidations)
        if entries and entries[0][0] <= tid:
            oids = set()
            for entry_tid, entry_oids in reversed(entries):
                if entry_tid <= tid:
                    break
                oids.update(entry_oids)
            return entries[-1][0], list(oids)
        if self.invalidation_age and self._younger_than_age(tid):
            return self._invalidations_by_iteration(tid)
        logger.info("storage %s: tid %s is older than the invalidation queue",
                    self.name, tid_hex(tid))
        return None

    def _younger_than_age(self, tid):
        age = time.time() - ZODB.TimeStamp.TimeStamp(tid).timeTime()
        return age < self.invalidation_age

    def _invalidations_by_iteration(self, tid):
        oids = set()
        latest = tid
        start = ZODB.utils.p64(ZODB.utils.u64(tid) + 1)
        with self.access:
            for transaction in self.storage.iterator(start):
                oids.update(record.oid for record in transaction)
                latest = transaction.tid
        return latest, list(oids)

    def invalidate_all(self):
        """The storage says every cache is stale: rebuild the queue and
        disconnect every session, so clients reconnect and verify."""
        with self.publication:
            self._fill_invalidation_queue()
            sessions = list(self.sessions)
        for session in sessions:
            session.disconnect("storage invalidated all caches")

    # -- information ----------------------------------------------------------

    def size_info(self):
        """`{'length', 'size'}` for `info` messages, cached between commits
        (for an IMVCCStorage, refreshed by the database poller)."""
        info = self._size_info
        if info is None:
            info = self.refresh_size_info()
        return info

    def refresh_size_info(self):
        # RelStorage computes sizes on connections of its own: no need to
        # hold up every read while it does.  Any other storage counts
        # under the publication lock, which `finish` holds around
        # tpc_finish: FileStorage's len() walks its index without a lock
        # of its own, and without the GIL a walk racing the commit's
        # index update could read freed memory.  (The walk visits one
        # bucket per 65536 oids: microseconds.)
        with contextlib.ExitStack() as held:
            held.enter_context(self._size_lock)
            if not self.mvcc:
                held.enter_context(self.publication)
                held.enter_context(self.access)
            info = {"length": len(self.storage),
                    "size": self.storage.getSize()}
        self._size_info = info
        return info

    def forget_size_info(self):
        self._size_info = None

    def broadcast(self, method, *args):
        """Queue a one-way call to every session of this storage."""
        with self.publication:
            sessions = list(self.sessions)
        for session in sessions:
            session.push(method, *args)

    def status(self, transaction_timeout_alive):
        """The `server_status` dictionary, with ZEO's exact keys."""
        status = self.stats.snapshot()
        status["loads"] = self.loads()
        status["connections"] = len(self.sessions)
        status["lock_time"] = self.commit_lock.acquired_at
        status["waiting"] = self.commit_lock.waiting
        status["start"] = self.stats.start
        status["timeout-thread-is-alive"] = transaction_timeout_alive
        status["last-transaction"] = tid_hex(self.last_transaction())
        return status

    def monitor_snapshot(self):
        """`(sessions, queue)` for the monitor report, copied at once.

        `sessions` is a copy of the registered sessions; `queue` is
        `(transactions, oldest_tid, newest_tid)` of the invalidation queue.
        The publication lock is held only for the two copies, never while
        anything is formatted, so a commit waits for microseconds at most.
        """
        with self.publication:
            sessions = list(self.sessions)
            queued = len(self._invalidations)
            oldest = self._invalidations[0][0]
            newest = self._invalidations[-1][0]
        return sessions, (queued, oldest, newest)

    def pack(self, t, referencesf):
        """Pack (in the pack worker).  An IMVCCStorage packs through an
        instance of its own, so the served one is not used from two
        threads at once and reads go on meanwhile."""
        if not self.mvcc:
            self.storage.pack(t, referencesf)
            return
        instance = self.storage.new_instance()
        try:
            instance.pack(t, referencesf)
        finally:
            instance.release()

    def close(self):
        self._fanout.stop()
        with self.access:
            try:
                self.failed_write.cut()
            except OSError:
                pass  # the next open drops the unfinished transaction
            self.storage.close()


def tid_hex(tid):
    return binascii.hexlify(tid).decode("ascii")
