"""Concurrency: the connection's reader thread, threads and processes.

A scripted server (a socket driven by the test) checks what the reading
promises: replies matched by msgid, duplicate loads sharing one request,
invalidations applied in wire order before the caller of a later reply
wakes, the heartbeat, refused greetings; and who reads: a lone caller
reads its own reply, a leading caller applies everything that arrives
meanwhile in wire order, the reader thread takes over when the leader
leaves, and an interrupted leader ends the connection rather than lose a
message.

Then many threads and processes share a database.  Money moves between
accounts in random transactions; the total never changes.  Every read
transaction sums all accounts and must see the total: a reader that saw
half of a transfer (an inconsistent snapshot) or a writer whose update
was lost would break the sum.  A resolvable counter
(`BTrees.Length`) counts the transfers: a lost update shows as a count
below the number of commits the writers reported.
"""

import random
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

from ZODB.utils import p64

from conftest import CLIENT_TIMEOUT, server_environment, wait_until
from server_process import OURS, THEIRS, start_configured_server
from zeo import wire
from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected, ServerException
from zeo.client import manager
from zeo.client.connection import Connection

pytestmark = pytest.mark.timeout(60)


# -- a scripted server --------------------------------------------------------

class ScriptedServer:
    """A listening socket the test drives: it greets, registers, answers
    get_info, and hands every other message to the test."""

    def __init__(self, greeting=wire.PICKLE_PROTOCOL):
        self.greeting = greeting
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.messages = []
        self.arrived = threading.Condition()
        self.sock = None
        self.codec = None
        self.handshake = None
        self.thread = threading.Thread(target=self._serve,
                                       name="scripted-server", daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock, _peer = self.listener.accept()
        self.sock.sendall(wire.frame(self.greeting))
        reader = wire.FrameReader()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for payload in reader.feed(data):
                if self.handshake is None:
                    self.handshake = payload
                    self.codec = wire.codec_for(payload)
                    continue
                self._handle(self.codec.decode(payload))

    answers_register = True

    def _handle(self, message):
        if message.name == "register" and self.answers_register:
            self.reply(message.msgid, p64(100))
        elif message.name == "get_info":
            self.reply(message.msgid, {"length": 0, "size": 0,
                                       "interfaces": ()})
        else:
            with self.arrived:
                self.messages.append(message)
                self.arrived.notify_all()

    def wait_for(self, name, count=1, timeout=10):
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(
                [m for m in self.messages if m.name == name]) >= count,
                timeout)
            return [m for m in self.messages if m.name == name]

    def send(self, msgid, flag, name, args):
        self.sock.sendall(wire.frame(self.codec.encode(msgid, flag, name,
                                                       args)))

    def reply(self, msgid, value):
        self.send(msgid, wire.REPLY, wire.REPLY_NAME, value)

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def scripted():
    servers_ = []

    def start(**options):
        server = ScriptedServer(**options)
        servers_.append(server)
        return server

    yield start
    for server in servers_:
        server.close()


class Recorder:
    """A connection handler that records the server's one-way calls."""

    def __init__(self):
        self.calls = []

    def invalidateTransaction(self, tid, oids):
        self.calls.append(("invalidateTransaction", tid, list(oids)))

    def info(self, info):
        self.calls.append(("info", info))


def test_duplicate_loads_share_one_request(scripted):
    server = scripted()
    connection = Connection.open(server.address, Recorder(), lambda c: None,
                                 5)
    try:
        oid, tid = p64(7), p64(50)
        first = connection.load_before(oid, tid)
        second = connection.load_before(oid, tid)
        (request,) = server.wait_for("loadBefore")
        assert request.msgid == (oid, tid) and request.args == (oid, tid)
        server.reply((oid, tid), (b"data", p64(40), None))
        assert first.wait() == second.wait() == (b"data", p64(40), None)
        assert len(server.wait_for("loadBefore")) == 1
    finally:
        connection.close()


@pytest.mark.parametrize("greeting", [wire.PICKLE_PROTOCOL,
                                      wire.MSGPACK_PROTOCOL])
