"""A connection that ends is freed at once, by reference counting.

Objects caught in a reference cycle live until the garbage collector's
next full collection, which with thousands of clients may come long
after they left (and meanwhile holds their memory).  A connection and
its session point at each other, and bound methods, callbacks and
closures kept as attributes easily close more cycles; the server breaks
them when a connection ends.  These tests turn the collector off, end
connections in every way a connection ends (on a server in this process,
on 127.0.0.1 with a real FileStorage), and check that nothing of them is
left: no `ServerConnection`, `Session`, `Outbox` or `Receiver` object,
and none of our objects in cyclic garbage for the collector to find.
"""

import gc
import socket
import struct

import pytest
from ZODB.utils import z64

from conftest import wait_until
from raw_client import RawClient
from test_ordering import commit, connect
from zeo.rpc import Outbox
from zeo.server.busy_poll import Receiver
from zeo.server.connection import ServerConnection
from zeo.server.limits import NetworkLimits
from zeo.server.session import Session

pytestmark = pytest.mark.timeout(60)

#: What one connection is made of (what must not outlive it).
PARTS = (ServerConnection, Session, Outbox, Receiver)
#: Seconds for the server's threads to finish with the connections.
FREED_WITHIN = 10
SHORT_REGISTER_TIMEOUT = NetworkLimits(register_timeout=1)


def parts_alive():
    """How many connection parts exist, by class name."""
    counts = dict.fromkeys((part.__name__ for part in PARTS), 0)
    for thing in gc.get_objects():
        if isinstance(thing, PARTS):
            counts[type(thing).__name__] += 1
    return counts


@pytest.fixture
def collector_off():
    """The garbage collector off for the test (what a cycle would hold
    stays held), on again after it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def hang_up(server):
    connect(server).close()


def commit_then_hang_up(server):
    client = connect(server)
    oid = client.call("new_oids", 1)[0]
    commit(client, b"t1", [(oid, z64, 1)])
    client.close()


def reset(server):
    client = connect(server)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                           struct.pack("ii", 1, 0))
    client.close()


def leave_a_transaction_open(server):
    client = connect(server)
    client.send_oneway("tpc_begin", b"t2", b"", b"", {}, None, " ")
    client.call("lastTransaction")
    client.close()


def call_a_private_method(server):
    client = connect(server)
    client.send_call("_finish")
    assert client.is_closed(FREED_WITHIN)
    client.close()


def fail_a_one_way_call(server):
    client = connect(server)
    client.send_oneway("tpc_abort", "too", "many", "arguments")
    assert client.is_closed(FREED_WITHIN)
    client.close()


def never_register(server):
    client = RawClient(server.address)
    client.handshake()
    assert client.is_closed(FREED_WITHIN)  # register-timeout
    client.close()


ENDINGS = [hang_up, commit_then_hang_up, reset, leave_a_transaction_open,
           call_a_private_method, fail_a_one_way_call, never_register]


@pytest.mark.parametrize("ending", ENDINGS, ids=lambda ending: ending.__name__)
def test_an_ended_connection_is_freed_without_the_collector(
        make_server, collector_off, ending):
    server = make_server(limits=SHORT_REGISTER_TIMEOUT)
    before = parts_alive()
    for _ in range(3):
        ending(server)
    wait_until(lambda: server.connection_count() == 0,
               "the server's connections ended", FREED_WITHIN)
    wait_until(lambda: parts_alive() == before,
               "no part of an ended connection left", FREED_WITHIN)
    assert zeo_garbage() == []


def zeo_garbage():
    """The classes of our objects that only the collector would free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted({type(thing).__qualname__ for thing in gc.garbage
                       if type(thing).__module__.startswith("zeo.")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_the_register_deadlines_thread_keeps_no_ended_connection(
        make_server, collector_off):
    """The thread that closes silent connections held the first pending
    one while it waited, long after that one had registered and gone."""
    server = make_server(limits=SHORT_REGISTER_TIMEOUT)
    before = parts_alive()
    never_register(server)  # one that expires: the thread's last
    hang_up(server)  # one that registers and leaves while it waits
    wait_until(lambda: parts_alive() == before,
               "no part of an ended connection left", FREED_WITHIN)
