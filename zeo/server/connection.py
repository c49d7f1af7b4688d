"""One accepted socket: handshake, the read loop, replies.

`ServerConnection.run` is the body of the connection's thread.  On a TLS
server it first runs the handshake, here and not in the accepting thread,
within the handshake timeout (`zeo.tls`); the socket is then a
`zeo.tls_socket.TLSSocket`, used like the plain one.  It reads
frames, decodes them, and hands each call to its `Session` in arrival order
(PROTOCOL.md 3.7 and 3.9).  Everything sent goes through the connection's
`Outbox`.  However the connection ends (the client hangs up, a protocol
error, the watchdog, an overflowing outbox, server shutdown) the same
cleanup runs, once.

An idle connection holds no receive buffer: its thread waits for the
socket to become readable (`busy_poll.Receiver.wait`), then borrows one
(`zeo.buffers`) for the read, and gives it back once the frame reader
has copied the payloads out.
"""

import json
import logging
import socket
import time

from zeo import bulk_frames, wire
from zeo.buffers import BufferPool
from zeo.error_replies import encode_error_reply
from zeo.rpc import Outbox
from zeo.server import errors
from zeo.server.limits import UNREGISTERED_MAX_FRAME_SIZE
from zeo.server.outcome import DEFERRED, Reply, run_handoffs
from zeo.server.session import Session

logger = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024
#: How a TLS client's first bytes begin (a handshake record, TLS 1.x).
_TLS_HANDSHAKE_RECORD = b"\x16\x03"
#: A call whose publication lock depends on its arguments (`register`).
_BY_ARGUMENTS = object()


