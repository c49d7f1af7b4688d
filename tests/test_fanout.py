"""Invalidations beside many clients: published once, sent by the fan-out.

A commit is published once per storage and sent to the other clients by
the storage's fan-out thread (zeo/server/fanout.py).  These tests check
that with many clients and concurrent committers nothing of PROTOCOL.md
section 9 is lost: every client gets every other client's invalidation
exactly once, in tid order; a load never overtakes an invalidation; the
committer never waits for the fan-out; and a client that never reads is
still dropped at the outbox limit.
"""

import socket
import threading

import pytest
from ZODB.utils import maxtid, p64, z64

from conftest import wait_until
from server_process import (OURS, impl_from_environment,
                            start_filestorage_server, temporary_directory)
from test_ordering import (ROOT, begin_and_store, commit, connect,
                           pause_fanout_at, session_labelled)
from zeo import wire

pytestmark = pytest.mark.timeout(120)

INVALIDATE = "invalidateTransaction"
IDLE_CLIENTS = 150
COMMITTERS = 4
COMMITS_EACH = 40
LOADERS = 3
#: Commits a never-reading client is given to overflow its outbox.
MAX_COMMITS = 1000


def invalidations(messages):
    """`(tid, sorted oids)` of the invalidations among `messages`."""
    return [(message.args[0], sorted(message.args[1]))
            for message in messages if message.name == INVALIDATE]


def invalidations_until_synced(client):
    """Every invalidation the client has not read yet: a round trip
    brings all that was published before it (rule 9)."""
    client.server_calls.clear()
    client.call("ping")
    return invalidations(client.server_calls)


def recording_thread(failures, target, *args):
    """A started thread running `target(*args)`; what it raises is
    appended to `failures`."""
    def run():
        try:
            target(*args)
        except Exception as error:
            failures.append((target.__name__, error))

    thread = threading.Thread(target=run, name="test-" + target.__name__)
    thread.start()
    return thread


def run_committer(client, number, created, committed):
    """Commit to the committer's own two objects (no conflicts), one or
    both per transaction; record `(tid, sorted oids)` of each."""
    own = [p64(2 * number + 1), p64(2 * number + 2)]
    serials = dict.fromkeys(own, created)
    for txn_id in range(1, COMMITS_EACH + 1):
        oids = own if txn_id % 3 == 0 else [own[txn_id % 2]]
        begin_and_store(client, txn_id,
                        [(oid, serials[oid], txn_id) for oid in oids])
        client.call("vote", txn_id)
        tid = client.call("tpc_finish", txn_id)
        serials.update(dict.fromkeys(oids, tid))
        committed.append((tid, sorted(oids)))


def run_loader(client, oids, stop, trace):
    """Load every object again and again until `stop`, recording each
    message in the order it arrived."""
    while not stop.is_set():
        for oid in oids:
            msgid = client.send_call("loadBefore", oid, maxtid)
            while True:
                message = client.read_message()
                trace.append((oid, message))
                if message.name == wire.REPLY_NAME and message.msgid == msgid:
                    break


def check_loader_trace(trace, created, strict):
    """No load reply overtakes an invalidation: a reply never calls
    current a revision older than one it was told of (rule 3), and, if
    `strict`, never reflects a commit whose invalidation has not come
    before it (the stricter variant of rule 3, which ours keeps and the
    real ZEO server does not).  Returns the invalidations in the
    trace."""
    told = {}  # oid -> tids of the invalidations received so far
    seen = []
    for oid, message in trace:
        if message.name == INVALIDATE:
            tid, oids = message.args
            seen.append((tid, sorted(oids)))
            for changed in oids:
                told.setdefault(changed, []).append(tid)
            continue
        assert message.name == wire.REPLY_NAME and not message.flag
        _data, start, end = message.args
        assert end is None
        assert start >= max(told.get(oid, [created])), \
            "a load reply older than an invalidation sent before it"
        assert not strict or start == created \
            or start in told.get(oid, ()), \
            "a load reply ahead of its commit's invalidation"
    return seen


