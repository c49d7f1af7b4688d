"""The client's side of one connection to a ZEO server.

`Connection` is one socket shared by application threads.  Each caller
encodes and writes its own request (under a lock, so frames never
interleave and one-way calls keep their order before the two-way call
that follows them) and then waits for the reply with the same msgid.
Replies are matched by msgid, never by position (PROTOCOL.md 3.9), so a
`vote` parked on the server's commit lock does not hold up loads from
other threads.

Reading the socket is a role, held with the read lock: whoever holds it
reads and applies everything the server sent, in wire order.  A reply's
`apply` callback (the cache update of a load or a commit) runs before its
caller is woken, and one-way server calls (`invalidateTransaction`,
`info`, and the `receiveBlob*` calls that carry a blob before the
`sendBlob` reply) run as they arrive.  That is what keeps the cache truthful
(PROTOCOL.md section 9): a load reply computed before a commit is applied
before that commit's invalidation.

Who holds the role: a caller waiting for its reply takes it if it is free
and reads until its own reply has come (it "leads"), so the common
single-threaded round trip wakes one thread, not a reader and then the
caller; on a virtual machine each wake-up costs tens of microseconds.
Callers that find the role taken wait to be woken by whoever reads.  When
no caller leads, the connection's reader thread waits for the socket to
become readable and takes the role for what arrived: invalidations
between calls, and replies nobody is leading for.  The readiness
notification is one-shot and disarmed while a caller leads, so the
reader thread sleeps through the round trips of a leading caller.
Without `select.epoll` (not Linux) callers never lead and the reader
thread does all the reading.

A lone leader polls before it sleeps: it tries a non-blocking read,
yielding the processor between attempts, for up to the connection's
busy-poll window, and only then blocks in `recv`.  A reply that comes
within the window (a load from a nearby server) then costs no wake-up at
all.  It polls only while no other caller waits on the connection (a
busy multi-threaded client spends its CPU on its threads instead), and
only if the previous reply came within the window (a slow or distant
server is not expected back soon).

`ConnectionManager` (in `zeo.client.manager`) owns the addresses,
registration and the heartbeat; this module knows nothing about storages.
"""

import collections
import logging
import os
import select
import socket
import threading
import time

from zeo import bulk_frames, wire
from zeo.Exceptions import ClientDisconnected
from zeo.rpc import send_buffers, send_file_region
from zeo.client.errors import rebuild_exception
from zeo.client.opening import connect_socket, handshake
from zeo.client.waiting import Readiness, Waiter

logger = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024
#: One-way calls held back for the next send, at most this many bytes
#: (a large upload goes out as it is produced).
_HOLD_LIMIT = 256 * 1024

#: How long a leading caller polls for its reply by default, in
#: microseconds (ClientStorage's `busy_poll`).
DEFAULT_BUSY_POLL = 300
#: Polling needs a non-blocking receive flag and a way to yield the CPU.
_CAN_POLL = hasattr(socket, "MSG_DONTWAIT") and hasattr(os, "sched_yield")

#: One-way calls a server may make on a client (PROTOCOL.md 7).
SERVER_CALLS = ("invalidateTransaction", "info", "receiveBlobStart",
                "receiveBlobChunk", "receiveBlobStop")


