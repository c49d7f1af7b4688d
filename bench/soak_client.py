"""One soak client process: our ClientStorage under ZODB.DB, many threads.

Started by bench/soak.py as ``python bench/soak_client.py ...``.  Each
thread has its own ZODB connection and transaction manager and runs
random operations (see OPERATIONS) until the deadline.  What the parent
needs to check survives a SIGKILL of this process: each acknowledged
commit, each broken invariant and each unexpected error is appended to
the process's journal (JSON lines, one ``os.write`` on an O_APPEND file
each, so a line is never torn) as soon as it happens, and the operation
counters are rewritten every few seconds.

"Acknowledged" means `commit()` returned: the server answered tpc_finish.
A commit interrupted by a lost connection has an unknown outcome; it is
neither acknowledged nor counted as an error, and the next commit of that
record reads the counter again.
"""

import argparse
import collections
import json
import os
import random
import sys
import threading
import time
import traceback

import transaction
import ZODB
from ZODB.POSException import ConflictError, UndoError

from zeo.ClientStorage import ClientStorage
from zeo.Exceptions import ClientDisconnected

from soak_model import filler_data, record_key, stamp, TOTAL, undo_id

#: Attempts of one transfer or record commit before it gives up.
CONFLICT_RETRIES = 20
#: Fillers read by one cold read.
COLD_READ_OBJECTS = 20
#: Pause after a ClientDisconnected, before the next operation.
DISCONNECTED_PAUSE = 0.05
STATS_INTERVAL = 3
#: Objects kept by each ZODB connection's cache; small, so fillers are
#: loaded again and again (from the client cache or the server).
CONNECTION_CACHE_OBJECTS = 300
#: The client cache: far smaller than the fillers, so most filler loads
#: go to the server.
CLIENT_CACHE_BYTES = 2 * 2 ** 20
#: Sizes of the large commits' payloads and of the blobs, small enough
#: that a 30-minute soak writes a few GB, not tens.
LARGE_PAYLOAD_BYTES = (32 * 1024, 256 * 1024)
BLOB_BYTES = (4 * 1024, 256 * 1024)
#: Each process's blob cache (its directory is trimmed past this).
BLOB_CACHE_BYTES = 20 * 2 ** 20
#: Errors that are outcomes, not failures, in a soak that kills servers.
EXPECTED_ERRORS = (ConflictError, ClientDisconnected, UndoError)


class Journal:
    """Append-only JSON lines that a SIGKILL cannot tear."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                           0o644)

    def write(self, **entry):
        entry["time"] = time.time()
        os.write(self._fd, (json.dumps(entry) + "\n").encode())

    def close(self):
        os.close(self._fd)


class Counters:
    """Operation counts of all threads of this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()

    def add(self, name, amount=1):
        with self._lock:
            self._counts[name] += amount

    def snapshot(self):
        with self._lock:
            return dict(self._counts)


