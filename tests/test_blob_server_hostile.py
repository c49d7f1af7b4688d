"""Blob calls a real client would not send, and clients that go away.

The server under test runs as a process on a FileStorage with blobs (see
test_blob_server.py); the peer is the raw protocol client, so each test
sends exactly the calls it means.  Each checks the answer (an error reply
or a closed connection), that nothing outside the blob directory changed,
that no temporary file is left, and that the server goes on serving.

The server under test is ours, whatever ZEO_TEST_SERVER says: these tests
state our server's answers.  As for test_hostile_input.py, set
ZEO_HOSTILE_IMPL=ZEO to run them against the real ZEO 6.2, which fails
most of them: it accepts names such as "x..tmp" and symlinks, answers
upload calls out of order with internal errors (TypeError,
AssertionError), leaves the file of an abandoned upload behind, and
loses the blob of a transaction that votes again.
"""

import array
import fcntl
import hashlib
import os
import termios
import time

import pytest
from ZODB.blob import Blob, BushyLayout
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import p64, z64

from conftest import CLIENT_TIMEOUT, wait_until
from raw_client import RawClient, RemoteError
from server_process import OURS
import test_blob_server
from test_blob_server import open_connection, read_blob, temporary_files

pytestmark = pytest.mark.timeout(120)

CHUNK = 59000


@pytest.fixture
def blob_server_impl():
    return os.environ.get("ZEO_HOSTILE_IMPL", OURS)


# The fixtures of test_blob_server.py.
start_blob_server = test_blob_server.start_blob_server
open_blob_client = test_blob_server.open_blob_client
open_blob_db = test_blob_server.open_blob_db

#: The pickle of a Blob object, as a client stores it with its file.
BLOB_RECORD = zodb_pickle(Blob())


