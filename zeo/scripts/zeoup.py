"""Is the server up?  ``python -m zeo.scripts.zeoup ADDRESS``.

Sends the ``ruok`` probe (PROTOCOL.md 2.2): the server answers with the
status of every storage and closes, without registering a session or
touching the statistics.  The result is one line in the form monitoring
systems such as Nagios expect, and the matching exit status:

* ``OK - ...`` (0): the server answers and serves data;
* ``WARNING - ...`` (1): it answers but a storage is empty (no
  transaction yet: often a server pointed at the wrong Data.fs; accepted
  with ``--allow-empty``) or it serves no storage;
* ``CRITICAL - ...`` (2): no connection, no answer in time, an answer
  that is not a ZEO status, or a storage named with ``-S`` is missing;
* ``UNKNOWN - ...`` (3): the command line itself is wrong.

After ``|`` come performance data: connections, active transactions and
voters waiting for the commit lock, per storage.
"""

import argparse
import json
import socket
import sys

from zeo import wire
from zeo.command_line import add_version_option, program_name
from zeo.scripts import FrameSocket, format_server_address
from zeo.scripts import server_address_argument

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL",
               UNKNOWN: "UNKNOWN"}
EMPTY_TID_HEX = "0" * 16
DEFAULT_TIMEOUT = 10


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors exit with UNKNOWN (3), as monitoring plugins must:
    argparse's own status 2 would read as CRITICAL."""

    def error(self, message):
        print("UNKNOWN - %s (see --help)" % message)
        sys.exit(UNKNOWN)


def build_argument_parser():
    parser = _ArgumentParser(
        prog=program_name("zeo.scripts.zeoup"),
        description="Check that a ZEO server answers, Nagios style.")
    parser.add_argument(
        "address", type=server_address_argument,
        help="HOST:PORT, PORT (on this machine) or a Unix socket path")
    parser.add_argument(
        "-S", "--storage", action="append", default=[], metavar="NAME",
        help="a storage that must be served (repeatable)")
    parser.add_argument(
        "--allow-empty", action="store_true",
        help="an empty storage is OK too (for a new database, or as a "
             "start test that only asks whether the server answers)")
    parser.add_argument(
        "-t", "--timeout", type=float, default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up after this long (default %d)" % DEFAULT_TIMEOUT)
    add_version_option(parser)
    return parser


def fetch_status(address, timeout):
    """`{storage name: status dict}` from the server's ruok answer."""
    with FrameSocket(address, timeout) as connection:
        connection.send(wire.RUOK)
        greeting = connection.receive(timeout)
        if greeting not in (wire.PICKLE_PROTOCOL, wire.MSGPACK_PROTOCOL):
            raise ValueError("not a ZEO 5 server (greeting %s)"
                             % wire.short_repr(greeting))
        status = json.loads(connection.receive(timeout).decode("ascii"))
    if not isinstance(status, dict) or not all(
            isinstance(value, dict) for value in status.values()):
        raise ValueError("the status answer is not a mapping of storages")
    return status


def evaluate(status, required_storages=(), allow_empty=False):
    """`(state, text)` for a status mapping."""
    missing = [name for name in required_storages if name not in status]
    if missing:
        return CRITICAL, "storage%s %s not served (serving: %s)" % (
            "s" if len(missing) > 1 else "",
            ", ".join(repr(name) for name in missing),
            ", ".join(repr(name) for name in sorted(status)) or "nothing")
    if not status:
        return WARNING, "No storages"
    empty = [name for name in sorted(status)
             if status[name].get("last-transaction") == EMPTY_TID_HEX
             and not allow_empty]
    if empty:
        return WARNING, "Empty storage%s %s" % (
            "s" if len(empty) > 1 else "",
            ", ".join(repr(name) for name in empty))
    return OK, "%d storage%s: %s" % (
        len(status), "s" if len(status) > 1 else "",
        ", ".join("%r (%s clients)" % (name, status[name].get("connections"))
                  for name in sorted(status)))


def performance_data(status):
    """Nagios performance data: `key_STORAGE=value` pairs."""
    items = []
    for name in sorted(status):
        for key in ("connections", "active_txns", "waiting"):
            value = status[name].get(key)
            if isinstance(value, int):
                label = "%s_%s" % (key, name.replace("'", ""))
                items.append("'%s'=%d" % (label, value))
    return " ".join(items)


def check(address, timeout=DEFAULT_TIMEOUT, required_storages=(),
          allow_empty=False):
    """`(state, line)`: the whole check, as the command runs it."""
    where = format_server_address(address)
    try:
        status = fetch_status(address, timeout)
    except socket.timeout:
        return CRITICAL, "CRITICAL - no answer from %s within %ss" % (
            where, timeout)
    except OSError as error:
        return CRITICAL, "CRITICAL - Can't connect to %s: %s" % (
            where, error.strerror or error)
    except (ValueError, wire.ProtocolError) as error:
        return CRITICAL, "CRITICAL - %s answered oddly: %s" % (where, error)
    state, text = evaluate(status, required_storages, allow_empty)
    line = "%s - %s" % (STATE_NAMES[state], text)
    perf = performance_data(status)
    if perf:
        line += "|" + perf
    return state, line


def main(argv=None):
    arguments = build_argument_parser().parse_args(argv)
    state, line = check(arguments.address, arguments.timeout,
                        arguments.storage, arguments.allow_empty)
    print(line)
    return state


if __name__ == "__main__":
    sys.exit(main())
