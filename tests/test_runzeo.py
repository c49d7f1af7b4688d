"""``python -m zeo.runzeo``: configuration, start-up errors, signals.

Every server here is a real subprocess started the way users start it, on
real FileStorages in a temporary directory and real sockets on 127.0.0.1.
The real ZEO ClientStorage plays the client where a test needs data to go
through the server.
"""

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64
from ZEO.ClientStorage import ClientStorage

from server_process import ServerProcess, free_port, temporary_directory
from zeo import server_config

pytestmark = pytest.mark.timeout(180)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: So that ``-m zeo.runzeo`` finds this checkout from any working directory.
ENVIRONMENT = {"PYTHONPATH": os.pathsep.join(
    filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
RUN_TIMEOUT = 60
CLIENT_WAIT = 30


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


def start_server(args, env=None, address=None):
    environment = dict(ENVIRONMENT)
    environment.update(env or {})
    return ServerProcess(args, env=environment, address=address)


def run_runzeo(args, env=None):
    """Run runzeo to completion (for runs that must fail or exit at once)."""
    environment = dict(os.environ)
    environment.update(ENVIRONMENT)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "zeo.runzeo"] + list(args),
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env=environment, timeout=RUN_TIMEOUT)


def write_file(path, text):
    with open(path, "w") as output:
        output.write(text)
    return path


def filestorage_section(name, path):
    header = "<filestorage %s>" % name if name else "<filestorage>"
    return "%s\n  path %s\n</filestorage>\n" % (header, path)


def write_server_config(directory, zeo_lines, storage_sections,
                        extra=""):
    text = "<zeo>\n%s\n</zeo>\n\n%s\n%s" % (
        "\n".join("  " + line for line in zeo_lines),
        "\n".join(storage_sections), extra)
    return write_file(os.path.join(directory, "zeo.conf"), text)


def write_config_logging_to(directory, log_path, log_format=None):
    """A config serving `directory`/Data.fs on a free port, logging to
    `log_path` (in `log_format` if given) and to standard error, where
    the test harness learns the port."""
    format_line = "    format %s\n" % log_format if log_format else ""
    eventlog = (
        "<eventlog>\n"
        "  <logfile>\n    path %s\n%s  </logfile>\n"
        "  <logfile>\n    path STDERR\n  </logfile>\n"
        "</eventlog>\n" % (log_path, format_line))
    return write_server_config(
        directory, ["address 127.0.0.1:0"],
        [filestorage_section("1", os.path.join(directory, "Data.fs"))],
        eventlog)


def read_greeting(address):
    """The handshake frame the server sends first: b"Z5" or b"M5"."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(address)
    else:
        sock = socket.create_connection(address, timeout=10)
    with sock:
        header = _receive_exactly(sock, 4)
        return _receive_exactly(sock, int.from_bytes(header, "big"))


def _receive_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the connection early"
        data += chunk
    return data


def wait_for(predicate, timeout=20, message="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + message
        time.sleep(0.05)


def commit_through_zeo(address, key, value, storage="1"):
    """Commit ``root[key] = PersistentMapping(value=value)`` over ZEO."""
    client = ClientStorage(address, storage=storage, wait_timeout=CLIENT_WAIT)
    db = ZODB.DB(client)
    try:
        with db.transaction() as connection:
            connection.root()[key] = PersistentMapping(value=value)
    finally:
        db.close()


def read_filestorage(path, key):
    """``root[key]["value"]`` read straight from a FileStorage file."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
    try:
        connection = db.open()
        try:
            return connection.root()[key]["value"]
        finally:
            connection.close()
    finally:
        db.close()


def transaction_count(path):
    storage = ZODB.FileStorage.FileStorage(path, read_only=True)
    try:
        return sum(1 for _ in storage.iterator())
    finally:
        storage.close()


# --- starting and serving ------------------------------------------------

