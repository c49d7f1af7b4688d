"""Blob transfer: upload and download throughput, and the server's memory.

GitHub issue 6 asks how fast blobs cross each server and each pair, and
what a big blob costs the server in memory.  Four cells:

* the real ZEO client on our server and on the ZEO server (servers);
* our client on our server against the ZEO client on the ZEO server
  (pairs);
* the same client script on a local FileStorage, in its own process,
  plus the cheapest move of the same bytes from a file in one process
  to a file in another (`blob_copy.py`: sendfile, recv_into, write): the
  floor.  A pair does all the local work (the application's writes and
  reads, the FileStorage commit) and, before or after it, that move
  with a protocol around it.  So no pair can beat the floor, and floor /
  ZEO's pair is the highest pair ratio this machine allows, printed as
  "bound".

Two cases: 1,000 blobs of 100 KB (100 to a transaction) and one blob of
200 MB.  Each measurement starts a server with a fresh FileStorage and
blob directory, uploads with one client process (`blob_client.py`) and
downloads with another whose blob cache is empty, then stops the server.
Throughput is MB (10**6 bytes) per second of the client's clock; the
server's peak RSS growth is its VmHWM after the transfer minus its RSS
before (the peak is reset through /proc/PID/clear_refs).  The download's
digest must equal the upload's.  Passes alternate the cell order.
"""

import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import server_process
from blob_copy import copy_seconds
from passes import alternating_passes

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "blob_client.py")
#: (label, blobs, bytes each, blobs per transaction)
CASES = [("1000 blobs of 100 KB", 1000, 100 * 1000, 100),
         ("1 blob of 200 MB", 1, 200 * 1000 * 1000, 1)]
QUICK_CASES = [("100 blobs of 100 KB", 100, 100 * 1000, 100),
               ("1 blob of 20 MB", 1, 20 * 1000 * 1000, 1)]
LOCAL = "local"
#: (client, server): the ZEO client on both servers, the two pairs and the
#: floor.
CELLS = [("ZEO", "ours"), ("ZEO", "ZEO"), ("ours", "ours"), (LOCAL, None)]
COMPARISONS = [("ZEO client", ("ZEO", "ours"), ("ZEO", "ZEO")),
               ("pairs", ("ours", "ours"), ("ZEO", "ZEO")),
               ("floor", (LOCAL, None), ("ZEO", "ZEO"))]
CHILD_TIMEOUT = 600

Transfer = collections.namedtuple(
    "Transfer", "upload_mbps download_mbps server_peak_kib problems")


