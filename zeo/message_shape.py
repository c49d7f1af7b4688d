"""What a message may look like before it is decoded.

Decoding is where a hostile peer can hurt us with a few bytes: CPython's
unpickler grows its memo table to whatever index a `LONG_BINPUT` names (9
bytes can ask for 16 GB), a pickle can share one tuple 2**60 times, and a
msgpack document can nest containers that each preallocate room for ten
thousand items.  Every payload is therefore checked here, before any
object is built, against three rules:

* nothing may make the decoder allocate much more than the payload itself
  justifies: a message's objects are estimated as they would be built and
  may take at most `AMPLIFICATION` times the payload (plus a small
  allowance); a memo index may not run ahead of the memo entries made so
  far; no length may announce more bytes than the payload still holds;
* no container may be referenced twice (what makes a reference bomb);
* nothing may nest deeper than `MAX_MESSAGE_DEPTH`.

The checks cost next to nothing for what ZEO peers send: a pickle with
few opcodes and no memo opcode is vouched for by one quick walk
(`pickle_shape`), and a small msgpack document cannot hurt at all.  Only
the rest is simulated opcode by opcode, or value by value.

This module knows bytes only; `zeo.wire` turns a `ShapeError` into the
protocol error that closes the connection.
"""

import pickletools
import struct

#: Containers in a message may nest at most this deep.
MAX_MESSAGE_DEPTH = 100
#: The decoded objects of a message may take at most this many times the
#: payload's size (estimated; bytes and str values count at their length).
#: A list of oids costs about 6 times its pickle, of 2-byte ints 12.
AMPLIFICATION = 16
#: ... plus this much, so that small messages are never refused for it.
AMPLIFICATION_ALLOWANCE = 1024 * 1024
#: Integers in messages are ids and counts; LONG4 is never needed for them.
MAX_LONG_BYTES = 256


class ShapeError(ValueError):
    """The payload could hang, crash or exhaust the decoder."""


def decoding_budget(payload_length):
    """Bytes of objects a payload of this length may decode into."""
    return AMPLIFICATION * payload_length + AMPLIFICATION_ALLOWANCE


# --- pickles: the quick walk ---------------------------------------------

#: Persistent ids and the extension registry name objects outside the
#: message; BYTEARRAY8 (protocol 5) builds a bytearray, a type messages
#: may not hold (the global `bytearray` is refused too).
_REFUSED_OPCODES = frozenset(["PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4",
                              "BYTEARRAY8"])
_MEMO_PUTS = frozenset(["PUT", "BINPUT", "LONG_BINPUT"])
_MEMO_GETS = frozenset(["GET", "BINGET", "LONG_BINGET"])
_GLOBALS = frozenset(["GLOBAL", "STACK_GLOBAL"])
#: Opcodes that resolve a global or call something: whatever they name or
#: build can only come from the restricted unpickler.
CALLING_OPCODES = frozenset([
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ",
    "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"])
#: Opcodes the quick walk leaves to the full scan: the memo (gets and DUP
#: can share a value, puts size the memo table), refused opcodes,
#: protocol 5 out-of-band buffers, LONG4 (its size is checked), and
#: text-argument opcodes other than GLOBAL and INST.
_UNWALKED_OPCODES = (_MEMO_GETS | _MEMO_PUTS | _REFUSED_OPCODES
                     | frozenset(["DUP", "MEMOIZE", "LONG4", "NEXT_BUFFER",
                                  "READONLY_BUFFER"]))

#: Results of `pickle_shape`.
LOOK_CLOSER = 0
#: Few opcodes, no memo opcode or DUP, but globals or calls.
PLAIN = 1
#: As PLAIN, and nothing resolved or called: plain `pickle.loads` is safe.
CALL_FREE = 2

