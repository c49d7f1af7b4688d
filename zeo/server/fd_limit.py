"""How many clients the file-descriptor limit lets the server take.

Every client connection holds one descriptor, and a server that runs out
of them cannot accept, open a blob or rotate its log: it would fail in
ways that look like anything but their cause.  So at start-up the server
raises its soft `RLIMIT_NOFILE` to the hard limit (which an unprivileged
process may do), and logs both and how many clients that leaves room for
after a reserve for everything else it opens (storage files, the
listener, log files, the monitor, blob files being streamed, commit
temporary files).  A `max-connections` above that room is warned about;
the monitor shows the room.

If they run out all the same, `accept` fails while the client waits in
the listen queue, so the listening socket stays readable: an accept
loop that simply tried again would spin at full CPU, and log nothing.
`AcceptBackoff` makes it wait, longer each time up to a second, and log
the episode once when it starts and once when it ends.
"""

import errno
import logging
import time

try:
    import resource
except ImportError:  # not POSIX: nothing to read or raise
    resource = None

logger = logging.getLogger(__name__)

#: Descriptors kept for what is not a client connection.
RESERVE = 64
#: `accept` errors that mean the process or system ran out of something
#: (descriptors, memory) rather than that one client went away.
OUT_OF_RESOURCES = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                              errno.ENOMEM])
#: Seconds the accept loop waits after its first failed accept, doubled
#: after each further one up to the most.
FIRST_BACKOFF = 0.05
MOST_BACKOFF = 1.0


def raise_and_report(max_connections):
    """Raise the soft descriptor limit to the hard one, log the limits,
    and return how many clients the soft limit leaves room for (None
    where there is no such limit to read)."""
    if resource is None:
        return None
    limit = resource.RLIMIT_NOFILE
    soft, hard = resource.getrlimit(limit)
    raised_from = None
    if soft != hard:
        try:
            resource.setrlimit(limit, (hard, hard))
        except (ValueError, OSError) as error:
            # An unlimited hard limit is above what the kernel allows.
            logger.warning("could not raise the file descriptor limit "
                           "from %d to %s: %s", soft, _text(hard), error)
        else:
            raised_from, soft = soft, hard
    capacity = max(0, soft - RESERVE) if soft != resource.RLIM_INFINITY \
        else None
    logger.info("file descriptor limit %s%s (hard %s): room for %s clients",
                _text(soft),
                "" if raised_from is None else " (raised from %d)"
                % raised_from,
                _text(hard),
                "unlimited" if capacity is None else "%d" % capacity)
    if capacity is not None and capacity < max_connections:
        logger.warning("max-connections %d is more than the %d clients the "
                       "file descriptor limit leaves room for; raise the "
                       "hard limit (ulimit -Hn, LimitNOFILE=)",
                       max_connections, capacity)
    return capacity


def _text(value):
    return "unlimited" if value == resource.RLIM_INFINITY else "%d" % value


class AcceptBackoff:
    """How the accept loop behaves while accepts fail for lack of
    resources: it waits before trying again (`failed`), and logs when
    that starts and when an accept succeeds again (`succeeded`).

    Only the accept loop's thread calls it.  `stopping`, an Event, cuts
    a wait short (the server is shutting down).
    """

    def __init__(self, stopping):
        self._stopping = stopping
        self._failures = 0
        self._delay = FIRST_BACKOFF
        self._since = None

    def failed(self, error):
        """An accept failed with `error`: if for lack of resources, wait
        before the next try."""
        if error.errno not in OUT_OF_RESOURCES:
            return
        if not self._failures:
            self._since = time.monotonic()
            logger.error("cannot accept connections: %s; waiting for a "
                         "client to leave (raise the file descriptor limit "
                         "or lower max-connections)", error.strerror)
        self._failures += 1
        self._stopping.wait(self._delay)
        self._delay = min(self._delay * 2, MOST_BACKOFF)

    def succeeded(self):
        if self._failures:
            logger.warning("accepting connections again after %d failed "
                           "accepts in %.1f seconds", self._failures,
                           time.monotonic() - self._since)
            self._failures = 0
            self._delay = FIRST_BACKOFF
