"""The client's blob cache: blobs downloaded from the server, on disk.

The cache is a directory in ZEO's `zeocache` layout (PROTOCOL.md 10.4):
blob `(oid, tid)` is the file ``<oid % 997>/<oid // 997>.<tid>.blob``
(the tid as 16 hex digits), so that a real ZEO client can use the same
directory, and several processes may share it.  Each of the 997
directories has a ``.lock`` file (`zc.lockfile`, which locks across
processes and across threads alike): a blob is downloaded or trimmed
away only by whoever holds its directory's lock.  A process that wants a
missing blob takes the lock, looks again (another process may have
fetched it meanwhile), and only then asks the server.  Our own upload is
adopted by a rename without the lock (see `BlobCache.adopt`).

A download is written, as the server's chunks arrive, to ``<name>.dl``,
which is made read-only and renamed into place once complete: a file
under its final name is always whole, is never written again, and can be
unlinked (trimmed, or replaced after being removed by hand) while
readers have it open.

`Downloads` keeps the downloads this client asked for: the server's
`receiveBlob*` calls write only to those, to a path computed here from
an oid and tid we checked, never from anything else the server sends.
"""

import contextlib
import errno
import logging
import os
import tempfile
import threading
import time

import zc.lockfile
import ZODB.blob
from ZODB.POSException import POSKeyError
from ZODB.utils import u64

from zeo.client.blob_trim import LOCK_NAME, CacheTrimmer

logger = logging.getLogger(__name__)

#: The layout's name in the `.layout` file and in `ZODB.blob.LAYOUTS`.
LAYOUT_NAME = "zeocache"
#: The number of directories of the layout.
DIRECTORIES = 997
#: Suffix of a download in progress.
PARTIAL_SUFFIX = ".dl"
#: Longest pause between two attempts to take a directory's lock.
_MAX_LOCK_PAUSE = 0.05


class CacheLayout:
    """The `zeocache` layout, for `ZODB.blob.FilesystemHelper`.

    The real ZEO registers an equivalent layout under the same name; the
    two compute the same paths, so either serves both clients.  Ids are
    8-byte strings (`check_id`).
    """

    def oid_to_path(self, oid):
        return str(u64(oid) % DIRECTORIES)

    def getBlobFilePath(self, oid, tid):
        quotient, remainder = divmod(u64(oid), DIRECTORIES)
        return os.path.join(str(remainder), "%d.%s%s" % (
            quotient, tid.hex(), ZODB.blob.BLOB_SUFFIX))


LAYOUT = CacheLayout()
ZODB.blob.LAYOUTS.setdefault(LAYOUT_NAME, LAYOUT)


def check_id(value, what):
    """Refuse anything but an 8-byte oid or tid: a cache path is made
    from it."""
    if not isinstance(value, bytes) or len(value) != 8:
        raise ValueError("%s must be 8 bytes, not %r" % (what, value))


def prepare_directory(fshelper):
    """Create a blob directory, its `tmp` directory and its `.layout`
    file, unless they exist; ValueError if it has another layout.

    `FilesystemHelper.create` does the same, but fails when two
    processes open a new shared cache at once: the second may see the
    directory appear under it, or read the layout file before the first
    wrote it.  Here the layout file appears whole (a link to a file
    written before), or not at all.
    """
    os.makedirs(fshelper.temp_dir, exist_ok=True)
    marker = os.path.join(fshelper.base_dir, ZODB.blob.LAYOUT_MARKER)
    if not os.path.exists(marker):
        descriptor, written = tempfile.mkstemp(dir=fshelper.temp_dir)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(fshelper.layout_name)
            os.link(written, marker)
        except FileExistsError:
            pass  # another process was first
        finally:
            os.remove(written)
    with open(marker) as file:
        layout = file.read().strip()
    if layout != fshelper.layout_name:
        raise ValueError("the blob directory %s has layout %r, not %r"
                         % (fshelper.base_dir, layout, fshelper.layout_name))


