"""The persistent client cache: `ClientCache`'s interface, kept on disk.

A client opened with `client="name"` keeps its cache in a file
``<name>-<storage>.zec`` so a restarted process starts warm: the entries
and the last tid come back, and the connection's verification (PROTOCOL.md
8.1) only has to ask the server what changed since that tid.

The file is an append-only log.  It starts with `MAGIC`; each record is

    crc32 (4 bytes) | kind (1 byte) | payload length (4 bytes) | payload

with the CRC32 covering kind, length and payload.  The kinds are

* `STORE`: oid, start tid, end tid (zeros for "current"), data;
* `INVALIDATE`: oid, tid: the current revision of oid ends at tid;
* `REMOVE`: oid, start tid: that revision left the cache (evicted, or
  found damaged);
* `FORGET`: oid: every revision of oid left the cache;
* `LAST_TID`: tid: the new last tid.

Every change appends its record with one write before the in-memory index
is updated, so the file always holds the history of the cache up to some
point; a process killed at any moment leaves a file whose longest valid
prefix is a state the cache really was in.  The index and its rules are
`ClientCache`'s (`zeo.client.cache.RevisionIndex` and `RevisionCache`),
with `(record offset, record length)` as an entry's location instead of
its data.  Opening replays the valid prefix into the index and truncates
the file at the first record that is torn or fails its CRC: records after
a bad one are dropped too, because skipping one (an invalidation, say)
could make an older record claim a revision is still current.  Loads find
the record through the index (a dict lookup), read it back with one
`pread` and check its CRC again, so damage that happens after opening is
not returned as data either.

Records that no longer describe a live entry are garbage.  When garbage
passes half the size limit, the live entries are copied, least recently
used first, into a new file that replaces the old one with an atomic
rename (`compact`), so the file stays within about 1.5 times the limit,
and no store rewrites more than its own record.  `clear()` truncates the
file to its header.

One process at a time may use a cache file: a `zc.lockfile` lock on
``<file>.lock`` is taken on open; a second opener gets `CacheFileLocked`.
"""

import logging
import os
import struct
import zlib

import zc.lockfile
from ZODB.utils import z64

from zeo.client.cache import RevisionCache

logger = logging.getLogger(__name__)

#: The first bytes of a cache file (format name and version).
MAGIC = b"ZEOCLOG1"

STORE = b"S"
INVALIDATE = b"I"
REMOVE = b"R"
FORGET = b"F"
LAST_TID = b"L"

#: Payload lengths of the fixed-size kinds; a STORE has at least 24 bytes.
_FIXED_LENGTHS = {INVALIDATE: 16, REMOVE: 16, FORGET: 8, LAST_TID: 8}
_STORE_HEAD = 24  # oid, start, end

_HEADER = struct.Struct(">IcI")  # crc32, kind, payload length

#: Bytes of a STORE record before its data.
_RECORD_HEAD = _HEADER.size + _STORE_HEAD

#: The record kind of each change `RevisionCache` journals.
_JOURNAL_KINDS = {"invalidate": INVALIDATE, "remove": REMOVE,
                  "forget": FORGET, "last_tid": LAST_TID}

#: Garbage is compacted away once it exceeds this share of the limit...
GARBAGE_RATIO = 0.5
#: ...or this many bytes, whichever is larger (tiny limits would otherwise
#: compact on nearly every store).
MIN_GARBAGE = 4096


class CacheFileLocked(zc.lockfile.LockError):
    """Another process (or another open cache here) uses the cache file."""


def cache_file_path(client, storage, var=None):
    """Where the cache of client `client` for storage `storage` lives."""
    return os.path.join(var or os.getcwd(), "%s-%s.zec" % (client, storage))


def _record(kind, payload):
    header_tail = _HEADER.pack(0, kind, len(payload))[4:]
    crc = zlib.crc32(payload, zlib.crc32(header_tail))
    return _HEADER.pack(crc, kind, len(payload)) + payload


