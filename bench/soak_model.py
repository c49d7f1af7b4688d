"""The soak's database: a bank, one record per worker thread, fillers.

Shared by the parent (which fills the database and checks it at the end)
and the client processes (which import these classes to unpickle).
Every object exists from the start and only leaf objects change later,
so the containers never conflict and packing never collects anything
that a worker still uses.

- ``root["accounts"]``: ACCOUNTS accounts whose balances always add up to
  TOTAL; a transfer moves money between two of them in one transaction.
- ``root["records"]``: per worker thread, a counter (`value`, one more at
  each commit), a large payload (an object of its own, so that the small
  commits stay small) and a blob, each stamped with the counter value it
  was written at (which the record keeps), so that the end can tell
  whether what was acknowledged is there and every read whether the
  parts agree.
- ``root["scratch"]``: per worker thread, an integer that is changed and
  at once undone.
- ``root["fillers"]``: FILLERS objects of a few KB, read at random so that
  most loads miss the client cache (the cold loads).
"""

import base64

import persistent
import ZODB.blob
from persistent.mapping import PersistentMapping

ACCOUNTS = 20
OPENING_BALANCE = 1000
TOTAL = ACCOUNTS * OPENING_BALANCE
FILLERS = 2000
FILLER_BYTES = 6000
#: Objects created per setup transaction.
SETUP_BATCH = 250


class Account(persistent.Persistent):
    """A balance.  No `_p_resolveConflict`: concurrent transfers conflict."""

    def __init__(self):
        self.balance = OPENING_BALANCE


class Record(persistent.Persistent):
    """One worker thread's acknowledged-commit counter and its payloads."""

    def __init__(self, key):
        self.value = 0
        self.payload = Payload(stamp(key, 0))
        self.payload_value = 0
        self.blob = ZODB.blob.Blob(stamp(key, 0))
        self.blob_value = 0


class Payload(persistent.Persistent):
    def __init__(self, data):
        self.data = data


class Scratch(persistent.Persistent):
    def __init__(self):
        self.value = 0


class Filler(persistent.Persistent):
    def __init__(self, number):
        self.number = number
        self.data = filler_data(number)


def filler_data(number):
    """The content filler `number` must always have."""
    unit = b"filler %d " % number
    return (unit * (FILLER_BYTES // len(unit) + 1))[:FILLER_BYTES]


def stamp(key, value):
    """The header a payload or blob written at `value` of record `key`
    starts with."""
    return b"%s=%d;" % (key.encode() if isinstance(key, str) else key, value)


def record_key(process, thread):
    return "p%dt%d" % (process, thread)


def undo_id(tid):
    """FileStorage's undo id of transaction `tid` (what undoLog gives)."""
    return base64.encodebytes(tid).rstrip(b"\n")


def populate(db, processes, threads):
    """Create every object the soak uses, in a few transactions."""
    connection = db.open()
    try:
        transaction_manager = connection.transaction_manager
        root = connection.root()
        root["accounts"] = tuple(Account() for _ in range(ACCOUNTS))
        keys = [record_key(process, thread) for process in range(processes)
                for thread in range(threads)]
        root["records"] = PersistentMapping(
            (key, Record(key)) for key in keys)
        root["scratch"] = PersistentMapping(
            (key, Scratch()) for key in keys)
        transaction_manager.commit()
        fillers = []
        for start in range(0, FILLERS, SETUP_BATCH):
            fillers.extend(Filler(number) for number in
                           range(start, min(start + SETUP_BATCH, FILLERS)))
            root["fillers"] = tuple(fillers)
            transaction_manager.commit()
    finally:
        connection.close()