def lock_directory(directory):
    """Take `directory`'s `.lock`, waiting as long as someone holds it;
    the caller closes the returned lock.

    A `SimpleLockFile`: the same lock as ZEO's `LockFile` (a `flock` of
    the same file), without writing our pid into the file each time,
    which changed the file's inode for every blob downloaded."""
    path = os.path.join(directory, LOCK_NAME)
    pause = 0.001
    while True:
        try:
            return zc.lockfile.SimpleLockFile(path)
        except zc.lockfile.LockError:
            time.sleep(pause)
            pause = min(pause * 2, _MAX_LOCK_PAUSE)


def touch(path):
    """Mark `path` as just used (trimming removes the least recently used
    blobs first); False if it does not exist.

    The access time is set explicitly: many file systems update it
    lazily or not at all.
    """
    try:
        os.utime(path, (time.time(), os.stat(path).st_mtime))
    except FileNotFoundError:
        return False
    except PermissionError:
        pass  # another user's file, in a cache shared between users
    return True


class BlobCache:
    """A `zeocache` directory: blobs fetched from the server on demand.

    `size` (bytes, or None for no limit) and `size_check` (percent) are
    handed to the `CacheTrimmer`; `name` names its thread.
    """

    def __init__(self, directory, size=None, size_check=10, name=""):
        self.fshelper = ZODB.blob.FilesystemHelper(directory, LAYOUT_NAME)
        prepare_directory(self.fshelper)
        self.directory = self.fshelper.base_dir
        self.downloads = Downloads()
        #: The blob directories known to exist (at most 997), so that
        #: adopting a blob costs no mkdir attempt.
        self._directories = set()
        self._trimmer = None
        if size is not None:
            self._trimmer = CacheTrimmer(self.directory, size, size_check,
                                         name)
            self._trimmer.start()  # the cache may be too big already

    def path(self, oid, tid):
        """Where blob `(oid, tid)` is cached."""
        check_id(oid, "oid")
        check_id(tid, "tid")
        return os.path.join(self.directory, LAYOUT.getBlobFilePath(oid, tid))

    def load(self, oid, tid, fetch):
        """The path of blob `(oid, tid)`, downloaded if it is missing.

        `fetch(oid, tid)` asks the server and returns once the blob has
        arrived (the connection's reader gives its chunks to
        `self.downloads`); POSKeyError if the server has no such blob.
        """
        path = self.path(oid, tid)
        if touch(path):
            return path
        with self._locked(path):
            if not touch(path):
                self._download(oid, tid, path, fetch)
        return path

    def open(self, oid, tid, fetch, opener):
        """`opener(path)` of blob `(oid, tid)`, which is downloaded again
        if it disappears (trimmed by another process, say) before it is
        open."""
        path = self.load(oid, tid, fetch)
        try:
            return opener(path)
        except FileNotFoundError:
            pass
        with self._locked(path):  # nobody trims it while we hold this
            if not touch(path):
                self._download(oid, tid, path, fetch)
            return opener(path)

    def adopt(self, oid, tid, filename):
        """Move `filename`, our own upload of blob `(oid, tid)`, into the
        cache, so that we never download what we just wrote.

        A rename within one file system needs no lock: whoever opens the
        path, now or while another process downloads the same blob, gets
        either the file that was there or ours, each whole and with the
        same bytes.  (Taking the directory's lock file for every blob
        cost a fifth of a small-blob upload.)  Only a copy to another
        file system, which is not atomic, is done under the lock.
        """
        path = self.path(oid, tid)
        size = os.stat(filename).st_size
        try:
            self._in_directory(os.path.dirname(path),
                               lambda: os.replace(filename, path))
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            with self._locked(path):
                if os.path.exists(path):  # another process fetched it
                    ZODB.blob.remove_committed(filename)
                    return
                ZODB.blob.rename_or_copy_blob(filename, path)
        else:
            try:
                ZODB.blob.set_not_writable(path)
            except FileNotFoundError:
                pass  # trimmed by another process already
        self._added(size)

    def close(self):
        """Stop trimming (and wait for the trimming thread)."""
        if self._trimmer is not None:
            self._trimmer.close()

    def _locked(self, path):
        directory = os.path.dirname(path)
        return contextlib.closing(self._in_directory(
            directory, lambda: lock_directory(directory)))

    def _in_directory(self, directory, action):
        """`action()`, which needs `directory`: made first unless known
        to exist, and made again if it was removed by hand since."""
        if directory in self._directories:
            try:
                return action()
            except FileNotFoundError:
                self._directories.discard(directory)
        os.makedirs(directory, exist_ok=True)
        self._directories.add(directory)
        return action()

    def _download(self, oid, tid, path, fetch):
        """Fetch blob `(oid, tid)` into `path` (its directory locked)."""
        with self.downloads.expecting(oid, tid, path) as download:
            fetch(oid, tid)
        if download.error is not None:
            raise download.error
        if not download.complete:
            raise POSKeyError("No blob file", oid, tid)
        logger.debug("downloaded blob %s", path)
        self._added(download.size)

    def _added(self, size):
        if self._trimmer is not None:
            self._trimmer.added(size)


