"""The ZEO 5 wire format: frames, the handshake and message encoding.

This module never touches a socket.  Bytes go into a `FrameReader`, whole
frame payloads come out; a `Codec` turns payloads into `Message` tuples and
back.  Both sides of the connection (our server and our client) use it, so
everything about the bytes on the wire lives here and can be tested without
a network.

See PROTOCOL.md sections 1-4 for the format this implements.
"""

import collections
import builtins
import importlib.util
import io
import reprlib
import pickle
import struct

from zeo import message_shape
from zeo.buffers import Pool

#: Handshake identifiers: encoding letter + protocol version.
PICKLE_PROTOCOL = b"Z5"
MSGPACK_PROTOCOL = b"M5"
#: The monitoring probe a client may send instead of a protocol identifier.
RUOK = b"ruok"

#: Flag values of the message tuple (PROTOCOL.md 3.3).
CALL = False
ONEWAY = True
REPLY = 0
ERROR_REPLY = 2

REPLY_NAME = ".reply"
HEARTBEAT_MSGID = -1

#: Frames above this size are a protocol error (PROTOCOL.md 1.3).
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024

_LENGTH = struct.Struct(">I")
_PICKLE_PROTOCOL_NUMBER = 3

Message = collections.namedtuple("Message", "msgid flag name args")


class ProtocolError(Exception):
    """The peer sent bytes that do not follow the protocol.

    The only safe reaction is to close the connection: after a framing or
    decoding error nothing later on the stream can be trusted.
    """


class FrameTooLarge(ProtocolError):
    """A frame's length word announces more than the reader accepts.

    Raised as soon as the length word is read, before any of the payload
    is buffered; `length` and `limit` are in bytes.
    """

    def __init__(self, length, limit):
        super().__init__("frame of %d bytes exceeds the limit of %d bytes"
                         % (length, limit))
        self.length = length
        self.limit = limit


def frame(payload):
    """Return `payload` prefixed with its 4-byte big-endian length."""
    return _LENGTH.pack(len(payload)) + payload


#: Above this size a payload is not copied behind its length word: the
#: two go to the socket as separate buffers of one `sendmsg`.
LARGE_PAYLOAD = 64 * 1024


def frame_parts(payload):
    """`payload` framed as a list of buffers: one for a small payload (a
    copy costs less than a second buffer), the length word and the payload
    itself for a large one (a blob chunk is not copied again)."""
    if len(payload) < LARGE_PAYLOAD:
        return [_LENGTH.pack(len(payload)) + payload]
    return [_LENGTH.pack(len(payload)), payload]


class FrameReader:
    """Splits a byte stream into frame payloads.

    Feed it whatever `recv()` returned; it keeps partial frames until the
    rest arrives.  Over-long frames raise `ProtocolError` as soon as their
    length word is seen, before any of their payload is buffered.
    """

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._needed = None  # payload length of the frame being read

    def feed(self, data):
        """Add received bytes; return the list of complete payloads.

        Whole frames are cut straight out of `data`, one copy each; only
        a frame that `data` begins or ends in the middle of passes
        through the buffer, which then becomes its payload (a bytearray)
        without another copy.
        """
        payloads = []
        with memoryview(data) as view:
            start = 0
            if self._buffer or self._needed is not None:
                start = self._finish_pending(view, payloads)
                if start is None:
                    return payloads
            cut, used = self._cut(view[start:])
            payloads += cut
            if start + used < len(view):
                self._buffer += view[start + used:]
        return payloads

    def _finish_pending(self, view, payloads):
        """Complete the frame begun in the buffer with the front of `view`;
        return where the rest of `view` starts, or None if it all went
        into the buffer."""
        buffer = self._buffer
        position = 0
        if self._needed is None:  # the buffer holds part of a length word
            position = min(4 - len(buffer), len(view))
            buffer += view[:position]
            if len(buffer) < 4:
                return None
            self._needed = self._length(buffer, 0)
            del buffer[:]
        missing = self._needed - len(buffer)
        if len(view) - position < missing:
            buffer += view[position:]
            return None
        buffer += view[position:position + missing]
        payloads.append(buffer)
        self._buffer = bytearray()
        self._needed = None
        return position + missing

    def _length(self, view, start):
        """The length word at `start`, checked against the limit."""
        (length,) = _LENGTH.unpack_from(view, start)
        if length > self.max_frame_size:
            raise FrameTooLarge(length, self.max_frame_size)
        return length

    def _cut(self, view):
        """The complete payloads at the start of `view`, and how many of
        its bytes they (and the length word of the next one) took."""
        payloads = []
        start = 0
        available = len(view)
        while True:
            if self._needed is None:
                if available - start < 4:
                    break
                self._needed = self._length(view, start)
                start += 4
            end = start + self._needed
            if end > available:
                break
            payloads.append(bytes(view[start:end]))
            start = end
            self._needed = None
        return payloads, start

    @property
    def buffered(self):
        """Number of bytes received but not yet returned as a payload."""
        return len(self._buffer)


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxstring = _SHORT.maxother = 60


