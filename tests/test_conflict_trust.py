"""Server-side conflict resolution uses only what the server trusts.

ZODB resolves a conflict by unpickling the stored, the original and the
committed record, all written by clients.  These tests store records that
call `os.system`, import a module with a side effect, or borrow a
dangerous name through a trusted module, in each of the places ZODB
unpickles (the record's class, the new state, the committed state, an
undo's states), and check that nothing runs: the vote or undo fails as an
unresolvable conflict and the server keeps serving.  Then that what users
rely on still works: BTrees and trusted application classes resolve, and a
BTree whose values are objects of an untrusted class still merges.
"""

import base64
import datetime
import io
import itertools
import logging
import os
import pickle
import textwrap
import threading

import pytest
import transaction
import ZODB
import ZODB.ConflictResolution
import ZODB.POSException
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree, OOBucket
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle

from conftest import server_environment
from hostile_pickles import VARIANTS, Call, Global, expression_opcodes
from raw_client import RawClient, RemoteError
from server_process import start_configured_server
from test_hostile_input import assert_zeo_client_works
from zeo.ClientStorage import ClientStorage
from zeo.server import conflict_globals

pytestmark = pytest.mark.timeout(120)

Z64 = b"\0" * 8
MAXTID = b"\x7f" + b"\xff" * 7
CONFLICT = "ZODB.POSException.ConflictError"

#: Modules the server can import (its PYTHONPATH has their directory).
#: `sideeffect` creates the marker when imported; `trusted_app` is listed
#: in conflict-resolution-modules and re-exports os.system.
MODULES = {
    "sideeffect.py": """
        import os
        open(os.environ["ZEO_TEST_MARKER"], "w").close()
        """,
    "trusted_app.py": """
        from os import system  # noqa: F401  (what a record tries to borrow)

        import persistent


        class Counter(persistent.Persistent):
            def __getstate__(self):
                return self.value

            def __setstate__(self, state):
                self.value = state

            def _p_resolveConflict(self, old, committed, new):
                return committed + new - old
        """,
}


class Served:
    """A server trusting BTrees, persistent and trusted_app; `marker` is
    the file any payload would create."""

    def __init__(self, directory):
        modules = os.path.join(directory, "modules")
        os.mkdir(modules)
        for name, text in MODULES.items():
            with open(os.path.join(modules, name), "w") as module:
                module.write(textwrap.dedent(text))
        self.marker = os.path.join(directory, "pwned")
        env = server_environment()
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [modules, env.get("PYTHONPATH")]))
        env["ZEO_TEST_MARKER"] = self.marker
        self.process = start_configured_server(
            directory, "conflict-resolution-modules BTrees persistent "
            "trusted_app", env=env)

    @property
    def address(self):
        return self.process.address

    def connect(self):
        client = RawClient(self.address)
        client.handshake()
        client.register()
        return client

    def assert_nothing_ran(self):
        assert not os.path.exists(self.marker), self.process.log[-3000:]


_txn_ids = itertools.count(1)


def commit(client, stores):
    """Store `[(oid, serial, record)]` in one transaction; return the tid,
    or the vote's RemoteError when it fails."""
    txn_id = next(_txn_ids)
    client.send_oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
    for oid, serial, record in stores:
        client.send_oneway("storea", oid, serial, record, txn_id)
    return _vote_and_finish(client, txn_id)


def undo(client, tid):
    """Undo the transaction `tid` (FileStorage's undo id); as `commit`."""
    txn_id = next(_txn_ids)
    client.send_oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
    client.send_oneway("undoa", base64.encodebytes(tid).rstrip(), txn_id)
    return _vote_and_finish(client, txn_id)


def _vote_and_finish(client, txn_id):
    try:
        client.call("vote", txn_id)
    except RemoteError as error:
        client.call("tpc_abort", txn_id)
        return error
    return client.call("tpc_finish", txn_id)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(str(tmp_path_factory.mktemp("trust")))
    yield served
    assert served.process.stop() == 0, served.process.log[-4000:]


@pytest.fixture
def client(served):
    with served.connect() as client:
        yield client


def class_pickle(module, name):
    """The first pickle of a record, as ZODB writes it: (module, name)."""
    return pickle.dumps(((module, name), None), 3)


def class_record(module, name, state):
    """A record: its class pickle, then its state."""
    return class_pickle(module, name) + pickle.dumps(state, 3)


def record_state(record):
    """The state of a record (its second pickle)."""
    pickles = io.BytesIO(record)
    pickle.load(pickles)
    return pickle.load(pickles)


