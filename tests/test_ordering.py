"""The ordering rules of PROTOCOL.md section 9, forced, not hoped for.

Each test runs the server in this process (real sockets on 127.0.0.1, a
real FileStorage) so it can pause the server at the exact point where a
thread-per-connection server could reorder messages, then checks the bytes
each client received, in order.
"""

import threading
import time

import pytest
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import maxtid, p64, z64

from conftest import wait_until
from raw_client import RawClient, RemoteError
from zeo import wire

pytestmark = pytest.mark.timeout(60)

ROOT = z64
OTHER = p64(1)


@pytest.fixture
def server(make_server):
    return make_server()


def connect(server, protocol=None):
    """A registered raw client answering the greeting with `protocol`
    (default: the server's own)."""
    client = RawClient(server.address)
    client.handshake(protocol)
    client.register()
    return client


def begin_and_store(client, txn_id, stores):
    client.send_oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
    for oid, serial, value in stores:
        client.send_oneway("storea", oid, serial, zodb_pickle(MinPO(value)),
                           txn_id)


def commit(client, txn_id, stores):
    begin_and_store(client, txn_id, stores)
    client.call("vote", txn_id)
    return client.call("tpc_finish", txn_id)


def messages_until_reply(client, msgid, timeout=10):
    """Every message read up to and including the reply to `msgid`."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        message = client.read_message(deadline - time.monotonic())
        seen.append(message)
        if message.name == ".reply" and message.msgid == msgid:
            return seen


def test_load_read_before_a_commit_is_sent_before_its_invalidation(server):
    """Rule 3: a load reply computed before commit T leaves before T's
    invalidation, so the client never caches stale data as current."""
    writer = connect(server)
    first = commit(writer, 1, [(ROOT, z64, 1)])
    reader = connect(server)
    read_done, may_reply = hold_loads_of(server, reader, "paused")
    load_id = (ROOT, maxtid)
    reader.send_message(load_id, False, "loadBefore", (ROOT, maxtid))
    assert read_done.wait(10)

    # The commit cannot publish while the load is between read and reply.
    begin_and_store(writer, 2, [(ROOT, first, 2)])
    assert writer.call("vote", 2) == []
    writer.send_message(99, False, "tpc_finish", (2,))
    with pytest.raises(TimeoutError):
        writer.read_message(timeout=0.5)

    may_reply.set()
    second = messages_until_reply(writer, 99)[-1].args
    seen = [reader.read_message(), reader.read_message()]
    assert seen[0].name == ".reply" and seen[0].msgid == load_id
    data, start, end = seen[0].args
    assert (start, end) == (first, None)
    assert seen[1].name == "invalidateTransaction"
    assert seen[1].args == (second, [ROOT])


def test_register_racing_a_commit_loses_no_invalidation(server):
    """Rule 6: a client registering while a commit publishes either gets
    the new tid from register or the commit's invalidation."""
    writer = connect(server)
    first = commit(writer, 1, [(ROOT, z64, 1)])
    storage = server.storages["1"].storage
    finishing = threading.Event()
    may_finish = threading.Event()
    real_finish = storage.tpc_finish

    def paused_finish(transaction, callback=None):
        finishing.set()
        assert may_finish.wait(10)
        return real_finish(transaction, callback)

    storage.tpc_finish = paused_finish
    begin_and_store(writer, 2, [(ROOT, first, 2)])
    writer.call("vote", 2)
    writer.send_message(7, False, "tpc_finish", (2,))
    assert finishing.wait(10)

    newcomer = RawClient(server.address)
    newcomer.handshake()
    newcomer.send_message(1, False, "register", ("1", False))
    with pytest.raises(TimeoutError):
        newcomer.read_message(timeout=0.5)
    may_finish.set()
    second = messages_until_reply(writer, 7)[-1].args
    registered = newcomer.read_message()
    assert registered.msgid == 1
    assert registered.args == second
    newcomer.call("ping")
    assert newcomer.server_calls == []  # nothing older than register's tid


