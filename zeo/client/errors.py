"""Turning a server's error reply back into an exception.

A server describes an exception as `(class_name, payload)`, the payload
being the instance's `__dict__` or its `args` (PROTOCOL.md 3.6).  Classes
the client knows (the table `wire.CLIENT_GLOBALS`: ZODB, transaction, zeo
and builtin exceptions) are rebuilt as themselves, so callers can catch
`ConflictError` or `POSKeyError` as with a local storage; anything else
becomes a `ServerException` that names the remote class.
"""

from zeo import wire
from zeo.Exceptions import ServerException


def _known_classes():
    return {"%s.%s" % key: value
            for key, value in wire.CLIENT_GLOBALS.items()
            if isinstance(value, type)}


_KNOWN = _known_classes()
# Python 2 servers name builtins "exceptions".
_KNOWN.update({"exceptions." + name.split(".", 1)[1]: value
               for name, value in list(_KNOWN.items())
               if name.startswith("builtins.")})


def rebuild_exception(description):
    """The exception for an error reply's value `(class_name, payload)`."""
    if isinstance(description, BaseException):
        return description
    try:
        class_name, payload = description
    except (TypeError, ValueError):
        return ServerException("unknown", description)
    cls = _KNOWN.get(class_name) if isinstance(class_name, str) else None
    if cls is None:
        return ServerException(class_name, payload)
    if isinstance(payload, dict):
        return _from_state(cls, payload)
    if isinstance(payload, (tuple, list)):
        return _from_args(cls, tuple(payload))
    return _from_args(cls, (payload,))


def _from_state(cls, state):
    """Rebuild from the instance's `__dict__`, without calling __init__
    (whose signature differs from class to class)."""
    error = cls.__new__(cls)
    state = {key: _nested(value) for key, value in state.items()}
    args = state.pop("args", ())
    try:
        error.__dict__.update(state)
    except (TypeError, AttributeError):
        return ServerException(wire.exception_class_name(error), state)
    error.args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    return error


def _nested(value, depth=3):
    """Rebuild exceptions nested in a state value.

    In msgpack mode a server sends nested exceptions (the `_errs` of
    MultipleUndoErrors: `[(oid, UndoError), ...]`) as `(class_name,
    payload)` pairs too; only pairs naming a class we know are rebuilt.
    """
    if depth == 0 or not isinstance(value, (tuple, list)):
        return value
    if len(value) == 2 and isinstance(value[0], str) and \
            value[0] in _KNOWN and isinstance(value[1], (tuple, list, dict)):
        return rebuild_exception(value)
    return type(value)(_nested(item, depth - 1) for item in value)


def _from_args(cls, args):
    try:
        return cls(*args)
    except Exception:
        error = cls.__new__(cls)
        error.args = args
        return error