def test_invalidation_is_applied_before_the_next_reply(scripted, clients,
                                                       greeting):
    server = scripted(greeting=greeting)
    storage = clients(server.address)
    assert server.codec.protocol == greeting  # we answered in kind
    oid = p64(1)
    loader = threading.Thread(target=storage.loadBefore,
                              args=(oid, p64(101)), name="test-loader")
    loader.start()
    (request,) = server.wait_for("loadBefore")
    server.reply(request.msgid, (b"old", p64(90), None))
    loader.join(5)
    assert storage.loadBefore(oid, p64(101)) == (b"old", p64(90), None)
    server.send(0, wire.ONEWAY, "invalidateTransaction", (p64(110), [oid]))
    pinger = threading.Thread(target=storage.server_status,
                              name="test-pinger")
    pinger.start()
    (status,) = server.wait_for("server_status")
    server.reply(status.msgid, {})
    pinger.join(5)
    assert storage.lastTransaction() == p64(110)
    assert storage.loadBefore(oid, p64(101)) == (b"old", p64(90), p64(110))
    loader = threading.Thread(target=storage.loadBefore,
                              args=(oid, p64(111)), name="test-loader-2")
    loader.start()
    requests = server.wait_for("loadBefore", 2)  # a miss: asks the server
    assert requests[1].args == (oid, p64(111))
    server.reply(requests[1].msgid, (b"new", p64(110), None))
    loader.join(5)


def test_heartbeat_is_sent(scripted, clients, monkeypatch):
    monkeypatch.setattr(manager, "HEARTBEAT_INTERVAL", 0.1)
    server = scripted()
    clients(server.address)
    (beat,) = server.wait_for(wire.REPLY_NAME)[:1]
    assert (beat.msgid, beat.flag, beat.args) == (-1, 0, None)


def test_silent_server_does_not_hang_the_constructor(scripted):
    """A server that greets but never answers `register` is given up on
    after wait_timeout, not waited for forever."""
    server = scripted()
    server.answers_register = False
    with pytest.raises(ClientDisconnected) as caught:
        ClientStorage(server.address, wait_timeout=0.5,
                      min_disconnect_poll=1, max_disconnect_poll=1)
    assert "register" in str(caught.value)
    assert [m.name for m in server.wait_for("register")] == ["register"]


@pytest.mark.parametrize("greeting", [b"Z4", b"X5", b"ruok"])
def test_unsupported_greetings_are_refused(scripted, greeting):
    server = scripted(greeting=greeting)
    with pytest.raises(ClientDisconnected):
        ClientStorage(server.address, wait_timeout=0.5,
                      min_disconnect_poll=1, max_disconnect_poll=1)
    server.thread.join(5)
    assert not server.thread.is_alive()  # the client hung up...
    assert server.handshake is None  # ...without answering the greeting


def test_unknown_remote_exception_class(scripted, clients):
    server = scripted()
    storage = clients(server.address)
    caller = []
    thread = threading.Thread(
        target=lambda: caller.append(_outcome(storage.getTid, p64(1))),
        name="test-caller")
    thread.start()
    (request,) = server.wait_for("getTid")
    server.send(request.msgid, wire.ERROR_REPLY, wire.REPLY_NAME,
                ("some.module.Boom", ("bang",)))
    thread.join(5)
    (error,) = caller
    assert isinstance(error, ServerException)
    assert error.args == ("some.module.Boom", ("bang",))
    assert storage.is_connected()


def _outcome(function, *args):
    try:
        return function(*args)
    except Exception as error:
        return error


# -- who reads: leading callers and the reader thread ------------------------

leading = pytest.mark.skipif(not hasattr(select, "epoll"),
                             reason="callers lead only with epoll")


class ThreadRecorder:
    """Records each event with the name of the thread it ran on."""

    def __init__(self):
        self.events = []

    def invalidateTransaction(self, tid, oids):
        self.events.append(("invalidated", threading.current_thread().name))

    def info(self, info):
        self.events.append(("info", threading.current_thread().name))

    def apply(self, what):
        return lambda result: self.events.append(
            (what, threading.current_thread().name))