def short_repr(value, limit=60):
    """A bounded repr for log lines about bad input: never walks more than
    a few elements, however large or deep `value` is."""
    text = _SHORT.repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


def check_shape(check, payload):
    """Run a `zeo.message_shape` check; a refusal is a protocol error."""
    try:
        check(payload)
    except message_shape.ShapeError as error:
        raise ProtocolError("refused message: %s" % error) from None


# --- pickle encoding ---------------------------------------------------

def _binary(value=b""):
    """Python 2 clients send bytes as zodbpickle.binary; they are bytes.

    Only bytes and str are converted: `bytes(10**12)` would allocate."""
    if isinstance(value, str):
        return value.encode("latin-1")
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError("zodbpickle.binary takes bytes, not %s"
                        % type(value).__name__)
    return bytes(value)


#: What a server-side message unpickler may resolve (PROTOCOL.md 4.2):
#: value types whose constructors cannot run code, touch the system, or
#: allocate much more than the frame they came in (which is why `bytes`
#: and `bytearray`, which take a size, are not here).
SERVER_GLOBALS = {
    ("builtins", name): getattr(builtins, name)
    for name in ("set", "frozenset", "dict", "list", "tuple", "str", "int",
                 "float", "complex", "bool")
}
SERVER_GLOBALS.update({
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("zodbpickle", "binary"): _binary,
})


def _optional_prefix():
    """ZopeUndo.Prefix is the filter Zope passes to undoInfo, if installed."""
    try:
        from ZopeUndo.Prefix import Prefix
    except ImportError:
        return {}
    return {("ZopeUndo.Prefix", "Prefix"): Prefix}


SERVER_GLOBALS.update(_optional_prefix())


def _exception_classes(module):
    """The exception classes defined or exported by `module`, by name."""
    return {(module.__name__, name): value
            for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, Exception)}


def _client_globals():
    """What a client-side message unpickler may resolve (PROTOCOL.md 4.3).

    Only error replies carry globals: exception classes, and ZODB's
    `_recon`, which rebuilds a pickled POSError from its state.  The table
    is built from modules the client imports anyway; nothing the server
    names is ever imported.  `ZEO.Exceptions` names (a real ZEO server's)
    map to our own classes of the same names.
    """
    import transaction.interfaces
    import ZODB.POSException
    import zeo.Exceptions
    table = {}
    for module in (builtins, ZODB.POSException, transaction.interfaces,
                   zeo.Exceptions):
        table.update(_exception_classes(module))
    table.update({("ZEO.Exceptions", name): value
                  for (_module, name), value
                  in _exception_classes(zeo.Exceptions).items()})
    table[("ZODB.POSException", "_recon")] = ZODB.POSException._recon
    return table


CLIENT_GLOBALS = _client_globals()


