"""Publishing a commit's invalidations to every client: once, not per client.

Every commit must reach every other registered client of its storage.
Putting its frame into each outbox and sending it from the committing
thread cost a lock, a queue append and a send system call per client and
commit, all while the committer's next call waited: beside 500 idle
clients, about 2.9 ms of server CPU per commit.

Instead each served storage keeps an `InvalidationLog`, a singly linked
list of published commits that the committer appends to once, under the
publication lock, whatever the number of clients.  Every registered
session's outbox follows the log with a `Cursor` of its own
(`zeo.rpc.Outbox.follow`): whoever puts a frame into that outbox or sends
from it first moves the entries past the cursor into the outbox, under
the outbox's lock.  PROTOCOL.md section 9 then holds as it did when the
committer queued on every outbox itself:

* rule 2: one log, appended in tid order under the commit lock, and each
  cursor passes each entry once: invalidations arrive in tid order, each
  exactly once (none to the committer, whose entries its cursor skips);
* rule 3: a load queues its reply under the publication lock, which the
  append needs too: the reply goes after every entry published before
  the read, and before every entry published after it;
* rules 4 and 9: any reply goes after every entry published before it
  was queued;
* rule 6: a session starts following at the log's end under the
  publication lock, where `register` reads the last tid.

The `Fanout` thread (one per storage) does the sending: woken after a
commit, it goes over the sessions and has each outbox send what its
cursor has not passed yet, without blocking (a full socket is left to
that outbox's writer, and past the outbox limit the client is dropped,
as for any output).  The committer does not wait for it, and when
commits come faster than a pass over the clients, each client's pending
invalidations leave together in one send.

An entry is encoded once per encoding, by the first cursor that takes
it.  Entries every cursor has passed are freed by reference counting:
the log holds only its newest one.
"""

import logging
import threading

logger = logging.getLogger(__name__)

INVALIDATE = "invalidateTransaction"


class _Entry:
    """One published commit, linked to the next one."""

    __slots__ = ("tid", "oids", "committer", "frames", "next")

    def __init__(self, tid, oids, committer):
        self.tid = tid
        self.oids = oids
        #: The id of the session that must not get it (its own commit),
        #: or None.  An id, not the session: the log's newest entry must
        #: not keep an ended session alive.  A session made later may get
        #: the same id, but its cursor starts past this entry.
        self.committer = committer
        #: The encoded frame by encoding, filled by the first taker.
        self.frames = {}
        self.next = None

    def frame(self, protocol, encode):
        frame = self.frames.get(protocol)
        if frame is None:
            # Two first takers may both encode: the same bytes.
            frame = self.frames[protocol] = encode(
                INVALIDATE, (self.tid, self.oids))
        return frame


class InvalidationLog:
    """The commits a storage published, for its sessions' cursors."""

    def __init__(self):
        self._tail = _Entry(None, None, None)

    def append(self, tid, oids, committer=None):
        """Publish a commit (publication lock held)."""
        entry = _Entry(tid, oids,
                       None if committer is None else id(committer))
        self._tail.next = entry
        self._tail = entry

    def follow(self, owner, protocol, encode):
        """A cursor for `owner`'s outbox, at the end of the log
        (publication lock held): it gets every later commit, in its
        encoding `protocol`, framed by `encode(method, args)`."""
        return Cursor(self._tail, id(owner), protocol, encode)


class Cursor:
    """Where one session is in the log: the feed of its outbox."""

    __slots__ = ("_last", "_owner", "_protocol", "_encode")

    def __init__(self, last, owner, protocol, encode):
        self._last = last
        self._owner = owner
        self._protocol = protocol
        self._encode = encode

    def ready(self):
        """Whether entries were published past the cursor."""
        return self._last.next is not None

    def take(self):
        """The frames of the entries past the cursor, which moves to the
        end (the outbox's lock held)."""
        entry = self._last
        frames = []
        while entry.next is not None:
            entry = entry.next
            if entry.committer != self._owner:
                frames.append(entry.frame(self._protocol, self._encode))
        self._last = entry
        return frames


class Fanout:
    """The thread that sends published invalidations to a storage's
    sessions: started at the first `wake`, stopped by `stop`."""

    def __init__(self, name, sessions):
        self._name = name
        #: The storage's list of sessions (copied for each pass).
        self._sessions = sessions
        self._wake = threading.Condition(threading.Lock())
        self._woken = False
        self._stopping = False
        self._thread = None

    def wake(self):
        """Have every session send what was published (after a commit;
        never waits for the sends)."""
        with self._wake:
            if self._woken or self._stopping:
                return
            self._woken = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="zeo-fanout-%s" % self._name,
                    daemon=True)
                self._thread.start()
            else:
                self._wake.notify()

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self):
        wake = self._wake
        while True:
            with wake:
                wake.wait_for(lambda: self._woken or self._stopping)
                if self._stopping:
                    return
                self._woken = False
            self._send_round()

    def _send_round(self):
        """One pass over the sessions (a function of its own, so that no
        ended session stays referenced from the thread's loop)."""
        for session in list(self._sessions):
            try:
                session.send_queued()
            except Exception:
                logger.exception("sending invalidations to %s failed",
                                 session.channel.label)
