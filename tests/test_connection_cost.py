"""What an idle client costs the server (issue 14, item 1).

A real server process holds 1,000 idle registered raw-protocol
connections while a real ZODB client loads and commits beside them.  The
server's resident memory per connection, its threads and its file
descriptors are read from /proc; all of them must come back once the
idle clients leave.
"""

import os
import platform
import re
import resource
import time

import pytest

from conftest import server_environment, wait_until
from server_process import memory_kib, start_configured_server
from server_process import temporary_directory
from test_network_limits import Established, registered_client
from zeo.server import free_threading
from zeo.server.memory import FreedMemory, limit_malloc_arenas

IDLE_CLIENTS = 1000
#: Server RSS one idle registered connection may add (the issue's
#: target; about 24 KiB measured: 16 KiB of the thread's stack pages,
#: its Python thread state, the socket, the session).  A free-threaded
#: interpreter gives every thread its own allocator heaps, each holding
#: pages once the thread has allocated anything: about 260 KiB measured
#: there (README.rst, "Free-threaded Python").
RSS_PER_CONNECTION_KIB = 384 if free_threading.free_threaded_build() else 64
#: RSS the server may keep once every idle client has left, after one
#: round of them and after the next.  Measured here: 7 to 10 MB (4.7 to
#: 7.4 MB without the working client beside them), where it was 29 to
#: 43 MB before the connections' reference cycles were broken, receive
#: buffers became anonymous maps and freed memory was trimmed.  What
#: stays is mostly Python's own allocator: it keeps a 1 MiB arena while
#: any object in it lives, and the few objects made during the burst that
#: outlive it (the working client's commits, say) pin several.  On a
#: free-threaded interpreter the heaps of ended threads stay with the
#: process until other threads take their pages over: 105 to 125 MB
#: measured after a round, the next round reusing them.
RSS_KEPT_KIB = (192 if free_threading.free_threaded_build() else 16) * 1024
SETTLE_TIMEOUT = 30


@pytest.fixture
def server():
    with temporary_directory() as directory:
        server = start_configured_server(
            directory, "max-connections %d" % (IDLE_CLIENTS + 50),
            env=server_environment())
        try:
            yield server
        finally:
            assert server.stop() == 0


@pytest.fixture
def enough_descriptors():
    """This process opens one socket per idle client: raise its soft
    open-file limit for the test (and restore it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CLIENTS + 200
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail("the test needs %d file descriptors; the hard limit "
                    "is %d" % (needed, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def usage(pid):
    """(RSS KiB, threads, open file descriptors) of process `pid`."""
    return (memory_kib(pid, "VmRSS"), memory_kib(pid, "Threads"),
            len(os.listdir("/proc/%d/fd" % pid)))


def settle(pid, threads, fds, rss_below=None):
    """Wait until the server is down to `threads` and `fds` again (the
    connection threads see their sockets close and end), and to an RSS
    under `rss_below` KiB if given (the server gives freed memory back
    once the closes are over: `zeo.server.memory`)."""
    wait_until(lambda: usage(pid)[1:] == (threads, fds),
               "the server is back to %d threads and %d descriptors"
               % (threads, fds), SETTLE_TIMEOUT)
    if rss_below is not None:
        wait_until(lambda: usage(pid)[0] < rss_below,
                   "the server's RSS is back under %d KiB" % rss_below,
                   SETTLE_TIMEOUT)
    time.sleep(0.2)  # let freed memory reach the allocator
    return usage(pid)


def idle_round(server, client, before, baseline):
    """Connect IDLE_CLIENTS registered clients, check the server's cost
    (against its usage `before`) while a real client works beside them,
    close them; the server's usage once they are gone and it is back
    within RSS_KEPT_KIB of its `baseline` RSS."""
    pid = server.process.pid
    base_rss, base_threads, base_fds = before
    idle = []
    try:
        for _ in range(IDLE_CLIENTS):
            idle.append(registered_client(server.address))
        wait_until(lambda: usage(pid)[1] == base_threads + IDLE_CLIENTS,
                   "one server thread per idle client", SETTLE_TIMEOUT)
        assert client.read() == client.commits
        assert client.commit() == client.commits
        rss, threads, fds = usage(pid)
        per_connection = (rss - base_rss) / IDLE_CLIENTS
        print("server RSS per idle connection: %.1f KiB" % per_connection)
        assert per_connection < RSS_PER_CONNECTION_KIB
        assert threads == base_threads + IDLE_CLIENTS
        assert fds == base_fds + IDLE_CLIENTS
    finally:
        for raw in idle:
            raw.close()
    return settle(pid, base_threads, base_fds, baseline[0] + RSS_KEPT_KIB)


def test_idle_connections_cost_one_thread_and_little_memory(
        server, enough_descriptors):
    pid = server.process.pid
    # The server raised its soft open-file limit and said how many
    # clients that leaves room for.
    match = re.search(r"file descriptor limit (\d+)\S* .*\(hard (\d+)\): "
                      r"room for (\d+) clients", server.log)
    assert match, server.log
    assert match.group(1) == match.group(2)
    assert int(match.group(3)) > IDLE_CLIENTS
    client = Established(server.address)
    try:
        client.commit()
        # Warm up what the first connections allocate once (code paths,
        # the pooled receive buffers).
        _rss, threads, fds = usage(pid)
        registered_client(server.address).close()
        baseline = settle(pid, threads, fds)
        first = idle_round(server, client, baseline, baseline)
        second = idle_round(server, client, first, baseline)
        for kept in (first, second):
            print("server RSS kept after a round: %d KiB"
                  % (kept[0] - baseline[0]))
            assert kept[0] - baseline[0] < RSS_KEPT_KIB
        assert client.commit() == client.commits
    finally:
        client.close()


def test_freed_memory_is_given_back_once_a_burst_of_closes_is_over():
    trims = []
    now = [0.0]
    freed = FreedMemory(trim=trims.append, clock=lambda: now[0], after=3,
                        quiet=1.0)
    freed.connection_ended()
    freed.connection_ended()
    now[0] = 5.0
    assert not freed.maybe_release()  # too few ended
    freed.connection_ended()
    now[0] = 5.5
    assert not freed.maybe_release()  # the burst may not be over
    now[0] = 6.0
    assert freed.maybe_release()
    assert trims == [0]
    now[0] = 10.0
    assert not freed.maybe_release()  # none ended since
    assert trims == [0]


def test_malloc_arenas_are_limited_unless_the_operator_chose():
    assert not limit_malloc_arenas({"MALLOC_ARENA_MAX": "8"})
    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas({})
