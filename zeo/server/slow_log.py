"""The slow-operation log: which client held the commit lock, and why.

When a site is slow, the question is which transactions keep the others
waiting, from which client, and where their time went.  With
`slow-transaction-threshold` set, every transaction that held the commit
lock longer is logged at WARNING with the client's label and address,
its records and bytes, and the time of each phase (`CommitTimes`); with
`slow-load-threshold`, every load that took longer.  The last
`KEPT_LINES` such lines are kept for the monitor's report.

Lines are logged after the commit lock is released, so writing them
never holds up the next commit.
"""

import collections
import logging
import threading
import time

logger = logging.getLogger("zeo.server.slow")

#: Slow-operation lines the monitor shows.
KEPT_LINES = 20


class SlowLog:
    """Thresholds in seconds (None: that kind is never logged)."""

    def __init__(self, transaction_threshold=None, load_threshold=None,
                 kept_lines=KEPT_LINES):
        self.transaction_threshold = transaction_threshold
        self.load_threshold = load_threshold
        self._recent = collections.deque(maxlen=kept_lines)
        self._recent_lock = threading.Lock()

    def transaction_ended(self, session, times, objects, size, outcome):
        """Log the transaction whose commit lock was released, if it held
        the lock longer than the threshold.  `outcome` says how it ended
        ("committed", "aborted", ...)."""
        threshold = self.transaction_threshold
        held = times.held()
        if threshold is None or held is None or held < threshold:
            return
        phases = ", ".join("%s %.3fs" % phase for phase in times.phases())
        self._log("slow transaction (%s) on storage %r: %s held the commit "
                  "lock %.3fs for %d records, %d bytes: %s",
                  outcome, session.served.name, _client(session), held,
                  objects, size, phases)

    def load(self, session, oid, seconds, size):
        """Log a load that took `seconds`, if that is over the threshold
        (the caller compared already: this is the rare path)."""
        self._log("slow load on storage %r: %s waited %.3fs for object "
                  "%s (%d bytes)", session.served.name, _client(session),
                  seconds, oid.hex(), size)

    def recent(self):
        """The last slow-operation lines, oldest first, each with the time
        it was logged."""
        with self._recent_lock:
            return list(self._recent)

    def _log(self, message, *args):
        logger.warning(message, *args)
        line = "%s %s" % (time.strftime("%Y-%m-%dT%H:%M:%S"),
                          message % args)
        with self._recent_lock:
            self._recent.append(line)


def _client(session):
    """The client as an operator knows it: its label (when it set one)
    and its address."""
    channel = session.channel
    label = session.client_label
    if label and label != channel.peer:
        return "client %r (%s)" % (label, channel.peer)
    return "client %s" % channel.peer
