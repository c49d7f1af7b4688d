"""The server process of `thread_floor.py`: a thread per connection
that receives and answers, and does nothing else.

Run as ``python floor_server.py PORT``; it prints "listening" once it
accepts connections, and stops when its standard input closes.  Each
connection's thread blocks in `recv_into` on its own socket and answers
whatever arrives with one `sendall` of a load reply's size.  Only the
standard library is imported, so any interpreter can run it.
"""

import socket
import sys
import threading

#: About the size of a loadBefore reply on the wire.
REPLY = b"a" * 160


def serve(port):
    listener = socket.create_server(("127.0.0.1", port))
    threading.Thread(target=_accept, args=(listener,), daemon=True,
                     name="floor-accept").start()
    print("listening", flush=True)
    sys.stdin.read()  # until the bench closes our input


def _accept(listener):
    number = 0
    while True:
        connection, _peer = listener.accept()
        number += 1
        threading.Thread(target=_answer, args=(connection,), daemon=True,
                         name="floor-connection-%d" % number).start()


def _answer(connection):
    buffer = bytearray(4096)
    with connection:
        while connection.recv_into(buffer):
            connection.sendall(REPLY)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
