"""TLS: contexts from configuration, what a client certificate allows, and
how failed handshakes are reported.

The configuration follows ZEO's (PROTOCOL.md 12.1, 13.2, 13.5), with two
decisions of our own:

* A server `<ssl>` without `authenticate` serves TLS to any client and
  asks for no client certificate (ZEO's schema requires the key although
  its documentation calls it optional).  With `authenticate` (or
  `read-only-authenticate`) a client certificate signed by one of those
  CAs is required.
* Certificates can be let in read-only: those issued by a CA of
  `read-only-authenticate`, and those whose subject common name matches a
  `read-only-subjects` pattern (`fnmatch`, case-sensitive).  A read-only
  client may load and iterate; tpc_begin, stores, undo and pack get
  ReadOnlyError.  The CA that issued a certificate is recognised by its
  name (the certificate's issuer), so a name present in both CA sets is
  refused at startup, and a chain through an intermediate CA needs that
  intermediate in the same file.

The handshake runs in the connection's own thread, within
`handshake-timeout` seconds (`DEFAULT_HANDSHAKE_TIMEOUT`).  Its failures
are logged at WARNING with the peer and the reason, at most
`FailureLog.BURST` lines a minute (then one line says how many were left
out), so a scan cannot flood the log; a peer that hangs up before sending
a byte (a port probe) is logged at DEBUG only.
"""

import fnmatch
import importlib
import logging
import os
import ssl
import threading
import time

from zeo.tls_socket import TLSSocket

logger = logging.getLogger(__name__)

#: Seconds a new connection has to complete the TLS handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: Keys of the `<ssl>` section that only a client, or only a server, has.
_CLIENT_ONLY = ("check_hostname", "server_hostname")
_SERVER_ONLY = ("read_only_authenticate", "read_only_subjects",
                "handshake_timeout")

#: X.509 attribute names as they are usually written.
_SHORT_NAMES = {"commonName": "CN", "organizationName": "O",
                "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST",
                "emailAddress": "emailAddress"}

#: OpenSSL reasons that mean "this peer does not speak TLS".
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
            "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG",
            "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING")


class TLSConfigError(ValueError):
    """A TLS setting that cannot work; the message is one line for the
    user."""


# -- contexts ---------------------------------------------------------------


def server_context(certificate, key=None, password_function=None,
                   authenticate=()):
    """A server context presenting `certificate`; with CA files or
    directories in `authenticate`, it requires a client certificate
    signed by one of them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.num_tickets = 0  # no session resumption: save the bytes
    _load_chain(context, certificate, key, password_function)
    for path in authenticate:
        _load_ca(context, path)
    if authenticate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def client_context(certificate=None, key=None, password_function=None,
                   authenticate=None, check_hostname=True):
    """A client context that checks the server's certificate against
    `authenticate` (a CA file or directory; the system's CAs if None)
    and presents `certificate` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if authenticate is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, authenticate)
    context.check_hostname = bool(check_hostname)
    if certificate is not None:
        _load_chain(context, certificate, key, password_function)
    elif key is not None:
        raise TLSConfigError("ssl: key %s given without a certificate" % key)
    return context


def _load_chain(context, certificate, key, password_function):
    _check_file(certificate, "certificate")
    if key is not None:
        _check_file(key, "key")
    password = _password_callback(password_function)
    try:
        context.load_cert_chain(certificate, key, password)
    except ssl.SSLError as error:
        raise TLSConfigError(
            "ssl: cannot use certificate %s with key %s: %s (is the key "
            "the certificate's, in PEM form, and its password right?)"
            % (certificate, key or "(in the certificate file)",
               error.reason or error)) from None


def _load_ca(context, path):
    if os.path.isdir(path):
        context.load_verify_locations(capath=path)
        return
    _check_file(path, "CA file")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise TLSConfigError("ssl: %s holds no usable CA certificate: %s"
                             % (path, error.reason or error)) from None