def test_waiting_voter_keeps_loading_and_sees_winner_first(server):
    """Rules 4 and 9 (and 3.9): a parked vote does not block the voter's
    loads, and its reply follows the winner's invalidation."""
    first_client = connect(server)
    base = commit(first_client, 1, [(ROOT, z64, 1)])
    second_client = connect(server)

    begin_and_store(first_client, 2, [(ROOT, base, 2)])
    assert first_client.call("vote", 2) == []  # holds the commit lock

    begin_and_store(second_client, 3, [(ROOT, base, 3)])
    second_client.send_message(50, False, "vote", (3,))
    # Parked, yet the same connection is served:
    data, start, end = second_client.call("loadBefore", ROOT, maxtid)
    assert (start, end) == (base, None)
    assert second_client.call("lastTransaction") == base
    assert server.storages["1"].status("stub")["waiting"] == 1

    winner = first_client.call("tpc_finish", 2)
    seen = messages_until_reply(second_client, 50)
    assert [m.name for m in seen] == ["invalidateTransaction", ".reply"]
    assert seen[0].args == (winner, [ROOT])
    class_name, payload = seen[1].args
    assert seen[1].flag == 2
    assert class_name == "ZODB.POSException.ConflictError"
    assert payload["serials"] == (winner, base)
    assert second_client.call("tpc_abort", 3) is None
    status = server.storages["1"].status("stub")
    assert (status["conflicts"], status["waiting"]) == (1, 0)
    assert status["lock_time"] is None


def session_labelled(server, client, label):
    """The server's session of `client`, found by a label it sets."""
    client.call("set_client_label", label)
    sessions = server.storages["1"].sessions
    return next(session for session in sessions
                if session.channel.label.startswith(label))


def hold_loads_of(server, client, label):
    """Hold each load of `client` (labelled `label` here) between its
    storage read and its reply until released; returns the events
    (read, release)."""
    read = threading.Event()
    release = threading.Event()
    session_labelled(server, client, label)

    def hold(session, oid):
        if session.channel.label.startswith(label):
            read.set()
            assert release.wait(10)

    server.storages["1"].after_load_read = hold
    return read, release


def pause_fanout_at(session):
    """Make the fan-out thread stop at `session` until released; returns
    the events (reached, release)."""
    reached = threading.Event()
    release = threading.Event()
    send_queued = session.send_queued

    def paused():
        reached.set()
        assert release.wait(20)
        send_queued()

    session.send_queued = paused
    return reached, release


def test_next_voter_gets_the_lock_before_invalidations_are_sent(server):
    """Rule 2 asks for the invalidations to be published under the commit
    lock, not sent: the lock goes to the next voter at once, and a fan-out
    held up at a bystander does not hold up commits."""
    winner = connect(server)
    base = commit(winner, 1, [(ROOT, z64, 1)])
    voter = connect(server)
    bystander = connect(server)
    sending, may_send = pause_fanout_at(
        session_labelled(server, bystander, "bystander"))
    try:
        begin_and_store(winner, 2, [(ROOT, base, 2)])
        assert winner.call("vote", 2) == []
        begin_and_store(voter, 3, [(OTHER, z64, 3)])
        voter.send_message(30, False, "vote", (3,))
        winner.send_message(20, False, "tpc_finish", (2,))
        assert sending.wait(10)
        # The bystander's send is stuck, yet the voter has the lock.
        seen = messages_until_reply(voter, 30, timeout=5)
        assert [m.name for m in seen] == ["invalidateTransaction", ".reply"]
        assert seen[1].args == []
        with pytest.raises(TimeoutError):
            bystander.read_message(timeout=0.3)
    finally:
        may_send.set()
    second = messages_until_reply(winner, 20)[-1].args
    assert seen[0].args == (second, [ROOT])
    message = bystander.read_message()
    assert (message.name, message.args) == ("invalidateTransaction",
                                            (second, [ROOT]))
    third = voter.call("tpc_finish", 3)
    message = bystander.read_message()
    assert (message.name, message.args) == ("invalidateTransaction",
                                            (third, [OTHER]))