@pytest.fixture
def raw_clients():
    clients = []

    def connect(server, read_only=False):
        client = RawClient(server.address)
        clients.append(client)
        client.handshake()
        client.register("1", read_only)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def outside(tmp_path):
    """A directory beside the blob directory that no blob call may touch;
    yields a function returning its contents."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_bytes(b"do not touch")

    def contents():
        return {path.name: path.read_bytes()
                for path in directory.iterdir()}

    before = contents()
    yield directory
    assert contents() == before
    assert not list(tmp_path.rglob("x.tmp")), "a file made by a blob call"


def begin(client, txn_id):
    client.send_oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")


def upload(client, txn_id, oid, data, serial=z64):
    """Store `oid` as a blob the way the ZEO client does (no blob dir
    shared): a plain store, then the file in chunks."""
    client.send_oneway("storea", oid, serial, BLOB_RECORD, txn_id)
    client.send_oneway("storeBlobStart")
    for start in range(0, len(data), CHUNK):
        client.send_oneway("storeBlobChunk", data[start:start + CHUNK])
    client.send_oneway("storeBlobEnd", oid, serial, BLOB_RECORD, txn_id)


def commit_blob(client, txn_id, oid, data, serial=z64):
    begin(client, txn_id)
    upload(client, txn_id, oid, data, serial)
    client.call("vote", txn_id)
    return client.call("tpc_finish", txn_id)


def oid_directory(server, oid):
    path = os.path.join(server.blob_dir, BushyLayout().oid_to_path(oid))
    os.makedirs(path, exist_ok=True)
    return path


def assert_still_serving(server, open_blob_db):
    """A real client commits a blob and reads it back."""
    db = open_blob_db(server, "cache")
    connection, manager = open_connection(db)
    connection.root()["after"] = Blob(b"still serving")
    manager.commit()
    reader, _ = open_connection(open_blob_db(server, "cache"))
    assert read_blob(reader.root()["after"]) == b"still serving"


def no_temporary_files(server):
    wait_until(lambda: temporary_files(server.blob_dir) == [],
               "the blob temporary directory is empty", CLIENT_TIMEOUT)


# -- storeBlobShared: the file name -----------------------------------------


@pytest.mark.parametrize("name", [
    "../x.tmp",
    "../../../../../../../../../x.tmp",
    "sub/x.tmp",
    "..",
    "x..tmp",
    "x.tmp\0",
    "x.txt",
    "x.tmpab",
    "",
    b"x.tmp",
    None,
])
def test_a_shared_blob_name_that_is_not_a_bare_temp_name_is_refused(
        start_blob_server, raw_clients, open_blob_db, outside, name):
    server = start_blob_server()
    client = raw_clients(server)
    begin(client, 1)
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobShared", p64(1), z64, BLOB_RECORD, name, 1)
    assert refused.value.class_name == "builtins.ValueError"
    assert "storeBlobShared: refused file name" in refused.value.payload[0]

    def warnings():
        return [line for line in server.log.splitlines()
                if " WARNING " in line and "refused file name" in line]

    wait_until(warnings, "the refusal is logged", CLIENT_TIMEOUT)
    assert len(warnings()) == 1
    assert "(127.0.0.1:" in warnings()[0]  # the peer
    client.call("tpc_abort", 1)
    assert_still_serving(server, open_blob_db)


def test_an_absolute_shared_blob_name_is_refused(
        start_blob_server, raw_clients, outside):
    server = start_blob_server()
    client = raw_clients(server)
    target = str(outside / "abs.tmp")
    with open(target, "wb") as made_by_attacker:
        made_by_attacker.write(b"x")
    begin(client, 1)
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobShared", p64(1), z64, BLOB_RECORD, target, 1)
    assert refused.value.class_name == "builtins.ValueError"
    client.call("tpc_abort", 1)
    assert (outside / "abs.tmp").read_bytes() == b"x"
    os.remove(target)


def test_a_one_way_refused_name_closes_the_connection(
        start_blob_server, raw_clients, outside):
    """The ZEO client sends storeBlobShared one-way: nobody to answer."""
    server = start_blob_server()
    client = raw_clients(server)
    begin(client, 1)
    client.send_oneway("storeBlobShared", p64(1), z64, BLOB_RECORD,
                       "../x.tmp", 1)
    assert client.is_closed(CLIENT_TIMEOUT)
    assert raw_clients(server).call("lastTransaction") == z64


def test_a_symlink_leading_out_of_the_blob_directory_is_refused(
        start_blob_server, raw_clients, outside):
    server = start_blob_server()
    os.symlink(outside / "secret", os.path.join(
        oid_directory(server, p64(1)), "evil.tmp"))
    client = raw_clients(server)
    begin(client, 1)
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobShared", p64(1), z64, BLOB_RECORD,
                    "evil.tmp", 1)
    assert "leads outside the blob directory" in refused.value.payload[0]
    client.call("tpc_abort", 1)


def test_an_oid_directory_that_is_a_symlink_leading_out_is_refused(
        start_blob_server, raw_clients, outside):
    server = start_blob_server()
    directory = oid_directory(server, p64(3))
    os.rmdir(directory)
    os.symlink(outside, directory)
    (outside / "x.tmp").write_bytes(b"not a blob")
    client = raw_clients(server)
    begin(client, 1)
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobShared", p64(3), z64, BLOB_RECORD, "x.tmp", 1)
    assert "leads outside the blob directory" in refused.value.payload[0]
    client.call("tpc_abort", 1)
    os.remove(outside / "x.tmp")


def test_a_symlink_inside_the_oid_directory_is_not_stored(
        start_blob_server, raw_clients):
    """A link that stays inside passes the name check but is refused at
    vote: stored, it would make a committed blob of whatever it names."""
    server = start_blob_server()
    directory = oid_directory(server, p64(1))
    with open(os.path.join(directory, "real.tmp"), "wb") as real:
        real.write(b"real")
    os.symlink("real.tmp", os.path.join(directory, "link.tmp"))
    client = raw_clients(server)
    begin(client, 1)
    client.send_oneway("storea", p64(1), z64, BLOB_RECORD, 1)
    client.send_oneway("storeBlobShared", p64(1), z64, BLOB_RECORD,
                       "link.tmp", 1)
    with pytest.raises(RemoteError) as refused:
        client.call("vote", 1)
    assert "is not a regular file" in refused.value.payload[0]
    assert sorted(os.listdir(directory)) == ["real.tmp"]
    assert client.call("lastTransaction") == z64


def test_a_name_from_another_oids_directory_is_not_found(
        start_blob_server, raw_clients):
    server = start_blob_server()
    others = oid_directory(server, p64(2))
    with open(os.path.join(others, "other.tmp-"), "wb") as other:
        other.write(b"belongs to oid 2")
    client = raw_clients(server)
    begin(client, 1)
    client.send_oneway("storea", p64(1), z64, BLOB_RECORD, 1)
    client.send_oneway("storeBlobShared", p64(1), z64, BLOB_RECORD,
                       "other.tmp-", 1)
    with pytest.raises(RemoteError) as missing:
        client.call("vote", 1)
    assert "no blob file" in missing.value.payload[0]
    with open(os.path.join(others, "other.tmp-"), "rb") as other:
        assert other.read() == b"belongs to oid 2"


def test_a_shared_blob_is_stored_and_an_aborted_one_removed(
        start_blob_server, raw_clients):
    server = start_blob_server()
    directory = oid_directory(server, p64(1))
    for name in "0x00kept.tmp-", "0x00aborted.tmp-":
        with open(os.path.join(directory, name), "wb") as made:
            made.write(name.encode())
    client = raw_clients(server)
    begin(client, 1)
    client.send_oneway("storea", p64(1), z64, BLOB_RECORD, 1)
    client.send_oneway("storeBlobShared", p64(1), z64, BLOB_RECORD,
                       "0x00kept.tmp-", 1)
    client.call("vote", 1)
    tid = client.call("tpc_finish", 1)
    begin(client, 2)
    client.send_oneway("storea", p64(1), tid, BLOB_RECORD, 2)
    client.send_oneway("storeBlobShared", p64(1), tid, BLOB_RECORD,
                       "0x00aborted.tmp-", 2)
    client.call("tpc_abort", 2)
    assert os.listdir(directory) == ["0x%s.blob" % tid.hex()]
    with open(os.path.join(directory, "0x%s.blob" % tid.hex()), "rb") as f:
        assert f.read() == b"0x00kept.tmp-"


# -- uploads out of order, refused, abandoned --------------------------------


def test_a_chunk_without_storeblobstart_is_an_error(
        start_blob_server, raw_clients, open_blob_db):
    server = start_blob_server()
    client = raw_clients(server)
    begin(client, 1)
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobChunk", b"orphan chunk")
    assert refused.value.class_name.endswith("StorageTransactionError")
    assert "without storeBlobStart" in refused.value.payload[0]
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobEnd", p64(1), z64, BLOB_RECORD, 1)
    assert "without storeBlobStart" in refused.value.payload[0]
    # The transaction is still sane: it can upload and commit.
    upload(client, 1, p64(1), b"fine")
    client.call("vote", 1)
    client.call("tpc_finish", 1)
    one_way = raw_clients(server)
    begin(one_way, 1)
    one_way.send_oneway("storeBlobChunk", b"orphan chunk")
    assert one_way.is_closed(CLIENT_TIMEOUT)
    assert temporary_files(server.blob_dir) == []
    assert_still_serving(server, open_blob_db)


@pytest.mark.parametrize("call", [
    ("storeBlobStart",),
    ("storeBlobChunk", b"data"),
    ("storeBlobEnd", p64(1), z64, BLOB_RECORD, 1),
    ("storeBlobShared", p64(1), z64, BLOB_RECORD, "x.tmp", 1),
])
def test_blob_stores_need_a_transaction(start_blob_server, raw_clients,
                                        call):
    server = start_blob_server()
    client = raw_clients(server)
    with pytest.raises(RemoteError) as refused:
        client.call(*call)
    assert refused.value.class_name.endswith("StorageTransactionError")
    assert temporary_files(server.blob_dir) == []
    assert client.call("lastTransaction") == z64


def test_a_second_storeblobstart_is_an_error(start_blob_server, raw_clients):
    server = start_blob_server()
    client = raw_clients(server)
    begin(client, 1)
    client.send_oneway("storeBlobStart")
    with pytest.raises(RemoteError) as refused:
        client.call("storeBlobStart")
    assert "already in progress" in refused.value.payload[0]
    client.call("tpc_abort", 1)
    assert temporary_files(server.blob_dir) == []


@pytest.mark.parametrize("call", [
    ("storeBlobStart",),
    ("storeBlobChunk", b"data"),
    ("storeBlobEnd", p64(1), z64, BLOB_RECORD, 1),
    ("storeBlobShared", p64(1), z64, BLOB_RECORD, "x.tmp", 1),
])
def test_a_read_only_session_refuses_blob_stores(start_blob_server,
                                                 raw_clients, call):
    server = start_blob_server()
    client = raw_clients(server, read_only=True)
    with pytest.raises(RemoteError) as refused:
        client.call(*call)
    assert refused.value.class_name == "ZODB.POSException.ReadOnlyError"
    assert temporary_files(server.blob_dir) == []


def test_blob_calls_on_a_storage_without_blobs_are_unsupported(
        start_blob_server, raw_clients, tmp_path):
    server = start_blob_server(
        section="<filestorage 1>\n  path %s\n</filestorage>"
        % (tmp_path / "Data.fs"))
    client = raw_clients(server)
    begin(client, 1)
    for call in (("storeBlobStart",), ("sendBlob", p64(1), z64)):
        with pytest.raises(RemoteError) as refused:
            client.call(*call)
        assert refused.value.class_name == "ZODB.POSException.Unsupported"


def test_aborted_and_failed_transactions_leave_no_file(
        start_blob_server, raw_clients):
    server = start_blob_server()
    client = raw_clients(server)
    begin(client, 1)
    upload(client, 1, p64(1), b"aborted" * 10000)
    client.call("tpc_abort", 1)
    assert temporary_files(server.blob_dir) == []

    tid = commit_blob(client, 2, p64(1), b"committed")
    begin(client, 3)
    upload(client, 3, p64(2), b"never stored" * 10000)
    upload(client, 3, p64(1), b"conflicts", serial=z64)  # not `tid`
    with pytest.raises(RemoteError) as failed:
        client.call("vote", 3)
    assert failed.value.class_name.endswith("ConflictError")
    assert temporary_files(server.blob_dir) == []
    assert [os.path.basename(path) for path in _committed(server)] == [
        "0x%s.blob" % tid.hex()]


def _committed(server):
    found = []
    for directory, _names, files in os.walk(server.blob_dir):
        found.extend(os.path.join(directory, name) for name in files
                     if name.endswith(".blob"))
    return found


@pytest.mark.parametrize("stage", ["mid-upload", "after-upload", "voted"])
def test_a_client_that_disconnects_leaves_no_file(
        start_blob_server, raw_clients, open_blob_db, stage):
    server = start_blob_server()
    client = raw_clients(server)
    begin(client, 1)
    data = os.urandom(3 * CHUNK)
    if stage == "mid-upload":
        client.send_oneway("storeBlobStart")
        client.send_oneway("storeBlobChunk", data)
    else:
        upload(client, 1, p64(1), data)
    if stage == "voted":
        client.call("vote", 1)
    else:
        client.call("ping")  # the server has the upload's file
    assert temporary_files(server.blob_dir) != [] or stage == "voted"
    client.close()
    wait_until(lambda: _committed(server) == [],
               "the aborted blob is removed", CLIENT_TIMEOUT)
    no_temporary_files(server)
    assert_still_serving(server, open_blob_db)


def test_a_second_vote_after_client_side_conflicts_still_has_the_blob(
        start_blob_server, raw_clients):
    """With client-conflict-resolution a transaction may vote again after
    a conflict; the storage consumed the blob's file at the first vote."""
    server = start_blob_server("client-conflict-resolution true")
    client, other = raw_clients(server), raw_clients(server)
    begin(other, 1)
    other.send_oneway("storea", p64(2), z64, BLOB_RECORD, 1)
    other.call("vote", 1)
    committed = other.call("tpc_finish", 1)

    begin(client, 2)
    client.send_oneway("storea", p64(2), z64, BLOB_RECORD, 2)  # stale
    upload(client, 2, p64(3), b"the blob of a repeated vote")
    conflicts = client.call("vote", 2)
    assert [conflict["oid"] for conflict in conflicts] == [p64(2)]
    client.send_oneway("storea", p64(2), committed, BLOB_RECORD, 2)
    assert client.call("vote", 2) == []
    tid = client.call("tpc_finish", 2)
    with open(os.path.join(oid_directory(server, p64(3)),
                           "0x%s.blob" % tid.hex()), "rb") as stored:
        assert stored.read() == b"the blob of a repeated vote"
    assert temporary_files(server.blob_dir) == []


