"""Many busy clients on one server: the GIL against free-threading.

GitHub issue 17.  The server alone (bench/raw_client.py: no client
cache, one blocking socket, so the client side costs little) takes 1, 4,
16 and 64 clients that load objects as fast as they can.  Each count is
measured on our server and on the real ZEO server, each run once by the
interpreter of this bench (with the GIL) and once by the free-threaded
interpreter of `make test-ft` with the GIL off (`PYTHON_GIL=0`;
`.venv-ft/bin/python` unless --ft-python names another).  The clients
are threads in CLIENT_PROCESSES processes of this interpreter; on a small
machine they share the CPUs with the server, so the server's CPU time per
load is the steadier figure.  Each line shows the median of the passes.
"""

import concurrent.futures
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time

import server_process
from passes import alternating_passes
from raw_client import RawClient
from server_cpu import ServerCpuMeter
from storage_template import StorageTemplate
from table import render_table
from workloads import object_record

CLIENT_COUNTS = (1, 4, 16, 64)
CLIENT_PROCESSES = 4
SIDES = (server_process.OURS, server_process.THEIRS)
#: Seconds the clients are given to connect and register.
CONNECT_TIMEOUT = 60


def interpreters(options):
    """`(label, python, environment)` of each interpreter measured."""
    found = [("GIL", sys.executable, {})]
    if os.path.exists(options.ft_python):
        found.append(("free-threaded", options.ft_python,
                      {"PYTHON_GIL": "0"}))
    else:
        print("busy clients: no free-threaded interpreter at %s (make "
              "test-ft builds it); measuring the GIL build only"
              % options.ft_python, file=sys.stderr)
    return found


def _clients(connection, address, oids, count):
    """A client process: `count` clients in threads, each loading the
    objects in turn during the window the parent sends."""
    clients = [RawClient(address) for _ in range(count)]
    connection.send("ready")
    start_at, end_at = connection.recv()
    cpu_at_start = time.process_time()

    def load(index):
        client = clients[index]
        position, loads = index * 7, 0
        while time.monotonic() < start_at:
            time.sleep(0.001)
        while time.monotonic() < end_at:
            client.load_before(oids[position % len(oids)])
            position += 1
            loads += 1
        client.close()
        return loads

    with concurrent.futures.ThreadPoolExecutor(
            count, thread_name_prefix="bench-client") as pool:
        loads = sum(pool.map(load, range(count)))
    connection.send((loads, time.process_time() - cpu_at_start))


def start_server(interpreter, impl, template, directory):
    """Server `impl` on a copy of `template` in `directory`, run by
    `interpreter` (`(label, python, environment)`)."""
    _label, python, environment = interpreter
    template.copy_to(directory)
    port = server_process.free_port()
    return server_process.ServerProcess(
        ["-a", "127.0.0.1:%d" % port, "-f",
         os.path.join(directory, "Data.fs")],
        impl=impl, address=("127.0.0.1", port), env=environment,
        command=[python, "-m", "%s.runzeo" % impl])


def measure(interpreter, impl, clients, template, scratch, duration):
    """`(loads per second, server CPU microseconds per load, client CPU
    microseconds per load)` of one server process serving `clients` busy
    clients."""
    directory = tempfile.mkdtemp(prefix="busy-", dir=scratch)
    server = start_server(interpreter, impl, template, directory)
    try:
        counted, server_seconds = run_window(
            _clients, (server.address, template.oids), clients,
            server.process.pid, duration)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    loads = sum(loads for loads, _cpu in counted)
    client_seconds = sum(cpu for _loads, cpu in counted)
    return (loads / duration, server_seconds / max(loads, 1) * 1e6,
            client_seconds / max(loads, 1) * 1e6)