#: `SHAPE_STEPS[opcode byte]`: how the quick walk steps over the opcode.
#: A positive value is the opcode's whole length; the negative codes below
#: say how to find it; 0 sends the payload to the full scan.
_COUNTED1, _COUNTED4, _COUNTED8 = -1, -4, -8  # little-endian length first
CALLING = -20  # a calling opcode without argument
TEXT_PAIR = -21  # GLOBAL or INST: two newline-terminated names
_STOP_STEP = -22
_FRAME_STEP = -23  # protocol 4 FRAME: its length must fit the payload


def _shape_steps():
    counted = {pickletools.TAKEN_FROM_ARGUMENT1: _COUNTED1,
               pickletools.TAKEN_FROM_ARGUMENT4: _COUNTED4,
               pickletools.TAKEN_FROM_ARGUMENT4U: _COUNTED4,
               pickletools.TAKEN_FROM_ARGUMENT8U: _COUNTED8}
    steps = [0] * 256
    for opcode in pickletools.opcodes:
        name = opcode.name
        code = ord(opcode.code)
        if name in _UNWALKED_OPCODES:
            continue
        if name == "STOP":
            steps[code] = _STOP_STEP
        elif name == "FRAME":
            steps[code] = _FRAME_STEP
        elif name in ("GLOBAL", "INST"):
            steps[code] = TEXT_PAIR
        elif name in CALLING_OPCODES:
            assert opcode.arg is None, name
            steps[code] = CALLING
        elif opcode.arg is None:
            steps[code] = 1
        elif opcode.arg.n >= 0:
            steps[code] = 1 + opcode.arg.n
        elif opcode.arg.n in counted:
            steps[code] = counted[opcode.arg.n]
    return steps


SHAPE_STEPS = _shape_steps()
#: A pickle of at most this many opcodes cannot nest deep enough, or build
#: enough objects, to hurt.
PLAIN_OPCODE_LIMIT = 4096
_OPCODE_BUDGET = range(PLAIN_OPCODE_LIMIT)
_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from


def pickle_shape(payload):
    """Classify a message pickle in one quick walk over its opcodes.

    `PLAIN` if it has neither memo opcodes nor DUP and is short in
    opcodes (so it cannot nest dangerously deep or build much) and ends
    exactly at its STOP: the shape of every message a ZEO peer pickles in
    "fast" mode.  `CALL_FREE` if moreover no opcode resolves a global or
    calls anything, as in almost every message: such a pickle can only
    build plain values, so `pickle.loads` decodes it exactly as the
    restricted unpickler would.  `LOOK_CLOSER` (false) means "look
    closer", not "refuse".  Arguments are skipped, not read (an object
    record is one opcode), so a message costs about a microsecond.
    """
    steps = SHAPE_STEPS
    position = 0
    calls = False
    try:
        for _ in _OPCODE_BUDGET:
            step = steps[payload[position]]
            if step > 0:
                position += step
            elif step == _COUNTED1:
                position += 2 + payload[position + 1]
            elif step == _COUNTED4:
                position += 5 + _unpack_u32(payload, position + 1)[0]
            elif step == _STOP_STEP:
                if position + 1 != len(payload):
                    return LOOK_CLOSER
                return PLAIN if calls else CALL_FREE
            elif step == CALLING:
                calls = True
                position += 1
            elif step == TEXT_PAIR:
                calls = True
                position = _after_text_pair(payload, position)
            elif step == _COUNTED8:
                position += 9 + _unpack_u64(payload, position + 1)[0]
            elif step == _FRAME_STEP:
                announced = _unpack_u64(payload, position + 1)[0]
                position += 9
                if announced > len(payload) - position:
                    return LOOK_CLOSER
            else:
                return LOOK_CLOSER
    except (IndexError, ValueError, struct.error):  # truncated: the full
        pass  # scan says how
    return LOOK_CLOSER


def _after_text_pair(payload, position):
    """Where the GLOBAL or INST opcode at `position` ends."""
    if not isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload)
    return payload.index(b"\n", payload.index(b"\n", position + 1) + 1) + 1