def calling_pickle(callee, argument, variant):
    """A pickle whose loading calls `callee` (a Global) with `argument`."""
    return PROTOCOL_3 + expression_opcodes(Call(callee, [argument]),
                                           variant) + b"."


PROTOCOL_3 = b"\x80\x03"


LENGTH = ("BTrees.Length", "Length")
COUNTER = ("trusted_app", "Counter")


def length(value):
    return class_record(*LENGTH, value)


def assert_conflict(outcome):
    assert isinstance(outcome, RemoteError), outcome
    assert outcome.class_name == CONFLICT, outcome.payload


def conflict_on(client, committed_record, new_record, base_record=None):
    """Commit a base record, then `committed_record` on it; then store
    `new_record` on the base again (a stale serial): the vote must
    resolve or refuse.  Returns (oid, the stale vote's outcome)."""
    oid = client.call("new_oids", 1)[0]
    base = commit(client, [(oid, Z64, base_record or length(0))])
    commit(client, [(oid, base, committed_record)])
    return oid, commit(client, [(oid, base, new_record)])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("where", ["class", "new state", "committed state"])
def test_a_record_that_calls_a_global_is_not_resolved(served, client, where,
                                                      variant):
    touch = calling_pickle(Global("os", "system"), "touch " + served.marker,
                           variant)
    hostile = {"class": touch + pickle.dumps(1, 3),
               "new state": class_pickle(*LENGTH) + touch}
    if where == "committed state":
        _, outcome = conflict_on(client, hostile["new state"],
                                 length(2))
    else:
        _, outcome = conflict_on(client, length(1), hostile[where])
    assert_conflict(outcome)
    served.assert_nothing_ran()
    assert_zeo_client_works(served.address, "after-%s-%s" % (where, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_undo_never_unpickles_with_an_unrestricted_lookup(served, client,
                                                             variant):
    """FileStorage resolves an undo of an older transaction against the
    current record: the undone record (here hostile) is unpickled."""
    touch = calling_pickle(Global("os", "system"), "touch " + served.marker,
                           variant)
    oid = client.call("new_oids", 1)[0]
    first = commit(client, [(oid, Z64, length(0))])
    hostile = commit(client, [(oid, first, touch + touch)])
    commit(client, [(oid, hostile, length(5))])
    outcome = undo(client, hostile)
    assert isinstance(outcome, RemoteError)
    assert "Undo" in outcome.class_name, outcome.class_name
    served.assert_nothing_ran()


def test_a_record_cannot_make_the_server_import_a_module(served, client):
    named = PROTOCOL_3 + expression_opcodes(Global("sideeffect", "anything"))
    _, outcome = conflict_on(client, length(1),
                             named + b"." + pickle.dumps(1, 3))
    assert_conflict(outcome)
    _, outcome = conflict_on(client, length(1),
                             class_pickle(*LENGTH) + named + b".")
    assert_conflict(outcome)
    served.assert_nothing_ran()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_trusted_module_does_not_lend_what_it_imports(served, client,
                                                        variant):
    borrowed = calling_pickle(Global("trusted_app", "system"),
                              "touch " + served.marker, variant)
    _, outcome = conflict_on(
        client, class_record(*COUNTER, 1),
        class_pickle(*COUNTER) + borrowed,
        base_record=class_record(*COUNTER, 0))
    assert_conflict(outcome)
    served.assert_nothing_ran()


def test_a_class_of_a_trusted_module_resolves(served, client):
    oid, outcome = conflict_on(
        client, class_record(*COUNTER, 10),
        class_record(*COUNTER, 3), base_record=class_record(*COUNTER, 1))
    assert isinstance(outcome, bytes), outcome
    assert record_state(client.call("loadBefore", oid, MAXTID)[0]) == 12


def test_the_trusted_packages_are_logged_at_start(served):
    assert ("conflicts are resolved with classes from: BTrees persistent "
            "trusted_app" in served.process.log)


def test_btrees_resolve_with_the_default_trust(served, client):
    oid, outcome = conflict_on(client, length(7), length(2))
    assert isinstance(outcome, bytes), outcome
    assert record_state(client.call("loadBefore", oid, MAXTID)[0]) == 9


def test_an_untrusted_resolvable_class_is_reported_not_resolved(served,
                                                                client):
    """ZODB's PCounter resolves conflicts, but its package is not trusted
    here: the client gets the conflict, and the log says which name to
    trust."""
    record = class_record("ZODB.tests.ConflictResolution", "PCounter",
                          {"_value": 1})
    _, outcome = conflict_on(client, record, record,
                             base_record=record)
    assert_conflict(outcome)
    assert ("does not use 'ZODB.tests.ConflictResolution.PCounter'"
            in served.process.log)


def test_a_btree_of_untrusted_objects_still_merges(served):
    """Values that are persistent objects of an untrusted class appear in
    the bucket's state as references naming their class: those are kept
    as names, so the merge works and the class survives it."""
    dbs = [ZODB.DB(ClientStorage(served.address, wait_timeout=10))]
    try:
        with dbs[0].transaction() as connection:
            connection.root.tree = OOBTree()
        dbs.append(ZODB.DB(ClientStorage(served.address, wait_timeout=10)))
        managers = [transaction.TransactionManager() for _ in dbs]
        connections = [db.open(manager)
                       for db, manager in zip(dbs, managers)]
        for number, connection in enumerate(connections):
            connection.root.tree["key%d" % number] = MinPO(number)
        managers[0].commit()
        managers[1].commit()  # conflicts with the first; resolved
        with dbs[1].transaction() as connection:
            tree = connection.root.tree
            assert sorted(tree) == ["key0", "key1"]
            assert [type(value) for value in tree.values()] == [MinPO] * 2
            assert [value.value for value in tree.values()] == [0, 1]
    finally:
        for db in dbs:
            db.close()


# --- the lookup itself, in this process --------------------------------------

def test_the_lookup_applies_only_inside_resolving_with():
    """Threads that are not voting for a server keep ZODB's lookup."""
    trusted = conflict_globals.TrustedGlobals()
    conflict_globals.install()
    assert ZODB.ConflictResolution.find_global("os", "system") is os.system
    seen_elsewhere = []
    with conflict_globals.resolving_with(trusted):
        found = ZODB.ConflictResolution.find_global("os", "system")
        other = threading.Thread(
            target=lambda: seen_elsewhere.append(
                ZODB.ConflictResolution.find_global("os", "system")),
            name="test-other-thread")
        other.start()
        other.join()
    assert isinstance(found, conflict_globals.UntrustedGlobal)
    assert seen_elsewhere == [os.system]


@pytest.mark.parametrize("dotted", [
    "os.system", "builtins.eval", "builtins.getattr", "builtins.bytearray",
    "subprocess.Popen", "io.open", "BTrees.OOBTree.__builtins__",
    "BTrees.OOBTree.__class__", "persistent.sys", "no.such.module"])
def test_what_a_record_may_not_use(dotted):
    module, name = dotted.rsplit(".", 1)
    found = conflict_globals.TrustedGlobals().find_global(module, name)
    assert isinstance(found, conflict_globals.UntrustedGlobal)
    with pytest.raises(ZODB.POSException.ConflictError):
        found("anything")
    with pytest.raises(ZODB.POSException.ConflictError):
        found.__new__(found)


def test_what_a_record_may_use():
    trusted = conflict_globals.TrustedGlobals()
    assert trusted.find_global("BTrees.OOBTree", "OOBucket") is OOBucket
    assert trusted.find_global("BTrees.Length", "Length") is Length
    assert trusted.find_global("datetime", "datetime") is datetime.datetime
    assert trusted.find_global("builtins", "set") is set
    with pytest.raises(ZODB.ConflictResolution.BadClassName):
        trusted.find_global("one", "two", "three")


def test_refusals_are_logged_once_per_name_and_bounded(caplog):
    trusted = conflict_globals.TrustedGlobals()
    caplog.set_level(logging.INFO, logger="zeo.server.conflict_globals")
    names = ["made_up%d" % number
             for number in range(conflict_globals.LOGGED_REFUSALS_LIMIT + 50)]
    for name in names + names:
        with pytest.raises(ZODB.POSException.ConflictError):
            trusted.find_global("nowhere", name)()
    assert len(caplog.records) == conflict_globals.LOGGED_REFUSALS_LIMIT


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_conflict_error_names_a_class_without_running_the_record(
        tmp_path, variant):
    conflict_globals.install()
    marker = tmp_path / "pwned"
    record = calling_pickle(Global("os", "system"), "touch %s" % marker,
                            variant)
    error = ZODB.POSException.ConflictError(oid=Z64, serials=(Z64, Z64),
                                            data=record + record)
    assert error.class_name == "os.system"
    assert not marker.exists()
    assert ZODB.POSException.ConflictError(
        oid=Z64, data=zodb_pickle(MinPO(1))).class_name == (
            "ZODB.tests.MinPO.MinPO")
    assert conflict_globals.record_class_name(b"not a pickle") == ("", "")
