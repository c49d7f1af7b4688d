"""The monitor server: a plain-text report per connection (issue 5).

A real server subprocess serves real FileStorages; clients speak the
protocol by hand (`raw_client.RawClient`) so that every counter of the
report can be compared with an exact number of loads, stores, commits,
aborts and conflicts.  The report is read with a plain socket, as
``nc host port`` would.
"""

import os
import re
import socket
import time

import pytest
from BTrees.Length import Length
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from raw_client import RawClient, RemoteError
from server_process import ServerProcess, temporary_directory, write_config

pytestmark = pytest.mark.timeout(120)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVIRONMENT = {"PYTHONPATH": os.pathsep.join(
    filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
MONITOR_LINE = re.compile(r"monitor server on (\S+)")

CLASSIC_LABELS = ["Storage", "Server started", "Clients", "Clients verifying",
                  "Active transactions", "Commits", "Aborts", "Loads",
                  "Stores", "Conflicts", "Conflicts resolved"]


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


def start_monitored_server(directory, storage_names=("1",),
                           monitor_address="127.0.0.1:0", options=""):
    """Our server on FileStorages in `directory`, with a monitor (and
    the other `<zeo>` `options`).

    Returns the `ServerProcess`; `monitor_address` holds where the monitor
    listens (read from its log line when the port was 0).
    """
    storages = {name: "<filestorage %s>\n  path %s\n</filestorage>"
                % (name, os.path.join(directory, "Data-%s.fs" % name))
                for name in storage_names}
    config = write_config(
        directory, "address 127.0.0.1:0\nmonitor-address %s\n%s"
        % (monitor_address, options), storages)
    server = ServerProcess(["-C", config], env=ENVIRONMENT)
    text = MONITOR_LINE.search(server.log).group(1)
    if "/" in text:
        server.monitor_address = text
    else:
        host, _, port = text.rpartition(":")
        server.monitor_address = (host, int(port))
    return server


def read_report(address, timeout=10):
    """Everything the monitor sends before it closes, as nc shows it."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks).decode("utf-8")
            chunks.append(data)


def parse_report(text):
    """`(header_lines, {storage: block})`; a block maps each label to its
    value, except ``Client`` lines, which are collected in a list."""
    assert text.endswith("\n\n"), "the report ends with an empty line"
    header, *blocks = text.rstrip("\n").split("\n\n")
    storages = {}
    for block in blocks:
        if block.startswith("Slow operations: "):
            continue  # test_slow_log reads those
        fields = {"Client": []}
        for line in block.split("\n"):
            label, separator, value = line.partition(": ")
            assert separator, "not a 'Label: value' line: %r" % line
            if label == "Client":
                fields["Client"].append(value)
            else:
                assert label not in fields, "repeated label %r" % label
                fields[label] = value
        storages[fields["Storage"]] = fields
    return header.split("\n"), storages


def connect(server, storage="1", label=None):
    client = RawClient(server.address)
    client.handshake()
    client.register(storage, False)
    if label is not None:
        client.send_oneway("set_client_label", label)
    return client


def commit(client, txn_id, stores, vote=True, finish=True):
    """Begin, store `[(oid, serial, data)]`, then vote and finish (as
    asked); return the tid when finished."""
    client.send_oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
    for oid, serial, data in stores:
        client.send_oneway("storea", oid, serial, data, txn_id)
    if vote:
        client.call("vote", txn_id)
    if finish:
        return client.call("tpc_finish", txn_id)
    return None


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_every_field_matches_known_activity(tmp):
    server = start_monitored_server(tmp)
    try:
        writer = connect(server, label="writer\nStorage: forged")
        reader = connect(server)
        oids = writer.call("new_oids", 3)

        # Three commits: two objects, then new revisions of both.
        first = commit(writer, 1, [(oids[0], z64, zodb_pickle(MinPO(1))),
                                   (oids[1], z64, zodb_pickle(Length(1)))])
        second = commit(writer, 2, [(oids[0], first, zodb_pickle(MinPO(2))),
                                    (oids[1], first, zodb_pickle(Length(2)))])
        # A store based on a stale revision that the server resolves:
        # Length adds up concurrent changes.
        third = commit(writer, 3, [(oids[1], first, zodb_pickle(Length(5)))])
        # A conflict it cannot resolve (MinPO has no resolver).
        with pytest.raises(RemoteError) as conflict:
            commit(reader, 4, [(oids[0], first, zodb_pickle(MinPO(9)))])
        assert "ConflictError" in conflict.value.class_name
        # An explicit abort.
        commit(writer, 5, [(oids[2], z64, zodb_pickle(MinPO(3)))],
               vote=False, finish=False)
        assert writer.call("tpc_abort", 5) is None
        # Seven loads by the reader, none by the writer.
        for _ in range(7):
            reader.call("loadBefore", oids[0], b"\x7f" + b"\xff" * 7)

        # The reader votes and keeps the commit lock: the monitor must
        # still answer, and show it.
        commit(reader, 6, [(oids[2], z64, zodb_pickle(MinPO(4)))],
               finish=False)
        time.sleep(1.1)
        header, storages = parse_report(read_report(server.monitor_address))
        assert header[0] == "ZEO monitor server version 0.1.0"
        assert abs(time.mktime(time.strptime(header[1])) - time.time()) < 60
        block = storages["1"]
        assert list(block)[1:len(CLASSIC_LABELS) + 2] == (
            CLASSIC_LABELS[:5] + ["Commit lock held for"]
            + CLASSIC_LABELS[5:])
        assert block["Clients"] == "2"
        assert block["Clients verifying"] == "0"
        assert block["Active transactions"] == "1"
        assert int(block["Commit lock held for"]) >= 1
        assert block["Commits"] == "3"
        assert block["Aborts"] == "1"
        assert block["Loads"] == "7"
        assert block["Stores"] == "8"
        assert block["Conflicts"] == "1"
        assert block["Conflicts resolved"] == "1"
        assert block["Waiting for the commit lock"] == "0"
        assert block["Objects"] == "2"
        assert block["Last transaction"].startswith(third.hex() + " (")
        queue = re.fullmatch(r"(\d+) transactions, ([0-9a-f]{16}) to "
                             r"([0-9a-f]{16})", block["Invalidation queue"])
        assert queue.group(3) == third.hex()
        assert int(queue.group(1)) == 4  # the starting point + 3 commits
        assert second.hex() < third.hex()

        writer_address = "%s:%s" % writer.sock.getsockname()
        reader_address = "%s:%s" % reader.sock.getsockname()
        clients = {line.split(",")[0]: line for line in block["Client"]}
        assert set(clients) == {writer_address, reader_address}
        # A label cannot add lines to the report.
        assert clients[writer_address].startswith(
            writer_address + ", label writer?Storage: forged, "
            "connected since ")
        assert clients[writer_address].endswith(", loads 0, commits 3")
        assert clients[reader_address].endswith(", loads 7, commits 0")
        since = clients[reader_address].split("connected since ")[1]
        since = since.split(",")[0]
        assert abs(time.mktime(time.strptime(since)) - time.time()) < 60

        # Finished: the lock line goes, the counters move on.
        reader.call("tpc_finish", 6)
        _, storages = parse_report(read_report(server.monitor_address))
        block = storages["1"]
        assert "Commit lock held for" not in block
        assert block["Commits"] == "4"
        assert block["Active transactions"] == "0"
        assert block["Objects"] == "3"
        assert block["Size"] == "%d bytes" % os.path.getsize(
            os.path.join(tmp, "Data-1.fs"))

        writer.close()
        reader.close()
        wait_for(lambda: parse_report(read_report(
            server.monitor_address))[1]["1"]["Clients"] == "0")
        _, storages = parse_report(read_report(server.monitor_address))
        assert storages["1"]["Client"] == []
    finally:
        assert server.stop() == 0


def test_two_storages_give_two_blocks_with_their_own_counters(tmp):
    server = start_monitored_server(tmp, storage_names=("2", "1"))
    try:
        client = connect(server, storage="2")
        oid = client.call("new_oids", 1)[0]
        commit(client, 1, [(oid, z64, zodb_pickle(MinPO(1)))])
        client.call("loadBefore", oid, b"\x7f" + b"\xff" * 7)
        text = read_report(server.monitor_address)
        _, storages = parse_report(text)
        assert list(storages) == ["1", "2"]  # sorted by name
        assert text.count("\nStorage: ") == 2
        busy, idle = storages["2"], storages["1"]
        assert (busy["Clients"], busy["Commits"], busy["Loads"],
                busy["Stores"]) == ("1", "1", "1", "1")
        assert (idle["Clients"], idle["Commits"], idle["Loads"],
                idle["Stores"]) == ("0", "0", "0", "0")
        assert idle["Last transaction"] == "none (empty storage)"
        assert len(busy["Client"]) == 1 and idle["Client"] == []
        client.close()
    finally:
        assert server.stop() == 0


def test_unix_socket_monitor_address(tmp):
    path = os.path.join(tmp, "monitor.sock")
    server = start_monitored_server(tmp, monitor_address=path)
    try:
        assert server.monitor_address == path
        header, storages = parse_report(read_report(path))
        assert header[0].startswith("ZEO monitor server version ")
        assert storages["1"]["Clients"] == "0"
        assert storages["1"]["Server started"]
    finally:
        assert server.stop() == 0
    assert not os.path.exists(path), "the socket file is removed at exit"
