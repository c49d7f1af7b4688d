"""Run a storage server: ``python -m zeo.runzeo``.

This module turns the options that `zeo.server_config` reads from a
command line and an optional ZConfig file into a running
`zeo.server.StorageServer`, and owns everything about the process around
it: logging (through `zeo.logfiles`), the PID file, signals and the exit
status.

A configuration the user must fix (a missing or malformed value, a storage
that cannot be opened, an address already in use) is reported as a single
``Error: ...`` line on standard error with exit status 2, because whoever
starts a server from a shell or a service manager needs the reason, not a
traceback.
"""

import logging
import os
import signal
import sys
import threading

from zeo import logfiles
from zeo.command_line import DISTRIBUTION, distribution_version
from zeo.server import StorageServer, memory
from zeo.server.unix_socket import remove_stale_socket
from zeo.server_config import (
    ConfigurationError, format_address, one_line, parse_options)

#: Named explicitly: run with -m, this module's __name__ is "__main__".
logger = logging.getLogger("zeo.runzeo")


#: Exit statuses.  SIGHUP exits with STOPPED_FOR_RESTART so that a process
#: supervisor that restarts on failure brings the server back up.
EXIT_OK = 0
EXIT_STOPPED_FOR_RESTART = 1
EXIT_CONFIGURATION_ERROR = 2

#: How long to wait for the serving thread once the server is closed.
SERVE_THREAD_JOIN_TIMEOUT = 60


def prepare_unix_socket(path):
    """Check a Unix socket path before any storage is opened: a stale
    socket file is removed, anything else there is a configuration error
    (see `remove_stale_socket`)."""
    try:
        remove_stale_socket(path)
    except OSError as error:
        raise ConfigurationError(str(error)) from None


def _close_storage_logging_errors(name, storage):
    """Close a storage the server never took over, whatever happens."""
    try:
        storage.close()
    except Exception:
        logger.exception("error closing storage %r", name)


class SignalPipe:
    """Carries signals, and the end of serving, to the main thread.

    The main thread sleeps in `wait` on a pipe, and the pipe is the
    interpreter's signal wakeup fd: the C-level handler writes each
    signal's number into it in whatever thread the kernel delivered the
    signal to.  A Python-level handler alone would not do: it runs only in
    the main thread and only between bytecodes, so a signal delivered to
    one of the server's threads would leave the main thread asleep in
    `read` forever.  Acting on the number in the main thread's ordinary
    context also means no lock is ever taken inside a signal handler,
    where the interrupted code might already hold it.
    """

    #: Written when the serving thread ends; no signal has number 0.
    SERVING_ENDED = 0

    def __init__(self):
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def catch(self, signums):
        """Route `signums` into the pipe (call from the main thread)."""
        for signum in signums:
            signal.signal(signum, _signal_number_is_in_the_pipe)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def notify(self, number):
        try:
            os.write(self._write_fd, bytes([number]))
        except BlockingIOError:
            # The pipe is full of earlier, still unread notifications;
            # the main thread wakes up anyway.
            pass

    def wait(self):
        """Block until a notification arrives; return its number."""
        return os.read(self._read_fd, 1)[0]

    def close(self):
        signal.set_wakeup_fd(-1)
        os.close(self._read_fd)
        os.close(self._write_fd)


def _signal_number_is_in_the_pipe(_signum, _frame):
    """Python-level handler of the signals `SignalPipe` catches.

    Installing it is what makes the interpreter catch the signal (and
    write it to the wakeup fd) instead of taking the default action; the
    work happens in the main thread once `SignalPipe.wait` returns.
    """


STOPPING_SIGNALS = {
    signal.SIGTERM: EXIT_OK,
    signal.SIGINT: EXIT_OK,
    signal.SIGHUP: EXIT_STOPPED_FOR_RESTART,
}


