"""Sending frames on a socket shared by several threads.

Replies, one-way calls and invalidations for one connection come from many
threads (the connection's own thread, committers on other connections, the
pack worker).  They all go through one `Outbox`, which keeps them in the
order they were put and never lets a thread block on a socket it does not
own: any thread may queue and then try a non-blocking send
(`send_pending`); whatever the socket cannot take at once is left to a
writer thread.

The writer exists only while a send would block.  A server holds
thousands of connections that are idle nearly all the time, and a thread
parked for each one's rare full socket would double the threads (and
their stacks) for nothing.  So the outbox starts its writer when a
non-blocking send leaves bytes behind (or a frame is put for it to send),
and the writer ends as soon as the queue is empty; the next blocked send
starts a new one.  That costs a thread start per blocked episode (a slow
reader, a big download outpacing the network), which is small beside the
time the socket was full.  One shared sender multiplexing every blocked
socket would save those starts but needs non-blocking sends and a
selector of its own, and a TLS socket's sends take a lock another thread
may hold; a thread that simply blocks in `sendmsg` keeps that simple.

An outbox may also follow a `feed`: frames shared by many outboxes (a
server's invalidations, published once per commit, not once per client).
Whoever puts a frame or sends first takes what the feed holds for this
outbox, under the outbox's lock, so the feed's frames leave ahead of
anything put after they were published, and several of them leave in one
send when they came faster than the sends.
"""

import collections
import logging
import os
import socket
import threading

logger = logging.getLogger(__name__)

#: Unsent bytes a peer may leave in its outbox before it is disconnected.
DEFAULT_OUTBOX_LIMIT = 64 * 1024 * 1024

_NONBLOCKING = getattr(socket, "MSG_DONTWAIT", 0)
#: Frames handed to one sendmsg call (well under the kernel's IOV_MAX).
_BATCH_FRAMES = 64


