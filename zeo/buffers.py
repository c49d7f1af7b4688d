"""Things lent for one use at a time: receive buffers, picklers.

A server holds thousands of connections that are idle nearly all the
time.  A large receive buffer owned by each (zero-filled, so resident)
was most of what an idle client cost, and freed ones fragmented the heap
so that the memory stayed with the process after the clients left.  So
a connection waits for its socket to become readable, borrows a buffer
for the read, and gives it back once what it read is copied out.  The
same goes, on a smaller scale, for the pickler that encodes a message
(`zeo.wire`): about 1 KB that a connection needs only while it encodes.

A receive buffer is an anonymous memory map, not a bytearray: its pages
become resident only as a read fills them (a bytearray is zero-filled,
so all of it is), and one dropped from the pool goes straight back to
the system instead of staying in the allocator's heap, where a burst of
connections reading at once would leave it behind.
"""

import functools
import mmap
import threading


class Pool:
    """Objects made by `make()`, lent with `take` and returned with `give`.

    The pool owns at most `keep` objects (about as many as are in use at
    once, not as many as there are connections), made as they are first
    needed.  When more are in use at once, spares are made, and dropped
    when given back; the pool keeps its own, not the spares, so the few
    long-lived objects were made early, not in the middle of a burst,
    where they would keep the allocator's memory for the whole burst
    (one live object holds on to a whole arena of Python's allocator).

    `take` and `give` take no lock of ours for the common case: a list's
    `pop` and `append` are each atomic under the GIL and on a
    free-threaded interpreter alike (there the list locks itself for the
    operation).  What the pool owns is a tuple, read without any lock,
    not a dict: on a free-threaded interpreter a dict looked up by an int
    key locks itself, and with every connection's thread asking it twice
    per message, threads queued on that one lock (16 busy clients cost
    three times the CPU per load).  An object that may be in a bad state
    (an interrupted pickler) is given to `discard` instead.
    """

    def __init__(self, make, keep=8):
        self._make = make
        self._keep = keep
        self._free = []
        #: The objects the pool owns, and their ids: tuples, replaced
        #: whole (under `_lock`) when one is added or dropped, so that
        #: `give` reads them without any lock (see the class docstring).
        self._own = ()
        self._own_ids = ()
        self._lock = threading.Lock()

    def take(self):
        try:
            return self._free.pop()
        except IndexError:
            pass
        item = self._make()
        if len(self._own) < self._keep:
            with self._lock:
                if len(self._own) < self._keep:
                    self._set_own(self._own + (item,))
        return item

    def give(self, item):
        # An id stays unique while its object lives, and ours live as
        # long as they are in `_own`.
        if id(item) in self._own_ids:
            self._free.append(item)

    def discard(self, item):
        """Forget `item` (not to be lent again); a new one replaces it."""
        with self._lock:
            self._set_own(tuple(own for own in self._own
                                if own is not item))

    def _set_own(self, own):
        """Replace what the pool owns (`_lock` held)."""
        self._own_ids = tuple(map(id, own))
        self._own = own


class BufferPool(Pool):
    """Writable buffers of `size` bytes (memoryviews of anonymous maps)."""

    def __init__(self, size, keep=8):
        super().__init__(functools.partial(_anonymous_buffer, size), keep)


def _anonymous_buffer(size):
    return memoryview(mmap.mmap(-1, size))
