"""Unix socket files: making room for one, and creating it with a mode.

Both the server's listener and its monitor may listen on a Unix socket,
and runzeo checks the paths before it opens any storage; they share these
rules.
"""

import contextlib
import logging
import os
import socket
import stat

logger = logging.getLogger(__name__)

#: How long probing an existing socket file may take.
PROBE_TIMEOUT = 1


class SocketPathError(OSError):
    """The path cannot take a new socket (in use, or not a socket)."""


def remove_stale_socket(path):
    """Make room for a Unix socket at `path`.

    A socket file nobody listens on is left from a crash: remove it (while
    it exists, binding fails, so it would block a restart).  One that
    answers belongs to a running server, and anything that is not a socket
    (a mistyped path to a Data.fs, say) is never deleted.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(
            "%s exists and is not a socket; refusing to replace it" % path)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except OSError:
            logger.info("removing the stale socket file %s", path)
            os.unlink(path)
        else:
            raise SocketPathError("address %s is already in use" % path)


def bind_with_mode(sock, path, mode):
    """Bind `sock` to `path`, creating the socket file with `mode`.

    The file is created under a umask that allows nobody anything and only
    then given `mode`, so at no moment is it more open than asked.  The
    umask is the process's: nothing else in it may create files meanwhile,
    which holds while a server starts.
    """
    with _umask(0o777):
        sock.bind(path)
    os.chmod(path, mode)


@contextlib.contextmanager
def _umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)
