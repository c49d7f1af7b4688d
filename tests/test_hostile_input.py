"""Hostile and broken input against a real server process.

Each test opens raw connections (tests/raw_client.py), sends something no
well-behaved client sends, and checks the documented reaction (PROTOCOL.md
2.3 and 3.7): a bad handshake, an undecodable message or a name that is not
callable closes the connection; a failing two-way call gets an error reply
and the connection stays usable; a failing one-way call closes it.  After
each case the real ZEO client must still commit and read back through the
same server, and at the end the server must stop cleanly, leaving an intact
Data.fs.

The server under test is ours; set ZEO_HOSTILE_IMPL=ZEO to run the same
cases against the real ZEO server (it fails the cases where ZEO 6.2 is
known to be weaker, e.g. PROTOCOL.md 15.2 B3 and B5).
"""

import json
import os
import pickle
import re
import signal
import threading
import time

import persistent.mapping
import pytest
import transaction
import ZODB
import ZODB.FileStorage
from ZEO.ClientStorage import ClientStorage

from hostile_pickles import VARIANTS, Call, Global, expression_opcodes
from hostile_pickles import forbidden_global_pickle, hostile_calls
from hostile_pickles import hostile_message, named_globals
from raw_client import ConnectionClosed, RawClient, RemoteError, ruok
from server_process import OURS, cap_memory, memory_kib
from server_process import start_filestorage_server
from server_process import start_configured_server, temporary_directory
from zeo import wire

IMPL = os.environ.get("ZEO_HOSTILE_IMPL", OURS)
Z64 = b"\0" * 8
MAXTID = b"\x7f" + b"\xff" * 7
STATUS_KEYS = {
    "connections", "loads", "stores", "commits", "aborts", "active_txns",
    "lock_time", "conflicts", "conflicts_resolved", "start", "waiting",
    "timeout-thread-is-alive", "last-transaction"}

pytestmark = pytest.mark.timeout(120)


class Served:
    """The module's server, its data directory and a marker file path that
    hostile payloads would create if they ever ran."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, "Data.fs")
        self.marker = os.path.join(directory, "pwned")
        self.process = start_filestorage_server(directory, impl=IMPL)
        cap_memory(self.process.process.pid)
        self.commits = 0

    @property
    def address(self):
        return self.process.address

    def log_tail(self):
        return self.process.log[-4000:]


@pytest.fixture(scope="module")
def served():
    with temporary_directory() as directory:
        served = Served(directory)
        try:
            yield served
        finally:
            served.process.stop()


@pytest.fixture
def client(served):
    """A raw client after the handshake and `register("1")`."""
    with RawClient(served.address) as raw:
        raw.handshake()
        assert raw.register() is not None
        yield raw


@pytest.fixture
def fresh(served):
    """A raw client right after connecting (nothing sent yet)."""
    with RawClient(served.address) as raw:
        yield raw


@pytest.fixture(autouse=True)
def server_still_serves(request, served):
    """After every case: the real ZEO client commits and reads back, no
    hostile payload ran, and the server process is alive."""
    yield
    if getattr(request.function, "stops_server", False):
        return
    assert served.process.process.poll() is None, served.log_tail()
    served.commits += 1
    key = "%s-%d" % (request.node.name, served.commits)
    assert_zeo_client_works(served.address, key)
    assert not os.path.exists(served.marker), "a hostile payload ran"


def stops_server(test):
    """Marks a test after which the module's server is not checked."""
    test.stops_server = True
    return test


def assert_zeo_client_works(address, key, timeout=20):
    """Commit root[key] with one real ZEO client, read it with another.

    Runs in a named daemon thread joined with a deadline: a server whose
    commit lock is stuck would otherwise hang the real client's vote (it
    has no timeout) and with it the whole test run.
    """
    outcome = []

    def commit_and_read():
        try:
            _commit_and_read(address, key, timeout)
        except BaseException as exc:  # reported by the test thread below
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=commit_and_read, daemon=True,
                              name="hostile-zeo-client-check")
    worker.start()
    worker.join(timeout * 3)
    if not outcome:
        pytest.fail("the real ZEO client did not commit and read back in "
                    "%ss (commit lock stuck?)" % (timeout * 3))
    if outcome[0] is not None:
        raise outcome[0]


