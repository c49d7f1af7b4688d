"""The busy-poll policy (`zeo.server.busy_poll`) on real socket pairs.

Each rule is forced with a clock the test moves by hand, so "the client
was slow" or "the window ran out" happen exactly when the test says and
never because the machine was busy.  Whether a receiver is polling or
asleep is read from the policy's count of working connections: a
receiver asleep in `recv` is not counted, a polling one is.
"""

import socket
import threading
import time

import pytest

from conftest import wait_until
from zeo.server import busy_poll
from zeo.server.busy_poll import QUIET_PERIOD, BusyPolling

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not busy_poll.AVAILABLE,
                       reason="no MSG_DONTWAIT or sched_yield here"),
]

WAIT = 10


class HandClock:
    """A clock that moves only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class PolicyConnection:
    """One connection of a policy on a socket pair: `receive()` calls its
    receiver's `wait` and a receive on a thread, `join()` returns what it got, and
    the test sends on `client` (`deliver` sends and checks the receipt)."""

    def __init__(self, receiver, sock, client):
        self._receiver = receiver
        self._sock = sock
        self.client = client
        self._buffer = bytearray(1024)
        self._thread = None
        self.received = None

    def receive(self, replied=True):
        def run():
            self._receiver.wait(self._sock, replied)
            count = self._sock.recv_into(self._buffer)
            self.received = bytes(self._buffer[:count])
        self.received = None
        self._thread = threading.Thread(target=run, name="test-receiver")
        self._thread.start()

    def join(self):
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "wait did not return"
        return self.received

    def deliver(self, data):
        """The client sends `data`; the pending `receive` gets exactly it."""
        self.client.sendall(data)
        assert self.join() == data


def wait_for_working(policy, count, what):
    """Wait until `count` connections have work (the others sleep)."""
    wait_until(lambda: policy.working_count() == count, what, WAIT)


def assert_keeps_polling(policy):
    """While the hand clock stands still, a polling receiver never goes to
    sleep by itself: it stays the one working connection."""
    for _ in range(20):
        time.sleep(0.005)
        assert policy.working_count() == 1


@pytest.fixture
def connect():
    """Factory: a new `PolicyConnection` of `policy` (its receiver made now,
    so counted as working until it first sleeps)."""
    pairs = []

    def make(policy):
        pair = socket.socketpair()
        pairs.append(pair)
        server_side, client_side = pair
        return PolicyConnection(policy.receiver(), server_side, client_side)

    yield make
    for pair in pairs:
        for sock in pair:
            sock.close()


def test_a_new_connection_counts_as_working_until_it_sleeps(connect):
    policy = BusyPolling(window=0)
    connection = connect(policy)
    assert policy.working_count() == 1
    connection.receive()
    wait_for_working(policy, 0, "it sleeps")
    connection.deliver(b"hello")
    assert policy.working_count() == 1


def test_a_lone_connection_polls_until_the_window_runs_out(connect):
    clock = HandClock()
    policy = BusyPolling(window=1.0, clock=clock)
    connection = connect(policy)
    connection.receive()
    assert_keeps_polling(policy)
    clock.now = 1.0
    wait_for_working(policy, 0, "it sleeps")
    connection.deliver(b"late")


def test_no_polling_after_a_one_way_message(connect):
    """After a one-way message (a stream of blob chunks, say) the client
    waits for nothing: the connection sleeps at once, although the hand
    clock stands still and the window never runs out."""
    policy = BusyPolling(window=1.0, clock=HandClock())
    connection = connect(policy)
    connection.receive(replied=False)
    wait_for_working(policy, 0, "it sleeps")
    connection.deliver(b"next chunk")


def test_a_message_within_the_window_is_received_by_polling(connect):
    policy = BusyPolling(window=1.0, clock=HandClock())
    connection = connect(policy)
    connection.client.sendall(b"quick")
    connection.receive()
    assert connection.join() == b"quick"
    assert policy.working_count() == 1


def test_a_client_slower_than_the_window_is_not_polled_for(connect):
    clock = HandClock()
    policy = BusyPolling(window=1.0, clock=clock)
    connection = connect(policy)
    connection.receive()
    clock.now = 5.0  # the client takes 5 s to come back
    wait_for_working(policy, 0, "it sleeps")
    connection.deliver(b"slow")
    # Next time it sleeps at once, although the clock stands still and
    # a poll would never end.
    connection.receive()
    wait_for_working(policy, 0, "it sleeps")
    connection.deliver(b"quick again")  # no time passed: quick
    # A client back within the window is polled for again.
    connection.receive()
    assert_keeps_polling(policy)
    connection.deliver(b"polled")


def test_a_poller_gives_way_when_another_connection_wakes(connect):
    clock = HandClock()
    policy = BusyPolling(window=1.0, clock=clock)
    first, second = connect(policy), connect(policy)
    # Both start counted as working: the second cannot poll, so it
    # sleeps; then the first, alone, polls for ever.
    second.receive()
    wait_for_working(policy, 1, "the second sleeps")
    clock.now = QUIET_PERIOD  # the second's arrival is not recent
    first.receive()
    assert_keeps_polling(policy)
    second.deliver(b"work")
    # The second now has a message in hand: the first must stop polling
    # and sleep, leaving the second as the only working connection.
    wait_for_working(policy, 1, "the poller goes to sleep")
    first.deliver(b"later")
    assert policy.working_count() == 2


def test_no_connection_polls_while_another_one_works(connect):
    clock = HandClock()
    policy = BusyPolling(window=1.0, clock=clock)
    policy.receiver()  # a connection in the middle of a call
    connection = connect(policy)
    # The busy one's arrival is old news: only its work in hand can stop
    # the new one from polling.
    clock.now = QUIET_PERIOD
    connection.receive()
    wait_for_working(policy, 1, "the second one sleeps instead of polling")
    connection.deliver(b"x")


def test_no_connection_polls_after_another_one_received_lately(
        connect):
    clock = HandClock()
    policy = BusyPolling(window=1.0, clock=clock)
    first, second = connect(policy), connect(policy)
    second.receive()  # cannot poll: the first still has work in hand
    wait_for_working(policy, 1, "the second sleeps")
    second.deliver(b"recent")
    second.receive()
    # Nobody has work in hand now, but the second received a message
    # QUIET_PERIOD ago or less: the first does not poll, it sleeps.
    clock.now = QUIET_PERIOD / 2
    first.receive()
    wait_for_working(policy, 0, "both sleep")
    first.client.sendall(b"a")
    second.client.sendall(b"b")
    assert (first.join(), second.join()) == (b"a", b"b")


def test_its_own_latest_message_does_not_hide_another_connections(
        connect):
    clock = HandClock()
    policy = BusyPolling(window=1.0, clock=clock)
    first, second = connect(policy), connect(policy)
    second.client.sendall(b"s")
    second.receive()
    assert second.join() == b"s"
    first.client.sendall(b"f")
    first.receive()
    assert first.join() == b"f"
    second.receive()
    wait_for_working(policy, 1, "the second sleeps")
    # The first received the latest message, but the second received one
    # within QUIET_PERIOD: the first sleeps instead of polling.
    clock.now = QUIET_PERIOD / 2
    first.receive()
    wait_for_working(policy, 0, "the first sleeps")
    first.deliver(b"f2")
    # Once the second has been quiet for QUIET_PERIOD, the first polls.
    clock.now = QUIET_PERIOD
    first.receive()
    assert_keeps_polling(policy)
    first.client.sendall(b"f3")
    second.client.sendall(b"s2")
    assert (first.join(), second.join()) == (b"f3", b"s2")


def test_a_closed_receiver_no_longer_counts():
    policy = BusyPolling(window=1.0)
    receiver = policy.receiver()
    assert policy.working_count() == 1
    receiver.close()
    receiver.close()
    assert policy.working_count() == 0


def test_end_of_stream_while_polling_returns_zero(connect):
    policy = BusyPolling(window=1.0, clock=HandClock())
    connection = connect(policy)
    connection.receive()
    connection.client.shutdown(socket.SHUT_WR)
    assert connection.join() == b""


def test_a_negative_window_is_refused():
    with pytest.raises(ValueError, match="negative"):
        BusyPolling(window=-1)