# -- downloads ---------------------------------------------------------------


def read_messages_until_reply(client, msgid, timeout=CLIENT_TIMEOUT):
    """Every message up to the reply to `msgid`, in wire order."""
    messages = []
    while True:
        message = client.read_message(timeout)
        messages.append(message)
        if message.name == ".reply" and message.msgid == msgid:
            return messages


def test_a_download_is_start_chunks_stop_then_the_reply(
        start_blob_server, raw_clients):
    server = start_blob_server()
    client = raw_clients(server)
    data = os.urandom(5 * CHUNK + 123)
    tid = commit_blob(client, 1, p64(1), data)
    msgid = client.send_call("sendBlob", p64(1), tid)
    messages = read_messages_until_reply(client, msgid)
    names = [message.name for message in messages]
    assert names == (["receiveBlobStart"] + ["receiveBlobChunk"] * 6
                     + ["receiveBlobStop", ".reply"])
    assert messages[-1].args is None and not messages[-1].flag
    chunks = [message.args[2] for message in messages[1:-2]]
    assert [len(chunk) for chunk in chunks] == [CHUNK] * 5 + [123]
    assert b"".join(chunks) == data
    assert all(message.args[:2] == (p64(1), tid)
               for message in messages[:-1])


def test_a_missing_blob_is_a_poskeyerror_and_sends_nothing(
        start_blob_server, raw_clients):
    server = start_blob_server()
    client = raw_clients(server)
    msgid = client.send_call("sendBlob", p64(1), p64(12345))
    messages = read_messages_until_reply(client, msgid)
    assert len(messages) == 1 and messages[0].flag
    assert messages[0].args[0] == "ZODB.POSException.POSKeyError"
    assert "No blob file" in str(messages[0].args[1])
    with pytest.raises(RemoteError) as invalid:
        client.call("sendBlob", b"short", p64(1))
    assert invalid.value.class_name == "builtins.ValueError"


