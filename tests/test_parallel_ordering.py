"""Many client threads against one server process at once: PROTOCOL.md 9.

Loaders load objects as fast as they can while committers change them,
so invalidations flow all the time, and every load reply is checked
against the rule: no client ever receives an object older than an
invalidation it was already sent.  On a free-threaded interpreter with
the GIL off (`make test-ft`) the server's connection threads really run
at the same time, which is when a race the GIL hides would show; the
test checks from the server's start-up line that the GIL was indeed off
there.  Under the GIL it runs too, as one more ordering test.
"""

import random
import threading
import time

import pytest
from ZODB.utils import maxtid, z64

from raw_client import RawClient
from server_process import start_filestorage_server
from test_ordering import commit, connect
from zeo.server import free_threading

pytestmark = pytest.mark.timeout(120)

LOADERS = 12
COMMITTERS = 3
OBJECTS_PER_COMMITTER = 4
SECONDS = 4


class Loader:
    """A client that loads and checks each reply against the
    invalidations read before it, in wire order."""

    def __init__(self, address, oids, seed):
        self.client = RawClient(address)
        self.client.handshake()
        self.client.register()
        self.oids = oids
        self.random = random.Random(seed)
        self.invalidated = {}  # oid -> newest tid invalidated
        self.seen_calls = 0
        self.loads = self.invalidations = 0
        self.violations = []

    def load_once(self):
        oid = self.random.choice(self.oids)
        _data, serial, _end = self.client.call("loadBefore", oid, maxtid)
        calls = self.client.server_calls
        for message in calls[self.seen_calls:]:
            if message.name == "invalidateTransaction":
                tid, oids = message.args
                self.invalidations += 1
                for changed in oids:
                    self.invalidated[changed] = max(
                        tid, self.invalidated.get(changed, z64))
        self.seen_calls = len(calls)
        newest = self.invalidated.get(oid, z64)
        if serial < newest:
            self.violations.append((oid.hex(), serial.hex(), newest.hex()))
        self.loads += 1


def test_no_reply_is_older_than_an_invalidation_already_sent(tmp_path):
    server = start_filestorage_server(str(tmp_path))
    try:
        setup = connect(server)
        owned = [setup.call("new_oids", OBJECTS_PER_COMMITTER)
                 for _ in range(COMMITTERS)]
        oids = [oid for group in owned for oid in group]
        created = commit(setup, 1, [(oid, z64, 0) for oid in oids])
        setup.close()
        loaders = [Loader(server.address, oids, seed)
                   for seed in range(LOADERS)]
        committed = [0] * COMMITTERS
        failures = []
        deadline = time.monotonic() + SECONDS

        def load(loader):
            try:
                while time.monotonic() < deadline:
                    loader.load_once()
            except Exception as error:
                failures.append(error)

        def change(index):
            client = connect(server)
            serials = dict.fromkeys(owned[index], created)
            try:
                while time.monotonic() < deadline:
                    txn_id = committed[index] + 2
                    tid = commit(client, txn_id, [
                        (oid, serial, txn_id)
                        for oid, serial in serials.items()])
                    serials = dict.fromkeys(serials, tid)
                    committed[index] += 1
            except Exception as error:
                failures.append(error)
            finally:
                client.close()

        threads = [threading.Thread(target=load, args=(loader,),
                                    name="stress-loader-%d" % number)
                   for number, loader in enumerate(loaders)]
        threads += [threading.Thread(target=change, args=(index,),
                                     name="stress-committer-%d" % index)
                    for index in range(COMMITTERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 60)
        for loader in loaders:
            loader.client.close()
    finally:
        status = server.stop()
    assert failures == []
    assert [loader.violations for loader in loaders] == [[]] * LOADERS
    assert all(count > 0 for count in committed), committed
    assert all(loader.loads > 0 and loader.invalidations > 0
               for loader in loaders)
    assert status == 0
    if not free_threading.gil_enabled():
        assert any("GIL disabled" in line for line in server.log_lines)