def start_call(connection, name, method, *args, apply=None):
    """Call `method` on a new thread `name`; returns the thread and a list
    that receives the result (or the exception)."""
    outcome = []

    def call():
        try:
            outcome.append(connection.call(method, *args, apply=apply))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=call, name=name)
    thread.start()
    return thread, outcome


@pytest.fixture
def raw_connection(scripted):
    """A bare `Connection` to a scripted server, invalidations released."""
    server = scripted()
    recorder = ThreadRecorder()
    closed = threading.Event()
    connection = Connection.open(server.address, recorder,
                                 lambda connection: closed.set(), 5)
    connection.release(p64(0))
    yield server, connection, recorder, closed
    connection.close()


def wait_until_leading(connection):
    wait_until(connection._read_lock.locked, "a caller reads", 5)


def lead_attempt_made(connection, thread_name):
    """An event set once the caller on `thread_name` has tried to take
    the reading role: from then on it only waits to be woken."""
    made = threading.Event()
    lead = connection._lead

    def lead_and_tell(waiter):
        try:
            lead(waiter)
        finally:
            if threading.current_thread().name == thread_name:
                made.set()

    connection._lead = lead_and_tell
    return made


@leading
def test_a_lone_caller_reads_its_own_reply(raw_connection):
    server, connection, recorder, _closed = raw_connection
    thread, outcome = start_call(connection, "test-caller", "getTid", p64(1),
                                 apply=recorder.apply("reply"))
    (request,) = server.wait_for("getTid")
    wait_until_leading(connection)
    server.reply(request.msgid, p64(5))
    thread.join(5)
    assert outcome == [p64(5)]
    assert recorder.events == [("reply", "test-caller")]


@leading
def test_the_leader_applies_what_arrives_in_wire_order(raw_connection):
    """A caller waits for a slow reply (a vote parked on the commit lock);
    another caller's reply and an invalidation arrive meanwhile: the
    leader applies both, in the order they came, and the other caller
    wakes with its result while the leader goes on waiting."""
    server, connection, recorder, _closed = raw_connection
    voter, voted = start_call(connection, "test-voter", "vote", 1,
                              apply=recorder.apply("vote"))
    (vote,) = server.wait_for("vote")
    wait_until_leading(connection)
    loader, loaded = start_call(connection, "test-loader", "getTid", p64(1),
                                apply=recorder.apply("getTid"))
    (request,) = server.wait_for("getTid")
    server.send(0, wire.ONEWAY, "invalidateTransaction", (p64(9), [p64(1)]))
    server.reply(request.msgid, p64(9))
    loader.join(5)
    assert loaded == [p64(9)] and voter.is_alive()
    assert recorder.events == [("invalidated", "test-voter"),
                               ("getTid", "test-voter")]
    server.reply(vote.msgid, [])
    voter.join(5)
    assert voted == [[]]
    assert recorder.events[-1] == ("vote", "test-voter")


@leading
def test_the_reader_thread_takes_over_when_the_leader_leaves(raw_connection):
    """A caller that found the role taken sleeps; once the leader has its
    reply and leaves, the reader thread reads for the sleeper.  (A caller
    that comes after the leader left would lead itself: the test waits
    until the second caller has tried.)"""
    server, connection, recorder, _closed = raw_connection
    first, first_outcome = start_call(connection, "test-first", "vote", 1)
    (vote,) = server.wait_for("vote")
    wait_until_leading(connection)
    second_tried = lead_attempt_made(connection, "test-second")
    second, second_outcome = start_call(connection, "test-second", "getTid",
                                        p64(1), apply=recorder.apply("late"))
    (request,) = server.wait_for("getTid")
    assert second_tried.wait(5)
    server.reply(vote.msgid, [])
    first.join(5)
    assert first_outcome == [[]] and second.is_alive()
    server.send(0, wire.ONEWAY, "info", ({"length": 1},))
    server.reply(request.msgid, p64(3))
    second.join(5)
    assert second_outcome == [p64(3)]
    reader = connection._thread.name
    assert recorder.events == [("info", reader), ("late", reader)]