class Connection:
    """One handshaken socket to a server, shared by many threads.

    `handler` receives the server's one-way calls on whichever thread
    reads (`invalidateTransaction(tid, oids)`, `info(dict)`,
    `receiveBlobStart/Chunk/Stop(oid, tid[, chunk])`); so do the
    `apply` callbacks of replies.  Neither may make a two-way call on this
    connection.  `on_close(self)` is called once, from the reader thread,
    when the connection ends.

    Invalidations are held back until `release(verified_tid)`: the client
    must first verify its cache against the tid `register` returned, then
    apply only the newer ones (PROTOCOL.md 8.1 step 7).
    """

    def __init__(self, sock, codec, reader, address, handler, on_close,
                 busy_poll=DEFAULT_BUSY_POLL):
        self.address = address
        self.label = _format_address(address)
        self._sock = sock
        self._codec = codec
        self._frames = reader
        self._handler = handler
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()  # waiters, msgids, closed
        self._read_lock = threading.Lock()  # the role of reading the socket
        self._dispatch_lock = threading.Lock()  # wire order vs release()
        self._inbox = collections.deque()  # payloads read, not yet applied
        self._received = memoryview(bytearray(_RECV_SIZE))  # see _recv
        self._read_failure = None  # why a leading caller stopped reading
        #: Seconds a lone leader polls before sleeping (0: never).
        self._poll_window = busy_poll / 1e6 if _CAN_POLL else 0
        self._replies_quick = True  # the last led reply came within it
        #: When bytes last came from the server (time.monotonic()).
        self._last_received = time.monotonic()
        if hasattr(select, "epoll"):
            self._readiness = Readiness(sock)
            self._lead = self._lead_reading
        else:
            self._readiness = self._lead = None
        self._waiters = {}
        self._held_frames = []  # one-way calls waiting for the next send
        self._held_bytes = 0
        self._next_msgid = 1
        self._closed = False
        self._close_reason = "closed by the server"
        self._released = False
        self._held = []
        self._thread = threading.Thread(
            target=self._read_loop, name="zeo-client-reader-%s" % self.label,
            daemon=True)

    @classmethod
    def open(cls, address, handler, on_close, timeout,
             busy_poll=DEFAULT_BUSY_POLL, tls=None):
        """Connect, handshake and start reading; errors propagate.

        With `tls` (a `zeo.tls.ClientTLS`) the socket is TLS first; a
        server that refuses our certificate says so with an alert in
        place of its greeting (TLS 1.3), reported as ConnectionError.
        """
        sock = connect_socket(address, timeout)
        try:
            if tls is not None:
                sock = tls.connect(sock, address, timeout)
            codec, reader = handshake(sock, timeout)
        except BaseException as error:
            sock.close()
            refusal = tls.refusal(error) if tls is not None else None
            if refusal is not None:
                raise refusal from None
            raise
        connection = cls(sock, codec, reader, address, handler, on_close,
                         busy_poll)
        connection._thread.start()
        return connection

    @property
    def closed(self):
        return self._closed

    def silence(self):
        """Seconds since the server last sent anything."""
        return time.monotonic() - self._last_received

    # -- calls --------------------------------------------------------------

    def call(self, method, *args, apply=None, timeout=None):
        """A two-way call: send it, wait for the reply, return its value.

        `apply(result)` runs on the reading thread before the caller
        wakes.
        Only the connection set-up passes a `timeout`: once connected, a
        call waits until its reply or the end of the connection, as a
        vote waiting for the commit lock must.
        """
        return self.send_call(method, args, apply).wait(timeout)

    def send_call(self, method, args, apply=None, msgid=None):
        """Send a two-way call; return its `Waiter` without waiting.

        With an explicit `msgid` (loads use `(oid, tid)`), a request already
        in flight with the same id is shared instead of sent again.
        """
        with self._state_lock:
            self._check_open()
            if msgid is None:
                msgid = self._next_msgid
                self._next_msgid += 1
            else:
                waiter = self._waiters.get(msgid)
                if waiter is not None:
                    return waiter
            waiter = Waiter(method, apply, self._lead)
            self._waiters[msgid] = waiter
        try:
            self._send(msgid, wire.CALL, method, args)
        except BaseException:
            with self._state_lock:
                self._waiters.pop(msgid, None)
            raise
        return waiter

    def load_before(self, oid, tid, apply=None):
        """`loadBefore(oid, tid)` with msgid `(oid, tid)`, as ZEO does, so
        concurrent loads of the same revision share one request."""
        return self.send_call("loadBefore", (oid, tid), apply,
                              msgid=(oid, tid))

    def oneway(self, method, *args):
        """A one-way call: no reply; a failure on the server closes the
        connection.

        It leaves with the next two-way call (or heartbeat), in the same
        send: a commit's tpc_begin and stores then travel with its vote.
        Nothing waits on a one-way call, and the server runs it before
        anything sent after it, so only the number of sends changes.
        """
        self._send(0, wire.ONEWAY, method, args, hold=True)

    def oneway_file_chunks(self, method, source, chunk_size):
        """The one-way calls `method(chunk)`, one per `chunk_size` bytes
        of the open binary file `source`, in order (a blob's upload).  On
        a plain socket the chunks go from the file to the socket inside
        the kernel (`os.sendfile`), never through Python.

        A file that shrinks meanwhile ends the connection (a frame's
        length has gone out): ClientDisconnected, as for a failed send.
        """
        chunks = bulk_frames.Framer(self._codec, 0, wire.ONEWAY, method, ())
        size = os.fstat(source.fileno()).st_size
        for offset in range(0, size, chunk_size):
            length = min(chunk_size, size - offset)
            head, tail = chunks.around(length)
            with self._send_lock:
                self._check_open()
                held = self._held_frames
                held.append(head)
                # The frame's last bytes wait for the next send, like a
                # held one-way call: nothing else may come between.
                self._held_frames = [tail] if tail else []
                self._held_bytes = len(tail)
                self._sending(send_file_region, self._sock, held,
                              source.fileno(), offset, length)

    def heartbeat(self):
        """The idle heartbeat `(-1, 0, '.reply', None)` (PROTOCOL.md 3.8)."""
        self._send(wire.HEARTBEAT_MSGID, wire.REPLY, wire.REPLY_NAME, None)

    def _send(self, msgid, flag, method, args, hold=False):
        payload = self._codec.encode(msgid, flag, method, args)
        with self._send_lock:
            self._check_open()
            held = self._held_frames
            held += wire.frame_parts(payload)
            self._held_bytes += 4 + len(payload)
            if hold and self._held_bytes < _HOLD_LIMIT:
                return
            self._held_frames, self._held_bytes = [], 0
            if len(held) == 1:
                self._sending(self._sock.sendall, held[0])
            else:
                self._sending(send_buffers, self._sock, held)

    def _check_open(self):
        if self._closed:
            raise ClientDisconnected("not connected to %s" % self.label)

    def _sending(self, send, *args):
        """`send(*args)` (send lock held); a failed send ends the
        connection: ClientDisconnected."""
        try:
            send(*args)
        except OSError as error:
            self._shutdown()
            raise ClientDisconnected("connection to %s lost: %s"
                                     % (self.label, error)) from None

    # -- invalidations before verification ----------------------------------

    def release(self, verified_tid):
        """Start applying invalidations; held ones newer than
        `verified_tid` are applied now, in the order they came."""
        with self._dispatch_lock:
            held, self._held = self._held, []
            self._released = True
            for tid, oids in held:
                if tid > verified_tid:
                    self._call_handler("invalidateTransaction", (tid, oids))

    # -- reading: the reader thread ------------------------------------------

    def _read_loop(self):
        reason = None
        try:
            with self._read_lock:
                self._inbox.extend(self._frames.feed(b""))
                self._apply_inbox()
            if self._readiness is None:
                with self._read_lock:
                    while self._receive(blocking=True):
                        pass
                return
            while True:
                self._readiness.wait()
                with self._read_lock:
                    if not self._receive(blocking=False):
                        break
                    self._readiness.arm()
        except Exception as error:
            reason = self._reading_failed(error)
        finally:
            reason = self._read_failure or reason  # a leader's comes first
            self._end(reason if reason and not self._closed
                      else self._close_reason)

    # -- reading: a leading caller --------------------------------------------

    def _lead_reading(self, waiter):
        """Read on the caller's thread until `waiter` is finished, if no
        one else is reading; otherwise return at once (the reader will
        finish the waiter)."""
        if not self._read_lock.acquire(blocking=False):
            return
        try:
            if waiter.finished or self._closed or self._read_failure:
                return
            self._readiness.disarm()
            try:
                self._read_until_finished(waiter)
            except Exception as error:
                # The reader thread ends the connection: it wakes up to
                # the shut-down socket once the role is free.
                self._read_failure = self._reading_failed(error)
                self._shutdown()
            except BaseException:
                if self._inbox:  # interrupted with messages unapplied
                    self._read_failure = "reading interrupted"
                    self._shutdown()
                raise
            finally:
                self._readiness.arm()
        finally:
            self._read_lock.release()

    def _read_until_finished(self, waiter):
        """Poll (see the module's docstring), then block, until `waiter`
        is finished or the stream ends."""
        window = self._poll_window
        started = time.monotonic()
        reading = True
        if window and self._replies_quick:
            reading = self._poll_until_finished(waiter, started + window)
        while reading and not waiter.finished:
            reading = self._receive(blocking=True)
        self._replies_quick = time.monotonic() - started <= window

    def _poll_until_finished(self, waiter, deadline):
        """Non-blocking reads until `waiter` is finished (True), the
        deadline passes or another caller waits (True: go and block), or
        the stream ends (False)."""
        waiters = self._waiters
        while not waiter.finished and len(waiters) <= 1:
            try:
                data = self._recv(socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return True
                os.sched_yield()
                continue
            if not self._apply_received(data):
                return False
        return True

    # -- reading: what both do, holding the read lock -------------------------

    def _receive(self, blocking):
        """Read what has arrived and apply it.  False at the end of the
        stream; True otherwise (also when nothing had arrived)."""
        try:
            data = self._recv(0 if blocking else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return self._apply_received(data)

    def _recv(self, flags):
        """What the socket has, as a view of the connection's receive
        buffer, valid until the next read (the frame reader copies what
        it keeps).  One buffer for the connection's life: a new 256 KB
        bytes per read cost the client a page fault per page, a tenth of
        its time in a large download."""
        count = self._sock.recv_into(self._received, _RECV_SIZE, flags)
        return self._received[:count]

    def _apply_received(self, data):
        """Apply the bytes just read; False if they mark the end of the
        stream."""
        if not data:
            return False
        self._last_received = time.monotonic()
        self._inbox.extend(self._frames.feed(data))
        self._apply_inbox()
        return True

    def _apply_inbox(self):
        """Dispatch the payloads read, oldest first.  A payload leaves the
        inbox once applied, so a reader interrupted midway can tell that
        it left something undone (see `_lead_reading`)."""
        inbox = self._inbox
        while inbox:
            self._dispatch(inbox[0])
            inbox.popleft()

    def _reading_failed(self, error):
        """Log a reading failure; return the connection's close reason."""
        if isinstance(error, OSError):
            return "connection error: %s" % error
        if isinstance(error, wire.ProtocolError):
            logger.error("(%s) %s; closing", self.label, error)
            return "protocol error: %s" % error
        logger.error("(%s) unexpected error; closing", self.label,
                     exc_info=(type(error), error, error.__traceback__))
        return "internal error"

    def _dispatch(self, payload):
        try:
            message = self._codec.decode(payload)
        except wire.RefusedGlobals as refused:
            message = refused.message
            if not (message.name == wire.REPLY_NAME and message.flag):
                raise
            # An error reply naming a class we do not know: still an error.
            message = message._replace(args=(refused.names[0], ()))
        with self._dispatch_lock:
            if message.name == wire.REPLY_NAME:
                self._reply(message)
            elif message.name in SERVER_CALLS:
                if message.name == "invalidateTransaction" \
                        and not self._released:
                    self._held.append(tuple(message.args))
                else:
                    self._call_handler(message.name, message.args)
            else:
                logger.error("(%s) the server called unknown method %s",
                             self.label, wire.short_repr(message.name))

    def _reply(self, message):
        with self._state_lock:
            waiter = self._waiters.pop(message.msgid, None)
        if waiter is None:
            logger.warning("(%s) reply to unknown request %s", self.label,
                           wire.short_repr(message.msgid))
            return
        if message.flag:
            waiter.finish(error=rebuild_exception(message.args))
            return
        result = message.args
        if waiter.apply is not None:
            try:
                waiter.apply(result)
            except Exception as error:
                logger.exception("(%s) applying the reply to %s failed",
                                 self.label, waiter.method)
                waiter.finish(error=error)
                return
            except BaseException:  # e.g. KeyboardInterrupt in a leader
                waiter.finish(error=ClientDisconnected(
                    "interrupted while applying the reply to %s"
                    % waiter.method))
                raise
        waiter.finish(result)

    def _call_handler(self, name, args):
        try:
            getattr(self._handler, name)(*args)
        except Exception:
            logger.exception("(%s) handling %s from the server failed",
                             self.label, name)

    def _end(self, reason):
        with self._state_lock:
            self._closed = True
            waiters, self._waiters = self._waiters, {}
        self._shutdown()  # a leading caller's recv returns, and it lets go
        with self._read_lock:
            if self._readiness is not None:
                self._readiness.close()
            try:
                self._sock.close()
            except OSError:
                pass
        for waiter in waiters.values():
            waiter.finish(error=ClientDisconnected(
                "connection to %s lost (%s)" % (self.label, reason)))
        logger.info("(%s) disconnected: %s", self.label, reason)
        self._on_close(self)

    # -- closing --------------------------------------------------------------

    def close(self, timeout=10, reason="closed by the client"):
        """End the connection; waiting callers get ClientDisconnected,
        which gives `reason`.  Idempotent; joins the reader thread unless
        called from it."""
        with self._state_lock:
            if not self._closed:
                self._close_reason = reason
            self._closed = True
        self._shutdown()
        if self._thread is not threading.current_thread() and \
                self._thread.is_alive():
            self._thread.join(timeout)

    def _shutdown(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _format_address(address):
    if isinstance(address, tuple):
        return "%s:%s" % address[:2]
    return str(address)
