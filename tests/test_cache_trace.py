"""Client cache traces and their tools (GitHub issue 4, part 5).

Our ClientStorage against our server (a subprocess on a FileStorage)
writes traces; they are read back record by record, by our
``zeo.scripts.cache_stats`` and ``cache_simul`` run as users run them,
and by the real ZEO's ``ZEO.scripts.cache_stats``.  Traces written by
the real ``ZEO.cache.ClientCache`` are read by our tools.
"""

import collections
import gzip
import logging
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import ZODB.config
from ZODB.utils import p64, z64

from conftest import REPO_ROOT, commit_stores, wait_until
from zeo.client import trace
from zeo.client.cache import ENTRY_OVERHEAD, ClientCache
from zeo.client.cache_file import FileClientCache, cache_file_path
from zeo.scripts.cache_simul import Simulation

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------

def create_objects(storage, sizes):
    """New objects of `sizes` bytes each, in one transaction; returns
    `(oids, tid)`."""
    oids = [storage.new_oid() for _ in sizes]
    tid = commit_stores(storage, [(oid, z64, b"d" * size)
                                  for oid, size in zip(oids, sizes)])
    return oids, tid


def codes_of(path):
    return collections.Counter(record.code
                               for record in trace.read_trace(path))


def run_tool(module, *args):
    """Run ``python -m module args`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", module] + [str(arg) for arg in args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def our_totals(output):
    """Loads and hits from our cache_stats' totals."""
    match = re.search(r"^Loads: +(\d+) \((\d+) hits", output, re.M)
    return int(match.group(1)), int(match.group(2))


def zeo_codes(output):
    """`{code: count}` from the real ZEO cache_stats' code table."""
    return {int(code, 16): int(count.replace(",", ""))
            for count, code in re.findall(
                r"^ +([\d,]+)  ([0-9a-f]{2})  ", output, re.M)}


def zeo_interval_sums(output):
    """Loads, hits, invalidation hits and writes summed over the
    per-interval lines of the real ZEO's cache_stats."""
    sums = [0, 0, 0, 0]
    for line in re.findall(r"^\w{3} [ \d]\d \d\d:\d\d-\d\d (.*)$", output,
                           re.M):
        for index, value in enumerate(line.split()[:4]):
            sums[index] += int(value)
    return sums


def write_every_kind(path):
    """A trace of our in-memory cache with every code we write."""
    cache = ClientCache(2 * (1000 + ENTRY_OVERHEAD) + 50)
    tracer = trace.open_tracer(str(path))
    cache.set_tracer(tracer)
    cache.set_last_tid(p64(1))
    for number in range(1, 5):
        cache.load_before(p64(number), p64(2))        # 0x20
        cache.store(p64(number), p64(1), None, b"x" * 1000)  # 0x52, 0x08
    cache.load_before(p64(4), p64(2))                 # 0x22
    cache.invalidate(p64(4), p64(3))                  # 0x1C
    cache.invalidate(p64(1), p64(3))                  # 0x10
    cache.set_last_tid(p64(3))
    cache.load_before(p64(4), p64(3))                 # 0x26
    cache.load_before(p64(4), p64(1))                 # 0x24
    cache.store(p64(5), p64(1), p64(2), b"y" * 10)    # 0x54, 0x08
    cache.forget(p64(4))                              # 0x1E
    cache.set_tracer(None)
    tracer.close()
    return {0x00: 1, 0x20: 4, 0x52: 4, 0x08: 3, 0x22: 1, 0x1C: 1, 0x10: 1,
            0x26: 1, 0x24: 1, 0x54: 1, 0x1E: 1}


@pytest.fixture
def server(start_server):
    return start_server()


# -- what a ClientStorage traces ----------------------------------------------