class ServerRunner:
    """Runs one server for the life of the process."""

    def __init__(self, options):
        self.options = options
        self._signals = SignalPipe()
        self._storages = {}
        self._server = None
        self._pid_written = False
        self._serving_failed = False

    def run(self):
        """Serve until stopped; return the process exit status."""
        try:
            return self._run()
        finally:
            self._shut_down()
            self._signals.close()

    def _run(self):
        try:
            logfiles.configure(self.options.eventlog)
        except OSError as error:
            raise ConfigurationError(
                "cannot open a log file: %s" % error) from None
        self._install_signal_handlers()
        logger.info("%s %s starting (pid %d)", DISTRIBUTION,
                    distribution_version(), os.getpid())
        memory.limit_malloc_arenas()
        for address in (self.options.address, self.options.monitor_address):
            if isinstance(address, str):
                prepare_unix_socket(address)
        self._open_storages()
        # Before the port opens: whoever sees the server answer can count
        # on the pid file (it is removed again if binding fails).
        self._write_pid_file()
        self._server = self._create_server()
        serving = threading.Thread(
            target=self._serve, name="zeo-serve-forever", daemon=True)
        serving.start()
        status = self._wait_for_stop()
        self._shut_down()
        serving.join(SERVE_THREAD_JOIN_TIMEOUT)
        if serving.is_alive():
            logger.error("the server did not stop serving within %ss",
                         SERVE_THREAD_JOIN_TIMEOUT)
        logger.info("stopped")
        return status

    def _install_signal_handlers(self):
        if hasattr(signal, "SIGXFSZ"):
            # Writing past the file size limit must fail with an error the
            # storage reports, not kill the process mid-transaction.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self._signals.catch(list(STOPPING_SIGNALS) + [signal.SIGUSR2])

    def _open_storages(self):
        for opener in self.options.storages:
            logger.info("opening storage %r", opener.name)
            try:
                storage = opener.open()
            except Exception as error:
                raise ConfigurationError(
                    "cannot open storage %r: %s: %s"
                    % (opener.name, type(error).__name__,
                       one_line(error))) from None
            self._storages[opener.name] = storage
            logger.info("opened storage %r: %s", opener.name,
                        storage.getName())

    def _create_server(self):
        options = self.options
        try:
            return StorageServer(
                options.address, self._storages,
                read_only=options.read_only,
                invalidation_queue_size=options.invalidation_queue_size,
                invalidation_age=options.invalidation_age,
                transaction_timeout=options.transaction_timeout,
                client_conflict_resolution=(
                    options.client_conflict_resolution),
                conflict_resolution_modules=(
                    options.conflict_resolution_modules),
                msgpack=options.msgpack,
                monitor_address=options.monitor_address,
                metrics_address=options.metrics_address,
                slow_transaction_threshold=(
                    options.slow_transaction_threshold),
                slow_load_threshold=options.slow_load_threshold,
                limits=options.limits,
                busy_poll=options.busy_poll_microseconds * 1e-6,
                tcp_keepalive=options.tcp_keepalive, tls=options.tls,
                poll_interval=options.poll_interval)
        except OSError as error:
            raise ConfigurationError(
                "cannot listen on %s: %s"
                % (self._addresses_text(), error.strerror or error)) from None

    def _addresses_text(self):
        text = format_address(self.options.address)
        if self.options.monitor_address is not None:
            text += " (monitor %s)" % format_address(
                self.options.monitor_address)
        if self.options.metrics_address is not None:
            text += " (metrics %s)" % format_address(
                self.options.metrics_address)
        return text

    def _write_pid_file(self):
        path = self.options.pid_filename
        if path is None:
            return
        try:
            with open(path, "w") as pid_file:
                pid_file.write("%d\n" % os.getpid())
        except OSError as error:
            raise ConfigurationError(
                "cannot write the pid file %s: %s"
                % (path, error.strerror or error)) from None
        self._pid_written = True

    def _remove_pid_file(self):
        """Remove the pid file, unless another process has taken it over."""
        path = self.options.pid_filename
        try:
            with open(path) as pid_file:
                if pid_file.read().strip() != str(os.getpid()):
                    return
            os.unlink(path)
        except OSError as error:
            logger.warning("cannot remove the pid file %s: %s", path, error)

    def _serve(self):
        try:
            self._server.serve_forever()
        except Exception:
            logger.exception("the server stopped serving on an error")
            self._serving_failed = True
        finally:
            self._signals.notify(SignalPipe.SERVING_ENDED)

    def _wait_for_stop(self):
        while True:
            number = self._signals.wait()
            if number == SignalPipe.SERVING_ENDED:
                if not self._serving_failed:
                    logger.error("the server stopped serving unexpectedly")
                return EXIT_STOPPED_FOR_RESTART
            if number == signal.SIGUSR2:
                logger.info("reopened the log files (%d switched)",
                            logfiles.reopen_log_files())
                continue
            logger.info("received %s; stopping",
                        signal.Signals(number).name)
            return STOPPING_SIGNALS[number]

    def _shut_down(self):
        """Close the server (or the storages it never got), then clean up.

        Safe to call more than once and after a failed start-up.
        """
        server, self._server = self._server, None
        storages, self._storages = self._storages, {}
        if server is not None:
            server.close()
        else:
            for name, storage in storages.items():
                _close_storage_logging_errors(name, storage)
        if self._pid_written:
            self._remove_pid_file()
            self._pid_written = False


def main(argv=None):
    """Run the server from a command line; return the exit status."""
    try:
        options = parse_options(argv)
        return ServerRunner(options).run()
    except ConfigurationError as error:
        print("Error: %s" % one_line(error), file=sys.stderr)
        return EXIT_CONFIGURATION_ERROR


if __name__ == "__main__":
    sys.exit(main())
