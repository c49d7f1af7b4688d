"""The cheapest move of a blob's bytes from one process's file to
another's: the part of the blob floor that local FileStorage leaves out.

Any client and server pair moves every byte of a blob from a file on
one side to a file on the other, through a socket, after the
application has written it (upload) or before it reads it (download):
ZODB hands a blob to the storage only at commit, and `loadBlob` returns
a whole file.  Here that move is done as cheaply as Linux allows, with
no protocol at all: `os.sendfile` from the file to a loopback socket, and
on the other side, in a process of its own, `recv_into` one buffer and
`os.write` it to a new file.  `copy_seconds` times it.

Run as ``python blob_copy.py PORT PATH``, it is that receiving side.
"""

import os
import socket
import subprocess
import sys
import time

_BUFFER = 1024 * 1024


def copy_seconds(size, directory):
    """Seconds to move `size` bytes from a file in `directory` to a new
    file there, written by another process."""
    source = os.path.join(directory, "copy-source")
    target = os.path.join(directory, "copy-target")
    _write_file(source, size)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    receiver = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__),
         str(listener.getsockname()[1]), target])
    try:
        connection, _peer = listener.accept()
        with connection, open(source, "rb") as file:
            started = time.perf_counter()
            offset = 0
            while offset < size:
                offset += os.sendfile(connection.fileno(), file.fileno(),
                                      offset, size - offset)
            connection.shutdown(socket.SHUT_WR)
            connection.recv(1)  # the receiver closes once all is written
            seconds = time.perf_counter() - started
    finally:
        listener.close()
        receiver.wait(60)
    written = os.stat(target).st_size
    os.remove(source)
    os.remove(target)
    if written != size:
        raise RuntimeError("the copy wrote %d bytes of %d" % (written, size))
    return seconds


def _write_file(path, size):
    block = b"\x5a" * _BUFFER
    with open(path, "wb") as file:
        while size > 0:
            size -= file.write(block[:size])


def receive(port, path):
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port)) as connection, \
            open(path, "wb", buffering=0) as file:
        while True:
            received = connection.recv_into(buffer)
            if not received:
                break
            file.write(view[:received])


if __name__ == "__main__":
    receive(int(sys.argv[1]), sys.argv[2])
