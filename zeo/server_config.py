"""From a command line and a configuration file to `ServerOptions`.

`parse_options` merges the two: the command line's flags override the
configuration file (``-C``, a ZConfig file described by ``schema.xml``),
and every value is checked here, so that `zeo.runzeo` starts a server
only from options it can use.  Anything the user must fix raises
`ConfigurationError`, which runzeo reports as one ``Error:`` line.
"""

import argparse
import dataclasses
import os
import re
import socket
import typing

import ZConfig
import ZConfig.datatypes
import ZODB.FileStorage

from zeo import server_options, wire
from zeo.command_line import (
    DISTRIBUTION, add_version_option, program_name)
from zeo.server import busy_poll
from zeo.server.conflict_globals import DEFAULT_TRUSTED_MODULES
from zeo.server.limits import NetworkLimits
from zeo.server.metrics import import_prometheus_client
from zeo.server.mvcc import DEFAULT_POLL_INTERVAL
from zeo.server.server import DEFAULT_TCP_KEEPALIVE
from zeo.server_options import seconds, whole_number

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "schema.xml")
DEFAULT_STORAGE_NAME = "1"

DESCRIPTION = """\
Serve ZODB storages to ZEO clients.

Either give a configuration file with -C, or at least an address (-a) and
one FileStorage (-f).  Options given on the command line override the
values of the configuration file; -f replaces all of its storages.
"""

EPILOG = """\
Addresses: HOST:PORT listens on one interface, PORT on all of them, and a
value containing "/" is a Unix socket path.  Port 0 picks a free port; the
"listening on" log line shows which.

Signals: SIGTERM and SIGINT stop the server (exit status 0), SIGHUP stops
it with exit status 1 (for supervisors that restart on failure), SIGUSR2
reopens the log files configured in <eventlog>.  Configuration errors exit
with status 2.
"""


class ConfigurationError(Exception):
    """A problem with the command line or configuration file.

    Reported to the user as one ``Error:`` line, never as a traceback.
    """


def parse_address(text):
    """Convert an address as the user writes it to what the server binds.

    ``HOST:PORT`` gives ``(HOST, PORT)``, a bare ``PORT`` gives ``("",
    PORT)`` (all interfaces) and anything containing "/" is a Unix socket
    path.  Raises ValueError with a message meant for the user.
    """
    try:
        parsed = ZConfig.datatypes.SocketBindingAddress(text)
    except ValueError as error:
        if _has_bad_port(text):
            error = "the port must be a number from 0 to 65535"
        raise ValueError("invalid address %r: %s" % (text, error)) from None
    return address_from_config(parsed, text)


def _has_bad_port(text):
    """Whether the port part of a HOST:PORT or PORT address is malformed."""
    port = text.rpartition(":")[2]
    return not (port.isdigit() and int(port) <= 0xFFFF)


def address_from_config(parsed, text=None):
    """The server address for a ZConfig ``socket-binding-address`` value."""
    if parsed.family == getattr(socket, "AF_UNIX", None):
        return parsed.address
    host, port = parsed.address
    if port is None:
        raise ValueError(
            "address %r has no port; give HOST:PORT or PORT (port 0 lets "
            "the system choose a free one)" % (text or host))
    return host, port


def format_address(address):
    """An address as log lines and error messages show it."""
    if isinstance(address, str):
        return address
    host, port = address[:2]
    if ":" in host:
        return "[%s]:%s" % (host, port)
    return "%s:%s" % (host, port)


class FileStorageOpener:
    """Opens the FileStorage of a ``-f`` option.

    It has the ``name`` and ``open()`` of ZODB's configured storages, so
    storages from the command line and from a configuration file are
    handled alike.
    """

    def __init__(self, name, path):
        self.name = name
        self.path = path

    def open(self):
        return ZODB.FileStorage.FileStorage(self.path)