class Worker:
    """One thread's operations on its own connection."""

    def __init__(self, db, key, keys, journal, counters, seed):
        self.db = db
        self.key = key
        self.keys = keys
        self.journal = journal
        self.counters = counters
        self.random = random.Random(seed)
        self.manager = transaction.TransactionManager()
        self.connection = db.open(self.manager)
        self.connection.setDebugInfo(key)
        self.recent_transfers = collections.deque(maxlen=8)
        self.lost_at = None

    # --- the operations ------------------------------------------------

    def transfer(self):
        def change(root):
            first, second = self.random.sample(root["accounts"], 2)
            amount = self.random.randint(1, 50)
            first.balance -= amount
            second.balance += amount
            return first
        account = self._commit_retrying("transfer", change)
        if account is not None:
            self.recent_transfers.append(account._p_serial)

    def bank_read(self):
        """Warm loads: the accounts are read all the time."""
        self.manager.begin()
        total = sum(account.balance
                    for account in self._root()["accounts"])
        self.manager.abort()
        if total != TOTAL:
            self.journal.write(violation="bank", key=self.key, total=total,
                               expected=TOTAL)
            self.counters.add("bank violations")

    def cold_read(self):
        """Loads that miss both caches: fillers just dropped from the
        connection, most of them long gone from the small client cache."""
        self.connection.cacheMinimize()
        self.manager.begin()
        fillers = self._root()["fillers"]
        for filler in self.random.sample(fillers, COLD_READ_OBJECTS):
            if filler.data != filler_data(filler.number):
                self.journal.write(violation="filler", key=self.key,
                                   number=filler.number)
                self.counters.add("filler violations")
        self.manager.abort()
        self.counters.add("cold loads", COLD_READ_OBJECTS)

    def small_commit(self):
        self._record_commit("small commit", lambda record, value: None)

    def large_commit(self):
        def payload(record, value):
            size = self.random.randint(*LARGE_PAYLOAD_BYTES)
            record.payload.data = stamp(self.key, value) + os.urandom(size)
            record.payload_value = value
        self._record_commit("large commit", payload)

    def blob_commit(self):
        def write_blob(record, value):
            size = self.random.randint(*BLOB_BYTES)
            with record.blob.open("w") as blob:
                blob.write(stamp(self.key, value))
                blob.write(os.urandom(size))
            record.blob_value = value
        self._record_commit("blob commit", write_blob)

    def stamps_read(self):
        """A record's blob and payload must carry the stamps the record
        says they have, in every snapshot (any thread's record)."""
        self.manager.begin()
        key = self.random.choice(self.keys)
        record = self._root()["records"][key]
        blob_stamp = stamp(key, record.blob_value)
        payload_stamp = stamp(key, record.payload_value)
        with record.blob.open("r") as blob:
            headers = [("blob", blob_stamp, blob.read(len(blob_stamp)))]
        headers.append(("payload", payload_stamp,
                        record.payload.data[:len(payload_stamp)]))
        self.manager.abort()
        for what, expected, header in headers:
            if header != expected:
                self.journal.write(violation=what, key=key,
                                   header=header.decode("latin-1"),
                                   expected=expected.decode())
                self.counters.add(what + " violations")

    def scratch_undo(self):
        """Change this thread's scratch number, undo that, and read the
        old number back."""
        self.manager.begin()
        scratch = self._root()["scratch"][self.key]
        before = scratch.value
        scratch.value = before + 1
        self.manager.get().note("scratch " + self.key)
        self.manager.commit()
        tid = scratch._p_serial
        self.manager.begin()
        self.db.undo(undo_id(tid), self.manager.get())
        self.manager.get().note("undo scratch " + self.key)
        self.manager.commit()
        self.manager.begin()
        after = scratch.value
        self.manager.abort()
        if after != before:
            self.journal.write(violation="undo", key=self.key,
                               before=before, after=after)
            self.counters.add("undo violations")

    def transfer_undo(self):
        """Undo one of this thread's recent transfers: it fails unless
        neither account changed since (UndoError), and either way the
        bank still adds up."""
        if not self.recent_transfers:
            return
        tid = self.recent_transfers.popleft()
        self.manager.begin()
        self.db.undo(undo_id(tid), self.manager.get())
        self.manager.get().note("undo transfer")
        self._commit(UndoError, "transfer undos refused")

    # --- helpers ---------------------------------------------------------

    def _root(self):
        return self.connection.root()

    def _record_commit(self, name, change):
        def commit(root):
            record = root["records"][self.key]
            record.value += 1
            change(record, record.value)
            return record
        record = self._commit_retrying(name, commit)
        if record is not None:
            self.journal.write(ack=self.key, value=record.value,
                               tid=record._p_serial.hex())

    def _commit_retrying(self, name, change):
        """Run `change(root)` in a transaction until it commits without a
        conflict; its result, or None after CONFLICT_RETRIES conflicts."""
        for _ in range(CONFLICT_RETRIES):
            self.manager.begin()
            result = change(self._root())
            self.manager.get().note(name)
            if self._commit(ConflictError, "conflicts"):
                return result
        self.counters.add(name + " given up")
        return None

    def _commit(self, refusal, counter):
        """Commit; False (aborted, counted as `counter`) if the commit
        raised `refusal`."""
        try:
            self.manager.commit()
        except refusal:
            self.manager.abort()
            self.counters.add(counter)
            return False
        return True

    def run(self, until):
        operations = [(getattr(self, name), weight)
                      for name, weight in OPERATIONS]
        functions = [function for function, _ in operations]
        weights = [weight for _, weight in operations]
        while time.time() < until:
            operation = self.random.choices(functions, weights)[0]
            try:
                operation()
            except ClientDisconnected:
                self._abort()
                self.counters.add("disconnected errors")
                if self.lost_at is None:
                    self.lost_at = time.time()
                time.sleep(DISCONNECTED_PAUSE)
                continue
            except EXPECTED_ERRORS as error:
                self._abort()
                self.counters.add(type(error).__name__)
                continue
            except Exception as error:
                self._abort()
                self.counters.add("unexpected errors")
                self.journal.write(
                    error=type(error).__name__, message=str(error)[:500],
                    operation=operation.__name__, key=self.key,
                    traceback=traceback.format_exc()[-3000:])
                continue
            self.counters.add("operations")
            self.counters.add(operation.__name__)
            if self.lost_at is not None:
                self.journal.write(recovered=self.key, lost_at=self.lost_at)
                self.lost_at = None
        self.connection.close()

    def _abort(self):
        try:
            self.manager.abort()
        except Exception:
            # Aborting a transaction whose connection was lost may raise
            # again; the next begin() starts afresh either way.
            self.counters.add("failed aborts")