class RefusedGlobals(ProtocolError):
    """A message named globals outside the allow-list.

    Nothing was resolved: each refused global became an inert placeholder
    (and an allowed one left uncalled stays a type), so `message` is
    still readable and the receiver can answer with a clear
    error instead of dropping the connection.
    """

    def __init__(self, message, names):
        names = list(dict.fromkeys(names))
        ProtocolError.__init__(
            self, "refused global%s %s" % ("s" if len(names) > 1 else "",
                                           describe_names(names)))
        self.message = message
        self.names = names


def describe_names(names, shown=5, length=100):
    """`names` for a log line or an error reply: however many and however
    long the names a peer sent, the text stays short, and on one line
    (STACK_GLOBAL names may hold any character, newlines too)."""
    text = ", ".join(_one_line(name[:length]) + "..." * (len(name) > length)
                     for name in names[:shown])
    if len(names) > shown:
        text += " and %d more" % (len(names) - shown)
    return text


def _one_line(text):
    """`text`, with its unprintable characters escaped if it has any."""
    return text if text.isprintable() else repr(text)[1:-1]


class RefusedGlobal:
    """Stands in for a refused global; accepts and ignores everything.

    Calling an instance gives it back, so a chain such as
    ``getattr(__import__("os"), "system")(...)`` decodes to the end and
    every name it refused is reported, not just a failed call.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __setstate__(self, state):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves globals from an explicit table only.

    Nothing is imported on behalf of the peer: a name missing from the
    table is replaced by `RefusedGlobal` and recorded in `refused`.  What
    it does resolve is recorded in `resolved` (by id), so that a global
    left in the message as a value, not called, can be refused too.
    """

    #: The table: `(module, name) -> object`, set on each unpickler.
    allowed = {}

    def find_class(self, module, name):
        try:
            found = self.allowed[module, name]
        except KeyError:
            self.refused.append("%s.%s" % (module, name))
            return RefusedGlobal
        self.resolved[id(found)] = "%s.%s" % (module, name)
        return found


class PickleCodec:
    """Messages as protocol-3 pickles (the `Z` encoding)."""

    protocol = PICKLE_PROTOCOL

    def __init__(self, allowed_globals=SERVER_GLOBALS):
        #: `(module, name) -> object`; not copied: the tables are
        #: constants, and a server has a codec per connection.
        self._allowed = allowed_globals

    def encode(self, msgid, flag, name, args):
        # A pickler borrowed for the message: making one costs more than
        # pickling a typical message, and one kept per codec would cost
        # about 1 KB per connection.  An interrupted one is not reused.
        kept = _picklers.take()
        output, pickler = kept
        output.seek(0)
        output.truncate()
        try:
            pickler.dump((msgid, flag, name, args))
        except BaseException:
            _picklers.discard(kept)
            raise
        data = output.getvalue()
        _picklers.give(kept)
        return data

    def decode(self, payload):
        shape = message_shape.pickle_shape(payload)
        if shape == message_shape.CALL_FREE:
            # Nothing to resolve, nothing to call: the restricted
            # unpickler would build exactly what plain loads builds.
            try:
                value = pickle.loads(payload, encoding="bytes")
            except Exception as exc:
                raise ProtocolError(
                    "cannot decode message %s: %s"
                    % (short_repr(bytes(payload[:40])), exc)) from None
            return _as_message(value)
        if not shape:
            check_shape(message_shape.check_pickle_closely, payload)
        return self._decode_restricted(payload)

    def _decode_restricted(self, payload):
        """Decode a message that may name globals (shape checked)."""
        unpickler = _RestrictedUnpickler(io.BytesIO(payload),
                                         encoding="bytes")
        unpickler.allowed = self._allowed
        unpickler.refused = []
        unpickler.resolved = {}
        try:
            value = unpickler.load()
        except Exception as exc:
            refused = ""
            if unpickler.refused:
                refused = " (it named refused %s)" % describe_names(
                    list(dict.fromkeys(unpickler.refused)))
            raise ProtocolError(
                "cannot decode message %s: %s%s"
                % (short_repr(bytes(payload[:40])), exc, refused)) from None
        message = _as_message(value)
        if unpickler.resolved:
            unpickler.refused += _left_uncalled(message, unpickler.resolved)
        if unpickler.refused:
            raise RefusedGlobals(message, unpickler.refused)
        return message


