"""The monitor server: a plain-text statistics report per connection.

Connect with ``telnet host port`` or ``nc host port``: the server writes
the report and closes the connection, reading nothing.  The report keeps
the classic ZEO monitor layout (PROTOCOL.md 14.1), whose ``Label: value``
lines old parsers split on the first colon, and adds per storage what an
operator needs today: size, last transaction, the span of the
invalidation queue and one line per connected client.

Making the report never takes a storage's commit lock: the counters are
read as they are, and the publication lock is held only while the list
of sessions is copied (`ServedStorage.monitor_snapshot`), so a report
neither waits for a commit nor slows one down.
"""

import logging
import os
import socket
import threading
import time

import ZODB.TimeStamp

from zeo.command_line import installed_version
from zeo.server import free_threading
from zeo.server.limits import (CONNECTION_REFUSED, FRAME_REFUSED,
                               REGISTER_TIMEOUT)
from zeo.server.listener import format_address
from zeo.server.unix_socket import bind_with_mode, remove_stale_socket
from zeo.server.storage import tid_hex, z64

logger = logging.getLogger(__name__)

#: How long a monitor client may take to read its report.
SEND_TIMEOUT = 5

#: How often the accepting thread checks whether it should stop.
ACCEPT_POLL_INTERVAL = 0.2

#: Longest client label shown; labels come from clients and are cut.
MAX_LABEL_LENGTH = 80


def report(server, now=None):
    """The report text for `server`'s storages, sorted by name."""
    now = time.time() if now is None else now
    lines = ["ZEO monitor server version %s"
             % (installed_version() or "unknown"),
             time.ctime(now), "Running on: %s" % free_threading.describe()
             ] + unchecked_lines(server) + connection_lines(server) + [""]
    watchdog = server.watchdog_status()
    for name in sorted(server.storages):
        lines += storage_block(server.storages[name], watchdog, now)
        lines.append("")
    slow = server.slow_log.recent()
    if slow:
        lines += ["Slow operations: the last %d" % len(slow)]
        lines += ["Slow: %s" % line for line in slow]
        lines.append("")
    return "\n".join(lines) + "\n"


def unchecked_lines(server):
    """The C extensions running without the GIL that nobody checked for
    it (see zeo.server.free_threading), if any."""
    if not server.unchecked_extensions:
        return []
    return ["GIL off with unchecked C extensions: %s"
            % ", ".join(server.unchecked_extensions)]


def connection_lines(server):
    """The server's connections against max-connections, and how many
    connections its limits refused or closed."""
    refusals = server.guard.refusals.counts()
    return ["Connections: %d" % server.connection_count(),
            "Connection limit: %d" % server.guard.limits.max_connections,
            "Room for clients (file descriptors): %s"
            % ("unlimited" if server.client_capacity is None
               else server.client_capacity),
            "Connections refused: %d" % refusals[CONNECTION_REFUSED],
            "Closed for no register: %d" % refusals[REGISTER_TIMEOUT],
            "Frames refused: %d" % refusals[FRAME_REFUSED]]


def storage_block(served, watchdog_status, now):
    """The lines of one storage: the classic ones first, then ours."""
    sessions, (queued, oldest, newest) = served.monitor_snapshot()
    status = served.status(watchdog_status)
    _holder, acquired_at = served.commit_lock.held()
    lines = ["Storage: %s" % served.name,
             "Server started: %s" % status["start"],
             "Clients: %d" % len(sessions),
             "Clients verifying: 0",
             "Active transactions: %d" % status["active_txns"]]
    if acquired_at is not None:
        lines.append("Commit lock held for: %d" % int(now - acquired_at))
    lines += ["Commits: %d" % status["commits"],
              "Aborts: %d" % status["aborts"],
              "Loads: %d" % status["loads"],
              "Stores: %d" % status["stores"],
              "Conflicts: %d" % status["conflicts"],
              "Conflicts resolved: %d" % status["conflicts_resolved"],
              "Waiting for the commit lock: %d" % status["waiting"]]
    if served.commit_refusal is not None:
        lines.append("Refusing commits: since %s: %s; restart the server "
                     "once the storage is checked"
                     % (time.ctime(served.refusing_since),
                        served.commit_refusal))
    if served.has_blobs:
        counts = served.stats.snapshot(served.stats.BLOB_COUNTERS)
        lines += ["Blobs received: %(blobs_received)d "
                  "(%(blob_bytes_received)d bytes)" % counts,
                  "Blobs sent: %(blobs_sent)d (%(blob_bytes_sent)d bytes)"
                  % counts]
    size = served.size_info()
    lines += ["Size: %d bytes" % size["size"],
              "Objects: %d" % size["length"],
              "Last transaction: %s" % describe_tid(
                  served.last_transaction()),
              "Invalidation queue: %d transactions, %s to %s"
              % (queued, tid_hex(oldest), tid_hex(newest))]
    lines += [client_line(session) for session in sessions]
    return lines


def describe_tid(tid):
    """A tid as hex digits and the UTC time it stands for."""
    if tid == z64:
        return "none (empty storage)"
    stamp = ZODB.TimeStamp.TimeStamp(tid)
    return "%s (%s UTC)" % (tid_hex(tid), str(stamp)[:19])


def client_line(session):
    """One connected client: address, label, since when, its counters."""
    channel = session.channel
    parts = [channel.peer]
    if session.certificate_read_only:
        parts.append("read-only certificate")
    if session.client_label is not None:
        parts.append("label %s" % printable(session.client_label))
    parts += ["connected since %s" % time.ctime(channel.connected_at),
              "loads %d" % session.loads,
              "commits %d" % session.commits]
    return "Client: %s" % ", ".join(parts)


def printable(value):
    """`value` as one short line: a client cannot forge report lines."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(char if char.isprintable() else "?" for char in text)
    if len(text) > MAX_LABEL_LENGTH:
        text = text[:MAX_LABEL_LENGTH - 3] + "..."
    return text


class MonitorServer:
    """Listens on `address` in one named thread; answers each connection
    with `report(server)` and closes it."""

    def __init__(self, address, server):
        self._server = server
        self._address = address
        if isinstance(address, str):
            remove_stale_socket(address)
            self._socket = socket.socket(socket.AF_UNIX)
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            self._socket = socket.socket(family)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if isinstance(address, str):
                bind_with_mode(self._socket, address,
                               server.guard.limits.socket_mode)
            else:
                self._socket.bind(address)
            self._socket.listen(16)
        except OSError:
            self._socket.close()
            raise
        self.address = self._socket.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve,
                                        name="zeo-monitor", daemon=True)
        logger.info("monitor server on %s", format_address(self.address))

    def start(self):
        self._thread.start()

    def _serve(self):
        self._socket.settimeout(ACCEPT_POLL_INTERVAL)
        while not self._stop.is_set():
            try:
                peer, peer_address = self._socket.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with peer:
                self._answer(peer, peer_address)

    def _answer(self, peer, peer_address):
        """Send one report; a failure costs this client only."""
        who = format_address(peer_address) if peer_address else "unix-socket"
        try:
            text = report(self._server)
        except Exception:
            logger.exception("monitor report for %s failed", who)
            return
        peer.settimeout(SEND_TIMEOUT)
        try:
            peer.sendall(text.encode("utf-8", "replace"))
        except OSError as error:
            logger.info("monitor client %s dropped: %s", who, error)
            return
        logger.debug("monitor report sent to %s", who)

    def close(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._socket.close()
        if isinstance(self._address, str):
            try:
                os.unlink(self._address)
            except OSError:
                pass
