"""Limits for a server on a network (issue 13, item 4), against a running
server process started the way users start it.

max-connections, register-timeout, max-frame-size, socket-mode and the
monitor address rule: each refusal must close the offending connection,
be logged with the peer's address (without flooding the log) and be
counted in the monitor, while clients that are already connected (raw
clients we hold, and the real ZEO client) keep working.  Bad values of
each key are one-line configuration errors.
"""

import logging
import os
import re
import stat
import struct
import time

import pytest
import transaction
import ZODB
import ZODB.blob
from ZEO.ClientStorage import ClientStorage

from conftest import CLIENT_TIMEOUT, filestorage_section, server_environment
from conftest import wait_until
from raw_client import ConnectionClosed, RawClient
from server_process import (ServerProcess, memory_kib, start_configured_server,
                            stop_all, temporary_directory, write_config)
from test_monitor import MONITOR_LINE, parse_report, read_report
from test_runzeo import assert_configuration_error, run_runzeo
from zeo import server_config
from zeo.server import free_threading, limits
from zeo.server.limits import NetworkLimits, RefusalLog

pytestmark = pytest.mark.timeout(180)

#: How much a server's RSS may grow while refusing a frame: a connection's
#: thread and receive buffer, nothing like the frame's announced size.
RSS_GROWTH_BOUND_KIB = 16 * 1024
#: How long a test waits for the server to close a connection or log.
CLOSE_WAIT = 10


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


@pytest.fixture
def servers():
    """Factory: our server with extra <zeo> lines, on a FileStorage (with
    blobs if asked), started under `umask` if given, and stopped (exit
    status 0) at the end of the test."""
    started = []

    def start(zeo_options, directory, blobs=False, address="127.0.0.1:0",
              umask=None):
        section = filestorage_section("1", os.path.join(directory, "Data.fs"))
        if blobs:
            section = section.replace(
                "</filestorage>", "  blob-dir %s\n</filestorage>"
                % os.path.join(directory, "blobs"))
        config = write_config(directory, "address %s\n%s"
                              % (address, zeo_options), {"1": section})
        previous = os.umask(umask) if umask is not None else None
        try:
            server = ServerProcess(["-C", config], env=server_environment())
        finally:
            if previous is not None:
                os.umask(previous)
        started.append(server)
        return server

    yield start
    assert stop_all(started) == [0] * len(started)


class Established:
    """A real ZEO client (ZODB over ZEO's ClientStorage), connected before
    the hostile part of a test and expected to keep working through it."""

    def __init__(self, address, **options):
        self.storage = ClientStorage(address, wait_timeout=CLIENT_TIMEOUT,
                                     **options)
        self.db = ZODB.DB(self.storage)
        self.commits = 0

    def commit(self, value=None):
        """Commit `value` to the root (the commit's round trips prove the
        connection works); return it as a fresh connection reads it."""
        self.commits += 1
        value = self.commits if value is None else value
        manager = transaction.TransactionManager()
        connection = self.db.open(manager)
        connection.root()["value"] = value
        manager.commit()
        connection.close()
        self.db.cacheMinimize()
        return self.read()

    def read(self):
        manager = transaction.TransactionManager()
        connection = self.db.open(manager)
        try:
            return connection.root()["value"]
        finally:
            connection.close()

    def close(self):
        self.db.close()


@pytest.fixture
def established():
    """Factory of `Established` clients, closed at the end of the test."""
    made = []

    def connect(address, **options):
        made.append(Established(address, **options))
        return made[-1]

    yield connect
    for client in made:
        client.close()


def registered_client(address):
    raw = RawClient(address)
    raw.handshake()
    raw.register()
    return raw


def assert_usable(raw):
    assert raw.call("ping") is None
    assert len(raw.call("lastTransaction")) == 8


def peer_of(raw):
    """The client's address as the server's log lines show it."""
    host, port = raw.sock.getsockname()[:2]
    return "%s:%d" % (host, port)