def test_a_commit_reply_leaves_before_a_later_commits_invalidation(server):
    """Rule 5 against rule 2: the committer's tpc_finish reply is queued
    before the commit lock is free, so no later commit's invalidation,
    which its outbox would take first, can overtake it (a ZEO client
    then refuses its own commit's tid as older than one it has seen)."""
    committer = connect(server)
    base = commit(committer, 1, [(ROOT, z64, 1)])
    connection = session_labelled(server, committer, "committer").channel
    queueing = threading.Event()
    may_queue = threading.Event()
    queue_reply = connection._queue_reply

    def paused_queue_reply(msgid, outcome):
        if msgid == 40:
            queueing.set()
            assert may_queue.wait(10)
        queue_reply(msgid, outcome)

    connection._queue_reply = paused_queue_reply
    other = connect(server)
    begin_and_store(committer, 2, [(ROOT, base, 2)])
    assert committer.call("vote", 2) == []
    committer.send_message(40, False, "tpc_finish", (2,))
    assert queueing.wait(10)
    # Between the commit and its reply: the next commit must wait.
    begin_and_store(other, 3, [(OTHER, z64, 3)])
    other.send_message(41, False, "vote", (3,))
    published = other.read_message()
    assert published.name == "invalidateTransaction"
    with pytest.raises(TimeoutError):
        other.read_message(timeout=0.5)  # no vote reply
    may_queue.set()
    seen = messages_until_reply(committer, 40)
    assert [m.name for m in seen] == ["info", ".reply"]
    own = seen[-1].args
    assert other.call("tpc_finish", 3) > own
    message = committer.read_message()
    assert message.name == "invalidateTransaction"
    assert message.args[0] > own


def test_one_commit_invalidates_clients_of_both_encodings(server):
    """A broadcast is encoded once per encoding, not once per client:
    each client still gets it in its own."""
    writer = connect(server)
    readers = [connect(server, protocol) for protocol
               in (wire.PICKLE_PROTOCOL, wire.MSGPACK_PROTOCOL) * 2]
    tid = commit(writer, 1, [(ROOT, z64, 1), (OTHER, z64, 2)])
    for reader in readers:
        message = reader.read_message()
        assert message.name == "invalidateTransaction"
        assert message.args[0] == tid
        assert sorted(message.args[1]) == [ROOT, OTHER]


def test_committer_gets_info_then_reply_and_no_invalidation(server):
    """Rule 5."""
    client = connect(server)
    client.server_calls.clear()
    begin_and_store(client, 1, [(ROOT, z64, 1)])
    client.call("vote", 1)
    client.send_message(9, False, "tpc_finish", (1,))
    seen = messages_until_reply(client, 9)
    assert [m.name for m in seen] == ["info", ".reply"]
    assert set(seen[0].args[0]) == {"length", "size"}
    assert seen[0].args[0]["length"] == 1


def test_disconnect_while_holding_the_lock_hands_it_on(server):
    holder = connect(server)
    base = commit(holder, 1, [(ROOT, z64, 1)])
    waiter = connect(server)
    begin_and_store(holder, 2, [(OTHER, z64, 5)])
    holder.call("vote", 2)
    begin_and_store(waiter, 3, [(ROOT, base, 2)])
    waiter.send_message(11, False, "vote", (3,))
    holder.close()
    assert messages_until_reply(waiter, 11)[-1].args == []
    tid = waiter.call("tpc_finish", 3)
    assert waiter.call("loadBefore", ROOT, maxtid)[1] == tid
    with pytest.raises(RemoteError) as missing:
        waiter.call("loadBefore", OTHER, maxtid)
    assert missing.value.class_name == "ZODB.POSException.POSKeyError"
    status = server.storages["1"].status("stub")
    assert status["aborts"] == 1 and status["active_txns"] == 0


