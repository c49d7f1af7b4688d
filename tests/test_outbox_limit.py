"""The outbox limit drops peers that stop reading, and only those.

A server drops a client whose unsent output passes the outbox limit.
Output can also pile up through no fault of the client: the fan-out
thread, starved of CPU, takes many commits' invalidations for an idle
client at once.  These tests use a real socket pair and a feed of real
frames (the interface `zeo.server.fanout.Cursor` offers).
"""

import socket
import threading

from conftest import wait_until
from test_ordering import read_frames
from zeo.rpc import Outbox
from zeo.wire import frame

LIMIT = 16 * 1024


class Backlog:
    """A feed holding frames published before the outbox's next turn."""

    def __init__(self):
        self._frames = []
        self._lock = threading.Lock()

    def publish(self, frames):
        with self._lock:
            self._frames.extend(frames)

    def ready(self):
        return bool(self._frames)

    def take(self):
        with self._lock:
            frames, self._frames = self._frames, []
        return frames


def invalidations(count, size=500):
    return [frame(b"%05d" % index + b"i" * size) for index in range(count)]


def outbox_following_a_feed(sndbuf=None):
    """A socket pair, an outbox on one end with LIMIT following a feed
    (empty unless a test publishes), the feed, and the list the overflow
    callback appends to."""
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    dropped = []
    outbox = Outbox(ours, "test", limit=LIMIT,
                    on_overflow=lambda: dropped.append(True))
    feed = Backlog()
    outbox.follow(feed)
    return ours, theirs, outbox, feed, dropped


def fill_until_blocked(outbox):
    """Put frames a peer that never reads leaves unsent, until a send is
    left with bytes it could not send; returns how many were put."""
    for count in range(1, 1000):
        assert outbox.put(frame(b"b" * 1000), wake_writer=False)
        outbox.send_pending()
        if outbox.pending:
            return count
    raise AssertionError("the socket never filled")


def test_a_backlog_over_the_limit_is_sent_to_a_peer_that_reads():
    """A hundred commits' invalidations (three times the limit) taken
    at once for a client whose socket has room: sent, not a reason to drop
    the client."""
    ours, theirs, outbox, feed, dropped = outbox_following_a_feed()
    backlog = invalidations(100)
    assert sum(map(len, backlog)) > 3 * LIMIT
    feed.publish(backlog)
    assert outbox.put(frame(b"reply"), wake_writer=False)
    outbox.send_pending()
    received = read_frames(theirs, len(backlog) + 1)
    assert received == [bytes(data[4:]) for data in backlog] + [b"reply"]
    assert not dropped
    # And the same through the writer (a put from another thread).
    feed.publish(backlog)
    assert outbox.put(frame(b"again"))
    received = read_frames(theirs, len(backlog) + 1)
    assert received[-1] == b"again" and len(received) == len(backlog) + 1
    assert not dropped
    outbox.close()
    ours.close()
    theirs.close()


def test_a_peer_that_never_reads_is_dropped_at_the_limit():
    ours, theirs, outbox, _feed, dropped = outbox_following_a_feed(4096)
    fill_until_blocked(outbox)
    put = 0
    while outbox.put(frame(b"c" * 1000), wake_writer=False):
        outbox.send_pending()
        put += 1
        assert put < 100, "a peer that never reads is never dropped"
    # The limit, plus what the kernel still took after the first
    # blocked send (a writer's blocking send may go on a little).
    assert put * 1000 <= LIMIT + 16 * 1024
    assert dropped == [True]
    # Dropped, not held (a writer blocked in a send lets go of its batch
    # once the socket is shut down).
    wait_until(lambda: outbox.pending == 0, "the queue is dropped", 10)
    assert not outbox.put(frame(b"late"))
    outbox.close(timeout=1)
    ours.close()
    theirs.close()


def test_a_backlog_for_a_peer_that_stopped_reading_drops_it():
    """The hog: its socket is full, and the invalidations published
    meanwhile pass the limit when the fan-out takes them."""
    ours, theirs, outbox, feed, dropped = outbox_following_a_feed(4096)
    fill_until_blocked(outbox)
    # The writer may hold all that was queued: then the outbox counts
    # nothing unsent, and the first backlog is taken as one big message.
    for _ in range(2):
        feed.publish(invalidations(100))
        outbox.send_pending()
    assert dropped == [True]
    wait_until(lambda: outbox.pending == 0, "the queue is dropped", 10)
    outbox.close(timeout=1)
    ours.close()
    theirs.close()


def test_a_backlog_taken_while_another_thread_sends_one_is_kept():
    """The fan-out's race: a sender holds the first batch of a backlog
    taken at once and the rest waits in the queue (over the limit) when
    another thread takes the next commit's invalidation.  The peer reads,
    so nothing is dropped."""
    ours, theirs, outbox, feed, dropped = outbox_following_a_feed()
    backlog = invalidations(100)
    later = invalidations(1)

    class SendsWhileAnotherTakes:
        """The socket, except that the first send lets another thread
        take the feed first (as the fan-out thread does after a commit)."""

        taker = None

        def sendmsg(self, *args):
            if self.taker is None:
                feed.publish(later)
                self.taker = threading.Thread(target=outbox.send_pending)
                self.taker.start()
                self.taker.join(10)
            return ours.sendmsg(*args)

    sock = outbox._sock = SendsWhileAnotherTakes()
    feed.publish(backlog)
    outbox.send_pending()
    assert sock.taker is not None and not sock.taker.is_alive()
    assert len(read_frames(theirs, 101)) == 101
    assert not dropped
    outbox._sock = ours
    outbox.close()
    ours.close()
    theirs.close()
