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

glibc also gives threads arenas of their own, up to eight per CPU, so
that threads rarely wait for each other's mallocs.  Our threads
allocate while holding Python's lock, so they seldom could, while the
memory each arena keeps after a burst adds up: with at most two
(instead of 16 on two CPUs), 1,000 idle connections cost 1 KiB less
each, and once they had gone the server kept 3.7 to 4.2 MB instead of
4.7 to 6.7 MB.  `limit_malloc_arenas` sets that limit at start-up,
unless the operator set `MALLOC_ARENA_MAX` in the environment.

Python's own allocator keeps a 1 MiB arena as long as one object in it
lives; what a burst leaves there is not ours to return.
"""

import ctypes
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

#: glibc's arenas for all threads (see the module's docstring).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h

#: Connections that must have ended since the last trim for another.
TRIM_AFTER = 100
#: Seconds without a connection ending before the trim (the burst is over).
QUIET = 1.0


def _glibc_function(name, *argtypes):
    """A function of glibc's, or None (another C library, or no ctypes
    access to the process's own symbols)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_MALLOC_TRIM = _glibc_function("malloc_trim", ctypes.c_size_t)


def limit_malloc_arenas(environ=os.environ):
    """Let glibc make at most MALLOC_ARENAS arenas, unless the operator
    chose with MALLOC_ARENA_MAX (glibc reads it itself).  Called once at
    start-up, before the connection threads; whether it set the limit."""
    mallopt = _glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None or "MALLOC_ARENA_MAX" in environ:
        return False
    return bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


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
        logger.debug("%d connections ended: returned freed memory to the "
                     "system in %.1f ms", ended,
                     (time.monotonic() - started) * 1000)
        return True
