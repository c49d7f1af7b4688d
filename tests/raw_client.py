"""A blocking raw-protocol ZEO client for tests.

It speaks the ZEO 5 wire protocol byte by byte with `zeo.wire` and nothing
else, so a test can send exactly what it wants (including things no real
client would send) and see exactly what comes back.

API:

* ``RawClient(address, timeout=10, ssl_context=None)`` connects (TCP
  ``(host, port)`` or a Unix socket path), with TLS if given a client
  ``ssl.SSLContext``.
* ``.handshake(protocol=None)`` reads the server's greeting and answers it
  (by default with the greeting itself); returns the greeting.
* ``.register(storage="1", read_only=False)`` is ``call("register", ...)``.
* ``.call(name, *args, msgid=None, timeout=None)`` sends a two-way call and
  returns the reply value; an error reply raises ``RemoteError``, a closed
  connection ``ConnectionClosed``, silence ``TimeoutError``.  One-way
  messages from the server that arrive meanwhile are kept in
  ``.server_calls``.  ``.send_call(...)`` and ``.wait_reply(msgid,
  timeout)`` are its two halves, for replies that come late (a vote
  waiting for the commit lock) or out of order.
* ``.send_oneway(name, *args)``, ``.send_message(msgid, flag, name, args)``,
  ``.send_raw_frame(payload)`` (adds the length prefix) and
  ``.send_raw_bytes(data)`` (sends bytes as they are).
* ``.read_frame(timeout)`` / ``.read_message(timeout)`` return the next
  payload / decoded ``zeo.wire.Message``.
* ``.is_closed(timeout)`` waits up to `timeout` seconds for the server to
  close the connection; frames read while waiting stay available to
  ``read_frame``.
* ``ruok(address)`` runs the monitoring probe: returns the greeting and the
  decoded JSON status.
"""

import collections
import json
import socket
import time

from zeo import wire
from zeo.client.connection import connect_socket


class RemoteError(Exception):
    """The server answered a call with an error reply."""

    def __init__(self, class_name, payload):
        super().__init__(class_name, payload)
        self.class_name = class_name
        self.payload = payload


class ConnectionClosed(Exception):
    """The server closed the connection (EOF or reset)."""


class RawClient:
    """One connection to a ZEO server, driven step by step by a test."""

    def __init__(self, address, timeout=10, ssl_context=None):
        self.timeout = timeout
        self.sock = connect_socket(address, timeout)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(
                self.sock, server_hostname=address[0])
        self.codec = None
        self.greeting = None
        self.server_calls = []
        self._replies = {}
        self._reader = wire.FrameReader()
        self._frames = collections.deque()
        self._eof = False
        self._next_msgid = 1

    # --- sending ----------------------------------------------------------

    def send_raw_bytes(self, data):
        self.sock.sendall(data)

    def send_raw_frame(self, payload):
        self.sock.sendall(wire.frame(payload))

    def send_message(self, msgid, flag, name, args):
        self.send_raw_frame(self.codec.encode(msgid, flag, name, args))

    def send_oneway(self, name, *args):
        self.send_message(0, wire.ONEWAY, name, args)

    # --- receiving --------------------------------------------------------

    def _receive(self, deadline):
        """Read once from the socket; False once the peer has closed."""
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from the server in time") from None
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self._eof = True
            return False
        self._frames.extend(self._reader.feed(data))
        return True

    def read_frame(self, timeout=None):
        """The next frame payload; ConnectionClosed or TimeoutError."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self._frames:
            if not self._receive(deadline):
                raise ConnectionClosed("server closed the connection")
        return self._frames.popleft()

    def read_message(self, timeout=None):
        """The next decoded message from the server."""
        return self.codec.decode(self.read_frame(timeout))

    def is_closed(self, timeout=5):
        """Whether the server closes the connection within `timeout` s."""
        deadline = time.monotonic() + timeout
        try:
            while self._receive(deadline):
                pass
        except TimeoutError:
            return False
        return True

    # --- protocol steps ---------------------------------------------------

    def handshake(self, protocol=None):
        """Read the greeting, answer `protocol` (default: the same id)."""
        self.greeting = self.read_frame()
        answer = self.greeting if protocol is None else protocol
        self.send_raw_frame(answer)
        if answer in (wire.PICKLE_PROTOCOL, wire.MSGPACK_PROTOCOL):
            self.codec = wire.codec_for(answer, wire.CLIENT_GLOBALS)
        return self.greeting

    def send_call(self, name, *args, msgid=None):
        """Send a two-way call without waiting; return its msgid."""
        if msgid is None:
            msgid = self._next_msgid
            self._next_msgid += 1
        self.send_message(msgid, wire.CALL, name, args)
        return msgid

    def wait_reply(self, msgid, timeout=None):
        """The reply value for `msgid` (RemoteError for an error reply).

        Replies to other msgids that arrive first are kept for their own
        `wait_reply`; one-way server calls go to `server_calls`.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        while msgid not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply to %r in time" % (msgid,))
            message = self.read_message(remaining)
            if message.name == wire.REPLY_NAME:
                self._replies[message.msgid] = message
            else:
                self.server_calls.append(message)
        message = self._replies.pop(msgid)
        if message.flag:
            class_name, payload = message.args
            raise RemoteError(class_name, payload)
        return message.args

    def call(self, name, *args, msgid=None, timeout=None):
        """A two-way call; the reply value, or RemoteError."""
        return self.wait_reply(self.send_call(name, *args, msgid=msgid),
                               timeout)

    def register(self, storage="1", read_only=False):
        return self.call("register", storage, read_only)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def ruok(address, timeout=10):
    """Send the `ruok` probe; return (greeting, status dict).

    Also checks that the server closes the connection afterwards.
    """
    with RawClient(address, timeout) as client:
        client.send_raw_frame(wire.RUOK)
        greeting = client.read_frame()
        status = json.loads(client.read_frame().decode("ascii"))
        if not client.is_closed(timeout):
            raise AssertionError("server kept the ruok connection open")
    return greeting, status
