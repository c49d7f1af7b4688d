"""The server's RSS, threads and open files over time, and whether they
stay flat.

A sampler thread reads /proc/PID of whichever server process is current
every few seconds.  The samples go to a CSV file and, when matplotlib is
installed (the ``soak`` extra), to a PNG plot with the soak's events
(server restarts, client kill, packs) marked.

Flatness is judged on the last server process only (the restarts come
early in the soak so that it runs for most of it), between the moment it
started and the moment the clients began to stop.  Its first third is
warm-up (caches filling, clients reconnecting); then

- RSS: the last third's median may exceed the middle third's median by
  at most RSS_GROWTH_MIB (a leak of a few hundred bytes per commit would
  pass that within minutes);
- threads and open files: the last third's median may exceed the middle
  third's by at most COUNT_GROWTH (room for a connection that comes and
  goes, such as a pack's), since the same clients are connected.

The RSS check's detail also gives the least-squares trend after warm-up
(MiB per minute), which shows a slow creep long before it fails the
check.

Separately, after the clients have closed, the server's threads and open
files must come back exactly to what the first server had with no client
connected (checked by the parent with `settle_to`).
"""

import csv
import os
import shutil
import statistics
import threading
import time

RSS_GROWTH_MIB = 10
COUNT_GROWTH = 2
FIELDS = ("elapsed", "server", "pid", "rss_kib", "threads", "fds",
          "disk_free_mib")


def read_process(pid):
    """(RSS in KiB, threads, open file descriptors) of process `pid`."""
    rss = threads = None
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads, len(os.listdir("/proc/%d/fd" % pid))


class Sampler:
    """Samples the current server every `interval` seconds in a thread.

    `current()` returns (server number, pid) of the server to sample, or
    None while there is none (between a stop and a start).  The free space
    on `directory`'s file system is recorded too: a full disk (the
    machine may be shared) explains failures that are not the server's.
    """

    def __init__(self, current, interval, started, directory):
        self._current = current
        self._directory = directory
        self._interval = interval
        self._started = started
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.samples = []
        self._thread = threading.Thread(target=self._run,
                                        name="soak-sampler", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self):
        """Take one sample now (also called by the parent at key moments)."""
        current = self._current()
        if current is None:
            return None
        number, pid = current
        try:
            rss, threads, fds = read_process(pid)
        except (OSError, ValueError):
            return None  # the server is exiting
        row = dict(elapsed=round(time.time() - self._started, 2),
                   server=number, pid=pid, rss_kib=rss, threads=threads,
                   fds=fds, disk_free_mib=shutil.disk_usage(
                       self._directory).free // 2 ** 20)
        with self._lock:
            self.samples.append(row)
        return row

    def stop(self):
        self._stop.set()
        self._thread.join()

    def rows(self):
        with self._lock:
            return list(self.samples)


def write_csv(rows, path):
    with open(path, "w", newline="") as output:
        writer = csv.DictWriter(output, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(rows, marks, path):
    """Plot RSS, threads and fds against time, with `marks` ((seconds,
    label) of the disturbances) as vertical lines; None when done, else
    why not (matplotlib missing)."""
    try:
        import matplotlib
    except ImportError:
        return ("matplotlib is not installed (pip install -e '.[soak]'): "
                "no plot, the CSV has the samples")
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure, axes = pyplot.subplots(3, 1, sharex=True, figsize=(10, 8))
    elapsed = [row["elapsed"] / 60 for row in rows]
    series = [("rss_kib", "server RSS (MiB)", 1 / 1024),
              ("threads", "server threads", 1),
              ("fds", "server open files", 1)]
    for axis, (field, label, scale) in zip(axes, series):
        axis.plot(elapsed, [row[field] * scale for row in rows], ".",
                  markersize=3)
        axis.set_ylabel(label)
        highest = max(row[field] * scale for row in rows)
        axis.set_ylim(bottom=0, top=highest * 1.3)
        axis.grid(True, alpha=0.3)
        for when, _ in marks:
            axis.axvline(when / 60, color="grey", linestyle=":",
                         linewidth=1)
    for when, what in marks:
        axes[0].annotate(what, (when / 60, 0.02), xycoords=(
            "data", "axes fraction"), rotation=90, fontsize=7,
            va="bottom", ha="right")
    axes[-1].set_xlabel("minutes since the soak started")
    figure.suptitle("zeo soak: the server process over time")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return None


def thirds(rows):
    """The middle and last thirds of `rows` (the first is warm-up)."""
    third = len(rows) // 3
    return rows[third:2 * third], rows[2 * third:]


def flatness(rows):
    """[(check name, passed, detail)] for the last server's samples."""
    middle, last = thirds(rows)
    if len(middle) < 3 or len(last) < 3:
        return [("server flat after warm-up", False,
                 "only %d samples of the last server: run longer"
                 % len(rows))]
    results = []
    for field, tolerance, unit, scale in (
            ("rss_kib", RSS_GROWTH_MIB, "MiB", 1 / 1024),
            ("threads", COUNT_GROWTH, "", 1),
            ("fds", COUNT_GROWTH, "", 1)):
        before = statistics.median(row[field] for row in middle) * scale
        after = statistics.median(row[field] for row in last) * scale
        results.append((
            "server %s flat after warm-up" % field.split("_")[0],
            after - before <= tolerance,
            "median %.1f%s in the middle third, %.1f%s in the last "
            "(allowed growth %s%s)%s"
            % (before, unit, after, unit, tolerance, unit,
               "; trend %+.2fMiB/minute" % slope(middle + last, field,
                                                 scale * 60)
               if field == "rss_kib" else "")))
    return results


def slope(rows, field, scale):
    """Least-squares slope of `field` over elapsed seconds, times
    `scale` (the trend that a median comparison can hide)."""
    times = [row["elapsed"] for row in rows]
    values = [row[field] for row in rows]
    mean_time = statistics.fmean(times)
    mean_value = statistics.fmean(values)
    spread = sum((when - mean_time) ** 2 for when in times)
    if not spread:
        return 0.0
    return scale * sum((when - mean_time) * (value - mean_value)
                       for when, value in zip(times, values)) / spread
