"""A TLS connection that behaves like the plain socket it wraps.

Both sides of zeo share one socket between threads: on the server the
connection's thread reads while the `Outbox` (its writer thread, or any
thread flushing invalidations) writes; on the client one thread reads
while callers write.  An OpenSSL SSL object must never be used by two
threads at once, and `ssl.SSLSocket` gives no way to read in one thread
while another writes without a lock that is held across blocking socket
calls (a reader waiting for data would stop every writer).

So `TLSSocket` drives an `ssl.SSLObject` through two `ssl.MemoryBIO`
buffers and does the socket I/O itself:

* `_ssl_lock` guards the SSL object and its buffers.  It is held only for
  the CPU work (decrypting what arrived, encrypting what leaves), never
  across a socket call, so a blocked reader never blocks a writer.
* `_send_lock` makes whoever sends ciphertext the only one: records leave
  in the order they were made.  A non-blocking sender that finds it taken
  gives up at once, like a full socket.
* Reading has one reader at a time (the server connection's thread; the
  client's read lock), as with the plain socket.

What the callers rely on, and how it holds:

* Readiness on the raw socket (the client's epoll, the server's busy
  poll) stays true for TLS: a receive returns all the application data
  that the ciphertext received so far holds.  It reads from the socket at
  most `nbytes` minus one record's worth of ciphertext, and decrypts
  until OpenSSL wants more, so nothing decrypted is left behind in the
  SSL object (which a `select` on the socket could not see).
* A non-blocking send never blocks and never loses order.  Encrypted
  bytes the socket did not take are kept (the backlog) and leave before
  anything else.  The plaintext whose records are only partly sent is
  reported unsent and remembered as owed: the caller offers it again
  first, as OpenSSL asks of an SSL_write retry (the `Outbox` does: it
  puts unsent bytes back at the front), and it is then skipped instead of
  encrypted twice.
* Records OpenSSL makes while reading (a TLS 1.3 key update reply) are
  sent by the reader if the send lock is free, else by its holder when it
  is done, else with the next send.

Nothing here is used when TLS is off: the plain paths keep their bare
sockets.
"""

import socket
import ssl
import threading
import time

from zeo.buffers import BufferPool

#: Ciphertext room kept free in a receive buffer for one TLS record
#: (16 KiB of data plus overhead) that is partly decrypted already.
_RECORD_ROOM = 20 * 1024
#: Plaintext encrypted at a time when sending, which bounds the
#: ciphertext held in memory for one send.
_ENCRYPT_SLICE = 256 * 1024
_RAW_BUFFER_SIZE = 256 * 1024
_NONBLOCKING = getattr(socket, "MSG_DONTWAIT", 0)
_raw_buffers = BufferPool(_RAW_BUFFER_SIZE)


