"""Messages made to make a decoder allocate gigabytes, sent for real.

A 9-byte pickle (`LONG_BINPUT` with memo index 2**30) made CPython's
unpickler grow its memo table to 16 GB; msgpack headers nested a thousand
deep each reserved room for ten thousand items.  Here every such message
goes to a real server process, before and after `register`, and from a
scripted server to our client in a child process.  Each time the peak
RSS of the receiver (VmHWM, reset through /proc/PID/clear_refs before the
attack) must stay within `RSS_BOUND` of where it was, the attacker must
get an error or a closed connection, and normal service must go on.

The processes run with a data-memory cap, as a safety net for a broken
check; the memo indexes 2**23 and 2**24 are below the cap, so a server
without the check would visibly grow there instead of failing to
allocate.
"""

import json
import os
import resource
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import transaction
import ZODB
from ZODB.utils import p64

from conftest import REPO_ROOT, wait_until
from raw_client import ConnectionClosed, RawClient
from server_process import memory_kib, reset_peak_memory
from server_process import start_filestorage_server, temporary_directory
from zeo import wire
from zeo.ClientStorage import ClientStorage
from zeo.server import free_threading
from zeo.server.connection import UNREGISTERED_MAX_FRAME_SIZE

pytestmark = pytest.mark.timeout(180)

#: How much a receiver's peak RSS may rise while it refuses a message.
RSS_BOUND_KIB = 16 * 1024
#: ... plus this many times a large frame: the frame, buffered as it
#: arrives (up to twice while the buffer grows), and the shape check's
#: stack of shared entries, 8 bytes a value, until the decoding budget
#: (16 times the frame, an empty list charged 48 bytes) runs out.  A
#: free-threaded build's allocator (mimalloc, with pages per thread)
#: gives freed memory back later: there the peak measured twice as much
#: (35-47 MiB for a 4 MB frame), still under what the budget would let
#: a decoder take.
LARGE_FRAME_FACTOR = 10 if free_threading.free_threaded_build() else 5
#: The safety net: a broken check fails to allocate past this.
MEMORY_CAP = 2 * 1024 ** 3
PROTO3 = b"\x80\x03"


def long_binput(index):
    return PROTO3 + b"Nr" + struct.pack("<I", index) + b"."


def memoize_chain(length):
    return b"\x80\x04N" + b"\x94" * length + b"."


def nested_msgpack_arrays(levels=1000, announced=10000, size=60000):
    data = (b"\xdd" + struct.pack(">I", announced)) * levels
    return data + b"\xc0" * (size - len(data))


#: (encoding, payload), each below the unregistered frame limit.
SMALL_BOMBS = {
    "LONG_BINPUT 2**30": (wire.PICKLE_PROTOCOL, long_binput(2 ** 30)),
    "LONG_BINPUT 2**31-1": (wire.PICKLE_PROTOCOL, long_binput(2 ** 31 - 1)),
    "LONG_BINPUT 2**23": (wire.PICKLE_PROTOCOL, long_binput(2 ** 23)),
    "PUT 2**24": (wire.PICKLE_PROTOCOL, PROTO3 + b"Np16777216\n."),
    "MEMOIZE chain": (wire.PICKLE_PROTOCOL, memoize_chain(60000)),
    "LONG4 of 2**31-1 bytes": (
        wire.PICKLE_PROTOCOL,
        PROTO3 + b"\x8b" + struct.pack("<i", 2 ** 31 - 1) + b"."),
    "BINBYTES8 past the end": (
        wire.PICKLE_PROTOCOL,
        PROTO3 + b"\x8e" + struct.pack("<Q", 2 ** 40) + b"abc."),
    "BINUNICODE8 past the end": (
        wire.PICKLE_PROTOCOL,
        PROTO3 + b"\x8d" + struct.pack("<Q", 2 ** 40) + b"abc."),
    "msgpack nested preallocations": (wire.MSGPACK_PROTOCOL,
                                      nested_msgpack_arrays()),
}
#: Bigger ones, for a registered client (frames of megabytes).
LARGE_BOMBS = {
    "MEMOIZE chain of 8 MB": (wire.PICKLE_PROTOCOL,
                              memoize_chain(8 * 1024 * 1024)),
    "empty lists in APPENDS, 4 MB": (
        wire.PICKLE_PROTOCOL, PROTO3 + b"](" + b"]" * 4000000 + b"e."),
    "msgpack empty maps, 4 MB": (
        wire.MSGPACK_PROTOCOL,
        b"\xdd" + struct.pack(">I", 4000000) + b"\x80" * 4000000),
}