def test_port_zero_serves_and_logs_the_real_port(tmp):
    path = os.path.join(tmp, "Data.fs")
    with start_server(["-a", "127.0.0.1:0", "-f", path]) as server:
        host, port = server.address
        assert host == "127.0.0.1"
        assert port != 0
        assert "listening on 127.0.0.1:%d" % port in server.log
        assert read_greeting(server.address) == b"Z5"
        assert server.stop() == 0
    assert os.path.exists(path)


def test_configuration_file_with_eventlog_to_a_file(tmp):
    log_path = os.path.join(tmp, "zeo.log")
    config = write_config_logging_to(
        tmp, log_path, "CUSTOM|%(levelname)s|%(message)s")
    with start_server(["-C", config]) as server:
        port = server.address[1]
        assert server.stop() == 0
    with open(log_path) as log_file:
        lines = log_file.read().splitlines()
    assert "CUSTOM|INFO|listening on 127.0.0.1:%d" % port in lines
    assert lines and all(line.startswith("CUSTOM|") for line in lines)


def test_two_named_storages_are_served_separately(tmp):
    first = os.path.join(tmp, "first.fs")
    second = os.path.join(tmp, "second.fs")
    config = write_server_config(
        tmp, ["address 127.0.0.1:0"],
        [filestorage_section("first", first),
         filestorage_section("second", second)])
    with start_server(["-C", config]) as server:
        commit_through_zeo(server.address, "where", "first", "first")
        commit_through_zeo(server.address, "where", "second", "second")
        assert server.stop() == 0
    assert read_filestorage(first, "where") == "first"
    assert read_filestorage(second, "where") == "second"


def test_repeated_filename_options_are_storages_1_and_2(tmp):
    paths = [os.path.join(tmp, "a.fs"), os.path.join(tmp, "b.fs")]
    with start_server(["-a", "127.0.0.1:0",
                       "-f", paths[0], "-f", paths[1]]) as server:
        commit_through_zeo(server.address, "key", "in two", "2")
        assert server.stop() == 0
    assert read_filestorage(paths[1], "key") == "in two"
    assert transaction_count(paths[0]) == 0


def test_unnamed_mappingstorage_is_storage_1(tmp):
    config = write_server_config(
        tmp, ["address 127.0.0.1:0"], ["<mappingstorage>\n</mappingstorage>"])
    with start_server(["-C", config]) as server:
        commit_through_zeo(server.address, "key", "kept in memory")
        client = ClientStorage(server.address, wait_timeout=CLIENT_WAIT)
        db = ZODB.DB(client)
        try:
            with db.transaction() as connection:
                assert connection.root()["key"]["value"] == "kept in memory"
        finally:
            db.close()
        assert server.stop() == 0


def test_command_line_overrides_the_configuration_file(tmp):
    config_path = os.path.join(tmp, "from-config.fs")
    cli_path = os.path.join(tmp, "from-command-line.fs")
    config = write_server_config(
        tmp, ["address 127.0.0.1:%d" % free_port()],
        [filestorage_section("main", config_path)])
    with start_server(["-C", config, "-a", "127.0.0.1:0",
                       "-f", cli_path, "-r"]) as server:
        client = ClientStorage(server.address, read_only_fallback=True,
                               wait_timeout=CLIENT_WAIT)
        try:
            assert client.isReadOnly()
        finally:
            client.close()
        assert server.stop() == 0
    assert os.path.exists(cli_path)
    assert not os.path.exists(config_path)


def test_every_zeo_key_is_accepted(tmp):
    pid_path = os.path.join(tmp, "zeo.pid")
    # Fixed ports: the address is known without reading the log, where
    # the monitor announces itself too.
    port, monitor_port = free_port(), free_port()
    config = write_server_config(tmp, [
        "address 127.0.0.1:%d" % port,
        "read-only true",
        "invalidation-queue-size 10",
        "invalidation-age 3600",
        "transaction-timeout 30",
        "monitor-address 127.0.0.1:%d" % monitor_port,
        "pid-filename %s" % pid_path,
        "client-conflict-resolution true",
        "msgpack false",
        "busy-poll 500",
    ], [filestorage_section("1", os.path.join(tmp, "Data.fs"))])
    with start_server(["-C", config],
                      address=("127.0.0.1", port)) as server:
        with open(pid_path) as pid_file:
            assert pid_file.read().strip() == str(server.process.pid)
        client = ClientStorage(server.address, read_only_fallback=True,
                               wait_timeout=CLIENT_WAIT)
        try:
            assert client.isReadOnly()
        finally:
            client.close()
        with socket.create_connection(("127.0.0.1", monitor_port),
                                      timeout=10) as monitor:
            report = monitor.makefile("rb").read()
        assert report.strip()
        assert server.stop() == 0


