"""A storage that fails in the middle of a commit (issue 14, item 3).

The failure is real: a real server process serves a real FileStorage,
and the test lowers that process's file-size limit (RLIMIT_FSIZE, set
from outside with prlimit(2)), so FileStorage's own writes fail with
EFBIG, as they would with ENOSPC on a full disk.  The server ignores
SIGXFSZ, so it gets the OSError instead of dying.

* In tpc_vote, FileStorage truncates what it wrote and raises: the
  committer hears that nothing was committed, and once the limit is
  lifted commits work again, without a restart.
* In tpc_finish (after the vote said yes), FileStorage logs, closes
  itself and raises, leaving the transaction on disk with its checkpoint
  flag set.  The server then refuses every commit on that storage, says
  so in its log and monitor, and keeps serving loads; the operator's
  restart reopens the file, which drops the unfinished transaction.

Each runs with our ClientStorage and with the real ZEO client as the
committer; ZODB's fstest checks the file.
"""

import os
import resource
import types

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.POSException import StorageError
from ZODB.scripts.fstest import FormatError, check
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import load_current, z64

from server_process import free_port, temporary_directory
from test_metrics import scrape, storage_value
from test_monitor import parse_report, read_report, start_monitored_server
from test_zeo_client_interop import commit_objects, wait_until

pytestmark = pytest.mark.timeout(120)

#: Size of the first object.  It makes Data.fs larger than anything the
#: failing transaction writes to the storage's temporary file, so only
#: the write to Data.fs crosses the file-size limit.
BIG = 20000


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


@pytest.fixture(params=["ours", "ZEO"])
def committer(request, clients, open_client):
    """Opens the committing client: our ClientStorage or the real ZEO's."""
    if request.param == "ours":
        return lambda server: clients(server.address)
    return open_client


def limit_file_size(server, size):
    """Let the server process write no file byte at or past `size`."""
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE,
                     (size, resource.RLIM_INFINITY))


def lift_file_size_limit(server):
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def value(text):
    return zodb_pickle(MinPO(text))


class Database:
    """What the tests commit before the failure, to check it after."""

    def __init__(self, server, client):
        self.path = server.data_path
        self.objects = {}  # oid -> (data, tid)
        for text in ("x" * BIG, "good"):
            oid = client.new_oid()
            data = value(text)
            tid = commit_objects(client, {oid: (z64, data)})
            self.objects[oid] = (data, tid)
        self.oid = oid  # the one the tests change
        self.last_tid = tid
        self.size = os.path.getsize(self.path)

    def assert_loads(self, client):
        """`client` loads every object as committed before the failure."""
        for oid, expected in self.objects.items():
            assert load_current(client, oid) == expected

    def assert_intact_after(self, tid, data):
        """The stopped server's file: `tid` (storing `data`) is the last
        transaction, and every earlier object is intact."""
        check(self.path)
        storage = FileStorage(self.path, read_only=True)
        try:
            assert storage.lastTransaction() == tid
            assert load_current(storage, self.oid) == (data, tid)
            for oid, expected in self.objects.items():
                if oid != self.oid:
                    assert load_current(storage, oid) == expected
        finally:
            storage.close()


def start_server(directory):
    """Our server on `directory`/Data-1.fs, with a monitor and metrics."""
    port = free_port()
    server = start_monitored_server(
        directory, options="metrics-address 127.0.0.1:%d" % port)
    server.metrics_url = "http://127.0.0.1:%d/metrics" % port
    server.data_path = os.path.join(directory, "Data-1.fs")
    return server


def refusing_commits(server):
    """The monitor's and the metrics' word on refusing commits."""
    return (storage_report(server).get("Refusing commits"),
            storage_value(scrape(server), "zeo_refusing_commits"))


def assert_commit_fails(client, database, text, fragments, after_vote=None):
    """Changing the tested object must fail with a StorageError whose
    message has each of `fragments` and the system's reason (EFBIG)."""
    with pytest.raises(StorageError) as failure:
        commit_objects(client, {database.oid: (
            database.last_tid, value(text))}, after_vote=after_vote)
    for fragment in fragments + ("File too large",):
        assert fragment in str(failure.value)


