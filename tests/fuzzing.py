"""What the fuzzers share: settings, input strategies and the checks.

`make test` runs every fuzzer with a small, fixed number of examples
(profile ``zeo-fuzz``: derandomized, no example database, so a run is
the same on every machine).  ``ZEO_FUZZ=long`` (what ``make fuzz`` sets)
selects the profile ``zeo-fuzz-long``: random exploration, and
``ZEO_FUZZ_FACTOR`` (default 50) times as many examples.

The strategies build what a hostile peer sends: real messages, mutated;
random method names and argument shapes; opcode streams drawn from
pickletools' opcode table with names from `GLOBAL_NAMES` (the allowed
ones and dangerous ones); expressions calling dangerous globals through
every calling opcode (tests/hostile_pickles.py); msgpack documents,
extension types and mutations of them.
"""

import io
import os
import pickle
import pickletools
import types

import msgpack
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from hostile_pickles import (VARIANTS, Call, Global, binunicode,
                             expression_opcodes, hostile_message,
                             message_pickle)
from zeo import wire
from zeo.server.session import AFTER_REGISTER, BEFORE_REGISTER

LONG_RUN = os.environ.get("ZEO_FUZZ") == "long"
LONG_RUN_FACTOR = int(os.environ.get("ZEO_FUZZ_FACTOR", "50"))

settings.register_profile(
    "zeo-fuzz", derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
settings.register_profile(
    "zeo-fuzz-long", settings.get_profile("zeo-fuzz"), derandomize=False)
PROFILE = settings.get_profile("zeo-fuzz-long" if LONG_RUN else "zeo-fuzz")


FACTOR = LONG_RUN_FACTOR if LONG_RUN else 1


def fuzz_settings(examples, deadline=None):
    """Settings for a fuzzer running `examples` examples in `make test`."""
    return settings(PROFILE, max_examples=examples * FACTOR,
                    deadline=deadline)


def fuzz_timeout(seconds):
    """A fuzzer module's pytest timeout, `seconds` in `make test`."""
    return pytest.mark.timeout(seconds * FACTOR)


# --- values and messages ----------------------------------------------------

Z64 = b"\0" * 8
MAXTID = b"\x7f" + b"\xff" * 7
OID = b"\0\0\0\0\0\0\0\x07"
TID = b"\x03\xf5\x1b\x22\x33\x44\x55\x66"

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-2 ** 63, max_value=2 ** 64 - 1)
           | st.floats(allow_nan=False) | st.binary(max_size=40)
           | st.text(max_size=20))


def msgpack_values():
    """Values msgpack can carry: map keys str or bytes."""
    return st.recursive(
        scalars,
        lambda inner: (st.lists(inner, max_size=4)
                       | st.lists(inner, max_size=4).map(tuple)
                       | st.dictionaries(st.text(max_size=8)
                                         | st.binary(max_size=8),
                                         inner, max_size=4)),
        max_leaves=20)


def pickle_values():
    """Values the pickle encoding carries: also huge ints, tuple keys."""
    keys = (st.text(max_size=8) | st.binary(max_size=8) | st.integers()
            | st.tuples(st.binary(max_size=8), st.integers()))
    return st.recursive(
        scalars | st.integers(),
        lambda inner: (st.lists(inner, max_size=4)
                       | st.lists(inner, max_size=4).map(tuple)
                       | st.dictionaries(keys, inner, max_size=4)),
        max_leaves=20)


def msgids():
    return (st.integers(min_value=-1, max_value=2 ** 48)
            | st.tuples(st.binary(min_size=8, max_size=8),
                        st.binary(min_size=8, max_size=8))
            | st.text(max_size=5) | st.none())


def flags():
    return st.sampled_from([False, True, 0, 2])


#: Messages as real peers send them (calls, replies, error replies).
TYPICAL_MESSAGES = [
    (1, False, "register", ("1", False)),
    (2, False, "get_info", ()),
    ((OID, MAXTID), False, "loadBefore", (OID, MAXTID)),
    ((OID, MAXTID), 0, ".reply", (b"\x80\x03record", TID, None)),
    (0, True, "tpc_begin", (0x7F3A_1B2C_3D4E, b"/ alice", b"first change",
                            {"x": 1.5}, None, " ")),
    (0, True, "storea", (OID, Z64, b"data" * 100, 0x7F3A_1B2C_3D4E)),
    (6, False, "vote", (0x7F3A_1B2C_3D4E,)),
    (6, 0, ".reply", [OID]),
    (7, 0, ".reply", TID),
    (0, True, "invalidateTransaction", (TID, [OID, Z64])),
    (0, True, "info", ({"length": 3, "size": 588},)),
    (9, 2, ".reply", ("ZODB.POSException.POSKeyError", (OID,))),
    (-1, 0, ".reply", None),
    ("abc", False, "ping", ()),
]