# --- pickles: the full scan ----------------------------------------------

#: Values that may be referenced twice: sharing them costs nothing.
_SCALARS = frozenset(["None", "bool", "int", "int_or_bool", "float", "str",
                      "bytes", "bytes_or_str"])
#: Stack entries, `(nesting depth, may be shared)`, made once: the scan of
#: a long message holds one per value, and must take less memory than
#: the values it vouches for.
_STACK_ENTRIES = [((depth, False), (depth, True))
                  for depth in range(MAX_MESSAGE_DEPTH + 1)]
_LEAF = _STACK_ENTRIES[0][True]
#: What building an opcode's result costs: `(base, per value taken from
#: the stack)`, on top of the length of a bytes or str argument.  A new
#: object costs its header and its slot in a container; a shared one (a
#: cached small int, None, a memo get) only the slot.
_DEFAULT_COST = (48, 0)
_OPCODE_COSTS = dict.fromkeys(
    ["MARK", "POP", "POP_MARK", "PROTO", "STOP", "FRAME", "APPEND",
     "APPENDS"], (0, 0))
_OPCODE_COSTS.update(dict.fromkeys(
    ["NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "BININT1", "DUP", "GET",
     "BINGET", "LONG_BINGET"], (8, 0)))
_OPCODE_COSTS.update(dict.fromkeys(
    ["PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"], (16, 0)))
_OPCODE_COSTS.update(dict.fromkeys(
    ["SETITEM", "SETITEMS", "ADDITEMS"], (0, 12)))


def check_pickle_shape(payload):
    """Refuse pickles whose decoding alone could hang, crash or exhaust
    memory (see the module's docstring); a payload the quick walk vouches
    for needs nothing more."""
    if not pickle_shape(payload):
        check_pickle_closely(payload)


def check_pickle_closely(payload):
    """Simulate the unpickler's stack, memo and allocations, opcode by
    opcode, for a payload `pickle_shape` could not vouch for.

    A well-formed pickle memoizes each object at most once and numbers
    its memo entries from 0 upwards, so a memo index past the entries
    made so far, or more memo puts than values pushed, is refused.
    """
    if not isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload)
    stack = []  # (depth, shareable) of each value on the simulated stack
    marks = []
    memo = []  # the stack entry each memo index refers to
    pushed = 0  # values pushed so far: each may be memoized once
    budget = decoding_budget(len(payload))
    try:
        for opcode, arg, position in pickletools.genops(payload):
            name = opcode.name
            base, per_value = _OPCODE_COSTS.get(name, _DEFAULT_COST)
            taken = 0
            if name in _REFUSED_OPCODES:
                raise ShapeError("message uses the %s opcode" % name)
            if name in _MEMO_PUTS or name == "MEMOIZE":
                _memo_put(memo, len(memo) if arg is None else arg,
                          stack[-1], name, pushed)
            elif name in _MEMO_GETS or name == "DUP":
                item = memo[arg] if name != "DUP" else stack[-1]
                if not item[1]:
                    raise ShapeError("message references a container "
                                     "twice (%s)" % name)
                stack.append(item)
                pushed += 1
            elif name in _GLOBALS:
                del stack[len(stack) - len(opcode.stack_before):]
                stack.append(_LEAF)
                pushed += 1
            else:
                _check_argument(name, arg, payload, position)
                taken = _simulate(opcode, stack, marks)
                pushed += len(opcode.stack_after)
            if isinstance(arg, (bytes, str)):
                base += len(arg)
            budget -= base + per_value * taken
            if budget < 0:
                raise ShapeError(
                    "message of %d bytes would decode into more than %d"
                    % (len(payload), decoding_budget(len(payload))))
    except (ValueError, IndexError, KeyError) as error:
        if isinstance(error, ShapeError):
            raise
        raise ShapeError("malformed pickle: %s" % error) from None


