"""The publication lock: reads share it, publishing excludes them
(zeo/server/publication.py), in isolation and in a real server."""

import threading

import pytest
from ZODB.utils import maxtid, p64, z64

from test_ordering import begin_and_store, commit, connect, hold_loads_of
from zeo.server.free_threading import gil_enabled
from zeo.server.publication import PublicationLock, new_lock, read_side

pytestmark = pytest.mark.timeout(60)

WAIT = 10


def in_thread(function, name):
    """Run `function` in a named daemon thread; return (thread, done)."""
    done = threading.Event()

    def run():
        function()
        done.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, done


def test_readers_share_the_lock():
    lock = PublicationLock()
    with lock.shared:
        _thread, done = in_thread(lambda: lock.shared.__enter__(),
                                  "test-second-reader")
        assert done.wait(WAIT)
        assert lock.readers == 2
        lock.release_shared()  # the second reader's, from here
    assert lock.readers == 0


def test_a_writer_waits_for_readers_and_keeps_new_ones_out():
    lock = PublicationLock()
    order = []
    lock.acquire_shared()

    def write():
        with lock:
            order.append("writer")

    def read():
        with lock.shared:
            order.append("late reader")

    _writer, written = in_thread(write, "test-writer")
    assert not written.wait(0.2)  # the reader holds it
    while not lock._writers_waiting:
        threading.Event().wait(0.001)
    _reader, read_done = in_thread(read, "test-late-reader")
    assert not read_done.wait(0.2)  # a writer waits: no new reader
    lock.release_shared()
    assert written.wait(WAIT) and read_done.wait(WAIT)
    assert order == ["writer", "late reader"]


def test_the_writer_may_reenter_and_read():
    lock = PublicationLock()
    with lock:
        with lock:
            with lock.shared:
                assert lock.readers == 1
        _thread, done = in_thread(lambda: lock.shared.__enter__(),
                                  "test-excluded-reader")
        assert not done.wait(0.2)  # still held: the outer `with`
    assert done.wait(WAIT)
    lock.release_shared()


def test_a_writer_that_fails_while_waiting_leaves_no_trace():
    lock = PublicationLock()
    lock.acquire_shared()
    failures = []

    def write():
        try:
            with lock:
                pass
        except KeyboardInterrupt as error:  # raised in wait() below
            failures.append(error)

    original_wait = lock._changed.wait

    def interrupted_wait(timeout=None):
        raise KeyboardInterrupt("interrupted")

    lock._changed.wait = interrupted_wait
    thread, _done = in_thread(write, "test-interrupted-writer")
    thread.join(WAIT)
    lock._changed.wait = original_wait
    assert len(failures) == 1 and lock._writers_waiting == 0
    lock.release_shared()
    with lock:  # free again
        pass


def test_the_server_takes_the_shared_side_only_without_the_gil():
    lock = new_lock()
    if gil_enabled():
        assert read_side(lock) is lock
        assert type(lock) is type(threading.RLock())
    else:
        assert read_side(lock) is lock.shared


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.mark.skipif(gil_enabled(), reason="with the GIL, reads hold the "
                    "plain lock whole (zeo.server.publication.new_lock)")
def test_loads_of_two_clients_run_at_once_and_a_commit_waits_for_both(
        server):
    """One client's load is held between its read and its reply: another
    client's load is answered meanwhile (reads share the lock), while a
    commit's finish waits until the held load's reply is queued."""
    writer = connect(server)
    first = commit(writer, 1, [(z64, z64, 1)])
    held, other = connect(server), connect(server)
    reading, may_reply = hold_loads_of(server, held, "held")
    held.send_message(1, False, "loadBefore", (z64, maxtid))
    assert reading.wait(WAIT)
    _data, start, _end = other.call("loadBefore", z64, maxtid)
    assert start == first

    begin_and_store(writer, 2, [(z64, first, 2)])
    assert writer.call("vote", 2) == []
    writer.send_message(9, False, "tpc_finish", (2,))
    with pytest.raises(TimeoutError):
        writer.read_message(timeout=0.5)
    may_reply.set()
    reply = held.read_message(WAIT)
    assert (reply.msgid, reply.args[1]) == (1, first)
    second = [message for message in
              (writer.read_message(WAIT) for _ in range(2))
              if message.name == ".reply"][0].args
    assert second > first
    invalidation = held.read_message(WAIT)
    assert invalidation.args == (second, [z64])
    assert other.call("loadBefore", p64(0), maxtid)[1] == second
