"""The persistent client cache (`zeo.client.cache_file`), on real files.

The in-memory `ClientCache` is the model: random operation sequences must
give the same answers from both, across clean reopenings (through the
index snapshot) and crashed ones (replaying the log).  The rest checks
what only a file can get wrong: restarts, the size bound on disk,
compaction, torn and corrupted files (including a writer killed with
SIGKILL), stale or damaged snapshots, the lock, and a real client and
server reusing a cache across a restart.
"""

import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import zc.lockfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ZODB.utils import p64, u64, z64

from conftest import CLIENT_TIMEOUT, REPO_ROOT, commit_one, commit_stores
from server_process import ServerProcess
from zeo.ClientStorage import ClientStorage
from zeo.client.cache import ClientCache, next_tid
from zeo.client.cache_file import (
    MAGIC, MIN_GARBAGE, CacheFileLocked, FileClientCache, cache_file_path)

pytestmark = pytest.mark.timeout(60)

OIDS = [p64(number) for number in range(4)]
TIDS = [p64(number) for number in range(1, 16)]


def grid(cache):
    """Every answer the cache gives for the oids and tids of these tests,
    and for the newest state (`load_current`, which must answer as
    `load_before` just after the last tid)."""
    answers = {(oid, tid): cache.load_before(oid, tid)
               for oid in OIDS for tid in TIDS}
    last = cache.last_tid()
    for oid in OIDS:
        current = cache.load_current(oid)
        assert current == (None if last is None
                           else cache.load_before(oid, next_tid(last)))
        answers[oid, "current"] = current
    return answers


def same_state(model, cache):
    assert len(cache) == len(model)
    assert cache.size == model.size
    assert cache.last_tid() == model.last_tid()
    assert grid(cache) == grid(model)


# -- random operation sequences against the in-memory model -----------------

tids = st.sampled_from(TIDS)
oids = st.sampled_from(OIDS)


@st.composite
def stores(draw):
    start = draw(tids)
    end = draw(st.one_of(st.none(), st.sampled_from(
        [tid for tid in TIDS if tid > start] or [None])))
    return ("store", draw(oids), start, end, draw(st.binary(max_size=300)))


operation = st.one_of(
    stores(),
    stores(),
    st.tuples(st.just("invalidate"), oids, tids),
    st.tuples(st.just("invalidate"), oids, tids),
    st.tuples(st.just("forget"), oids),
    st.tuples(st.just("set_last_tid"), tids),
    st.tuples(st.just("load_before"), oids, tids),
    st.tuples(st.just("load_current"), oids),
    st.tuples(st.just("clear")),
)


def run(model, cache, op):
    """Apply `op` to both caches; their answers must agree."""
    name, args = op[0], op[1:]
    assert getattr(cache, name)(*args) == getattr(model, name)(*args), op


def reopen(cache, crashed=False):
    """Close and reopen a cache file; `crashed` drops the index snapshot,
    as a process that dies without closing leaves none."""
    cache.close()
    if crashed:
        os.remove(cache.path + ".index")
    return FileClientCache(cache.path, cache.limit)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(operation, operation, operation,
                          st.just(("reopen",))), max_size=80))
def test_random_operations_match_the_model_with_eviction(ops):
    """A small limit: eviction and compaction happen often, and neither may
    change an answer (eviction order included, which a clean reopening
    keeps through the snapshot)."""
    limit = 1500
    with tempfile.TemporaryDirectory() as directory:
        cache = FileClientCache(os.path.join(directory, "c-1.zec"), limit)
        model = ClientCache(limit)
        try:
            for op in ops:
                if op[0] == "reopen":
                    cache = reopen(cache)
                    same_state(model, cache)
                else:
                    run(model, cache, op)
                assert cache.size <= limit
            same_state(model, cache)
        finally:
            cache.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(operation, operation, operation,
                          st.just(("reopen",)), st.just(("crash",)),
                          st.just(("compact",))),
                max_size=80))
