"""The slow-operation log (issue 16, item 3) against a real server.

A client that sleeps between vote and finish holds the commit lock past
`slow-transaction-threshold`: exactly one WARNING line must name it (its
label and address), its size, and put the time where it went (waiting
for tpc_finish).  Quick transactions beside it are not logged.  Loads
past `slow-load-threshold` are logged the same way, and the monitor's
report shows the last lines.
"""

import re
import time

import pytest
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from conftest import wait_until
from server_process import temporary_directory
from test_monitor import commit, connect, read_report, start_monitored_server

pytestmark = pytest.mark.timeout(120)

SLEEP_BEFORE_FINISH = 1.0
SLOW_LINE = re.compile(
    r"WARNING zeo\.server\.slow slow transaction \(committed\) on storage "
    r"'1': client 'slowpoke' \(127\.0\.0\.1:\d+\) held the commit lock "
    r"(?P<held>[\d.]+)s for 1 records, (?P<bytes>\d+) bytes: "
    r"waiting for the lock [\d.]+s, storing [\d.]+s, voting [\d.]+s, "
    r"waiting for tpc_finish (?P<waiting>[\d.]+)s, finishing [\d.]+s$")


@pytest.fixture
def server():
    with temporary_directory() as directory:
        server = start_monitored_server(
            directory, options="slow-transaction-threshold 0.5\n"
                               "slow-load-threshold 0")
        try:
            yield server
        finally:
            server.stop()


def slow_lines(server, kind):
    return [line for line in server.log.splitlines()
            if "zeo.server.slow slow %s" % kind in line]


def test_a_commit_held_over_the_threshold_is_logged_once_with_its_phases(
        server):
    slow = connect(server, label="slowpoke")
    quick = connect(server, label="quick")
    oid, other = slow.call("new_oids", 2)
    data = zodb_pickle(MinPO(1))
    commit(slow, 1, [(oid, z64, data)], finish=False)
    time.sleep(SLEEP_BEFORE_FINISH)
    slow.call("tpc_finish", 1)
    commit(quick, 2, [(other, z64, zodb_pickle(MinPO(2)))])
    wait_until(lambda: slow_lines(server, "transaction"),
               "the slow transaction is logged")
    time.sleep(0.2)  # a second line, if any, would be there by now

    [line] = slow_lines(server, "transaction")
    match = SLOW_LINE.search(line)
    assert match, line
    assert float(match["held"]) >= SLEEP_BEFORE_FINISH
    assert float(match["waiting"]) >= SLEEP_BEFORE_FINISH
    # The record's bytes: its data, with its oid and serial.
    assert len(data) < int(match["bytes"]) <= len(data) + 16

    report = read_report(server.monitor_address)
    shown = [text for text in report.splitlines()
             if text.startswith("Slow: ")]
    assert any("slow transaction (committed)" in text
               and "'slowpoke'" in text for text in shown), report
    assert "Slow operations: the last %d" % len(shown) in report


def test_loads_over_the_threshold_are_logged_with_the_object(server):
    client = connect(server, label="reader")
    [oid] = client.call("new_oids", 1)
    commit(client, 1, [(oid, z64, zodb_pickle(MinPO(1)))])
    client.call("loadBefore", oid, b"\xff" * 8)
    wait_until(lambda: any(oid.hex() in line
                           for line in slow_lines(server, "load")),
               "the load is logged")
    [line] = [line for line in slow_lines(server, "load")
              if oid.hex() in line]
    assert re.search(r"slow load on storage '1': client 'reader' "
                     r"\(127\.0\.0\.1:\d+\) waited [\d.]+s for object %s "
                     r"\(\d+ bytes\)$" % oid.hex(), line), line
