"""Hold idle registered clients that read what the server sends.

Run by bench/idle_commits.py as its own process, so the idle clients'
reading does not share the bench's interpreter lock with the committer:

    python idle_holder.py HOST PORT COUNT

It opens COUNT registered raw-protocol connections (bench/raw_client.py),
prints "ready", then reads and discards everything the server sends on
them (the invalidations of other clients' commits), as the reader thread
of an idle application's ClientStorage would, from one thread with a
selector.  It stops when its standard input closes, and prints the bytes
it read and the connections the server closed.
"""

import resource
import selectors
import sys
import threading

from raw_client import RawClient

_RECV_SIZE = 256 * 1024


def _watch_stdin(stop):
    sys.stdin.read()
    stop.set()


def main():
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clients = [RawClient((host, port)) for _ in range(count)]
    selector = selectors.DefaultSelector()
    for client in clients:
        client.socket.setblocking(False)
        selector.register(client.socket, selectors.EVENT_READ)
    stop = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True,
                     name="idle-holder-stdin").start()
    print("ready", flush=True)
    buffer = bytearray(_RECV_SIZE)
    received = 0
    while not stop.is_set():
        for key, _events in selector.select(timeout=0.2):
            try:
                got = key.fileobj.recv_into(buffer)
            except BlockingIOError:
                continue
            if not got:  # the server closed it
                selector.unregister(key.fileobj)
            received += got
    for client in clients:
        client.close()
    print(received, count - len(selector.get_map()), flush=True)


if __name__ == "__main__":
    main()
