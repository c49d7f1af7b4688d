"""Prometheus metrics: ``GET /metrics`` on `metrics-address`.

The exposition format and the HTTP answer come from the optional
`prometheus-client` package (``pip install 'zeo-threaded[metrics]'``),
imported only when a metrics address is configured.  The values are
read when Prometheus scrapes, by `ServerCollector`, straight from the
counters the server keeps anyway (the same ones `server_status` and the
monitor report), so serving metrics costs a commit nothing.

A scrape never takes a lock that a commit or a load waits for: plain
counters are read as they are (an int is read whole), the histograms
are read without their writers' mutex (see `zeo.server.timing`), the
loads of departed sessions have a lock of their own, and the last
transaction comes from the invalidation queue, not from the storage
(FileStorage's `lastTransaction` takes the lock its commits hold).

The endpoint answers one request at a time in its own named thread,
``zeo-metrics``: scrapes are rare and small, and a client that stalls
is cut off after `REQUEST_TIMEOUT` seconds.
"""

import logging
import socket
import threading
import time
import wsgiref.simple_server

import ZODB.TimeStamp

from zeo.server.listener import format_address

logger = logging.getLogger(__name__)

INSTALL_HINT = ("metrics-address needs the prometheus-client package: "
                "pip install 'zeo-threaded[metrics]'")
#: Seconds a scraper may take to send its request and read the answer.
REQUEST_TIMEOUT = 10

#: Per-storage counters: (metric name, `Statistics` attribute, help).
STORAGE_COUNTERS = (
    ("zeo_stores", "stores", "Objects stored (and deleted)."),
    ("zeo_commits", "commits", "Transactions committed."),
    ("zeo_aborts", "aborts", "Transactions aborted."),
    ("zeo_conflicts", "conflicts",
     "Conflicts reported to clients (not resolved by the server)."),
    ("zeo_conflicts_resolved", "conflicts_resolved",
     "Conflicts the server resolved."),
    ("zeo_blobs_received", "blobs_received", "Blobs uploaded by clients."),
    ("zeo_blob_received_bytes", "blob_bytes_received",
     "Bytes of blobs uploaded by clients."),
    ("zeo_blobs_sent", "blobs_sent", "Blobs downloaded by clients."),
    ("zeo_blob_sent_bytes", "blob_bytes_sent",
     "Bytes of blobs downloaded by clients."),
)


def import_prometheus_client():
    """The prometheus_client package, or ImportError saying how to get
    it."""
    try:
        import prometheus_client
        import prometheus_client.core  # noqa: F401 (the metric families)
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return prometheus_client