def _commit_and_read(address, key, timeout):
    value = {"written-by": key, "at": time.time()}
    writer = ZODB.DB(ClientStorage(address, wait_timeout=timeout))
    try:
        manager = transaction.TransactionManager()
        connection = writer.open(manager)
        connection.root()[key] = persistent.mapping.PersistentMapping(value)
        manager.commit()
        connection.close()
    finally:
        writer.close()
    reader = ZODB.DB(ClientStorage(address, wait_timeout=timeout))
    try:
        connection = reader.open(transaction.TransactionManager())
        assert dict(connection.root()[key]) == value
        connection.close()
    finally:
        reader.close()


def assert_closed(raw, served, what, timeout=5):
    assert raw.is_closed(timeout), (
        "connection still open %ss after %s\n%s"
        % (timeout, what, served.log_tail()))


def assert_usable(raw):
    assert raw.call("ping") is None
    assert len(raw.call("lastTransaction")) == 8


def record(state):
    """An object record as ZODB writes it: class pickle + state pickle."""
    return (pickle.dumps(persistent.mapping.PersistentMapping, 3)
            + pickle.dumps(state, 3))


# --- framing and decoding ----------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"garbage", b"\x00", b"", os.urandom(300), b"\x80\x03N.",
    b"\x80\x03(K\x01\x89X\x04\x00\x00\x00pingt.",  # 3-tuple
    pickle.dumps((1, False, b"ping", ()), 3),  # name is bytes
    pickle.dumps([1, False, "ping", ()], 3),  # a list, not a tuple
    b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping)t",  # truncated, no STOP
], ids=["text", "nul", "empty", "random", "none", "3-tuple", "bytes-name",
        "list", "truncated"])
def test_garbage_frame_after_register_closes(client, served, payload):
    client.send_raw_frame(payload)
    assert_closed(client, served, "garbage frame %r" % payload[:20])


def test_garbage_frame_before_register_closes(fresh, served):
    fresh.handshake()
    fresh.send_raw_frame(b"\xde\xad\xbe\xef" * 10)
    assert_closed(fresh, served, "garbage before register")