@pytest.fixture(scope="module")
def server():
    with temporary_directory() as directory:
        process = start_filestorage_server(directory)
        resource.prlimit(process.process.pid, resource.RLIMIT_DATA,
                         (MEMORY_CAP, MEMORY_CAP))
        try:
            yield process
        finally:
            process.stop()


def commit_and_load(address, key):
    """A normal client: registers, commits root[key], loads it back."""
    db = ZODB.DB(ClientStorage(address, wait_timeout=10))
    try:
        manager = transaction.TransactionManager()
        connection = db.open(manager)
        connection.root()[key] = key
        manager.commit()
        connection.close()
        connection = db.open(transaction.TransactionManager())
        connection.cacheMinimize()
        assert connection.root()[key] == key
        connection.close()
    finally:
        db.close()


def attack(server, protocol, payload, register):
    """Send `payload` as one frame; return the peak RSS growth (KiB) and
    what the attacker got back: "closed" or the error reply."""
    pid = server.process.pid
    with RawClient(server.address) as raw:
        raw.handshake(protocol)
        if register:
            assert raw.register() is not None
        before = memory_kib(pid, "VmRSS")
        reset_peak_memory(pid)
        try:
            raw.send_raw_frame(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending
        try:
            message = raw.read_message(15)
        except ConnectionClosed:
            outcome = "closed"
        else:
            assert message.flag == wire.ERROR_REPLY, message
            outcome = message.args
        peer = "%s:%s" % raw.sock.getsockname()[:2]
    return memory_kib(pid, "VmHWM") - before, outcome, peer


@pytest.mark.parametrize("register", [False, True],
                         ids=["before-register", "after-register"])
@pytest.mark.parametrize("name", SMALL_BOMBS)
def test_the_server_refuses_without_allocating(server, name, register):
    protocol, payload = SMALL_BOMBS[name]
    assert len(payload) <= UNREGISTERED_MAX_FRAME_SIZE
    grown, outcome, peer = attack(server, protocol, payload, register)
    assert grown < RSS_BOUND_KIB, "server peak RSS grew by %d KiB" % grown
    assert outcome == "closed", outcome
    def refusals():  # the log arrives through a pipe, read by a thread
        return [line for line in server.log.splitlines()
                if "(%s) refused message" % peer in line
                and " ERROR " in line]
    wait_until(refusals, "the refusal is logged", 10)
    assert len(refusals()) == 1, server.log[-3000:]
    commit_and_load(server.address, "%s-%s" % (name, register))


@pytest.mark.parametrize("name", LARGE_BOMBS)
def test_a_registered_client_cannot_amplify_a_large_frame(server, name):
    protocol, payload = LARGE_BOMBS[name]
    grown, outcome, _peer = attack(server, protocol, payload, True)
    assert grown < RSS_BOUND_KIB + LARGE_FRAME_FACTOR * len(payload) // 1024, (
        "server peak RSS grew by %d KiB" % grown)
    assert outcome == "closed", outcome
    commit_and_load(server.address, name)


def test_a_large_frame_before_register_is_refused_unread(server):
    pid = server.process.pid
    with RawClient(server.address) as raw:
        raw.handshake()
        before = memory_kib(pid, "VmRSS")
        reset_peak_memory(pid)
        try:
            raw.send_raw_bytes(struct.pack(">I", 100 * 1024 * 1024)
                               + b"\0" * UNREGISTERED_MAX_FRAME_SIZE)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert raw.is_closed(10)
    assert memory_kib(pid, "VmHWM") - before < RSS_BOUND_KIB
    wait_until(lambda: "exceeds the limit of %d bytes"
               % UNREGISTERED_MAX_FRAME_SIZE in server.log,
               "the refusal is logged", 10)


def test_large_frames_are_accepted_after_register(server):
    """A registered client still commits and loads a 5 MB object."""
    value = os.urandom(5 * 1024 * 1024)
    db = ZODB.DB(ClientStorage(server.address, wait_timeout=10))
    try:
        manager = transaction.TransactionManager()
        connection = db.open(manager)
        connection.root()["big"] = value
        manager.commit()
        connection.close()
    finally:
        db.close()
    db = ZODB.DB(ClientStorage(server.address, wait_timeout=10))
    try:
        connection = db.open(transaction.TransactionManager())
        assert connection.root()["big"] == value
        connection.close()
    finally:
        db.close()


