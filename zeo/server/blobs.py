"""Blobs on the server: uploads, shared-directory names, downloads.

PROTOCOL.md 10.  A blob never passes through memory whole: an upload is
appended to a temporary file chunk by chunk as the client's one-way calls
arrive, a download is read from the committed file chunk by chunk and
queued on the connection's outbox only while the outbox has room.

Every file this module makes or accepts from a client belongs to one
transaction (`TransactionBlobs`), and is removed when that transaction
ends, whether it committed (the storage then renamed the file into the
blob directory), failed or was abandoned with its connection.  What a
crash leaves behind is removed at the next start (`remove_orphans`).
"""

import itertools
import logging
import os
import stat
import tempfile
import threading

import ZODB.interfaces
from ZODB.POSException import StorageTransactionError, Unsupported

from zeo.wire import short_repr

logger = logging.getLogger(__name__)

#: Bytes per receiveBlobChunk message, as ZEO's server sends them.  Its
#: client reads larger messages slowly: with 256 KB chunks it downloaded
#: a 200 MB blob at 320 MB/s instead of 500.
CHUNK_SIZE = 59000

#: Unsent bytes a download leaves in the connection's outbox before it
#: waits: a few chunks keep the socket busy, and memory stays small.
DOWNLOAD_WINDOW = 4 * CHUNK_SIZE

#: Downloads of one connection that get a thread of their own; more run
#: in the connection's thread (see `Downloads`).
MAX_DOWNLOAD_THREADS = 4

#: How this server names its files in a storage's blob temporary
#: directory.  Other programs may use that directory too (a local ZODB
#: makes its uncommitted blobs there), so start-up removes only these.
TEMP_PREFIX = "zeo-blob-"
TEMP_SUFFIX = ".part"


def serves_blobs(storage):
    return ZODB.interfaces.IBlobStorage.providedBy(storage)


def remove_orphans(storage):
    """Remove the upload files an earlier run left in `storage`'s blob
    temporary directory (killed mid-upload or mid-transaction).

    Only regular files named by `TEMP_PREFIX` and `TEMP_SUFFIX` are
    touched.  Returns how many were removed.
    """
    directory = storage.temporaryDirectory()
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if (entry.name.startswith(TEMP_PREFIX)
                    and entry.name.endswith(TEMP_SUFFIX)
                    and entry.is_file(follow_symlinks=False)):
                os.remove(entry.path)
                removed += 1
    if removed:
        logger.info("removed %d unfinished blob upload(s) from %s",
                    removed, directory)
    return removed


class RefusedBlobName(ValueError):
    """storeBlobShared named a file we will not touch."""


def shared_blob_path(storage, oid, name):
    """The file `name` that a shared-blob-dir client made for `oid`.

    The client sends only a base name; the directory is ours: the storage's
    directory for that oid.  A name that could reach anything else (a
    separator, "..", an absolute path, a NUL, a symlink leading out) or
    that is not a temporary file name is refused, before any file is
    touched.
    """
    check_id(oid)
    if not _acceptable_name(name):
        raise RefusedBlobName(
            "storeBlobShared: refused file name %s (a base name ending in "
            "'.tmp' or '.tmp' and one character is required)"
            % short_repr(name))
    helper = getattr(storage, "fshelper", None)
    if not hasattr(helper, "getPathForOID"):
        raise Unsupported("this storage has no shared blob directory layout")
    base = os.path.realpath(helper.base_dir)
    directory = os.path.realpath(helper.getPathForOID(oid))
    path = os.path.join(directory, name)
    if (os.path.commonpath([base, directory]) != base
            or os.path.dirname(os.path.realpath(path)) != directory):
        raise RefusedBlobName(
            "storeBlobShared: %s leads outside the blob directory"
            % short_repr(name))
    return path


def _acceptable_name(name):
    separators = {"/", os.sep, os.altsep} - {None}
    return (isinstance(name, str)
            and "\0" not in name
            and ".." not in name
            and not any(separator in name for separator in separators)
            and not os.path.isabs(name)
            and (name.endswith(".tmp") or name[:-1].endswith(".tmp")))


def check_id(oid_or_tid):
    if not (isinstance(oid_or_tid, bytes) and len(oid_or_tid) == 8):
        raise ValueError("oids and tids are 8 bytes, not %s"
                         % short_repr(oid_or_tid))


