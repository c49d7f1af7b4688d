"""The command-line tools: zeopack and zeoup (issue 5).

Each tool runs as users run it (``python -m zeo.scripts.NAME``) against a
real server subprocess on a real FileStorage; exit statuses and printed
lines are what monitoring systems and operators rely on.
"""

import os
import subprocess
import sys

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from raw_client import ruok
from server_process import ServerProcess, free_port, temporary_directory

pytestmark = pytest.mark.timeout(120)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVIRONMENT = {"PYTHONPATH": os.pathsep.join(
    filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
RUN_TIMEOUT = 60
BIG_VALUE = b"x" * 100000


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


def run_tool(name, *args):
    environment = dict(os.environ)
    environment.update(ENVIRONMENT)
    return subprocess.run(
        [sys.executable, "-m", "zeo.scripts.%s" % name] + list(args),
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env=environment, timeout=RUN_TIMEOUT)


def serve(*paths):
    """Our server on the FileStorages at `paths` (storages 1, 2, ...)."""
    args = ["-a", "127.0.0.1:0"]
    for path in paths:
        args += ["-f", path]
    return ServerProcess(args, env=ENVIRONMENT)


def address_text(server):
    return "%s:%d" % server.address


def write_garbage(path):
    """Commit five big revisions of one value, then delete it: most of
    the file is then history that a pack to now removes."""
    database = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    try:
        connection = database.open()
        root = connection.root()
        root["kept"] = "still here"
        for _ in range(5):
            root["big"] = BIG_VALUE + os.urandom(8)
            transaction.commit()
        del root["big"]
        transaction.commit()
        connection.close()
    finally:
        database.close()


def read_root(path):
    database = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
    try:
        connection = database.open()
        root = dict(connection.root())
        connection.close()
        return root
    finally:
        database.close()


# --- zeopack --------------------------------------------------------------

def test_zeopack_through_the_server_shrinks_the_file(tmp):
    path = os.path.join(tmp, "Data.fs")
    write_garbage(path)
    size_before = os.path.getsize(path)
    assert size_before > 500000
    server = serve(path)
    try:
        # --days 1 keeps the last day of history: all of it, here.
        kept = run_tool("zeopack", address_text(server), "--days", "1")
        assert kept.returncode == 0, kept.stderr
        assert os.path.getsize(path) > 500000
        packed = run_tool("zeopack", address_text(server), "-S", "1",
                          "--days", "0")
        assert packed.returncode == 0, packed.stderr
        assert packed.stdout.startswith("packed storage '1' on %s to "
                                        % address_text(server))
        assert os.path.getsize(path) < 10000
        assert os.path.exists(path + ".old")
        # The server serves on after the pack.
        _greeting, status = ruok(server.address)
        assert status["1"]["last-transaction"] != "0" * 16
        assert "pack(" in server.log and "done" in server.log
    finally:
        assert server.stop() == 0
    assert read_root(path) == {"kept": "still here"}


def test_zeopack_packs_several_storages_and_reports_failures(tmp):
    first, second = (os.path.join(tmp, name) for name in ("A.fs", "B.fs"))
    write_garbage(first)
    write_garbage(second)
    server = serve(first, second)
    try:
        result = run_tool("zeopack", address_text(server),
                          "-S", "2", "-S", "nosuch", "-S", "1")
    finally:
        assert server.stop() == 0
    assert result.returncode == 1
    assert "Error: packing storage 'nosuch' on %s failed: ValueError: " \
           "unknown storage: nosuch" % address_text(server) in result.stderr
    assert "packed storage '2'" in result.stdout
    assert "packed storage '1'" in result.stdout
    assert os.path.getsize(first) < 10000
    assert os.path.getsize(second) < 10000


def test_zeopack_without_a_server_fails(tmp):
    result = run_tool("zeopack", "127.0.0.1:%d" % free_port(),
                      "--connect-timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: packing storage '1' on "
                                    "127.0.0.1:")
    assert "refused" in result.stderr


# --- zeoup ------------------------------------------------------------------

def test_zeoup_ok_for_a_server_with_data(tmp):
    path = os.path.join(tmp, "Data.fs")
    write_garbage(path)
    server = serve(path)
    try:
        result = run_tool("zeoup", address_text(server))
        required = run_tool("zeoup", "-S", "1", str(server.address[1]))
    finally:
        assert server.stop() == 0
    assert result.returncode == 0, result.stdout
    assert result.stdout == (
        "OK - 1 storage: '1' (0 clients)|'connections_1'=0 "
        "'active_txns_1'=0 'waiting_1'=0\n")
    assert required.returncode == 0, required.stdout  # bare port: localhost


def test_zeoup_warns_about_an_empty_storage(tmp):
    server = serve(os.path.join(tmp, "Data.fs"))
    try:
        empty = run_tool("zeoup", address_text(server))
        allowed = run_tool("zeoup", "--allow-empty", address_text(server))
    finally:
        assert server.stop() == 0
    assert empty.returncode == 1
    assert empty.stdout.startswith("WARNING - Empty storage '1'|")
    assert allowed.returncode == 0
    assert allowed.stdout.startswith("OK - ")


def test_zeoup_critical_when_down_or_a_storage_is_missing(tmp):
    server = serve(os.path.join(tmp, "Data.fs"))
    try:
        missing = run_tool("zeoup", "-S", "main", address_text(server))
    finally:
        assert server.stop() == 0
    assert missing.returncode == 2
    assert missing.stdout.startswith(
        "CRITICAL - storage 'main' not served (serving: '1')")
    down = run_tool("zeoup", "--timeout", "5", address_text(server))
    assert down.returncode == 2
    assert down.stdout.startswith("CRITICAL - Can't connect to %s: "
                                  % address_text(server))


def test_zeoup_usage_error_is_unknown():
    result = run_tool("zeoup", "not an address")
    assert result.returncode == 3
    assert result.stdout.startswith("UNKNOWN - ")
