"""Client cache traces: one compact record per cache event.

A trace answers "how well does my cache work, and would a bigger one
help?" after the fact, without slowing the client down much: each event
(a load that hit or missed, a store, an invalidation, an eviction)
appends one record to a file, and `zeo.scripts.cache_stats` and
`zeo.scripts.cache_simul` read it later.

The file format is the real ZEO client's, so the tools of either package
read the traces of both.  A record is `RECORD` (big-endian):

    timestamp (4, whole seconds) | (data length << 8) | code (4, signed)
    | oid length (2) | tid (8) | end tid (8)

followed by the oid.  A missing tid is written as eight zero bytes.  The
code's first hex digit names the operation, the second its outcome; bits
0 and 7 are always clear.  The data length has 23 bits: longer data is
recorded as `MAX_DATA_LENGTH`.

ZEO has no record for evictions; ours is `EVICT`, 0x08.  Every code from
0x02 to 0x0E is one that ZEO's ``cache_stats`` counts as neither a load,
a store, an invalidation nor a restart (it lists it as an unknown code),
so our traces keep its figures right.  Codes with the 0x20 bit (0x6x,
0x7x) would be counted as loads by its per-interval table, 0x4x as
writes and 0x1x as invalidations.  (ZEO's ``cache_simul`` has no code
it ignores: it takes 0x0x for a restart, which only resets the counts
of its current interval.)
"""

import collections
import gzip
import logging
import os
import struct
import time
import zlib

logger = logging.getLogger(__name__)

#: The fixed part of a record; the oid follows it.
RECORD = struct.Struct(">IiH8s8s")

#: Environment variable that turns tracing on for persistent caches.
ENV_VAR = "ZEO_CACHE_TRACE"

TRACE_OPENED = 0x00
EVICT = 0x08
INVALIDATE_MISS = 0x10
INVALIDATE_KEEP = 0x1C
INVALIDATE_DISCARD = 0x1E
LOAD_MISS = 0x20
LOAD_HIT = 0x22
LOAD_BEFORE_MISS = 0x24
LOAD_BEFORE_HIT = 0x26
STORE_CURRENT = 0x52
STORE_NONCURRENT = 0x54

#: What each code means, for reports.
EXPLANATIONS = {
    TRACE_OPENED: "trace opened (the cache started)",
    EVICT: "evicted (least recently used)",
    INVALIDATE_MISS: "invalidation, nothing current cached (miss)",
    INVALIDATE_KEEP: "invalidation, kept as non-current (hit)",
    INVALIDATE_DISCARD: "invalidation or forget, dropped (hit)",
    LOAD_MISS: "load of current data (miss)",
    LOAD_HIT: "load answered by a current revision (hit)",
    LOAD_BEFORE_MISS: "load of older data (miss)",
    LOAD_BEFORE_HIT: "load answered by a non-current revision (hit)",
    STORE_CURRENT: "store of a current revision",
    STORE_NONCURRENT: "store of a non-current revision",
}

LOAD_CODES = frozenset((LOAD_MISS, LOAD_HIT, LOAD_BEFORE_MISS,
                        LOAD_BEFORE_HIT))
HIT_CODES = frozenset((LOAD_HIT, LOAD_BEFORE_HIT))
STORE_CODES = frozenset((STORE_CURRENT, STORE_NONCURRENT))
INVALIDATION_HIT_CODES = frozenset((INVALIDATE_KEEP, INVALIDATE_DISCARD))

MAX_DATA_LENGTH = 2 ** 23 - 1

#: Bytes buffered before a write: records are small and frequent.
BUFFER_SIZE = 64 * 1024

_NO_TID = bytes(8)


class CacheTracer:
    """Appends trace records to a file.

    Not locked: the cache calls `record` under its own lock.  A write
    error (a full disk, say) is logged once and ends the trace, never the
    client's work.
    """

    def __init__(self, path):
        self.path = path
        self._file = open(path, "ab", buffering=BUFFER_SIZE)
        self._write = self._file.write
        self.record(TRACE_OPENED)

    def record(self, code, oid=b"", tid=None, end_tid=None, data_length=0):
        """Append the record of one event."""
        encoded = (min(data_length, MAX_DATA_LENGTH) << 8) | code
        try:
            self._write(RECORD.pack(int(time.time()), encoded, len(oid),
                                    tid or _NO_TID, end_tid or _NO_TID) + oid)
        except OSError as error:
            logger.warning("cannot write the cache trace %s (%s); tracing "
                           "stopped", self.path, error)
            self._write = _discard

    def close(self):
        """Write what is buffered and close the file."""
        try:
            self._file.close()
        except OSError as error:
            logger.warning("cannot write the cache trace %s (%s)",
                           self.path, error)