def test_random_operations_survive_reopening_and_compaction(ops):
    """With room for everything (so the least-recently-used order, which a
    crash does not keep, cannot matter), reopening the file after a clean
    close or a crash, or compacting it, changes nothing."""
    limit = 10 ** 6
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "c-1.zec")
        cache = FileClientCache(path, limit)
        model = ClientCache(limit)
        try:
            for op in ops:
                if op[0] in ("reopen", "crash"):
                    cache = reopen(cache, crashed=op[0] == "crash")
                    same_state(model, cache)
                elif op[0] == "compact":
                    cache.compact()
                    same_state(model, cache)
                else:
                    run(model, cache, op)
        finally:
            cache.close()


# -- restarts, bound, compaction ---------------------------------------------

def fill(cache, count, size=100):
    """Current revisions of oids 0..count-1 (and, for even oids, an older
    non-current one); last tid 100.  Returns the expected answers."""
    expected = {}
    cache.set_last_tid(p64(100))
    for number in range(count):
        oid = p64(number)
        data = b"%d:" % number + b"." * size
        if number % 2 == 0:
            old = b"old " + data
            cache.store(oid, p64(10), p64(50), old)
            expected[oid, p64(50)] = (old, p64(10), p64(50))
        cache.store(oid, p64(50), None, data)
        expected[oid, p64(101)] = (data, p64(50), None)
    return expected


def assert_answers(cache, expected):
    for (oid, tid), answer in expected.items():
        assert cache.load_before(oid, tid) == answer


def test_restart_keeps_entries_and_last_tid(tmp_path):
    path = str(tmp_path / "c-1.zec")
    cache = FileClientCache(path, 10 ** 7)
    expected = fill(cache, 1000)
    cache.invalidate(p64(1), p64(101))
    cache.set_last_tid(p64(101))
    expected[p64(1), p64(101)] = (expected[p64(1), p64(101)][0], p64(50),
                                  p64(101))
    size = cache.size
    cache.close()

    cache = FileClientCache(path, 10 ** 7)
    try:
        assert cache.last_tid() == p64(101)
        assert len(cache) == 1500 and cache.size == size
        assert_answers(cache, expected)
        assert cache.load_before(p64(1), p64(102)) is None  # ended at 101
    finally:
        cache.close()


