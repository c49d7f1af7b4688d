"""One client and its server on the same interpreter: the pair's
one-client lines of GitHub issue 17, with the GIL and free-threaded.

Our ClientStorage on our server, and ZEO's ClientStorage on ZEO's
server, each client in a process of its own run by the same interpreter
as its server (the free-threaded one with the GIL off).  The client has
a 1-byte cache, so every load goes to the server; it loads the
template's objects in turn for the window.  Reported: loads/s, and the
CPU per load of the server and of the client process
(`pair_client.py`).
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile

import busy_clients
from server_cpu import ServerCpuMeter
from table import render_table

SIDES = busy_clients.SIDES
CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "pair_client.py")


def measure(interpreter, impl, template, scratch, duration):
    """`(loads per second, server CPU us per load, client CPU us per
    load)` of one client on one server, both run by `interpreter`."""
    _label, python, environment = interpreter
    directory = tempfile.mkdtemp(prefix="pair-", dir=scratch)
    server = busy_clients.start_server(interpreter, impl, template,
                                       directory)
    try:
        spec = {"impl": impl, "port": server.address[1],
                "oids": [oid.hex() for oid in template.oids],
                "duration": duration}
        client = subprocess.Popen(
            [python, CLIENT_SCRIPT, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, **environment))
        with client:
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("the %s client did not connect" % impl)
            meter = ServerCpuMeter(server.process.pid)
            meter.start()
            client.stdin.write("go\n")
            client.stdin.flush()
            counted = json.loads(client.stdout.readline())
            meter.stop()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    loads = max(counted["loads"], 1)
    return (counted["loads"] / duration, meter.seconds / loads * 1e6,
            counted["cpu"] / loads * 1e6)


def measure_all(options, scratch, template):
    """`{(interpreter label, side): [figures per pass]}`."""
    cells = [(interpreter, side)
             for interpreter in busy_clients.interpreters(options)
             for side in SIDES]
    results = {}
    for _pass in range(options.repetitions):
        for interpreter, side in cells:
            results.setdefault((interpreter[0], side), []).append(measure(
                interpreter, side, template, scratch, options.duration))
    return results


def print_report(results):
    print("One client and its server on one interpreter (our pair, ZEO's "
          "pair; 1-byte client cache): loads/s, server and client CPU "
          "per load (us), medians")
    columns = ("pair", "interpreter", "loads/s", "server us", "client us")
    rows = []
    for (label, side), figures in sorted(results.items()):
        rows.append((busy_clients.side_name(side), label) + tuple(
            "%.0f" % statistics.median(f[index] for f in figures)
            for index in range(3)))
    print("\n".join(render_table(columns, rows)))
    for side in SIDES:
        if ("free-threaded", side) in results and ("GIL", side) in results:
            print("%s pair, free-threaded / GIL loads/s: %.2f" % (
                busy_clients.side_name(side),
                statistics.median(f[0] for f in
                                  results["free-threaded", side])
                / statistics.median(f[0] for f in results["GIL", side])))
