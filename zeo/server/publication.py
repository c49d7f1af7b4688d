"""The publication lock: shared by reads, exclusive for publishing.

PROTOCOL.md section 9 needs "read the storage and queue the reply" to be
atomic with respect to "apply a commit and publish its invalidation"
(rule 3: a reply computed before commit T leaves before T's
invalidation).  It does not need two reads to exclude each other, and a
plain lock made them: every load of every client waited for the one
before it, which serializes the load path however many CPUs a
free-threaded interpreter gives the connection threads, and keeps one
client's disk read from overlapping another's with the GIL too.

So reads that queue a reply hold the lock *shared* (`shared`), and
everything that changes what they may see holds it *exclusively* (the
lock itself, as a context manager): a commit's tpc_finish and
publication, a session joining or leaving, the invalidation queue.  The
exclusive side is reentrant for its thread, as the plain `RLock` was.
A writer that waits keeps new readers out, so a stream of loads never
starves a commit; the readers already in finish first.  The thread that
holds the lock exclusively may take it shared too (it excludes every
other reader already).  A thread holding it shared must not ask for it
exclusively: it would wait for itself.

With the GIL, only one thread runs Python at a time, and this lock,
written in Python, costs more than it gains: its own mutex is taken
twice per read, and a thread switched out while holding it puts the
others to sleep (4 and 64 busy clients: 15-20% more server CPU per
load, measured).  There `new_lock` gives the plain reentrant lock, which
reads hold as a whole, as before.
"""

import threading

from zeo.server.free_threading import gil_enabled


def new_lock():
    """The publication lock of a storage, for this interpreter."""
    return threading.RLock() if gil_enabled() else PublicationLock()


def read_side(lock):
    """What a read holds of `lock` (a `new_lock()`): its shared side, if
    it has one."""
    return lock.shared if isinstance(lock, PublicationLock) else lock


class PublicationLock:
    """A readers-writer lock with a reentrant writer and writer
    preference (see the module docstring)."""

    def __init__(self):
        self._mutex = threading.Lock()
        #: Signalled when the last reader leaves or the writer does.
        self._changed = threading.Condition(self._mutex)
        self._readers = 0
        self._writers_waiting = 0
        #: The thread holding the lock exclusively, and how often.
        self._writer = None
        self._depth = 0
        #: The shared side, as a context manager of its own (it is what a
        #: connection's table of calls holds for a read).
        self.shared = _SharedSide(self)

    def __enter__(self):
        me = threading.get_ident()
        if self._writer == me:  # only this thread sets it to its id
            self._depth += 1
            return self
        with self._mutex:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._changed.wait()
            except BaseException:  # interrupted: readers may go on
                self._writers_waiting -= 1
                self._changed.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = me
            self._depth = 1
        return self

    def __exit__(self, *exc_info):
        if self._depth > 1:
            self._depth -= 1
            return
        with self._mutex:
            self._depth = 0
            self._writer = None
            self._changed.notify_all()

    def acquire_shared(self):
        me = threading.get_ident()
        with self._mutex:
            if self._writer != me:
                while self._writer is not None or self._writers_waiting:
                    self._changed.wait()
            self._readers += 1

    def release_shared(self):
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._changed.notify_all()

    @property
    def readers(self):
        """How many threads hold the lock shared (for tests)."""
        return self._readers


class _SharedSide:
    """`with lock.shared:` holds `lock` shared."""

    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        self._lock.acquire_shared()
        return self

    def __exit__(self, *exc_info):
        self._lock.release_shared()