def _check_regular_file(path):
    """A shared blob must be a plain file when we store it: a symlink
    renamed into the blob directory would serve whatever it points to."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ValueError("no blob file %s to store" % path) from None
    if not stat.S_ISREG(mode):
        raise ValueError("blob file %s is not a regular file" % path)


class Upload:
    """One blob arriving in chunks, appended to a temporary file."""

    def __init__(self, directory):
        descriptor, self.path = tempfile.mkstemp(
            prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
        self._file = os.fdopen(descriptor, "wb")
        self.size = 0

    def write(self, chunk):
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError("storeBlobChunk takes bytes, not %s"
                            % type(chunk).__name__)
        self._file.write(chunk)
        self.size += len(chunk)

    def close(self):
        self._file.close()


class TransactionBlobs:
    """The blobs of one transaction and the files that hold them.

    `log` (a `TransactionLog`) records `(oid, serial, data, path,
    shared)` for each blob, in arrival order, so that many blobs cost
    disk, not memory.  When the transaction ends every file it names is
    removed if still there (and its link, if a vote made one: see
    `replay`), and so is an unfinished upload.
    """

    def __init__(self, log):
        self._log = log
        self._upload = None
        self._linked = False  # a vote gave the storage links, not files
        self._uploaded = 0  # bytes of the uploaded blob files

    @property
    def count(self):
        """Blobs recorded."""
        return self._log.count

    @property
    def size(self):
        """Bytes recorded: the blobs' records and uploaded files."""
        return self._log.size + self._uploaded

    def start_upload(self, directory):
        if self._upload is not None:
            raise StorageTransactionError(
                "storeBlobStart: an upload is already in progress")
        self._upload = Upload(directory)

    def write(self, chunk):
        if self._upload is None:
            raise StorageTransactionError(
                "storeBlobChunk without storeBlobStart")
        self._upload.write(chunk)

    def end_upload(self, oid, serial, data):
        upload = self._upload
        if upload is None:
            raise StorageTransactionError(
                "storeBlobEnd without storeBlobStart")
        check_id(oid)
        self._upload = None
        upload.close()
        self._log.append("blob", oid, serial, data, upload.path, False)
        self._uploaded += upload.size
        return upload.size

    def add_shared(self, oid, serial, data, path):
        self._log.append("blob", oid, serial, data, path, True)

    def replay(self, keep_files):
        """The blob stores for a vote, as `("blob", args)` log entries.

        With `keep_files` (a vote that may be repeated, under client
        conflict resolution) the storage gets a hard link to each file:
        it renames what it stores into the blob directory and removes it
        again if the vote fails, and the next vote needs the original.
        """
        for _operation, args in self._log:
            oid, serial, data, path, shared = args
            if shared:
                _check_regular_file(path)
            if keep_files:
                self._linked = True
                link = _link_name(path)
                _remove(link)  # left by an earlier vote that failed
                os.link(path, link)
                path = link
            yield "blob", (oid, serial, data, path)

    def close(self):
        """Remove every file of the transaction that is still there."""
        if self._upload is not None:
            self._upload.close()
            _remove(self._upload.path)
            self._upload = None
        for _operation, args in self._log:
            _remove(args[3])
            if self._linked:
                _remove(_link_name(args[3]))
        self._log.close()


def _link_name(path):
    return path + ".vote" + TEMP_SUFFIX


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass  # stored: the storage moved it into the blob directory
    except OSError as error:
        logger.error("cannot remove blob file %s: %s", path, error)


class Downloads:
    """The blob downloads of one connection.

    Each download runs in a thread of its own, started for it and ending
    with it.  Streaming in the connection's thread would be simpler, but
    every later call of the connection would then wait for the whole blob:
    its loads, and the tpc_finish of a transaction that another thread of
    the same client has voted, which would keep the commit lock, and so
    every other client's commits, for as long as a slow client takes to
    read a big blob.  Past `MAX_DOWNLOAD_THREADS` at once, a download runs
    in the connection's thread, which bounds the threads a client can
    make us start.  A blob that fits in `DOWNLOAD_WINDOW` is queued at
    once, in the connection's thread, without waiting for the client to
    read (so it cannot hold up a tpc_finish either): a thread would cost
    more than sending it, and a client that never reads fills its outbox
    past the limit and is disconnected, as with any other reply.

    Ordering (PROTOCOL.md 9) holds because each download puts its messages
    into the connection's one outbox: receiveBlobStart, the chunks and
    receiveBlobStop, then the reply.  Invalidations and other replies
    queued meanwhile land between chunks, each message whole and in the
    order queued, which is all the client needs; no lock is held while a
    blob streams.
    """

    def __init__(self, server, channel, reply):
        self._server = server
        self._channel = channel
        #: `(msgid, bytes sent, error or None)`: answers sendBlob.
        self._reply = reply
        self._lock = threading.Lock()
        self._running = 0
        self._numbers = itertools.count(1)

    def start(self, blob_file, oid, serial, msgid):
        """Send `blob_file` (open, positioned at 0; ours to close)."""
        small = os.fstat(blob_file.fileno()).st_size <= DOWNLOAD_WINDOW
        with self._lock:
            threaded = not small and self._running < MAX_DOWNLOAD_THREADS
            if threaded:
                self._running += 1
        if not threaded:
            self._send(blob_file, oid, serial, msgid, wait=not small)
            return
        try:
            self._server.start_worker(
                "blob-send-%s-%d" % (self._channel.peer,
                                     next(self._numbers)),
                lambda: self._send_in_thread(blob_file, oid, serial, msgid))
        except BaseException:
            self._thread_done()
            blob_file.close()
            raise

    def _send_in_thread(self, blob_file, oid, serial, msgid):
        try:
            self._send(blob_file, oid, serial, msgid)
        finally:
            self._thread_done()

    def _thread_done(self):
        with self._lock:
            self._running -= 1

    def _send(self, blob_file, oid, serial, msgid, wait=True):
        """Stream one blob, then reply.  Gives up quietly when the
        connection closes (the client went away)."""
        channel = self._channel
        chunks = channel.framer("receiveBlobChunk", (oid, serial))
        size = 0
        with blob_file:
            try:
                queued = channel.push("receiveBlobStart", (oid, serial),
                                      wake_writer=False)
                while queued:
                    chunk = blob_file.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    size += len(chunk)
                    queued = ((not wait
                               or channel.wait_for_room(DOWNLOAD_WINDOW))
                              and channel.push_framed(chunks, chunk))
                    if wait:  # a small blob leaves with its reply, at once
                        channel.flush()
                if not queued:
                    return
                channel.push("receiveBlobStop", (oid, serial),
                             wake_writer=False)
                error = None
            except Exception as failure:
                logger.error("(%s) sending blob %s/%s failed",
                             channel.label, oid.hex(), serial.hex(),
                             exc_info=True)
                error = failure
        self._reply(msgid, size, error)