def _left_uncalled(message, resolved):
    """The names of resolved globals found as values in `message`: the
    allow-list admits calls of value types, not the types (or functions)
    themselves, which a method could call on the peer's behalf.

    The walk is bounded: the shape check allows no container to be
    referenced twice."""
    found = []
    stack = [message]
    while stack:
        item = stack.pop()
        if id(item) in resolved:
            found.append("%s (as a value)" % resolved[id(item)])
        elif type(item) in _WALKED:
            stack.extend(item)
            if type(item) is dict:
                stack.extend(item.values())
        elif isinstance(item, BaseException):
            stack.append(item.args)
            stack.extend(vars(item).values())
    return found


_WALKED = frozenset([tuple, list, set, frozenset, dict, Message])


def _new_pickler():
    """An output buffer and the pickler that writes messages into it."""
    output = io.BytesIO()
    pickler = pickle.Pickler(output, _PICKLE_PROTOCOL_NUMBER)
    pickler.fast = True  # no memo: peers may refuse memo references
    return output, pickler


#: Picklers lent to `PickleCodec.encode`, shared by every codec.
_picklers = Pool(_new_pickler)


def _as_message(value):
    if type(value) is not tuple or len(value) != 4:
        raise ProtocolError(
            "message is not a 4-tuple: %s" % short_repr(value))
    if type(value[2]) is not str:
        raise ProtocolError(
            "method name is not a str: %s" % short_repr(value[2]))
    return _new_message(Message, value)


#: `Message(*value)` for a checked 4-tuple, without a Python-level call.
_new_message = tuple.__new__


# --- msgpack encoding ----------------------------------------------------

class MsgpackCodec:
    """Messages as msgpack arrays (the `M` encoding).

    Arrays decode as tuples, as in ZEO (PROTOCOL.md 3.5).  Exceptions found
    inside a value are sent as `(class_name, payload)` pairs.
    """

    protocol = MSGPACK_PROTOCOL

    def __init__(self):
        import msgpack
        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb
        self._unpack_errors = (ValueError, TypeError, msgpack.UnpackException)

    def encode(self, msgid, flag, name, args):
        return self._packb((msgid, flag, name, args), use_bin_type=True,
                           default=_msgpack_default)

    def decode(self, payload):
        check_shape(message_shape.check_msgpack_shape, payload)
        try:
            value = self._unpackb(payload, raw=False, use_list=False)
        except self._unpack_errors as exc:
            raise ProtocolError(
                "cannot decode message %s: %s"
                % (short_repr(bytes(payload[:40])), exc)) from None
        return _as_message(value)


def _msgpack_default(value):
    if isinstance(value, BaseException):
        return describe_exception(value)
    if isinstance(value, (set, frozenset)):
        return tuple(value)
    raise TypeError("cannot encode %s" % type(value).__name__)


def msgpack_available():
    return importlib.util.find_spec("msgpack") is not None


def codec_for(identifier, allowed_globals=SERVER_GLOBALS):
    """The codec for a handshake identifier, or ProtocolError."""
    if identifier == PICKLE_PROTOCOL:
        return PickleCodec(allowed_globals)
    if identifier == MSGPACK_PROTOCOL and msgpack_available():
        return MsgpackCodec()
    raise ProtocolError("bad handshake %s" % short_repr(bytes(identifier)))


# --- error replies -------------------------------------------------------

def exception_class_name(exc):
    cls = type(exc)
    return "%s.%s" % (cls.__module__, cls.__name__)


def describe_exception(exc):
    """The `(class_name, payload)` pair ZEO sends for an exception.

    The payload is the instance's `__dict__` if it has one, else its args
    (PROTOCOL.md 3.6); clients rebuild the exception from that.
    """
    return exception_class_name(exc), (vars(exc) or exc.args)
