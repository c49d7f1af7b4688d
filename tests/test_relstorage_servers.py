"""Two servers of ours on one RelStorage database, clients on each.

Each server learns of the other's commits by polling the database
(`poll-interval`, POLL_INTERVAL here) and sends them to its clients as
invalidations: a commit through A reaches B's clients within a bound; the
bank-transfer invariant holds in every read while clients of both
servers transfer at once; a conflict between clients of A and B is
detected; when A dies its clients move to B (their address lists name
both) and go on.
"""

import random
import signal
import threading
import time

import pytest
import ZODB
from persistent import Persistent
from ZODB.POSException import ConflictError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle, zodb_unpickle
from ZODB.utils import z64

from conftest import commit_one, wait_until
from relstorage_fixtures import (POLL_INTERVAL, database, postgres,
                                 start_relstorage_server)

pytestmark = pytest.mark.timeout(180)

__all__ = ["database", "postgres"]  # fixtures, used by name

#: How long a commit through one server may take to reach the clients of
#: the other: many poll intervals, for a loaded test machine.
VISIBILITY_BOUND = 20 * POLL_INTERVAL

ACCOUNTS = 10
BALANCE = 100
#: Transfers each transferring thread commits.
TRANSFERS = 15


@pytest.fixture
def servers(tmp_path, database):
    started = []
    for label in ("A", "B"):
        started.append(start_relstorage_server(str(tmp_path), database,
                                               label=label))
    yield started
    for server in started:
        if server.process.poll() is None:
            assert server.stop() == 0, server.log


def test_a_commit_through_a_reaches_the_clients_of_b(servers, clients):
    a_client = clients(servers[0].address)
    b_client = clients(servers[1].address)
    oid = a_client.new_oid()
    latencies = []
    serial = z64
    for value in range(10):
        serial = commit_one(a_client, oid, serial, zodb_pickle(MinPO(value)))
        committed = time.monotonic()
        wait_until(lambda: b_client.lastTransaction() >= serial,
                   "B's client hears of the commit", VISIBILITY_BOUND)
        latencies.append(time.monotonic() - committed)
        data, tid = b_client.load(oid)
        assert (zodb_unpickle(data).value, tid) == (value, serial)
    assert max(latencies) < VISIBILITY_BOUND, latencies


class Account(Persistent):
    def __init__(self, balance):
        self.balance = balance


def _transfer(db, stop, errors, counts):
    rng = random.Random()
    done = 0
    while done < TRANSFERS:
        try:
            with db.transaction() as connection:
                accounts = connection.root()["accounts"]
                source, target = rng.sample(range(ACCOUNTS), 2)
                amount = rng.randint(1, 10)
                accounts[source].balance -= amount
                accounts[target].balance += amount
            counts["transfers"] += 1
            done += 1
        except ConflictError:
            counts["conflicts"] += 1
        except Exception as error:  # reported by the test
            errors.append(error)
            return


def _audit(db, stop, errors, counts):
    while not stop.is_set():
        try:
            with db.transaction() as connection:
                accounts = connection.root()["accounts"]
                total = sum(account.balance for account in accounts)
            if total != ACCOUNTS * BALANCE:
                errors.append(AssertionError("a read saw a total of %d"
                                             % total))
            counts["audits"] += 1
            time.sleep(0.005)  # leave the transfers some CPU
        except ConflictError:
            counts["conflicts"] += 1
        except Exception as error:
            errors.append(error)
            return


def test_bank_transfers_through_both_servers_keep_the_total(servers,
                                                            clients):
    dbs = [ZODB.DB(clients(servers[0].address))]
    try:
        with dbs[0].transaction() as connection:
            connection.root()["accounts"] = [Account(BALANCE)
                                             for _ in range(ACCOUNTS)]
        # B's clients see the bank once B has polled (a DB opened
        # sooner would find no root and try to create one).
        b_storage = clients(servers[1].address)
        wait_until(lambda: b_storage.lastTransaction()
                   >= dbs[0].storage.lastTransaction(), "B knows the bank")
        dbs.append(ZODB.DB(b_storage))
        stop = threading.Event()
        errors = []
        counts = {"transfers": 0, "audits": 0, "conflicts": 0}
        transfers, audits = [
            [threading.Thread(target=work, args=(db, stop, errors, counts),
                              name="bank-%s-%d-%d" % (work.__name__, n, m))
             for n, db in enumerate(dbs) for m in range(2)]
            for work in (_transfer, _audit)]
        for thread in transfers + audits:
            thread.start()
        for thread in transfers:
            thread.join(120)
        stop.set()
        for thread in audits:
            thread.join(30)
        assert errors == []
        assert counts["transfers"] == 4 * TRANSFERS, counts
        assert counts["audits"] > 0, counts
        for db in dbs:
            db.storage.sync()
            with db.transaction() as connection:
                accounts = connection.root()["accounts"]
                assert sum(a.balance for a in accounts) == ACCOUNTS * BALANCE
    finally:
        for db in dbs:
            db.close()


def test_a_conflict_between_clients_of_a_and_b_is_detected(servers,
                                                           clients):
    a_client = clients(servers[0].address)
    b_client = clients(servers[1].address)
    oid = a_client.new_oid()
    first = commit_one(a_client, oid, z64, zodb_pickle(MinPO(0)))
    wait_until(lambda: b_client.lastTransaction() >= first, "B hears")
    commit_one(a_client, oid, first, zodb_pickle(MinPO(1)))
    # B's client stores on top of the revision A's client replaced.
    with pytest.raises(ConflictError):
        commit_one(b_client, oid, first, zodb_pickle(MinPO(2)))
    data, _tid = a_client.load(oid)
    assert zodb_unpickle(data).value == 1


def test_clients_of_a_killed_server_move_to_the_other(servers, clients):
    a, b = servers
    client = clients([a.address, b.address], min_disconnect_poll=0.1)
    oid = client.new_oid()
    serial = commit_one(client, oid, z64, zodb_pickle(MinPO(1)))
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    # Nothing else connects to B: its first registration is the client's.
    wait_until(lambda: any("registered on storage" in line
                           for line in b.log_lines), "the client reaches B")
    wait_until(client.is_connected, "the client is connected")
    serial = commit_one(client, oid, serial, zodb_pickle(MinPO(2)))
    other = clients(b.address)
    data, tid = other.load(oid)
    assert (zodb_unpickle(data).value, tid) == (2, serial)