class Outbox:
    """An ordered, bounded queue of encoded frames for one socket.

    `put` never blocks.  Whoever drains the queue (a thread in
    `send_pending`, or the writer thread) is the only one writing to the
    socket at that moment, so frames never interleave and leave in `put`
    order.

    When the unsent bytes exceed `limit` while the peer is behind (the
    last send could not take everything), `put` closes the outbox, shuts
    the socket down (so the connection's reader notices and cleans up)
    and calls `on_overflow`.  One message larger than the limit is still
    accepted when nothing else is pending, so a big object can always be
    loaded.
    """

    def __init__(self, sock, name, limit=DEFAULT_OUTBOX_LIMIT,
                 on_overflow=None):
        self._sock = sock
        self._name = name
        self._limit = limit
        self._on_overflow = on_overflow
        self._lock = threading.Lock()
        #: Signalled when queued bytes leave or the outbox closes, for
        #: `wait_for_room`; only while someone waits (`_room_waiters`).
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        #: Signalled, once closing, when nobody sends any more (`close`).
        #: The same condition: each waiter checks its own predicate, and
        #: a server has an outbox per connection.
        self._idle = self._room
        self._frames = collections.deque()
        self._pending = 0
        #: Bytes ever queued (for the metrics), counted under our lock.
        self.queued_bytes = 0
        #: Bytes taken from the queue by whoever drains it and not yet
        #: handed to the kernel.
        self._in_flight = 0
        self._draining = False
        #: Whether the last send could not take everything queued: the
        #: peer is behind, and only then does the limit apply (see
        #: `_append_parts`).  Cleared when the queue empties.
        self._blocked = False
        self._closing = False
        #: The writer thread while one runs (it alone clears this).
        self._writer = None
        #: Frames published for this outbox elsewhere (see `follow`).
        self._feed = None

    @property
    def pending(self):
        """Bytes queued or taken by a sender, and not yet handed to the
        kernel (a writer may hold a whole batch while the socket is full)."""
        with self._lock:
            return self._pending + self._in_flight

    def follow(self, feed):
        """Take frames from `feed` (None: stop) before anything put from
        now on.  `feed.ready()` says, without a lock, whether it may have
        frames for us; `feed.take()` returns them (called under our lock,
        so a feed serves one outbox)."""
        with self._lock:
            self._feed = feed

    def put(self, data, wake_writer=True):
        """Queue one encoded frame (after what the feed holds).  Returns
        False if it was dropped.

        With `wake_writer`, the writer sends it unless a sender is busy
        already.  A thread that calls `send_pending` soon after (the
        connection's own thread, once its call has left the publication
        lock) passes `wake_writer=False`: a writer for bytes that are
        about to leave anyway would cost a thread start per reply.
        """
        return self._put((data,), len(data), wake_writer)

    def put_parts(self, parts, wake_writer=True):
        """Queue one frame given as several buffers (see
        `zeo.bulk_frames`), together: nothing queued by another thread
        lands between them.  Returns False if it was dropped."""
        return self._put(parts, sum(map(len, parts)), wake_writer)

    def _put(self, parts, size, wake_writer):
        """`put` and `put_parts`: queue the frame made of the buffers
        `parts` (`size` bytes in all)."""
        with self._lock:
            if self._closing:
                return False
            kept = self._take_feed() and self._append_parts(parts, size)
            if kept and wake_writer and not self._draining:
                self._start_writer()
        if not kept:
            self._overflowed()
        return kept

    def _take_feed(self):
        """Queue what the feed holds (lock held, not closing).  Returns
        False if that passed the limit and closed the outbox."""
        if self._feed is None:
            return True
        frames = self._feed.take()
        return not frames or self._append_parts(frames, sum(map(len, frames)))

    def _append_parts(self, parts, size):
        """Queue one frame made of the buffers `parts` (`size` bytes in
        all), or close the outbox if it would pass the limit (lock held,
        not closing).  Returns False if it closed: the caller then calls
        `_overflowed` once the lock is released.

        The limit is for bytes a peer leaves unread, so it applies only
        while the last send was blocked (`_blocked`): a backlog of
        invalidations that the fan-out thread, starved of CPU, takes at
        once for an idle client is not the client's doing.  While nothing
        is blocked, whoever queues sends (or starts the writer) right
        after, and a send that blocks judges the queue (`_judge_blocked`).
        """
        if (self._blocked and self._pending
                and self._pending + size > self._limit):
            self._drop_queue()
            return False
        self._frames.extend(parts)
        self._pending += size
        self.queued_bytes += size
        return True

    def _judge_blocked(self):
        """A send could not take everything (lock held): from now on the
        limit applies, and the queue is judged at once, the frame at its
        head aside (one message over the limit may always leave).
        Returns False if it closed the outbox (see `_append_parts`)."""
        self._blocked = True
        head = len(self._frames[0]) if self._frames else 0
        if self._pending - head > self._limit:
            self._drop_queue()
            return False
        return True

    def _drop_queue(self):
        """Drop what is queued and stop accepting frames (lock held): past
        the limit, or when nothing can be sent any more."""
        self._closing = True
        self._frames.clear()
        self._pending = 0
        self._room.notify_all()

    def _overflowed(self):
        """The limit closed the outbox: shut the socket down (so the
        connection's reader notices and cleans up) and report it.

        The callback is taken first: once the socket is shut down, the
        reader may close the outbox, which drops it, before we report."""
        on_overflow = self._on_overflow
        self._shutdown_socket()
        if on_overflow is not None:
            on_overflow()

    def wait_for_room(self, threshold, timeout=None):
        """Wait until at most `threshold` bytes are left to send (queued,
        or taken by a sender and not yet accepted by the kernel).

        For a producer with much to send (a blob download): it queues a
        little, then waits here instead of filling the outbox up to its
        limit, which would disconnect a slow but honest client.  Returns
        True when there is room, False if the outbox is closing (nothing
        more will be sent) or `timeout` seconds passed first.
        """
        def room():
            return self._pending + self._in_flight <= threshold

        with self._lock:
            self._room_waiters += 1
            try:
                self._room.wait_for(lambda: self._closing or room(), timeout)
            finally:
                self._room_waiters -= 1
            return not self._closing and room()

    def send_pending(self):
        """Try to send what is queued now (and what the feed holds),
        without blocking.

        Called by the connection's own thread after it queued a reply,
        and by whoever publishes to the feed: the common case (an empty
        queue and a socket with room) then needs no thread switch at
        all, and takes the lock twice: to claim the queue with its first
        batch, and to give it back.  What does not fit is left to a
        writer, started for it.
        """
        feed = self._feed
        if not self._frames and (feed is None or not feed.ready()):
            # Nothing to do without the lock: what this thread queued is
            # visible to it, and whoever queues concurrently sends or
            # starts the writer itself (after a one-way call, say).  (A
            # deque's length is read whole without the GIL too.)
            return
        lock = self._lock
        with lock:
            if self._closing:
                return
            if not self._take_feed():
                overflowed = True
            elif self._draining or not self._frames:
                return
            else:
                overflowed = False
                self._draining = True
                batch, size = self._take_batch()
        if overflowed:
            self._overflowed()
            return
        while True:
            try:
                sent = self._send_now(batch)
            except OSError:
                sent = size  # the reader sees the broken socket and cleans up
            with lock:
                self._sent()
                if sent < size or not self._frames:
                    self._draining = False
                    if sent == size:
                        self._blocked = False
                    else:
                        self._frames.extendleft(
                            reversed(_unsent(batch, sent)))
                        self._pending += size - sent
                        overflowed = not self._judge_blocked()
                    if self._frames:
                        self._start_writer()  # the writer's turn
                    elif self._closing:
                        self._idle.notify_all()
                    break
                batch, size = self._take_batch()
        if overflowed:
            self._overflowed()

    def _send_now(self, batch):
        """Send what the socket takes of `batch` without waiting; returns
        the bytes sent."""
        try:
            return self._sock.sendmsg(batch, (), _NONBLOCKING)
        except (BlockingIOError, InterruptedError):
            return 0

    def _start_writer(self):
        """Start a writer for the queued frames unless one runs (lock
        held, nobody draining)."""
        if self._writer is not None:
            return
        writer = threading.Thread(target=self._write_loop,
                                  name="%s-writer" % self._name, daemon=True)
        try:
            writer.start()
        except RuntimeError as error:  # out of threads or memory
            logger.error("%s: cannot start a writer (%s); disconnecting",
                         self._name, error)
            self._drop_queue()
            self._shutdown_socket()
            return
        self._writer = writer

    def _take_batch(self):
        """Remove up to _BATCH_FRAMES frames from the queue (lock held).

        Returns them and their total size.  They are sent together with
        one `sendmsg`, so nothing is ever copied to join frames, however
        much is queued.
        """
        frames = self._frames
        if len(frames) == 1:
            frame = frames.popleft()
            size = len(frame)
            self._pending -= size
            self._in_flight = size
            return [frame], size
        batch = [frames.popleft()
                 for _ in range(min(len(frames), _BATCH_FRAMES))]
        size = sum(map(len, batch))
        self._pending -= size
        self._in_flight = size
        return batch, size

    def _sent(self):
        """The batch in flight has left or failed (lock held)."""
        self._in_flight = 0
        if self._room_waiters:
            self._room.notify_all()

    def _write_loop(self):
        """The writer: send with blocking sends until the queue is empty
        (or the socket fails), then end.

        It waits its turn while a `send_pending` drains; that thread
        leaves any remainder to it.
        """
        lock = self._lock
        while True:
            with lock:
                if self._draining or not self._frames:
                    # A sender drains (and leaves the rest to us), or all
                    # is sent: end; a later blocked send starts a writer.
                    if not self._frames:
                        self._blocked = False
                    self._writer = None
                    self._idle.notify_all()
                    return
                self._draining = True
                batch, _size = self._take_batch()
            try:
                batch = _unsent(batch, self._send_now(batch))
                if batch:
                    with lock:
                        kept = self._judge_blocked()
                    if not kept:
                        self._overflowed()  # the send below then fails
                while batch:
                    batch = _unsent(batch, self._sock.sendmsg(batch))
            except OSError:
                with lock:
                    self._drop_queue()
            with lock:
                self._sent()
                self._draining = False

    def close(self, timeout=5):
        """Stop accepting frames, send what is queued (waiting up to
        `timeout` seconds for it to leave), and let the writer end."""
        with self._lock:
            self._closing = True
            # Usually a method of the outbox's owner, which holds the
            # outbox: dropped, the two no longer form a reference cycle.
            self._on_overflow = None
            self._room.notify_all()
            if self._frames and not self._draining:
                self._start_writer()
            if self._writer is not threading.current_thread():
                self._idle.wait_for(
                    lambda: not self._draining and self._writer is None,
                    timeout)

    def _shutdown_socket(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _iov_max():
    try:
        return max(16, os.sysconf("SC_IOV_MAX"))
    except (AttributeError, ValueError, OSError):
        return 16  # the POSIX minimum


#: Buffers one `sendmsg` may take.
_IOV_MAX = _iov_max()


def send_buffers(sock, buffers):
    """Send every buffer of `buffers` on the blocking `sock`, in order,
    without joining them (`sendall` of a list)."""
    while buffers:
        batch = buffers[:_IOV_MAX]
        buffers = _unsent(batch, sock.sendmsg(batch)) + buffers[_IOV_MAX:]


def send_file_region(sock, buffers, descriptor, offset, size):
    """Send `buffers`, then `size` bytes of the file `descriptor` from
    `offset`, on the blocking `sock`.

    A plain socket takes the file's bytes by `os.sendfile`, copied once,
    by the kernel; any other (a `zeo.tls_socket.TLSSocket`, which must
    encrypt them) gets them read and sent with `buffers`.  OSError if
    the file ends first.
    """
    if type(sock) is not socket.socket:
        data = os.pread(descriptor, size, offset)
        if len(data) < size:
            raise _ended_early(size - len(data))
        send_buffers(sock, buffers + [data])
        return
    send_buffers(sock, buffers)
    out = sock.fileno()
    while size:
        sent = os.sendfile(out, descriptor, offset, size)
        if not sent:
            raise _ended_early(size)
        offset += sent
        size -= sent


def _ended_early(missing):
    return OSError("the file being sent ended %d bytes early" % missing)


def _unsent(batch, sent):
    """The part of `batch` that a send of `sent` bytes left behind."""
    for index, frame in enumerate(batch):
        if sent < len(frame):
            return [memoryview(frame)[sent:]] + batch[index + 1:]
        sent -= len(frame)
    return []
