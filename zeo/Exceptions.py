"""Exceptions raised by the zeo client.

They live in their own module, named like the real ZEO's, because servers
name exception classes in error replies by module and class name.
"""

import transaction.interfaces


class ClientStorageError(Exception):
    """Something went wrong in the client storage itself."""


class ClientDisconnected(ClientStorageError,
                         transaction.interfaces.TransientError):
    """The client is not connected to a server (or lost the connection
    during the call).

    It is a transient error: the `transaction` package retries a
    transaction that failed with it, which is right once the client has
    reconnected.
    """


class ServerException(ClientStorageError):
    """The server raised an exception the client does not rebuild.

    `args` are the remote class name and the payload the server sent.
    """

    @property
    def remote_class_name(self):
        return self.args[0] if self.args else None


class ProtocolError(ClientStorageError):
    """The server does not speak the protocol we expect."""