def run_window(target, arguments, clients, server_pid, duration):
    """Spread `clients` over CLIENT_PROCESSES processes, each running
    `target(pipe, *arguments, its share)`: it sends "ready" once
    connected, receives the window `(start_at, end_at)` and sends back
    what it counted.  Returns what each process sent, and the server's
    CPU seconds during the window."""
    processes = []
    try:
        shares = [clients // CLIENT_PROCESSES
                  + (index < clients % CLIENT_PROCESSES)
                  for index in range(min(clients, CLIENT_PROCESSES))]
        for share in shares:
            ours, theirs = multiprocessing.Pipe()
            process = multiprocessing.Process(
                target=target, args=(theirs,) + tuple(arguments) + (share,))
            process.start()
            processes.append((process, ours))
        for _process, connection in processes:
            if not connection.poll(CONNECT_TIMEOUT):
                raise RuntimeError("the clients did not connect in time")
            connection.recv()
        meter = ServerCpuMeter(server_pid)
        start_at = time.monotonic() + 0.05
        for _process, connection in processes:
            connection.send((start_at, start_at + duration))
        time.sleep(max(0.0, start_at - time.monotonic()))
        meter.start()
        time.sleep(duration)
        meter.stop()
        return ([connection.recv() for _process, connection in processes],
                meter.seconds)
    finally:
        for process, _connection in processes:
            process.join(30)


def make_template(options, scratch):
    """The storage every measurement of this section starts from."""
    directory = tempfile.mkdtemp(prefix="busy-template-", dir=scratch)
    return StorageTemplate(
        directory, [object_record(index) for index in range(options.objects)])


def measure_all(options, scratch, template):
    """`{(interpreter label, side, clients): [(loads/s, CPU us)]}`."""
    cells = [(interpreter, side) for interpreter in interpreters(options)
             for side in SIDES]
    results = {}
    for clients in CLIENT_COUNTS:
        for _number, ordered in alternating_passes(
                cells, options.repetitions,
                "busy clients (%d), " % clients):
            for interpreter, side in ordered:
                figures = measure(interpreter, side, clients, template,
                                  scratch, options.duration)
                results.setdefault((interpreter[0], side, clients),
                                   []).append(figures)
    return results


def print_report(results):
    print("Busy raw clients loading, the server alone: loads/s and server "
          "CPU per load (us), medians")
    labels = sorted({label for label, _side, _clients in results},
                    key=["GIL", "free-threaded"].index)
    _print_table(results, labels, ("loads/s", "us"),
                 lambda rate, server_us, _client_us: [
                     "%.0f" % rate, "%.0f" % server_us])
    print()
    cpus = len(os.sched_getaffinity(0))
    print("The CPU ceiling: %d CPUs / (server + client CPU per load), "
          "and the share of it reached (medians)" % cpus)
    print("(the clients share the CPUs with the server here, so no cell "
          "can pass it)")

    def ceiling_cells(rate, server_us, client_us):
        ceiling = cpus * 1e6 / max(server_us + client_us, 1e-9)
        return ["%.0f" % client_us, "%.0f" % ceiling,
                "%.2f" % (rate / ceiling)]

    _print_table(results, labels, ("client us", "ceiling/s", "reached"),
                 ceiling_cells)
    if "free-threaded" in labels:
        print()
        print("free-threaded / GIL throughput: " + "; ".join(
            "%s %s" % (side_name(side), ", ".join(
                "%d: %.2f" % (clients, _ratio(results, side, clients))
                for clients in CLIENT_COUNTS)) for side in SIDES))


def _print_table(results, labels, headings, cells):
    """One row per client count; for each interpreter and server, the
    columns `headings`, filled by `cells(loads/s, server CPU us, client
    CPU us)` with the medians of the passes."""
    columns = ("clients",) + tuple(
        "%s %s %s" % (side_name(side), label, heading)
        for label in labels for side in SIDES for heading in headings)
    rows = []
    for clients in CLIENT_COUNTS:
        row = [str(clients)]
        for label in labels:
            for side in SIDES:
                figures = results[label, side, clients]
                row += cells(*(statistics.median(f[index] for f in figures)
                               for index in range(3)))
        rows.append(tuple(row))
    print("\n".join(render_table(columns, rows)))


def _ratio(results, side, clients):
    def median(label):
        return statistics.median(f[0] for f in results[label, side, clients])
    return median("free-threaded") / max(median("GIL"), 1e-9)


def side_name(side):
    return "ours" if side == server_process.OURS else "ZEO"
