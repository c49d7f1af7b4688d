"""Storage exceptions as every client can rebuild them.

An error reply names the exception's class, and the client rebuilds it
only if it knows that class (`wire.CLIENT_GLOBALS`: ZODB's, transaction's,
ours and the builtins).  A storage may raise subclasses of its own:
RelStorage's `POSKeyError` derives from ZODB's but lives in `relstorage`,
which a client need not have, and carries database objects in its
arguments.  A ZEO client given such a class cannot unpickle the reply at
all, so a missing object would not even arrive as a `KeyError`, and an
empty database could never create its root.

`transportable` therefore sends such an exception as its nearest ancestor
that clients know, keeping its plain arguments and its message, so that
`except POSKeyError` and `except ConflictError` work on the client as they
do next to the storage.
"""

from zeo import wire
from zeo.error_replies import is_plain


def _known_classes():
    """The exception classes a client rebuilds, under their own names."""
    return frozenset(
        value for key, value in wire.CLIENT_GLOBALS.items()
        if isinstance(value, type) and issubclass(value, BaseException)
        and (value.__module__, value.__name__) == key)


KNOWN_CLASSES = _known_classes()


def transportable(error):
    """`error` itself if clients know its class, else an instance of the
    nearest known ancestor class with the same plain state."""
    cls = type(error)
    if cls in KNOWN_CLASSES:
        return error
    ancestor = next((base for base in cls.__mro__ if base in KNOWN_CLASSES),
                    Exception)
    substitute = ancestor.__new__(ancestor)
    args = tuple(arg for arg in error.args if is_plain(arg))
    substitute.args = args if args else (_message(error),)
    for key, value in vars(error).items():
        if is_plain(value):
            try:
                setattr(substitute, key, value)
            except (AttributeError, TypeError):
                pass
    return substitute


def _message(error):
    try:
        return "%s: %s" % (type(error).__name__, error)
    except Exception:
        return type(error).__name__
