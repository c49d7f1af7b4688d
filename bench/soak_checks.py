"""The soak's end-of-run checks on the journals and on Data.fs itself.

Each check is (name, passed, detail).  The database checks open the file
directly, read-only, after the server has stopped: what is on disk is
what counts.
"""

import collections
import glob
import json
import os
import subprocess
import sys

import ZODB
import ZODB.FileStorage

from soak_model import TOTAL, stamp

#: Journal entries of each kind shown in a failure's detail.
EXAMPLES = 3


def read_journals(directory):
    """All journal entries of all client processes, in time order, and
    the lines that are not JSON (a write cut short, by a full disk)."""
    entries, unreadable = [], []
    for path in glob.glob(os.path.join(directory, "client-*.jsonl")):
        with open(path) as journal:
            for line in journal:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    unreadable.append(line[:200])
    entries.sort(key=lambda entry: entry["time"])
    return entries, unreadable


def guarded(name, check, *arguments):
    """The results of `check(*arguments)`, or one failed result named
    `name` if the check itself raised (a damaged file, a full disk)."""
    try:
        return check(*arguments)
    except Exception as error:
        return [(name, False, "the check could not run: %s: %s"
                 % (type(error).__name__, error))]


def read_counts(directory):
    """Operation counts summed over every client process incarnation."""
    counts = collections.Counter()
    for path in glob.glob(os.path.join(directory, "client-*-*.json")):
        with open(path) as stats:
            counts.update(json.load(stats)["counts"])
    return counts


def journal_checks(entries, unreadable):
    violations = [entry for entry in entries if "violation" in entry]
    errors = [entry for entry in entries if "error" in entry]
    kinds = collections.Counter(entry["violation"] for entry in violations)
    return [
        ("client journals readable", not unreadable,
         "%d lines are not JSON; first: %s" % (
             len(unreadable), unreadable[:EXAMPLES])
         if unreadable else "%d entries" % len(entries)),
        ("invariants held in every read (bank total, blob and payload "
         "stamps, fillers, undo)", not violations,
         "%d violations %s; first: %s" % (
             len(violations), dict(kinds), violations[:EXAMPLES])
         if violations else "no violation journaled"),
        ("no unexpected client error", not errors,
         "%d errors; first: %s" % (len(errors), errors[:EXAMPLES])
         if errors else "only conflicts, refused undos and disconnections"),
    ]


def acknowledged(entries):
    """{record key: highest value acknowledged}."""
    highest = {}
    for entry in entries:
        if "ack" in entry:
            key = entry["ack"]
            highest[key] = max(highest.get(key, 0), entry["value"])
    return highest


def database_checks(path, blob_dir, entries):
    """Open Data.fs read-only and check the bank, the acknowledged
    commits and the stamps of each record."""
    storage = ZODB.FileStorage.FileStorage(path, read_only=True,
                                           blob_dir=blob_dir)
    db = ZODB.DB(storage)
    try:
        connection = db.open()
        root = connection.root()
        total = sum(account.balance for account in root["accounts"])
        records = root["records"]
        missing = []
        for key, value in sorted(acknowledged(entries).items()):
            if records[key].value < value:
                missing.append((key, value, records[key].value))
        bad_stamps = []
        for key, record in sorted(records.items()):
            with record.blob.open("r") as blob:
                expected = stamp(key, record.blob_value)
                if blob.read(len(expected)) != expected:
                    bad_stamps.append((key, "blob"))
            if not record.payload.data.startswith(
                    stamp(key, record.payload_value)):
                bad_stamps.append((key, "payload"))
        acks = sum(1 for entry in entries if "ack" in entry)
        connection.close()
    finally:
        db.close()
    return [
        ("bank total on disk", total == TOTAL,
         "%d (expected %d)" % (total, TOTAL)),
        ("no acknowledged commit missing", not missing,
         "%d records behind what was acknowledged, first (key, "
         "acknowledged, on disk): %s" % (len(missing), missing[:EXAMPLES])
         if missing else "%d acknowledged commits of %d records, each "
         "there or overtaken by a later one" % (acks, len(records))),
        ("blob and payload stamps on disk match their records",
         not bad_stamps, "%s" % bad_stamps[:EXAMPLES] if bad_stamps
         else "%d records" % len(records)),
    ]


def script_check(name, module, path):
    """Run one of ZODB's checking scripts on `path` as users would."""
    result = subprocess.run([sys.executable, "-m", module, path],
                            capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).strip()
    passed = result.returncode == 0 and not output
    return (name, passed, "exit status %d%s" % (
        result.returncode, (", output: " + output[:1000]) if output else
        ", no complaint"))


def file_checks(path):
    return [
        script_check("Data.fs verifies (fstest)", "ZODB.scripts.fstest",
                     path),
        script_check("no reference to a missing object (fsrefs)",
                     "ZODB.scripts.fsrefs", path),
    ]