@pytest.mark.parametrize("config_line, args, microseconds", [
    (None, [], 300),
    ("busy-poll 0", [], 0),
    ("busy-poll 50", [], 50),
    ("busy-poll 50", ["--busy-poll", "1000"], 1000),
])
def test_busy_poll_comes_from_the_file_or_the_command_line(
        tmp, config_line, args, microseconds):
    lines = ["address 127.0.0.1:0"] + ([config_line] if config_line else [])
    config = write_server_config(
        tmp, lines, [filestorage_section("1", os.path.join(tmp, "Data.fs"))])
    options = server_config.parse_options(["-C", config] + args)
    assert options.busy_poll_microseconds == microseconds


@pytest.mark.parametrize("env, msgpack_key, greeting", [
    ({"ZEO_MSGPACK": "1"}, None, b"M5"),
    ({"ZEO_MSGPACK": ""}, None, b"Z5"),
    ({"ZEO_MSGPACK": "1"}, "msgpack false", b"Z5"),
    ({"ZEO_MSGPACK": ""}, "msgpack true", b"M5"),
])
def test_msgpack_key_or_environment_chooses_the_encoding(
        tmp, env, msgpack_key, greeting):
    lines = ["address 127.0.0.1:0"] + ([msgpack_key] if msgpack_key else [])
    config = write_server_config(
        tmp, lines, [filestorage_section("1", os.path.join(tmp, "Data.fs"))])
    with start_server(["-C", config], env=env) as server:
        assert read_greeting(server.address) == greeting
        assert server.stop() == 0


def test_unix_socket_address_replaces_a_stale_socket_file(tmp):
    socket_path = os.path.join(tmp, "zeo.sock")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(socket_path)
    leftover.close()
    assert os.path.exists(socket_path)
    with start_server(["-a", socket_path,
                       "-f", os.path.join(tmp, "Data.fs")]) as server:
        assert server.address == socket_path
        assert read_greeting(socket_path) == b"Z5"
        assert server.stop() == 0
    assert not os.path.exists(socket_path)


# --- signals, pid file, data safety -------------------------------------

def test_sigterm_exits_0_and_the_pid_file_lives_while_serving(tmp):
    pid_path = os.path.join(tmp, "zeo.pid")
    with start_server(["-a", "127.0.0.1:0", "-f", os.path.join(tmp, "Data.fs"),
                       "--pid-file", pid_path]) as server:
        with open(pid_path) as pid_file:
            assert pid_file.read().strip() == str(server.process.pid)
        server.signal(signal.SIGTERM)
        assert server.process.wait(RUN_TIMEOUT) == 0
    assert not os.path.exists(pid_path)
    assert "Traceback" not in server.log


@pytest.mark.parametrize("signum, status", [
    (signal.SIGINT, 0),
    (signal.SIGHUP, 1),
])
def test_sigint_and_sighup_stop_the_server(tmp, signum, status):
    with start_server(["-a", "127.0.0.1:0",
                       "-f", os.path.join(tmp, "Data.fs")]) as server:
        server.signal(signum)
        assert server.process.wait(RUN_TIMEOUT) == status
    assert "received %s" % signal.Signals(signum).name in server.log


def test_committed_data_survives_sigterm(tmp):
    path = os.path.join(tmp, "Data.fs")
    with start_server(["-a", "127.0.0.1:0", "-f", path]) as server:
        client = ClientStorage(server.address, wait_timeout=CLIENT_WAIT)
        db = ZODB.DB(client)
        try:
            with db.transaction() as connection:
                connection.root()["survivor"] = PersistentMapping(
                    value=list(range(100)))
            # Still connected when the server is told to stop.
            assert server.stop() == 0
        finally:
            db.close()
    assert read_filestorage(path, "survivor") == list(range(100))


