"""Busy polling: catch a client's next message without a kernel wake-up.

A connection thread that goes to sleep waiting for its socket after
answering pays for
a wake-up when the next message arrives.  On a virtual machine that is
tens of microseconds, as much as the whole call costs us in Python, and a
client that sends its next request right away (a commit's `tpc_finish`
after its vote, a cold cache loading object after object) pays it on
every round trip.  So, like an adaptive mutex that spins before it
blocks, a thread that has just answered polls its socket for a short
window before it sleeps.

Polling burns CPU that could serve somebody else, so five rules bound it:

* Only after a reply: after a one-way message (a stream of stores or of
  blob chunks) the client waits for nothing, and sends its next message
  when it is ready; polling would only take CPU from it.

* Only a connection that is the only one talking polls: if another
  connection received a message during the last `QUIET_PERIOD`, it does
  not.  With several active clients the CPU is better spent on them (and
  on their processes, when they share the machine), so a busy server
  never polls.
* A poller gives up the moment another connection wakes up with a
  message, and nobody starts polling while another connection has one
  in hand.
* A connection polls only if its client's last pause between messages
  fitted in the window: a client that thinks, or talks rarely, is not
  expected back soon.
* Each poll yields the processor between attempts, so a client process
  sharing the CPU with us gets to run.

A connection "has a message in hand" from the moment its thread wakes up
until it goes back to sleep waiting for its socket.  The set of such connections is a
plain set, and each arrival recorded one attribute holding a tuple:
adding, discarding and storing are single operations, atomic under the
GIL and on a free-threaded interpreter alike (there a set locks itself
for each operation, and an attribute store replaces one reference), so
no lock is taken per message.  The rule that keeps this safe without the
GIL: nothing here reads a value, changes it and stores it back (no `+=`),
and nothing iterates the set.  (Two arrivals recorded at once may leave
a slightly stale record; that only makes one poll more or less.)
"""

import os
import select
import time

#: How long a connection polls by default (`busy-poll` in component.xml).
DEFAULT_MICROSECONDS = 300
DEFAULT_WINDOW = DEFAULT_MICROSECONDS / 1e6
#: How long the other connections must have received nothing for one
#: connection to poll (seconds).
QUIET_PERIOD = 0.002
#: Polling needs a way to yield the CPU.
AVAILABLE = hasattr(os, "sched_yield")


class BusyPolling:
    """The server-wide policy: its window, who has work right now, and who
    received the latest message."""

    def __init__(self, window=DEFAULT_WINDOW, clock=time.monotonic):
        if window < 0:
            raise ValueError("the busy-poll window cannot be negative")
        #: Seconds a connection polls before sleeping; 0 turns polling off.
        self.window = window if AVAILABLE else 0
        #: Where receivers read the time (tests pass a clock they move).
        self.clock = clock
        self._working = set()
        #: `(receiver, time)` of the latest message received, and of the
        #: latest one received by another receiver than that one.
        self._last_arrival = self._other_arrival = (None, float("-inf"))

    def receiver(self):
        """A new connection's receiver, counted as working until it first
        sleeps (a connection is accepted because a client is talking)."""
        receiver = Receiver(self)
        self._working.add(receiver)
        self.record_arrival(receiver, self.clock())
        return receiver

    def record_arrival(self, receiver, now):
        """`receiver` got a message at `now` (keeping the latest arrival
        by any other receiver for `others_quiet`)."""
        last = self._last_arrival
        if last[0] is not receiver:
            self._other_arrival = last
        self._last_arrival = (receiver, now)

    def forget(self, receiver):
        """`receiver`'s connection ended: keep the times of its arrivals,
        not the receiver (a record may otherwise keep it for as long as
        the server stays quiet)."""
        last, other = self._last_arrival, self._other_arrival
        if last[0] is receiver:
            self._last_arrival = (None, last[1])
        if other[0] is receiver:
            self._other_arrival = (None, other[1])

    def others_quiet(self, receiver, now):
        """Whether no receiver but `receiver` got a message during the
        last QUIET_PERIOD."""
        last = self._last_arrival
        if last[0] is receiver:
            last = self._other_arrival
        return now - last[1] >= QUIET_PERIOD

    def working_count(self):
        """How many connections have a message in hand right now."""
        return len(self._working)


class Receiver:
    """One connection's side of the policy: its `wait`."""

    def __init__(self, policy):
        self._policy = policy
        self._working = policy._working
        self._client_is_quick = True
        #: Made for the connection's socket on first use.
        self._poller = None

    def wait(self, sock, replied=True):
        """Return once `sock` has something to read (data, or its end),
        polling first when the policy allows (`replied`: the last message
        was a call we answered).

        Waiting for readability instead of sleeping in `recv` lets the
        connection hold no receive buffer while it is idle (see
        `zeo.server.connection`).
        """
        policy = self._policy
        window = policy.window
        started = policy.clock()
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        if window and replied and self._client_is_quick \
                and policy.others_quiet(self, started) \
                and self._poll(poller, started + window):
            policy.record_arrival(self, policy.clock())
            return
        working = self._working
        working.discard(self)
        try:
            poller.poll()
        finally:
            working.add(self)
        arrived = policy.clock()
        policy.record_arrival(self, arrived)
        self._client_is_quick = arrived - started <= window

    def _poll(self, poller, deadline):
        """Whether something arrived before `deadline` (False if not, or
        if another connection has work)."""
        working = self._working
        clock = self._policy.clock
        while len(working) == 1:
            if poller.poll(0):
                return True
            if clock() >= deadline:
                return False
            os.sched_yield()
        return False

    def close(self):
        """The connection ended: it no longer counts as working, nor is
        it kept in the records of arrivals."""
        self._working.discard(self)
        self._policy.forget(self)
