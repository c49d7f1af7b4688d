"""Command-line tools: zeopack and zeoup talk to a running server;
cache_stats and cache_simul read client cache traces.

The server tools speak the wire protocol with `zeo.wire` directly (never
through a ClientStorage), so they need nothing but this package, and they
connect the way a client does.  What they share lives here: reading a
server address as users write it, and a blocking socket that reads whole
frames.
"""

import argparse
import socket
import time

from zeo import wire
from zeo.client.opening import connect_socket

#: Frames a tool accepts from a server: replies here are small.
MAX_FRAME_SIZE = 16 * 1024 * 1024


def positive_number(text):
    """An argparse type: a number above zero (a size, an interval)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("%s is not a positive number"
                                         % text)
    return value


def parse_server_address(text):
    """The address to connect to for ``HOST:PORT``, ``PORT`` or a path.

    A value containing "/" is a Unix socket path; a bare port means this
    machine (127.0.0.1), as for ZEO clients.  Raises ValueError with a
    message meant for the user.
    """
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) <= 0xFFFF:
        raise ValueError("invalid server address %r: give HOST:PORT, PORT "
                         "or a Unix socket path" % text)
    return (host or "127.0.0.1", int(port))


def server_address_argument(text):
    """`parse_server_address` as an argparse type: errors become usage
    errors."""
    try:
        return parse_server_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def format_server_address(address):
    if isinstance(address, str):
        return address
    host, port = address
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class FrameSocket:
    """A blocking connection that sends and receives whole frames."""

    def __init__(self, address, timeout):
        self.sock = connect_socket(address, timeout)
        self._reader = wire.FrameReader(MAX_FRAME_SIZE)
        self._frames = []

    def send(self, payload):
        self.sock.sendall(wire.frame(payload))

    def receive(self, timeout=None):
        """The next frame's payload.

        `timeout` (seconds, None for no limit) bounds the whole wait;
        socket.timeout when it passes, ConnectionError if the server
        closes the connection first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("no answer from the server in time")
                self.sock.settimeout(remaining)
            else:
                self.sock.settimeout(None)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._frames.extend(self._reader.feed(data))
        return self._frames.pop(0)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