def wait_for_log(server, pattern, what):
    """Wait until a log line matches `pattern`; return its match."""
    found = []

    def search():
        found[:] = [re.search(pattern, server.log)]
        return found[0] is not None

    wait_until(search, what, CLOSE_WAIT)
    return found[0]


def monitor_figures(server):
    """The server-wide `Label: value` lines of the monitor's report."""
    text = MONITOR_LINE.search(server.log).group(1)
    host, _, port = text.rpartition(":")
    header, _storages = parse_report(read_report((host, int(port))))
    return dict(line.split(": ", 1) for line in header[2:])


def wait_for_connections(server, count):
    """Wait until the server counts `count` connections (one that just
    closed counts until its thread has seen it close)."""
    wait_until(lambda: monitor_figures(server)["Connections"] == str(count),
               "the server counts %d connections" % count, CLOSE_WAIT)


def wait_for_no_connection(server):
    """Wait until the connection `ServerProcess` made to see the server
    up has come and gone: until then it counts against max-connections."""
    wait_for_log(server, r"disconnected \(client closed\)",
                 "the start-up probe leaves")
    wait_for_connections(server, 0)


# --- max-connections ---------------------------------------------------------

def test_connections_beyond_max_connections_are_refused(tmp, servers,
                                                        established):
    server = servers("max-connections 3\nmonitor-address 127.0.0.1:0", tmp)
    wait_for_no_connection(server)
    zeo_client = established(server.address)
    zeo_client.commit()
    first, second = (registered_client(server.address) for _ in range(2))
    extra = RawClient(server.address)
    # Closed at once, before any greeting: no thread was started for it.
    assert extra.is_closed(CLOSE_WAIT)
    with pytest.raises(ConnectionClosed):
        extra.read_frame()
    wait_for_log(server, r"\(%s\) connection refused: 3 connections "
                 r"already" % re.escape(peer_of(extra)), "the refusal line")
    assert_usable(first)
    assert_usable(second)
    assert zeo_client.commit("still here") == "still here"
    figures = monitor_figures(server)
    assert int(figures.pop("Room for clients (file descriptors)")) > 3
    assert figures.pop("Running on") == free_threading.describe()
    assert figures == {
        "Connections": "3", "Connection limit": "3",
        "Connections refused": "1", "Closed for no register": "0",
        "Frames refused": "0"}
    # One leaves, and a new one gets in.
    first.close()
    wait_for_connections(server, 2)
    newcomer = registered_client(server.address)
    assert_usable(newcomer)
    assert_usable(second)
    assert monitor_figures(server)["Connections refused"] == "1"
    for raw in (second, newcomer, extra):
        raw.close()


def test_refusal_lines_are_rate_limited_but_every_refusal_counts(
        tmp, servers):
    server = servers("max-connections 1\nmonitor-address 127.0.0.1:0", tmp)
    wait_for_no_connection(server)
    holder = registered_client(server.address)
    burst = 10
    for _ in range(burst):
        with RawClient(server.address) as refused:
            assert refused.is_closed(CLOSE_WAIT)
    time.sleep(limits.REFUSAL_LOG_INTERVAL * 1.5)
    with RawClient(server.address) as last:
        assert last.is_closed(CLOSE_WAIT)
        wait_for_log(server, r"\(%s\) connection refused"
                     % re.escape(peer_of(last)), "the line after a pause")
    lines = [line for line in server.log_lines
             if "connection refused" in line]
    suppressed = [int(count) for count in re.findall(
        r"\((\d+) more refusals? since the last such line\)",
        "\n".join(lines))]
    # Every refusal is either on a line or counted by the next line.
    assert len(lines) + sum(suppressed) == burst + 1
    assert len(lines) < burst, "\n".join(lines)
    assert suppressed and suppressed[-1] > 0
    assert monitor_figures(server)["Connections refused"] == str(burst + 1)
    assert_usable(holder)
    holder.close()


