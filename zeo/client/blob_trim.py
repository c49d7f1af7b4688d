"""Keeping a blob cache directory near its size limit.

Counting the cache's bytes means listing the whole directory, so it is
not done on every download: once the bytes added to the cache (downloads
and our own uploads) since the last check pass `size_check` percent of
the size, a background thread lists the cache and removes the least
recently used blobs (by access time, which `blob_cache.touch` keeps)
until the cache holds at most `size` minus that same share.  The next
check then comes before the cache can grow past `size` (by more than the
last blob added).

Several processes may share one cache: a `check_size.lock` file lets one
of them trim at a time; the others wait for it and then look again.  A
blob is removed only under its directory's lock, and skipped if someone
holds it (a download is in progress there).  Removing is
unlinking: a reader that has the file open keeps reading it, and a
client that wants it again downloads it again.
"""

import logging
import os
import stat
import threading

import zc.lockfile
import ZODB.blob

logger = logging.getLogger(__name__)

#: The lock file of each cache directory (see `zeo.client.blob_cache`).
LOCK_NAME = ".lock"
#: The lock file that lets one process at a time trim a cache.
TRIM_LOCK_NAME = "check_size.lock"
#: Seconds between attempts while another process trims.
_RETRY_PAUSE = 1.0


class CacheTrimmer:
    """Trims the cache in `directory` to `size` bytes, in a thread named
    after `name` that runs only while there is work (see the module
    docstring); `size_check` is a percentage of `size`."""

    def __init__(self, directory, size, size_check, name):
        if size < 0:
            raise ValueError("blob_cache_size cannot be negative")
        if not 0 <= size_check < 100:
            raise ValueError("blob_cache_size_check must be a percentage "
                             "from 0 to 99, not %r" % (size_check,))
        self._directory = directory
        self._check_bytes = size * size_check // 100
        self._target = size - self._check_bytes
        self._thread_name = "zeo-blob-cache-trim-%s" % name
        self._lock = threading.Lock()  # the fields below
        self._added = 0
        self._running = None  # the trimming thread
        self._again = False  # trim once more when the running one ends
        self._stop = threading.Event()

    def added(self, size):
        """`size` bytes were added to the cache: trim if that makes
        enough since the last check."""
        with self._lock:
            self._added += size
            if self._added > self._check_bytes:
                self._start()

    def start(self):
        """Trim now (in the background)."""
        with self._lock:
            self._start()

    def _start(self):
        self._added = 0
        if self._stop.is_set():
            return
        if self._running is not None:
            self._again = True
            return
        self._running = threading.Thread(
            target=self._run, name=self._thread_name, daemon=True)
        self._running.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                while not trim(self._directory, self._target, self._stop):
                    if self._stop.wait(_RETRY_PAUSE):
                        break
            except Exception:
                logger.exception("trimming the blob cache %s failed",
                                 self._directory)
            with self._lock:
                if not self._again:
                    self._running = None
                    return
                self._again = False

    def close(self):
        """Stop trimming; wait for the thread to end."""
        self._stop.set()
        with self._lock:
            thread = self._running
        if thread is not None:
            thread.join()


def trim(directory, target, stop):
    """Remove the least recently used blobs of the cache in `directory`
    until it holds at most `target` bytes, or `stop` is set.

    Returns False, doing nothing, if another process is trimming.
    """
    try:
        guard = zc.lockfile.LockFile(os.path.join(directory, TRIM_LOCK_NAME))
    except zc.lockfile.LockError:
        logger.debug("another process is trimming %s", directory)
        return False
    try:
        blobs, total = _list_blobs(directory)
        logger.debug("blob cache %s holds %d bytes (target %d)",
                     directory, total, target)
        blobs.sort()
        for _atime, path, size in blobs:
            if total <= target or stop.is_set():
                break
            if _remove(path):
                total -= size
    finally:
        guard.close()
    return True


def _list_blobs(directory):
    """`([(access time, path, size)], total size)` of the cached blobs:
    files ending in ``.blob`` in the numbered directories."""
    blobs = []
    total = 0
    for name in _list(directory):
        if not name.isdigit():
            continue
        subdirectory = os.path.join(directory, name)
        for file_name in _list(subdirectory):
            if not file_name.endswith(ZODB.blob.BLOB_SUFFIX):
                continue
            path = os.path.join(subdirectory, file_name)
            try:
                status = os.lstat(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            if not stat.S_ISREG(status.st_mode):
                continue
            blobs.append((status.st_atime, path, status.st_size))
            total += status.st_size
    return blobs, total


def _list(directory):
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path):
    """Remove a cached blob under its directory's lock; False if the lock
    is held (the directory is in use) or the file could not be removed."""
    lock_path = os.path.join(os.path.dirname(path), LOCK_NAME)
    try:
        lock = zc.lockfile.SimpleLockFile(lock_path)  # see lock_directory
    except zc.lockfile.LockError:
        logger.debug("skipped %s: its directory is in use", path)
        return False
    try:
        ZODB.blob.remove_committed(path)
    except FileNotFoundError:
        return True  # gone already: it no longer counts
    except OSError as error:
        logger.warning("could not remove cached blob %s: %s", path, error)
        return False
    finally:
        lock.close()
    return True