def test_many_clients_get_every_invalidation_once_in_order():
    """150 idle clients, 4 committers and 3 loaders on one storage: every
    client receives exactly the other clients' commits, each once, in
    tid order, and no load reply overtakes an invalidation."""
    oids = [p64(number) for number in range(1, 2 * COMMITTERS + 1)]
    with temporary_directory() as directory:
        impl = impl_from_environment()
        server = start_filestorage_server(directory, impl=impl)
        clients = []
        try:
            setup = connect(server)
            clients.append(setup)
            created = commit(setup, 1, [(oid, z64, 0) for oid in oids])
            idle = [connect(server) for _ in range(IDLE_CLIENTS)]
            committers = [connect(server) for _ in range(COMMITTERS)]
            loaders = [connect(server) for _ in range(LOADERS)]
            clients += idle + committers + loaders
            committed = [[] for _ in committers]
            traces = [[] for _ in loaders]
            stop = threading.Event()
            failures = []
            loading = [recording_thread(failures, run_loader, client, oids,
                                        stop, trace)
                       for client, trace in zip(loaders, traces)]
            committing = [recording_thread(failures, run_committer, client,
                                           number, created, done)
                          for number, (client, done)
                          in enumerate(zip(committers, committed))]
            for thread in committing:
                thread.join()
            stop.set()
            for thread in loading:
                thread.join()
            assert failures == []
            everything = sorted(sum(committed, []))
            assert len(everything) == COMMITTERS * COMMITS_EACH
            for client in idle:
                assert invalidations_until_synced(client) == everything
            for client, own in zip(committers, committed):
                others = [entry for entry in everything if entry not in own]
                assert invalidations(client.server_calls) \
                    + invalidations_until_synced(client) == others
            for client, trace in zip(loaders, traces):
                assert check_loader_trace(trace, created, impl == OURS) \
                    + invalidations_until_synced(client) == everything
        finally:
            for client in clients:
                client.close()
            server.stop()


class CountingSocket:
    """A server socket that records how many frames each send carried."""

    def __init__(self, sock):
        self._sock = sock
        self.sends = []

    def sendmsg(self, buffers, *args):
        self.sends.append(len(buffers))
        return self._sock.sendmsg(buffers, *args)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_committer_does_not_wait_for_the_fanout(make_server):
    """The committer's replies do not wait for the invalidations to be
    sent; a round trip brings them anyway (rule 9); and those published
    while the fan-out was busy leave together, in one send."""
    server = make_server()
    stuck_client = connect(server)  # the fan-out visits it first
    stuck = session_labelled(server, stuck_client, "stuck")
    watched_client = connect(server)
    watched = session_labelled(server, watched_client, "watched")
    pinger = connect(server)
    writer = connect(server)
    counting = watched.channel.outbox._sock = CountingSocket(
        watched.channel.outbox._sock)
    reached, release = pause_fanout_at(stuck)
    tids = []
    try:
        serial = z64
        for txn_id in range(1, 6):
            serial = commit(writer, txn_id, [(ROOT, serial, txn_id)])
            tids.append(serial)
        assert reached.is_set()
        expected = [(tid, [ROOT]) for tid in tids]
        assert invalidations_until_synced(pinger) == expected
        assert counting.sends == []
    finally:
        release.set()
    for client in (watched_client, stuck_client):
        assert [(message.name, message.args) for message
                in (client.read_message() for _ in tids)] \
            == [(INVALIDATE, entry) for entry in expected]
    assert counting.sends == [len(tids)]


def test_a_client_that_never_reads_is_dropped_beside_hundreds(
        make_server, caplog):
    """Among 200 idle clients, one that never reads fills its outbox
    with invalidations and is dropped at the outbox limit; commits go on
    and every other client gets every invalidation."""
    limit = 16 * 1024
    server = make_server(outbox_limit=limit)
    writer = connect(server)
    hog = connect(server)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog_session = session_labelled(server, hog, "hog")
    hog_session.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                        4096)
    idle = [connect(server) for _ in range(200)]
    served = server.storages["1"]
    committed = []
    # Invalidations of 10 objects each until the hog's outbox overflows:
    # a few hundred, well within what the others' socket buffers hold.
    while hog_session in served.sessions and len(committed) < MAX_COMMITS:
        txn_id = len(committed) + 1
        oids = [p64(txn_id * 100 + index) for index in range(10)]
        committed.append((commit(writer, txn_id,
                                 [(oid, z64, txn_id) for oid in oids]),
                          oids))
    wait_until(lambda: hog_session not in served.sessions,
               "the hog is dropped", 20)
    assert hog.is_closed(20)
    assert any("(hog " in record.getMessage()
               and "stopped reading: more than %d bytes unsent" % limit
               in record.getMessage() for record in caplog.records)
    for client in idle:
        assert invalidations_until_synced(client) == committed
    assert served.status("stub")["connections"] == 201