def test_refusal_log_one_line_per_interval_and_kind(caplog):
    """Driven by a clock that returns the times given, one per refusal."""
    clock = iter([0.0, 0.2, 0.5, 0.6, 1.1, 1.2, 5.0])
    refusal_log = RefusalLog(interval=1.0, clock=lambda: next(clock))
    kind, other = limits.CONNECTION_REFUSED, limits.FRAME_REFUSED
    with caplog.at_level(logging.WARNING, logger=limits.__name__):
        refusal_log.refuse(kind, "a:1", "refused")      # 0.0: logged
        refusal_log.refuse(kind, "a:2", "refused")      # 0.2: suppressed
        refusal_log.refuse(other, "b:1", "big frame")   # 0.5: its own kind
        refusal_log.refuse(kind, "a:3", "refused")      # 0.6: suppressed
        refusal_log.refuse(kind, "a:4", "refused")      # 1.1: logged, +2
        refusal_log.refuse(kind, "a:5", "refused")      # 1.2: suppressed
        refusal_log.refuse(kind, "a:6", "refused")      # 5.0: logged, +1
    assert caplog.messages == [
        "(a:1) refused", "(b:1) big frame",
        "(a:4) refused (2 more refusals since the last such line)",
        "(a:6) refused (1 more refusal since the last such line)"]
    assert refusal_log.counts() == {limits.CONNECTION_REFUSED: 6,
                                    limits.REGISTER_TIMEOUT: 0,
                                    limits.FRAME_REFUSED: 1}


# --- register-timeout ----------------------------------------------------------

def test_connections_that_do_not_register_in_time_are_closed(
        tmp, servers, established):
    timeout = 1
    server = servers("register-timeout %d\nmonitor-address 127.0.0.1:0"
                     % timeout, tmp)
    zeo_client = established(server.address)
    registered = registered_client(server.address)
    started = time.monotonic()
    silent = RawClient(server.address)
    greeted = RawClient(server.address)
    greeted.handshake()
    assert silent.is_closed(timeout + CLOSE_WAIT)
    assert greeted.is_closed(timeout + CLOSE_WAIT)
    assert time.monotonic() - started >= timeout * 0.9
    # The second line, within a second of the first, is left out.
    wait_for_log(server, r"\(%s\) no register within register-timeout "
                 r"\(1s\); closing" % re.escape(peer_of(silent)),
                 "the register-timeout line")
    # Registered clients idle for longer than the timeout stay connected.
    time.sleep(max(0.0, started + 2 * timeout - time.monotonic()))
    assert_usable(registered)
    assert zeo_client.commit("idle but registered") == "idle but registered"
    assert monitor_figures(server)["Closed for no register"] == "2"
    for raw in (registered, silent, greeted):
        raw.close()


def test_the_register_deadline_is_not_reset_by_trickled_bytes(tmp, servers):
    timeout = 1
    server = servers("register-timeout %d" % timeout, tmp)
    with RawClient(server.address) as trickler:
        trickler.handshake()
        started = time.monotonic()
        # A frame of 100 bytes, sent a byte at a time, never completes.
        pending = bytearray(struct.pack(">I", 100) + b"\0" * 100)
        closed = False
        while pending and not closed:
            try:
                trickler.send_raw_bytes(bytes(pending[:1]))
            except (BrokenPipeError, ConnectionResetError):
                break
            del pending[:1]
            closed = trickler.is_closed(timeout / 4)
        assert closed or trickler.is_closed(CLOSE_WAIT)
        assert time.monotonic() - started < timeout + CLOSE_WAIT
        wait_for_log(server, r"\(%s\) no register within"
                     % re.escape(peer_of(trickler)), "the timeout line")
    assert pending, "the whole frame went through"


# --- max-frame-size ------------------------------------------------------------

@pytest.fixture(scope="module")
def frame_limited():
    """A server with max-frame-size 1MB and a real ZEO client on it."""
    with temporary_directory() as directory:
        server = start_configured_server(
            directory, "max-frame-size 1MB", env=server_environment())
        zeo_client = Established(server.address)
        try:
            yield server, zeo_client
        finally:
            zeo_client.close()
            assert stop_all([server]) == [0]