class Downloads:
    """The blob downloads this client is waiting for, by `(oid, tid)`.

    The server's `receiveBlobStart/Chunk/Stop` calls (on the connection's
    reading thread) go to the matching download; a call for a blob
    nobody asked for is logged and dropped, so the server can make us
    write no file we did not ask for.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._expected = {}

    @contextlib.contextmanager
    def expecting(self, oid, tid, path):
        """A context in which the server's messages for `(oid, tid)` go
        to `path`; it yields the `_Download`."""
        key = (oid, tid)
        download = _Download(path)
        with self._lock:
            self._expected[key] = download
        try:
            yield download
        finally:
            with self._lock:
                del self._expected[key]
            download.abandon()

    def start(self, oid, tid):
        download = self._find(oid, tid, "receiveBlobStart")
        if download is not None:
            download.start()

    def chunk(self, oid, tid, chunk):
        download = self._find(oid, tid, None)
        if download is not None:
            download.write(chunk)

    def stop(self, oid, tid):
        download = self._find(oid, tid, "receiveBlobStop")
        if download is not None:
            download.finish()

    def _find(self, oid, tid, method):
        with self._lock:
            download = self._expected.get((oid, tid))
        if download is None and method is not None:
            logger.error("the server sent %s for a blob we did not ask "
                         "for (oid %r, tid %r); ignored", method, oid, tid)
        return download


class _Download:
    """One blob arriving: written to `<path>.dl`, renamed to `path` when
    complete.  Its methods are called by the reading thread, except
    `abandon`, called by the waiting caller once the reply came or the
    connection was lost."""

    def __init__(self, path):
        self.path = path
        self.partial = path + PARTIAL_SUFFIX
        self.size = 0
        self.complete = False
        self.error = None
        self._file = None
        self._lock = threading.Lock()
        self._abandoned = False

    def start(self):
        with self._lock:
            if self._abandoned or self.error is not None:
                return
            self._close()
            self.size = 0
            self._attempt(self._open)

    def write(self, chunk):
        with self._lock:
            if self._file is None:
                return  # not started, failed or abandoned
            self._attempt(self._file.write, chunk)
            self.size += len(chunk)

    def finish(self):
        with self._lock:
            if self._file is None:
                return
            self._attempt(self._install)

    def abandon(self):
        """Stop accepting data; remove a partial file."""
        with self._lock:
            self._abandoned = True
            if not self.complete:
                self._close()
                try:
                    os.remove(self.partial)
                except FileNotFoundError:
                    pass

    def _open(self):
        # A stale `.dl` (a process died downloading) is ours to replace:
        # we hold the directory's lock.
        self._file = open(self.partial, "wb")

    def _install(self):
        self._close()
        ZODB.blob.set_not_writable(self.partial)
        os.replace(self.partial, self.path)
        self.complete = True

    def _attempt(self, action, *args):
        """Run a file operation; a failure (disk full, say) ends the
        download and is raised to the waiting caller later."""
        try:
            action(*args)
        except OSError as error:
            logger.error("writing blob %s failed: %s", self.partial, error)
            self.error = error
            self._close()

    def _close(self):
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