class ServerConnection:
    """The channel between one client socket and its session."""

    def __init__(self, sock, peer, server):
        #: The server's `zeo.tls.ServerTLS`, or None for plain TCP.
        self._tls = server.tls
        if self._tls is not None:
            sock = self._tls.wrap(sock)  # the handshake runs in `run`
        self.sock = sock
        self.peer = format_peer(peer)
        self.label = self.peer
        #: When the connection was accepted (seconds since the epoch).
        self.connected_at = time.time()
        self.server = server
        self.codec = None
        #: Whether the last read filled its buffer: more may be waiting
        #: where a wait for readability does not see it (decrypted TLS
        #: data), so the next read does not wait.
        self._read_more = False
        #: The first bytes received (to recognise a TLS client).
        self._head = b""
        #: Set once the connection is ending (by any thread; read by its
        #: own).  A plain flag: nothing waits for it, and an Event costs
        #: about 1 KB per connection.
        self._closing = False
        self._close_reason = None
        self.outbox = Outbox(sock, "zeo-conn-%s" % self.peer,
                             limit=server.outbox_limit,
                             on_overflow=self._overflowed)
        self.session = Session(server, self)
        self._receiver = server.busy_polling.receiver()
        #: Whether the last message was a call we answered (busy polling
        #: waits for the next message only then).
        self._replied = True
        #: Bytes received (only this connection's thread adds to it).
        self.bytes_received = 0

    # -- the channel interface used by the session ----------------------------

    def reply(self, msgid, outcome):
        """Queue the reply to `msgid` and send it if the socket has room.

        Any thread may call this (a parked vote granted elsewhere, the
        pack worker).
        """
        self._queue_reply(msgid, outcome)
        self.outbox.send_pending()

    def _queue_reply(self, msgid, outcome):
        """Queue the reply to `msgid`; whoever calls this sends it (the
        connection's thread does once the call's locks are released)."""
        if outcome.error is not None:
            data = encode_error_reply(
                self.codec, msgid, errors.transportable(outcome.error))
            self.outbox.put(wire.frame(data), wake_writer=False)
        else:
            self._queue_value(msgid, outcome.value)

    def _queue_value(self, msgid, value):
        """Queue the plain reply `value` to `msgid` (the common case,
        without a `Reply` to unwrap)."""
        self.outbox.put(wire.frame(self._encode_reply(msgid, value)),
                        wake_writer=False)

    def push(self, method, args, wake_writer=True):
        """Queue a one-way call to the client (info, a blob's chunks).

        Returns False if the connection is closing and dropped it.  A
        caller that will `flush` soon passes `wake_writer=False`.
        """
        return self.outbox.put(self._encode_oneway(method, args),
                               wake_writer)

    def framer(self, method, leading_args):
        """A `bulk_frames.Framer` for one-way calls `method(*leading_args,
        value)` (a blob's chunks), for `push_framed`."""
        return bulk_frames.Framer(self.codec, 0, wire.ONEWAY, method,
                                  leading_args)

    def push_framed(self, framer, data):
        """Queue the call of `framer` whose last argument is `data` (a
        blob chunk), which goes to the socket without being copied; the
        caller flushes.  Returns False if the connection is closing."""
        head, tail = framer.around(len(data))
        return self.outbox.put_parts([head, data, tail] if tail
                                     else [head, data], wake_writer=False)

    def follow(self, log, owner):
        """Have the outbox take `log`'s invalidations (None: stop)."""
        self.outbox.follow(None if log is None else log.follow(
            owner, self.codec.protocol, self._encode_oneway))

    def _encode_oneway(self, method, args):
        return wire.frame(self.codec.encode(0, wire.ONEWAY, method, args))

    def wait_for_room(self, threshold):
        """Wait until at most `threshold` bytes are unsent (a download's
        backpressure); False once the connection is closing."""
        return self.outbox.wait_for_room(threshold)

    def flush(self):
        """Send what is queued if the socket has room; never blocks."""
        self.outbox.send_pending()

    def close(self, reason):
        """Ask the connection to end; its own thread cleans up."""
        if self._closing:
            return
        self._close_reason = reason
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @property
    def registered(self):
        session = self.session
        return session is not None and session.served is not None

    # -- the connection's thread --------------------------------------------

    def run(self):
        if self._tls is not None and not self._start_tls():
            self._finish(log=False)
            return
        logger.info("(%s) connected", self.peer)
        self.server.guard.watch(self)
        try:
            self._serve()
        except OSError as error:
            if not self._closing:
                self._close_reason = "connection error: %s" % error
        except wire.FrameTooLarge as error:
            self._close_reason = "frame too large"
            self.server.guard.frame_refused(self.label, error,
                                            self.registered)
        except wire.ProtocolError as error:
            self._close_reason = "protocol error: %s" % error
            logger.error("(%s) %s; closing", self.label, error)
        except Exception:
            self._close_reason = "internal error"
            logger.exception("(%s) unexpected error; closing", self.label)
        finally:
            self._finish()

    def _start_tls(self):
        """The TLS handshake, within the server's timeout; whether it
        succeeded.  The client certificate's subject joins the peer's
        name (in log lines and the monitor), and decides read-only."""
        from zeo.tls import describe_failure
        from zeo.tls_socket import HandshakeEOF
        tls = self._tls
        try:
            self.sock.handshake(tls.handshake_timeout)
        except HandshakeEOF:
            tls.failures.hung_up(self.peer)
            return False
        except TimeoutError:
            tls.failures.failed(self.peer, "no TLS handshake within %g "
                                "seconds" % tls.handshake_timeout)
            return False
        except OSError as error:  # ssl.SSLError included
            if not self._closing:
                tls.failures.failed(self.peer, describe_failure(error))
            return False
        # Data that came with the handshake's last flight waits in the
        # SSL object, where a wait for readability would not see it.
        self._read_more = True
        subject, read_only = tls.access(self.sock)
        if subject is not None:
            self.peer = self.label = "%s [%s]" % (self.peer, subject)
        if read_only:
            self.session.restrict_to_reading()
        return True

    def _serve(self):
        # Sent at once: the socket has room (a writer thread woken for
        # it would cost a thread start per connection).
        self.outbox.put(wire.frame(self.server.protocol), wake_writer=False)
        self.outbox.send_pending()
        registered_max_frame_size = self.server.guard.limits.max_frame_size
        reader = wire.FrameReader(min(registered_max_frame_size,
                                      UNREGISTERED_MAX_FRAME_SIZE))
        try:
            payloads = self._receive(reader)
        except wire.ProtocolError as error:
            if self._head == _TLS_HANDSHAKE_RECORD:
                raise wire.ProtocolError(
                    "a TLS client on a server without <ssl> (%s)" % error)
            raise
        if payloads is None:
            return
        handshake, payloads = payloads[0], payloads[1:]
        if handshake == wire.RUOK:
            self._answer_ruok()
            return
        self.codec = wire.codec_for(handshake)
        registering = True
        while True:
            for payload in payloads:
                if not self._handle(payload):
                    return
            if registering and self.registered:
                registering = False
                reader.max_frame_size = registered_max_frame_size
                self.server.guard.forget(self)
            payloads = self._receive(reader)
            if payloads is None:
                return

    def _receive(self, reader):
        """The next complete payloads, or None at end of stream.

        Reads into a buffer borrowed for the read: `recv(n)` would
        allocate n bytes for every call, however little arrived.
        """
        while True:
            if self._closing:
                return None
            if not self._read_more:
                self._receiver.wait(self.sock, self._replied)
            buffer = _buffers.take()
            try:
                received = self.sock.recv_into(buffer)
                if not received:
                    return None
                if not self.bytes_received:
                    self._head = bytes(buffer[:2])
                self.bytes_received += received
                self._read_more = received == len(buffer)
                payloads = reader.feed(buffer[:received])
            finally:
                _buffers.give(buffer)
            if payloads:
                return payloads

    def _answer_ruok(self):
        status = self.server.ruok()
        self.outbox.put(wire.frame(json.dumps(status).encode("ascii")),
                        wake_writer=False)
        self.outbox.send_pending()
        self._close_reason = "ruok answered"

    def _handle(self, payload):
        """Run one message.  Returns False when the connection must end.

        The reply is queued under the call's publication lock, if any, and
        sent once that lock is released: a send is a system call, and
        other connections' loads must not wait for it on the lock.
        """
        try:
            msgid, flag, name, args = self.codec.decode(payload)
        except wire.RefusedGlobals as refused:
            return self._handle_refused(refused)
        if msgid == wire.HEARTBEAT_MSGID:
            return True
        session = self.session
        try:
            # Subscripted, not `.get()`: every session of a storage shares
            # this table, and on a free-threaded 3.13 a dict's `get` takes
            # the dict's lock where a subscript reads without one.  With
            # 64 busy clients, 5% of the server's time went to threads
            # queued on that lock (perf).
            function, publication = session.calls[name]
        except KeyError:
            function = session.lookup(name)
            if function is None:
                logger.error("(%s) invalid method %s; closing", self.label,
                             wire.short_repr(name))
                self._close_reason = "invalid method"
                return False
            publication = _BY_ARGUMENTS
        oneway = bool(flag)
        self._replied = not oneway
        if not isinstance(args, (tuple, list)):
            keep = self._fail(msgid, oneway, name, TypeError(
                "arguments of %s must be a sequence" % name))
            self.outbox.send_pending()
            return keep
        session.current_msgid = msgid
        if publication is _BY_ARGUMENTS:
            publication = session.publication_lock(name, args)
        if publication is None:
            keep = self._call(function, msgid, oneway, name, args)
        else:
            with publication:
                keep = self._call(function, msgid, oneway, name, args)
        self.outbox.send_pending()
        return keep

    def _call(self, function, msgid, oneway, name, args):
        """Run a call (a `Session` function) and queue its reply (the
        caller sends it)."""
        try:
            result = function(self.session, *args)
        except Exception as error:
            return self._fail(msgid, oneway, name, error)
        if isinstance(result, Reply):
            if not oneway:
                self._queue_reply(msgid, result)
            granted = result.after
            if result.release is not None:
                granted = result.release()
            if granted is not None:
                self.outbox.send_pending()  # our reply before the next vote's
                run_handoffs(granted)
            if oneway and result.error is not None:
                return self._fail(msgid, oneway, name, result.error)
        elif not oneway and result is not DEFERRED:
            self._queue_value(msgid, result)
        return True

    def _fail(self, msgid, oneway, name, error):
        """Report a failed call: an error reply, or for a one-way call
        (which has nobody to tell) the end of the connection."""
        if oneway:
            logger.error("(%s) one-way call %s failed: %s; closing",
                         self.label, name, wire.short_repr(error, 200))
            self._close_reason = "failed one-way call"
            return False
        self.session.log_error(name, error)
        self._queue_reply(msgid, Reply(error=error))
        return True

    def _handle_refused(self, refused):
        """A message naming globals we do not resolve: answer, don't die.

        A two-way call gets an error reply; a transaction whose tpc_begin
        carried such an object (e.g. a datetime in its extension) fails at
        vote with a clear message instead of losing the connection.
        """
        message = refused.message
        logger.error("(%s) %s in call %s", self.label, refused,
                     wire.short_repr(message.name))
        error = ValueError("the server refuses %s in call %s"
                           % (wire.describe_names(refused.names),
                              wire.short_repr(message.name)))
        if not message.flag:
            self.reply(message.msgid, Reply(error=error))
            return True
        if message.name == "tpc_begin" and self.session.served is not None:
            args = tuple(message.args)
            try:
                self.session.tpc_begin_refused(args[0], error)
            except Exception as failure:
                logger.error("(%s) %s; closing", self.label,
                             wire.short_repr(failure, 200))
                return False
            return True
        self._close_reason = "refused one-way call"
        return False

    def _encode_reply(self, msgid, value):
        try:
            return self.codec.encode(msgid, wire.REPLY, wire.REPLY_NAME, value)
        except Exception as error:
            logger.error("(%s) cannot encode reply %s: %s", self.label,
                         wire.short_repr(value), wire.short_repr(error, 200))
            return encode_error_reply(
                self.codec, msgid, ValueError("Couldn't pickle response"))

    def _overflowed(self):
        logger.error("(%s) stopped reading: more than %d bytes unsent; "
                     "disconnecting", self.label, self.server.outbox_limit)
        self.close("output overflow")

    def _finish(self, log=True):
        """The cleanup, once, in the connection's thread, however it ended.

        It ends by dropping the session: the session keeps its channel
        (a pack worker may still reply through it), so the two would
        otherwise form a reference cycle, and every closed connection's
        objects would wait for a full garbage collection instead of
        being freed here (see `tests/test_connection_cost.py`).
        """
        self._closing = True
        self.server.guard.forget(self)
        self._receiver.close()
        try:
            self.session.closed()
        finally:
            self.outbox.close()
            try:
                self.sock.close()
            except OSError:
                pass
            if log:
                logger.info("(%s) disconnected (%s)", self.label,
                            self._close_reason or "client closed")
            self.session = None


def format_peer(peer):
    if isinstance(peer, tuple) and len(peer) >= 2:
        return "%s:%s" % (peer[0], peer[1])
    return str(peer) or "unix-socket"


_buffers = BufferPool(_RECV_SIZE)