class ServerCollector:
    """Reads a `StorageServer`'s state into metric families at scrape
    time."""

    def __init__(self, server):
        self._server = server
        #: The loads reported last, per storage: a counter never goes
        #: back (see `ServedStorage.loads_without_waiting`).
        self._loads = {}

    def describe(self):
        return []  # families are only known by collecting

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)

        storages = sorted(self._server.storages.items())
        loads = CounterMetricFamily("zeo_loads", "Objects loaded.",
                                    labels=["storage"])
        counters = [CounterMetricFamily(name, text, labels=["storage"])
                    for name, _attribute, text in STORAGE_COUNTERS]
        gauges = {
            "active": GaugeMetricFamily(
                "zeo_active_transactions",
                "Transactions begun and not yet finished or aborted.",
                labels=["storage"]),
            "clients": GaugeMetricFamily(
                "zeo_connected_clients", "Clients registered on the storage.",
                labels=["storage"]),
            "waiting": GaugeMetricFamily(
                "zeo_commit_lock_waiting",
                "Votes waiting for the commit lock.", labels=["storage"]),
            "queue": GaugeMetricFamily(
                "zeo_invalidation_queue_length",
                "Transactions in the invalidation queue (what a "
                "reconnecting client can catch up from).",
                labels=["storage"]),
            "age": GaugeMetricFamily(
                "zeo_last_transaction_age_seconds",
                "Seconds since the last committed transaction.",
                labels=["storage"]),
            "refusing": GaugeMetricFamily(
                "zeo_refusing_commits",
                "1 once a voted transaction failed to finish: the storage "
                "refuses commits until the server is restarted.",
                labels=["storage"]),
        }
        histograms = {
            "wait": HistogramMetricFamily(
                "zeo_commit_lock_wait_seconds",
                "How long votes waited for the commit lock.",
                labels=["storage"]),
            "hold": HistogramMetricFamily(
                "zeo_commit_lock_hold_seconds",
                "How long transactions held the commit lock (from the "
                "grant to finish or abort).", labels=["storage"]),
        }
        now = time.time()
        for name, served in storages:
            stats = served.stats
            self._loads[name] = max(self._loads.get(name, 0),
                                    served.loads_without_waiting())
            loads.add_metric([name], self._loads[name])
            for family, (_name, attribute, _text) in zip(
                    counters, STORAGE_COUNTERS):
                family.add_metric([name], getattr(stats, attribute))
            gauges["active"].add_metric([name], stats.active_txns)
            gauges["clients"].add_metric([name], len(served.sessions))
            gauges["waiting"].add_metric([name],
                                         served.commit_lock.waiting)
            last_tid = served.newest_queued_transaction()
            gauges["queue"].add_metric([name],
                                       served.invalidation_queue_length)
            gauges["age"].add_metric([name], _age(last_tid, now))
            gauges["refusing"].add_metric(
                [name], int(served.commit_refusal is not None))
            for key, times in (("wait", served.commit_lock.wait_times),
                               ("hold", served.commit_lock.hold_times)):
                buckets, total = times.buckets()
                histograms[key].add_metric(
                    [name], [(_bound(bound), count)
                             for bound, count in buckets], total)
        yield loads
        yield from counters
        yield from gauges.values()
        yield from histograms.values()
        yield from self._server_families(GaugeMetricFamily,
                                         CounterMetricFamily)

    def _server_families(self, gauge, counter):
        received, sent, connections = self._server.traffic()
        yield counter("zeo_received_bytes",
                      "Bytes received from clients.", value=received)
        yield counter("zeo_sent_bytes",
                      "Bytes queued for sending to clients.", value=sent)
        yield gauge("zeo_connections",
                    "Open client connections, registered or not.",
                    value=connections)
        yield gauge("zeo_threads", "Threads of the server process.",
                    value=_thread_count())


def _age(tid, now):
    if tid is None or tid == b"\0" * 8:
        return float("nan")
    return max(0.0, now - ZODB.TimeStamp.TimeStamp(tid).timeTime())


def _bound(bound):
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _thread_count():
    """Threads of this process, as the kernel counts them (Python's own
    and any a C library started)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    """Requests go to our debug log, not to standard error."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format, *args):
        logger.debug("metrics request from %s: " + format,
                     self.address_string(), *args)


class _IPv6Server(wsgiref.simple_server.WSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint: created (bound) with the server, `start`ed with
    it, `close`d before the storages close."""

    def __init__(self, address, server):
        prometheus_client = import_prometheus_client()
        from prometheus_client.core import CollectorRegistry
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(server))
        prometheus_client.ProcessCollector(registry=registry)
        host, port = address
        self._httpd = wsgiref.simple_server.make_server(
            host, port, prometheus_client.make_wsgi_app(registry),
            server_class=(_IPv6Server if ":" in host
                          else wsgiref.simple_server.WSGIServer),
            handler_class=_QuietHandler)
        self.address = self._httpd.server_address[:2]
        self._thread = None
        logger.info("metrics on http://%s/metrics",
                    format_address(self.address))

    def start(self):
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
            name="zeo-metrics", daemon=True)
        self._thread.start()

    def close(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