def refused_frame_line(raw, length, limit, when):
    return (r"\(%s\) refused: frame of %d bytes exceeds the limit of %d "
            r"bytes %s; closing" % (re.escape(peer_of(raw)), length, limit,
                                    re.escape(when)))


def send_after_a_quiet_interval(raw, data):
    """Send `data` once no refusal was logged for an interval, so that the
    server logs the refusal it causes instead of counting it only."""
    time.sleep(limits.REFUSAL_LOG_INTERVAL)
    try:
        raw.send_raw_bytes(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending


@pytest.mark.parametrize("register", [False, True],
                         ids=["before-register", "after-register"])
@pytest.mark.parametrize("length", [2 ** 31, 2 ** 32 - 1])
def test_huge_announced_frames_are_refused_unread(frame_limited, register,
                                                  length):
    server, zeo_client = frame_limited
    pid = server.process.pid
    with RawClient(server.address) as raw:
        raw.handshake()
        if register:
            raw.register()
        before = memory_kib(pid, "VmRSS")
        send_after_a_quiet_interval(
            raw, struct.pack(">I", length) + b"\0" * 65536)
        assert raw.is_closed(CLOSE_WAIT)
        grown = memory_kib(pid, "VmRSS") - before
        limit, when = ((1024 ** 2, "(max-frame-size)") if register
                       else (limits.UNREGISTERED_MAX_FRAME_SIZE,
                             "before register"))
        wait_for_log(server, refused_frame_line(raw, length, limit, when),
                     "the frame refusal line")
    assert grown < RSS_GROWTH_BOUND_KIB, "server RSS grew by %d KiB" % grown
    assert zeo_client.commit(length) == length


def test_frames_up_to_max_frame_size_pass_after_register(frame_limited):
    server, zeo_client = frame_limited
    large = "x" * (600 * 1024)  # a record above the unregistered limit
    assert zeo_client.commit(large) == large
    with RawClient(server.address) as raw:
        raw.handshake()
        raw.register()
        send_after_a_quiet_interval(raw, struct.pack(">I", 1024 ** 2 + 1))
        assert raw.is_closed(CLOSE_WAIT)
        wait_for_log(server, refused_frame_line(
            raw, 1024 ** 2 + 1, 1024 ** 2, "(max-frame-size)"),
            "the refusal of one byte too many")
    with RawClient(server.address) as early:
        early.handshake()
        early.send_raw_frame(b"\0" * (100 * 1024))
        assert early.is_closed(CLOSE_WAIT)
    assert zeo_client.read() == large


@pytest.mark.parametrize("zeo_option", ["", "max-frame-size 64KB"],
                         ids=["default", "smallest"])
def test_blob_uploads_pass_max_frame_size(tmp, servers, established,
                                          zeo_option):
    """Blob chunks are 59000 bytes: uploads work with the default limit
    and with the smallest one allowed."""
    server = servers(zeo_option, tmp, blobs=True)
    blob_dir = os.path.join(tmp, "client-blobs")
    zeo_client = established(server.address, blob_dir=blob_dir)
    data = os.urandom(1024 * 1024 + 7)
    manager = transaction.TransactionManager()
    connection = zeo_client.db.open(manager)
    blob = ZODB.blob.Blob(data)
    connection.root()["blob"] = blob
    manager.commit()
    connection.close()
    stored = [os.path.join(directory, name) for directory, _, names
              in os.walk(os.path.join(tmp, "blobs"))
              for name in names if name.endswith(".blob")]
    assert len(stored) == 1, stored
    with open(stored[0], "rb") as received:
        assert received.read() == data


# --- socket-mode ---------------------------------------------------------------

def socket_mode(path):
    status = os.stat(path)
    assert stat.S_ISSOCK(status.st_mode)
    return stat.S_IMODE(status.st_mode)


@pytest.mark.parametrize("zeo_option, mode", [
    ("", 0o600), ("socket-mode 0660", 0o660), ("socket-mode 0640", 0o640)])
def test_unix_sockets_get_socket_mode_whatever_the_umask(
        tmp, servers, established, zeo_option, mode):
    path, monitor_path = (os.path.join(tmp, name)
                          for name in ("zeo.sock", "monitor.sock"))
    server = servers("monitor-address %s\n%s" % (monitor_path, zeo_option),
                     tmp, address=path, umask=0)
    assert server.address == path
    assert socket_mode(path) == mode
    assert socket_mode(monitor_path) == mode
    assert established(path).commit("unix") == "unix"


# --- the monitor address -------------------------------------------------------

@pytest.mark.parametrize("monitor_address", [
    "0.0.0.0:0", "0", "[::]:0", "192.0.2.1:8091"])
def test_a_monitor_reachable_from_other_machines_is_refused(
        tmp, monitor_address):
    config = write_config(tmp, "address 127.0.0.1:0\nmonitor-address %s"
                          % monitor_address)
    result = run_runzeo(["-C", config])
    assert_configuration_error(result, "monitor-allow-remote", "loopback")
    assert len(result.stderr.strip().splitlines()) == 1


def test_monitor_address_on_the_command_line_follows_the_rule(tmp):
    result = run_runzeo(["-a", "127.0.0.1:0", "-m", "0.0.0.0:0",
                         "-f", os.path.join(tmp, "Data.fs")])
    assert_configuration_error(result, "monitor-allow-remote")


@pytest.mark.parametrize("zeo_lines", [
    "monitor-address 127.0.0.1:0",
    "monitor-address 127.0.0.2:0",
    "monitor-address [::1]:0",
    "monitor-address localhost:0",
    "monitor-address /tmp/monitor.sock",
    "monitor-address 0.0.0.0:0\nmonitor-allow-remote true",
])
def test_local_or_explicitly_allowed_monitor_addresses_pass(tmp, zeo_lines):
    config = write_config(tmp, "address 127.0.0.1:0\n" + zeo_lines)
    options = server_config.parse_options(["-C", config])
    assert options.monitor_address is not None


# --- configuration -------------------------------------------------------------

def test_defaults(tmp):
    options = server_config.parse_options(
        ["-C", write_config(tmp, "address 127.0.0.1:0")])
    assert options.limits == NetworkLimits()
    assert options.limits == NetworkLimits(
        max_connections=500, register_timeout=10,
        max_frame_size=256 * 1024 ** 2, socket_mode=0o600)
    assert options.monitor_allow_remote is False


@pytest.mark.parametrize("zeo_line, fragment", [
    ("max-connections 0", "max-connections must be at least 1"),
    ("max-connections -5", "max-connections must be at least 1"),
    ("max-connections many", "'many' is not a whole number"),
    ("register-timeout 0", "register-timeout must be more than 0"),
    ("register-timeout -1", "register-timeout must be more than 0"),
    ("register-timeout soon", "'soon' is not a number of seconds"),
    ("max-frame-size 1000", "max-frame-size must be at least 65536"),
    ("max-frame-size 5GB", "max-frame-size must be at most 4294967295"),
    ("max-frame-size huge", "'huge' is not a size in bytes"),
    ("socket-mode 0999", "not an octal permission mode"),
    ("socket-mode rw-------", "not an octal permission mode"),
    ("socket-mode 01777", "socket-mode must be at most 0777"),
    ("monitor-allow-remote perhaps", "perhaps"),
])
def test_bad_values_are_one_line_errors(tmp, zeo_line, fragment):
    config = write_config(tmp, "address 127.0.0.1:0\n" + zeo_line)
    result = run_runzeo(["-C", config])
    assert_configuration_error(result, fragment, "(line 3)")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("settings", [
    dict(max_connections=0), dict(register_timeout=0),
    dict(max_frame_size=2 ** 32), dict(socket_mode=0o1000)])
def test_network_limits_refuse_bad_values_in_python_too(settings):
    with pytest.raises(ValueError):
        NetworkLimits(**settings)