def test_size_and_file_stay_within_the_bound(tmp_path):
    """Memory accounting never passes the limit, and garbage is compacted
    away so the file stays within 1.5 times the limit (plus slack)."""
    limit = 50000
    path = str(tmp_path / "c-1.zec")
    cache = FileClientCache(path, limit)
    try:
        cache.set_last_tid(p64(10 ** 6))
        for number in range(3000):
            cache.store(p64(number % 700), p64(number + 1), None,
                        b"x" * (number % 400))
            assert cache.size <= limit
            assert os.path.getsize(path) <= \
                len(MAGIC) + limit + max(limit // 2, MIN_GARBAGE) + 500
        assert len(cache) < 700  # some were evicted
        newest = cache.load_before(p64(2999 % 700), p64(10 ** 6))
        assert newest == (b"x" * (2999 % 400), p64(3000), None)
    finally:
        cache.close()


def test_compaction_preserves_contents_and_shrinks_the_file(tmp_path):
    path = str(tmp_path / "c-1.zec")
    cache = FileClientCache(path, 10 ** 7)
    expected = fill(cache, 300)
    for number in range(0, 300, 3):
        cache.forget(p64(number))
        for tid in (p64(50), p64(101)):
            expected.pop((p64(number), tid), None)
    before = os.path.getsize(path)
    assert cache.garbage() > 0
    cache.compact()
    try:
        assert os.path.getsize(path) < before
        assert cache.garbage() == len(p64(0)) + 9  # only the last-tid record
        assert_answers(cache, expected)
        assert cache.load_before(p64(3), p64(101)) is None
        cache.close()
        cache = FileClientCache(path, 10 ** 7)
        assert_answers(cache, expected)
        assert cache.last_tid() == p64(100)
    finally:
        cache.close()


def test_clear_empties_the_file(tmp_path):
    path = str(tmp_path / "c-1.zec")
    cache = FileClientCache(path, 10 ** 7)
    fill(cache, 50)
    cache.clear()
    cache.close()
    assert os.path.getsize(path) == len(MAGIC)
    cache = FileClientCache(path, 10 ** 7)
    try:
        assert len(cache) == 0 and cache.last_tid() is None
    finally:
        cache.close()


# -- damaged files ------------------------------------------------------------

def write_numbered(path, count):
    """Store oids 0..count-1 one record each; return each record's end."""
    cache = FileClientCache(path, 10 ** 7)
    ends = []
    try:
        cache.set_last_tid(p64(1))
        for number in range(count):
            cache.store(p64(number), p64(1), None, b"%d" % number * 50)
            ends.append(os.path.getsize(path))
    finally:
        cache.close()
    return ends


def surviving(path, count):
    """The oids the cache at `path` still answers, checking their data."""
    cache = FileClientCache(path, 10 ** 7)
    try:
        found = []
        for number in range(count):
            answer = cache.load_before(p64(number), p64(2))
            if answer is not None:
                assert answer == (b"%d" % number * 50, p64(1), None)
                found.append(number)
        return found
    finally:
        cache.close()


@pytest.mark.parametrize("cut", [1, 9, 20, -1])
def test_torn_last_record_is_dropped(tmp_path, cut):
    """A record cut anywhere (in its header, its payload, its last byte)
    is dropped, and only it."""
    path = str(tmp_path / "c-1.zec")
    ends = write_numbered(path, 20)
    torn_at = ends[14] + cut if cut > 0 else ends[15] + cut
    with open(path, "r+b") as file:
        file.truncate(torn_at)
    assert surviving(path, 20) == list(range(15))
    assert os.path.getsize(path) == ends[14]  # the torn tail was cut off


@pytest.mark.parametrize("where", [0, 4, 5, 12, 40])
def test_corrupt_record_drops_it_and_everything_after(tmp_path, where):
    """A flipped byte in record 7 (crc, kind, length, oid, data) loses
    records 7 and later: a later record could depend on it."""
    path = str(tmp_path / "c-1.zec")
    ends = write_numbered(path, 20)
    with open(path, "r+b") as file:
        file.seek(ends[6] + where)
        byte = file.read(1)
        file.seek(ends[6] + where)
        file.write(bytes([byte[0] ^ 0x40]))
    assert surviving(path, 20) == list(range(7))
    assert os.path.getsize(path) == ends[6]


def test_damage_after_opening_is_not_returned(tmp_path):
    path = str(tmp_path / "c-1.zec")
    ends = write_numbered(path, 5)
    cache = FileClientCache(path, 10 ** 7)
    try:
        with open(path, "r+b") as file:
            file.seek(ends[2] - 3)
            file.write(b"???")
        assert cache.load_before(p64(2), p64(2)) is None
        assert len(cache) == 4
        assert cache.load_before(p64(3), p64(2)) is not None
    finally:
        cache.close()


def test_a_file_that_is_not_a_cache_is_started_anew(tmp_path):
    path = str(tmp_path / "c-1.zec")
    with open(path, "wb") as file:
        file.write(b"not a cache file at all" * 10)
    cache = FileClientCache(path, 10 ** 7)
    try:
        assert len(cache) == 0 and cache.last_tid() is None
        assert os.path.getsize(path) == len(MAGIC)
    finally:
        cache.close()


WRITER = textwrap.dedent("""
    import hashlib, sys
    from ZODB.utils import p64
    from zeo.client.cache_file import FileClientCache

    cache = FileClientCache(sys.argv[1], int(sys.argv[2]))
    number = 0
    while True:
        body = b"%d:" % number + bytes(range(256)) * (number % 80 + 1)
        cache.set_last_tid(p64(number + 1))
        cache.store(p64(number), p64(number + 1), None,
                    body + hashlib.sha256(body).digest())
        if number % 7 == 0 and number >= 3:
            cache.invalidate(p64(number - 3), p64(number + 1))
        print(number, flush=True)
        number += 1
""")


def verified(data):
    """Whether `data` ends with the SHA-256 of the rest (as WRITER makes)."""
    return hashlib.sha256(data[:-32]).digest() == data[-32:]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("limit", [10 ** 8, 200000])
def test_writer_killed_mid_write_leaves_only_good_data(tmp_path, limit):
    """A child process writes (and, with the small limit, evicts and
    compacts) in a loop until SIGKILL; on reopening, every entry must be
    intact, and with the large limit every store the child reported done
    must be there."""
    path = str(tmp_path / "c-1.zec")
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, str(limit)],
        stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True)
    try:
        done = -1
        for line in child.stdout:
            done = int(line)
            if done >= 600:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert done >= 600, "the writer did not get going"

    cache = FileClientCache(path, limit)
    try:
        last = cache.last_tid()
        assert last is not None and last >= p64(done + 1)
        # Revision `number` starts at number + 1, and if invalidated ends
        # at number + 4: either query finds it.
        answers = [cache.load_before(p64(number), next_tid(last))
                   or cache.load_before(p64(number), p64(number + 4))
                   for number in range(u64(last))]
        good = [answer for answer in answers if answer is not None]
        assert good and len(good) == len(cache)
        assert all(verified(data) for data, _start, _end in good)
        if limit == 10 ** 8:
            assert None not in answers[:done + 1]
    finally:
        cache.close()
    assert not os.path.exists(path + ".tmp")