def test_sigterm_during_a_commit_leaves_a_valid_filestorage(tmp):
    path = os.path.join(tmp, "Data.fs")
    with start_server(["-a", "127.0.0.1:0", "-f", path]) as server:
        commit_through_zeo(server.address, "before", "committed")
        client = ClientStorage(server.address, wait_timeout=5)
        try:
            in_flight = TransactionMetaData()
            client.tpc_begin(in_flight)
            client.store(client.new_oid(), z64, zodb_pickle(MinPO("voted")),
                         "", in_flight)
            client.tpc_vote(in_flight)
            # The server holds the commit lock for us now.
            assert server.stop() == 0
            client.tpc_abort(in_flight)
        finally:
            client.close()
    assert "Traceback" not in server.log
    # The voted transaction was aborted, not half-written: only the root's
    # creation and the first commit are in the file, and it reads fine.
    assert transaction_count(path) == 2
    assert read_filestorage(path, "before") == "committed"


def test_sigusr2_reopens_the_log_file(tmp):
    log_path = os.path.join(tmp, "zeo.log")
    config = write_config_logging_to(tmp, log_path)
    with start_server(["-C", config]) as server:
        os.rename(log_path, log_path + ".1")
        server.signal(signal.SIGUSR2)
        wait_for(lambda: os.path.exists(log_path), message="a new log file")
        assert server.stop() == 0
    with open(log_path) as log_file:
        assert "reopened the log files" in log_file.read()
    with open(log_path + ".1") as old_log:
        assert "listening on" in old_log.read()


# --- usage and errors ---------------------------------------------------

def test_help_exits_0_and_mentions_the_configuration_option():
    result = run_runzeo(["-h"])
    assert result.returncode == 0
    assert "-C" in result.stdout
    assert "--configure" in result.stdout


def test_version_is_ours():
    result = run_runzeo(["--version"])
    assert result.returncode == 0
    name, _, version = result.stdout.strip().partition(" ")
    assert name == "zeo-threaded"
    try:
        assert version == importlib.metadata.version("zeo-threaded")
    except importlib.metadata.PackageNotFoundError:
        assert version.startswith("unknown")


