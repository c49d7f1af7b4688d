"""Limits that let a server face a network: what they are, and enforcing them.

A server that anyone on a network can reach must bound what a stranger can
make it hold: connections (each is a thread, a socket and a receive
buffer), connections that never register (they would hold all of that for
nothing), and frames (whose announced length would otherwise be
allocated).  `NetworkLimits` is the settings, checked once when made;
`ConnectionGuard` applies them for one server: it admits or refuses new
connections, closes those that do not register in time, and logs every
refusal with the peer's address without letting a flood of them flood the
log.
"""

import dataclasses
import logging
import threading
import time

from zeo import wire

logger = logging.getLogger(__name__)

#: A ZEO deployment has a connection per client process and storage,
#: typically tens.  500 leaves room for that many times over while keeping
#: the server, with a socket per connection, under the open-file limit of
#: 1024 that many systems (and systemd) give a service by default, so that
#: a flood of connections meets this limit and not a failing accept().
DEFAULT_MAX_CONNECTIONS = 500
#: Seconds.  A client sends `register` right after the handshake, within a
#: round trip or two; 10 s leaves room for a slow network or a TLS
#: handshake and still frees a silent connection soon.
DEFAULT_REGISTER_TIMEOUT = 10.0
#: Owner-only: connecting to a Unix socket needs write permission on it,
#: and any process that connects can read and write every object.
DEFAULT_SOCKET_MODE = 0o600
#: The largest frame a client may send before it has registered: the
#: handshake and `register` take a few dozen bytes, and whoever reaches
#: the port must not make us buffer (and decode) a large frame.  Blob
#: chunks (59000 bytes) fit too, so the limit after register may be as
#: small as this.
UNREGISTERED_MAX_FRAME_SIZE = 64 * 1024
#: A frame's length is a 4-byte word: no frame is longer.
LARGEST_FRAME_SIZE = 2 ** 32 - 1
#: At most one refusal line of each kind per this many seconds.
REFUSAL_LOG_INTERVAL = 1.0

#: Kinds of refusal: each is counted, and its log lines limited, apart.
CONNECTION_REFUSED = "connection refused"
REGISTER_TIMEOUT = "no register in time"
FRAME_REFUSED = "frame refused"
REFUSAL_KINDS = (CONNECTION_REFUSED, REGISTER_TIMEOUT, FRAME_REFUSED)


def _check_range(key, value, minimum, maximum=None, minimum_included=True,
                 show=str):
    too_small = value < minimum if minimum_included else value <= minimum
    if too_small:
        raise ValueError("%s must be %s %s" % (
            key, "at least" if minimum_included else "more than",
            show(minimum)))
    if maximum is not None and value > maximum:
        raise ValueError("%s must be at most %s" % (key, show(maximum)))


#: Each setting's accepted range, by configuration key.
_RANGES = {
    "max-connections": dict(minimum=1),
    "register-timeout": dict(minimum=0, minimum_included=False),
    "max-frame-size": dict(minimum=UNREGISTERED_MAX_FRAME_SIZE,
                           maximum=LARGEST_FRAME_SIZE),
    "socket-mode": dict(minimum=0, maximum=0o777, show="0%o".__mod__),
}


def check_setting(key, value):
    """`value`, or ValueError naming `key` if it is outside its range."""
    _check_range(key, value, **_RANGES[key])
    return value


