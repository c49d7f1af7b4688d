"""A minimal ZEO 5 protocol client that times the server alone.

The real `ClientStorage` adds its own costs to every call (an asyncio event
loop in a second thread, futures, a cache lookup).  To see what the server
itself costs, the benchmark also drives it with this client: one blocking
socket with TCP_NODELAY, no threads, no cache, pickle encoding through
`zeo.wire`.  One-way calls are buffered and go out in the same `sendall`
as the next two-way call, the way a pipelining client batches them, so a
commit costs one system call per round trip on the client side.

It speaks just enough of the protocol for the benchmark (PROTOCOL.md
sections 2, 3, 6 and 8.2) and is not a general client: it expects replies
to its own calls only and skips the server's one-way messages (`info`,
`invalidateTransaction`) while it waits.
"""

from zeo.client.connection import connect_socket
from zeo.wire import (
    CALL, ONEWAY, PICKLE_PROTOCOL, REPLY_NAME, FrameReader, PickleCodec,
    frame)

#: Argument of `loadBefore` that asks for the current revision.
MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
#: The serial of an object that does not exist yet.
Z64 = b"\x00" * 8

_RECV_SIZE = 256 * 1024


class RawServerError(Exception):
    """The server answered a call with an error reply.

    `class_name` and `payload` are the `(class_name, payload)` pair of the
    error reply (PROTOCOL.md 3.6), kept as they came.
    """

    def __init__(self, class_name, payload):
        super().__init__(class_name, payload)
        self.class_name = class_name
        self.payload = payload


class RawClient:
    """One registered connection to one storage of a ZEO 5 server (over
    TLS when given a client `ssl_context`)."""

    def __init__(self, address, storage="1", read_only=False, timeout=60,
                 ssl_context=None):
        self._sock = connect_socket(address, timeout)
        if ssl_context is not None:
            self._sock = ssl_context.wrap_socket(
                self._sock, server_hostname=address[0])
        self._reader = FrameReader()
        self._received = []
        self._unsent = []
        self._next_msgid = 1
        self._txn_counter = 0
        #: One-way messages the server sent us, by method name.
        self.server_messages = {}
        greeting = self._next_payload()
        if greeting != PICKLE_PROTOCOL:
            self.close()
            raise ConnectionError(
                "server greeted with %r, expected %r"
                % (greeting, PICKLE_PROTOCOL))
        self._codec = PickleCodec()
        self._unsent.append(frame(PICKLE_PROTOCOL))
        self.last_tid = self.call("register", storage, read_only)

    @property
    def socket(self):
        """The connection's socket (for a caller that reads it itself)."""
        return self._sock

    def close(self):
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- messages ------------------------------------------------------

    def one_way(self, name, *args):
        """Queue a one-way call; it leaves with the next two-way call."""
        self._unsent.append(
            frame(self._codec.encode(0, ONEWAY, name, args)))

    def call(self, name, *args, msgid=None):
        """Send a two-way call (and queued one-way calls); return the result.

        Raises `RawServerError` if the server answered with an error.
        """
        if msgid is None:
            msgid = self._next_msgid
            self._next_msgid += 1
        self._unsent.append(
            frame(self._codec.encode(msgid, CALL, name, args)))
        self._sock.sendall(b"".join(self._unsent))
        self._unsent.clear()
        return self._wait_for_reply(msgid)

    def _wait_for_reply(self, msgid):
        while True:
            message = self._codec.decode(self._next_payload())
            if message.name != REPLY_NAME:
                self.server_messages[message.name] = (
                    self.server_messages.get(message.name, 0) + 1)
                continue
            if message.msgid != msgid:
                raise ConnectionError(
                    "reply to %r while waiting for %r"
                    % (message.msgid, msgid))
            if message.flag:
                class_name, payload = message.args
                raise RawServerError(class_name, payload)
            return message.args

    def _next_payload(self):
        while not self._received:
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                raise ConnectionError("server closed the connection")
            self._received.extend(self._reader.feed(data))
        return self._received.pop(0)

    # --- storage operations used by the benchmark ------------------------

    def load_before(self, oid, tid=MAXTID):
        """`loadBefore` with the `(oid, tid)` msgid the ZEO client uses."""
        return self.call("loadBefore", oid, tid, msgid=(oid, tid))

    def new_oids(self, count=100):
        return self.call("new_oids", count)

    def server_status(self):
        return self.call("server_status")

    def commit(self, stores, user=b"", description=b""):
        """Commit `stores`, a list of `(oid, serial, data)`; return the tid.

        The sequence of PROTOCOL.md 8.2: one-way `tpc_begin` and `storea`,
        then two-way `vote` and `tpc_finish`.
        """
        self._txn_counter += 1
        txn_id = self._txn_counter
        self.one_way("tpc_begin", txn_id, user, description, {}, None, " ")
        for oid, serial, data in stores:
            self.one_way("storea", oid, serial, data, txn_id)
        try:
            self.call("vote", txn_id)
        except RawServerError:
            self.call("tpc_abort", txn_id)
            raise
        return self.call("tpc_finish", txn_id)
