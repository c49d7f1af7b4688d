"""Fuzzing a live server process.

One server (started as users start it) serves one FileStorage.  Our
ClientStorage, in its own thread, commits and loads throughout.  Each
example opens a raw connection and sends fuzzed frames (tests/fuzzing.py):
in place of the handshake, after the handshake, or after `register`,
in either encoding.  Then it sends a probe call, which the server must
answer or close the connection within a bound.  After every example:

* the server process is alive and the normal client has completed a
  commit and its loads since (so nothing hangs or holds a lock);
* the marker file that any of the fuzzed calls would create is absent;
* the log has no traceback other than a failed call's (a "<method>
  raised" line, logged with the error reply the caller gets), and no
  "unexpected error" (what a connection thread logs when something other
  than a protocol error ends it).

``ZEO_FUZZ_LOG=path`` keeps the server's whole log in that file.
"""

import io
import os
import pickle
import re
import threading

import persistent.mapping
import pytest
import transaction
import ZODB
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import (argument_shapes, fuzz_settings, fuzz_timeout, messages,
                     msgids, msgpack_payloads, mutated, pickle_payloads)
from raw_client import ConnectionClosed, RawClient
from server_process import cap_memory, start_filestorage_server
from server_process import temporary_directory
from zeo import wire
from zeo.ClientStorage import ClientStorage
from zeo.server.session import AFTER_REGISTER

#: Bounds, generous for two busy cores: the server answers a probe, the
#: normal client completes a commit and its loads.
PROBE_TIMEOUT = 15
PROGRESS_TIMEOUT = 30
PROBE_MSGID = "fuzz-probe"

pytestmark = fuzz_timeout(300)


class NormalClient:
    """Our ClientStorage committing and loading in a loop, in a thread,
    as an application would while the server is being fuzzed."""

    def __init__(self, address):
        self.database = ZODB.DB(ClientStorage(address, wait_timeout=10))
        self.completed = 0
        self.failure = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="fuzz-normal-client")
        self._thread.start()

    def _run(self):
        manager = transaction.TransactionManager()
        connection = self.database.open(manager)
        storage = self.database.storage
        try:
            root = connection.root()
            root["normal"] = counter = persistent.mapping.PersistentMapping()
            manager.commit()
            while not self._stop.is_set():
                counter["n"] = self.completed
                manager.commit()
                tid = storage.getTid(counter._p_oid)
                assert tid == counter._p_serial
                record = pickle.Unpickler(io.BytesIO(
                    storage.loadSerial(counter._p_oid, tid)))
                record.load()  # the class
                assert record.load()["data"] == {"n": self.completed}
                with self._changed:
                    self.completed += 1
                    self._changed.notify_all()
        except BaseException as failure:  # reported by wait_for_progress
            with self._changed:
                self.failure = failure
                self._changed.notify_all()
        finally:
            connection.close()

    def wait_for_progress(self, timeout=PROGRESS_TIMEOUT):
        """Wait until a commit and its loads have run entirely after now;
        False if none did within `timeout` seconds."""
        with self._changed:
            target = self.completed + 2
            self._changed.wait_for(
                lambda: self.completed >= target or self.failure, timeout)
            if self.failure is not None:
                raise self.failure
            return self.completed >= target

    def close(self):
        self._stop.set()
        self._thread.join(PROGRESS_TIMEOUT)
        self.database.close()


class FuzzedServer:
    """The module's server, its marker file and the normal client."""

    def __init__(self, directory):
        self.marker = os.path.join(directory, "pwned")
        self.process = start_filestorage_server(directory)
        cap_memory(self.process.process.pid)
        self.address = self.process.address
        self.normal = NormalClient(self.address)
        self.checked_lines = 0
        self.examples = 0

    def check_after_example(self):
        assert self.process.process.poll() is None, self.log_tail()
        assert self.normal.wait_for_progress(), (
            "the normal client made no progress in %ss\n%s"
            % (PROGRESS_TIMEOUT, self.log_tail()))
        assert not os.path.exists(self.marker), "a fuzzed message ran code"
        lines = self.process.log_lines[:]
        problems = unexpected_log_lines(lines[self.checked_lines:])
        assert not problems, "\n".join(problems)
        self.checked_lines = len(lines)
        self.examples += 1

    def log_tail(self):
        return self.process.log[-4000:]


#: A log line that starts a record: "DATE TIME LEVEL LOGGER MESSAGE".
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) (\S+) ")
_FAILED_CALL = re.compile(r"\) \S+ raised$")


def unexpected_log_lines(lines):
    """Log lines that show the server failing rather than refusing: a
    record of an "unexpected error", and any line that does not start a
    record (a traceback, "Exception in thread", a forged line), except
    the traceback of a failed call ("<method> raised")."""
    problems = []
    record = None
    for line in lines:
        if _RECORD.match(line):
            record = line
            if "unexpected error" in line:
                problems.append(line)
        elif record is None or not _FAILED_CALL.search(record):
            problems.append("%r after %r" % (line, record))
    return problems