def test_garbage_msgpack_frame_closes(fresh, served):
    fresh.handshake(wire.MSGPACK_PROTOCOL)
    assert fresh.register() is not None
    fresh.send_raw_frame(b"\xc1\xc1\xc1")  # 0xc1 is never used in msgpack
    assert_closed(fresh, served, "invalid msgpack")


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x7FFFFFFF, 0x80000000])
def test_absurd_frame_length_closes_without_allocating(client, served,
                                                       length):
    pid = served.process.process.pid
    before = memory_kib(pid, "VmRSS")
    try:
        client.send_raw_bytes(length.to_bytes(4, "big") + b"\0" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending: fine
    assert_closed(client, served, "frame length %#x" % length)
    grown = memory_kib(pid, "VmRSS") - before
    assert grown < 256 * 1024, "server RSS grew by %d KiB" % grown


def test_absurd_frame_length_as_the_handshake_closes(fresh, served):
    fresh.read_frame()
    fresh.send_raw_bytes(b"\xff\xff\xff\xf0" + b"Z5")
    assert_closed(fresh, served, "absurd handshake frame length")


# --- handshake ---------------------------------------------------------------

@pytest.mark.parametrize("identifier", [
    b"Z4", b"X5", b"Z55", b"Z", b"", b"z5", b"Z3101", os.urandom(16),
    pickle.dumps((1, False, "register", ("1", False)), 3),
], ids=["Z4", "X5", "Z55", "Z", "empty", "z5", "Z3101", "random",
        "call-instead"])
def test_bad_handshake_closes_without_reply(fresh, served, identifier):
    assert fresh.read_frame() in (wire.PICKLE_PROTOCOL, wire.MSGPACK_PROTOCOL)
    fresh.send_raw_frame(identifier)
    assert_closed(fresh, served, "handshake %r" % identifier)
    with pytest.raises(ConnectionClosed):
        fresh.read_frame(1)


def test_bad_handshake_followed_by_a_call_closes(fresh, served):
    fresh.read_frame()
    fresh.send_raw_frame(b"X5")
    fresh.send_raw_frame(pickle.dumps((1, False, "register", ("1", 0)), 3))
    assert_closed(fresh, served, "X5 then register")
    with pytest.raises(ConnectionClosed):
        fresh.read_frame(1)


def test_raw_bytes_that_are_not_a_frame_close(fresh, served):
    fresh.read_frame()
    fresh.send_raw_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_closed(fresh, served, "an HTTP request")


# --- forbidden globals -------------------------------------------------------

@pytest.mark.parametrize("label", list(hostile_calls("marker")))
@pytest.mark.parametrize("registered", [False, True],
                         ids=["before-register", "after-register"])
def test_forbidden_global_is_refused_and_never_runs(served, label,
                                                    registered):
    """A dangerous global called through REDUCE (after GLOBAL, and after
    STACK_GLOBAL), INST and OBJ, in a two-way call before and after
    register: each call gets an error reply naming every global it named,
    the connection stays usable, and the file the call would create (the
    marker) never appears."""
    expression = hostile_calls(served.marker)[label]
    method = "loadBefore" if registered else "register"
    with RawClient(served.address) as raw:
        raw.handshake()
        if registered:
            raw.register()
        for msgid, variant in enumerate(VARIANTS, start=1):
            raw.send_raw_frame(hostile_message(expression, variant, method,
                                               msgid))
            with pytest.raises(RemoteError) as refusal:
                raw.wait_reply(msgid)
            assert refusal.value.class_name == "builtins.ValueError"
            for name in named_globals(expression):
                assert name in refusal.value.payload[0], variant
        if registered:
            assert_usable(raw)
        else:
            assert len(raw.register()) == 8
    time.sleep(0.2)  # a spawned command would need a moment
    assert not os.path.exists(served.marker)


@stops_server
@pytest.mark.parametrize("variant", VARIANTS)
def test_client_conflict_resolution_never_unpickles_a_stored_record(variant):
    """With `client-conflict-resolution` the server never runs a record:
    the vote hands the conflict to the client to resolve, and nothing
    runs, not even when the ConflictError names the record's class (ZODB
    would unpickle the record for that; see zeo.server.conflict_globals).
    """
    with temporary_directory() as directory:
        marker = os.path.join(directory, "pwned")
        server = start_configured_server(
            directory, "client-conflict-resolution true")
        try:
            assert_zeo_client_works(server.address, "root-exists")
            touch = Call(Global("os", "system"), ["touch " + marker])
            record = b"\x80\x03" + expression_opcodes(touch, variant) + b"."
            with RawClient(server.address) as raw:
                raw.handshake()
                raw.register()
                raw.send_oneway("tpc_begin", 5, b"", b"", {})
                raw.send_oneway("storea", Z64, b"\0" * 7 + b"\1",
                                record + record, 5)
                conflicts = raw.call("vote", 5)
                assert [conflict["oid"] for conflict in conflicts] == [Z64]
            time.sleep(0.2)
            assert not os.path.exists(marker)
        finally:
            assert server.stop() == 0, server.log[-4000:]


def test_forbidden_global_in_one_way_call_after_register(client, served):
    payload = forbidden_global_pickle("builtins", "open", served.marker, "w")
    client.send_raw_frame(payload.replace(b"K\x01\x89", b"K\x00\x88", 1))
    assert_closed(client, served, "builtins.open in a one-way call")
    assert not os.path.exists(served.marker)


# --- method names ------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "nosuchmethod", "_store", "__init__", "__class__", "__getattribute__",
    "storage", "register", "ruok", "undo", "get_size_info", ".reply",
    "lookup", "disconnect", "log", "push", "closed", "stats",
    "break_commit", "queue_invalidation", "follow", "send_queued",
    "tpc_begin_refused", "",
])
def test_names_that_are_not_callable_close_after_register(
        client, served, name):
    client.send_message(7, wire.CALL, name, ())
    assert_closed(client, served, "calling %r" % name)


@pytest.mark.parametrize("name", ["register", "_store", "nosuchmethod"])
def test_one_way_call_of_an_uncallable_name_closes(client, served, name):
    client.send_oneway(name, "1", False)
    assert_closed(client, served, "one-way %r" % name)


@pytest.mark.parametrize("name", [
    "loadBefore", "get_info", "lastTransaction", "tpc_begin", "ping",
    "server_status", "_store", "nosuchmethod",
])
def test_calls_before_register_close(fresh, served, name):
    fresh.handshake()
    fresh.send_message(1, wire.CALL, name, (Z64, MAXTID))
    assert_closed(fresh, served, "%r before register" % name)


def test_register_twice_closes(client, served):
    client.send_message(99, wire.CALL, "register", ("1", False))
    assert_closed(client, served, "a second register")


