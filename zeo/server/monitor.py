"""The monitor server: a plain-text statistics report per connection.

Connect with `telnet host port` or `nc host port`: the server writes the
report and closes (the classic ZEO monitor layout, PROTOCOL.md 14.1).  It
reads counters only, never takes the commit lock, and never waits on a
client for long: a peer that does not read its report is dropped.
"""

import logging
import socket
import threading
import time
from importlib import metadata

from zeo.server.listener import format_address, remove_stale_socket

logger = logging.getLogger(__name__)

_SEND_TIMEOUT = 5


def our_version():
    try:
        return metadata.version("zeo-threaded")
    except metadata.PackageNotFoundError:
        return "unknown"


def report(server, now=None):
    """The report text for `server`'s storages, sorted by name."""
    now = time.time() if now is None else now
    lines = ["ZEO monitor server version %s" % our_version(),
             time.ctime(now), ""]
    for name in sorted(server.storages):
        served = server.storages[name]
        status = served.status(server.watchdog_status())
        lines += ["Storage: %s" % name,
                  "Server started: %s" % status["start"],
                  "Clients: %d" % status["connections"],
                  "Clients verifying: 0",
                  "Active transactions: %d" % status["active_txns"]]
        if status["lock_time"] is not None:
            lines.append("Commit lock held for: %d"
                         % int(now - status["lock_time"]))
        lines += ["Commits: %d" % status["commits"],
                  "Aborts: %d" % status["aborts"],
                  "Loads: %d" % status["loads"],
                  "Stores: %d" % status["stores"],
                  "Conflicts: %d" % status["conflicts"],
                  "Conflicts resolved: %d" % status["conflicts_resolved"],
                  ""]
    return "\n".join(lines) + "\n"


class MonitorServer:
    """Listens on `address` in one named thread; answers each connection
    with `report(server)`."""

    def __init__(self, address, server):
        self._server = server
        self._address = address
        if isinstance(address, str):
            remove_stale_socket(address)
            self._socket = socket.socket(socket.AF_UNIX)
        else:
            self._socket = socket.socket(socket.AF_INET)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(address)
        self._socket.listen(16)
        self.address = self._socket.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve,
                                        name="zeo-monitor", daemon=True)
        logger.info("monitor server on %s", format_address(self.address))

    def start(self):
        self._thread.start()

    def _serve(self):
        self._socket.settimeout(0.2)
        while not self._stop.is_set():
            try:
                peer, _address = self._socket.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with peer:
                peer.settimeout(_SEND_TIMEOUT)
                try:
                    peer.sendall(report(self._server).encode("ascii"))
                except OSError as error:
                    logger.info("monitor client dropped: %s", error)

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
