"""A storage's commit lock (`CommitLock`): taken at vote, released at
finish or abort, and handed to parked voters in the order they asked."""

import collections
import threading
import time

from zeo.server.timing import TimeHistogram


class CommitLock:
    """The storage's commit lock, handed to parked voters in FIFO order.

    A voter that finds the lock held is parked with a callback instead of
    blocking its thread: the connection goes on serving loads.  Whoever
    releases the lock gets the next voter's callback back and runs it after
    leaving every lock, so a slow vote never runs under our mutex.

    How long voters waited for the lock and how long they held it are
    counted in `wait_times` and `hold_times`, under our mutex.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self.holder = None
        self.acquired_at = None
        self._granted = None  # time.monotonic() of the grant
        self._waiting = collections.OrderedDict()  # session -> (callback,
        #                                             asked at)
        self.wait_times = TimeHistogram()
        self.hold_times = TimeHistogram()

    @property
    def waiting(self):
        return len(self._waiting)

    def acquire_or_park(self, session, on_granted):
        """Take the lock now (True) or park `on_granted` for later (False)."""
        asked = time.monotonic()
        with self._mutex:
            if self.holder is None:
                self._grant(session, asked)
                return True
            self._waiting[session] = (on_granted, asked)
            return False

    def release(self, session):
        """Release the lock if `session` holds it, or unpark it.

        Returns the callback of the voter that now holds the lock, or None.
        The caller must run it (outside any lock it holds).
        """
        with self._mutex:
            if self.holder is not session:
                self._waiting.pop(session, None)
                return None
            self.hold_times.observe(time.monotonic() - self._granted)
            self.holder = self.acquired_at = self._granted = None
            if not self._waiting:
                return None
            next_session, (on_granted, asked) = self._waiting.popitem(
                last=False)
            self._grant(next_session, asked)
            return on_granted

    def held(self):
        """`(holder, acquired_at)`, read together."""
        with self._mutex:
            return self.holder, self.acquired_at

    def _grant(self, session, asked):
        self.holder = session
        self.acquired_at = time.time()
        self._granted = time.monotonic()
        self.wait_times.observe(self._granted - asked)
