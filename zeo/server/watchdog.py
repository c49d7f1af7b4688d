"""The transaction-timeout watchdog.

A client that votes and then never finishes (it hung, its machine died
without closing the socket) would hold the commit lock forever.  The
watchdog breaks such a commit: the transaction is aborted, the lock handed
on, and only then is the connection closed (PROTOCOL.md 8.9).
"""

import logging
import threading
import time

logger = logging.getLogger(__name__)


class TransactionWatchdog:
    """One thread watching the commit locks of every served storage."""

    def __init__(self, storages, timeout):
        self.timeout = timeout
        self._storages = list(storages)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="zeo-transaction-watchdog", daemon=True)

    def start(self):
        self._thread.start()

    def is_alive(self):
        return self._thread.is_alive()

    def _run(self):
        while not self._stop.wait(self._next_check()):
            now = time.time()
            for served in self._storages:
                holder, since = served.commit_lock.held()
                if holder is not None and now - since >= self.timeout:
                    holder.break_commit(
                        "Transaction timeout after %s seconds" % self.timeout,
                        since)

    def _next_check(self):
        """Seconds until the oldest lock could expire (at most 1)."""
        now = time.time()
        delay = min(1.0, self.timeout)
        for served in self._storages:
            _holder, since = served.commit_lock.held()
            if since is not None:
                delay = min(delay, max(since + self.timeout - now, 0.01))
        return delay

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