#: Names a client might call: every server method, and names that must
#: stay unreachable (private methods, attributes, dunders).
METHOD_NAMES = sorted(AFTER_REGISTER | BEFORE_REGISTER) + [
    "_store", "__init__", "__class__", "__getattribute__", "__del__",
    "storage", "served", "lookup", "log", "closed", "channel", ".reply",
    "tpc_begin_refused", "undo", ""]


def method_names():
    return st.sampled_from(METHOD_NAMES) | st.text(max_size=20)


def argument_shapes():
    """An args tuple as a call carries it, or something that is not one."""
    oids = st.binary(min_size=8, max_size=8) | st.sampled_from(
        [Z64, OID, MAXTID])
    items = pickle_values() | oids
    return (st.lists(items, max_size=6).map(tuple)
            | st.lists(items, max_size=6) | pickle_values())


def messages():
    """`(msgid, flag, name, args)` tuples: typical ones and random ones."""
    return st.sampled_from(TYPICAL_MESSAGES) | st.tuples(
        msgids(), flags(), method_names(), argument_shapes())


# --- pickle opcodes ---------------------------------------------------------

_ARGUMENT_WIDTHS = {pickletools.TAKEN_FROM_ARGUMENT1: 1,
                    pickletools.TAKEN_FROM_ARGUMENT4: 4,
                    pickletools.TAKEN_FROM_ARGUMENT4U: 4,
                    pickletools.TAKEN_FROM_ARGUMENT8U: 8}


def opcode_argument(draw, opcode, pairs=st.just(b"builtins\nset\n")):
    """Draw a well-formed argument for `opcode`; GLOBAL and INST take
    their `module\\nname\\n` from `pairs`."""
    arg = opcode.arg
    if arg is None:
        return b""
    if arg.n >= 0:
        return draw(st.binary(min_size=arg.n, max_size=arg.n))
    if arg.n == pickletools.UP_TO_NEWLINE:
        if arg.name == "stringnl_noescape_pair":
            return draw(pairs)
        if arg.name in ("stringnl", "stringnl_noescape"):
            return b"'abc'\n" if arg.name == "stringnl" else b"abc\n"
        if arg.name == "unicodestringnl":
            return b"abc\n"
        return str(draw(st.integers(0, 300))).encode() + b"\n"
    if "unicode" in arg.name:
        data = draw(st.text(max_size=6)).encode("utf-8")
    else:
        data = draw(st.binary(max_size=6))
    return len(data).to_bytes(_ARGUMENT_WIDTHS[arg.n], "little") + data


def plant_marker(path):
    """What a fuzzed pickle names to prove code ran: creates `path`."""
    with open(path, "w") as marker:
        marker.write("a decoder ran code on behalf of a peer\n")
    return path


class Trap:
    """A class every hook of which creates `Trap.marker`: resolving and
    using it in any way (INST, OBJ, NEWOBJ, BUILD, REDUCE) leaves the
    file behind."""

    marker = None

    def __new__(cls, *args, **kwargs):
        plant_marker(cls.marker)
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        plant_marker(self.marker)

    def __setstate__(self, state):
        plant_marker(self.marker)

    def __reduce__(self):
        return plant_marker, (self.marker,)


#: Globals a fuzzed pickle names: the allowed ones, dangerous ones, ones
#: that create the marker when resolved and called in this process, and
#: a module that does not exist.
GLOBAL_NAMES = sorted({Global(*name) for name in wire.SERVER_GLOBALS} | {
    Global("os", "system"), Global("posix", "system"),
    Global("builtins", "eval"), Global("builtins", "exec"),
    Global("builtins", "getattr"), Global("builtins", "__import__"),
    Global("builtins", "open"), Global("builtins", "bytes"),
    Global("builtins", "bytearray"), Global("builtins", "object"),
    Global("subprocess", "Popen"), Global("copyreg", "_reconstructor"),
    Global("copy_reg", "_reconstructor"), Global("functools", "partial"),
    Global("zodbpickle", "pickle"), Global(__name__, "plant_marker"),
    Global(__name__, "Trap"), Global("zeo_fuzz_no_such_module", "x"),
})


def global_names():
    return st.sampled_from(GLOBAL_NAMES)


#: Names no GLOBAL opcode can carry: a newline (which would forge a log
#: line if written as is), a dot path, a NUL, nothing.
ODD_NAMES = ["x\n2026-12-07 12:00:00,000 CRITICAL zeo.server forged",
             "os\nsystem", "os.path", "builtins\r", "\0", ""]


