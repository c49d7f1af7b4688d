"""Receive buffers lent for one read at a time.

A server holds thousands of connections that are idle nearly all the
time.  A large receive buffer owned by each (zero-filled, so resident)
was most of what an idle client cost, and freed ones fragmented the heap
so that the memory stayed with the process after the clients left.  So
a connection waits for its socket to become readable, borrows a buffer
for the read, and gives it back once what it read is copied out.
"""


class BufferPool:
    """Buffers of `size` bytes, lent with `take` and returned with `give`.

    `take` and `give` are a list's `pop` and `append`, each atomic under
    the GIL and on a free-threaded interpreter (where a list locks itself
    per operation), so no lock is taken per read.  (`give` checks the
    length before it appends: two threads may then keep one buffer more
    than `keep`, which is harmless.)  The pool keeps at most `keep` free
    buffers: about as many as connections read at once, not as many as
    are connected; more are made when more read at once, and dropped when
    given back.
    """

    def __init__(self, size, keep=8):
        self._size = size
        self._keep = keep
        self._free = []

    def take(self):
        try:
            return self._free.pop()
        except IndexError:
            return memoryview(bytearray(self._size))

    def give(self, buffer):
        if len(self._free) < self._keep:
            self._free.append(buffer)
