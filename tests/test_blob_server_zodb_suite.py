"""ZODB's generic blob tests, run by the real ZEO client on our server.

`ZODB.tests.testblob.storage_reusable_suite` checks any IBlobStorage
built by a factory.  Ours builds a real ZEO ClientStorage connected to a
server process of its own (started like a user starts it, on a
FileStorage with blobs in the test's directory) and stops that server
when the client is closed.  Both blob modes run: a private blob cache and
a shared blob directory.  Each test case of the suite is one pytest item.

As for ZEO's own run of this suite, its packing doctest is left out: it
packs to times read from the test process's (faked) clock and checks
client-side paths, while the server makes tids from its own clock and a
client's blob cache is not packed.  test_blob_server.py tests pack.
"""

import builtins
import os
import stat
import unittest

import pytest
import ZODB.tests.testblob
from ZEO.ClientStorage import ClientStorage

from conftest import CLIENT_TIMEOUT, SERVER_IMPL, server_environment
from server_process import (start_configured_server, stop_all,
                            trusting_zodb_test_classes)

pytestmark = pytest.mark.timeout(180)

#: Server processes started by the storages of the running test case.
_servers = []


class ServedBlobClientStorage(ClientStorage):
    """A real ZEO client of a server process of its own, which it stops
    when it is closed: the storage factory ZODB's suite wants.

    Files go in the current directory, where the suite puts each test.
    """

    def __init__(self, name, blob_dir, shared):
        directory = os.path.abspath("%s-server" % name)
        os.makedirs(directory, exist_ok=True)
        server_blob_dir = blob_dir if shared else "server-%s" % blob_dir
        section = ("<filestorage 1>\n  path %s.fs\n  blob-dir %s\n"
                   "</filestorage>" % (os.path.abspath(name),
                                       os.path.abspath(server_blob_dir)))
        self._server_process = start_configured_server(
            directory, trusting_zodb_test_classes(SERVER_IMPL),
            {"1": section}, impl=SERVER_IMPL,
            env=server_environment())
        _servers.append(self._server_process)
        super().__init__(self._server_process.address, "1", blob_dir=blob_dir,
                         shared_blob_dir=shared,
                         wait_timeout=CLIENT_TIMEOUT)

    def close(self):
        try:
            super().close()
        finally:
            self._server_process.stop()


def _suite(mode):
    shared = mode == "shared"
    return ZODB.tests.testblob.storage_reusable_suite(
        "ClientStorage%sBlobs" % mode.capitalize(),
        lambda name, blob_dir: ServedBlobClientStorage(name, blob_dir,
                                                       shared),
        test_packing=False)


def _open_unprivileged(file, mode="r", *args, **kwargs):
    """`open` as for a user other than root.

    blob_transaction.txt checks that a committed (read-only) blob file
    cannot be opened for writing.  Root can, and the doctest then
    truncates the file; tests run as root in CI.
    """
    if (set(mode) & set("wax+") and isinstance(file, str)
            and os.path.exists(file)
            and not os.stat(file).st_mode & stat.S_IWUSR):
        raise PermissionError(13, "Permission denied", file)
    return builtins.open(file, mode, *args, **kwargs)


def _as_unprivileged(case):
    if os.geteuid() == 0 and hasattr(case, "_dt_test"):
        case._dt_test.globs["open"] = _open_unprivileged
        # Before 3.13 the case copies the globals when it is made (and
        # restores them from that copy); from 3.13 on, in setUp.
        if hasattr(case, "_dt_globs"):
            case._dt_globs["open"] = _open_unprivileged
    return case


def _cases(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _cases(test)
        else:
            yield test


def _collect():
    cases = []
    for mode in "cache", "shared":
        suite = _suite(mode)
        for case in _cases(suite):
            cases.append(pytest.param(suite.layer, _as_unprivileged(case),
                                      id="%s-%s" % (mode, case.id())))
    return cases


@pytest.mark.parametrize("layer, case", _collect())
def test_zodb_blob_suite(layer, case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    del _servers[:]
    result = unittest.TestResult()
    layer.testSetUp()
    try:
        case.run(result)
    finally:
        layer.testTearDown()
        servers, _servers[:] = list(_servers), []
        statuses = stop_all(servers)  # those the test did not close
    problems = result.errors + result.failures
    for _test, trace in problems:
        print(trace)
    assert not problems
    assert result.testsRun == 1 and not result.skipped
    assert statuses == [0] * len(servers), "server exit statuses"
