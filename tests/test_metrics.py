"""The Prometheus endpoint (issue 16, item 2) of a real server process.

Known activity goes in through the protocol (`raw_client`), and the
counters must come out of ``GET /metrics`` with exactly those values:
parsed with `prometheus_client`'s own parser, and scraped by a real
Prometheus server (Debian's ``prometheus``, which ``.ci/run`` installs)
and read back through its HTTP API.  A scrape during a commit that holds
the lock must answer at once.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from conftest import wait_until
from server_process import free_port, temporary_directory
from test_monitor import commit, connect, start_monitored_server

pytestmark = pytest.mark.timeout(180)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMETHEUS = shutil.which("prometheus")
#: How long a scrape may take while the commit lock is held.
SCRAPE_BOUND = 2.0


@pytest.fixture
def server():
    with temporary_directory() as directory:
        server = start_monitored_server(
            directory, options="metrics-address 127.0.0.1:%d" % free_port())
        server.metrics_url = "http://127.0.0.1:%d/metrics" % int(
            server.log.split("metrics on http://127.0.0.1:")[1].split("/")[0])
        try:
            yield server
        finally:
            server.stop()


def scrape(server, timeout=10):
    """`{(metric sample name, labels as a sorted tuple): value}`."""
    with urllib.request.urlopen(server.metrics_url, timeout=timeout) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode("utf-8")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples}


def storage_value(samples, name, storage="1", **labels):
    return samples[(name, tuple(sorted(dict(labels, storage=storage)
                                       .items())))]


def make_activity(server):
    """Three commits, one abort and four loads, by two clients."""
    writer = connect(server, label="writer")
    reader = connect(server, label="reader")
    oids = writer.call("new_oids", 3)
    for number, oid in enumerate(oids, 1):
        commit(writer, number, [(oid, z64, zodb_pickle(MinPO(number)))])
    commit(writer, 9, [(oids[0], z64, zodb_pickle(MinPO(9)))], vote=False,
           finish=False)
    writer.call("tpc_abort", 9)
    for oid in oids + oids[:1]:
        reader.call("loadBefore", oid, b"\xff" * 8)
    return writer, reader


def test_counters_gauges_and_histograms_match_known_activity(server):
    clients = make_activity(server)
    samples = scrape(server)
    assert storage_value(samples, "zeo_commits_total") == 3
    assert storage_value(samples, "zeo_aborts_total") == 1
    assert storage_value(samples, "zeo_stores_total") == 4
    assert storage_value(samples, "zeo_loads_total") == 4
    assert storage_value(samples, "zeo_conflicts_total") == 0
    assert storage_value(samples, "zeo_connected_clients") == 2
    assert storage_value(samples, "zeo_active_transactions") == 0
    assert storage_value(samples, "zeo_commit_lock_waiting") == 0
    assert storage_value(samples, "zeo_invalidation_queue_length") == 4
    assert 0 <= storage_value(samples,
                              "zeo_last_transaction_age_seconds") < 60
    # Every vote took and released the lock: three commits (the aborted
    # transaction never voted).
    for histogram in ("zeo_commit_lock_wait_seconds",
                      "zeo_commit_lock_hold_seconds"):
        assert storage_value(samples, histogram + "_count") == 3
        assert storage_value(samples, histogram + "_bucket", le="+Inf") == 3
        assert storage_value(samples, histogram + "_sum") > 0
    assert samples[("zeo_connections", ())] == 2
    assert samples[("zeo_received_bytes_total", ())] > 0
    assert samples[("zeo_sent_bytes_total", ())] > 0
    assert samples[("zeo_threads", ())] >= 3
    assert samples[("process_resident_memory_bytes", ())] > 1e6
    assert samples[("process_open_fds", ())] > 0
    for client in clients:
        client.close()
    wait_until(lambda: storage_value(scrape(server),
                                     "zeo_connected_clients") == 0,
               "the clients are gone")
    # The loads of clients that left are still counted.
    assert storage_value(scrape(server), "zeo_loads_total") == 4


def test_a_scrape_during_a_held_commit_lock_answers_at_once(server):
    holder = connect(server)
    [oid] = holder.call("new_oids", 1)
    commit(holder, 1, [(oid, z64, zodb_pickle(MinPO(1)))], finish=False)
    started = time.monotonic()
    samples = scrape(server, timeout=SCRAPE_BOUND)
    assert time.monotonic() - started < SCRAPE_BOUND
    assert storage_value(samples, "zeo_active_transactions") == 1
    holder.call("tpc_finish", 1)
    assert storage_value(scrape(server), "zeo_commits_total") == 1


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package "
                    "is not installed (.ci/run installs it)")
def test_a_real_prometheus_scrapes_the_counters(server, tmp_path):
    make_activity(server)
    port = free_port()
    target = urllib.parse.urlsplit(server.metrics_url).netloc
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: zeo\n"
        "    static_configs:\n      - targets: ['%s']\n" % target)
    prometheus = subprocess.Popen(
        [PROMETHEUS, "--config.file=%s" % (tmp_path / "prometheus.yml"),
         "--storage.tsdb.path=%s" % (tmp_path / "data"),
         "--web.listen-address=127.0.0.1:%d" % port],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(expression):
            url = "http://127.0.0.1:%d/api/v1/query?%s" % (
                port, urllib.parse.urlencode({"query": expression}))
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    result = json.load(answer)["data"]["result"]
            except OSError:
                return None  # not listening yet
            return {item["metric"].get("storage"): float(item["value"][1])
                    for item in result}

        wait_until(lambda: query('zeo_commits_total{job="zeo"}'),
                   "Prometheus has scraped zeo", timeout=60)
        assert query('zeo_commits_total{job="zeo"}') == {"1": 3.0}
        assert query('zeo_loads_total{job="zeo"}') == {"1": 4.0}
        assert query('zeo_aborts_total{job="zeo"}') == {"1": 1.0}
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def test_without_prometheus_client_the_server_refuses_to_start(tmp_path):
    """A one-line error saying how to install the extra, exit status 2."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ImportError('hidden for this test')\n")
    config = tmp_path / "zeo.conf"
    config.write_text("<zeo>\n  address 127.0.0.1:0\n  metrics-address "
                      "127.0.0.1:0\n</zeo>\n<mappingstorage 1/>\n")
    result = subprocess.run(
        [sys.executable, "-m", "zeo.runzeo", "-C", str(config)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(shadow.parent), PROJECT_ROOT])))
    assert result.returncode == 2
    assert result.stderr == (
        "Error: metrics-address needs the prometheus-client package: "
        "pip install 'zeo-threaded[metrics]'\n")


@pytest.mark.parametrize("line, message", [
    ("metrics-address /tmp/metrics.sock",
     "metrics-address must be HOST:PORT, not a Unix socket path"),
    ("slow-transaction-threshold -1",
     "slow-transaction-threshold cannot be negative"),
    ("slow-load-threshold -0.5", "slow-load-threshold cannot be negative"),
])
def test_bad_values_are_one_line_errors(tmp_path, line, message):
    config = tmp_path / "zeo.conf"
    config.write_text("<zeo>\n  address 127.0.0.1:0\n  %s\n</zeo>\n"
                      "<mappingstorage 1/>\n" % line)
    result = subprocess.run(
        [sys.executable, "-m", "zeo.runzeo", "-C", str(config)],
        capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert result.returncode == 2
    assert result.stderr == "Error: %s\n" % message
