"""The storage server side of zeo."""

from zeo.server.server import StorageServer

__all__ = ["StorageServer"]