def test_register_unknown_storage_then_register_again(fresh, served):
    fresh.handshake()
    with pytest.raises(RemoteError) as error:
        fresh.register("9")
    assert error.value.class_name == "builtins.ValueError"
    with pytest.raises(RemoteError):
        fresh.register(b"1")
    assert len(fresh.register("1")) == 8
    assert_usable(fresh)


# --- failing calls -----------------------------------------------------------

@pytest.mark.parametrize("name, args", [
    ("loadBefore", (Z64,)),
    ("loadBefore", (Z64, MAXTID, 1)),
    ("get_info", (1, 2, 3)),
    ("ping", ("extra",)),
    ("new_oids", (1, 2, 3)),
    ("vote", ()),
])
def test_wrong_argument_count_gets_type_error_reply(client, name, args):
    with pytest.raises(RemoteError) as error:
        client.call(name, *args)
    assert error.value.class_name == "builtins.TypeError"
    assert_usable(client)


def test_register_with_wrong_argument_count_gets_error_reply(fresh):
    fresh.handshake()
    with pytest.raises(RemoteError) as error:
        fresh.call("register")
    assert error.value.class_name == "builtins.TypeError"
    assert len(fresh.register("1")) == 8


@pytest.mark.parametrize("args", [
    ("not bytes", 5), (None, None), (b"short", MAXTID), ({}, []),
    (b"\xff" * 8, MAXTID),
], ids=repr)
def test_load_of_bad_values_gets_error_reply(client, args):
    with pytest.raises(RemoteError) as error:
        client.call("loadBefore", *args)
    assert isinstance(error.value.class_name, str)
    assert_usable(client)


def test_unknown_oid_gets_pos_key_error(client):
    oid = b"\x7f" * 8
    with pytest.raises(RemoteError) as error:
        client.call("loadBefore", oid, MAXTID, msgid=(oid, MAXTID))
    assert error.value.class_name == "ZODB.POSException.POSKeyError"
    assert error.value.payload == (oid,)
    assert_usable(client)


@pytest.mark.parametrize("name, args", [
    ("storea", (Z64, Z64, b"data", 42)),  # no transaction
    ("vote", (42,)),
    ("storea", (Z64,)),  # wrong argument count
    ("tpc_begin", ()),
    ("loadBefore", (b"\x7f" * 8, MAXTID)),
])
def test_failing_one_way_call_closes(client, served, name, args):
    client.send_oneway(name, *args)
    assert_closed(client, served, "failing one-way %s%r" % (name, args))


def test_two_way_store_without_transaction_gets_error_reply(client):
    with pytest.raises(RemoteError) as error:
        client.call("storea", Z64, Z64, b"data", 42)
    assert error.value.class_name == (
        "ZODB.POSException.StorageTransactionError")
    assert_usable(client)


@pytest.mark.parametrize("msgid", [
    "abc", (b"\x01" * 8, b"\x02" * 8), 2 ** 70, -5, None, 1.5,
], ids=repr)
def test_arbitrary_msgids_are_echoed(client, msgid):
    assert client.call("ping", msgid=msgid) is None


# --- heartbeat ---------------------------------------------------------------

def test_heartbeat_is_ignored_after_register(client):
    for _ in range(3):
        client.send_message(wire.HEARTBEAT_MSGID, 0, wire.REPLY_NAME, None)
    assert_usable(client)
    assert client.server_calls == []


def test_heartbeat_is_ignored_before_register(fresh):
    fresh.handshake()
    fresh.send_message(wire.HEARTBEAT_MSGID, 0, wire.REPLY_NAME, None)
    assert len(fresh.register("1")) == 8
    assert_usable(fresh)


def test_heartbeat_bytes_from_protocol_md_are_ignored(client):
    client.send_raw_frame(bytes.fromhex(
        "8003284affffffff4b0058060000002e7265706c794e742e"))
    assert_usable(client)


# --- reference bomb ----------------------------------------------------------

def _call_pickle(msgid, name, args_opcodes):
    """A two-way call message; `args_opcodes` push the args tuple."""
    encoded = name.encode()
    return (b"\x80\x03(K" + bytes([msgid]) + b"\x89X"
            + len(encoded).to_bytes(4, "little") + encoded + args_opcodes
            + b"t.")