def test_without_epoll_the_reader_thread_reads(scripted, monkeypatch):
    monkeypatch.delattr(select, "epoll", raising=False)
    server = scripted()
    recorder = ThreadRecorder()
    connection = Connection.open(server.address, recorder, lambda c: None, 5)
    try:
        thread, outcome = start_call(connection, "test-caller", "getTid",
                                     p64(1), apply=recorder.apply("reply"))
        (request,) = server.wait_for("getTid")
        server.reply(request.msgid, p64(5))
        thread.join(5)
        assert outcome == [p64(5)]
        assert recorder.events == [("reply", connection._thread.name)]
    finally:
        connection.close()
    assert not connection._thread.is_alive()


class Interrupt(BaseException):
    """Stands for a KeyboardInterrupt raised in a leading caller."""


@leading
def test_an_interrupted_leader_ends_the_connection(raw_connection):
    """Interrupted while applying what it read, a leader cannot tell what
    it left undone: the connection ends (and a reconnection verifies the
    cache) instead of losing a message."""
    server, connection, _recorder, closed = raw_connection

    def interrupted(result):
        raise Interrupt()

    thread, outcome = start_call(connection, "test-caller", "getTid", p64(1),
                                 apply=interrupted)
    (request,) = server.wait_for("getTid")
    wait_until_leading(connection)
    server.reply(request.msgid, p64(5))
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupt)
    assert closed.wait(5)
    with pytest.raises(ClientDisconnected):
        connection.call("getTid", p64(1))


@leading
def test_garbage_read_by_a_leader_ends_the_connection(raw_connection):
    server, connection, _recorder, closed = raw_connection
    thread, outcome = start_call(connection, "test-caller", "getTid", p64(1))
    server.wait_for("getTid")
    wait_until_leading(connection)
    server.sock.sendall(wire.frame(b"not a pickle"))
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)
    assert "protocol error" in str(outcome[0])
    assert closed.wait(5)


@leading
def test_closing_wakes_a_leader_and_stops_the_reader(raw_connection):
    server, connection, _recorder, closed = raw_connection
    thread, outcome = start_call(connection, "test-voter", "vote", 1)
    server.wait_for("vote")
    wait_until_leading(connection)
    connection.close()
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)
    assert closed.is_set() and not connection._thread.is_alive()


# -- a lone leader polls before it sleeps -----------------------------------

def running_samples(thread, samples=20, interval=0.01):
    """How many of `samples` looks at `thread` (Linux: /proc) found it
    running or runnable.  A polling thread is runnable even when it has
    yielded the processor (to a busy machine's other processes, say); a
    thread asleep in `recv` never is."""
    path = "/proc/self/task/%d/stat" % thread.native_id
    running = 0
    for _ in range(samples):
        with open(path) as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        running += state == "R"
        time.sleep(interval)
    return running


#: Of 20 looks at a polling caller, at least this many find it runnable
#: (it may wait for the GIL now and then); of 20 looks at a sleeping one,
#: at most ASLEEP may still catch it on its way into `recv`.
POLLING = 10
ASLEEP = 2


@pytest.fixture
def polling_connection(scripted):
    """Open a bare `Connection` to a scripted server with a given busy-poll
    window (microseconds)."""
    opened = []

    def open_(busy_poll):
        server = scripted()
        connection = Connection.open(server.address, ThreadRecorder(),
                                     lambda connection: None, 5, busy_poll)
        opened.append(connection)
        # One call first, then wait for the reading role to be free: the
        # reader thread has started, and sleeps until there is something
        # to read, so the next caller leads.
        caller, outcome = start_call(connection, "test-warm-up", "ping")
        server.reply(server.wait_for("ping")[0].msgid, None)
        caller.join(5)
        assert outcome == [None]
        wait_until(lambda: not connection._read_lock.locked(),
                   "nobody reads", 5)
        return server, connection

    yield open_
    for connection in opened:
        connection.close()


def call_and_wait(server, connection, count):
    """Start the `count`th getTid call; return its thread, its outcome
    list and its request once the server has it."""
    caller, outcome = start_call(connection, "test-caller", "getTid",
                                 p64(count))
    request = server.wait_for("getTid", count)[-1]
    return caller, outcome, request


