"""The client process of the blob measurements.

Run by `blobs.py` as ``python blob_client.py SPEC``, SPEC a JSON object;
prints one JSON object (the results) on stdout.  A fresh process for each
direction, with an empty blob cache, so that a download really crosses
the socket.  Two modes, with ``ClientStorage(address, blob_dir=DIR)`` of
the client kind named in the spec (ours or ZEO's):

The client kind ``local`` opens a FileStorage with a blob directory in
this process instead: no server, no network, no copy of the bytes.  Any
client and server pair does that same work and more, so its times are the
floor of every pair's.

* ``upload``: write `count` blobs of `size` bytes and commit them, at most
  `per_transaction` to a transaction, under root["blobs"]; the clock runs
  from the first write to the last commit.
* ``download``: open every blob of root["blobs"] and read it to the end,
  in chunks; the clock runs from the first open to the last byte.  The
  bytes read are hashed and the digest reported, so that the bench can
  check them against the upload's.
"""

import hashlib
import importlib
import json
import sys
import time

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from persistent.list import PersistentList

CLIENT_MODULES = {"ours": "zeo.ClientStorage", "ZEO": "ZEO.ClientStorage"}
CHUNK = 1024 * 1024
#: One megabyte of pseudo-random bytes, cycled with a per-blob prefix.
_PATTERN = hashlib.shake_256(b"zeo blob bench").digest(CHUNK)


def open_db(spec):
    if spec["client"] == "local":
        return ZODB.DB(ZODB.FileStorage.FileStorage(
            spec["path"], blob_dir=spec["storage_blob_dir"]))
    module = importlib.import_module(CLIENT_MODULES[spec["client"]])
    storage = module.ClientStorage(
        ("127.0.0.1", spec["port"]), blob_dir=spec["blob_dir"],
        wait_timeout=30)
    return ZODB.DB(storage)


def blob_bytes(number, size):
    """The content of blob `number`, in chunks of at most CHUNK bytes."""
    prefix = b"%08d" % number
    left = size
    first = True
    while left:
        chunk = _PATTERN[:left]
        if first:
            chunk = prefix + chunk[len(prefix):]
            first = False
        yield chunk
        left -= len(chunk)


def upload(spec):
    db = open_db(spec)
    digest = hashlib.sha256()
    try:
        connection = db.open()
        root = connection.root()
        blobs = root["blobs"] = PersistentList()
        transaction.commit()
        started = time.perf_counter()
        for number in range(spec["count"]):
            blob = ZODB.blob.Blob()
            with blob.open("w") as file:
                for chunk in blob_bytes(number, spec["size"]):
                    file.write(chunk)
                    digest.update(chunk)
            blobs.append(blob)
            if (number + 1) % spec["per_transaction"] == 0:
                transaction.commit()
        transaction.commit()
        seconds = time.perf_counter() - started
        connection.close()
    finally:
        db.close()
    return {"seconds": seconds, "digest": digest.hexdigest()}


def download(spec):
    db = open_db(spec)
    digest = hashlib.sha256()
    read = 0
    try:
        connection = db.open()
        blobs = list(connection.root()["blobs"])
        started = time.perf_counter()
        for blob in blobs:
            with blob.open("r") as file:
                while True:
                    chunk = file.read(CHUNK)
                    if not chunk:
                        break
                    read += len(chunk)
                    digest.update(chunk)
        seconds = time.perf_counter() - started
        connection.close()
    finally:
        db.close()
    return {"seconds": seconds, "digest": digest.hexdigest(), "bytes": read}


def main():
    spec = json.loads(sys.argv[1])
    result = {"upload": upload, "download": download}[spec["mode"]](spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
