"""A private PostgreSQL cluster for tests and benches.

`PostgresCluster` runs Debian's PostgreSQL binaries on a cluster of its
own: ``initdb`` into a temporary directory, the server on a free port of
127.0.0.1 (and a Unix socket in that directory), stopped by PID at the
end.  Never a system service: nothing outside the directory is touched.

PostgreSQL refuses to run as root, so when we are root the cluster
belongs to the ``postgres`` system user (created by Debian's package) and
its processes run as that user; otherwise they run as we do.

`database()` creates a fresh database for one test and drops it after.
"""

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from server_process import free_port

#: Where Debian installs the server binaries, newest version last.
BINARY_GLOB = "/usr/lib/postgresql/*/bin"

#: The superuser initdb creates; trusted from 127.0.0.1 only.
SUPERUSER = "postgres"

#: Upper bound for the server to start or stop.
START_TIMEOUT = 60

#: Durability off: tests need speed, not crash safety.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "max_prepared_transactions": "0",
}


def binary_directory():
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob(BINARY_GLOB),
                   key=lambda path: _version_key(path.split("/")[-2]))
    return found[-1] if found else None


def _version_key(text):
    return tuple(int(part) if part.isdigit() else 0
                 for part in text.split("."))


def _run_as():
    """The user the cluster's processes run as: ourselves, or postgres
    when we are root (which PostgreSQL refuses)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise RuntimeError(
            "running as root, and there is no %r user to run PostgreSQL "
            "as (apt-get install postgresql creates it)" % SUPERUSER) from None


class PostgresCluster:
    """A running private cluster; `stop()` (or the context) ends it."""

    def __init__(self):
        bin_dir = binary_directory()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL is not installed (no %s); apt-get install "
                "postgresql" % BINARY_GLOB)
        self._bin = bin_dir
        self._user = _run_as()
        self.directory = tempfile.mkdtemp(prefix="zeo-pg-")
        self.data = os.path.join(self.directory, "data")
        self.port = free_port()
        self.host = "127.0.0.1"
        self._names = itertools.count()
        self._templates = set()
        self.process = None
        try:
            self._init()
            self._start()
        except BaseException:
            self.stop()
            raise

    def _popen_options(self):
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid,
                "extra_groups": []}

    def _init(self):
        if self._user is not None:
            os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        subprocess.run(
            [os.path.join(self._bin, "initdb"), "-D", self.data,
             "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync",
             "--locale", "C"],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=self.directory,
            **self._popen_options())

    def _start(self):
        arguments = [os.path.join(self._bin, "postgres"), "-D", self.data,
                     "-p", str(self.port), "-k", self.directory]
        for key, value in SERVER_SETTINGS.items():
            arguments += ["-c", "%s=%s" % (key, value)]
        self._log = open(os.path.join(self.directory, "server.log"), "wb")
        self.process = subprocess.Popen(
            arguments, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=self.directory,
            **self._popen_options())
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError("PostgreSQL exited with status %s:\n%s"
                                   % (self.process.returncode, self.log))
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start in %ss:\n%s"
                                   % (START_TIMEOUT, self.log))
            time.sleep(0.1)

    def _ready(self):
        return subprocess.run(
            [os.path.join(self._bin, "pg_isready"), "-q", "-h", self.host,
             "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL).returncode == 0

    @property
    def log(self):
        try:
            with open(os.path.join(self.directory, "server.log")) as log:
                return log.read()
        except OSError:
            return ""

    def dsn(self, dbname):
        return "host=%s port=%d user=%s dbname=%s" % (
            self.host, self.port, SUPERUSER, dbname)

    def execute(self, statement):
        """Run one statement as the superuser, outside a transaction."""
        import psycopg2
        connection = psycopg2.connect(self.dsn("postgres"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def create_database(self, template=None):
        """A new database's name; a copy of `template` if given (cheaper
        than creating RelStorage's schema again)."""
        name = "zeo_test_%d" % next(self._names)
        self.execute("CREATE DATABASE %s%s" % (
            name, "" if template is None else " TEMPLATE %s" % template))
        return name

    def relstorage_template(self, keep_history):
        """A database holding RelStorage's empty schema, made once, to
        copy with `create_database(template=...)`."""
        name = "zeo_template_%s" % ("hp" if keep_history else "hf")
        if name not in self._templates:
            self.execute("CREATE DATABASE %s" % name)
            from relstorage.adapters.postgresql import PostgreSQLAdapter
            from relstorage.options import Options
            from relstorage.storage import RelStorage
            storage = RelStorage(PostgreSQLAdapter(
                dsn=self.dsn(name),
                options=Options(keep_history=keep_history)))
            storage.close()
            self._templates.add(name)
        return name

    def drop_database(self, name):
        self.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)

    @contextlib.contextmanager
    def database(self):
        """A fresh, empty database's name; dropped afterwards."""
        name = self.create_database()
        try:
            yield name
        finally:
            self.drop_database(name)

    def stop(self):
        """Fast shutdown by PID (SIGINT), SIGKILL if it hangs; remove the
        cluster's directory."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def relstorage_section(name, dsn, keep_history=True, extra=""):
    """A ``<relstorage>`` storage section for a server configuration."""
    return ("<relstorage %s>\n  keep-history %s\n%s\n"
            "  <postgresql>\n    dsn %s\n  </postgresql>\n</relstorage>"
            % (name, "true" if keep_history else "false", extra, dsn))
