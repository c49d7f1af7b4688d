"""Where a commit's time goes: its phases, and histograms of lock times.

`CommitTimes` marks the phases of one transaction, for the slow-operation
log.  `TimeHistogram` counts durations into fixed buckets, for the
metrics endpoint: the commit lock's wait and hold times.

Both are written by the committing threads only, each under a lock they
hold anyway (the transaction's, the commit lock's mutex), and read by a
scrape or a log line without any lock: a scrape that overlaps an
observation may see it in the count and not yet in the sum, which the
next scrape corrects, and it never makes a commit wait.
"""

import bisect
import time

#: Upper bounds (seconds) of the lock-time buckets: from a fast local
#: commit (well under a millisecond) to a client stuck between vote and
#: finish.
LOCK_TIME_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)


class TimeHistogram:
    """Durations counted into cumulative buckets, Prometheus style."""

    def __init__(self, bounds=LOCK_TIME_BOUNDS):
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above them all
        self.total = 0.0

    def observe(self, seconds):
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self):
        """`[(upper bound, observations at or below it)]`, the last bound
        being +Inf; and the sum of all observations."""
        counts = list(self._counts)
        total = self.total
        cumulative, running = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), counts):
            running += count
            cumulative.append((bound, running))
        return cumulative, total


class CommitTimes:
    """`time.monotonic()` at each phase of one transaction's commit.

    The phases, in order: `requested` (the client voted), `granted` (the
    commit lock is ours), `stored` (the buffered changes are in the
    storage), `voted` (the storage voted yes), `finish_called` (the
    client's tpc_finish arrived), `finished` (the storage committed and
    the invalidations are published) and `released` (the lock was
    released).  A transaction that ends early (a conflict, an abort) has
    only the marks it reached.
    """

    __slots__ = ("marks",)

    #: (phase, the mark it starts from, the mark it ends at), for the log.
    PHASES = (("waiting for the lock", "requested", "granted"),
              ("storing", "granted", "stored"),
              ("voting", "stored", "voted"),
              ("waiting for tpc_finish", "voted", "finish_called"),
              ("finishing", "finish_called", "finished"))

    def __init__(self):
        self.marks = {"requested": time.monotonic()}

    def mark(self, phase):
        self.marks[phase] = time.monotonic()

    def held(self):
        """Seconds the commit lock was held, or None if it never was (or
        is still held)."""
        marks = self.marks
        if "granted" not in marks or "released" not in marks:
            return None
        return marks["released"] - marks["granted"]

    def phases(self):
        """`[(phase name, seconds)]` of the phases this commit went
        through."""
        marks = self.marks
        return [(name, marks[end] - marks[start])
                for name, start, end in self.PHASES
                if start in marks and end in marks]
