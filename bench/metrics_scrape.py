"""Does scraping /metrics cost the commits anything?

Issue 16 asks that Prometheus scraping every second leaves the commit
rate within noise of the rate without scraping.  One measurement: our
server with a `metrics-address`, on a fresh FileStorage; the throughput
tables' commit workload (raw-protocol clients, one 1-object transaction
after another, `CONCURRENCY` of them) for a window of `WINDOW` seconds;
with scraping, a thread GETs /metrics at the window's start and every
`SCRAPE_INTERVAL` seconds after.  Passes alternate the order of the two
measurements.
"""

import shutil
import statistics
import tempfile
import threading
import time
import urllib.request

import server_process
from passes import alternating_passes
from workloads import COMMIT, RAW

#: Seconds of each commit window (quick: a tenth).
WINDOW = 5.0
SCRAPE_INTERVAL = 1.0
CELLS = ["without scraping", "scraping every %gs" % SCRAPE_INTERVAL]


class Scraper:
    """GETs the metrics page every `SCRAPE_INTERVAL` seconds until
    stopped; counts the scrapes and keeps the slowest one's time."""

    def __init__(self, url):
        self._url = url
        self._stop = threading.Event()
        self.scrapes = 0
        self.slowest = 0.0
        self.failures = []
        self._thread = threading.Thread(target=self._run,
                                        name="bench-scraper", daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self._url, timeout=10) as answer:
                    answer.read()
            except OSError as error:
                self.failures.append(str(error))
            self.scrapes += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
            self._stop.wait(SCRAPE_INTERVAL)

    def stop(self):
        self._stop.set()
        self._thread.join()


def measure(cell, pool, concurrency, window, scratch):
    """`(commits per second, scrapes, slowest scrape, problems)`."""
    directory = tempfile.mkdtemp(dir=scratch)
    port = server_process.free_port()
    server = server_process.start_configured_server(
        directory, zeo_options="metrics-address 127.0.0.1:%d" % port)
    scraper = None
    problems = []
    try:
        if cell != CELLS[0]:
            scraper = Scraper("http://127.0.0.1:%d/metrics" % port)
            scraper.start()
        specs = [{"client": RAW, "address": server.address,
                  "workload": COMMIT, "oids": [], "index": index,
                  "count": concurrency} for index in range(concurrency)]
        results = pool.run(specs, window)
        rate = sum(result["completed"] for result in results) / window
    finally:
        if scraper is not None:
            scraper.stop()
            problems += scraper.failures
        if server.stop() != 0:
            problems.append("server exited with a non-zero status")
        shutil.rmtree(directory, ignore_errors=True)
    if scraper is None:
        return rate, 0, 0.0, problems
    return rate, scraper.scrapes, scraper.slowest, problems


def measure_all(options, pool, concurrency, scratch):
    window = WINDOW / 10 if options.quick else WINDOW
    results = {cell: [] for cell in CELLS}
    for _number, order in alternating_passes(CELLS, options.repetitions,
                                             "metrics, "):
        for cell in order:
            results[cell].append(measure(cell, pool, concurrency, window,
                                         scratch))
    return results


def print_report(results, concurrency):
    print("Metrics scraping (GitHub issue 16): 1-object commits per second "
          "by %d raw clients" % concurrency)
    print("on our server, median of %d windows; the ratio is scraping / "
          "not scraping" % len(results[CELLS[0]]))
    rates = {cell: statistics.median(r[0] for r in results[cell])
             for cell in CELLS}
    for cell in CELLS:
        print("  %-22s %9.0f commits/s" % (cell, rates[cell]))
    scraped = results[CELLS[1]]
    print("  ratio %.3f; %d scrapes in all, the slowest took %.1f ms"
          % (rates[CELLS[1]] / rates[CELLS[0]] if rates[CELLS[0]] else 0,
             sum(r[1] for r in scraped), 1e3 * max(r[2] for r in scraped)))
    problems = [problem for cell in CELLS for r in results[cell]
                for problem in r[3]]
    for problem in problems:
        print("PROBLEM with metrics scraping: %s" % problem)
    return bool(problems)