#: Calls that carry a reference bomb where walking, hashing or printing it
#: would never end: as an argument, as a dict key (hashed while the pickle
#: is loaded) and inside a set.
BOMB_CALLS = [
    lambda msgid, bomb: _call_pickle(msgid, "loadBefore",
                                     bomb + b"N\x86"),
    lambda msgid, bomb: _call_pickle(msgid, "history",
                                     b"}" + bomb + b"Ns" + b"\x85"),
    lambda msgid, bomb: _call_pickle(
        msgid, "history", b"cbuiltins\nset\n" + bomb + b"\x85\x85R\x85"),
]


def _responsiveness(served):
    """Whether the server still answers a `ruok` probe, for failure text."""
    try:
        ruok(served.address, timeout=3)
    except (OSError, ConnectionClosed, AssertionError):
        return "is frozen (no ruok answer in 3 s)"
    return "still answers ruok"


@stops_server
def test_reference_bomb_message_is_handled_in_bounded_time():
    """A 124-byte frame holding a tuple of 2**60 references to None.

    Decoding it is cheap (the memo shares one object), but walking or
    repr()ing it never ends.  The connection must be closed (or answered)
    promptly and the server must go on serving others.  Runs on its own
    server, so a failure here does not spoil the other cases.
    """
    bomb = b"N" + b"2\x86" * 60
    with temporary_directory() as directory:
        served = Served(directory)
        try:
            with RawClient(served.address) as raw:
                raw.handshake()
                raw.register()
                raw.send_raw_frame(b"\x80\x03" + bomb + b".")
                assert_closed(raw, served, "the reference bomb", timeout=15)
            assert_zeo_client_works(served.address, "after-bomb", 15)
            for number, call in enumerate(BOMB_CALLS, start=5):
                with RawClient(served.address) as raw:
                    raw.handshake()
                    raw.register()
                    raw.send_raw_frame(call(number, bomb))
                    try:
                        message = raw.read_message(15)
                    except ConnectionClosed:
                        message = None
                    except TimeoutError:
                        pytest.fail("bomb call %d: no reply and no close in "
                                    "15 s; server %s" % (
                                        number, _responsiveness(served)))
                    if message is not None:
                        assert (message.msgid, message.flag) == (
                            number, wire.ERROR_REPLY), message
                assert_zeo_client_works(
                    served.address, "after-bomb-%d" % number, 15)
        finally:
            served.process.stop(timeout=10)


# --- protocol error in the middle of a commit --------------------------------

def _begin_and_store(raw, txn_id, state):
    oid = raw.call("new_oids")[0]
    raw.send_oneway("tpc_begin", txn_id, b"raw", b"hostile test", {})
    raw.send_oneway("storea", oid, Z64, record(state), txn_id)
    return oid


def _assert_absent(raw, oid):
    with pytest.raises(RemoteError) as error:
        raw.call("loadBefore", oid, MAXTID, msgid=(oid, MAXTID))
    assert error.value.class_name == "ZODB.POSException.POSKeyError"


@pytest.mark.parametrize("breakage", ["garbage", "unknown-method", "eof"])
def test_protocol_error_while_holding_the_commit_lock_releases_it(
        served, breakage):
    with RawClient(served.address) as holder, \
            RawClient(served.address) as waiter:
        for raw in (holder, waiter):
            raw.handshake()
            raw.register()
        lost_oid = _begin_and_store(holder, 11, {"holder": 1})
        assert holder.call("vote", 11) == []
        kept_oid = _begin_and_store(waiter, 22, {"waiter": 1})
        vote = waiter.send_call("vote", 22)
        with pytest.raises(TimeoutError):
            waiter.wait_reply(vote, 1)  # the holder still has the lock
        if breakage == "garbage":
            holder.send_raw_frame(b"\x80\x03garbage")
        elif breakage == "unknown-method":
            holder.send_message(12, wire.CALL, "_commit_now", (11,))
        else:
            holder.close()
        if breakage != "eof":
            assert_closed(holder, served, "breaking the lock holder")
        try:
            assert waiter.wait_reply(vote, 10) == []
        except TimeoutError:
            pytest.fail("commit lock not released\n" + served.log_tail())
        tid = waiter.call("tpc_finish", 22)
        assert len(tid) == 8
        assert waiter.call("loadBefore", kept_oid, MAXTID,
                           msgid=(kept_oid, MAXTID))[1] == tid
        _assert_absent(waiter, lost_oid)