def test_trace_records_loads_invalidations_and_load_before(
        server, clients, tmp_path):
    path = tmp_path / "client.trace"
    writer = clients(server.address)
    (o1, o2, o3), t1 = create_objects(writer, [100, 200, 300])
    traced = clients(server.address, cache_trace=str(path))
    assert traced.load(o1) == (b"d" * 100, t1)      # miss, store
    assert traced.load(o1) == (b"d" * 100, t1)      # hit
    traced.load(o2)                                 # miss, store
    t2 = commit_stores(writer, [(o1, t1, b"e" * 50), (o3, t1, b"e" * 60)])
    wait_until(lambda: traced.lastTransaction() == t2,
               "the traced client has the invalidations")
    assert traced.loadBefore(o1, t2) == (b"d" * 100, t1, t2)  # non-current
    assert traced.load(o1) == (b"e" * 50, t2)       # miss, store
    assert traced.loadBefore(o2, t1) is None        # older data: miss
    traced.close()

    records = list(trace.read_trace(str(path)))
    assert collections.Counter(record.code for record in records) == {
        trace.TRACE_OPENED: 1, trace.LOAD_MISS: 3, trace.LOAD_HIT: 1,
        trace.STORE_CURRENT: 3, trace.INVALIDATE_KEEP: 1,
        trace.INVALIDATE_MISS: 1, trace.LOAD_BEFORE_HIT: 1,
        trace.LOAD_BEFORE_MISS: 1}
    by_code = collections.defaultdict(list)
    for record in records:
        by_code[record.code].append(record)
    assert [(r.oid, r.tid, r.end_tid, r.data_length)
            for r in by_code[trace.STORE_CURRENT]] == [
        (o1, t1, None, 100), (o2, t1, None, 200), (o1, t2, None, 50)]
    [kept] = by_code[trace.INVALIDATE_KEEP]
    [missed] = by_code[trace.INVALIDATE_MISS]
    assert (kept.oid, kept.tid, missed.oid, missed.tid) == (o1, t2, o3, t2)
    [old_hit] = by_code[trace.LOAD_BEFORE_HIT]
    assert (old_hit.oid, old_hit.tid, old_hit.end_tid,
            old_hit.data_length) == (o1, t1, t2, 100)
    [old_miss] = by_code[trace.LOAD_BEFORE_MISS]
    assert (old_miss.oid, old_miss.end_tid) == (o2, t1)


def test_trace_records_evictions_least_recently_used_first(
        server, clients, tmp_path):
    path = tmp_path / "small.trace"
    writer = clients(server.address)
    (o1, o2, o3, _), _ = create_objects(writer, [1000] * 4)
    # Room for two of these objects.
    traced = clients(server.address, cache_trace=str(path),
                     cache_size=2 * (1000 + ENTRY_OVERHEAD) + 50)
    for oid in (o1, o2, o3, o3, o1, o2):
        traced.load(oid)
    traced.close()

    assert codes_of(str(path)) == {
        trace.TRACE_OPENED: 1, trace.LOAD_MISS: 5, trace.STORE_CURRENT: 5,
        trace.LOAD_HIT: 1, trace.EVICT: 3}
    evicted = [(record.oid, record.data_length)
               for record in trace.read_trace(str(path))
               if record.code == trace.EVICT]
    assert evicted == [(o1, 1000), (o2, 1000), (o3, 1000)]


