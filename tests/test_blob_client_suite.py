"""ZODB's generic blob storage tests, run on our ClientStorage.

`ZODB.tests.testblob.storage_reusable_suite` builds doctests and test
cases around a factory `(name, blob_dir) -> storage`.  Ours starts a
server process of its own on a FileStorage with blobs and connects our
client to it, in each blob mode: a blob cache of the client's own (the
server's blobs elsewhere), and the server's blob directory shared.  Each
test case of the suite is one pytest item.

The suite checks that committed blob files cannot be opened for writing,
which holds for any user but root (root may write to read-only files).
When the tests run as root, each case runs with the calling thread's
capabilities to override file permissions dropped, as an ordinary user.
"""

import contextlib
import ctypes
import os
import unittest

import pytest
import ZODB.tests.testblob

from conftest import CLIENT_TIMEOUT, server_environment
from server_process import (start_configured_server, stop_all,
                            trusting_zodb_test_classes)
from test_blob_client import BLOB_SERVER_IMPLS
from zeo.ClientStorage import ClientStorage

pytestmark = pytest.mark.timeout(180)

#: Blob modes: whether the client shares the server's blob directory.
MODES = {"cache": False, "shared": True}

#: The servers started by the test case running now (stopped after it,
#: whatever the test closed).
_started = []


class ServedClientStorage(ClientStorage):
    """Our ClientStorage on a server process of its own, in the current
    directory; closing the storage stops the server."""

    def __init__(self, impl, name, blob_dir, shared):
        directory = os.path.abspath("%s-server" % name)
        os.mkdir(directory)
        server_blobs = os.path.abspath(
            blob_dir if shared else "server-%s" % blob_dir)
        section = ("<filestorage 1>\n  path %s\n  blob-dir %s\n"
                   "</filestorage>" % (os.path.abspath(name + ".fs"),
                                       server_blobs))
        self._server = start_configured_server(
            directory, trusting_zodb_test_classes(impl),
            storages={"1": section}, impl=impl,
            env=server_environment())
        _started.append(self._server)
        ClientStorage.__init__(self, self._server.address, blob_dir=blob_dir,
                               shared_blob_dir=shared,
                               wait_timeout=CLIENT_TIMEOUT)

    def close(self):
        ClientStorage.close(self)
        self._server.stop()


#: Linux capability numbers and the capget/capset structures' version.
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def file_permissions_enforced():
    """Run the body with this thread (and the threads it starts) subject
    to file permissions, even as root."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)  # pid 0: this thread
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    saved = data[0].effective
    data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE)
                           | (1 << _CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def _cases(suite):
    """The test cases of a (nested) unittest suite, with the layer each
    is under."""
    layer = getattr(suite, "layer", None)
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            for case, inner in _cases(test):
                yield case, inner or layer
        else:
            yield test, layer


def _collect():
    params = []
    for impl in BLOB_SERVER_IMPLS:
        for mode, shared in MODES.items():
            def factory(name, blob_dir, impl=impl, shared=shared):
                return ServedClientStorage(impl, name, blob_dir, shared)
            prefix = "ClientStorage%sBlobs" % mode.capitalize()
            suite = ZODB.tests.testblob.storage_reusable_suite(
                prefix, factory)
            for case, layer in _cases(suite):
                name = case.id().rsplit("/", 1)[-1]
                params.append(pytest.param(
                    case, layer, id="%s-%s-%s" % (impl, mode, name)))
    return params


@pytest.mark.parametrize("case, layer", _collect())
def test_zodb_blob_suite(case, layer):
    result = unittest.TestResult()
    if layer is not None:
        layer.testSetUp()
    try:
        with file_permissions_enforced():
            case.run(result)
    finally:
        if layer is not None:
            layer.testTearDown()
        statuses = stop_all(_started)
        _started.clear()
    problems = [
        "%s\n%s" % (test.id(), text)
        for test, text in result.errors + result.failures]
    assert not problems, "\n\n".join(problems)
    assert not result.skipped, result.skipped
    assert result.testsRun == 1
    assert all(status == 0 for status in statuses), statuses


def test_every_case_was_collected():
    # Guards the collection above: a suite that lost its cases would
    # otherwise pass with nothing run.
    names = [param.id for param in _collect()]
    assert len(names) == len(set(names))
    assert len(names) >= 20 * len(BLOB_SERVER_IMPLS) * len(MODES)
    assert any("blob_transaction" in name for name in names)
    assert any("testRedo" in name for name in names)