@dataclasses.dataclass
class ServerOptions:
    """Everything needed to run a server, after merging all sources."""

    address: typing.Union[str, tuple]
    storages: list
    read_only: bool = False
    invalidation_queue_size: int = 100
    invalidation_age: typing.Optional[float] = None
    transaction_timeout: typing.Optional[float] = None
    monitor_address: typing.Union[str, tuple, None] = None
    metrics_address: typing.Optional[tuple] = None
    slow_transaction_threshold: typing.Optional[float] = None
    slow_load_threshold: typing.Optional[float] = None
    pid_filename: typing.Optional[str] = None
    client_conflict_resolution: bool = False
    conflict_resolution_modules: tuple = DEFAULT_TRUSTED_MODULES
    msgpack: bool = False
    busy_poll_microseconds: int = busy_poll.DEFAULT_MICROSECONDS
    tcp_keepalive: float = DEFAULT_TCP_KEEPALIVE
    #: A `zeo.tls.ServerTLS` when the configuration has an <ssl> section.
    tls: typing.Optional[object] = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    eventlog: typing.Optional[typing.Callable] = None
    limits: NetworkLimits = dataclasses.field(default_factory=NetworkLimits)
    monitor_allow_remote: bool = False


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing and exiting.

    argparse's own error output is several lines long and exits by itself;
    we want the single ``Error:`` line that every other configuration
    problem gets.
    """

    def error(self, message):
        raise ConfigurationError("%s (see --help)" % message)


def _argument_type(convert):
    """Wrap a converter so argparse shows its ValueError message."""
    def converter(text):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return converter


def build_argument_parser():
    parser = _ArgumentParser(
        prog=program_name("zeo.runzeo"), description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    parser.add_argument(
        "-C", "--configure", metavar="FILE",
        help="configuration file (or URL) with a <zeo> section, storage "
             "sections and optionally an <eventlog> section")
    parser.add_argument(
        "-a", "--address", metavar="ADDR", type=_argument_type(parse_address),
        help="where to listen: HOST:PORT, PORT or a Unix socket path")
    parser.add_argument(
        "-f", "--filename", metavar="FILE", action="append", default=[],
        help="serve the FileStorage in FILE (created if missing); repeat "
             "for several storages, named 1, 2, ... in order")
    parser.add_argument(
        "-r", "--read-only", action="store_true",
        help="refuse every commit")
    parser.add_argument(
        "-t", "--timeout", metavar="SECONDS",
        type=_argument_type(seconds),
        help="abort a transaction that holds a commit lock longer than this")
    parser.add_argument(
        "--invalidation-queue-size", metavar="N",
        type=_argument_type(whole_number),
        help="recent transactions remembered per storage for reconnecting "
             "clients (default 100)")
    parser.add_argument(
        "-m", "--monitor-address", metavar="ADDR",
        type=_argument_type(parse_address),
        help="also serve a plain-text statistics report at ADDR")
    parser.add_argument(
        "--metrics-address", metavar="HOST:PORT",
        type=_argument_type(parse_address),
        help="also answer Prometheus scrapes (GET /metrics) at HOST:PORT")
    parser.add_argument(
        "--busy-poll", metavar="MICROSECONDS",
        type=_argument_type(whole_number),
        help="how long a connection polls for its client's next message "
             "before sleeping (default %d; 0 turns polling off)"
             % busy_poll.DEFAULT_MICROSECONDS)
    parser.add_argument(
        "--pid-file", metavar="PATH",
        type=_argument_type(ZConfig.datatypes.existing_dirpath),
        help="write the process id to PATH while serving")
    add_version_option(parser)
    return parser


def one_line(text):
    return " ".join(str(text).split())


def load_config_file(url):
    """Load a server configuration file; ConfigurationError if it is bad."""
    if "://" not in url and not os.path.exists(url):
        raise ConfigurationError(
            "the configuration file %s does not exist" % url)
    try:
        schema = ZConfig.loadSchema(SCHEMA_PATH)
        config, _handlers = ZConfig.loadConfig(schema, url)
    except ZConfig.DataConversionError as error:
        raise ConfigurationError(
            "%s: invalid value %r: %s (line %s)"
            % (url, error.value, error.message, error.lineno)) from None
    except ZConfig.ConfigurationError as error:
        _raise_if_extra_missing(url, error)
        if url in str(error):
            raise ConfigurationError(str(error)) from None
        raise ConfigurationError("%s: %s" % (url, error)) from None
    return config


#: Packages a configuration may ``%import`` that come with an extra of
#: ours: package -> extra.
OPTIONAL_PACKAGES = {"relstorage": "relstorage"}

_MISSING_PACKAGE = re.compile(
    r"could not load package ([\w.]+): (.*?)(?: Package name:|$)", re.S)


def _raise_if_extra_missing(url, error):
    """A missing optional package gets the pip command that installs it."""
    match = _MISSING_PACKAGE.search(str(error))
    if match and match.group(1) in OPTIONAL_PACKAGES:
        package, reason = match.groups()
        raise ConfigurationError(
            "%s: %%import %s failed (%s); install it with: pip install "
            "'%s[%s]'" % (url, package, reason.strip(), DISTRIBUTION,
                          OPTIONAL_PACKAGES[package])) from None


def msgpack_from_environment():
    """The encoding default, as with ZEO: msgpack if ZEO_MSGPACK is set."""
    return bool(os.environ.get("ZEO_MSGPACK"))


def _named_storages(openers):
    """Give the unnamed storage section its name, "1", checking the rules.

    At most one section may be unnamed, and then none may be named "1".
    """
    unnamed = [opener for opener in openers if opener.name is None]
    if len(unnamed) > 1:
        raise ConfigurationError("only one storage section may be unnamed")
    if unnamed:
        if any(opener.name == DEFAULT_STORAGE_NAME for opener in openers):
            raise ConfigurationError(
                "an unnamed storage section is served as %r, so no other "
                "storage section may be named %r"
                % (DEFAULT_STORAGE_NAME, DEFAULT_STORAGE_NAME))
        unnamed[0].name = DEFAULT_STORAGE_NAME
    return openers


def _address_or_error(parsed, what):
    try:
        return address_from_config(parsed)
    except ValueError as error:
        raise ConfigurationError("%s: %s" % (what, error)) from None


def _tcp_address_or_error(parsed, what):
    address = _address_or_error(parsed, what)
    if isinstance(address, str):
        raise ConfigurationError("%s must be HOST:PORT, not a Unix socket "
                                 "path" % what)
    return address


def _options_from_config(config):
    section = config.zeo
    msgpack = section.msgpack
    if msgpack is None:
        msgpack = msgpack_from_environment()
    monitor_address = None
    if section.monitor_address is not None:
        monitor_address = _address_or_error(
            section.monitor_address, "monitor-address")
    metrics_address = None
    if section.metrics_address is not None:
        metrics_address = _tcp_address_or_error(
            section.metrics_address, "metrics-address")
    return ServerOptions(
        address=_address_or_error(section.address, "address"),
        storages=_named_storages(list(config.storages)),
        read_only=section.read_only,
        invalidation_queue_size=section.invalidation_queue_size,
        invalidation_age=section.invalidation_age,
        transaction_timeout=section.transaction_timeout,
        monitor_address=monitor_address,
        metrics_address=metrics_address,
        slow_transaction_threshold=section.slow_transaction_threshold,
        slow_load_threshold=section.slow_load_threshold,
        pid_filename=section.pid_filename,
        client_conflict_resolution=section.client_conflict_resolution,
        conflict_resolution_modules=tuple(
            section.conflict_resolution_modules),
        msgpack=msgpack,
        busy_poll_microseconds=section.busy_poll,
        tcp_keepalive=section.tcp_keepalive,
        tls=_tls_or_error(section.ssl),
        poll_interval=section.poll_interval,
        eventlog=config.eventlog,
        limits=server_options.limits_from_config(section),
        monitor_allow_remote=section.monitor_allow_remote,
    )


def _tls_or_error(section):
    """The server's TLS from its <ssl> section (None without one); its
    files are read now, so a bad one stops the start with one line."""
    if section is None:
        return None
    from zeo import tls
    try:
        return tls.ServerTLS.from_config(section)
    except tls.TLSConfigError as error:
        raise ConfigurationError(str(error)) from None


def parse_options(argv=None):
    """Merge the command line and the configuration file it names.

    Raises ConfigurationError for anything the user must fix; -h and
    --version exit here, as users expect.
    """
    arguments = build_argument_parser().parse_args(argv)
    if arguments.configure is not None:
        options = _options_from_config(load_config_file(arguments.configure))
    else:
        if arguments.address is None:
            raise ConfigurationError(
                "no address to listen on; use -a or -C (see --help)")
        if not arguments.filename:
            raise ConfigurationError(
                "no storages to serve; use -f or -C (see --help)")
        options = ServerOptions(
            address=arguments.address, storages=[],
            msgpack=msgpack_from_environment())
    if arguments.address is not None:
        options.address = arguments.address
    if arguments.filename:
        options.storages = [
            FileStorageOpener(str(number), path)
            for number, path in enumerate(arguments.filename, 1)]
    if arguments.read_only:
        options.read_only = True
    if arguments.timeout is not None:
        options.transaction_timeout = arguments.timeout
    if arguments.invalidation_queue_size is not None:
        options.invalidation_queue_size = arguments.invalidation_queue_size
    if arguments.monitor_address is not None:
        options.monitor_address = arguments.monitor_address
    if arguments.metrics_address is not None:
        if isinstance(arguments.metrics_address, str):
            raise ConfigurationError("--metrics-address must be HOST:PORT, "
                                     "not a Unix socket path")
        options.metrics_address = arguments.metrics_address
    if arguments.pid_file is not None:
        options.pid_filename = arguments.pid_file
    if arguments.busy_poll is not None:
        options.busy_poll_microseconds = arguments.busy_poll
    _check_values(options)
    return options


def _check_values(options):
    """Reject values that the schema's datatypes let through."""
    if options.invalidation_queue_size < 0:
        raise ConfigurationError("invalidation-queue-size cannot be negative")
    if options.transaction_timeout is not None \
            and options.transaction_timeout <= 0:
        raise ConfigurationError(
            "transaction-timeout must be more than 0 seconds")
    if options.invalidation_age is not None and options.invalidation_age < 0:
        raise ConfigurationError("invalidation-age cannot be negative")
    for key, value in (
            ("slow-transaction-threshold",
             options.slow_transaction_threshold),
            ("slow-load-threshold", options.slow_load_threshold)):
        if value is not None and value < 0:
            raise ConfigurationError("%s cannot be negative" % key)
    if options.metrics_address is not None:
        try:
            import_prometheus_client()
        except ImportError as error:
            raise ConfigurationError(str(error)) from None
    if options.poll_interval <= 0:
        raise ConfigurationError("poll-interval must be more than 0 seconds")
    if options.busy_poll_microseconds < 0:
        raise ConfigurationError("busy-poll cannot be negative")
    if options.tcp_keepalive < 0:
        raise ConfigurationError("tcp-keepalive cannot be negative")
    if options.msgpack and not wire.msgpack_available():
        raise ConfigurationError(
            "msgpack is requested but the msgpack package is not installed")
    try:
        server_options.check_monitor_address(options.monitor_address,
                                             options.monitor_allow_remote)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