def stack_global_names():
    """What STACK_GLOBAL may name: also any text."""
    text = st.sampled_from(ODD_NAMES) | st.text(max_size=12)
    return global_names() | st.builds(Global, text, text)


def _name_pair(name):
    return b"%s\n%s\n" % (name.module.encode(), name.name.encode())


@st.composite
def opcode_streams(draw, max_opcodes=24):
    """Any opcodes of pickletools' table with well-formed arguments,
    globals from `GLOBAL_NAMES`; STACK_GLOBAL usually after two names.
    Usually ends with STOP; sometimes bytes follow it, or it is missing.
    """
    pairs = global_names().map(_name_pair)
    parts = []
    for opcode in draw(st.lists(st.sampled_from(pickletools.opcodes),
                                max_size=max_opcodes)):
        if opcode.name == "STACK_GLOBAL" and draw(st.booleans()):
            name = draw(stack_global_names())
            parts.append(binunicode(name.module) + binunicode(name.name))
        parts.append(opcode.code.encode("latin-1")
                     + opcode_argument(draw, opcode, pairs))
    prefix = draw(st.sampled_from([b"", b"\x80\x02", b"\x80\x03",
                                   b"\x80\x05"]))
    return prefix + b"".join(parts) + draw(st.sampled_from(
        [b".", b".", b"", b".N", b".."]))


def expressions(marker):
    """Values and calls of globals (`GLOBAL_NAMES` and any text), nested,
    whose arguments are often the marker path or a command creating it;
    a callee is a global or the result of calling one."""
    names = stack_global_names()
    leaves = (st.sampled_from([marker, "touch " + marker,
                               "open(%r, 'w').close()" % marker, "os"])
              | st.text(max_size=6) | st.integers(-2 ** 31, 2 ** 31 - 1)
              | st.lists(st.sampled_from(["touch", marker]), max_size=3)
              | names)

    def calls(inner):
        callees = names | st.builds(Call, names, st.lists(inner, max_size=2))
        return st.builds(Call, callees, st.lists(inner, max_size=3))
    return st.recursive(leaves, calls, max_leaves=6)


@st.composite
def calling_messages(draw, marker):
    """A message whose arguments hold an expression, called through one
    of the calling opcodes, possibly with BUILD or NEWOBJ mixed in."""
    expression = draw(expressions(marker))
    variant = draw(st.sampled_from(VARIANTS))
    if draw(st.booleans()):
        return hostile_message(expression, variant, draw(method_names()),
                               draw(st.integers(0, 255)), draw(st.booleans()))
    # Opcodes that call what is below them, after the expression.
    tail = draw(st.sampled_from([b"}b", b")\x81", b")}\x92", b"N\x85R",
                                 b")R", b"(o"]))
    return message_pickle(draw(method_names()),
                          expression_opcodes(expression, variant) + tail)


def pickled(message, protocol, fast):
    """`message` pickled with `protocol`, in "fast" mode (no memo, as
    ZEO peers pickle) or not."""
    output = io.BytesIO()
    pickler = pickle.Pickler(output, protocol)
    pickler.fast = fast
    pickler.dump(message)
    return output.getvalue()


#: Opcodes that push one value and take nothing from the stack.
LEAF_OPCODES = [opcode for opcode in pickletools.opcodes
                if not opcode.stack_before and len(opcode.stack_after) == 1
                and opcode.stack_after[0] is not pickletools.markobject
                and opcode.name not in ("GLOBAL", "PERSID")]


@st.composite
def leaf_messages(draw):
    """A call whose arguments are each pushed by one opcode of any
    protocol (BYTEARRAY8, EMPTY_SET, LONG1, BINFLOAT, NEXT_BUFFER, ...):
    well-formed messages holding every kind of value a pickle can build
    without a global."""
    leaves = draw(st.lists(st.sampled_from(LEAF_OPCODES), min_size=1,
                           max_size=4))
    return message_pickle(draw(method_names()), b"".join(
        opcode.code.encode("latin-1") + opcode_argument(draw, opcode)
        for opcode in leaves))


def pickled_messages():
    """Messages pickled with any protocol, with or without the memo."""
    return st.builds(pickled, messages(), st.integers(0, 5), st.booleans())


# --- mutations --------------------------------------------------------------

