"""A 1 GB blob through our client in bounded memory.

A client process (a fresh interpreter, so that its peak RSS says
something) connects a writer and a reader, each with its own blob cache,
writes a 1 GB blob piece by piece, commits it (the upload streams), then
reads it back through the reader (the download streams to its cache).
Its peak RSS may grow by at most `RSS_BOUND` over what it was once
connected, and the bytes read back must hash equal to those written.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import server_environment
from server_process import stop_all
from test_blob_client import BLOB_SERVER_IMPLS, start_blob_server

pytestmark = pytest.mark.timeout(300)

#: The blob's size, and the client's allowed peak RSS growth.
BLOB_SIZE = 1024 ** 3
RSS_BOUND = 64 * 1024 ** 2

CLIENT_PROCESS = r"""
import hashlib, json, os, resource, sys, time
import transaction, ZODB, ZODB.blob
from zeo.ClientStorage import ClientStorage

address, directory, size = json.loads(sys.argv[1])
PIECE = 1024 * 1024


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def piece(index):
    return index.to_bytes(8, "big") * (PIECE // 8)


def database(name):
    return ZODB.DB(ClientStorage(tuple(address), wait_timeout=10,
                                 blob_dir=os.path.join(directory, name)))


writer, reader = database("writer-cache"), database("reader-cache")
writing = transaction.TransactionManager()
connection = writer.open(writing)
reading = transaction.TransactionManager()
reader_connection = reader.open(reading)
reader_connection.root()
baseline = peak_rss()

started = time.monotonic()
written = hashlib.sha256()
connection.root()["big"] = blob = ZODB.blob.Blob()
with blob.open("w") as file:
    for index in range(size // PIECE):
        data = piece(index)
        written.update(data)
        file.write(data)
wrote = time.monotonic()
writing.commit()
uploaded = time.monotonic()
after_upload = peak_rss()

reading.begin()
while "big" not in reader_connection.root():
    time.sleep(0.05)
    reading.begin()
read = hashlib.sha256()
length = 0
with reader_connection.root()["big"].open() as file:
    while True:
        data = file.read(PIECE)
        if not data:
            break
        read.update(data)
        length += len(data)
downloaded = time.monotonic()
print(json.dumps({
    "baseline": baseline, "after_upload": after_upload,
    "after_download": peak_rss(), "written": written.hexdigest(),
    "read": read.hexdigest(), "length": length,
    "write_seconds": wrote - started, "upload_seconds": uploaded - wrote,
    "download_seconds": downloaded - uploaded,
}))
reader.close()
writer.close()
"""


@pytest.mark.parametrize("impl", BLOB_SERVER_IMPLS)
def test_a_1gb_blob_streams_up_and_down_in_bounded_memory(impl, tmp_path):
    server = start_blob_server(str(tmp_path), impl)
    try:
        argument = json.dumps([server.address, str(tmp_path), BLOB_SIZE])
        finished = subprocess.run(
            [sys.executable, "-c", CLIENT_PROCESS, argument],
            capture_output=True, text=True, timeout=240,
            env=dict(os.environ, **server_environment()))
    finally:
        assert stop_all([server]) == [0]
    assert finished.returncode == 0, finished.stderr
    figures = json.loads(finished.stdout)
    print(figures)
    assert figures["length"] == BLOB_SIZE
    assert figures["read"] == figures["written"]
    assert figures["after_upload"] - figures["baseline"] <= RSS_BOUND
    assert figures["after_download"] - figures["baseline"] <= RSS_BOUND
