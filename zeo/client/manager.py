"""Finding a server, registering, and keeping the connection alive.

`ConnectionManager` holds what a `ClientStorage` needs to reach its
storage: the server addresses, the storage name, the read-only policy.
It opens a `Connection`, registers (re-registering read-only on the same
connection in read-only-fallback mode, PROTOCOL.md 8.10), lets the storage
verify its cache, and only then publishes the connection for calls.  It
also sends the heartbeat.

One background thread, the connector, does all the connecting: the first
connection, reconnecting after a lost one (at once, then trying every
address in rounds, waiting longer after each round that fails, as
`RetryPolicy` says), and, while a read-only-fallback client is on a
read-only server, looking for a writable server to switch to.  Callers
never wait for a connection that is not there: every call made while
disconnected raises `ClientDisconnected` at once.  The storage only
hears `verify(...)`, `connected(...)` and `disconnected()`.

A server can also vanish without closing the connection (a network
partition, a host that lost power): nothing arrives any more, and a
caller waiting for a reply would wait forever.  With a
`heartbeat_timeout`, the heartbeat thread pings a server it has not
heard from for a third of that time, and the connector, which has
nothing else to do while connected, closes a connection that stayed
silent for the whole timeout.  Closing it wakes every caller with
`ClientDisconnected` (also one blocked sending into a full socket) and
starts the reconnection, which tries the other addresses first.
"""

import logging
import math
import random
import threading
import time

from ZODB.POSException import ReadOnlyError

from zeo.Exceptions import ClientDisconnected
from zeo.client.connection import DEFAULT_BUSY_POLL, Connection

logger = logging.getLogger(__name__)

#: Seconds between heartbeats on an idle or busy connection (PROTOCOL.md 3.8).
HEARTBEAT_INTERVAL = 60
#: Seconds allowed for the TCP connect and the server's greeting (less
#: when the heartbeat timeout is shorter), and for each registration call.
CONNECT_TIMEOUT = 10
#: Seconds of silence from the server after which the connection is
#: given up by default (ClientStorage's `heartbeat_timeout`).
DEFAULT_HEARTBEAT_TIMEOUT = 60
#: How many times per heartbeat timeout the connector looks at how long
#: the server has been silent: a silent server is noticed within 1.25
#: timeouts of the last byte it sent.
_CHECKS_PER_TIMEOUT = 4


def normalize_addresses(addr):
    """The list of server addresses for ClientStorage's `addr` argument.

    `(host, port)`, a Unix socket path, a bare int port (meaning
    127.0.0.1), or a list of those.
    """
    if isinstance(addr, list):
        addresses = [_one_address(item) for item in addr]
    else:
        addresses = [_one_address(addr)]
    if not addresses:
        raise ValueError("no server address given")
    return addresses


def _one_address(addr):
    if isinstance(addr, bool):
        raise ValueError("bad server address %r" % (addr,))
    if isinstance(addr, int):
        return ("127.0.0.1", addr)
    if isinstance(addr, str):
        return addr
    if isinstance(addr, tuple) and len(addr) == 2 \
            and isinstance(addr[0], str) and isinstance(addr[1], int):
        return addr
    raise ValueError("bad server address %r: expected (host, port), a Unix "
                     "socket path, a port number or a list of them" % (addr,))


class RetryPolicy:
    """How long to wait between rounds of connection attempts.

    The delay starts at `minimum` seconds and grows by a fifth after each
    failed round, up to `maximum`; each wait is drawn at random between
    half and all of the delay.  Growing slowly keeps every wait under a
    fifth of how long the server has been away (plus `minimum`), so a
    restarted server is found soon after it listens again; the jitter
    spreads out the clients that lost the same server at the same
    moment, so they do not all come back in step.
    """

    GROWTH = 1.2

    def __init__(self, minimum=0.05, maximum=300):
        if minimum <= 0 or maximum < minimum:
            raise ValueError("need 0 < min_disconnect_poll <= "
                             "max_disconnect_poll, got %r and %r"
                             % (minimum, maximum))
        self.minimum = minimum
        self.maximum = maximum

    def delays(self):
        delay = self.minimum
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * self.GROWTH, self.maximum)


