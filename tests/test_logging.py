"""Logging as README.rst describes it (issue 5).

Real server subprocesses log through the ``<eventlog>`` section of their
configuration file into files of a temporary directory; protocol
activity comes from raw clients, so the expected lines are known.
"""

import logging
import os
import signal
import threading
import time

import pytest
from ZConfig.components.logger.loghandler import FileHandler
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from raw_client import RawClient, ruok
from server_process import ServerProcess, temporary_directory
from zeo.logfiles import reopen_log_files

pytestmark = pytest.mark.timeout(120)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVIRONMENT = {"PYTHONPATH": os.pathsep.join(
    filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


def start_server(directory, eventlog):
    """Our server on one FileStorage, logging as `eventlog` says.

    `eventlog` is the body of the ``<eventlog>`` section; a handler to
    standard error is added, where the test harness reads the port.
    """
    config = os.path.join(directory, "zeo.conf")
    with open(config, "w") as config_file:
        config_file.write(
            "<zeo>\n  address 127.0.0.1:0\n</zeo>\n"
            "<filestorage 1>\n  path %s\n</filestorage>\n"
            "<eventlog>\n%s\n  <logfile>\n    path STDERR\n    level INFO\n"
            "  </logfile>\n</eventlog>\n"
            % (os.path.join(directory, "Data.fs"), eventlog))
    return ServerProcess(["-C", config], env=ENVIRONMENT)


def read_lines(path):
    with open(path) as log_file:
        return log_file.read().splitlines()


def wait_for_line(path, fragment, timeout=10):
    """Wait until a line of the file at `path` contains `fragment`."""
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path) and any(
                fragment in line for line in read_lines(path)):
            return
        assert time.monotonic() < deadline, (
            "no line with %r in %s" % (fragment, path))
        time.sleep(0.05)


def test_eventlog_handlers_with_custom_format_and_levels(tmp):
    debug_log = os.path.join(tmp, "debug.log")
    info_log = os.path.join(tmp, "info.log")
    server = start_server(tmp, (
        "  level DEBUG\n"
        "  <logfile>\n    path %s\n    level DEBUG\n"
        "    format D|%%(levelname)s|%%(name)s|%%(message)s\n  </logfile>\n"
        "  <logfile>\n    path %s\n    level INFO\n"
        "    format I|%%(levelname)s|%%(message)s\n  </logfile>"
        % (debug_log, info_log)))
    try:
        holder = RawClient(server.address)
        holder.handshake()
        holder.register("1", False)
        holder.send_oneway("set_client_label", "holder")
        waiter = RawClient(server.address)
        waiter.handshake()
        waiter.register("1", False)
        holder_peer = "127.0.0.1:%d" % holder.sock.getsockname()[1]
        waiter_peer = "127.0.0.1:%d" % waiter.sock.getsockname()[1]
        first, second = holder.call("new_oids", 2)
        for client, txn_id, oid in ((holder, 1, first), (waiter, 2, second)):
            client.send_oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
            client.send_oneway("storea", oid, z64, zodb_pickle(MinPO(1)),
                               txn_id)
        holder.call("vote", 1)
        waiter.send_call("vote", 2, msgid=99)  # parked behind the holder
        wait_for_line(debug_log, "vote waits for the commit lock")
        tid = holder.call("tpc_finish", 1)
        waiter.wait_reply(99)
        waiter.call("tpc_abort", 2)
        holder.close()
        waiter.close()
        wait_for_line(info_log, "(holder %s) disconnected" % holder_peer)
        wait_for_line(info_log, "(%s) disconnected" % waiter_peer)
    finally:
        assert server.stop() == 0

    debug_lines = read_lines(debug_log)
    assert all(line.startswith("D|") for line in debug_lines)
    for expected in (
            "D|INFO|zeo.server.connection|(%s) connected" % holder_peer,
            "D|INFO|zeo.server.session|(%s) registered on storage '1'"
            % holder_peer,
            "D|DEBUG|zeo.server.session|(holder %s) committed %s"
            % (holder_peer, tid.hex()),
            "D|DEBUG|zeo.server.session|(%s) vote waits for the commit lock "
            "(1 waiting)" % waiter_peer,
            "D|INFO|zeo.server.connection|(holder %s) disconnected "
            "(client closed)" % holder_peer):
        assert expected in debug_lines
    info_lines = read_lines(info_log)
    assert all(line.startswith("I|") for line in info_lines)
    assert not [line for line in info_lines if line.startswith("I|DEBUG|")]
    assert "I|INFO|(%s) connected" % waiter_peer in info_lines
    assert "I|INFO|stopped" in info_lines


def test_sigusr2_after_rotation_logs_into_a_new_file(tmp):
    log_path = os.path.join(tmp, "zeo.log")
    server = start_server(tmp, (
        "  <logfile>\n    path %s\n    format %%(levelname)s %%(message)s\n"
        "  </logfile>" % log_path))
    try:
        os.rename(log_path, log_path + ".1")  # what logrotate does
        ruok(server.address)  # still logged into the renamed file
        wait_for_line(log_path + ".1", "disconnected (ruok answered)")
        assert not os.path.exists(log_path)
        server.signal(signal.SIGUSR2)
        wait_for_line(log_path, "reopened the log files")
        with RawClient(server.address) as client:
            client.handshake()
            client.register("1", True)
            peer = "127.0.0.1:%d" % client.sock.getsockname()[1]
        wait_for_line(log_path, "(%s) disconnected" % peer)
    finally:
        assert server.stop() == 0
    new_lines = read_lines(log_path)
    assert "INFO (%s) connected" % peer in new_lines
    assert "INFO stopped" in new_lines
    old_text = "\n".join(read_lines(log_path + ".1"))
    assert "listening on" in old_text
    assert peer not in old_text
    assert "reopened" not in old_text


def test_a_log_file_that_cannot_be_reopened_keeps_the_old_one(tmp):
    """SIGUSR2 with a directory where the new log file should go.

    ZConfig's reopen closes the old stream before opening the new one:
    the open failed, the error ended the signal loop and the server
    stopped.  Now the old file stays in use, the error is logged, and
    the next SIGUSR2, once the path is free, switches.
    """
    log_path = os.path.join(tmp, "zeo.log")
    server = start_server(tmp, (
        "  <logfile>\n    path %s\n    format %%(levelname)s %%(message)s\n"
        "  </logfile>" % log_path))
    try:
        os.rename(log_path, log_path + ".1")
        os.mkdir(log_path)
        server.signal(signal.SIGUSR2)
        wait_for_line(log_path + ".1", "cannot reopen the log file %s"
                      % log_path)
        wait_for_line(log_path + ".1", "reopened the log files (0 switched)")
        with RawClient(server.address) as client:
            client.handshake()
            client.register("1", True)
            peer = "127.0.0.1:%d" % client.sock.getsockname()[1]
        wait_for_line(log_path + ".1", "(%s) disconnected" % peer)
        os.rmdir(log_path)
        server.signal(signal.SIGUSR2)
        wait_for_line(log_path, "reopened the log files (1 switched)")
    finally:
        assert server.stop() == 0
    assert "INFO stopped" in read_lines(log_path)


@pytest.fixture
def two_log_files(tmp):
    """A logger writing each line to two ZConfig log files, like a
    DEBUG and an INFO log; detached and closed after the test."""
    paths = [os.path.join(tmp, name) for name in ("debug.log", "info.log")]
    log = logging.getLogger("zeo.tests.two_log_files")
    log.propagate = False
    log.setLevel(logging.INFO)
    handlers = [FileHandler(path) for path in paths]
    for handler in handlers:
        log.addHandler(handler)
    yield log, handlers, paths
    for handler in handlers:
        log.removeHandler(handler)
        handler.close()


def test_reopen_switches_every_log_file_at_once(two_log_files):
    """A line logged while SIGUSR2 reopens the files goes into all the
    old files or all the new ones, never into some of each.

    Why this catches the race: the hook runs when the reopen asks for the
    second handler's lock, after the first handler may have switched and
    before the second has.  There it logs a line from another thread, as
    a connection thread logs ``connected``, and waits for that line to be
    written (at most 2 s).  ZConfig's reopenFiles switches one handler at
    a time, each under its own lock, so the line is written at once: into
    the first handler's new file and the second handler's renamed old
    one, although the new file already exists.  With every lock held
    through the switch, the line waits and then goes into both new files.
    The interleaving is forced, not left to chance.
    """
    log, (first, second), paths = two_log_files
    log.info("before the rotation")
    for path in paths:
        os.rename(path, path + ".1")
    racer = threading.Thread(target=log.info, args=("racing line",),
                             name="racing-logger")
    reopening = threading.current_thread()
    real_acquire = second.acquire

    def acquire_after_a_racing_line():
        if threading.current_thread() is reopening and not racer.is_alive() \
                and racer.ident is None:
            racer.start()
            racer.join(2)
        real_acquire()

    second.acquire = acquire_after_a_racing_line
    try:
        reopen_log_files()
    finally:
        del second.acquire
    racer.join(10)
    assert not racer.is_alive()
    log.info("after the rotation")
    for path in paths:
        assert read_lines(path + ".1") == ["before the rotation"]
        assert read_lines(path) == ["racing line", "after the rotation"]


def test_without_eventlog_the_log_goes_to_standard_error(tmp):
    server = ServerProcess(["-a", "127.0.0.1:0", "-f",
                            os.path.join(tmp, "Data.fs")], env=ENVIRONMENT)
    try:
        ruok(server.address)
        deadline = time.monotonic() + 10
        while "disconnected (ruok answered)" not in server.log:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.05)
    finally:
        assert server.stop() == 0
    lines = server.log.splitlines()
    assert any(line.endswith(" INFO zeo.server listening on %s:%d"
                             % server.address) for line in lines)
    assert any(" INFO zeo.server.connection (127.0.0.1:" in line
               and line.endswith(") connected") for line in lines)