# -- the index snapshot ------------------------------------------------------

SNAPSHOT_IGNORED = "index snapshot not used"


def test_clean_close_leaves_a_snapshot_that_the_next_open_takes(
        tmp_path, caplog):
    path = str(tmp_path / "c-1.zec")
    write_numbered(path, 30)
    assert os.path.exists(path + ".index")
    cache = FileClientCache(path, 10 ** 7)
    try:
        assert not os.path.exists(path + ".index")  # a crash now: replay
        assert cache.last_tid() == p64(1) and len(cache) == 30
    finally:
        cache.close()
    assert SNAPSHOT_IGNORED not in caplog.text
    assert surviving(path, 30) == list(range(30))


def test_snapshot_keeps_the_least_recently_used_order(tmp_path):
    path = str(tmp_path / "c-1.zec")
    write_numbered(path, 10)
    cache = FileClientCache(path, 10 ** 7)
    for number in (3, 0, 7):  # now the most recently used
        assert cache.load_before(p64(number), p64(2)) is not None
    cache = reopen(cache)
    try:
        # Each entry is charged 150 bytes; an empty one 100.  Storing one
        # must now evict exactly two: the two least recently used.
        cache.limit = cache.size - 200
        cache.store(p64(99), p64(1), None, b"")
        assert cache.load_before(p64(1), p64(2)) is None
        assert cache.load_before(p64(2), p64(2)) is None
        assert all(cache.load_before(p64(number), p64(2)) is not None
                   for number in (0, 3, 4, 5, 6, 7, 8, 9))
    finally:
        cache.close()


def test_snapshot_of_an_older_file_is_not_used(tmp_path, caplog):
    """A snapshot put back after the log moved on (a crash after more
    writes, or a file copied around) must not hide the newer records."""
    path = str(tmp_path / "c-1.zec")
    write_numbered(path, 10)
    with open(path + ".index", "rb") as old:
        old_snapshot = old.read()
    cache = FileClientCache(path, 10 ** 7)
    cache.invalidate(p64(4), p64(2))
    cache.store(p64(4), p64(2), None, b"new")
    cache.set_last_tid(p64(2))
    cache.close()
    with open(path + ".index", "wb") as snapshot:
        snapshot.write(old_snapshot)
    caplog.set_level(logging.INFO, "zeo.client.cache_file")
    cache = FileClientCache(path, 10 ** 7)
    try:
        assert "the cache file changed" in caplog.text
        assert cache.last_tid() == p64(2)
        assert cache.load_before(p64(4), p64(3)) == (b"new", p64(2), None)
        assert cache.load_before(p64(4), p64(2))[2] == p64(2)
    finally:
        cache.close()


