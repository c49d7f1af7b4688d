"""Pack storages through a running server: ``python -m zeo.scripts.zeopack``.

Packing removes the revisions no longer needed to read the database as
of the pack time, and the objects no longer reachable from the root.  The
server does the work (it finds the references itself); this tool only
asks, as a ZEO client would: it connects, registers read-only (packing is
allowed on read-only connections and servers), calls ``pack(t, wait)``
and waits for the answer.  One connection per storage, one after the
other.

Exit status 0 when every pack succeeded, 1 when any failed (the reason is
printed on standard error), 2 for a wrong command line.
"""

import argparse
import sys
import time

from zeo import wire
from zeo.command_line import add_version_option, program_name
from zeo.scripts import FrameSocket, format_server_address
from zeo.scripts import server_address_argument

DEFAULT_CONNECT_TIMEOUT = 30
SECONDS_PER_DAY = 86400

EXIT_OK = 0
EXIT_FAILED = 1

#: Our side decodes replies and one-way calls with an empty allow-list:
#: a server's answers to register and pack, error replies (class names
#: as strings) and info dictionaries never need a global.
_REPLY_GLOBALS = {}


class PackFailed(Exception):
    """The server refused or failed the pack; the message says why."""


class PackingClient:
    """The smallest ZEO client that can pack: handshake, register, pack."""

    def __init__(self, address, connect_timeout=DEFAULT_CONNECT_TIMEOUT):
        self.address = address
        self._connect_timeout = connect_timeout
        self._connection = FrameSocket(address, connect_timeout)
        self._codec = wire.PickleCodec(_REPLY_GLOBALS)
        self._next_msgid = 1
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self):
        greeting = self._connection.receive(self._connect_timeout)
        if greeting not in (wire.PICKLE_PROTOCOL, wire.MSGPACK_PROTOCOL):
            raise PackFailed("%s is not a ZEO 5 server (greeting %s)"
                             % (format_server_address(self.address),
                                wire.short_repr(greeting)))
        # The server speaks the encoding the client answers with.
        self._connection.send(wire.PICKLE_PROTOCOL)

    def call(self, method, *args, timeout=None):
        """A two-way call: its reply value, or PackFailed for an error
        reply.  One-way messages from the server meanwhile are ignored."""
        msgid = self._next_msgid
        self._next_msgid += 1
        self._connection.send(self._codec.encode(msgid, wire.CALL, method,
                                                 args))
        while True:
            message = self._receive(timeout)
            if message.name != wire.REPLY_NAME or message.msgid != msgid:
                continue
            if message.flag == wire.ERROR_REPLY:
                class_name, payload = message.args
                raise PackFailed("%s: %s" % (class_name.rpartition(".")[2],
                                             _error_text(payload)))
            return message.args

    def _receive(self, timeout):
        payload = self._connection.receive(timeout)
        try:
            return self._codec.decode(payload)
        except wire.RefusedGlobals as refused:
            # An error reply may carry an exception object inside its
            # payload; we resolve no class, but the class name and the
            # rest of the message are still there to report.
            return refused.message

    def pack(self, storage, pack_time):
        """Pack `storage` to `pack_time`; return when the server is done."""
        self.call("register", storage, True, timeout=self._connect_timeout)
        self.call("pack", pack_time, 1)

    def close(self):
        self._connection.close()


def _error_text(payload):
    if isinstance(payload, (tuple, list)):
        return " ".join(str(part) for part in payload) or "(no message)"
    if isinstance(payload, dict) and payload.get("message"):
        return str(payload["message"])
    return str(payload)


def build_argument_parser():
    parser = argparse.ArgumentParser(
        prog=program_name("zeo.scripts.zeopack"),
        description="Pack storages of a running ZEO server.")
    parser.add_argument(
        "address", type=server_address_argument,
        help="HOST:PORT, PORT (on this machine) or a Unix socket path")
    parser.add_argument(
        "-S", "--storage", action="append", metavar="NAME",
        help="storage to pack (repeatable; default 1)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "-d", "--days", type=float, default=0, metavar="DAYS",
        help="keep the history of the last DAYS days (default 0: pack "
             "to now, keeping only current revisions)")
    when.add_argument(
        "-t", "--time", type=float, metavar="EPOCH_SECONDS",
        help="pack to this moment instead (seconds since the epoch)")
    parser.add_argument(
        "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up connecting after this long (default %d); the pack "
             "itself may take as long as it takes"
             % DEFAULT_CONNECT_TIMEOUT)
    add_version_option(parser)
    return parser


def pack_time(arguments, now=None):
    if arguments.time is not None:
        return arguments.time
    now = time.time() if now is None else now
    return now - arguments.days * SECONDS_PER_DAY


def main(argv=None):
    arguments = build_argument_parser().parse_args(argv)
    storages = arguments.storage or ["1"]
    when = pack_time(arguments)
    where = format_server_address(arguments.address)
    status = EXIT_OK
    for storage in storages:
        started = time.monotonic()
        try:
            client = PackingClient(arguments.address,
                                   arguments.connect_timeout)
            try:
                client.pack(storage, when)
            finally:
                client.close()
        except (OSError, PackFailed, wire.ProtocolError) as error:
            print("Error: packing storage %r on %s failed: %s"
                  % (storage, where, error), file=sys.stderr)
            status = EXIT_FAILED
            continue
        print("packed storage %r on %s to %s in %.1fs"
              % (storage, where, time.ctime(when),
                 time.monotonic() - started))
    return status


if __name__ == "__main__":
    sys.exit(main())