def assert_configuration_error(result, *fragments):
    """Exit status 2, one ``Error:`` line at the end, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert [line for line in lines if line.startswith("Error")] == lines[-1:]
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.mark.parametrize("address, fragment", [
    ("127.0.0.1:99999", "port"),
    ("127.0.0.1:abc", "port"),
    ("localhost", "no port"),
])
def test_bad_address_on_the_command_line(tmp, address, fragment):
    result = run_runzeo(["-a", address, "-f", os.path.join(tmp, "Data.fs")])
    assert_configuration_error(result, address, fragment)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(tmp, "Data.fs"))


@pytest.mark.parametrize("zeo_lines, fragment", [
    ([], "address"),
    (["address 127.0.0.1:0", "no-such-key 1"], "no-such-key"),
    (["address 127.0.0.1:99999"], "99999"),
    (["address 127.0.0.1:abc"], "abc"),
    (["address 127.0.0.1:0", "read-only perhaps"], "perhaps"),
    (["address 127.0.0.1:0", "busy-poll -1"], "busy-poll"),
    (["address 127.0.0.1:0", "busy-poll 0.5"], "0.5"),
])
def test_bad_zeo_section(tmp, zeo_lines, fragment):
    config = write_server_config(
        tmp, zeo_lines, [filestorage_section("1", os.path.join(tmp, "x.fs"))])
    result = run_runzeo(["-C", config])
    assert_configuration_error(result, fragment)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sections, fragment", [
    ([], "storage"),
    (["<mappingstorage>\n</mappingstorage>",
      "<mappingstorage>\n</mappingstorage>"], "unnamed"),
    (["<mappingstorage>\n</mappingstorage>",
      "<mappingstorage 1>\n</mappingstorage>"], "'1'"),
    (["<mappingstorage a>\n</mappingstorage>",
      "<mappingstorage a>\n</mappingstorage>"], "'a'"),
])
def test_bad_storage_sections(tmp, sections, fragment):
    config = write_server_config(tmp, ["address 127.0.0.1:0"], sections)
    result = run_runzeo(["-C", config])
    assert_configuration_error(result, fragment)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, fragment", [
    (["-f", "Data.fs"], "-a"),
    (["-a", "127.0.0.1:0"], "-f"),
    (["--no-such-option"], "--no-such-option"),
    (["-a", "127.0.0.1:0", "-f", "Data.fs", "-t", "0"], "timeout"),
    (["-a", "127.0.0.1:0", "-f", "Data.fs", "-t", "soon"], "soon"),
    (["-a", "127.0.0.1:0", "-f", "Data.fs", "--busy-poll", "-3"],
     "busy-poll"),
    (["-a", "127.0.0.1:0", "-f", "Data.fs", "--busy-poll", "soon"], "soon"),
    (["-a", "127.0.0.1:0", "-f", "Data.fs",
      "--pid-file", "/no/such/directory/zeo.pid"], "/no/such/directory"),
])
def test_bad_command_line(tmp, args, fragment):
    result = run_runzeo(args)
    assert_configuration_error(result, fragment)
    assert len(result.stderr.strip().splitlines()) == 1


def test_configuration_file_that_does_not_exist(tmp):
    missing = os.path.join(tmp, "missing.conf")
    result = run_runzeo(["-C", missing])
    assert_configuration_error(result, missing, "does not exist")
    assert len(result.stderr.strip().splitlines()) == 1


def test_filestorage_in_a_missing_directory(tmp):
    path = os.path.join(tmp, "no-such-directory", "Data.fs")
    result = run_runzeo(["-a", "127.0.0.1:0", "-f", path])
    assert_configuration_error(result, "cannot open storage '1'")


def test_storage_that_fails_to_open(tmp):
    path = write_file(os.path.join(tmp, "Data.fs"), "not a FileStorage")
    config = write_server_config(
        tmp, ["address 127.0.0.1:0"], [filestorage_section("main", path)])
    result = run_runzeo(["-C", config])
    assert_configuration_error(result, "cannot open storage 'main'")
    with open(path) as untouched:
        assert untouched.read() == "not a FileStorage"


def test_address_already_in_use(tmp):
    path = os.path.join(tmp, "Data.fs")
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        result = run_runzeo(["-a", "127.0.0.1:%d" % port, "-f", path])
    assert_configuration_error(result, "127.0.0.1:%d" % port, "in use")
    # The storage was closed again: a second process can open it.
    ZODB.FileStorage.FileStorage(path).close()


def test_unix_socket_already_in_use(tmp):
    socket_path = os.path.join(tmp, "zeo.sock")
    with socket.socket(socket.AF_UNIX) as occupant:
        occupant.bind(socket_path)
        occupant.listen()
        result = run_runzeo(["-a", socket_path,
                             "-f", os.path.join(tmp, "Data.fs")])
    assert_configuration_error(result, socket_path, "in use")


def test_unix_address_never_replaces_a_file(tmp):
    precious = write_file(os.path.join(tmp, "precious"), "keep me")
    result = run_runzeo(["-a", precious, "-f", os.path.join(tmp, "Data.fs")])
    assert_configuration_error(result, precious, "not a socket")
    with open(precious) as untouched:
        assert untouched.read() == "keep me"


# --- address parsing ----------------------------------------------------

@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:8100", ("127.0.0.1", 8100)),
    ("8100", ("", 8100)),
    ("[::1]:8100", ("::1", 8100)),
    ("/var/run/zeo.sock", "/var/run/zeo.sock"),
    ("sockets/zeo", "sockets/zeo"),
])
def test_parse_address(text, address):
    assert server_config.parse_address(text) == address


@pytest.mark.parametrize("text", ["host:65536", "host:-1", "host:", "host"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError, match="port"):
        server_config.parse_address(text)