# --- the same messages from a hostile server, to our client -----------------

class BombingServer:
    """Greets, answers what a connecting client asks, and on `fire()`
    sends a hostile frame on the first connection.  Counts registrations:
    the client's reconnection is the second one."""

    def __init__(self, greeting, bomb):
        self.greeting = greeting
        self.bomb = bomb
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.registered = threading.Condition()
        self.registrations = 0
        self.sockets = []
        self._write_lock = threading.Lock()
        threading.Thread(target=self._accept, name="bombing-server",
                         daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _peer = self.listener.accept()
            except OSError:
                return
            self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,),
                             name="bombing-server-connection",
                             daemon=True).start()

    def _serve(self, sock):
        self._send(sock, wire.frame(self.greeting))
        reader = wire.FrameReader()
        codec = None
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for payload in reader.feed(data):
                if codec is None:
                    codec = wire.codec_for(payload)
                    continue
                self._answer(sock, codec, codec.decode(payload))

    def _answer(self, sock, codec, message):
        if message.flag != wire.CALL:
            return
        if message.name == "register":
            value = p64(100)
        elif message.name == "get_info":
            value = {"length": 0, "size": 0, "interfaces": ()}
        else:
            value = None
        self._send(sock, wire.frame(codec.encode(
            message.msgid, wire.REPLY, wire.REPLY_NAME, value)))
        if message.name == "register":
            with self.registered:
                self.registrations += 1
                self.registered.notify_all()

    def _send(self, sock, data):
        with self._write_lock:
            sock.sendall(data)

    def fire(self):
        self._send(self.sockets[0], wire.frame(self.bomb))

    def wait_for_registrations(self, count, timeout):
        with self.registered:
            return self.registered.wait_for(
                lambda: self.registrations >= count, timeout)

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            sock.close()


#: Our client in a child process: connects, says "ready", resets its peak
#: RSS, waits until it has logged the protocol error, lost the connection
#: and is connected again, then reports its peak RSS growth as JSON.
CLIENT_SCRIPT = textwrap.dedent("""
    import json, logging, resource, sys, threading, time
    resource.setrlimit(resource.RLIMIT_DATA, (%(cap)d, %(cap)d))
    from zeo.ClientStorage import ClientStorage

    refused = threading.Event()
    lost = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "refused message" in record.getMessage():
                refused.set()
            if "reconnecting in the background" in record.getMessage():
                lost.set()

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().addHandler(Watch())

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    storage = ClientStorage(("127.0.0.1", int(sys.argv[1])),
                            wait_timeout=10, min_disconnect_poll=0.1)
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    print("ready", flush=True)
    logged = refused.wait(30)
    # The error is logged before the connection counts as lost: until
    # then is_connected() still means the old one.
    lost.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            logged and storage.is_connected()):
        time.sleep(0.05)
    print(json.dumps({"grown": kib("VmHWM") - before, "logged": logged,
                      "connected": storage.is_connected()}), flush=True)
    storage.close()
    """) % {"cap": MEMORY_CAP}

CLIENT_BOMBS = dict(SMALL_BOMBS, **LARGE_BOMBS)


@pytest.mark.parametrize("name", CLIENT_BOMBS)
def test_our_client_refuses_a_hostile_server(name):
    greeting, payload = CLIENT_BOMBS[name]
    server = BombingServer(greeting, payload)
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, str(server.address[1])],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert child.stdout.readline().strip() == "ready", \
            child.stderr.read()
        assert server.wait_for_registrations(1, 10)
        server.fire()
        report = json.loads(child.stdout.readline() or "null")
        assert report is not None, child.stderr.read()
        assert report["logged"], "no protocol error was logged"
        assert report["connected"], "the client did not reconnect"
        assert server.wait_for_registrations(2, 10)
        assert report["grown"] < (RSS_BOUND_KIB + LARGE_FRAME_FACTOR
                                  * len(payload) // 1024), (
            "client peak RSS grew by %d KiB" % report["grown"])
        assert child.wait(30) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        server.close()