class ConnectionManager:
    """Connects to one of `addresses` and registers `storage_name`.

    `client` is the storage: it gets the server's one-way calls
    (`invalidateTransaction`, `info`), `verify(connection, server_tid)`
    right after registration (it returns the tid up to which the cache is
    now known to be current; invalidations are held until then),
    `connected(info, read_only)` once the connection is usable, and
    `disconnected()` when a published connection is lost.

    `heartbeat_timeout` (seconds; None or 0: never) is how long the
    server may stay silent before the connection is given up.
    """

    def __init__(self, addresses, storage_name, client, read_only=False,
                 read_only_fallback=False, client_label=None,
                 retry=None, name="zeo", busy_poll=DEFAULT_BUSY_POLL,
                 heartbeat_timeout=DEFAULT_HEARTBEAT_TIMEOUT, tls=None):
        if heartbeat_timeout is not None and heartbeat_timeout < 0:
            raise ValueError("heartbeat_timeout cannot be negative")
        self.addresses = list(addresses)
        self.storage_name = storage_name
        self.read_only = read_only
        self.read_only_fallback = read_only_fallback
        self.client_label = client_label
        self.retry = retry or RetryPolicy()
        self.name = name
        self.busy_poll = busy_poll
        self.heartbeat_timeout = heartbeat_timeout or None
        self._connect_timeout = min(CONNECT_TIMEOUT,
                                    self.heartbeat_timeout or CONNECT_TIMEOUT)
        self.tls = tls  # a zeo.tls.ClientTLS, or None for plain TCP
        self._client = client
        self._lock = threading.Lock()  # _connection, _pending, read-only
        self._connection = None
        self._pending = None  # a connection still registering
        self._registered_read_only = False
        self._closed = threading.Event()
        #: Set when the connector has something new to look at: the
        #: published connection was lost, or the client is closing.
        self._wake = threading.Event()
        #: The address of the last published connection that was lost:
        #: the next round tries it last.
        self._lost_address = None
        #: Set whenever a connection has been published.
        self._ready = threading.Event()
        self._last_error = None
        #: What the connector is doing now, for the constructor's error.
        self._attempt = None
        self._connector = threading.Thread(
            target=self._connector_loop, name="zeo-client-connect-%s" % name,
            daemon=True)
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="zeo-client-heartbeat-%s" % name,
            daemon=True)
        self._heartbeat.start()

    @property
    def connection(self):
        """The usable connection; ClientDisconnected when there is none."""
        connection = self._connection
        if connection is None or connection.closed:
            raise ClientDisconnected("not connected to a server")
        return connection

    def is_connected(self):
        connection = self._connection
        return connection is not None and not connection.closed

    def is_read_only(self):
        """Whether the current registration is read-only."""
        return self._registered_read_only

    # -- connecting -----------------------------------------------------------

    def connect(self, wait=True, timeout=None):
        """Start the connector; with `wait`, block until it has connected
        (ClientDisconnected after `timeout` seconds, None = forever)."""
        self._connector.start()
        if wait and not self._ready.wait(timeout):
            attempt = self._attempt
            raise ClientDisconnected(
                "could not connect to %s within %s seconds (last error: "
                "%s%s)" % (", ".join(map(str, self.addresses)), timeout,
                           self._last_error, "; still %s" % attempt
                           if attempt else ""))

    def _connector_loop(self):
        """Keep a connection, and a writable one if the client may write.

        Each round tries every address; after a round that fails it waits
        the next delay of the retry policy (woken early by a lost
        connection or close()).  The delays start again from the minimum
        whenever the goal changes: from "any connection" to "a writable
        one" or back.
        """
        delays = None
        goal = None
        while not self._closed.is_set():
            self._wake.clear()
            if not self.is_connected():
                new_goal, found = "connect", self._try_addresses(False)
            elif self.read_only_fallback and self._registered_read_only:
                new_goal, found = "writable", self._try_addresses(True)
            else:
                goal = None
                self._pause()
                continue
            if found:
                continue
            if new_goal != goal:
                goal, delays = new_goal, self.retry.delays()
            self._pause(next(delays))

    def _pause(self, seconds=math.inf):
        """Wait `seconds`, or less if woken (a lost connection, close());
        meanwhile, give up on a connection whose server has been silent
        for the heartbeat timeout."""
        deadline = time.monotonic() + seconds
        period = math.inf
        if self.heartbeat_timeout is not None:
            period = self.heartbeat_timeout / _CHECKS_PER_TIMEOUT
        while True:
            step = min(deadline - time.monotonic(), period)
            if step <= 0 or self._wake.wait(
                    None if step == math.inf else step):
                return
            self._give_up_if_silent()

    def _give_up_if_silent(self):
        """Close the connection if its server has been silent for the
        heartbeat timeout (its loss then wakes the connector)."""
        timeout = self.heartbeat_timeout
        connection = self._connection
        if timeout is not None and connection is not None \
                and connection.silence() >= timeout:
            reason = "no word from the server for %s seconds" % timeout
            logger.warning("(%s) %s; reconnecting", connection.label, reason)
            connection.close(reason=reason)

    def _try_addresses(self, writable_only):
        """Try each address in turn; True once one is registered.

        The address of the connection just lost comes last, so that a
        client whose server vanished fails over to another one at once.
        With `writable_only` (a read-only-fallback client looking for a
        better server) the address in use is skipped and a read-only
        answer counts as a failure.
        """
        current = self._connection
        addresses = list(self.addresses)
        if self._lost_address in addresses:
            addresses.remove(self._lost_address)
            addresses.append(self._lost_address)
        try:
            for address in addresses:
                if self._closed.is_set():
                    return False
                if writable_only and current is not None \
                        and address == current.address:
                    continue
                if self._try_address(address, writable_only):
                    return True
            return False
        finally:
            self._attempt = None

    def _try_address(self, address, writable_only):
        """Connect to `address` and register; True once published."""
        self._attempt = "connecting to %s" % (address,)
        try:
            connection = Connection.open(
                address, self._client, self._connection_closed,
                self._connect_timeout, self.busy_poll, self.tls)
        except Exception as error:
            self._last_error = "%s: %s" % (address, error)
            logger.info("cannot connect to %s", self._last_error)
            return False
        self._attempt = "registering with %s" % connection.label
        try:
            self._register(connection, writable_only)
        except Exception as error:
            self._last_error = "%s: %s: %s" % (
                connection.label, type(error).__name__, error)
            level = logging.INFO if writable_only else logging.WARNING
            logger.log(level, "registering with %s failed", self._last_error)
            connection.close()
            return False
        return True

    def _register(self, connection, writable_only):
        """Register, verify, label, get_info; then publish `connection`.

        The server must answer each step within CONNECT_TIMEOUT seconds.
        A read-only connection this replaces is closed once the new one
        is published, so calls never find no connection in between.
        """
        with self._lock:
            if self._closed.is_set():
                raise ClientDisconnected("client closed while connecting")
            self._pending = connection
        try:
            read_only = self.read_only
            try:
                server_tid = connection.call("register", self.storage_name,
                                             read_only,
                                             timeout=CONNECT_TIMEOUT)
            except ReadOnlyError:
                if not self.read_only_fallback or writable_only:
                    raise
                read_only = True
                server_tid = connection.call("register", self.storage_name,
                                             True, timeout=CONNECT_TIMEOUT)
            verified_tid = self._client.verify(connection, server_tid)
            connection.release(verified_tid)
            if self.client_label:  # leaves with get_info, just below
                connection.oneway("set_client_label", self.client_label)
            info = connection.call("get_info", timeout=CONNECT_TIMEOUT)
            with self._lock:
                if self._closed.is_set():
                    raise ClientDisconnected("client closed while connecting")
                if connection.closed:
                    raise ClientDisconnected("connection lost while "
                                             "registering")
                previous, self._connection = self._connection, connection
                self._registered_read_only = read_only
        finally:
            with self._lock:
                self._pending = None
        logger.info("connected to %s, storage %r%s", connection.label,
                    self.storage_name, " (read-only)" if read_only else "")
        self._client.connected(info, read_only)
        self._ready.set()
        if previous is not None:
            if not previous.closed:
                logger.info("leaving read-only server %s for writable %s",
                            previous.label, connection.label)
            previous.close()

    def _connection_closed(self, connection):
        """A connection ended (called on its reader thread).  Only the
        loss of the published one matters: the connector reconnects."""
        with self._lock:
            if connection is not self._connection:
                return
            self._connection = None
            self._lost_address = connection.address
        self._client.disconnected()
        self._wake.set()

    # -- the heartbeat --------------------------------------------------------

    def _heartbeat_loop(self):
        """Send the one-way heartbeat every HEARTBEAT_INTERVAL seconds;
        with a heartbeat timeout, also a `ping` (whose reply the server
        must send) when the server has been silent for a third of it and
        the last ping was answered.  A send may block on a server that
        went silent; the connector (`_pause`) then closes the connection,
        which ends the send."""
        pinging = self.heartbeat_timeout is not None
        period = HEARTBEAT_INTERVAL
        if pinging:
            period = min(period, self.heartbeat_timeout / 3)
        last_beat = time.monotonic()
        ping = None
        while not self._closed.wait(period):
            connection = self._connection
            if connection is None:
                continue
            try:
                if pinging and connection.silence() >= period \
                        and (ping is None or ping.finished):
                    ping = connection.send_call("ping", ())
                if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL:
                    last_beat = time.monotonic()
                    connection.heartbeat()
            except ClientDisconnected:
                pass

    # -- closing --------------------------------------------------------------

    def close(self):
        """Close the connection and stop every thread.  Idempotent."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            connection, self._connection = self._connection, None
            pending = self._pending
        for open_connection in (pending, connection):
            if open_connection is not None:
                open_connection.close()
        for thread in (self._connector, self._heartbeat):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(CONNECT_TIMEOUT + 5)
