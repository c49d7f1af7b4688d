"""The storage server: storages, listener, watchdog, monitor, shutdown."""

import logging
import os
import threading

from zeo import wire
from zeo.rpc import DEFAULT_OUTBOX_LIMIT
from zeo.server import fd_limit, free_threading
from zeo.server.busy_poll import DEFAULT_WINDOW, BusyPolling
from zeo.server.conflict_globals import DEFAULT_TRUSTED_MODULES, TrustedGlobals
from zeo.server.limits import ConnectionGuard, NetworkLimits
from zeo.server.listener import format_address, make_listener
from zeo.server.mvcc import DEFAULT_POLL_INTERVAL, DatabasePoller
from zeo.server.slow_log import SlowLog
from zeo.server.storage import ServedStorage

logger = logging.getLogger("zeo.server")

#: Seconds (the `tcp-keepalive` key's default).
DEFAULT_TCP_KEEPALIVE = 60


class StorageServer:
    """Serves named ZODB storages to ZEO clients.

    The constructor opens nothing but the listening socket (so `address`
    holds the real bound address, port 0 resolved); `start` begins
    accepting, `serve_forever` starts and blocks until `close`.  `limits`
    (a `NetworkLimits`; its defaults if None) bounds what clients may make
    the server hold: connections, time to register, frame size, and the
    mode of a Unix socket file.  `conflict_resolution_modules` names the
    packages whose classes may resolve conflicts on the server (see
    `zeo.server.conflict_globals`).
    """

    def __init__(self, address, storages, read_only=False,
                 invalidation_queue_size=100, invalidation_age=None,
                 transaction_timeout=None, client_conflict_resolution=False,
                 msgpack=None, monitor_address=None,
                 outbox_limit=DEFAULT_OUTBOX_LIMIT, limits=None,
                 busy_poll=DEFAULT_WINDOW, metrics_address=None,
                 slow_transaction_threshold=None, slow_load_threshold=None,
                 tcp_keepalive=DEFAULT_TCP_KEEPALIVE, tls=None,
                 poll_interval=DEFAULT_POLL_INTERVAL,
                 conflict_resolution_modules=DEFAULT_TRUSTED_MODULES):
        if msgpack is None:
            msgpack = bool(os.environ.get("ZEO_MSGPACK"))
        if msgpack and not wire.msgpack_available():
            raise ValueError("msgpack is enabled but the msgpack package "
                             "is not installed")
        self.read_only = bool(read_only)
        #: A `zeo.tls.ServerTLS`: every connection is TLS (None: none is).
        self.tls = tls
        self.protocol = (wire.MSGPACK_PROTOCOL if msgpack
                         else wire.PICKLE_PROTOCOL)
        self.outbox_limit = outbox_limit
        self.guard = ConnectionGuard(limits or NetworkLimits())
        self.busy_polling = BusyPolling(busy_poll)
        self.transaction_timeout = transaction_timeout
        self.slow_log = SlowLog(slow_transaction_threshold,
                                slow_load_threshold)
        #: Seconds after which a TCP client that acknowledges nothing is
        #: dropped (see `zeo.server.listener.set_keepalive`).
        self.tcp_keepalive = tcp_keepalive
        self.storages = {}
        trusted_globals = TrustedGlobals(conflict_resolution_modules)
        if not client_conflict_resolution:
            logger.info("conflicts are resolved with classes from: %s",
                        " ".join(trusted_globals.modules) or "nothing")
        for name, storage in storages.items():
            served = ServedStorage(
                name, storage, read_only=self.read_only,
                invalidation_queue_size=invalidation_queue_size,
                invalidation_age=invalidation_age,
                client_conflict_resolution=client_conflict_resolution,
                trusted_globals=trusted_globals)
            self.storages[name] = served
        self._workers = []
        self._workers_lock = threading.Lock()
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._accepting = None
        self._listener = make_listener(address, self)
        self.address = self._listener.server_address
        for served in self.storages.values():
            served.storage.registerDB(_StorageEvents(served))
        #: Polls the database of IMVCCStorages for others' commits.
        self._poller = DatabasePoller(self.storages.values(), poll_interval)
        self._watchdog = None
        if transaction_timeout:
            from zeo.server.watchdog import TransactionWatchdog
            self._watchdog = TransactionWatchdog(self.storages.values(),
                                                 transaction_timeout)
        self.monitor = None
        if monitor_address is not None:
            from zeo.server.monitor import MonitorServer
            self.monitor = MonitorServer(monitor_address, self)
        self.metrics = None
        if metrics_address is not None:
            from zeo.server.metrics import MetricsServer
            self.metrics = MetricsServer(metrics_address, self)
        logger.info("storages %s", ", ".join(
            "%s (%s%s)" % (name, served.storage.getName(),
                           ", read-only" if served.read_only else "")
            for name, served in self.storages.items()))
        #: Clients the file descriptor limit leaves room for (None: no
        #: limit known).
        self.client_capacity = fd_limit.raise_and_report(
            self.guard.limits.max_connections)
        logger.info("listening on %s%s", format_address(self.address),
                    " (TLS)" if tls is not None else "")
        #: Extension modules loaded and not checked for running without
        #: the GIL, when it is off (logged at start).
        self.unchecked_extensions = free_threading.check_at_start()

    def start(self):
        """Begin accepting connections in a background thread."""
        with self._close_lock:
            if self._accepting is not None or self._closed.is_set():
                return
            self._start_threads()

    def _start_threads(self):
        self.guard.start()
        if self._watchdog is not None:
            self._watchdog.start()
        self._poller.start()
        if self.monitor is not None:
            self.monitor.start()
        if self.metrics is not None:
            self.metrics.start()
        self._accepting = threading.Thread(
            target=self._listener.serve_forever, kwargs={"poll_interval": 0.2},
            name="zeo-accept-%s" % format_address(self.address), daemon=True)
        self._accepting.start()

    def serve_forever(self):
        self.start()
        self._closed.wait()

    # -- used by sessions ----------------------------------------------------

    def connection_count(self):
        return self._listener.connection_count()

    def watchdog_status(self):
        if self._watchdog is None:
            return "stub"
        return self._watchdog.is_alive()

    def ruok(self):
        status = self.watchdog_status()
        return {name: served.status(status)
                for name, served in self.storages.items()}

    def traffic(self):
        """`(bytes received, bytes queued to send, open connections)`."""
        return self._listener.traffic()

    def start_worker(self, name, function):
        """Run slow work (pack) in a named thread that close() joins."""
        thread = threading.Thread(target=function, name="zeo-%s" % name,
                                  daemon=True)
        with self._workers_lock:
            self._workers = [t for t in self._workers if t.is_alive()]
            self._workers.append(thread)
        thread.start()

    # -- shutdown -----------------------------------------------------------

    def close(self):
        """Stop accepting, end every connection (aborting what they had in
        progress), wait for workers, close the storages.  Idempotent."""
        with self._close_lock:
            if self._closed.is_set():
                return
            logger.info("shutting down")
            if self._accepting is not None:
                self._listener.shutdown()
                self._accepting.join()
            self._listener.server_close()
            if self.monitor is not None:
                self.monitor.close()
            if self.metrics is not None:
                self.metrics.close()
            self._listener.close_connections()
            self.guard.stop()
            if self._watchdog is not None:
                self._watchdog.stop()
            self._poller.stop()
            with self._workers_lock:
                workers = list(self._workers)
            for thread in workers:
                thread.join()
            for name, served in self.storages.items():
                try:
                    served.close()
                except Exception:
                    logger.exception("closing storage %s failed", name)
            logger.info("closed")
            self._closed.set()


class _StorageEvents:
    """What a served storage sees as its database.

    A storage that is itself a client of another server (or otherwise
    learns of foreign commits) reports them here; we pass them on to our
    own clients like any commit.
    """

    def __init__(self, served):
        self._served = served

    def invalidate(self, tid, oids, version=""):
        self._served.publish_foreign_commit(tid, list(oids))

    def invalidateCache(self):
        self._served.invalidate_all()

    def transform_record_data(self, data):
        return data

    def untransform_record_data(self, data):
        return data


