"""The IBlobStorage methods of our ClientStorage (PROTOCOL.md 10).

A mixin of `zeo.ClientStorage.ClientStorage`, which provides the
interfaces only when it has a blob directory (`blob_dir`).  The files
themselves are handled by `zeo.client.blobs`: a blob cache with
downloads, or the server's directory, shared.
"""

import ZODB.interfaces
from ZODB.POSException import POSKeyError, ReadOnlyError, Unsupported
from ZODB.utils import z64


class BlobMethods:
    """loadBlob, openCommittedBlobFile, temporaryDirectory, storeBlob and
    restoreBlob, for a `ClientStorage` (which provides `_blobs`,
    `_server_interfaces`, `store`, `getTid`, `_commit_for`, `_call` and the
    rest of IStorage).
    """

    def loadBlob(self, oid, serial):
        """The name of a file holding blob `(oid, serial)`."""
        return self._blob_support().load(oid, serial, self._fetch_blob)

    def openCommittedBlobFile(self, oid, serial, blob=None):
        """Blob `(oid, serial)` open for reading: a `ZODB.blob.BlobFile`
        for `blob` if given, else a plain file."""
        return self._blob_support().open(oid, serial, self._fetch_blob,
                                         blob)

    def temporaryDirectory(self):
        """Where ZODB writes new blobs (on the same file system as the
        blob directory, so that taking them is a rename)."""
        return self._blob_support().temporary_directory()

    def storeBlob(self, oid, oldserial, data, blobfilename, version, txn):
        """Store `data` and the blob in the file `blobfilename`, which is
        ours from now on."""
        blobs = self._blob_support()
        self.store(oid, oldserial, data, version, txn)
        self._upload(blobs, self._commit_for(txn), oid, oldserial, data,
                     blobfilename)

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn, txn):
        """Copy a blob record committed elsewhere (`copyTransactionsFrom`).

        The protocol has no blob restore: the record is stored as a
        blob over the oid's current revision, which gives it the
        transaction's tid (set by tpc_begin) and the same data.
        """
        blobs = self._blob_support()
        if self.isReadOnly():
            raise ReadOnlyError()
        commit = self._commit_for(txn)
        try:
            current = self.getTid(oid)
        except POSKeyError:
            current = z64
        commit.stored[oid] = None
        self._upload(blobs, commit, oid, current, data, blobfilename)

    def _upload(self, blobs, commit, oid, serial, data, blobfilename):
        path = blobs.take(oid, serial, blobfilename)
        commit.blobs.append((oid, path))
        blobs.upload(commit.connection, oid, serial, data, path,
                     commit.txn_id)

    def _fetch_blob(self, oid, serial):
        """Download a blob into the cache (only when it is missing there:
        a cached blob is read even while we are disconnected)."""
        self._call("sendBlob", oid, serial)

    def _blob_support(self):
        """The blob directory, if blobs can be used at all."""
        if self._blobs is None:
            raise Unsupported("%s has no blob directory (blob_dir)"
                              % self.getName())
        if self._server_lacks_blobs():
            raise Unsupported("the storage %r of the server does not "
                              "support blobs" % self._storage_name)
        return self._blobs

    def _server_lacks_blobs(self):
        """Whether the server said its storage has no blobs (we cannot
        tell before the first connection)."""
        interfaces = self._server_interfaces
        return bool(interfaces) and (
            ZODB.interfaces.IBlobStorage.__module__,
            "IBlobStorage") not in interfaces