def run_client(spec):
    child = subprocess.run(
        [sys.executable, CLIENT_SCRIPT, json.dumps(spec)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    if child.returncode != 0:
        raise RuntimeError("%s blob client (%s) exited with status %s:\n%s"
                           % (spec["client"], spec["mode"], child.returncode,
                              child.stderr[-2000:]))
    return json.loads(child.stdout)


def measure(cell, case, options, scratch):
    """One upload and one download through a fresh server (or a fresh
    local FileStorage, for the floor)."""
    client, side = cell
    _label, count, size, per_transaction = case
    os.sync()  # the last measurement's dirty pages are not ours to write
    directory = tempfile.mkdtemp(dir=scratch)
    spec = {"client": client, "count": count, "size": size,
            "per_transaction": per_transaction}
    try:
        if client == LOCAL:
            return transfer(dict(
                spec, path=os.path.join(directory, "Data.fs"),
                storage_blob_dir=os.path.join(directory, "blobs")),
                directory, copy_seconds(count * size, directory))
        return measure_server(spec, side, options, directory)
    finally:
        _release_space(directory)


def _release_space(directory):
    """Give back a measurement's disk space, but keep its files and
    directories (`measure_all` removes them all at the end).

    Deleting them at once slowed every later measurement in a way that
    has nothing to do with either server: ext4 skips an inode freed less
    than a minute ago (five, while its table block is dirty) when it
    allocates one, scanning past each on every creation.  After a small
    blobs measurement had deleted its 6,000 files, each mkdir or new file
    of the next one cost about 1 ms (perf: `recently_deleted` took 59% of
    the downloading client's CPU), for ZEO's pair and ours alike, and the
    small blob lines measured that scan more than the protocol."""
    for parent, _directories, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.truncate(path, 0)


def measure_server(spec, side, options, directory):
    impl = (server_process.OURS if side == "ours" and not options.ours_is_zeo
            else server_process.THEIRS)
    if spec["client"] == "ours" and options.ours_is_zeo:
        spec["client"] = "ZEO"
    section = ("<filestorage 1>\n  path %s\n  blob-dir %s\n</filestorage>"
               % (os.path.join(directory, "Data.fs"),
                  os.path.join(directory, "blobs")))
    server = server_process.start_configured_server(
        directory, storages={"1": section}, impl=impl)
    pid = server.process.pid
    try:
        before = server_process.memory_kib(pid, "VmRSS")
        server_process.reset_peak_memory(pid)
        result = transfer(dict(spec, port=server.address[1]), directory)
        peak = server_process.memory_kib(pid, "VmHWM") - before
    finally:
        stopped = server.stop()
    if stopped != 0:
        result.problems.append("server exited with a non-zero status")
    return result._replace(server_peak_kib=peak)


def transfer(spec, directory, copy=0):
    """Upload with one client process, download with another whose blob
    cache is empty; check that the bytes came back.  `copy` seconds are
    added to each direction (the floor's move of the bytes)."""
    try:
        up = run_client(dict(spec, mode="upload", blob_dir=os.path.join(
            directory, "upload-cache")))
        down = run_client(dict(spec, mode="download", blob_dir=os.path.join(
            directory, "download-cache")))
    except (RuntimeError, OSError, ValueError,
            subprocess.TimeoutExpired) as exc:
        return Transfer(None, None, None, [str(exc)])
    expected = spec["count"] * spec["size"]
    problems = []
    if down["digest"] != up["digest"] or down["bytes"] != expected:
        problems.append("downloaded %d bytes that differ from the upload"
                        % down["bytes"])
    return Transfer(expected / 1e6 / (up["seconds"] + copy),
                    expected / 1e6 / (down["seconds"] + copy), None, problems)


def measure_all(options, scratch):
    """{case label: {cell: [Transfer per pass]}}."""
    cases = QUICK_CASES if options.quick else CASES
    results = {case[0]: {cell: [] for cell in CELLS} for case in cases}
    kept = tempfile.mkdtemp(dir=scratch)  # see _release_space
    try:
        for _number, order in alternating_passes(
                CELLS, options.blob_passes, "blobs, "):
            for case in cases:
                for cell in order:
                    results[case[0]][cell].append(
                        measure(cell, case, options, kept))
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    return results


def _median(transfers, field):
    values = [getattr(t, field) for t in transfers
              if getattr(t, field) is not None]
    return statistics.median(values) if values else None


def _cell(value, number_format="%.1f"):
    return "-" if value is None else number_format % value


def _ratio(ours, theirs):
    return "%.2f" % (ours / theirs) if ours and theirs else "-"


def format_lines(results):
    """One row per case and figure: the ZEO client on our server and on
    ZEO's, then the pairs, each with its ratio; then the floor and the
    bound it puts on the pairs' ratio."""
    row = "%-40s | %8s %8s %6s | %8s %8s %6s | %8s %6s"
    lines = ["%-40s | %-24s | %-24s | %-15s" % (
                 "", "the ZEO client on server", "pairs (client + server)",
                 "floor"),
             row % ("case, figure", "ours", "ZEO", "ratio", "ours", "ZEO",
                    "ratio", "MB/s", "bound")]
    for case, cells in results.items():
        for field, unit in (("upload_mbps", "upload MB/s"),
                            ("download_mbps", "download MB/s"),
                            ("server_peak_kib", "server peak RSS +MB")):
            cell = []
            for _label, ours, theirs in COMPARISONS:
                mine = _median(cells[ours], field)
                other = _median(cells[theirs], field)
                if field != "server_peak_kib":
                    cell += [_cell(mine)] + (
                        [] if ours[0] == LOCAL else [_cell(other)]) + [
                        _ratio(mine, other)]
                elif ours[0] != LOCAL:
                    cell += [_cell(_mib(mine)), _cell(_mib(other)), ""]
                else:
                    cell += ["", ""]
            lines.append(row % tuple(["%s, %s" % (case, unit)] + cell))
    return lines


def _mib(kib):
    return None if kib is None else kib / 1024


def print_report(results, options):
    print("Blob transfer (GitHub issue 6): MB/s of the client's clock, "
          "median of %d passes;" % options.blob_passes)
    print("ratio = ours / ZEO, above 1 means ours is faster.  Upload = "
          "write + commit;")
    print("download = a fresh client (empty blob cache) reads every blob.  "
          "Server peak RSS")
    print("+MB: VmHWM after the transfer - RSS before.  floor = local "
          "FileStorage + the bytes")
    print("moved once between two processes (sendfile, recv_into, write); "
          "bound = floor / ZEO's")
    print("pair: the highest pair ratio possible here (no pair beats the "
          "floor).")
    print("\n".join(format_lines(results)))


def report_problems(results):
    """Print failed checks; True when there were any."""
    failed = False
    for case, cells in results.items():
        for (client, side), transfers in cells.items():
            for number, transfer in enumerate(transfers, 1):
                for problem in transfer.problems:
                    failed = True
                    print("PROBLEM with blobs, %s, %s client on %s server, "
                          "pass %d: %s" % (case, client, side or "no",
                                           number, problem))
    if not failed:
        print("checks: blobs: every download equals its upload.")
    return failed
