"""Server option values: parsers shared by the command line and <zeo>,
and the keys that make a server fit to face a network.

`max-connections`, `register-timeout`, `max-frame-size` and `socket-mode`
become a `zeo.server.limits.NetworkLimits`; `monitor-allow-remote` decides
whether the monitor, which has no authentication, may listen anywhere but
on the loopback interface or a Unix socket.  The datatype functions below
are named in component.xml, so a value out of range is reported by
ZConfig with its line number.
"""

import ipaddress
import socket

import ZConfig.datatypes

from zeo.server.limits import NetworkLimits, check_setting


def whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise ValueError("%r is not a whole number" % text) from None


def seconds(text):
    try:
        return float(text)
    except ValueError:
        raise ValueError("%r is not a number of seconds" % text) from None


def _byte_size(text):
    try:
        return ZConfig.datatypes.stock_datatypes["byte-size"](text)
    except ValueError:
        raise ValueError(
            "%r is not a size in bytes such as 256MB" % text) from None


def _octal_mode(text):
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(
            "%r is not an octal permission mode such as 0600" % text) from None


def _checked(key, parse):
    """A ZConfig datatype: `parse` the text, then check `key`'s range."""
    def datatype(text):
        return check_setting(key, parse(text))
    datatype.__name__ = key.replace("-", "_")
    return datatype


max_connections = _checked("max-connections", whole_number)
register_timeout = _checked("register-timeout", seconds)
max_frame_size = _checked("max-frame-size", _byte_size)
socket_mode = _checked("socket-mode", _octal_mode)


def limits_from_config(section):
    """The `NetworkLimits` of a <zeo> section (values already checked)."""
    return NetworkLimits(
        max_connections=section.max_connections,
        register_timeout=section.register_timeout,
        max_frame_size=section.max_frame_size,
        socket_mode=section.socket_mode)


def check_monitor_address(address, allow_remote):
    """Raise ValueError unless the monitor may listen on `address`.

    Anyone who connects to the monitor reads its report (client addresses
    and labels, activity), so it listens on a network only when asked with
    `monitor-allow-remote`.
    """
    if address is None or allow_remote or is_local(address):
        return
    host, port = address
    raise ValueError(
        "monitor-address %s:%s is not a loopback address, and the monitor "
        "has no authentication: use 127.0.0.1, ::1 or a Unix socket, or set "
        "monitor-allow-remote true in <zeo>" % (host or "*", port))


def is_local(address):
    """Whether only this machine can reach `address`: a Unix socket path,
    or a host whose every address is a loopback one."""
    if isinstance(address, str):
        return True
    host = address[0]
    if not host:
        return False  # all interfaces
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a host name
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
               for info in infos)
