"""A FileStorage filled once and copied for every measurement.

Copying the file (with its index) is much faster than filling a new
storage each time, and every measurement still starts from the same fresh
state.
"""

import os
import shutil

from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64


class StorageTemplate:
    """`directory/Data.fs` holding one new object per record of `records`
    (their oids in `oids`, in order), and `root` as the root object when
    it is given, all in one transaction."""

    def __init__(self, directory, records, root=None):
        self.path = os.path.join(directory, "Data.fs")
        storage = FileStorage(self.path, create=True)
        try:
            txn = TransactionMetaData()
            storage.tpc_begin(txn)
            if root is not None:
                storage.store(z64, z64, root, "", txn)
            self.oids = []
            for record in records:
                oid = storage.new_oid()
                storage.store(oid, z64, record, "", txn)
                self.oids.append(oid)
            storage.tpc_vote(txn)
            storage.tpc_finish(txn)
        finally:
            storage.close()

    def copy_to(self, directory):
        for suffix in ("", ".index"):
            shutil.copy(self.path + suffix, directory)
