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
"""

import logging

try:
    import resource
except ImportError:  # not POSIX: nothing to read or raise
    resource = None

logger = logging.getLogger(__name__)

#: Descriptors kept for what is not a client connection.
RESERVE = 64


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
