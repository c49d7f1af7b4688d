"""The blob calls of a session (PROTOCOL.md 10).

A mixin of `Session`: these methods check the session's state (its
transaction, read-only or not, whether its storage has blobs) and hand
the work to `zeo.server.blobs`, which streams uploads into temporary
files and downloads out of the committed ones.
"""

import logging

from ZODB.POSException import (ReadOnlyError, StorageTransactionError,
                               Unsupported)

from zeo.server import blobs
from zeo.server.outcome import DEFERRED, Reply


class BlobCalls:
    """storeBlobStart, storeBlobChunk, storeBlobEnd, storeBlobShared and
    sendBlob, for a `Session` (which provides `server`, `served`,
    `read_only`, `_txn`, `_txn_lock`, `_downloads`, `stats`, `log`,
    `channel` and `current_msgid`)."""

    def _blob_storage(self):
        if not self.served.has_blobs:
            raise Unsupported("storage %s does not support blobs"
                              % self.served.name)
        return self.served.storage

    def _storing(self, txn_id):
        """The open transaction, not yet voting, that blobs are added to;
        `txn_id` None for the upload calls, which name none."""
        if self.read_only:
            raise ReadOnlyError()
        txn = self._txn
        if txn is None:
            raise StorageTransactionError("no transaction for this blob")
        if txn_id is not None and txn.txn_id != txn_id:
            raise StorageTransactionError(txn.txn_id, txn_id)
        if txn.voting:
            raise StorageTransactionError("Already voting")
        return txn

    def storeBlobStart(self):
        storage = self._blob_storage()
        with self._txn_lock:
            self._storing(None).blobs.start_upload(
                storage.temporaryDirectory())

    def storeBlobChunk(self, chunk):
        with self._txn_lock:
            self._storing(None).blobs.write(chunk)

    def storeBlobEnd(self, oid, serial, data, txn_id):
        with self._txn_lock:
            size = self._storing(txn_id).blobs.end_upload(oid, serial, data)
        self.stats.add("blobs_received")
        self.stats.add("blob_bytes_received", size)
        self.log("received blob %s (%d bytes)", oid.hex(), size,
                 level=logging.DEBUG)

    def storeBlobShared(self, oid, serial, data, filename, txn_id):
        storage = self._blob_storage()
        with self._txn_lock:
            txn = self._storing(txn_id)
            try:
                path = blobs.shared_blob_path(storage, oid, filename)
            except blobs.RefusedBlobName as refused:
                # Logged here, once, as a possible attack; the client gets
                # a ValueError, a class it can rebuild.
                self.log("%s", refused, level=logging.WARNING)
                return Reply(error=ValueError(str(refused)))
            txn.blobs.add_shared(oid, serial, data, path)

    def sendBlob(self, oid, serial):
        storage = self._blob_storage()
        blobs.check_id(oid)
        blobs.check_id(serial)
        with self.served.access:
            blob_file = storage.openCommittedBlobFile(oid, serial)
        if self._downloads is None:
            self._downloads = blobs.Downloads(self.server, self.channel,
                                              self._blob_sent)
        self._downloads.start(blob_file, oid, serial, self.current_msgid)
        return DEFERRED

    def _blob_sent(self, msgid, size, error):
        if error is None:
            self.stats.add("blobs_sent")
            self.stats.add("blob_bytes_sent", size)
        self.channel.reply(msgid, Reply(error=error))