class TLSSocket:
    """`sock` with TLS: the socket methods zeo's connections use.

    `context.wrap_bio` makes the SSL object: pass `server_side` or a
    `server_hostname`.  Call `handshake(timeout)` before anything else.
    """

    def __init__(self, sock, context, server_side=False,
                 server_hostname=None):
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing,
                                     server_side=server_side,
                                     server_hostname=server_hostname)
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._read_buffer = None  # for recv(), made on first use
        self._backlog = b""  # ciphertext made and not yet sent
        self._owed = 0  # plaintext bytes encrypted into the backlog
        self._eof = False
        #: Whether decrypted data may wait in the SSL object.
        self._more = False

    # -- the handshake -------------------------------------------------------

    def handshake(self, timeout):
        """Run the TLS handshake within `timeout` seconds.

        Raises `ssl.SSLError` (the peer's certificate or protocol),
        `TimeoutError`, or `ConnectionError` if the peer hangs up first
        (`HandshakeEOF` before it sent a byte).  The socket is blocking
        afterwards.
        """
        deadline = time.monotonic() + timeout
        received = 0
        sock = self._sock
        raw = _raw_buffers.take()
        try:
            while True:
                with self._ssl_lock:
                    try:
                        self._ssl.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    except ssl.SSLError:
                        self._send_alert()
                        raise
                    out = self._outgoing.read()
                if out:
                    sock.settimeout(_remaining(deadline))
                    sock.sendall(out)
                if done:
                    # Data may have come with the handshake's last flight.
                    self._more = True
                    return
                sock.settimeout(_remaining(deadline))
                count = sock.recv_into(raw)
                if not count:
                    raise (HandshakeEOF if not received else ConnectionError)(
                        "the peer closed the connection during the TLS "
                        "handshake")
                received += count
                with self._ssl_lock:
                    self._incoming.write(raw[:count])
        finally:
            _raw_buffers.give(raw)
            sock.settimeout(None)

    def _send_alert(self):
        """Tell the peer why its handshake failed (the alert OpenSSL made;
        ssl lock held), if the socket takes it now."""
        alert = self._outgoing.read()
        if alert:
            try:
                self._sock.send(alert, _NONBLOCKING)
            except OSError:
                pass

    def getpeercert(self, binary_form=False):
        return self._ssl.getpeercert(binary_form)

    def version(self):
        return self._ssl.version()

    # -- receiving -----------------------------------------------------------

    def recv_into(self, buffer, nbytes=0, flags=0):
        """Like `socket.recv_into`; 0 at the end of the stream.  With
        MSG_DONTWAIT, BlockingIOError when no data is there."""
        view = memoryview(buffer).cast("B")
        limit = nbytes or len(view)
        got = self._decrypt_into(view, limit) if self._more else 0
        if got or self._eof:
            return got
        # The ciphertext buffer is borrowed for the read (`zeo.buffers`):
        # an idle connection holds none.
        raw_buffer = _raw_buffers.take()
        try:
            raw = raw_buffer[:max(limit - _RECORD_ROOM, 4096)]
            while not got and not self._eof:
                count = self._sock.recv_into(raw, 0, flags)
                if not count:
                    self._eof = True
                    break
                with self._ssl_lock:
                    self._incoming.write(raw[:count])
                got = self._decrypt_into(view, limit)
        finally:
            _raw_buffers.give(raw_buffer)
        return got

    def recv(self, bufsize, flags=0):
        """Like `socket.recv`."""
        if self._read_buffer is None or len(self._read_buffer) < bufsize:
            self._read_buffer = bytearray(bufsize)
        count = self.recv_into(self._read_buffer, bufsize, flags)
        return bytes(self._read_buffer[:count])

    def _decrypt_into(self, view, limit):
        """Decrypt all that has arrived (up to `limit` bytes) into
        `view`; returns how many bytes."""
        total = 0
        with self._ssl_lock:
            while total < limit:
                try:
                    count = self._ssl.read(limit - total, view[total:])
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    count = 0
                if not count:  # the peer's close_notify
                    self._eof = True
                    break
                total += count
                if not (self._incoming.pending or self._ssl.pending()):
                    break  # nothing left to decrypt (spares an exception)
            # A full buffer may leave data behind (only if the caller's
            # buffer is smaller than the room we keep): look first next
            # time.  Otherwise the next call starts at the socket.
            self._more = total == limit
            made_records = self._outgoing.pending
        if made_records:
            self._send_made_records()
        return total

    # -- sending -------------------------------------------------------------

    def sendmsg(self, buffers, ancdata=(), flags=0):
        """Like `socket.sendmsg` without ancillary data.  With
        MSG_DONTWAIT, returns how many bytes left (BlockingIOError if
        none); otherwise sends them all."""
        blocking = not flags & _NONBLOCKING
        if not self._send_lock.acquire(blocking):
            raise BlockingIOError("another thread is sending")
        try:
            sent = self._send(buffers, blocking)
        finally:
            self._send_lock.release()
        if self._outgoing.pending:
            self._send_made_records()
        if not sent and not blocking:
            raise BlockingIOError("the socket is full")
        return sent

    def sendall(self, data):
        self.sendmsg([data])

    def _send(self, buffers, blocking):
        """Send the backlog, then `buffers` (send lock held); returns the
        plaintext bytes gone."""
        if not self._send_backlog(blocking):
            return 0
        data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        view = memoryview(data).cast("B")
        sent, self._owed = min(self._owed, len(view)), 0
        while sent < len(view):
            piece = view[sent:sent + _ENCRYPT_SLICE]
            with self._ssl_lock:
                self._ssl.write(piece)
                self._backlog = self._outgoing.read()
            if not self._send_backlog(blocking):
                self._owed = len(piece)
                break
            sent += len(piece)
        return sent

    def _send_backlog(self, blocking):
        """Send the ciphertext made so far (send lock held); whether all
        of it left."""
        backlog = self._backlog
        if blocking:
            self._sock.sendall(backlog)
            self._backlog = b""
            return True
        while backlog:
            try:
                count = self._sock.send(backlog, _NONBLOCKING)
            except (BlockingIOError, InterruptedError):
                break
            backlog = memoryview(backlog)[count:]
        self._backlog = backlog
        return not backlog

    def _send_made_records(self):
        """Send records OpenSSL made on its own (while reading), unless
        another thread sends: it checks for them when it is done."""
        while self._outgoing.pending:
            if not self._send_lock.acquire(blocking=False):
                return
            try:
                with self._ssl_lock:
                    self._backlog = bytes(self._backlog) + \
                        self._outgoing.read()
                if not self._send_backlog(blocking=False):
                    return  # it leaves with the next send
            except OSError:
                return  # the reader sees the broken socket
            finally:
                self._send_lock.release()

    # -- the rest of the socket interface ------------------------------------

    def fileno(self):
        return self._sock.fileno()

    def settimeout(self, timeout):
        self._sock.settimeout(timeout)

    def shutdown(self, how):
        self._sock.shutdown(how)

    def close(self):
        self._sock.close()

    @property
    def family(self):
        return self._sock.family


class HandshakeEOF(ConnectionError):
    """The peer hung up before sending a byte (a port scan, a probe)."""


def _remaining(deadline):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out")
    return remaining