@dataclasses.dataclass(frozen=True)
class NetworkLimits:
    """The limits of one server (see the <zeo> keys of the same names)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    register_timeout: float = DEFAULT_REGISTER_TIMEOUT
    #: The largest frame accepted after register.
    max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE
    #: Permissions of a Unix socket file the server creates.
    socket_mode: int = DEFAULT_SOCKET_MODE

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_setting(field.name.replace("_", "-"),
                          getattr(self, field.name))


class RefusalLog:
    """Counts refusals and logs them, at most one line per kind a second.

    A scan or a flood can cause thousands of refusals a second; each one is
    counted (the monitor shows the totals), and the line that follows a
    quiet second says how many were left out before it.
    """

    def __init__(self, interval=REFUSAL_LOG_INTERVAL, clock=time.monotonic):
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(REFUSAL_KINDS, 0)
        self._last_logged = {}
        self._suppressed = dict.fromkeys(REFUSAL_KINDS, 0)

    def refuse(self, kind, peer, text):
        """Count a refusal of `kind`; log "(peer) text" unless one of that
        kind was logged less than the interval ago."""
        now = self._clock()
        with self._lock:
            self._counts[kind] += 1
            last = self._last_logged.get(kind)
            if last is not None and now - last < self._interval:
                self._suppressed[kind] += 1
                return
            self._last_logged[kind] = now
            suppressed, self._suppressed[kind] = self._suppressed[kind], 0
        if suppressed:
            text += " (%d more %s since the last such line)" % (
                suppressed, "refusal" if suppressed == 1 else "refusals")
        logger.warning("(%s) %s", peer, text)

    def counts(self):
        """How many refusals of each kind since the server started."""
        with self._lock:
            return dict(self._counts)


class RegisterDeadlines:
    """Closes connections that have not registered in time, in one thread.

    Every connection has the same timeout, so the pending ones, kept in
    arrival order, are also in deadline order: the thread sleeps until the
    first one's deadline.  A connection leaves as soon as it registers or
    ends, so the thread holds nothing for connections that are gone.
    """

    def __init__(self, timeout, on_expired):
        self._timeout = timeout
        self._on_expired = on_expired
        self._pending = {}  # connection -> deadline, in insertion order
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name="zeo-register-deadlines", daemon=True)

    def start(self):
        self._thread.start()

    def watch(self, connection):
        with self._condition:
            if self._stopping:
                return
            self._pending[connection] = time.monotonic() + self._timeout
            if len(self._pending) == 1:
                self._condition.notify()

    def forget(self, connection):
        with self._condition:
            self._pending.pop(connection, None)

    def stop(self):
        with self._condition:
            self._stopping = True
            self._pending.clear()
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        while True:
            with self._condition:
                expired = self._next_expired()
                if expired is None:
                    return
            self._on_expired(expired)
            # Not kept while waiting for the next one: a connection that
            # has ended must be freed then, not when another expires.
            del expired

    def _next_expired(self):
        """Wait for the first pending connection to expire and return it
        (None once stopping); called with the condition held.

        While it waits, it holds only the deadline: the connection may
        register or end meanwhile, and must not be kept alive by us.
        """
        while not self._stopping:
            if not self._pending:
                self._condition.wait()
                continue
            remaining = next(iter(self._pending.values())) - time.monotonic()
            if remaining <= 0:
                connection = next(iter(self._pending))
                del self._pending[connection]
                return connection
            self._condition.wait(remaining)
        return None


class ConnectionGuard:
    """Applies a server's `NetworkLimits` to its connections.

    The listener asks `admit` before it starts a connection's thread; a
    connection reports its start (`watch`), its register or its end
    (`forget`) and refused frames (`frame_refused`).
    """

    def __init__(self, limits):
        self.limits = limits
        self.refusals = RefusalLog()
        self._deadlines = RegisterDeadlines(limits.register_timeout,
                                            self._register_timed_out)

    def watch(self, connection):
        """`connection` has begun: it must register in time."""
        self._deadlines.watch(connection)

    def forget(self, connection):
        """`connection` has registered, or ended."""
        self._deadlines.forget(connection)

    def start(self):
        self._deadlines.start()

    def stop(self):
        self._deadlines.stop()

    def admit(self, peer, live):
        """Whether a new connection from `peer` may join the `live` ones."""
        if live < self.limits.max_connections:
            return True
        self.refusals.refuse(
            CONNECTION_REFUSED, peer,
            "connection refused: %d connections already, the most "
            "max-connections allows" % live)
        return False

    def _register_timed_out(self, connection):
        if connection.registered:
            return  # it registered just as its time ran out
        self.refusals.refuse(
            REGISTER_TIMEOUT, connection.peer,
            "no register within register-timeout (%gs); closing"
            % self.limits.register_timeout)
        connection.close("no register in time")

    def frame_refused(self, peer, error, registered):
        """Log a frame refused for its announced length (`FrameTooLarge`)."""
        self.refusals.refuse(
            FRAME_REFUSED, peer,
            "refused: %s %s; closing" % (
                error, "(max-frame-size)" if registered else "before register"))