def _check_record(view, offset, end):
    """`(problem, kind, payload length)` of the record at `offset`;
    `problem` is None for a whole record with a matching checksum."""
    if end - offset < _HEADER.size:
        return "torn record header", None, 0
    crc, kind, length = _HEADER.unpack_from(view, offset)
    if kind == STORE:
        if length < _STORE_HEAD:
            return "bad record length", kind, length
    elif _FIXED_LENGTHS.get(kind) != length:
        return "bad record kind or length", kind, length
    record_end = offset + _HEADER.size + length
    if record_end > end:
        return "torn record", kind, length
    if zlib.crc32(view[offset + 4:record_end]) != crc:
        return "checksum mismatch", kind, length
    return None, kind, length


def _crc_ok(record):
    return _HEADER.unpack_from(record)[0] == zlib.crc32(
        memoryview(record)[4:])


class FileClientCache(RevisionCache):
    """A client cache of object revisions, persistent in the file `path`.

    Same behaviour as `ClientCache` (see its module) for `load_before`,
    `store`, `invalidate`, `forget`, `set_last_tid`, `last_tid`, `clear`,
    `len()` and `size`; plus `close()`, which releases the file and its
    lock.  The least-recently-used order is not recorded: after reopening
    it is the order in which the entries were written.
    """

    def __init__(self, path, size=20 * 2 ** 20):
        super().__init__(size)
        self.path = path
        try:
            self._file_lock = zc.lockfile.LockFile(path + ".lock")
        except zc.lockfile.LockError:
            raise CacheFileLocked(
                "the client cache file %s is in use by another process "
                "(or open twice); each client name needs its own cache"
                % path) from None
        try:
            self._open()
        except BaseException:
            self._file_lock.close()
            raise

    def _open(self):
        # A compaction interrupted before its rename leaves this behind.
        if os.path.exists(self._compaction_path()):
            os.remove(self._compaction_path())
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._end = self._replay()
            self._evict()
            self._maybe_compact()
        except BaseException:
            os.close(self._fd)
            raise

    def _compaction_path(self):
        return self.path + ".tmp"

    # -- opening: replay the valid prefix of the log --------------------------

    def _replay(self):
        """Rebuild the index from the file; return the end of its valid
        prefix, having truncated the file there.

        The file is read in one piece and parsed in place: at start-up a
        cache of ten thousand objects is ten thousand records, and per
        record reads would cost more than the index itself.
        """
        with open(self.path, "rb", closefd=True) as log:
            content = log.read()
        if content[:len(MAGIC)] != MAGIC:
            return self._restart_file(
                content and "is not a cache file (bad header)")
        view = memoryview(content)
        offset, end = len(MAGIC), len(content)
        while offset < end:
            problem, kind, length = _check_record(view, offset, end)
            if problem:
                logger.warning(
                    "client cache %s: %s at offset %d; dropping the rest of "
                    "the file (%d bytes)", self.path, problem, offset,
                    end - offset)
                os.ftruncate(self._fd, offset)
                return offset
            body = offset + _HEADER.size
            self._apply(kind, content[body:body + length], offset,
                        _HEADER.size + length)
            offset = body + length
        return offset

    def _apply(self, kind, payload, offset, record_length):
        """Replay one record into the index (the change is already in
        the file: nothing is journaled)."""
        if kind == STORE:
            oid, start, end = payload[:8], payload[8:16], payload[16:24]
            self._index.store(oid, start, None if end == z64 else end,
                              (offset, record_length))
        elif kind == INVALIDATE:
            self._index.invalidate(payload[:8], payload[8:])
        elif kind == REMOVE:
            key = (payload[:8], payload[8:])
            if key in self._index:
                self._index.remove(key)
        elif kind == FORGET:
            self._index.forget(payload)
        else:
            self._last_tid = bytes(payload)

    def _restart_file(self, why):
        """Start the file anew; log `why` unless it was just created."""
        if why:
            logger.warning("client cache %s %s; starting it empty",
                           self.path, why)
        os.ftruncate(self._fd, 0)
        self._write_at(0, MAGIC)
        return len(MAGIC)

    # -- where the data lives (the RevisionCache hooks) -----------------------

    def _place(self, oid, start, end, data):
        """Append a STORE record; its location is `(offset, length)`."""
        offset = self._append(STORE, b"".join((oid, start, end or z64, data)))
        return offset, _RECORD_HEAD + len(data)

    def _load(self, location):
        """The data of the STORE record at `location`, or None (logged) if
        the record is damaged."""
        offset, length = location
        record = self._read_at(offset, length)
        if len(record) != length or not _crc_ok(record):
            logger.warning("client cache %s: record at offset %d is "
                           "damaged; dropping it", self.path, offset)
            return None
        return record[_RECORD_HEAD:]

    def _data_size(self, location):
        return location[1] - _RECORD_HEAD

    def _journal(self, change, *fields):
        self._append(_JOURNAL_KINDS[change], b"".join(fields))

    def _after_change(self):
        self._maybe_compact()

    def _clear_data(self):
        os.ftruncate(self._fd, len(MAGIC))
        self._end = len(MAGIC)

    def close(self):
        """Release the file and its lock.  The contents stay on disk for
        the next process; using the cache afterwards is an error."""
        with self._lock:
            if self._fd is None:
                return
            os.close(self._fd)
            self._fd = None
            self._index.clear()
            self._file_lock.close()

    # -- the file -------------------------------------------------------------

    def _append(self, kind, payload):
        """Write one record at the end of the log; return its offset."""
        offset = self._end
        record = _record(kind, payload)
        self._write_at(offset, record)
        self._end = offset + len(record)
        return offset

    def _write_at(self, offset, data):
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def _read_at(self, offset, length):
        return os.pread(self._fd, length, offset)

    def garbage(self):
        """Bytes of the file that no longer describe a live entry."""
        live = self._index.data_bytes + len(self._index) * _RECORD_HEAD
        return self._end - len(MAGIC) - live

    def _maybe_compact(self):
        if self.garbage() > max(self.limit * GARBAGE_RATIO, MIN_GARBAGE):
            self._compact()

    def compact(self):
        """Rewrite the file with only the live entries and the last tid."""
        with self._lock:
            self._compact()

    def _compact(self):
        """Copy the live records, least recently used first and with their
        current end tids, to a new file, then rename it over the old one.

        A crash before the rename leaves the old file intact (the new one
        is removed on the next open); after it, the new file is complete
        because it was synced before the rename.
        """
        new_path = self._compaction_path()
        new_fd = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                         0o600)
        try:
            moved = self._copy_live_entries(new_fd)
            os.fsync(new_fd)
            os.replace(new_path, self.path)
        except BaseException:
            os.close(new_fd)
            os.remove(new_path)
            raise
        os.close(self._fd)
        self._fd = new_fd
        for key, location in moved.items():
            self._index.relocate(key, location)
        self._end = os.fstat(new_fd).st_size

    def _copy_live_entries(self, new_fd):
        """Write the live entries to `new_fd`; return their new locations.

        An entry whose record is found damaged is left out (and dropped
        from the index): the copy must not turn bad data into good.
        """
        moved = {}
        with open(new_fd, "wb", closefd=False) as out:
            out.write(MAGIC)
            offset = len(MAGIC)
            for key, location, end in self._index.items():
                data = self._load(location)
                if data is None:
                    self._index.remove(key)
                    continue
                record = _record(STORE, b"".join(
                    (key[0], key[1], end or z64, data)))
                out.write(record)
                moved[key] = (offset, len(record))
                offset += len(record)
            if self._last_tid is not None:
                out.write(_record(LAST_TID, self._last_tid))
        return moved