BIG = 48 * 1024 ** 2


def test_a_stalled_download_blocks_no_commit_and_keeps_the_order(
        start_blob_server, raw_clients, open_blob_db):
    """A client that asks for a big blob and stops reading: other clients
    commit meanwhile, and once it reads, it finds the blob whole, every
    invalidation in commit order, the sendBlob reply after
    receiveBlobStop, and the answer to a call it made meanwhile after the
    invalidation of the tid it names.  (When that answer comes, before
    the download ends or after, depends on when the connection's thread
    runs; that it does not wait for the download is shown, without
    depending on timing, by the next test.)"""
    server = start_blob_server()
    db = open_blob_db(server, "cache")  # its root is committed now
    writer = raw_clients(server)
    data = os.urandom(1024 ** 2) * (BIG // 1024 ** 2)
    blob_tid = commit_blob(writer, 1, p64(1), data)

    reader = raw_clients(server)
    download = reader.send_call("sendBlob", p64(1), blob_tid)
    assert reader.read_message().name == "receiveBlobStart"
    # The reader reads nothing more: the download waits for room.
    tids = [commit_blob(writer, txn_id, p64(2 + txn_id), b"small")
            for txn_id in range(2, 5)]
    connection, manager = open_connection(db)
    connection.root()["while downloading"] = 1
    manager.commit()
    tids.append(db.lastTransaction())
    later = reader.send_call("lastTransaction")

    messages = read_messages_until_reply(reader, download, timeout=60)
    if not any(message.msgid == later for message in messages
               if message.name == ".reply"):
        messages += read_messages_until_reply(reader, later)
    names = [message.name for message in messages]
    stop = names.index("receiveBlobStop")
    replies = {message.msgid: index for index, message
               in enumerate(messages) if message.name == ".reply"}
    assert replies[download] == stop + 1
    assert messages[replies[download]].args is None
    invalidated = [(index, message.args[0]) for index, message
                   in enumerate(messages)
                   if message.name == "invalidateTransaction"]
    assert [tid for _index, tid in invalidated] == tids
    assert messages[replies[later]].args == tids[-1]
    assert invalidated[-1][0] < replies[later]
    received = hashlib.sha256()
    for message in messages:
        if message.name == "receiveBlobChunk":
            received.update(message.args[2])
    assert received.digest() == hashlib.sha256(data).digest()


def test_a_stalled_download_does_not_hold_up_its_own_connections_commit(
        start_blob_server, raw_clients):
    """The same client votes, asks for a big blob it does not read, and
    finishes: the finish runs, so the commit lock is free for others."""
    server = start_blob_server()
    client = raw_clients(server)
    blob_tid = commit_blob(client, 1, p64(1), os.urandom(1024 ** 2) * 32)
    begin(client, 2)
    client.send_oneway("storea", p64(2), z64, BLOB_RECORD, 2)
    client.call("vote", 2)
    download = client.send_call("sendBlob", p64(1), blob_tid)
    assert client.read_message().name == "receiveBlobStart"
    finish = client.send_call("tpc_finish", 2)

    other = raw_clients(server)
    other_tid = commit_blob(other, 1, p64(3), b"after the lock came free")
    messages = read_messages_until_reply(client, download, timeout=60)
    names = [message.name for message in messages]
    finished = [message for message in messages
                if message.name == ".reply" and message.msgid == finish]
    assert len(finished) == 1 and finished[0].args < other_tid
    assert names.index(".reply") < names.index("receiveBlobStop")


def wait_until_stalled(client, timeout=CLIENT_TIMEOUT):
    """Wait until the bytes waiting in `client`'s socket stop growing: the
    kernel's buffers are full and the server's sends have stalled."""
    deadline = time.monotonic() + timeout
    previous, steady = -1, 0
    while steady < 10:
        assert time.monotonic() < deadline, "the download never stalled"
        waiting = array.array("i", [0])
        fcntl.ioctl(client.sock.fileno(), termios.FIONREAD, waiting)
        steady = steady + 1 if waiting[0] == previous else 0
        previous = waiting[0]
        time.sleep(0.05)


def test_a_small_blob_behind_a_stalled_download_holds_up_no_commit(
        start_blob_server, raw_clients):
    """A small blob is queued at once in the connection's thread (no
    thread of its own): even with the outbox full of a stalled big
    download, it does not wait, so the tpc_finish sent after it runs and
    frees the commit lock for the others."""
    server = start_blob_server()
    client = raw_clients(server)
    big_tid = commit_blob(client, 1, p64(1), os.urandom(1024 ** 2) * 32)
    small = os.urandom(CHUNK + 17)
    small_tid = commit_blob(client, 2, p64(4), small)
    begin(client, 3)
    client.send_oneway("storea", p64(2), z64, BLOB_RECORD, 3)
    client.call("vote", 3)
    big = client.send_call("sendBlob", p64(1), big_tid)
    assert client.read_message().name == "receiveBlobStart"
    wait_until_stalled(client)
    small_download = client.send_call("sendBlob", p64(4), small_tid)
    finish = client.send_call("tpc_finish", 3)

    other = raw_clients(server)
    other_tid = commit_blob(other, 1, p64(3), b"after the lock came free")
    messages = read_messages_until_reply(client, big, timeout=60)
    replies = {message.msgid: message for message in messages
               if message.name == ".reply"}
    assert replies[finish].args < other_tid
    assert replies[small_download].args is None
    received = b"".join(message.args[2] for message in messages
                        if message.name == "receiveBlobChunk"
                        and message.args[0] == p64(4))
    assert received == small


def test_a_client_that_disconnects_mid_download_costs_nothing(
        start_blob_server, raw_clients, open_blob_db):
    server = start_blob_server()
    writer = raw_clients(server)
    tid = commit_blob(writer, 1, p64(1), os.urandom(1024 ** 2) * 32)
    for _ in range(3):
        reader = raw_clients(server)
        reader.send_call("sendBlob", p64(1), tid)
        assert reader.read_message().name == "receiveBlobStart"
        reader.close()
    wait_until(lambda: server.log.count("disconnected") >= 3,
               "the server saw the readers go", CLIENT_TIMEOUT)
    assert_still_serving(server, open_blob_db)
    # The fixture checks that the server then stops cleanly (exit 0):
    # no download thread is left waiting.


def test_the_server_stops_cleanly_during_a_stalled_download(
        start_blob_server, raw_clients):
    server = start_blob_server()
    writer = raw_clients(server)
    tid = commit_blob(writer, 1, p64(1), os.urandom(1024 ** 2) * 32)
    reader = raw_clients(server)
    reader.send_call("sendBlob", p64(1), tid)
    assert reader.read_message().name == "receiveBlobStart"
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10  # not the stop's SIGKILL
    assert "closed" in server.log


def test_a_connection_may_run_more_downloads_than_threads(
        start_blob_server, raw_clients):
    server = start_blob_server()
    writer = raw_clients(server)
    blobs = {}
    for number in range(1, 9):
        data = os.urandom(CHUNK * number)
        blobs[commit_blob(writer, number, p64(number), data)] = data
    reader = raw_clients(server)
    msgids = {reader.send_call("sendBlob", p64(number), tid): tid
              for number, tid in enumerate(blobs, 1)}
    received = {tid: b"" for tid in blobs}
    stopped = set()
    answered = set()
    while len(answered) < len(msgids):
        message = reader.read_message()
        if message.name == "receiveBlobChunk":
            received[message.args[1]] += message.args[2]
        elif message.name == "receiveBlobStop":
            stopped.add(message.args[1])
        elif message.name == ".reply":
            assert not message.flag
            assert msgids[message.msgid] in stopped
            answered.add(message.msgid)
    assert received == blobs
