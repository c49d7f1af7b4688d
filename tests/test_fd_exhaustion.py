"""A server out of file descriptors waits for one, without spinning.

A real server process is given a file-descriptor limit that leaves room
for two more clients; a third one then waits in the listen queue while
every accept fails with EMFILE.  The accept loop must back off (not try
again at full CPU) and say so once in the log, and the waiting client
gets in as soon as another leaves.
"""

import os
import resource
import time

import pytest

from conftest import server_environment
from raw_client import RawClient
from server_process import start_configured_server, temporary_directory
from test_network_limits import assert_usable, registered_client, wait_for_log

pytestmark = pytest.mark.timeout(60)

#: Seconds over which the server's CPU time is read while it cannot
#: accept.
WATCHED = 2.0
#: The share of one CPU the server may use meanwhile: spinning on the
#: failing accept took all of it.
MOST_CPU_SHARE = 0.25
STARVED = r"cannot accept connections: Too many open files"


def cpu_seconds(pid):
    """User plus system CPU time process `pid` has used."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def server():
    with temporary_directory() as directory:
        server = start_configured_server(directory, env=server_environment())
        try:
            yield server
        finally:
            assert server.stop() == 0


def test_accept_backs_off_and_logs_once_without_descriptors(server):
    pid = server.process.pid
    # The connection that checked the server was up has ended.
    wait_for_log(server, r"disconnected \(client closed\)", "its end")
    room = len(os.listdir("/proc/%d/fd" % pid)) + 2
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (room, room))
    first, second = registered_client(server.address), \
        registered_client(server.address)
    waiting = RawClient(server.address)  # queued: no descriptor left
    try:
        wait_for_log(server, STARVED, "the out-of-descriptors line")
        used = cpu_seconds(pid)
        time.sleep(WATCHED)
        assert cpu_seconds(pid) - used < WATCHED * MOST_CPU_SHARE
        assert_usable(second)
        first.close()  # frees a descriptor: the waiting client gets in
        waiting.handshake()
        waiting.register()
        assert_usable(waiting)
        wait_for_log(server, r"accepting connections again after \d+ "
                     r"failed accepts", "the recovery line")
        assert len([line for line in server.log_lines
                    if "cannot accept connections" in line]) == 1
    finally:
        for raw in (first, second, waiting):
            raw.close()
