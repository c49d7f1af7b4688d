"""Start a real server process the way users start it, for tests and benches.

`ServerProcess` runs ``python -m zeo.runzeo`` (ours) or ``python -m
ZEO.runzeo`` (the real ZEO, the peer we compare against) in a subprocess,
waits until it accepts connections, and stops it by PID.
"""

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

OURS = "zeo"
THEIRS = "ZEO"

_LISTENING = re.compile(r"listening on (\S+)")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid, field):
    """A memory figure of process `pid` from /proc/PID/status, in KiB:
    "VmRSS" (resident now), "VmHWM" (the peak), ..."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


#: Safety net: a server that tries to honour an absurd length or expand a
#: reference bomb hits this cap instead of taking the machine down.
SERVER_MEMORY_CAP = 2 * 1024 ** 3


def cap_memory(pid, cap=SERVER_MEMORY_CAP):
    """Limit process `pid`'s data memory, so a runaway allocation fails
    fast."""
    resource.prlimit(pid, resource.RLIMIT_DATA, (cap, cap))


def reset_peak_memory(pid):
    """Make process `pid`'s VmHWM start again from its RSS now."""
    with open("/proc/%d/clear_refs" % pid, "w") as clear_refs:
        clear_refs.write("5")


def write_config(directory, zeo_options="", storages=None, impl=OURS):
    """Write a server config file; return its path.

    `storages` maps storage names to their section bodies; the default is one
    FileStorage named "1" in `directory`.
    """
    if storages is None:
        storages = {"1": "<filestorage 1>\n  path %s\n</filestorage>"
                    % os.path.join(directory, "Data.fs")}
    text = "<zeo>\n%s\n</zeo>\n\n%s\n" % (
        zeo_options, "\n\n".join(storages.values()))
    path = os.path.join(directory, "zeo-%s.conf" % impl)
    with open(path, "w") as config:
        config.write(text)
    return path


class ServerProcess:
    """A server subprocess.

    `args` are the runzeo arguments after ``-m zeo.runzeo`` (or after
    `command`, another way to start it, e.g. an installed console script).
    For our server the address is taken from the "listening on" log line,
    so ``-a 127.0.0.1:0`` works; for the real ZEO pass a fixed port.
    """

    def __init__(self, args, impl=OURS, address=None, env=None,
                 start_timeout=30, command=None):
        self.impl = impl
        self.args = list(args)
        self.address = address
        self.log_lines = []
        #: time.monotonic() when the "listening on" log line was read.
        self.listening_at = None
        self._listening = threading.Event()
        self._log_lock = threading.Lock()
        environment = dict(os.environ)
        environment.update(env or {})
        self.process = subprocess.Popen(
            (command or [sys.executable, "-m", "%s.runzeo" % impl])
            + self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environment,
            text=True,
        )
        self._reader = threading.Thread(
            target=self._read_log, name="server-log-reader-%d"
            % self.process.pid, daemon=True)
        self._reader.start()
        self._wait_until_serving(start_timeout)

    def _read_log(self):
        for line in self.process.stderr:
            with self._log_lock:
                self.log_lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and self.listening_at is None:
                self.listening_at = time.monotonic()
            if match and self.address is None:
                self.address = parse_address(match.group(1))
                self._listening.set()

    @property
    def log(self):
        with self._log_lock:
            return "\n".join(self.log_lines)

    def _wait_until_serving(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(
                    "server exited with status %s:\n%s"
                    % (self.process.returncode, self.log))
            if self.address is not None and _accepts(self.address):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start in %ss:\n%s"
                           % (timeout, self.log))

    def signal(self, signum):
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self, timeout=30):
        """SIGTERM, wait; SIGKILL if it does not exit.  Returns the status."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        return self.process.returncode

    def kill(self):
        self.process.kill()
        self.process.wait()
        self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def stop_all(servers):
    """Stop `servers` (SIGTERM) and return their exit statuses.

    Each server's log is printed, so a test that fails on a status (or
    anything else) shows what the server said.
    """
    statuses = []
    for server in servers:
        statuses.append(server.stop())
        print("---- log of %s server (pid %d, exit status %s) ----\n%s"
              % (server.impl, server.process.pid, statuses[-1], server.log))
    return statuses


def parse_address(text):
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    return (host, int(port))


def _accepts(address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(1)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


def start_filestorage_server(directory, impl=OURS, extra_args=()):
    """Serve one FileStorage `directory`/Data.fs on a loopback port."""
    path = os.path.join(directory, "Data.fs")
    if impl == OURS:
        address, known = "127.0.0.1:0", None
    else:
        port = free_port()
        address, known = "127.0.0.1:%d" % port, ("127.0.0.1", port)
    return ServerProcess(["-a", address, "-f", path] + list(extra_args),
                         impl=impl, address=known)


def temporary_directory():
    return tempfile.TemporaryDirectory(prefix="zeo-test-")


#: Environment variable choosing the server under test: "zeo" (ours, the
#: default) or "ZEO" (the real ZEO, to validate a test against the reference).
SERVER_ENVIRONMENT_VARIABLE = "ZEO_TEST_SERVER"


def impl_from_environment():
    """The server implementation the tests should start (OURS or THEIRS)."""
    impl = os.environ.get(SERVER_ENVIRONMENT_VARIABLE, OURS)
    if impl not in (OURS, THEIRS):
        raise ValueError("%s must be %r or %r, not %r" % (
            SERVER_ENVIRONMENT_VARIABLE, OURS, THEIRS, impl))
    return impl


def trusting_zodb_test_classes(impl):
    """The ``<zeo>`` line that lets our server resolve conflicts with the
    classes of ZODB's conformance suites (``ZODB.tests.ConflictResolution``
    and its MinPO values); the real ZEO resolves with anything importable."""
    if impl == OURS:
        return "conflict-resolution-modules BTrees persistent ZODB.tests"
    return ""


def start_configured_server(directory, zeo_options="", storages=None,
                            impl=OURS, env=None):
    """Start a server from a config file written into `directory`.

    `zeo_options` are extra lines for the ``<zeo>`` section; the address is
    added here (port 0 for ours, a free fixed port for the real ZEO).
    `storages` is as for `write_config`.
    """
    if impl == OURS:
        address, known = "127.0.0.1:0", None
    else:
        port = free_port()
        address, known = "127.0.0.1:%d" % port, ("127.0.0.1", port)
    options = "address %s\n%s" % (address, zeo_options)
    path = write_config(directory, options, storages, impl)
    return ServerProcess(["-C", path], impl=impl, address=known, env=env)
