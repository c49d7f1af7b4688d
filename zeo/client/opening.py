"""Opening a connection to a server: the socket and the handshake
(PROTOCOL.md 2.1), before `zeo.client.connection.Connection` takes the
socket over."""

import socket

from zeo import wire
from zeo.Exceptions import ProtocolError

#: Bytes asked of each `recv` while the greeting is read.
_RECV_SIZE = 64 * 1024


def connect_socket(address, timeout):
    """A connected socket for `(host, port)` or a Unix socket path."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def handshake(sock, timeout):
    """Read the server's greeting and answer it.

    Returns the codec and the `FrameReader` (which may already hold the
    start of the next frames).  We answer with the server's encoding
    letter and protocol version 5, as ZEO clients do (PROTOCOL.md 2.1);
    `M5` is refused when msgpack is not installed.
    """
    sock.settimeout(timeout)
    reader = wire.FrameReader()
    payloads = []
    while not payloads:
        data = sock.recv(_RECV_SIZE)
        if not data:
            raise ProtocolError("server closed the connection before its "
                                "greeting")
        payloads = reader.feed(data)
    greeting = payloads[0]
    if len(payloads) > 1:
        raise ProtocolError("server sent messages before the handshake")
    letter, version = greeting[:1], greeting[1:]
    if letter not in (b"Z", b"M") or version < b"5":
        raise ProtocolError("unsupported server protocol %s"
                            % wire.short_repr(bytes(greeting)))
    answer = letter + b"5"
    if answer == wire.MSGPACK_PROTOCOL and not wire.msgpack_available():
        raise ProtocolError("the server speaks msgpack, which is not "
                            "installed")
    codec = wire.codec_for(answer, wire.CLIENT_GLOBALS)
    sock.sendall(wire.frame(answer))
    sock.settimeout(None)
    return codec, reader
