"""Cleaning up after FileStorage's failed vote (a full disk, a size limit).

FileStorage writes a transaction into Data.fs through a buffered file at
vote.  When a write fails (ENOSPC, or EFBIG past RLIMIT_FSIZE), part of
the transaction is on disk and the rest waits in the file's buffer.
FileStorage then tries to cut the file back to its last transaction, but
cutting flushes the buffer first, which fails for the same reason, so
both the partial write and the buffered rest stay.  Measured with ZODB
6: once space is back, the next vote's seek flushes that stale rest past
the new transaction, which is shorter, and Data.fs ends in garbage
(fstest: "truncated possibly because of damaged records"; reopening it
moves the tail aside and may take it for a transaction from the future).

`FailedWrite` finishes the cut FileStorage could not make: right after
the failed vote, and again before each later vote until it succeeds, it
flushes the buffer and truncates the file to the end of the last
committed transaction.  Until it succeeds, votes fail with its error, so
nothing is ever written behind the stale bytes.  Other storages are left
as they are: nothing is known about how they fail.
"""

import logging

import ZODB.FileStorage

logger = logging.getLogger(__name__)


class FailedWrite:
    """Tracks whether one storage's file still holds a failed write."""

    def __init__(self, name, storage):
        self._name = name
        self._storage = storage
        self._repairable = isinstance(storage, ZODB.FileStorage.FileStorage)
        self.pending = False

    def after_failed_vote(self, error):
        """A vote failed with `error`; cut its leftovers off if we can."""
        if not (self._repairable and isinstance(error, OSError)):
            return
        self.pending = True
        try:
            self.cut()
        except OSError as failure:
            logger.warning(
                "storage %s: cannot cut a failed write off yet (%s); "
                "commits fail until it can be", self._name, failure)

    def cut(self):
        """Flush and truncate if a failed write is pending.

        Raises the OSError if the file still cannot be written; the caller
        holds the server's commit lock, so no transaction is in progress.
        """
        if not self.pending:
            return
        storage = self._storage
        with storage._commit_lock, storage._lock:
            storage._file.truncate(storage._pos)
            storage._files.flush()
        self.pending = False
        logger.info("storage %s: a failed write was cut off; the file ends "
                    "at its last transaction again", self._name)