@pytest.mark.parametrize("damage", ["magic", "entry", "truncate", "empty"])
def test_damaged_snapshot_is_not_used(tmp_path, caplog, damage):
    path = str(tmp_path / "c-1.zec")
    write_numbered(path, 10)
    with open(path + ".index", "r+b") as snapshot:
        if damage == "magic":
            snapshot.write(b"X")
        elif damage == "entry":
            snapshot.seek(-5, os.SEEK_END)
            snapshot.write(b"\xff")
        else:
            snapshot.truncate(0 if damage == "empty" else 40)
    caplog.set_level(logging.INFO, "zeo.client.cache_file")
    assert surviving(path, 10) == list(range(10))
    assert SNAPSHOT_IGNORED in caplog.text
    assert not os.path.exists(path + ".index.tmp")


# -- the lock -----------------------------------------------------------------

def test_second_opener_gets_a_clear_error(tmp_path):
    path = str(tmp_path / "c-1.zec")
    cache = FileClientCache(path, 10 ** 6)
    try:
        with pytest.raises(CacheFileLocked, match="in use"):
            FileClientCache(path, 10 ** 6)
        probe = subprocess.run(
            [sys.executable, "-c", textwrap.dedent("""
                import sys
                from zeo.client.cache_file import FileClientCache
                try:
                    FileClientCache(sys.argv[1])
                except Exception as error:
                    print(type(error).__name__, error)
            """), path], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=30)
        assert probe.stdout.startswith("CacheFileLocked")
        assert path in probe.stdout
        assert issubclass(CacheFileLocked, zc.lockfile.LockError)
    finally:
        cache.close()
    FileClientCache(path, 10 ** 6).close()  # free again once closed


# -- a real client and server -------------------------------------------------

def commit_objects(storage, count):
    """Create oids 1..count in one transaction; return the new tid."""
    return commit_stores(storage, [(p64(number), z64, b"object %d" % number)
                                   for number in range(1, count + 1)])


@pytest.mark.timeout(60)
def test_restarted_client_loads_from_its_cache_file(tmp_path):
    """2000 objects loaded once; another client changes one while the
    first is closed.  Reopened with the same name, the first client loads
    them all again with one server load, the changed object: its cache
    file kept the entries and the last tid that verification starts from.
    """
    count = 2000
    server = ServerProcess(["-a", "127.0.0.1:0", "-f",
                            str(tmp_path / "Data.fs")])
    try:
        options = dict(client="c1", var=str(tmp_path),
                       wait_timeout=CLIENT_TIMEOUT)
        storage = ClientStorage(server.address, **options)
        try:
            commit_objects(storage, count)
            with pytest.raises(CacheFileLocked):
                ClientStorage(server.address, **options)
            for number in range(1, count + 1):
                assert storage.load(p64(number))[0] == b"object %d" % number
        finally:
            storage.close()
        assert os.path.exists(cache_file_path("c1", "1", str(tmp_path)))

        other = ClientStorage(server.address, wait_timeout=CLIENT_TIMEOUT)
        try:
            changed = commit_one(other, p64(7), other.load(p64(7))[1],
                                 b"changed")
        finally:
            other.close()

        storage = ClientStorage(server.address, **options)
        try:
            assert storage.lastTransaction() == changed
            loads = storage.server_status()["loads"]
            for number in range(1, count + 1):
                assert storage.load(p64(number))[0] == (
                    b"changed" if number == 7 else b"object %d" % number)
            assert storage.server_status()["loads"] == loads + 1
        finally:
            storage.close()
    finally:
        assert server.stop() == 0
