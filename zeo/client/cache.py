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
more than the limit.  The cache is used by whichever thread reads the
connection and by application threads, so every method takes the cache's
lock.

These rules are written once, for two caches:

* `RevisionIndex` maps `(oid, start)` to `(location, end)` in
  least-recently-used order and keeps the size accounting; it knows which
  revision answers a load, what storing and invalidating do to the current
  revision, and which entry is evicted next.
* `RevisionCache` is the interface (`load_before`, `store`, `invalidate`,
  `forget`, `set_last_tid`, `last_tid`, `clear`, `len()`, `size`) around
  an index, with the lock, the last tid and eviction.  Its subclasses only
  say where the data lives and, if they keep a journal, what to record.

`ClientCache`, here, keeps the data itself as the location; the persistent
`zeo.client.cache_file.FileClientCache` keeps the place of a record in its
file.
"""

import collections
import threading

from ZODB.utils import p64, u64

from zeo.client import trace

#: Bytes charged per entry on top of its data (keys, tids, bookkeeping).
ENTRY_OVERHEAD = 100


class RevisionIndex:
    """`(oid, start) -> (location, end)`, least recently used first.

    `data_size(location)` is the number of data bytes at a location; the
    size charged for an entry is that plus `ENTRY_OVERHEAD`.  Not locked:
    the cache that owns the index serializes its use.
    """

    def __init__(self, data_size):
        self._data_size = data_size
        self.clear()

    def clear(self):
        self._entries = collections.OrderedDict()  # key: [location, end]
        self._by_oid = {}  # oid -> set of start tids
        self._current = {}  # oid -> start tid of the current revision
        self.data_bytes = 0  # data bytes of all entries

    def restore(self, entries):
        """Replace the contents with `entries`, `(oid, start, end,
        location)` tuples least recently used first, as `items()` listed
        them.  Reopening a persistent cache does this for every entry at
        once, which costs a fraction of storing them one by one.
        """
        self.clear()
        ordered = self._entries
        by_oid = self._by_oid
        current = self._current
        data_size = self._data_size
        data_bytes = 0
        for oid, start, end, location in entries:
            ordered[oid, start] = [location, end]
            starts = by_oid.get(oid)
            if starts is None:
                by_oid[oid] = {start}
            else:
                starts.add(start)
            if end is None:
                current[oid] = start
            data_bytes += data_size(location)
        self.data_bytes = data_bytes

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    @property
    def size(self):
        """Bytes charged for the entries held now."""
        return self.data_bytes + len(self._entries) * ENTRY_OVERHEAD

    def oids(self):
        """The oids of which some revision is held (a snapshot)."""
        return list(self._by_oid)

    def holds(self, oid):
        """Whether some revision of `oid` is held."""
        return oid in self._by_oid

    def has_current(self, oid):
        """Whether the current revision of `oid` is held."""
        return oid in self._current

    def find_current(self, oid, last_tid):
        """The key of the current revision of `oid` if it answers a load
        of the newest state known (as of `last_tid`), or None: the common
        case of `find(oid, last_tid + 1, last_tid)`, without arithmetic."""
        start = self._current.get(oid)
        if start is None or last_tid is None or start > last_tid:
            return None
        return oid, start

    def find(self, oid, tid, last_tid):
        """The key of the revision that answers a load of `oid` before
        `tid`, given the last tid applied, or None."""
        starts = self._by_oid.get(oid)
        if not starts:
            return None
        current = self._current.get(oid)
        if current is not None and current < tid and \
                last_tid is not None and u64(tid) <= u64(last_tid) + 1:
            return oid, current
        for start in starts:
            if start < tid and start != current:
                end = self._entries[oid, start][1]
                if tid <= end:
                    return oid, start
        return None

    def get(self, key):
        """`(location, end)` of an entry."""
        location, end = self._entries[key]
        return location, end

    def touch(self, key):
        """Make an entry the most recently used."""
        self._entries.move_to_end(key)

    def items(self):
        """`(key, location, end)` of every entry, least recently used
        first (a snapshot: the index may change while it is used)."""
        return [(key, location, end)
                for key, (location, end) in self._entries.items()]

    def oldest(self):
        """The key of the least recently used entry."""
        return next(iter(self._entries))

    def store(self, oid, start, end, location):
        """Add (or replace) a revision; `end` None means it is current and
        replaces the current revision held so far."""
        key = (oid, start)
        if end is None:
            current = self._current.get(oid)
            if current is not None and current != start:
                self.remove((oid, current))
            self._current[oid] = start
        elif self._current.get(oid) == start:
            del self._current[oid]
        entries = self._entries
        if key in entries:
            self.remove(key, keep_current=end is None)
        entries[key] = [location, end]
        starts = self._by_oid.get(oid)
        if starts is None:
            self._by_oid[oid] = {start}
        else:
            starts.add(start)
        self.data_bytes += self._data_size(location)

    def relocate(self, key, location):
        """The data of an entry moved (same size, same end)."""
        self._entries[key][0] = location

    def invalidate(self, oid, tid):
        """Transaction `tid` changed `oid`: its current revision ends there
        (or is dropped if it did not start before `tid`).  Returns whether
        a revision was kept as non-current."""
        start = self._current.pop(oid, None)
        if start is None:
            return False
        if start >= tid:
            self.remove((oid, start))
            return False
        self._entries[oid, start][1] = tid
        return True

    def forget(self, oid):
        """Drop every revision of `oid`."""
        for start in list(self._by_oid.get(oid, ())):
            self.remove((oid, start))

    def remove(self, key, keep_current=False):
        oid, start = key
        location, _end = self._entries.pop(key)
        self.data_bytes -= self._data_size(location)
        starts = self._by_oid[oid]
        starts.discard(start)
        if not starts:
            del self._by_oid[oid]
        if not keep_current and self._current.get(oid) == start:
            del self._current[oid]


class RevisionCache:
    """The cache interface around a `RevisionIndex`, bounded in bytes.

    Subclasses say where data lives: `_place(oid, start, end, data)` keeps
    the data of a store and returns its location, `_load(location)` gives
    the data back (or None if it is found damaged: the entry is then
    dropped), and `_data_size(location)` tells how many bytes it holds.
    The other hooks do nothing here: `_journal(change, *fields)` is called
    before the index applies a change ("invalidate", "remove", "forget" or
    "last_tid"), `_after_change()` after a change, and `_clear_data()` when
    the cache is cleared.

    With a tracer (`set_tracer`, see `zeo.client.trace`) every load, store,
    invalidation, forget and eviction is recorded; without one, each
    costs a single test.
    """

    _tracer = None

    def __init__(self, size):
        self.limit = size
        self._lock = threading.Lock()
        self._index = RevisionIndex(self._data_size)
        self._last_tid = None

    def __len__(self):
        with self._lock:
            return len(self._index)

    @property
    def size(self):
        """Bytes charged for the entries held now."""
        with self._lock:
            return self._index.size

    def set_tracer(self, tracer):
        """Record cache events with `tracer` (a `CacheTracer`) from now
        on; None stops recording."""
        with self._lock:
            self._tracer = tracer

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
                self._journal("last_tid", tid)
                self._last_tid = tid
                self._after_change()

    def load_before(self, oid, tid):
        """`(data, start, end)` of the revision current before `tid`, or
        None when the cache cannot answer."""
        with self._lock:
            return self._answer(
                oid, tid, self._index.find(oid, tid, self._last_tid))

    def load_current(self, oid):
        """`load_before(oid, last_tid + 1)`: the newest revision of `oid`
        the client knows of, as `ClientStorage.load` asks, taking the lock
        once instead of twice.  None when there is no last tid yet."""
        with self._lock:
            last = self._last_tid
            if last is None:
                return self._answer(oid, None, None)
            key = self._index.find_current(oid, last)
            if key is None:
                tid = next_tid(last)
                return self._answer(oid, tid, self._index.find(oid, tid, last))
            return self._answer(oid, None, key)

    def _answer(self, oid, tid, key):
        """The data of the entry `key` (None: a miss) answering a load of
        `oid` before `tid` (None: the newest), lock held."""
        if key is not None:
            location, end = self._index.get(key)
            data = self._load(location)
            if data is not None:
                self._index.touch(key)
                if self._tracer is not None:
                    self._tracer.record(
                        trace.LOAD_HIT if end is None
                        else trace.LOAD_BEFORE_HIT,
                        oid, key[1], end, self._data_size(location))
                return data, key[1], end
            self._drop(key)
            self._trace_discard(oid)
            self._after_change()
        if self._tracer is not None:
            self._trace_miss(oid, tid)
        return None

    def _trace_miss(self, oid, tid):
        """A miss is a load of current data when `tid` is past the last
        tid (as `ClientStorage.load` asks), else a load of older data."""
        current = self._last_tid is None or tid is None or \
            tid > self._last_tid
        self._tracer.record(
            trace.LOAD_MISS if current else trace.LOAD_BEFORE_MISS,
            oid, None, tid)

    def store(self, oid, start, end, data):
        """Remember a revision; `end` None means it is current."""
        with self._lock:
            location = self._place(oid, start, end, data)
            self._index.store(oid, start, end, location)
            if self._tracer is not None:
                self._tracer.record(
                    trace.STORE_CURRENT if end is None
                    else trace.STORE_NONCURRENT,
                    oid, start, end, self._data_size(location))
            self._evict()
            self._after_change()

    def invalidate(self, oid, tid):
        """Transaction `tid` changed `oid`: its current revision ends there."""
        with self._lock:
            if self._index.has_current(oid):
                self._journal("invalidate", oid, tid)
                kept = self._index.invalidate(oid, tid)
                if self._tracer is not None:
                    self._tracer.record(
                        trace.INVALIDATE_KEEP if kept
                        else trace.INVALIDATE_DISCARD, oid, tid)
                self._after_change()
            elif self._tracer is not None:
                self._tracer.record(trace.INVALIDATE_MISS, oid, tid)

    def forget(self, oid):
        """Drop every revision of `oid` (its state is uncertain)."""
        with self._lock:
            if self._index.holds(oid):
                self._journal("forget", oid)
                self._index.forget(oid)
                if self._tracer is not None:
                    self._tracer.record(trace.INVALIDATE_DISCARD, oid)
                self._after_change()
            elif self._tracer is not None:
                self._tracer.record(trace.INVALIDATE_MISS, oid)

    def clear(self):
        """Drop everything, including the last tid."""
        with self._lock:
            if self._tracer is not None:
                for oid in self._index.oids():
                    self._trace_discard(oid)
            self._clear_data()
            self._index.clear()
            self._last_tid = None

    def _trace_discard(self, oid):
        """Trace that `oid` left the cache other than by eviction (the
        cache was cleared, or a damaged record found): for the tools, as
        if it were forgotten."""
        if self._tracer is not None:
            self._tracer.record(trace.INVALIDATE_DISCARD, oid)

    def _drop(self, key):
        self._journal("remove", *key)
        self._index.remove(key)

    def _evict(self):
        while self._index.size > self.limit and len(self._index):
            key = self._index.oldest()
            if self._tracer is not None:
                location, end = self._index.get(key)
                self._tracer.record(trace.EVICT, key[0], key[1], end,
                                    self._data_size(location))
            self._drop(key)

    # -- hooks ----------------------------------------------------------------

    def _place(self, oid, start, end, data):
        raise NotImplementedError

    def _load(self, location):
        raise NotImplementedError

    def _data_size(self, location):
        raise NotImplementedError

    def _journal(self, change, *fields):
        pass

    def _after_change(self):
        pass

    def _clear_data(self):
        pass


class ClientCache(RevisionCache):
    """An in-memory LRU cache of object revisions: the location of an
    entry is its data."""

    def __init__(self, size=20 * 2 ** 20):
        super().__init__(size)

    def _place(self, oid, start, end, data):
        return data

    def _load(self, location):
        return location

    def _data_size(self, location):
        return len(location)


def next_tid(tid):
    """The smallest tid after `tid`: what "before tid+1" loads use."""
    return p64(u64(tid) + 1)