def _memo_put(memo, index, value, name, pushed):
    """Record a memo put, refusing one that would make the unpickler grow
    its memo table beyond what the message has built."""
    if not 0 <= index <= len(memo):
        raise ShapeError("memo index %d with %d memo entries (%s)"
                         % (index, len(memo), name))
    if index == len(memo):
        if len(memo) >= pushed:
            raise ShapeError("more memo entries than values (%s)" % name)
        memo.append(value)
    else:
        memo[index] = value


def _check_argument(name, arg, payload, position):
    """Arguments whose size the unpickler trusts."""
    if name == "FRAME" and arg > len(payload) - position - 9:
        raise ShapeError("FRAME of %d bytes in a payload of %d"
                         % (arg, len(payload)))
    if name == "LONG4" and arg.bit_length() > 8 * MAX_LONG_BYTES:
        raise ShapeError("integer of more than %d bytes" % MAX_LONG_BYTES)


#: Opcodes that add to the container below their arguments: it keeps its
#: own depth unless what is added is deeper (a list built in batches of
#: APPENDS is one level deep, however many batches).
_IN_PLACE_OPCODES = frozenset(["APPEND", "APPENDS", "SETITEM", "SETITEMS",
                               "ADDITEMS", "BUILD"])


def _simulate(opcode, stack, marks):
    """Apply one opcode's stack effect, tracking nesting depth; return how
    many values it took from the stack."""
    taken = []
    for before in reversed(opcode.stack_before):  # top of stack first
        if before is pickletools.markobject:
            start = marks.pop()
            taken.extend(stack[start:])
            del stack[start:]
        elif before is not pickletools.stackslice:
            taken.append(stack.pop())
    count = len(taken)
    depth = 0
    if opcode.name in _IN_PLACE_OPCODES:
        depth = taken.pop()[0]  # the container, deepest on the stack
    if taken:
        depth = max(depth, max(depth for depth, _shareable in taken) + 1)
    if depth > MAX_MESSAGE_DEPTH:
        raise ShapeError("message nested deeper than %d" % MAX_MESSAGE_DEPTH)
    for after in opcode.stack_after:
        if after is pickletools.markobject:
            marks.append(len(stack))
        else:
            stack.append(_STACK_ENTRIES[depth][
                not count and after.name in _SCALARS])
    return count


# --- msgpack ---------------------------------------------------------------

#: A msgpack payload this small cannot hurt: each container preallocates
#: at most one slot per payload byte, and there is room for few of them.
MSGPACK_UNCHECKED_SIZE = 512

#: Kinds of msgpack values, by how the walk steps over them.
_FIXED, _COUNTED, _ARRAY, _MAP = range(4)


