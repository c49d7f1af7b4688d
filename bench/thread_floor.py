"""The floor of a thread-per-connection server: what one request costs
when the server does nothing but receive it and answer.

GitHub issue 17 asks our server, free-threaded, for at least ZEO's
throughput with many busy clients, where ZEO's server spends about 27 us
of CPU per load.  Here the cheapest server of our design (a thread per
connection blocking in `recv_into` on its own socket and answering with
one `sendall` of a load reply's size: no decoding, no storage, no locks;
`floor_server.py`) is measured as the busy clients section measures the
servers: client threads in the same processes on this machine,
each sending a request and waiting for the answer as fast as it can,
and the server's CPU per request read from /proc.  It is mostly the
kernel's work (the wake-up of a sleeping thread, two socket calls), and
it is a lower bound for any server of this design; what our server
spends above it is its own work.
"""

import os
import socket
import statistics
import subprocess
import threading
import time

import busy_clients
import server_process
from floor_server import REPLY
from table import render_table

#: A loadBefore call is about this size on the wire.
REQUEST = b"r" * 46
SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "floor_server.py")


def _clients(pipe, port, count):
    """A client process: `count` threads, each asking as fast as it can
    during the window the parent sends."""
    sockets = [socket.create_connection(("127.0.0.1", port))
               for _ in range(count)]
    pipe.send("ready")
    start_at, end_at = pipe.recv()
    done = []

    def ask(sock):
        requests = 0
        while time.monotonic() < start_at:
            time.sleep(0.001)
        while time.monotonic() < end_at:
            sock.sendall(REQUEST)
            received = 0
            while received < len(REPLY):
                answer = sock.recv(4096)
                if not answer:
                    raise ConnectionError("the floor server hung up")
                received += len(answer)
            requests += 1
        done.append(requests)
        sock.close()

    threads = [threading.Thread(target=ask, args=(sock,),
                                name="floor-client-%d" % index)
               for index, sock in enumerate(sockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pipe.send(sum(done))


def measure(interpreter, clients, duration):
    """`(requests per second, server CPU us per request)`."""
    _label, python, environment = interpreter
    port = server_process.free_port()
    server = subprocess.Popen(
        [python, SERVER_SCRIPT, str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, **environment))
    try:
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError("the floor server did not start")
        counted, server_seconds = busy_clients.run_window(
            _clients, (port,), clients, server.pid, duration)
    finally:
        server.stdin.close()
        server.wait(30)
    requests = sum(counted)
    return requests / duration, server_seconds / max(requests, 1) * 1e6


def measure_all(options):
    """`{(interpreter label, clients): [(requests/s, CPU us)]}`."""
    results = {}
    for clients in busy_clients.CLIENT_COUNTS:
        for _pass in range(options.repetitions):
            for interpreter in busy_clients.interpreters(options):
                results.setdefault((interpreter[0], clients), []).append(
                    measure(interpreter, clients, options.duration))
    return results


def print_report(results):
    print("The floor of a thread per connection (bench/thread_floor.py: "
          "receive, answer, nothing else): requests/s and server CPU per "
          "request (us), medians")
    labels = sorted({label for label, _clients in results},
                    key=["GIL", "free-threaded"].index)
    columns = ("clients",) + tuple(
        "%s %s" % (label, heading) for label in labels
        for heading in ("requests/s", "us"))
    rows = []
    for clients in busy_clients.CLIENT_COUNTS:
        row = [str(clients)]
        for label in labels:
            figures = results[label, clients]
            row += ["%.0f" % statistics.median(f[0] for f in figures),
                    "%.0f" % statistics.median(f[1] for f in figures)]
        rows.append(tuple(row))
    print("\n".join(render_table(columns, rows)))
