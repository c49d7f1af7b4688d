"""Error replies that every ZEO client can decode (PROTOCOL.md 3.6).

A failed call is answered with the exception's class name and its state.
A client rebuilds the exception from plain values only (the real ZEO
client drops the connection on any other class), so what is sent is
checked first (`is_plain`), and the reply falls back to string
arguments, then to a generic error: the caller must always learn that
its call failed.
"""

from zeo.wire import ERROR_REPLY, REPLY_NAME, exception_class_name


def encode_error_reply(codec, msgid, exc):
    """Encode an error reply that always encodes and always decodes:
    the exception's own state if it is plain, else the same class name
    with string arguments, else a generic server error."""
    name = exception_class_name(exc)
    payloads = []
    payload = vars(exc) or exc.args
    if is_plain(payload):
        payloads.append(payload)
    try:
        payloads.append(tuple(str(arg) for arg in exc.args) or (str(exc),))
    except Exception:
        pass  # even str() fails: only the generic error is left
    for payload in payloads:
        try:
            return codec.encode(msgid, ERROR_REPLY, REPLY_NAME,
                                (name, payload))
        except Exception:
            continue
    return codec.encode(msgid, ERROR_REPLY, REPLY_NAME,
                        ("builtins.ValueError",
                         ("Couldn't pickle response for %s" % name,)))


_PLAIN_SCALARS = frozenset([str, bytes, int, float, bool, type(None)])


def is_plain(value):
    """Whether `value` holds only builtin values and exceptions (whose
    own attributes are plain too): what any ZEO client can decode."""
    stack = [value]
    seen_exceptions = set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if kind in (tuple, list, set, frozenset):
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Exception):
            if id(item) not in seen_exceptions:
                seen_exceptions.add(id(item))
                stack.append(vars(item) or item.args)
        else:
            return False
    return True