def _msgpack_table():
    """First byte -> (kind, size or length width, decoded cost)."""
    table = {}
    for byte in range(0x00, 0x80):
        table[byte] = (_FIXED, 1, 8)  # positive fixint: a cached int
    for byte in range(0xe0, 0x100):
        table[byte] = (_FIXED, 1, 8)  # negative fixint
    for byte in range(0x80, 0x90):
        table[byte] = (_MAP, byte & 0x0f, 0)
    for byte in range(0x90, 0xa0):
        table[byte] = (_ARRAY, byte & 0x0f, 0)
    for byte in range(0xa0, 0xc0):
        table[byte] = (_FIXED, 1 + (byte & 0x1f), 48)  # fixstr
    table.update({
        0xc0: (_FIXED, 1, 8), 0xc2: (_FIXED, 1, 8), 0xc3: (_FIXED, 1, 8),
        0xca: (_FIXED, 5, 48), 0xcb: (_FIXED, 9, 48),
        0xcc: (_FIXED, 2, 48), 0xcd: (_FIXED, 3, 48),
        0xce: (_FIXED, 5, 48), 0xcf: (_FIXED, 9, 48),
        0xd0: (_FIXED, 2, 48), 0xd1: (_FIXED, 3, 48),
        0xd2: (_FIXED, 5, 48), 0xd3: (_FIXED, 9, 48),
        0xd4: (_FIXED, 3, 96), 0xd5: (_FIXED, 4, 96),
        0xd6: (_FIXED, 6, 96), 0xd7: (_FIXED, 10, 96),
        0xd8: (_FIXED, 18, 96),
        # bin, ext (one type byte after the length) and str: (width, extra)
        0xc4: (_COUNTED, (1, 0), 48), 0xc5: (_COUNTED, (2, 0), 48),
        0xc6: (_COUNTED, (4, 0), 48), 0xc7: (_COUNTED, (1, 1), 96),
        0xc8: (_COUNTED, (2, 1), 96), 0xc9: (_COUNTED, (4, 1), 96),
        0xd9: (_COUNTED, (1, 0), 48), 0xda: (_COUNTED, (2, 0), 48),
        0xdb: (_COUNTED, (4, 0), 48),
        0xdc: (_ARRAY, 2, 0), 0xdd: (_ARRAY, 4, 0),
        0xde: (_MAP, 2, 0), 0xdf: (_MAP, 4, 0),
    })
    return table


_MSGPACK_HEADER = _msgpack_table()
_FIX_CONTAINERS = frozenset(range(0x80, 0xa0))
#: A new container: its header, plus a slot per item (counted per item).
_CONTAINER_COST = 64
_ITEM_COST = 8


def check_msgpack_shape(payload):
    """Refuse a msgpack document whose decoding could exhaust memory.

    msgpack preallocates room for each container's announced items (up
    to ten thousand) before reading them, so a few bytes of nested
    headers could reserve gigabytes: every announced item must fit in the
    bytes that are left, all open containers together.  Containers may
    nest at most `MAX_MESSAGE_DEPTH` deep, and the whole document may
    decode into at most `decoding_budget` bytes.
    """
    if len(payload) <= MSGPACK_UNCHECKED_SIZE:
        return
    view = memoryview(payload)
    end = len(view)
    budget = decoding_budget(end)
    header = _MSGPACK_HEADER
    open_items = [1]  # items still expected, per open container
    expected = 1  # their sum
    position = 0
    while open_items:
        if expected > end - position:
            raise ShapeError("msgpack document announces %d more values "
                             "than its %d remaining bytes could hold"
                             % (expected, end - position))
        try:
            kind, argument, cost = header[view[position]]
        except KeyError:
            raise ShapeError("invalid msgpack type byte %#x at %d"
                             % (view[position], position)) from None
        open_items[-1] -= 1
        expected -= 1
        if kind == _FIXED:
            position += argument
        elif kind == _COUNTED:
            width, extra = argument
            length = int.from_bytes(view[position + 1:position + 1 + width],
                                    "big")
            position += 1 + width + extra + length
            if position > end:
                raise ShapeError("msgpack value of %d bytes runs past the "
                                 "end of the document" % length)
            cost += length
        else:
            if view[position] in _FIX_CONTAINERS:
                count = argument
                position += 1
            else:
                count = int.from_bytes(
                    view[position + 1:position + 1 + argument], "big")
                position += 1 + argument
            if kind == _MAP:
                count *= 2
            if len(open_items) > MAX_MESSAGE_DEPTH:
                raise ShapeError("message nested deeper than %d"
                                 % MAX_MESSAGE_DEPTH)
            open_items.append(count)
            expected += count
            cost = _CONTAINER_COST + _ITEM_COST * count
        budget -= cost
        if budget < 0:
            raise ShapeError(
                "message of %d bytes would decode into more than %d"
                % (end, decoding_budget(end)))
        while open_items and not open_items[-1]:
            open_items.pop()
    if position > end:
        raise ShapeError("msgpack document runs past its %d bytes" % end)