def test_protocol_error_before_vote_discards_the_transaction(served):
    with RawClient(served.address) as breaker:
        breaker.handshake()
        breaker.register()
        lost_oid = _begin_and_store(breaker, 33, {"lost": 1})
        breaker.send_raw_frame(b"\xff" * 12)
        assert_closed(breaker, served, "garbage before vote")
    with RawClient(served.address) as raw:
        raw.handshake()
        raw.register()
        _assert_absent(raw, lost_oid)
        oid = _begin_and_store(raw, 44, {"after": 1})
        assert raw.call("vote", 44, timeout=10) == []
        assert len(raw.call("tpc_finish", 44)) == 8
        assert raw.call("loadBefore", oid, MAXTID, msgid=(oid, MAXTID))


def test_many_clients_sending_garbage_at_once(served):
    """Bad connections in parallel do not disturb a good one."""
    errors = []

    def attack(index):
        try:
            with RawClient(served.address) as raw:
                raw.handshake()
                raw.register()
                raw.send_raw_frame(os.urandom(64 + index))
                if not raw.is_closed(10):
                    errors.append("attacker %d still connected" % index)
        except Exception as exc:  # collected and asserted below
            errors.append("attacker %d: %r" % (index, exc))

    threads = [threading.Thread(target=attack, args=(index,),
                                name="hostile-attacker-%d" % index)
               for index in range(16)]
    for thread in threads:
        thread.start()
    with RawClient(served.address) as good:
        good.handshake()
        good.register()
        for _ in range(20):
            assert_usable(good)
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


# --- ruok --------------------------------------------------------------------

@pytest.mark.parametrize("read_greeting_first", [False, True])
def test_ruok_reports_every_storage_then_closes(served, read_greeting_first):
    assert_zeo_client_works(served.address, "before-ruok")
    if read_greeting_first:
        with RawClient(served.address) as raw:
            greeting = raw.read_frame()
            raw.send_raw_frame(wire.RUOK)
            document = raw.read_frame()
            assert_closed(raw, served, "the ruok reply")
        status = json.loads(document.decode("ascii"))
    else:
        greeting, status = ruok(served.address)
    assert greeting in (wire.PICKLE_PROTOCOL, wire.MSGPACK_PROTOCOL)
    assert set(status) == {"1"}
    entry = status["1"]
    assert set(entry) == STATUS_KEYS
    for key in ("connections", "loads", "stores", "commits", "aborts",
                "active_txns", "conflicts", "conflicts_resolved",
                "waiting"):
        assert type(entry[key]) is int and entry[key] >= 0, key
    assert entry["lock_time"] is None or isinstance(
        entry["lock_time"], float)
    assert re.fullmatch(r"[0-9a-f]{16}", entry["last-transaction"])
    assert entry["last-transaction"] != "0" * 16
    assert time.strptime(entry["start"])
    assert entry["timeout-thread-is-alive"] in ("stub", True, False)


def test_ruok_json_uses_default_separators(served):
    with RawClient(served.address) as raw:
        raw.send_raw_frame(wire.RUOK)
        raw.read_frame()
        text = raw.read_frame().decode("ascii")
    assert text == json.dumps(json.loads(text))


@stops_server
def test_sigint_also_stops_cleanly():
    with temporary_directory() as directory:
        served = Served(directory)
        try:
            assert_zeo_client_works(served.address, "before-sigint")
            served.process.signal(signal.SIGINT)
            assert served.process.process.wait(30) == 0, served.log_tail()
        finally:
            served.process.stop()


# --- the end: clean stop, intact data ----------------------------------------

@stops_server
def test_server_stops_cleanly_and_data_file_is_intact(served):
    assert_zeo_client_works(served.address, "last-check")
    greeting, status = ruok(served.address)
    assert status["1"]["active_txns"] == 0
    assert status["1"]["lock_time"] is None
    assert served.process.stop() == 0, served.log_tail()
    assert not os.path.exists(served.marker)
    storage = ZODB.FileStorage.FileStorage(served.path, read_only=True)
    try:
        oids = set()
        transactions = 0
        for txn in storage.iterator():
            transactions += 1
            for data_record in txn:
                oids.add(data_record.oid)
        assert transactions >= 2
        for oid in sorted(oids):
            data, tid = storage.load(oid)
            assert isinstance(data, bytes) and len(tid) == 8
        database = ZODB.DB(storage)
        try:
            connection = database.open(transaction.TransactionManager())
            root = connection.root()
            assert dict(root["last-check"])["written-by"] == "last-check"
            connection.close()
        finally:
            database.close()
    finally:
        storage.close()
