"""Network partitions: a server that goes silent without closing anything.

A `SilentProxy` stands between our ClientStorage and a real server
process; `silence()` drops nothing and closes nothing, it just stops
relaying, as a cut link or a dead host would.  The client must notice
within its `heartbeat_timeout` (it is noticed within 1.25 timeouts of
the last byte; the tests allow one second more), wake its callers with
`ClientDisconnected`, fail over to another address, and after the
partition heals, reconnect and verify its cache.  On the server, the
transaction timeout frees the commit lock a silent client holds,
register-timeout one that went silent while registering, and short TCP
keepalive drops clients whose packets no longer arrive.
"""

import logging
import re
import shutil
import subprocess
import threading
import time

import pytest
import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

import raw_client
from conftest import (
    RawClient, closing_all, commit_one, server_environment, wait_until)
from server_process import free_port, start_configured_server
from silent_proxy import SilentProxy
from test_client_reconnect import (  # noqa: F401 (fixtures)
    clients, messages, populate, server_loads, servers)
from zeo import wire
from zeo.Exceptions import ClientDisconnected

pytestmark = pytest.mark.timeout(90)

#: The clients' heartbeat timeout in these tests, in seconds.
HEARTBEAT_TIMEOUT = 2
#: How long after the partition starts a caller may wait for its
#: ClientDisconnected: 1.25 timeouts, and a second for a busy machine.
NOTICE_BOUND = HEARTBEAT_TIMEOUT * 1.25 + 1


@pytest.fixture
def proxies():
    """Factory: proxy(target) -> a running SilentProxy; closed after."""
    yield from closing_all(SilentProxy)


def partitioned_call(proxy, call):
    """Silence `proxy`, then make `call` (one that needs the server);
    return how long it took to raise ClientDisconnected."""
    proxy.silence()
    started = time.monotonic()
    with pytest.raises(ClientDisconnected):
        call()
    return time.monotonic() - started