def storage_report(server):
    return parse_report(read_report(server.monitor_address))[1]["1"]


@pytest.fixture
def scene(tmp, committer, clients):
    """A server, the committer, another client of ours, and the objects
    committed before the failure.  The server is stopped after the test
    unless the test stopped it (to look at its log and file)."""
    server = start_server(tmp)
    try:
        writer = committer(server)
        yield types.SimpleNamespace(
            server=server, writer=writer, other=clients(server.address),
            database=Database(server, writer))
    finally:
        if server.process.poll() is None:
            lift_file_size_limit(server)
            assert server.stop() == 0


def stop(server):
    lift_file_size_limit(server)
    assert server.stop() == 0


def test_vote_failing_to_write_commits_nothing_and_space_back_heals(
        scene, clients):
    server, writer, other, database = (
        scene.server, scene.writer, scene.other, scene.database)
    limit_file_size(server, database.size + 100)
    assert_commit_fails(writer, database, "lost " + "y" * 1000, (
        "storage 1 could not write the transaction",
        "nothing was committed"))
    # Loads go on, from a client with an empty cache too.
    database.assert_loads(other)
    database.assert_loads(clients(server.address))
    assert "Commit lock held" not in storage_report(server)
    assert refusing_commits(server) == (None, 0)
    # Part of the transaction is on disk, the rest in FileStorage's
    # buffer; the server cuts both off as soon as it can write.
    wait_until(lambda: "cannot cut a failed write off yet" in server.log,
               message="the log line about the failed write")

    lift_file_size_limit(server)
    # No restart: the lock is free and both clients commit again.
    first = commit_objects(writer, {database.oid: (
        database.last_tid, value("first after"))})
    wait_until(lambda: "a failed write was cut off" in server.log,
               message="the log line about the cut")
    data = value("second after")
    second = commit_objects(other, {database.oid: (first, data)})
    wait_until(lambda: load_current(writer, database.oid) == (data, second),
               message="the committer seeing the other commit")
    check(database.path)
    stop(server)
    assert "CRITICAL" not in server.log
    database.assert_intact_after(second, data)


def test_finish_failing_after_the_vote_stops_commits_until_a_restart(
        scene, committer, clients, tmp):
    server, writer, other, database = (
        scene.server, scene.writer, scene.other, scene.database)
    assert_commit_fails(
        writer, database, "lost",
        ("storage 1: the transaction failed after the vote",
         "may or may not be committed"),
        after_vote=lambda: limit_file_size(server, database.size))
    lift_file_size_limit(server)

    # Every later commit is refused at once (the lock was released),
    # from the committer and from anyone else, space back or not.
    # (The real ZEO client reconnects after a failed tpc_finish.)
    wait_until(writer.is_connected, message="the committer connected")
    for client in (writer, other):
        with pytest.raises(StorageError, match="refuses commits"):
            commit_objects(client, {database.oid: (
                database.last_tid, value("refused"))})
    database.assert_loads(other)
    database.assert_loads(clients(server.address))
    assert "Commit lock held" not in storage_report(server)
    report_line, metric = refusing_commits(server)
    assert "a voted transaction failed to finish" in report_line
    assert metric == 1
    wait_until(lambda: "CRITICAL zeo.server.storage storage 1: a voted "
               "transaction failed to finish" in server.log,
               message="the CRITICAL log line")
    # Before the failed transaction the file is intact; the failed one
    # is left unfinished, exactly what fstest reports.
    with pytest.raises(FormatError, match="checkpoint flag was not "
                       "cleared at %d$" % database.size):
        check(database.path)
    stop(server)

    # The operator restarts the server: FileStorage drops the unfinished
    # transaction on opening, and commits work again.
    server = start_server(tmp)
    try:
        check(database.path)
        restarted = committer(server)
        database.assert_loads(restarted)
        data = value("after the restart")
        tid = commit_objects(restarted, {database.oid: (
            database.last_tid, data)})
        assert refusing_commits(server) == (None, 0)
    finally:
        stop(server)
    database.assert_intact_after(tid, data)
