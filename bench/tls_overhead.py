"""TLS: what encryption costs on our server and on the real ZEO server.

Issue 13 asks that TLS cost ours no more than it costs ZEO: the ratio
ours/ZEO over TLS should be at least what it is over plain TCP.  So the
real ZEO client (the one client both servers serve alike), one process,
runs uncached load round trips and 1-object commits against each server,
over plain TCP and over TLS (TLS 1.3, client certificates required, the
certificates of tests/tls_certificates.py made for this run).

Connection set-up is timed with the bench's raw client, in this process:
TCP connect, the TLS handshake (for the TLS lines), the server's greeting
and `register`, `SETUP_CONNECTIONS` times one after the other; the median
per pass, and the median of the passes.

Measurements alternate their order from pass to pass like the rest of the
bench, and every throughput window checks the server's counters.
"""

import statistics
import tempfile
import time

from passes import alternating_passes
from raw_client import RawClient
from storage_template import StorageTemplate
from tls_certificates import make_pki
from workloads import COMMIT, LOAD, ZEO_CLIENT, WorkerPool, object_record

SIDES = ("ours", "ZEO")
TRANSPORTS = ("plain", "TLS")
CELLS = [(transport, side) for transport in TRANSPORTS for side in SIDES]
WORKLOADS = ((LOAD, "uncached load round trips"),
             (COMMIT, "1-object commits"))
#: Connections timed one after the other per set-up measurement.
SETUP_CONNECTIONS = 30


def run_section(options, scratch, measure, start_server):
    """Measure and print the TLS section; returns the exit status its
    checks call for.  `measure` and `start_server` are run.py's."""
    pki = make_pki(tempfile.mkdtemp(dir=scratch))
    template = StorageTemplate(tempfile.mkdtemp(dir=scratch),
                               map(object_record, range(options.objects)))
    throughput = {(workload, cell): [] for workload, _ in WORKLOADS
                  for cell in CELLS}
    setup = {cell: [] for cell in CELLS}
    pool = WorkerPool(1)
    try:
        for _number, order in alternating_passes(
                CELLS, options.repetitions, "TLS, "):
            for workload, _title in WORKLOADS:
                for transport, side in order:
                    throughput[workload, (transport, side)].append(measure(
                        (workload, 1), (ZEO_CLIENT, side), options, template,
                        pool, scratch, pki if transport == "TLS" else None))
            for transport, side in order:
                setup[transport, side].append(time_setup(
                    start_server, side, options, template, scratch,
                    pki if transport == "TLS" else None))
    finally:
        pool.close()
    print_report(throughput, setup, options)
    problems = [(workload, cell, problem)
                for (workload, cell), runs in throughput.items()
                for run in runs for problem in run.problems]
    for workload, (transport, side), problem in problems:
        print("PROBLEM (TLS section, %s, %s, %s server): %s"
              % (workload, transport, side, problem))
    return 1 if problems else 0


def time_setup(start_server, side, options, template, scratch, pki):
    """Median seconds to connect and register, on a fresh server."""
    directory = tempfile.mkdtemp(dir=scratch)
    template.copy_to(directory)
    server = start_server(directory, side, options, pki)
    context = pki.client_context() if pki is not None else None
    try:
        times = []
        for _ in range(SETUP_CONNECTIONS):
            started = time.perf_counter()
            client = RawClient(server.address, ssl_context=context)
            times.append(time.perf_counter() - started)
            client.close()
    finally:
        server.stop()
    return statistics.median(times)


def print_report(throughput, setup, options):
    print()
    print("TLS: the real ZEO client, one process, over plain TCP and over "
          "TLS 1.3 with")
    print("client certificates; operations per second, median of %d "
          "windows." % options.repetitions)
    print("Target: ours/ZEO over TLS at least ours/ZEO over plain TCP.")
    rows = [("", "plain ours", "plain ZEO", "ours/ZEO", "TLS ours",
             "TLS ZEO", "ours/ZEO", "TLS/plain ours", "TLS/plain ZEO")]
    for workload, title in WORKLOADS:
        medians = {cell: statistics.median(
            run.throughput for run in throughput[workload, cell])
            for cell in CELLS}
        rows.append((title,) + tuple(_figures(medians, "%.0f")))
    print_rows(rows)
    print()
    print("Connection set-up (connect, TLS handshake, greeting, register), "
          "milliseconds,")
    print("median of %d connections per pass, median of the passes "
          "(lower is better)." % SETUP_CONNECTIONS)
    medians = {cell: statistics.median(setup[cell]) * 1000 for cell in CELLS}
    rows = [("", "plain ours", "plain ZEO", "ours/ZEO", "TLS ours",
             "TLS ZEO", "ours/ZEO", "TLS/plain ours", "TLS/plain ZEO"),
            ("connect + register",) + tuple(_figures(medians, "%.2f"))]
    print_rows(rows)


def _figures(medians, number_format):
    """The cells of one row: per transport ours, ZEO and their ratio, then
    TLS/plain for each server."""
    for transport in TRANSPORTS:
        ours, theirs = medians[transport, "ours"], medians[transport, "ZEO"]
        yield number_format % ours
        yield number_format % theirs
        yield _ratio(ours, theirs)
    for side in SIDES:
        yield _ratio(medians["TLS", side], medians["plain", side])


def _ratio(a, b):
    return "%.2f" % (a / b) if b else "-"


def print_rows(rows):
    widths = [max(len(row[index]) for row in rows)
              for index in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) if index == 0 else
                        cell.rjust(width)
                        for index, (cell, width) in enumerate(
                            zip(row, widths))).rstrip())