def answer(server, caller, outcome, request, value):
    server.reply(request.msgid, value)
    caller.join(5)
    assert outcome == [value]


def assert_waits(server, connection, count, polling):
    """The `count`th getTid call's caller waits polling (or, with `polling`
    false, asleep) until it gets its reply, answered then."""
    caller, outcome, request = call_and_wait(server, connection, count)
    if polling:
        assert running_samples(caller) >= POLLING
    else:
        assert running_samples(caller) <= ASLEEP
    answer(server, caller, outcome, request, p64(count))


@leading
def test_a_lone_leader_polls_for_its_reply(polling_connection):
    server, connection = polling_connection(busy_poll=10_000_000)
    assert_waits(server, connection, 1, polling=True)


@leading
def test_a_leader_sleeps_after_the_window_and_then_stops_polling(
        polling_connection):
    server, connection = polling_connection(busy_poll=1_000_000)
    caller, outcome, request = call_and_wait(server, connection, 1)
    assert running_samples(caller) >= POLLING  # within the window: polling
    time.sleep(1.0)
    assert running_samples(caller) <= ASLEEP  # past it: asleep
    answer(server, caller, outcome, request, p64(1))
    # That reply took longer than the window: the next wait sleeps at once.
    assert_waits(server, connection, 2, polling=False)
    # That one came within the window: the next wait polls again.
    assert_waits(server, connection, 3, polling=True)


@leading
def test_a_leader_stops_polling_when_another_caller_waits(
        polling_connection):
    server, connection = polling_connection(busy_poll=10_000_000)
    first, first_outcome = start_call(connection, "test-first", "vote", 1)
    (vote,) = server.wait_for("vote")
    wait_until_leading(connection)
    second, second_outcome = start_call(connection, "test-second", "getTid",
                                        p64(1))
    (request,) = server.wait_for("getTid")
    time.sleep(0.1)
    assert running_samples(first) <= ASLEEP
    server.reply(request.msgid, p64(7))
    server.reply(vote.msgid, [])
    first.join(5)
    second.join(5)
    assert (first_outcome, second_outcome) == ([[]], [p64(7)])


@leading
def test_the_server_hanging_up_ends_a_polling_wait(polling_connection):
    server, connection = polling_connection(busy_poll=10_000_000)
    caller, outcome, _request = call_and_wait(server, connection, 1)
    server.sock.shutdown(socket.SHUT_RDWR)
    caller.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)


# -- many threads, many processes ------------------------------------------

ACCOUNTS = 10
INITIAL_BALANCE = 100
TOTAL = ACCOUNTS * INITIAL_BALANCE
THREADS = 20
OPERATIONS_PER_THREAD = 12
MAX_ATTEMPTS = 100


@pytest.fixture
def server(request, tmp_path):
    impl = getattr(request, "param", OURS)
    storages = {"1": "<filestorage 1>\n  path %s\n</filestorage>"
                % (tmp_path / "Data.fs")}
    process = start_configured_server(str(tmp_path), "", storages, impl=impl,
                                      env=server_environment())
    yield process
    status = process.stop()
    print("---- log of %s server (pid %d) ----\n%s"
          % (process.impl, process.process.pid, process.log))
    assert status == 0


def create_accounts(database):
    manager = transaction.TransactionManager()
    connection = database.open(transaction_manager=manager)
    root = connection.root()
    root["accounts"] = [PersistentMapping(balance=INITIAL_BALANCE)
                        for _ in range(ACCOUNTS)]
    root["transfers"] = Length()
    manager.commit()
    connection.close()


def work(database, seed, operations):
    """Transfer or audit `operations` times; return (transfers, audits,
    violations)."""
    rng = random.Random(seed)
    manager = transaction.TransactionManager()
    connection = database.open(transaction_manager=manager)
    transfers = audits = 0
    violations = []
    try:
        for _ in range(operations):
            if rng.random() < 0.5:
                transfers += transfer(connection, manager, rng)
            else:
                manager.begin()
                accounts = connection.root()["accounts"]
                total = sum(account["balance"] for account in accounts)
                manager.abort()
                audits += 1
                if total != TOTAL:
                    violations.append(total)
    finally:
        connection.close()
    return transfers, audits, violations