def test_silent_server_raises_then_heals_and_verifies_the_cache(
        tmp_path, servers, proxies, clients, caplog):
    caplog.set_level(logging.INFO, logger="zeo")
    path = tmp_path / "Data.fs"
    server = servers(free_port(), path)
    proxy = proxies(server.address)
    storage = clients(proxy.address, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    db = ZODB.DB(storage)
    oids = populate(db)
    cached = {oid: storage.load(oid) for oid in oids}

    took = partitioned_call(proxy, storage.server_status)
    assert took < NOTICE_BOUND
    assert not storage.is_connected()
    assert any("no word from the server for %s seconds" % HEARTBEAT_TIMEOUT
               in message for message in messages(caplog, logging.WARNING))
    # What the client saw is still served from its cache, nothing older.
    assert storage.load(oids[1]) == cached[oids[1]]

    other = clients(server.address)  # on the other side of the partition
    last = commit_one(other, oids[2], cached[oids[2]][1], b"while away")
    time.sleep(HEARTBEAT_TIMEOUT)  # the client keeps retrying, in vain
    assert not storage.is_connected()
    proxy.heal()
    wait_until(storage.is_connected, "the client reconnects through the "
               "healed proxy")
    assert storage.lastTransaction() == last
    loads = server_loads(storage)
    assert storage.load(oids[2]) == (b"while away", last)
    assert storage.load(oids[1]) == cached[oids[1]]
    assert server_loads(storage) - loads == 1  # only the changed object
    assert any("quick verification: 1 objects changed" in message
               for message in messages(caplog, logging.INFO))
    db.close()


def test_fails_over_to_the_second_address(tmp_path, servers, proxies,
                                          clients):
    path, copy = tmp_path / "Data.fs", tmp_path / "Copy.fs"
    first = servers(free_port(), path)
    proxy = proxies(first.address)
    second_address = ("127.0.0.1", free_port())
    storage = clients([proxy.address, second_address],
                      heartbeat_timeout=HEARTBEAT_TIMEOUT)
    oid = storage.new_oid()
    tid = commit_one(storage, oid, z64, b"on both servers")
    shutil.copy(path, copy)  # FileStorage flushed the commit
    servers(second_address[1], copy)

    took = partitioned_call(proxy, lambda: storage.getTid(oid))
    assert took < NOTICE_BOUND
    # The lost address is tried last: no wait for the silent one.
    wait_until(storage.is_connected, "the client fails over",
               timeout=HEARTBEAT_TIMEOUT)
    assert storage._link.connection.address == second_address
    assert storage.load(oid) == (b"on both servers", tid)
    assert commit_one(storage, oid, tid, b"on the second") > tid


def test_silent_read_only_server_of_a_fallback_client(
        tmp_path, servers, proxies, clients):
    """A read-only-fallback client on a read-only server spends its time
    looking for a writable one, here with long waits between rounds; a
    silent server is noticed during those waits."""
    path = tmp_path / "Data.fs"
    ZODB.DB(str(path)).close()  # a database with its root
    server = servers(free_port(), path, "-r")
    proxy = proxies(server.address)
    storage = clients([proxy.address, ("127.0.0.1", free_port())],
                      read_only_fallback=True, min_disconnect_poll=60,
                      max_disconnect_poll=60,
                      heartbeat_timeout=HEARTBEAT_TIMEOUT)
    assert storage.isReadOnly()
    assert partitioned_call(proxy, storage.server_status) < NOTICE_BOUND


def test_silent_lock_holder_is_dropped_and_another_client_commits(
        tmp_path, servers, proxies, clients):
    server = servers(free_port(), tmp_path / "Data.fs", "--timeout", "2")
    proxy = proxies(server.address)
    holder = clients(proxy.address, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    other = clients(server.address)
    oid = holder.new_oid()
    tid = commit_one(holder, oid, z64, b"first")
    txn = TransactionMetaData()
    holder.tpc_begin(txn)
    holder.store(oid, tid, b"never committed", "", txn)
    holder.tpc_vote(txn)  # the holder has the commit lock now
    proxy.silence()

    committed = []
    committer = threading.Thread(
        target=lambda: committed.append(
            commit_one(other, oid, tid, b"by the other client")),
        name="test-other-committer")
    committer.start()
    committer.join(30)
    assert not committer.is_alive() and committed and committed[0] > tid
    assert "Transaction timeout after 2" in server.log

    took = partitioned_call(proxy, lambda: holder.tpc_finish(txn))
    assert took < NOTICE_BOUND
    proxy.heal()
    wait_until(holder.is_connected, "the holder reconnects")
    assert holder.load(oid) == (b"by the other client", committed[0])


@pytest.mark.parametrize("sent", ["handshake", "half a register"])
def test_client_partitioned_while_registering_is_dropped(
        tmp_path, proxies, sent):
    """register-timeout holds when the network, not the client, goes
    silent in the middle of registering: after the handshake, or after
    part of the register message."""
    timeout = 1
    server = start_configured_server(
        str(tmp_path), "register-timeout %d" % timeout,
        env=server_environment())
    try:
        proxy = proxies(server.address)
        client = raw_client.RawClient(proxy.address)
        try:
            client.handshake()
            if sent == "half a register":
                frame = wire.frame(
                    client.codec.encode(1, 0, "register", ("1", False)))
                client.send_raw_bytes(frame[:len(frame) // 2])
            time.sleep(0.2)  # what was sent goes through the proxy
            proxy.silence()
            wait_until(lambda: "disconnected (no register in time)"
                       in server.log, "the server drops the connection",
                       timeout + 5)
            assert re.search(r"no register within register-timeout "
                             r"\(%ds\); closing" % timeout, server.log)
        finally:
            client.close()
    finally:
        assert server.stop() == 0


def server_socket_timer(port):
    """The timer ss shows on the server's end of the one connection
    accepted at `port`, once no data waits for an acknowledgement (the
    retransmission timer would show instead), or "" for none: e.g.
    "keepalive,3.9sec,0"."""
    deadline = time.monotonic() + 5
    while True:
        output = subprocess.run(
            ["ss", "-tno", "state", "established", "( sport = :%d )" % port],
            capture_output=True, text=True, check=True).stdout
        (line,) = output.splitlines()[1:]
        timer = re.search(r"timer:\(([^)]*)\)", line)
        if line.split()[1] == "0" or time.monotonic() > deadline:
            return timer.group(1) if timer else ""
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize("setting, expected", [
    ("tcp-keepalive 8", 4), ("tcp-keepalive 0", None), ("", 30)])
def test_server_sets_short_tcp_keepalive(tmp_path, setting, expected):
    """A client whose packets are dropped cannot be made on this machine
    (no netem); what the kernel will do is seen on the accepted socket:
    its keepalive timer, counting down from half the setting (the
    default is 60 s), or none at all with 0."""
    server = start_configured_server(str(tmp_path), setting,
                                     env=server_environment())
    try:
        client = RawClient(server.address)
        try:
            client.handshake()
            timer = server_socket_timer(server.address[1])
        finally:
            client.close()
    finally:
        assert server.stop() == 0
    if expected is None:
        assert timer == ""
    else:
        kind, left, _probes = timer.split(",")
        assert kind == "keepalive"
        # ss prints "3.9sec" or, in some versions, "3.9ms" for seconds
        assert expected - 2 < float(left.rstrip("secm")) <= expected
