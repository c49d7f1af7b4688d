"""The server says what it runs on, and warns about unchecked extensions.

These run on both builds; what they expect follows the interpreter that
runs them (`make test` with the GIL, `make test-ft` without it).  The
server processes inherit the interpreter and PYTHON_GIL.
"""

import importlib
import logging
import os
import re
import sys

import psycopg2

from server_process import temporary_directory
from test_monitor import read_report, start_monitored_server
from zeo.server import free_threading

RUNNING_ON = re.compile(r"running on (\S+) (\S+) \((.*)\), (\d+) CPUs usable")


def expected_gil_words():
    if not free_threading.free_threaded_build():
        return "GIL"
    if free_threading.gil_enabled():
        return "free-threaded build, GIL enabled"
    return "free-threaded build, GIL disabled"


def test_the_server_logs_and_shows_its_interpreter_gil_and_cpus():
    with temporary_directory() as directory:
        server = start_monitored_server(directory)
        try:
            report = read_report(server.monitor_address)
        finally:
            assert server.stop() == 0
    implementation, version, gil, cpus = RUNNING_ON.search(
        server.log).groups()
    assert implementation == sys.implementation.name
    assert version == sys.version.split()[0]
    assert gil == expected_gil_words()
    assert int(cpus) == len(os.sched_getaffinity(0))
    assert report.splitlines()[2] == (
        "Running on: %s" % free_threading.describe())


def test_only_extensions_outside_the_stdlib_and_the_audited_ones_count():
    modules = {name: importlib.import_module(name) for name in (
        "_json", "BTrees._fsBTree", "persistent.cPersistence",
        "zodbpickle._pickle", "psycopg2._psycopg", "psycopg2")}
    assert free_threading.unaudited_extensions(modules) == [
        "psycopg2._psycopg"]


def test_with_the_gil_off_each_unchecked_extension_is_warned_about(caplog):
    """psycopg2 is imported above: unchecked; the GIL build warns
    about nothing."""
    assert psycopg2.__name__ in sys.modules
    with caplog.at_level(logging.INFO, logger="zeo.server"):
        warned = free_threading.check_at_start()
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    if free_threading.gil_enabled():
        assert (warned, warnings) == ([], [])
    else:
        assert "psycopg2._psycopg" in warned
        assert len(warnings) == len(warned)
        assert any("C extension psycopg2._psycopg was not checked" in text
                   for text in warnings)