def transfer(connection, manager, rng):
    """Move a random amount between two random accounts; 1 if committed."""
    for _ in range(MAX_ATTEMPTS):
        manager.begin()
        accounts = connection.root()["accounts"]
        source, target = rng.sample(range(ACCOUNTS), 2)
        amount = rng.randint(1, 20)
        accounts[source]["balance"] -= amount
        accounts[target]["balance"] += amount
        connection.root()["transfers"].change(1)
        try:
            manager.commit()
            return 1
        except ConflictError:
            manager.abort()
    raise AssertionError("no transfer committed in %d attempts"
                         % MAX_ATTEMPTS)


def final_state(database):
    manager = transaction.TransactionManager()
    connection = database.open(transaction_manager=manager)
    root = connection.root()
    state = (sum(a["balance"] for a in root["accounts"]), root["transfers"]())
    connection.close()
    return state


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cache_size", [20 * 2 ** 20, 1],
                         ids=["cached", "uncached"])
@pytest.mark.parametrize("server", [OURS, THEIRS], indirect=True)
def test_threads_sharing_one_client_storage(server, cache_size):
    database = ZODB.DB(ClientStorage(server.address, cache_size=cache_size,
                                     wait_timeout=CLIENT_TIMEOUT),
                       pool_size=THREADS)
    try:
        create_accounts(database)
        results = [None] * THREADS

        def run(number):
            results[number] = work(database, number, OPERATIONS_PER_THREAD)

        threads = [threading.Thread(target=run, args=(number,),
                                    name="test-worker-%d" % number)
                   for number in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        assert not any(thread.is_alive() for thread in threads)
        assert None not in results
        transfers = sum(result[0] for result in results)
        audits = sum(result[1] for result in results)
        violations = [v for result in results for v in result[2]]
        assert violations == []
        assert transfers + audits == THREADS * OPERATIONS_PER_THREAD
        assert transfers > 0 and audits > 0
        assert final_state(database) == (TOTAL, transfers)
    finally:
        database.close()


WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    import zeo
    import test_client_concurrency as scenario
    host, port, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    database = zeo.DB((host, port), wait_timeout=10)
    try:
        transfers, audits, violations = scenario.work(
            database, seed, scenario.OPERATIONS_PER_THREAD * 2)
    finally:
        database.close()
    print(transfers, audits, len(violations))
""")

PROCESSES = 3


@pytest.mark.timeout(180)
def test_several_client_processes_and_threads(server, tmp_path):
    """Client processes commit concurrently with threads of this one: the
    invalidations between processes keep every snapshot consistent."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    database = ZODB.DB(ClientStorage(server.address,
                                     wait_timeout=CLIENT_TIMEOUT))
    try:
        create_accounts(database)
        tests_directory = str(__import__("pathlib").Path(__file__).parent)
        processes = [subprocess.Popen(
            [sys.executable, str(worker), server.address[0],
             str(server.address[1]), str(100 + number), tests_directory],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for number in range(PROCESSES)]
        local = [None] * 4

        def run(number):
            local[number] = work(database, 1000 + number,
                                 OPERATIONS_PER_THREAD)

        threads = [threading.Thread(target=run, args=(number,),
                                    name="test-local-worker-%d" % number)
                   for number in range(len(local))]
        for thread in threads:
            thread.start()
        outputs = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=150)
            assert process.returncode == 0, stderr
            outputs.append([int(field) for field in stdout.split()])
        for thread in threads:
            thread.join(150)
        assert None not in local
        assert [violations for _t, _a, violations in outputs] == \
            [0] * PROCESSES
        assert [result[2] for result in local] == [[]] * len(local)
        transfers = sum(output[0] for output in outputs) + \
            sum(result[0] for result in local)
        assert final_state(database) == (TOTAL, transfers)
    finally:
        database.close()