@st.composite
def mutated(draw, payloads, max_mutations=3):
    """A payload from `payloads`, then up to `max_mutations` changes: a
    byte replaced, bytes or an opcode inserted, a slice deleted or
    repeated, the end cut off."""
    payload = bytearray(draw(payloads))
    for _ in range(draw(st.integers(0, max_mutations))):
        position = draw(st.integers(0, len(payload)))
        kind = draw(st.sampled_from(
            ["replace", "insert", "opcode", "delete", "repeat", "cut"]))
        if kind == "replace" and position < len(payload):
            payload[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            payload[position:position] = draw(
                st.binary(min_size=1, max_size=8))
        elif kind == "opcode":
            payload[position:position] = draw(opcode_streams(2))[:-1]
        elif kind in ("delete", "repeat"):
            end = position + draw(st.integers(1, 16))
            chunk = payload[position:end]
            if kind == "delete":
                del payload[position:end]
            else:
                payload[position:position] = chunk * draw(st.integers(1, 4))
        elif kind == "cut":
            del payload[position:]
    return bytes(payload)


def pickle_payloads(marker):
    """Everything the pickle fuzzers send."""
    return mutated(pickled_messages() | calling_messages(marker)
                   | opcode_streams() | leaf_messages()) | leaf_messages()


# --- msgpack ----------------------------------------------------------------

def msgpack_extensions():
    """Extension values and timestamps, as any msgpack peer may send."""
    return (st.builds(msgpack.ExtType, st.integers(0, 127),
                      st.binary(max_size=12))
            | st.builds(msgpack.Timestamp, st.integers(0, 2 ** 34 - 1),
                        st.integers(0, 999_999_999)))


def _msgpack_document(value):
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def msgpack_headers(draw):
    """Container headers announcing many items, nested: what makes a
    msgpack decoder preallocate."""
    parts = []
    for _ in range(draw(st.integers(1, 12))):
        code, width = draw(st.sampled_from([(0xdc, 2), (0xdd, 4),
                                            (0xde, 2), (0xdf, 4)]))
        count = draw(st.integers(0, 2 ** (8 * width) - 1))
        parts.append(bytes([code]) + count.to_bytes(width, "big"))
    return b"".join(parts) + draw(st.binary(max_size=600))


def msgpack_payloads():
    """Everything the msgpack fuzzers send."""
    extended = st.tuples(msgids(), flags(), method_names(),
                         st.lists(msgpack_extensions() | msgpack_values(),
                                  max_size=4).map(tuple))
    documents = st.builds(
        _msgpack_document,
        st.sampled_from(TYPICAL_MESSAGES)
        | st.tuples(msgids(), flags(), method_names(),
                    st.lists(msgpack_values(), max_size=5).map(tuple))
        | extended | msgpack_values())
    return mutated(documents) | msgpack_headers() | st.binary(max_size=64)


# --- checks -----------------------------------------------------------------

#: What a decoded pickle message may be made of.
PICKLE_VALUE_TYPES = frozenset([
    type(None), bool, int, float, complex, str, bytes, tuple, list, dict,
    set, frozenset])
#: ... and a message our client decodes: also the exceptions of error
#: replies.
CLIENT_VALUE_TYPES = PICKLE_VALUE_TYPES | {
    value for value in wire.CLIENT_GLOBALS.values()
    if isinstance(value, type)}
#: What a decoded msgpack message may be made of (arrays are tuples;
#: extension values stay msgpack's inert value objects).
MSGPACK_VALUE_TYPES = frozenset([
    type(None), bool, int, float, str, bytes, tuple, dict, msgpack.ExtType,
    msgpack.Timestamp])


def foreign_types(value, allowed):
    """The types in `value` (walked through containers, dict keys too)
    that are not in `allowed`."""
    found = set()
    stack = [value]
    seen = set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind not in allowed:
            found.add(kind)
        if kind in (tuple, list, set, frozenset, dict) \
                or isinstance(item, BaseException):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, BaseException):
                stack.extend([item.args, vars(item)])
                continue
            stack.extend(item)
            if kind is dict:
                stack.extend(item.values())
    return found


def decode_checked(codec, payload, allowed):
    """Decode `payload`: a Message made of `allowed` types, or the
    codec's documented error.  Returns the Message or the error."""
    try:
        message = codec.decode(payload)
    except wire.RefusedGlobals as refused:
        # Still readable, for a clear error reply: placeholders of refused
        # globals, and allowed ones that were not called, may remain.
        assert type(refused.message) is wire.Message
        assert refused.names
        assert "\n" not in str(refused), "a log line must stay one line"
        assert not foreign_types(tuple(refused.message), allowed | {
            wire.RefusedGlobal, type, types.FunctionType})
        event("refused: RefusedGlobals")
        return refused
    except wire.ProtocolError as error:
        event("refused: %s" % type(error).__name__)
        assert "\n" not in str(error), "a log line must stay one line"
        return error
    event("decoded")
    assert type(message) is wire.Message
    assert type(message.name) is str
    assert not foreign_types(tuple(message), allowed), message
    return message