def test_watchdog_aborts_releases_and_disconnects(make_server):
    server = make_server(transaction_timeout=1)
    stuck = connect(server)
    base = commit(stuck, 1, [(ROOT, z64, 1)])
    other = connect(server)
    begin_and_store(stuck, 2, [(ROOT, base, 2)])
    before_lock = time.monotonic()
    stuck.call("vote", 2)  # and never finishes
    begin_and_store(other, 3, [(ROOT, base, 3)])
    assert other.call("vote", 3, timeout=15) == []
    assert 0.95 <= time.monotonic() - before_lock < 10
    assert stuck.is_closed(5)
    tid = other.call("tpc_finish", 3)
    assert other.call("loadBefore", ROOT, maxtid)[1] == tid
    # The client sees the close before the server's connection thread has
    # finished cleaning up: wait for it.
    served = server.storages["1"]
    wait_until(lambda: served.status("stub")["connections"] == 1,
               "the stuck connection is gone", 10)
    assert served.status("stub")["aborts"] == 1


def test_client_that_never_reads_is_dropped_without_stalling_others(
        make_server):
    server = make_server(outbox_limit=256 * 1024)
    writer = connect(server)
    commit(writer, 1, [(ROOT, z64, "x" * 100000)])
    hog = connect(server)
    # 40 MB of replies: far more than the kernel's socket buffers hold.
    for msgid in range(1, 400):
        try:
            hog.send_message(msgid, False, "loadBefore", (ROOT, maxtid))
        except OSError:
            break
    # Commits (of another object: the hog's replies stay big) and their
    # invalidation broadcasts go on meanwhile.
    serial = z64
    for txn_id in range(2, 6):
        serial = commit(writer, txn_id, [(OTHER, serial, txn_id)])
    deadline = time.monotonic() + 10
    while server.storages["1"].status("stub")["connections"] > 1:
        assert time.monotonic() < deadline, "the hog was never dropped"
        time.sleep(0.05)


# --- the outbox on its own ---------------------------------------------------

def read_frames(sock, count, timeout=20):
    from zeo.wire import FrameReader
    reader = FrameReader()
    frames = []
    sock.settimeout(timeout)
    while len(frames) < count:
        data = sock.recv(1 << 16)
        if not data:
            break
        frames.extend(reader.feed(data))
    return frames


def test_outbox_keeps_put_order_through_partial_sends_and_its_writer():
    """Frames put by several threads leave in put order, each thread's in
    its own order, whether the putting thread, another one or the writer
    sends them, and however the socket splits them."""
    import socket

    from zeo.rpc import Outbox
    from zeo.wire import frame

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outbox = Outbox(ours, "test")
    per_thread = 400

    def put_many(number):
        for index in range(per_thread):
            body = b"%d:%d:" % (number, index) + b"x" * (index * 37 % 3000)
            outbox.put(frame(body), wake_writer=index % 3 == 0)
            if index % 2:
                outbox.send_pending()

    threads = [threading.Thread(target=put_many, args=(number,))
               for number in range(3)]
    for thread in threads:
        thread.start()
    received = read_frames(theirs, 3 * per_thread)
    for thread in threads:
        thread.join()
    assert len(received) == 3 * per_thread
    for number in range(3):
        indexes = [int(body.split(b":")[1]) for body in received
                   if body.startswith(b"%d:" % number)]
        assert indexes == list(range(per_thread))
    # The sender counts its batch until it takes the lock again, after
    # the peer may have read it.
    wait_until(lambda: outbox.pending == 0, "the outbox is empty", 5)
    started = time.monotonic()
    outbox.close()
    assert time.monotonic() - started < 4
    ours.close()
    theirs.close()


def test_outbox_close_during_a_drain_does_not_wait_for_the_timeout():
    import socket

    from zeo.rpc import Outbox
    from zeo.wire import frame

    ours, theirs = socket.socketpair()
    outbox = Outbox(ours, "test")
    outbox.put(frame(b"one"), wake_writer=False)
    real_sock = outbox._sock

    class SlowSocket:
        """Lets close() run while send_pending owns the queue."""

        def sendmsg(self, *args):
            closer = threading.Thread(target=outbox.close)
            closer.start()
            time.sleep(0.2)
            self.closer = closer
            return real_sock.sendmsg(*args)

    slow = outbox._sock = SlowSocket()
    outbox.send_pending()
    started = time.monotonic()
    slow.closer.join(10)
    assert time.monotonic() - started < 3
    assert read_frames(theirs, 1) == [b"one"]
    ours.close()
    theirs.close()
