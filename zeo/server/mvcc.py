"""Serving an IMVCCStorage (RelStorage), alone or with other servers.

DESIGN.  A RelStorage instance is single-threaded and sees the database
as of its last poll.  Two ways to serve one were possible:

* one instance per session (`new_instance()`), each polled on its own;
* one instance for the whole server, every call to it serialized.

We serve one instance, serialized, because of PROTOCOL.md section 9: a
client must never receive an object older than an invalidation it has
been sent.  The server decides which invalidations every client gets, so
it must know, for each reply, what the instance that computed it had seen.
With one instance that is one fact, kept under the storage's publication
lock: a poll and the queueing of what it found are one step, and every
read runs under that same lock (`ServedStorage.access` *is* the
publication lock), so a reply computed before a poll is queued before the
poll's invalidations, and one computed after reflects them.  With an
instance per session, each session's view would move on its own schedule
and every session would need its own invalidation stream reconciled with
the shared one, for no gain: a RelStorage call is a database round trip,
and the commit lock already serializes writes.  What serializing costs is
that loads wait for each other and for votes (not for the client's
upload, nor for its round trip between vote and finish); the bench's
RelStorage section measures it.

Loads stay consistent even though RelStorage moves an instance's view
forward on its own (after every commit or abort): a client loads with
`loadBefore(oid, its last tid + 1)`, which RelStorage answers from the
object's history, not from "the current state", so a view that is ahead
of what was published cannot hand a client data newer than its tid.

Commits made through other servers are found by polling: every
`poll-interval` seconds (`DatabasePoller`), before answering
`lastTransaction` (a client's server sync), before every vote (RelStorage
checks conflicts against its view, which must then be current) and right
after every `tpc_finish`.  The last one keeps the order of tids: what it
finds was mostly committed before our transaction, so it joins our
commit's invalidation and reaches the committer ahead of its reply.  A
poll lists objects at the tid of their current revision only (see
`changes_since`), so what one poll finds is published as one
invalidation, at the newest tid it saw (or at our commit's); a client
may thus drop an object from its cache a little sooner than it must,
never later.
"""

import logging
import re
import threading
import time

import ZODB.interfaces
from ZODB.POSException import ConflictError
from ZODB.utils import p64, u64

logger = logging.getLogger(__name__)

#: Seconds between two polls of the database, unless configured.
DEFAULT_POLL_INTERVAL = 0.1

#: Seconds between two refreshes of a storage's size statistics (object
#: count and database size), which cost RelStorage database connections
#: of their own and so are never computed during a commit.
SIZE_REFRESH_INTERVAL = 10.0


def is_mvcc(storage):
    return ZODB.interfaces.IMVCCStorage.providedBy(storage)


#: What RelStorage's CacheConsistencyError says about the object.
_CACHE_ERROR_FIELDS = re.compile(
    r"'(oid_int|actual_tid_int|expect_tid_int)': (\d+)")


def view_conflict(error, changes):
    """A ConflictError for RelStorage's refusal to resolve a conflict from
    a view it cannot see, or None for any other error.  `changes` are
    the transaction's `(operation, args)`, for the object's new state.

    RelStorage resolves a write conflict from the state the transaction
    started from, which it takes from its local cache or else from its
    own view, assuming that view is the transaction's.  Here it is the
    server's, usually newer than the client's; RelStorage notices the
    mismatch and raises CacheConsistencyError rather than resolve from
    the wrong state.  For the client that is an ordinary conflict: its
    view was stale, and a retry from a fresh one will do.  The error
    names the object and both serials, as a conflict error should.
    """
    if not any(cls.__name__ == "CacheConsistencyError"
               and cls.__module__.startswith("relstorage")
               for cls in type(error).__mro__):
        return None
    fields = {name: int(value)
              for name, value in _CACHE_ERROR_FIELDS.findall(str(error))}
    if len(fields) < 3:
        return ConflictError("the transaction's view is older than the "
                             "database's; retry")
    oid = p64(fields["oid_int"])
    data = next((args[2] for operation, args in changes
                 if operation == "store" and args[0] == oid), None)
    return ConflictError(oid=oid, data=data,
                         serials=(p64(fields["actual_tid_int"]),
                                  p64(fields["expect_tid_int"])))


def changes_since(storage, tid):
    """Move `storage`'s view to the database's present; return what was
    committed after `tid` as `(newest_tid, oids)`, `newest_tid` None if
    nothing was.

    RelStorage's own `poll_invalidations()` moves the view but does not
    name the transactions (nor, on its first polls, the objects); so the
    changes are read, in the same snapshot, with the query RelStorage
    polls with (its adapter's poller).  That query reads the current
    state of each object, so an object changed twice is listed at its
    newest tid only: the changes can only be published together, at the
    newest tid.  Published per transaction, an object changed by an
    older one and again by a newer one would stay cached, stale, in a
    client that has applied the older one only.
    """
    storage.poll_invalidations()
    try:
        poller = storage._adapter.poller
        connection = storage._load_connection
    except AttributeError:
        raise TypeError("%s is not a RelStorage this server knows how to "
                        "poll" % type(storage).__name__) from None
    rows, _newest = poller.poll_invalidations(
        connection.connection, connection.cursor, u64(tid))
    rows = list(rows or ())
    if not rows:
        return None, []
    newest = max(tid_int for _oid_int, tid_int in rows)
    return p64(newest), sorted({p64(oid_int) for oid_int, _tid in rows})


class DatabasePoller:
    """The thread that polls the database of every served IMVCCStorage.

    It also refreshes their size statistics now and then, outside every
    lock.  A poll that fails (the database is down) is logged once, and
    again when polls succeed again; polling goes on meanwhile.
    """

    def __init__(self, served_storages, interval=DEFAULT_POLL_INTERVAL):
        self._served = [served for served in served_storages if served.mvcc]
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self._failing = set()

    def start(self):
        if not self._served or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name="zeo-database-poller", daemon=True)
        self._thread.start()

    def _run(self):
        sizes_due = time.monotonic() + SIZE_REFRESH_INTERVAL
        while not self._stop.wait(self.interval):
            for served in self._served:
                self._guarded(served, served.poll_database, "poll")
            if time.monotonic() >= sizes_due:
                sizes_due = time.monotonic() + SIZE_REFRESH_INTERVAL
                for served in self._served:
                    self._guarded(served, served.refresh_size_info,
                                  "size statistics")

    def _guarded(self, served, function, what):
        try:
            function()
        except Exception as error:
            if (served.name, what) not in self._failing:
                self._failing.add((served.name, what))
                logger.error("storage %s: %s failed: %s: %s; retrying "
                             "every %ss", served.name, what,
                             type(error).__name__, error, self.interval)
            return
        if (served.name, what) in self._failing:
            self._failing.discard((served.name, what))
            logger.info("storage %s: %s works again", served.name, what)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