def _discard(data):
    """Where records go once the trace file failed."""


def trace_path(cache_trace=None, cache_path=None):
    """Where to trace a client's cache, or None for nowhere.

    An explicit `cache_trace` path wins.  Otherwise, as in ZEO, a
    non-empty `ZEO_CACHE_TRACE` traces a persistent cache (whose file is
    `cache_path`) next to it, in ``<cache file>.trace``; an in-memory
    cache has no file to name the trace after, so it is traced only with
    an explicit path.
    """
    if cache_trace:
        return cache_trace
    if os.environ.get(ENV_VAR):
        if cache_path:
            return cache_path + ".trace"
        logger.info("%s is set but the client cache is in memory: not "
                    "tracing it (give the storage a cache_trace path)",
                    ENV_VAR)
    return None


def open_tracer(path):
    """A `CacheTracer` appending to `path`, or None when `path` is None
    or cannot be opened (logged: the client works on untraced)."""
    if path is None:
        return None
    try:
        tracer = CacheTracer(path)
    except OSError as error:
        logger.warning("cannot open the cache trace %s (%s); not tracing",
                       path, error)
        return None
    logger.info("tracing the client cache to %s", path)
    return tracer


# -- reading ------------------------------------------------------------------

TraceRecord = collections.namedtuple(
    "TraceRecord", "timestamp code oid tid end_tid data_length")
TraceRecord.__doc__ = """One event of a trace; missing tids are None."""


class TraceError(Exception):
    """A trace that cannot be read on: missing, truncated or not a trace.

    `offset` is where the bad part starts (0 when the file could not be
    opened); every record before it was good.
    """

    def __init__(self, message, offset=0):
        super().__init__(message)
        self.offset = offset


def read_trace(path):
    """Yield the `TraceRecord`s of the trace file `path` (gzip'ed when
    its name ends in ``.gz``), then raise `TraceError` if the file ends
    in a partial record or holds something that is not a record.

    A record is accepted when its timestamp is set, its code has bits 0
    and 7 clear, its data length is not negative and its oid has 8 bytes
    (none for "trace opened"): garbage fails these checks at once.
    """
    try:
        stream = gzip.open(path) if path.endswith(".gz") else open(path, "rb")
    except OSError as error:
        raise TraceError("cannot open %s: %s" % (
            path, error.strerror or error)) from None
    with stream:
        yield from _records(stream, path)


def _records(stream, path):
    offset = 0
    while True:
        head = _read(stream, RECORD.size, path, offset)
        if not head:
            return
        if len(head) < RECORD.size:
            raise TraceError("%s: truncated record at offset %d"
                             % (path, offset), offset)
        timestamp, encoded, oid_length, tid, end_tid = RECORD.unpack(head)
        code = encoded & 0xFF
        if (not timestamp or encoded < 0 or code & 0x81
                or oid_length not in (0, 8)):
            raise TraceError("%s: not a cache trace record at offset %d"
                             % (path, offset), offset)
        oid = _read(stream, oid_length, path, offset)
        if len(oid) < oid_length:
            raise TraceError("%s: truncated record at offset %d"
                             % (path, offset), offset)
        yield TraceRecord(timestamp, code, oid,
                          None if tid == _NO_TID else tid,
                          None if end_tid == _NO_TID else end_tid,
                          encoded >> 8)
        offset += RECORD.size + oid_length


def _read(stream, size, path, offset):
    """`size` bytes or fewer at the end; a damaged gzip stream is a
    `TraceError`."""
    try:
        return stream.read(size)
    except (EOFError, OSError, zlib.error) as error:
        raise TraceError("%s: unreadable after offset %d (%s)"
                         % (path, offset, error), offset) from None
