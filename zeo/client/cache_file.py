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

Replaying costs a few microseconds of Python per record, so a clean
`close()` also writes an index snapshot, ``<file>.index``: every live
entry's key, end tid and record location, least recently used first, the
last tid, and the size and CRC32 of the whole log it describes.  The next
open takes the snapshot instead of replaying only if the log is still
exactly that log (same size, same CRC over every byte, checked in C in
one pass), so the snapshot can only save time, never change what the
cache answers.  It is removed as soon as it is read: a process that
crashes later leaves no snapshot behind, and its successor replays.
The snapshot also keeps the least-recently-used order across restarts.

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

#: The first bytes of an index snapshot (format name and version).
INDEX_MAGIC = b"ZEOCIDX1"

#: magic, log size, log CRC32, has last tid, last tid, entry count, CRC32
#: of the entries.
_INDEX_HEADER = struct.Struct(">8sQI?8sII")
#: oid, start tid, end tid (zeros for "current"), record offset, length.
_INDEX_ENTRY = struct.Struct(">8s8s8sQI")

#: Bytes read at a time when checking a log against a snapshot.
_CRC_CHUNK = 1 << 20

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
    `len()` and `size`; plus `close()`, which writes the index snapshot
    and releases the file and its lock.  The least-recently-used order
    survives a clean close (through the snapshot); after a crash it is the
    order in which the entries were written.
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
        # A compaction or snapshot interrupted before its rename leaves
        # these behind.
        for leftover in (self._compaction_path(), self._snapshot_path()
                         + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        snapshot = self._take_snapshot()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if snapshot is None or not self._restore(snapshot):
                self._replay()
            self._evict()
            self._maybe_compact()
        except BaseException:
            os.close(self._fd)
            raise

    def _compaction_path(self):
        return self.path + ".tmp"

    def _snapshot_path(self):
        return self.path + ".index"

    # -- opening: replay the valid prefix of the log --------------------------

    def _replay(self):
        """Rebuild the index from the file and truncate the file at the end
        of its valid prefix.

        The file is read in one piece and parsed in place: at start-up a
        cache of ten thousand objects is ten thousand records, and per
        record reads would cost more than the index itself.
        """
        with open(self.path, "rb", closefd=True) as log:
            content = log.read()
        if content[:len(MAGIC)] != MAGIC:
            self._restart_file(content and "is not a cache file (bad header)")
            return
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
                break
            body = offset + _HEADER.size
            self._apply(kind, content[body:body + length], offset,
                        _HEADER.size + length)
            offset = body + length
        self._end = offset
        self._log_crc = zlib.crc32(view[:offset])

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
        self._end, self._log_crc = len(MAGIC), zlib.crc32(MAGIC)

    # -- opening: or take the index snapshot ----------------------------------

    def _take_snapshot(self):
        """The content of the index snapshot, which is removed (so a crash
        from now on cannot leave it to describe a log it no longer
        matches), or None if there is none."""
        path = self._snapshot_path()
        try:
            with open(path, "rb") as source:
                content = source.read()
            os.remove(path)
        except FileNotFoundError:
            return None
        return content

    def _restore(self, snapshot):
        """Take the index from `snapshot` if it is whole and describes the
        log as it is now; return whether it did."""
        problem = None
        if len(snapshot) < _INDEX_HEADER.size:
            problem = "torn"
        else:
            (magic, log_size, log_crc, has_last_tid, last_tid, count,
             entries_crc) = _INDEX_HEADER.unpack_from(snapshot)
            entries = memoryview(snapshot)[_INDEX_HEADER.size:]
            if magic != INDEX_MAGIC or \
                    len(entries) != count * _INDEX_ENTRY.size or \
                    zlib.crc32(entries) != entries_crc:
                problem = "damaged"
            elif not self._log_is(log_size, log_crc):
                problem = "the cache file changed after it was written"
        if problem:
            logger.info("client cache %s: index snapshot not used (%s); "
                        "replaying the file", self.path, problem)
            return False
        self._index.restore(
            (oid, start, None if end == z64 else end, (offset, length))
            for oid, start, end, offset, length
            in _INDEX_ENTRY.iter_unpack(entries))
        self._last_tid = last_tid if has_last_tid else None
        self._end, self._log_crc = log_size, log_crc
        return True

    def _log_is(self, size, crc):
        """Whether the log has exactly `size` bytes with CRC32 `crc`."""
        if os.fstat(self._fd).st_size != size:
            return False
        actual = offset = 0
        while offset < size:
            chunk = os.pread(self._fd, min(_CRC_CHUNK, size - offset), offset)
            if not chunk:
                return False
            actual = zlib.crc32(chunk, actual)
            offset += len(chunk)
        return actual == crc

    def _write_snapshot(self):
        """Describe the index and the log it belongs to in the snapshot
        file (written aside, then renamed: a torn one is never seen)."""
        entries = b"".join(
            _INDEX_ENTRY.pack(oid, start, end or z64, offset, length)
            for (oid, start), (offset, length), end in self._index.items())
        header = _INDEX_HEADER.pack(
            INDEX_MAGIC, self._end, self._log_crc, self._last_tid is not None,
            self._last_tid or z64, len(entries) // _INDEX_ENTRY.size,
            zlib.crc32(entries))
        path = self._snapshot_path()
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)
        try:
            with open(fd, "wb") as out:
                out.write(header)
                out.write(entries)
            os.replace(path + ".tmp", path)
        except BaseException:
            os.remove(path + ".tmp")
            raise

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
        self._end, self._log_crc = len(MAGIC), zlib.crc32(MAGIC)

    def close(self):
        """Write the index snapshot and release the file and its lock.  The
        contents stay on disk for the next process; using the cache
        afterwards is an error."""
        with self._lock:
            if self._fd is None:
                return
            try:
                self._write_snapshot()
            except OSError as error:
                logger.warning("client cache %s: cannot write the index "
                               "snapshot (%s); the next open replays the "
                               "file", self.path, error)
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
        self._log_crc = zlib.crc32(record, self._log_crc)
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
            moved, crc = self._copy_live_entries(new_fd)
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
        self._log_crc = crc

    def _copy_live_entries(self, new_fd):
        """Write the live entries to `new_fd`; return their new locations
        and the CRC32 of what was written.

        An entry whose record is found damaged is left out (and dropped
        from the index): the copy must not turn bad data into good.
        """
        moved = {}
        with open(new_fd, "wb", closefd=False) as out:
            out.write(MAGIC)
            offset, crc = len(MAGIC), zlib.crc32(MAGIC)
            for key, location, end in self._index.items():
                data = self._load(location)
                if data is None:
                    self._index.remove(key)
                    self._trace_discard(key[0])
                    continue
                record = _record(STORE, b"".join(
                    (key[0], key[1], end or z64, data)))
                out.write(record)
                crc = zlib.crc32(record, crc)
                moved[key] = (offset, len(record))
                offset += len(record)
            if self._last_tid is not None:
                record = _record(LAST_TID, self._last_tid)
                out.write(record)
                crc = zlib.crc32(record, crc)
        return moved, crc
