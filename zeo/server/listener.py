"""Accepting connections: one named thread per client.

The standard library's threading servers do the accepting; we override
what they leave unsaid: threads get names, TCP sockets get TCP_NODELAY
(the protocol mixes one-way and two-way messages, and Nagle's algorithm
would add delayed-ACK stalls) and short TCP keepalive (see
`set_keepalive`), every live connection is tracked so shutdown can close
and join them, a connection past max-connections is closed before it
costs a thread, and a Unix socket file gets socket-mode.  Between
accepts, the accept loop gives the memory of a burst of ended
connections back to the system (`zeo.server.memory`).
"""

import logging
import os
import socket
import socketserver
import threading

from zeo.server.connection import ServerConnection, format_peer
from zeo.server.fd_limit import AcceptBackoff
from zeo.server.memory import FreedMemory
from zeo.server.unix_socket import bind_with_mode, remove_stale_socket

logger = logging.getLogger(__name__)


class _ConnectionTracking:
    """Mixin: run each accepted socket as a `ServerConnection` in its own
    named thread, and remember the live ones."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connection attempts when
    # many clients (re)connect at once, e.g. after a server restart.
    request_queue_size = socket.SOMAXCONN

    def setup_tracking(self, server):
        self.zeo_server = server
        self._live = {}  # ServerConnection -> Thread
        self._live_lock = threading.Lock()
        #: Bytes received and queued to send by connections that ended.
        self._ended_traffic = [0, 0]
        self.freed_memory = FreedMemory()
        self._stopping = threading.Event()
        self._accept_backoff = AcceptBackoff(self._stopping)

    def get_request(self):
        """Accept; without spinning while accepts fail for lack of file
        descriptors (see `zeo.server.fd_limit.AcceptBackoff`)."""
        try:
            request = super().get_request()
        except OSError as error:
            self._accept_backoff.failed(error)
            raise  # socketserver drops it and goes back to waiting
        self._accept_backoff.succeeded()
        return request

    def shutdown(self):
        self._stopping.set()  # cuts a back-off wait short
        super().shutdown()

    def process_request(self, request, client_address):
        if not self.zeo_server.guard.admit(format_peer(client_address),
                                           self.connection_count()):
            self.shutdown_request(request)
            return
        if isinstance(request, socket.socket) and \
                request.family in (socket.AF_INET, socket.AF_INET6):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_keepalive(request, self.zeo_server.tcp_keepalive)
        connection = ServerConnection(request, client_address, self.zeo_server)
        thread = threading.Thread(
            target=self._run_connection, args=(connection,),
            name="zeo-conn-%s" % format_peer(client_address), daemon=True)
        with self._live_lock:
            self._live[connection] = thread
        thread.start()

    def connection_count(self):
        with self._live_lock:
            return len(self._live)

    def _run_connection(self, connection):
        try:
            connection.run()
        finally:
            with self._live_lock:
                self._live.pop(connection, None)
                self._ended_traffic[0] += connection.bytes_received
                self._ended_traffic[1] += connection.outbox.queued_bytes
            self.freed_memory.connection_ended()

    def service_actions(self):
        """Run by the accept loop between accepts (every poll interval)."""
        self.freed_memory.maybe_release()

    def traffic(self):
        """`(bytes received, bytes queued to send, open connections)`
        since the listener started."""
        with self._live_lock:
            live = list(self._live)
            received, sent = self._ended_traffic
        return (received + sum(c.bytes_received for c in live),
                sent + sum(c.outbox.queued_bytes for c in live), len(live))

    def close_connections(self, timeout=10):
        """Close every live connection and wait for its thread to end."""
        with self._live_lock:
            live = list(self._live.items())
        for connection, _thread in live:
            connection.close("server shutting down")
        for _connection, thread in live:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("connection thread %s did not stop",
                               thread.name)

    def handle_error(self, request, client_address):
        logger.exception("error accepting %s", format_peer(client_address))


class TCPListener(_ConnectionTracking, socketserver.TCPServer):
    address_family = socket.AF_INET


class TCP6Listener(_ConnectionTracking, socketserver.TCPServer):
    address_family = socket.AF_INET6


class UnixListener(_ConnectionTracking, socketserver.UnixStreamServer):

    def server_bind(self):
        bind_with_mode(self.socket, self.server_address,
                       self.zeo_server.guard.limits.socket_mode)

    def server_close(self):
        socketserver.UnixStreamServer.server_close(self)
        try:
            os.unlink(self.server_address)
        except OSError:
            pass


def set_keepalive(sock, seconds):
    """Drop the connection once its peer has acknowledged nothing for
    about `seconds` (None or 0: leave the system's settings).

    A client whose host died or whose network was cut sends no FIN: the
    connection would hold its thread, memory and any transaction until
    the system's keepalive (two hours and more) or retransmission limits
    (about fifteen minutes) gave up.  Here keepalive probes start after
    half the time of silence and three unanswered ones, a sixth of it
    apart, end the connection; TCP_USER_TIMEOUT gives data the peer
    never acknowledges the same bound.  Where the options do not exist
    (not Linux), plain SO_KEEPALIVE is all we set.
    """
    if not seconds:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", max(1, round(seconds / 2))),
                        ("TCP_KEEPINTVL", max(1, round(seconds / 6))),
                        ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", int(seconds * 1000))):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def make_listener(address, server):
    """Bind `address`: a (host, port) pair or a Unix socket path."""
    if isinstance(address, str):
        remove_stale_socket(address)
        listener_class = UnixListener
    elif ":" in (address[0] or ""):
        listener_class = TCP6Listener
    else:
        listener_class = TCPListener
    listener = listener_class(address, None, bind_and_activate=False)
    listener.setup_tracking(server)
    try:
        listener.server_bind()
        listener.server_activate()
    except BaseException:
        listener.socket.close()
        raise
    return listener


def format_address(address):
    """`host:port` (IPv6 hosts bracketed), or a Unix socket path."""
    if isinstance(address, tuple):
        host, port = address[:2]
        return "%s:%s" % ("[%s]" % host if ":" in host else host, port)
    return str(address)