#: (operation, relative weight) of the random mix.
OPERATIONS = [
    ("transfer", 30),
    ("bank_read", 25),
    ("cold_read", 15),
    ("small_commit", 15),
    ("large_commit", 1),
    ("blob_commit", 2),
    ("stamps_read", 5),
    ("scratch_undo", 3),
    ("transfer_undo", 2),
]


def write_stats(path, counters, finished):
    temporary = path + ".tmp"
    with open(temporary, "w") as stats:
        json.dump({"counts": counters.snapshot(), "finished": finished},
                  stats)
    os.replace(temporary, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--until", type=float, required=True,
                        help="stop at this time.time()")
    parser.add_argument("--directory", required=True)
    parser.add_argument("--incarnation", type=int, default=0)
    arguments = parser.parse_args(argv)
    name = "client-%d" % arguments.process
    journal = Journal(os.path.join(arguments.directory, name + ".jsonl"))
    stats_path = os.path.join(arguments.directory, "%s-%d.json" % (
        name, arguments.incarnation))
    counters = Counters()
    storage = ClientStorage(
        ("127.0.0.1", arguments.port), cache_size=CLIENT_CACHE_BYTES,
        blob_dir=os.path.join(arguments.directory, "blobs-%s-%d" % (
            name, arguments.incarnation)),
        blob_cache_size=BLOB_CACHE_BYTES,
        min_disconnect_poll=0.5, max_disconnect_poll=2, wait_timeout=60,
        client_label="soak-%s" % name)
    db = ZODB.DB(storage, pool_size=arguments.threads,
                 cache_size=CONNECTION_CACHE_OBJECTS)
    keys = [record_key(process, thread)
            for process in range(arguments.processes)
            for thread in range(arguments.threads)]
    workers = [Worker(db, record_key(arguments.process, thread), keys,
                      journal, counters,
                      seed=hash((arguments.process, thread,
                                 arguments.incarnation)))
               for thread in range(arguments.threads)]
    threads = [threading.Thread(target=worker.run, args=(arguments.until,),
                                name="soak-%s-worker-%d" % (name, number))
               for number, worker in enumerate(workers)]
    for thread in threads:
        thread.start()
    alive = threads
    while alive:
        write_stats(stats_path, counters, finished=False)
        alive[0].join(STATS_INTERVAL)
        alive = [thread for thread in alive if thread.is_alive()]
    db.close()
    write_stats(stats_path, counters, finished=True)
    journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
