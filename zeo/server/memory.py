"""Giving memory back to the system once many clients have left.

A burst of connections (clients reconnecting after a restart, a batch
job starting hundreds of workers) makes every connection's thread
allocate, and glibc serves C allocations of many threads from several
arenas.  When the clients leave, everything is freed, but glibc keeps
the free pages inside its arenas for later use unless they happen to be
at the top of a heap: measured, about 2 to 3 MB per thousand connections
stayed resident after they had all gone.  `malloc_trim` hands such pages
back.  It walks every arena, so the server calls it once a burst of
closes is over, not per close: when at least `TRIM_AFTER` connections
have ended since the last call and none in the last `QUIET` seconds.

Python's own allocator keeps a 1 MiB arena as long as one object in it
lives; what a burst leaves there is not ours to return (see README.rst,
"What a connection costs").
"""

import ctypes
import logging
import threading
import time

logger = logging.getLogger(__name__)

#: Connections that must have ended since the last trim for another.
TRIM_AFTER = 100
#: Seconds without a connection ending before the trim (the burst is over).
QUIET = 1.0


def _find_malloc_trim():
    """glibc's `malloc_trim`, or None (another C library, or no ctypes
    access to the process's own symbols)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


class FreedMemory:
    """Counts ended connections and gives their freed memory back once a
    burst of them is over.

    `connection_ended` is called by each connection as it ends;
    `maybe_release` by a thread that runs anyway, every fraction of a
    second (the listener's accept loop).  `trim` and `clock` are for
    tests.
    """

    def __init__(self, trim=None, clock=time.monotonic, after=TRIM_AFTER,
                 quiet=QUIET):
        self._trim = trim if trim is not None else _MALLOC_TRIM
        self._clock = clock
        self._after = after
        self._quiet = quiet
        self._lock = threading.Lock()
        self._ended = 0
        self._last_end = float("-inf")
        #: Trims done, for tests and the curious.
        self.trims = 0

    def connection_ended(self):
        if self._trim is None:
            return
        now = self._clock()
        with self._lock:
            self._ended += 1
            self._last_end = now

    def maybe_release(self):
        """Trim if enough connections ended and the burst is over;
        whether it did."""
        if self._trim is None:
            return False
        with self._lock:
            if self._ended < self._after or \
                    self._clock() - self._last_end < self._quiet:
                return False
            ended, self._ended = self._ended, 0
        started = time.monotonic()
        self._trim(0)
        self.trims += 1
        logger.debug("%d connections ended: returned freed memory to the "
                     "system in %.1f ms", ended,
                     (time.monotonic() - started) * 1000)
        return True