def test_the_log_check_tells_failures_from_refusals():
    logged = ("2026-12-07 12:00:00,001 ERROR zeo.server.%s (127.0.0.1:5) %s",
              "Traceback (most recent call last):",
              '  File "x.py", line 1, in f', "TypeError: bad")
    refusal = [logged[0] % ("session", "loadBefore raised")] + list(
        logged[1:])
    crash = [logged[0] % ("connection", "unexpected error; closing")] + list(
        logged[1:])
    assert unexpected_log_lines(refusal) == []
    assert len(unexpected_log_lines(crash)) == 4
    assert unexpected_log_lines(["Exception in thread zeo-x:"]) != []
    assert unexpected_log_lines([logged[0] % ("connection", "x"),
                                 "forged"]) != []


@pytest.fixture(scope="module")
def fuzzed():
    with temporary_directory() as directory:
        server = FuzzedServer(directory)
        try:
            yield server
        finally:
            server.normal.close()
            status = server.process.stop()
            print("%d examples against the live server" % server.examples)
            with open(os.environ.get("ZEO_FUZZ_LOG", os.devnull), "w") as log:
                log.write(server.process.log)
            assert status == 0, server.log_tail()


#: Where the fuzzed frames start; most after register, where every
#: server method is reachable.
STAGES = ["greeting", "handshake", "registered", "registered", "registered"]


def handshake_frames():
    """What a client may answer the greeting with, mostly wrong."""
    return mutated(st.sampled_from([wire.PICKLE_PROTOCOL,
                                    wire.MSGPACK_PROTOCOL, wire.RUOK,
                                    b"Z4", b""]))


def server_calls():
    """Well-formed messages calling server methods with any arguments:
    they reach the methods, where most get an error reply."""
    return messages() | st.tuples(
        msgids(), st.sampled_from([False, False, True]),
        st.sampled_from(sorted(AFTER_REGISTER)), argument_shapes())


@st.composite
def cases(draw, marker):
    """(stage, protocol, frames) of one fuzzed connection."""
    stage = draw(st.sampled_from(STAGES))
    protocol = draw(st.sampled_from([wire.PICKLE_PROTOCOL,
                                     wire.MSGPACK_PROTOCOL]))
    codec = wire.codec_for(protocol)
    encoded_calls = server_calls().map(lambda call: codec.encode(*call))
    if protocol == wire.PICKLE_PROTOCOL:
        payloads = pickle_payloads(marker) | encoded_calls
    else:
        payloads = msgpack_payloads() | mutated(encoded_calls)
    frames = draw(st.lists(payloads, min_size=1, max_size=4))
    if stage == "greeting":
        frames.insert(0, draw(handshake_frames()))
    return stage, protocol, frames


def fuzz_connection(address, stage, protocol, frames):
    """Send `frames`, then a probe; how the server reacted."""
    with RawClient(address, timeout=PROBE_TIMEOUT) as raw:
        try:
            if stage == "greeting":
                raw.read_frame()
            else:
                raw.handshake(protocol)
                if stage == "registered":
                    raw.register()
            for payload in frames:
                raw.send_raw_frame(payload)
            if stage == "greeting":
                if frames[0] not in (wire.PICKLE_PROTOCOL,
                                     wire.MSGPACK_PROTOCOL):
                    assert raw.is_closed(PROBE_TIMEOUT), (
                        "connection open after the handshake %r" % frames[0])
                    return "closed"
                raw.codec = wire.codec_for(frames[0], wire.CLIENT_GLOBALS)
            probe = ("ping", ()) if stage == "registered" else (
                "register", ("1", False))
            raw.send_message(PROBE_MSGID, wire.CALL, *probe)
            return await_probe(raw)
        except (BrokenPipeError, ConnectionResetError, ConnectionClosed):
            return "closed"


def await_probe(raw):
    """'answered' once the probe's reply comes, 'closed' if the server
    closes first; a server that does neither fails the test."""
    while True:
        try:
            payload = raw.read_frame(PROBE_TIMEOUT)
        except TimeoutError:
            pytest.fail("the server neither answered the probe nor closed "
                        "the connection in %ss" % PROBE_TIMEOUT)
        try:
            message = raw.codec.decode(payload)
        except wire.ProtocolError:
            continue  # a reply to a fuzzed call that we cannot read
        if message.msgid == PROBE_MSGID and message.name == wire.REPLY_NAME:
            return "answered"


@fuzz_settings(100)
@given(data=st.data())
def test_the_server_survives_fuzzed_connections(fuzzed, data):
    stage, protocol, frames = data.draw(cases(fuzzed.marker), label="case")
    outcome = fuzz_connection(fuzzed.address, stage, protocol, frames)
    event("%s: %s" % (stage, outcome))
    fuzzed.check_after_example()
