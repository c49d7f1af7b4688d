"""Finding a server, registering, and keeping the connection alive.

`ConnectionManager` holds what a `ClientStorage` needs to reach its
storage: the server addresses, the storage name, the read-only policy.
It opens a `Connection`, registers (re-registering read-only on the same
connection in read-only-fallback mode, PROTOCOL.md 8.10), lets the storage
verify its cache, and only then publishes the connection for calls.  It
also sends the heartbeat.

Callers never wait for a connection that is not there: every call made
while disconnected raises `ClientDisconnected` at once.  Reconnection
after a lost connection belongs here too (a later step); the storage only
hears `connected(...)` and `disconnected()`.
"""

import logging
import random
import threading
import time

from ZODB.POSException import ReadOnlyError

from zeo.Exceptions import ClientDisconnected
from zeo.client.connection import Connection

logger = logging.getLogger(__name__)

#: Seconds between heartbeats on an idle or busy connection (PROTOCOL.md 3.8).
HEARTBEAT_INTERVAL = 60
#: Seconds allowed for the TCP connect and the server's greeting.
CONNECT_TIMEOUT = 10


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
    """How long to wait between connection attempts: from `minimum`
    seconds, doubling up to `maximum`, with up to 10% random jitter."""

    def __init__(self, minimum=5, maximum=300):
        if minimum <= 0 or maximum < minimum:
            raise ValueError("need 0 < min_disconnect_poll <= "
                             "max_disconnect_poll, got %r and %r"
                             % (minimum, maximum))
        self.minimum = minimum
        self.maximum = maximum

    def delays(self):
        delay = self.minimum
        while True:
            yield delay * (1 + random.random() / 10)
            delay = min(delay * 2, self.maximum)


class ConnectionManager:
    """Connects to one of `addresses` and registers `storage_name`.

    `client` is the storage: it gets the server's one-way calls
    (`invalidateTransaction`, `info`), `verify(server_tid)` right after
    registration (invalidations are held until it returns),
    `connected(info, read_only)` once the connection is usable, and
    `disconnected()`.
    """

    def __init__(self, addresses, storage_name, client, read_only=False,
                 read_only_fallback=False, client_label=None,
                 retry=None, name="zeo"):
        self.addresses = list(addresses)
        self.storage_name = storage_name
        self.read_only = read_only
        self.read_only_fallback = read_only_fallback
        self.client_label = client_label
        self.retry = retry or RetryPolicy()
        self.name = name
        self._client = client
        self._lock = threading.Lock()
        self._connection = None
        self._registered_read_only = False
        self._closed = threading.Event()
        self._connector = None
        self._last_error = None
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
        """Connect now (blocking until `timeout`, None = forever) or, with
        `wait` false, in a background thread."""
        if not wait:
            self._connector = threading.Thread(
                target=self._connect_loop, name="zeo-client-connect-%s"
                % self.name, daemon=True)
            self._connector.start()
            return
        if not self._connect_loop(timeout):
            raise ClientDisconnected(
                "could not connect to %s within %s seconds (last error: %s)"
                % (", ".join(map(str, self.addresses)), timeout,
                   self._last_error))

    def _connect_loop(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        while not self._closed.is_set():
            attempt_timeout = CONNECT_TIMEOUT
            if deadline is not None:
                attempt_timeout = max(min(attempt_timeout,
                                          deadline - time.monotonic()), 0.1)
            if self._try_addresses(attempt_timeout):
                return True
            delay = next(delays)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                delay = min(delay, remaining)
            self._closed.wait(delay)
        return False

    def _try_addresses(self, timeout):
        """Try each address in turn, each for up to `timeout` seconds to
        connect and read the greeting; True once one is connected."""
        for address in list(self.addresses):
            if self._closed.is_set():
                return False
            try:
                connection = Connection.open(
                    address, self._client, self._connection_closed, timeout)
            except Exception as error:
                self._last_error = "%s: %s" % (address, error)
                logger.info("cannot connect to %s", self._last_error)
                continue
            try:
                self._register(connection, timeout)
            except Exception as error:
                self._last_error = "%s: %s: %s" % (
                    connection.label, type(error).__name__, error)
                logger.warning("registering with %s failed",
                               self._last_error)
                connection.close()
                continue
            return True
        return False

    def _register(self, connection, timeout):
        """Register, verify, get_info, label; then publish `connection`.

        The server must answer each step within `timeout` seconds.
        """
        read_only = self.read_only
        try:
            server_tid = connection.call("register", self.storage_name,
                                         read_only, timeout=timeout)
        except ReadOnlyError:
            if not self.read_only_fallback:
                raise
            read_only = True
            server_tid = connection.call("register", self.storage_name, True,
                                         timeout=timeout)
        self._client.verify(server_tid)
        connection.release(server_tid)
        info = connection.call("get_info", timeout=timeout)
        if self.client_label:
            connection.oneway("set_client_label", self.client_label)
        with self._lock:
            if self._closed.is_set():
                raise ClientDisconnected("client closed while connecting")
            self._registered_read_only = read_only
            self._connection = connection
        logger.info("connected to %s, storage %r%s", connection.label,
                    self.storage_name, " (read-only)" if read_only else "")
        self._client.connected(info, read_only)

    def _connection_closed(self, connection):
        with self._lock:
            if connection is not self._connection:
                return
            self._connection = None
        self._client.disconnected()

    # -- the heartbeat --------------------------------------------------------

    def _heartbeat_loop(self):
        while not self._closed.wait(HEARTBEAT_INTERVAL):
            connection = self._connection
            if connection is None:
                continue
            try:
                connection.heartbeat()
            except ClientDisconnected:
                pass

    # -- closing --------------------------------------------------------------

    def close(self):
        """Close the connection and stop every thread.  Idempotent."""
        self._closed.set()
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        for thread in (self._connector, self._heartbeat):
            if thread is not None and thread is not threading.current_thread():
                thread.join(CONNECT_TIMEOUT + 5)
