"""A ClientStorage's blobs, in one of two modes (PROTOCOL.md section 10).

`CachedBlobs` (a `blob_dir` of the client's own): blobs are downloaded
on first use into a `BlobCache`, and uploads stream the file to the
server in chunks; after the commit the uploaded file moves into the
cache under the new tid.

`SharedBlobs` (`shared_blob_dir`): the client and the server see the same
directory (the server's, e.g. over NFS), so no blob data crosses the
socket: loads open the committed file, and an upload is a file the
client places in the oid's directory, of which it sends only the name.

Both take an uploaded file at once (`take`): it moves next to where the
blob will live, so that the application's temporary file is ours from
then on (ZODB removes a savepoint's files once the commit is over), and
a full disk shows at store time rather than at the end of the commit.
"""

import itertools
import logging
import os

import ZODB.blob
from ZODB.POSException import POSKeyError

from zeo.client.blob_cache import (
    BlobCache, Downloads, check_id, prepare_directory)

logger = logging.getLogger(__name__)

#: Bytes per `storeBlobChunk` (the size ZEO clients and servers use).
CHUNK_SIZE = 59000


def open_blobs(directory, shared, cache_size, cache_size_check, name):
    """The blob support of a ClientStorage with blob directory
    `directory`."""
    if shared:
        return SharedBlobs(directory)
    return CachedBlobs(directory, cache_size, cache_size_check, name)


class _Blobs:
    """What both modes share: the directory helper, uploads taken into
    the oid's directory, and clean-up of those not committed."""

    def __init__(self, fshelper):
        self.fshelper = fshelper

    def temporary_directory(self):
        return self.fshelper.temp_dir

    def take(self, oid, serial, filename):
        """Move the application's `filename` into the oid's directory;
        return the new name, which ends in ``.tmp``, as a shared
        directory's server requires (PROTOCOL.md 10.3)."""
        self.fshelper.createPathForOID(oid)
        descriptor, path = self.fshelper.blob_mkstemp(oid, serial)
        os.close(descriptor)
        ZODB.blob.rename_or_copy_blob(filename, path)
        return path

    def settle(self, uploads, tid):
        """The transaction that uploaded `uploads` (`(oid, path)` pairs)
        ended: committed as `tid`, or not at all (None).  Never fails:
        the transaction is over whatever happens to the files."""
        for oid, path in uploads:
            try:
                if tid is None:
                    ZODB.blob.remove_committed(path)
                else:
                    self._committed(oid, tid, path)
            except FileNotFoundError:
                pass  # the server removed it (shared directory)
            except OSError as error:
                logger.warning("uploaded blob %s: %s", path, error)

    def close(self):
        """Stop whatever runs in the background."""


class SharedBlobs(_Blobs):
    """`blob_dir` is the server's blob directory, shared."""

    def __init__(self, directory):
        fshelper = ZODB.blob.FilesystemHelper(directory)
        prepare_directory(fshelper)
        _Blobs.__init__(self, fshelper)
        self.downloads = Downloads()  # nothing is ever downloaded

    def load(self, oid, serial, fetch):
        path = self._path(oid, serial)
        if not os.path.exists(path):
            raise POSKeyError("No blob file at %s" % path, oid, serial)
        return path

    def open(self, oid, serial, fetch, blob):
        path = self._path(oid, serial)
        try:
            return _opener(blob)(path)
        except FileNotFoundError:
            raise POSKeyError("No blob file at %s" % path, oid,
                              serial) from None

    def _path(self, oid, serial):
        check_id(oid, "oid")
        check_id(serial, "tid")
        return self.fshelper.getBlobFilename(oid, serial)

    def upload(self, connection, oid, serial, data, path, txn_id):
        connection.oneway("storeBlobShared", oid, serial, data,
                          os.path.basename(path), txn_id)

    def _committed(self, oid, tid, path):
        pass  # the server moved the file into place


class CachedBlobs(_Blobs):
    """`blob_dir` is the client's blob cache."""

    def __init__(self, directory, cache_size, cache_size_check, name):
        self.cache = BlobCache(directory, cache_size, cache_size_check, name)
        _Blobs.__init__(self, self.cache.fshelper)
        self._uploads = itertools.count()
        #: Absolute now: ZODB's helper keeps it relative to the working
        #: directory of the moment, which an application may change.
        self._temp_dir = os.path.abspath(self.fshelper.temp_dir)
        self.downloads = self.cache.downloads

    def take(self, oid, serial, filename):
        """A file in our temporary directory (where ZODB makes a blob's
        file once it belongs to a connection) is ours already.  Another
        (a new blob's, in the system's temporary directory; a savepoint's)
        is renamed into it under a name of our own: creating a file costs
        more than sending a small blob."""
        directory = self._temp_dir
        if os.path.dirname(os.path.abspath(filename)) == directory:
            return filename
        path = os.path.join(directory, "%s-%d-%d.upload" % (
            oid.hex(), os.getpid(), next(self._uploads)))
        ZODB.blob.rename_or_copy_blob(filename, path, chmod=False)
        return path

    def load(self, oid, serial, fetch):
        return self.cache.load(oid, serial, fetch)

    def open(self, oid, serial, fetch, blob):
        return self.cache.open(oid, serial, fetch, _opener(blob))

    def upload(self, connection, oid, serial, data, path, txn_id):
        """Stream the file to the server, one chunk at a time, each sent
        as it is read (from the file to the socket by the kernel, on a
        plain socket): memory holds none of it."""
        connection.oneway("storeBlobStart")
        with open(path, "rb") as source:
            connection.oneway_file_chunks("storeBlobChunk", source,
                                          CHUNK_SIZE)
        connection.oneway("storeBlobEnd", oid, serial, data, txn_id)

    def _committed(self, oid, tid, path):
        self.cache.adopt(oid, tid, path)

    def close(self):
        self.cache.close()


def _opener(blob):
    """How `openCommittedBlobFile` opens a file: as a `BlobFile` of
    `blob`, or as a plain file without one."""
    if blob is None:
        return lambda path: open(path, "rb")
    return lambda path: ZODB.blob.BlobFile(path, "r", blob)
