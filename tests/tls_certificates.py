"""Certificates made at test time (with `cryptography`), for the TLS tests.

`make_pki(directory)` writes a small public key infrastructure and returns
the paths as a `PKI`: a CA and the server's certificate for 127.0.0.1 and
localhost, client certificates (good, expired, from another CA, from the
read-only CA, one whose name matches a read-only pattern), a server
certificate for another host name, and one whose key has a password.
Every certificate has the extensions that strict X.509 verification asks
for (key identifiers, key usage).

`cryptography` has no wheel for a free-threaded interpreter, and its Rust
sources need crates from the network: there (`make test-ft`) the
interpreter named by ZEO_CERT_PYTHON, which has it, runs this module to
write the same files.
"""

import dataclasses
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:
    x509 = None  # make_pki asks ZEO_CERT_PYTHON

_DAY = datetime.timedelta(days=1)


def _name(common_name):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zeo tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A self-signed CA that issues certificates into `directory`."""

    def __init__(self, directory, common_name):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        public = self.key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                           critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        self.path = self._write("%s-ca.pem" % common_name, self.certificate)

    def issue(self, common_name, hosts=(), server=False, expired=False,
              password=None):
        """A certificate and its key for `common_name`: `(cert_path,
        key_path)`.  `hosts` go into the subject alternative names; the
        key file is encrypted with `password` if given."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - _DAY, now + 30 * _DAY
        if expired:
            start, end = now - 30 * _DAY, now - _DAY
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server \
            else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_general_name(host) for host in hosts]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_path = os.path.join(self.directory, "%s-key.pem" % common_name)
        with open(key_path, "wb") as file:
            file.write(key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password)
                if password else serialization.NoEncryption()))
        return self._write("%s.pem" % common_name, certificate), key_path

    def _write(self, filename, certificate):
        path = os.path.join(self.directory, filename)
        with open(path, "wb") as file:
            file.write(certificate.public_bytes(serialization.Encoding.PEM))
        return path


def _key_usage(ca):
    """What a CA's key (signing certificates) or a leaf's key is for."""
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca,
        content_commitment=False, key_encipherment=not ca,
        data_encipherment=False, key_agreement=False, encipher_only=False,
        decipher_only=False)


def _general_name(host):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


#: The password of `PKI.server_encrypted`'s key.
PASSWORD = b"zeo-test-secret"


def password():
    """A `password-function` (tls_certificates.password)."""
    return PASSWORD


def wrong_password():
    return b"guess"


@dataclasses.dataclass
class PKI:
    """Paths of the test certificates; each `(cert, key)` pair a tuple."""

    directory: str
    ca: str
    read_only_ca: str
    server: tuple
    server_other_host: tuple
    server_encrypted: tuple
    client: tuple
    client_expired: tuple
    client_other_ca: tuple
    client_read_only_ca: tuple
    client_read_only_name: tuple

    def client_context(self, pair=None, check_hostname=True):
        """A client `ssl.SSLContext` trusting our CA, presenting `pair`
        (default: the good client certificate)."""
        context = ssl.create_default_context(cafile=self.ca)
        context.check_hostname = check_hostname
        if pair is not False:
            context.load_cert_chain(*(pair or self.client))
        return context

    def server_ssl_section(self, *extra_lines, server=None,
                           authenticate=True):
        """An ``<ssl>`` section for a server config."""
        certificate, key = server or self.server
        lines = ["certificate %s" % certificate, "key %s" % key]
        if authenticate:
            lines.append("authenticate %s" % self.ca)
        lines += list(extra_lines)
        return "<ssl>\n  %s\n</ssl>" % "\n  ".join(lines)


def make_pki(directory):
    """Write every test certificate into `directory`."""
    if x509 is None:
        return _make_pki_elsewhere(directory)
    ca = Authority(directory, "zeo-test")
    read_only_ca = Authority(directory, "zeo-readers")
    other_ca = Authority(directory, "elsewhere")
    hosts = ("127.0.0.1", "localhost")
    return PKI(
        directory=directory,
        ca=ca.path,
        read_only_ca=read_only_ca.path,
        server=ca.issue("server", hosts, server=True),
        server_other_host=ca.issue("other-host", ("db.example.org",),
                                   server=True),
        server_encrypted=ca.issue("locked", hosts, server=True,
                                  password=PASSWORD),
        client=ca.issue("writer"),
        client_expired=ca.issue("expired", expired=True),
        client_other_ca=other_ca.issue("stranger"),
        client_read_only_ca=read_only_ca.issue("reporter"),
        client_read_only_name=ca.issue("backup-nightly"),
    )


def _make_pki_elsewhere(directory):
    """`make_pki` run by the interpreter ZEO_CERT_PYTHON names."""
    python = os.environ.get("ZEO_CERT_PYTHON")
    if not python:
        raise RuntimeError("cryptography is not installed: set "
                           "ZEO_CERT_PYTHON to a Python that has it")
    result = subprocess.run([python, os.path.abspath(__file__), directory],
                            capture_output=True, text=True, check=True,
                            timeout=60)
    fields = json.loads(result.stdout)
    return PKI(**{name: tuple(value) if isinstance(value, list) else value
                  for name, value in fields.items()})


if __name__ == "__main__":
    print(json.dumps(dataclasses.asdict(make_pki(sys.argv[1]))))