def test_clearing_and_damage_are_traced_as_discards(tmp_path):
    """A cache dropped by verification, or a record found damaged, leaves
    the trace as if each oid were forgotten, so a simulation drops them
    too."""
    path = str(tmp_path / "c-1.zec")
    cache = FileClientCache(path, 10 ** 6)
    tracer = trace.open_tracer(str(tmp_path / "cache.trace"))
    cache.set_tracer(tracer)
    cache.set_last_tid(p64(9))
    cache.store(p64(1), p64(5), None, b"one")
    cache.store(p64(1), p64(2), p64(5), b"older one")
    cache.store(p64(2), p64(5), None, b"two")
    cache.clear()
    cache.set_last_tid(p64(9))
    cache.store(p64(3), p64(5), None, b"three")
    with open(path, "r+b") as file:  # the last bytes: "three"'s data
        file.seek(-1, os.SEEK_END)
        file.write(b"?")
    assert cache.load_before(p64(3), p64(10)) is None
    cache.set_tracer(None)
    tracer.close()
    cache.close()

    records = [(record.code, record.oid)
               for record in trace.read_trace(str(tmp_path / "cache.trace"))]
    discards = [oid for code, oid in records
                if code == trace.INVALIDATE_DISCARD]
    assert sorted(discards[:2]) == [p64(1), p64(2)]  # the clear
    assert discards[2:] == [p64(3)]  # the damaged record
    assert records[-1] == (trace.LOAD_MISS, p64(3))

    simulation = Simulation(10 ** 6)
    for record in trace.read_trace(str(tmp_path / "cache.trace")):
        simulation.replay(record)
    assert len(simulation.cache) == 0


def test_environment_variable_traces_a_persistent_cache_next_to_it(
        server, clients, tmp_path):
    oids, _ = create_objects(clients(server.address), [10] * 4)
    script = textwrap.dedent("""
        import sys
        from zeo.ClientStorage import ClientStorage
        host, port, var, *oids = sys.argv[1:]
        storage = ClientStorage((host, int(port)), client="app", var=var,
                                wait_timeout=10)
        for _ in range(3):
            for oid in oids:
                storage.load(bytes.fromhex(oid))
        storage.close()
    """)
    environment = dict(os.environ, ZEO_CACHE_TRACE="1",
                       PYTHONPATH=REPO_ROOT)
    host, port = server.address
    subprocess.run([sys.executable, "-c", script, host, str(port),
                    str(tmp_path)] + [oid.hex() for oid in oids],
                   env=environment, check=True, timeout=60)

    path = cache_file_path("app", "1", str(tmp_path)) + ".trace"
    assert os.path.exists(path)
    codes = codes_of(path)
    assert (codes[trace.LOAD_MISS], codes[trace.LOAD_HIT]) == (4, 8)

    ours = run_tool("zeo.scripts.cache_stats", path)
    assert ours.returncode == 0, ours.stderr
    assert our_totals(ours.stdout) == (12, 8)
    assert re.search(r"^Hit ratio: +66\.7%$", ours.stdout, re.M)

    theirs = run_tool("ZEO.scripts.cache_stats", path)
    assert theirs.returncode == 0, theirs.stderr
    assert "Hit rate:   66.7%" in theirs.stdout
    assert zeo_codes(theirs.stdout)[trace.LOAD_HIT] == 8


def test_cache_trace_configuration_key(server, clients, tmp_path):
    path = tmp_path / "configured.trace"
    (oid,), _ = create_objects(clients(server.address), [10])
    storage = ZODB.config.storageFromString(textwrap.dedent("""
        %%import zeo
        <clientstorage>
          server %s:%d
          cache-trace %s
        </clientstorage>
    """) % (server.address + (path,)))
    try:
        storage.load(oid)
        storage.load(oid)
    finally:
        storage.close()
    assert codes_of(str(path)) == {
        trace.TRACE_OPENED: 1, trace.LOAD_MISS: 1, trace.STORE_CURRENT: 1,
        trace.LOAD_HIT: 1}


