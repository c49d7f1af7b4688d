"""The client's object cache: revisions of objects, bounded in bytes.

An entry is one revision of one object: `(oid, start_tid) -> (data,
end_tid)`, where `end_tid` is None while the revision is current "as far
as the client knows", that is up to `last_tid()`, the newest transaction
whose invalidations the client has applied.  Only invalidations end a
current revision (PROTOCOL.md section 9), so:

* a current revision answers `load_before(oid, tid)` when
  `start < tid <= last_tid + 1`;
* a non-current one when `start < tid <= end`.

Entries are evicted least recently used first once their sizes add up to
more than the limit.  The cache is used by the connection's reader thread
and by application threads, so every method takes the cache's lock.

The interface is kept small (`load_before`, `store`, `invalidate`,
`set_last_tid`, `last_tid`, `clear`) so a persistent variant can replace
this one.
"""

import collections
import threading

from ZODB.utils import p64, u64

#: Bytes charged per entry on top of its data (keys, tids, bookkeeping).
ENTRY_OVERHEAD = 100


class ClientCache:
    """An in-memory LRU cache of object revisions."""

    def __init__(self, size=20 * 2 ** 20):
        self.limit = size
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()  # (oid, start): (data, end)
        self._by_oid = {}  # oid -> set of start tids
        self._current = {}  # oid -> start tid of the current revision
        self._size = 0
        self._last_tid = None

    def __len__(self):
        with self._lock:
            return len(self._entries)

    @property
    def size(self):
        """Bytes charged for the entries held now."""
        with self._lock:
            return self._size

    def last_tid(self):
        """The newest transaction applied to the cache, or None."""
        with self._lock:
            return self._last_tid

    def set_last_tid(self, tid):
        """Record that every invalidation up to `tid` has been applied.

        The last tid never goes backwards: a smaller value is ignored.
        """
        with self._lock:
            if self._last_tid is None or tid > self._last_tid:
                self._last_tid = tid

    def load_before(self, oid, tid):
        """`(data, start, end)` of the revision current before `tid`, or
        None when the cache cannot answer."""
        with self._lock:
            starts = self._by_oid.get(oid)
            if not starts:
                return None
            current = self._current.get(oid)
            if current is not None and current < tid and \
                    self._last_tid is not None and \
                    u64(tid) <= u64(self._last_tid) + 1:
                return self._hit(oid, current)
            for start in starts:
                if start < tid and start != current:
                    end = self._entries[oid, start][1]
                    if tid <= end:
                        return self._hit(oid, start)
            return None

    def _hit(self, oid, start):
        key = (oid, start)
        self._entries.move_to_end(key)
        data, end = self._entries[key]
        return data, start, end

    def store(self, oid, start, end, data):
        """Remember a revision; `end` None means it is current."""
        with self._lock:
            key = (oid, start)
            if end is None:
                current = self._current.get(oid)
                if current is not None and current != start:
                    self._remove((oid, current))
                self._current[oid] = start
            elif self._current.get(oid) == start:
                del self._current[oid]
            if key in self._entries:
                self._remove(key, keep_current=end is None)
            self._entries[key] = (data, end)
            self._by_oid.setdefault(oid, set()).add(start)
            self._size += len(data) + ENTRY_OVERHEAD
            self._evict()

    def invalidate(self, oid, tid):
        """Transaction `tid` changed `oid`: its current revision ends there."""
        with self._lock:
            start = self._current.pop(oid, None)
            if start is None:
                return
            if start >= tid:
                self._remove((oid, start))
            else:
                data, _end = self._entries[oid, start]
                self._entries[oid, start] = (data, tid)

    def forget(self, oid):
        """Drop every revision of `oid` (its state is uncertain)."""
        with self._lock:
            for start in list(self._by_oid.get(oid, ())):
                self._remove((oid, start))

    def clear(self):
        """Drop everything, including the last tid."""
        with self._lock:
            self._entries.clear()
            self._by_oid.clear()
            self._current.clear()
            self._size = 0
            self._last_tid = None

    def _remove(self, key, keep_current=False):
        oid, start = key
        data, _end = self._entries.pop(key)
        self._size -= len(data) + ENTRY_OVERHEAD
        starts = self._by_oid[oid]
        starts.discard(start)
        if not starts:
            del self._by_oid[oid]
        if not keep_current and self._current.get(oid) == start:
            del self._current[oid]

    def _evict(self):
        while self._size > self.limit and self._entries:
            key = next(iter(self._entries))
            self._remove(key)


def next_tid(tid):
    """The smallest tid after `tid`: what "before tid+1" loads use."""
    return p64(u64(tid) + 1)
