"""zeo: a ZEO server and client for ZODB.

Convenience functions, for scripts, tests and interactive use::

    import zeo
    addr, stop = zeo.server()          # a MappingStorage on 127.0.0.1
    db = zeo.DB(addr)                  # a ZODB.DB on a ClientStorage
    ...
    db.close()
    stop()

`zeo.server` and `zeo.client` are also the names of the server and
client packages (`zeo.server.session`, `zeo.client.cache`, ...): the two
package modules are made callable, so both uses work.
"""

import types

import zeo.client as _client_package
import zeo.server as _server_package


def _client(addr, **options):
    """A `ClientStorage` for `addr` (see its constructor for options)."""
    from zeo.ClientStorage import ClientStorage
    return ClientStorage(addr, **options)


def DB(addr, **options):
    """A `ZODB.DB` on a new `ClientStorage`; options go to the storage."""
    import ZODB
    storage = _client(addr, **options)
    try:
        return ZODB.DB(storage)
    except BaseException:
        storage.close()
        raise


def connection(addr, **options):
    """An open ZODB connection; closing it closes its database too."""
    database = DB(addr, **options)
    try:
        opened = database.open()
    except BaseException:
        database.close()
        raise
    opened.onCloseCallback(database.close)
    return opened


def _start_server(path=None, port=0, read_only=False, **options):
    """Serve one storage on 127.0.0.1 from this process.

    The storage is a FileStorage at `path`, or a MappingStorage when
    `path` is None; it is served as storage '1'.  `options` are
    `StorageServer` keyword arguments.  Returns `(address, stop)`;
    `stop()` closes the server and the storage.
    """
    if path is None:
        from ZODB.MappingStorage import MappingStorage
        storage = MappingStorage()
    else:
        from ZODB.FileStorage import FileStorage
        storage = FileStorage(path, read_only=read_only)
    try:
        server = _server_package.StorageServer(
            ("127.0.0.1", port), {"1": storage}, read_only=read_only,
            **options)
    except BaseException:
        storage.close()
        raise
    server.start()
    return server.address, server.close


class _CallableServerPackage(types.ModuleType):
    """The `zeo.server` package, callable as `zeo.server(...)`."""

    def __call__(self, path=None, port=0, read_only=False, **options):
        return _start_server(path, port, read_only, **options)

    __call__.__doc__ = _start_server.__doc__


class _CallableClientPackage(types.ModuleType):
    """The `zeo.client` package, callable as `zeo.client(addr, ...)`."""

    def __call__(self, addr, **options):
        return _client(addr, **options)

    __call__.__doc__ = _client.__doc__


_server_package.__class__ = _CallableServerPackage
_client_package.__class__ = _CallableClientPackage
server = _server_package
client = _client_package