def test_tracing_is_off_without_option_or_variable(
        server, clients, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(trace.ENV_VAR, raising=False)
    (oid,), tid = create_objects(clients(server.address), [10])
    persistent = clients(server.address, client="quiet", var=str(tmp_path))
    assert persistent.load(oid) == (b"d" * 10, tid)
    persistent.close()
    assert os.path.exists(cache_file_path("quiet", "1", str(tmp_path)))
    # The variable alone does not trace an in-memory cache: there is no
    # file to name the trace after.
    monkeypatch.setenv(trace.ENV_VAR, "1")
    with caplog.at_level(logging.INFO, logger="zeo.client.trace"):
        in_memory = clients(server.address)
    assert in_memory.load(oid) == (b"d" * 10, tid)
    in_memory.close()
    assert [name for name in os.listdir(tmp_path)
            if "trace" in name] == []
    assert "not tracing it" in caplog.text


def test_unwritable_trace_path_is_logged_and_the_client_works(
        server, clients, tmp_path, caplog):
    path = tmp_path / "missing-directory" / "client.trace"
    with caplog.at_level(logging.WARNING, logger="zeo.client.trace"):
        storage = clients(server.address, cache_trace=str(path))
    assert "cannot open the cache trace" in caplog.text
    assert str(path) in caplog.text
    (oid,), tid = create_objects(storage, [10])
    assert storage.load(oid) == (b"d" * 10, tid)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_stops_the_trace_not_the_cache(caplog):
    cache = ClientCache()
    tracer = trace.open_tracer("/dev/full")
    cache.set_tracer(tracer)
    cache.set_last_tid(p64(1))
    with caplog.at_level(logging.WARNING, logger="zeo.client.trace"):
        for number in range(5000):  # more records than the buffer holds
            cache.store(p64(number), p64(1), None, b"x")
            assert cache.load_before(p64(number), p64(2)) == (
                b"x", p64(1), None)
        tracer.close()
    assert caplog.text.count("tracing stopped") == 1
    assert len(cache) == 5000


# -- cache_stats: ours and ZEO's on each other's traces -----------------------

def test_zeo_cache_stats_reads_our_trace_and_agrees(tmp_path):
    path = tmp_path / "every.trace"
    expected = write_every_kind(path)
    assert codes_of(str(path)) == expected

    theirs = run_tool("ZEO.scripts.cache_stats", path)
    assert theirs.returncode == 0, theirs.stderr
    assert zeo_codes(theirs.stdout) == expected
    ours = run_tool("zeo.scripts.cache_stats", path)
    assert ours.returncode == 0, ours.stderr
    loads, hits = our_totals(ours.stdout)
    assert (loads, hits) == (7, 2)
    # ZEO's per-interval table counts our eviction code as nothing.
    assert zeo_interval_sums(theirs.stdout) == [loads, hits, 2, 5]
    assert "Hit rate:   28.6%" in theirs.stdout
    assert re.search(r"^Evictions: +3$", ours.stdout, re.M)


def test_our_cache_stats_reads_a_trace_of_the_real_zeo_cache(tmp_path):
    script = textwrap.dedent("""
        import sys
        import ZEO.cache
        from ZODB.utils import p64
        cache = ZEO.cache.ClientCache(sys.argv[1], 10 ** 6)
        cache.setLastTid(p64(1))
        for number in range(1, 4):
            assert cache.load(p64(number)) is None
            cache.store(p64(number), p64(1), None, b"z" * 100)
            assert cache.load(p64(number)) is not None
        cache.load(p64(2))
        cache.invalidate(p64(1), p64(2))
        cache.invalidate(p64(9), p64(2))
        cache.close()
    """)
    cache_path = str(tmp_path / "zeo.zec")
    subprocess.run([sys.executable, "-c", script, cache_path],
                   env=dict(os.environ, ZEO_CACHE_TRACE="1"), check=True,
                   timeout=60)
    path = cache_path + ".trace"

    theirs = run_tool("ZEO.scripts.cache_stats", path)
    assert theirs.returncode == 0, theirs.stderr
    zeo_counts = zeo_codes(theirs.stdout)
    assert zeo_counts == {0x00: 1, 0x20: 3, 0x22: 4, 0x52: 3, 0x1C: 1,
                          0x10: 1}
    ours = run_tool("zeo.scripts.cache_stats", path)
    assert ours.returncode == 0, ours.stderr
    assert our_totals(ours.stdout) == (7, 4)
    assert re.search(r"^Invalidations: +1 hits, 1 misses$", ours.stdout,
                     re.M)
    assert re.search(r"^Stores: +3$", ours.stdout, re.M)


def test_cache_stats_reads_gzipped_traces_and_is_quiet_with_q(tmp_path):
    path = tmp_path / "every.trace"
    write_every_kind(path)
    zipped = tmp_path / "every.trace.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    result = run_tool("zeo.scripts.cache_stats", "-q", zipped)
    assert result.returncode == 0, result.stderr
    assert our_totals(result.stdout) == (7, 2)
    assert "meaning" not in result.stdout  # no code table with -q
    verbose = run_tool("zeo.scripts.cache_stats", "-v", path)
    assert verbose.stdout.count("evicted (least recently used)") == 3 + 1


@pytest.mark.parametrize("damage, message", [
    ("missing", "cannot open"),
    ("garbage", "not a cache trace record at offset 0"),
    ("truncated", "truncated record at offset"),
    ("bad gzip", "unreadable"),
])
def test_cache_stats_reports_bad_traces_with_status_2(
        tmp_path, damage, message):
    good = tmp_path / "good.trace"
    write_every_kind(good)
    path = tmp_path / "bad.trace"
    if damage == "garbage":
        path.write_text("this is not a trace, just some text\n" * 3)
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[:-5])
    elif damage == "bad gzip":
        path = tmp_path / "bad.trace.gz"
        path.write_bytes(gzip.compress(good.read_bytes())[:-30])
    result = run_tool("zeo.scripts.cache_stats", path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if damage == "truncated":
        # The complete records before the damage are still reported.
        assert our_totals(result.stdout) == (7, 2)


# -- cache_simul --------------------------------------------------------------

def test_cache_simul_replays_our_policy(server, clients, tmp_path):
    path = tmp_path / "workload.trace"
    rng = random.Random(4)
    writer = clients(server.address)
    oids, _ = create_objects(writer,
                             [rng.randrange(200, 3000) for _ in range(30)])
    traced_size = 8000
    smallest = int(0.001 * 2 ** 20)  # the CLI's "-s 0.001" below
    traced = clients(server.address, cache_trace=str(path),
                     cache_size=traced_size)
    for _ in range(300):  # skewed: a few objects are loaded most often
        traced.load(oids[min(int(rng.expovariate(0.15)), len(oids) - 1)])
    traced.close()

    records = list(trace.read_trace(str(path)))
    codes = collections.Counter(record.code for record in records)
    loads = [record for record in records if record.code in trace.LOAD_CODES]
    distinct = len({record.oid for record in loads})
    sizes = [smallest, 4000, traced_size, 16000, 32000, 10 ** 7]
    simulations = [Simulation(size) for size in sizes]
    for record in records:
        for simulation in simulations:
            simulation.replay(record)

    ratios = [simulation.hits / simulation.loads
              for simulation in simulations]
    assert all(simulation.loads == len(loads) for simulation in simulations)
    assert ratios == sorted(ratios)
    assert ratios[0] < ratios[-1]
    # Big enough for everything: only the first load of each object misses.
    assert simulations[-1].hits == len(loads) - distinct
    assert simulations[-1].evictions == 0
    # At the traced size the simulation is the traced cache itself.
    same = simulations[sizes.index(traced_size)]
    assert same.hits == codes[trace.LOAD_HIT]
    assert same.evictions == codes[trace.EVICT] > 0

    result = run_tool("zeo.scripts.cache_simul", path, "-s", 0.001, 10)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^ +([\d.]+) MB +(\d+) +(\d+) +[\d.]+% +(\d+)$",
                      result.stdout, re.M)
    assert rows == [
        ("0.001", str(len(loads)), str(simulations[0].hits),
         str(simulations[0].evictions)),
        ("10", str(len(loads)), str(len(loads) - distinct), "0")]


def test_cache_simul_reports_a_missing_trace_with_status_2(tmp_path):
    result = run_tool("zeo.scripts.cache_simul", tmp_path / "none.trace",
                      "-s", 1)
    assert result.returncode == 2
    assert "cannot open" in result.stderr
    assert "Traceback" not in result.stderr