def _check_file(path, what):
    if not os.path.isfile(path):
        raise TLSConfigError("ssl: %s %s: no such file" % (what, path))
    if not os.access(path, os.R_OK):
        raise TLSConfigError("ssl: %s %s: not readable" % (what, path))


def _password_callback(dotted_name):
    """The function named by `password-function`, or None."""
    if not dotted_name:
        return None
    module_name, _, name = dotted_name.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise TLSConfigError("ssl: password-function %s cannot be imported: "
                             "%s" % (dotted_name, error)) from None
    if not callable(function):
        raise TLSConfigError("ssl: password-function %s is not callable"
                             % dotted_name)
    return function


def _issuer_names(path):
    """The subject names of the CA certificates at `path` (a file, or a
    directory of them), as `getpeercert()` writes an issuer."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(path, name) for name in sorted(os.listdir(path))]
    names = set()
    for one in paths:
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            scratch.load_verify_locations(cafile=one)
        except (ssl.SSLError, OSError):
            continue  # not a certificate (a hash link's target is listed)
        names.update(cert["subject"] for cert in scratch.get_ca_certs())
    return names


# -- the server's policy ----------------------------------------------------


class ServerTLS:
    """The server's TLS: its context, the handshake timeout, who gets in
    read-only, and the failure log."""

    def __init__(self, context, handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT,
                 read_only_issuers=(), read_only_subjects=()):
        if handshake_timeout <= 0:
            raise TLSConfigError("ssl: handshake-timeout must be positive")
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.read_only_issuers = frozenset(read_only_issuers)
        self.read_only_subjects = tuple(read_only_subjects)
        self.failures = FailureLog()

    @classmethod
    def from_config(cls, section):
        """From a `<ssl>` section of `<zeo>`; TLSConfigError if it cannot
        work."""
        _refuse_keys(section, _CLIENT_ONLY, "a server")
        if section.authenticate == "DYNAMIC":
            raise TLSConfigError(
                "ssl: authenticate DYNAMIC (ZEO's hook for loading CAs in "
                "code) is not supported: name a CA file or directory, or "
                "leave authenticate out")
        authenticate = [path for path in (section.authenticate,
                                          section.read_only_authenticate)
                        if path is not None]
        subjects = list(section.read_only_subjects)
        if subjects and not authenticate:
            raise TLSConfigError(
                "ssl: read-only-subjects needs client certificates: set "
                "authenticate or read-only-authenticate")
        if section.certificate is None:
            raise TLSConfigError("ssl: the server needs a certificate")
        context = server_context(section.certificate, section.key,
                                 section.password_function, authenticate)
        issuers = set()
        if section.read_only_authenticate is not None:
            issuers = _issuer_names(section.read_only_authenticate)
            if section.authenticate is not None:
                both = issuers & _issuer_names(section.authenticate)
                if both:
                    raise TLSConfigError(
                        "ssl: CA %s is in both authenticate and "
                        "read-only-authenticate" % format_name(min(both)))
        timeout = section.handshake_timeout
        return cls(context, DEFAULT_HANDSHAKE_TIMEOUT if timeout is None
                   else timeout, issuers, subjects)

    def wrap(self, sock):
        """The TLS side of an accepted socket (no I/O yet)."""
        return TLSSocket(sock, self.context, server_side=True)

    def access(self, tls_socket):
        """`(subject, read_only)` for a handshaken connection: the client
        certificate's subject (None without one) and whether it is let in
        read-only."""
        certificate = tls_socket.getpeercert()
        if not certificate:
            return None, False
        subject = certificate.get("subject", ())
        common_name = _attribute(subject, "commonName")
        read_only = certificate.get("issuer") in self.read_only_issuers or (
            common_name is not None and any(
                fnmatch.fnmatchcase(common_name, pattern)
                for pattern in self.read_only_subjects))
        return format_name(subject), read_only


def _refuse_keys(section, keys, side):
    for key in keys:
        if getattr(section, key) not in (None, []):
            raise TLSConfigError("ssl: %s is not a key for %s"
                                 % (key.replace("_", "-"), side))


def _attribute(name, wanted):
    for rdn in name:
        for attribute, value in rdn:
            if attribute == wanted:
                return value
    return None


def format_name(name):
    """An X.509 name from `getpeercert()` as ``CN=...,O=...``, with
    anything unprintable escaped (it goes into log lines)."""
    parts = ["%s=%s" % (_SHORT_NAMES.get(attribute, attribute), value)
             for rdn in name for attribute, value in rdn]
    text = ",".join(parts)
    return "".join(char if char.isprintable() else repr(char)[1:-1]
                   for char in text)


# -- the client -------------------------------------------------------------


class ClientTLS:
    """What a client needs to open TLS connections: its context and the
    host name the server's certificate must carry (by default the host
    of the address)."""

    def __init__(self, context, server_hostname=None):
        if not isinstance(context, ssl.SSLContext):
            raise TypeError("ssl must be an ssl.SSLContext, not %r"
                            % type(context).__name__)
        self.context = context
        self.server_hostname = server_hostname

    @classmethod
    def from_config(cls, section):
        _refuse_keys(section, _SERVER_ONLY, "a client")
        check_hostname = section.check_hostname
        context = client_context(
            section.certificate, section.key, section.password_function,
            section.authenticate,
            True if check_hostname is None else check_hostname)
        return cls(context, section.server_hostname)

    def connect(self, sock, address, timeout):
        """Run the handshake on the connected `sock`; the TLS socket.

        Raises ConnectionError with a readable reason."""
        hostname = self.server_hostname
        if hostname is None and isinstance(address, tuple):
            hostname = address[0]
        if hostname is None and self.context.check_hostname:
            raise ConnectionError(
                "TLS to a Unix socket needs ssl_server_hostname (or "
                "server-hostname), or check-hostname off")
        tls_socket = TLSSocket(sock, self.context, server_hostname=hostname)
        try:
            tls_socket.handshake(timeout)
        except ssl.SSLError as error:
            raise ConnectionError("TLS handshake failed: %s"
                                  % describe_failure(error)) from None
        except TimeoutError:
            raise ConnectionError("no TLS handshake within %s seconds"
                                  % timeout) from None
        return tls_socket

    @staticmethod
    def refusal(error):
        """A ConnectionError saying why, if `error` (raised after the
        handshake, reading the server's greeting) is the server's TLS
        alert: a TLS 1.3 server refuses a client certificate only then.
        None for any other error."""
        if isinstance(error, ssl.SSLError):
            return ConnectionError("TLS: %s" % describe_failure(error))
        return None


# -- failures ---------------------------------------------------------------


def describe_failure(error):
    """Why a TLS handshake (or the first read after it) failed, in words:
    the certificate problem, or the alert the peer sent."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate refused: %s" % error.verify_message
    reason = getattr(error, "reason", None)
    if not reason:
        return str(error) or type(error).__name__
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate"
    if reason in _NOT_TLS:
        return "the peer does not speak TLS (%s)" % reason.lower()
    if "_ALERT_" in reason:
        return "the peer refused the handshake: %s" % reason.split(
            "_ALERT_", 1)[1].lower().replace("_", " ")
    return reason.lower().replace("_", " ")


class FailureLog:
    """Logs failed handshakes: at most BURST lines per PERIOD seconds; the
    first line after a quiet spell says how many were left out."""

    BURST = 20
    PERIOD = 60.0

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._logged = 0
        self._suppressed = 0

    def failed(self, peer, reason):
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self.PERIOD:
                self._window_start, self._logged = now, 0
            if self._logged >= self.BURST:
                self._suppressed += 1
                return
            self._logged += 1
            suppressed, self._suppressed = self._suppressed, 0
        logger.warning("(%s) TLS handshake failed: %s%s", peer, reason,
                       " (%d more failures not logged)" % suppressed
                       if suppressed else "")

    @staticmethod
    def hung_up(peer):
        logger.debug("(%s) closed before the TLS handshake", peer)
