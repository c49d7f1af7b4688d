"""Unit tests of zeo.wire: framing, codecs, the restricted unpickler and
error replies.  No sockets: bytes in, values out.

The real ZEO package serves as an oracle for interoperability (its own
encoder and decoder), never as code under test.
"""

import datetime
import decimal
import math
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ZEO.asyncio import marshal as zeo_marshal
from ZODB.POSException import ConflictError, POSKeyError, ReadOnlyError

from capped_child import CAP_ADDRESS_SPACE
from fuzzing import MAXTID, OID, TID, TYPICAL_MESSAGES, Z64, flags, msgids
from fuzzing import msgpack_values, opcode_argument, pickle_values
from fuzzing import pickled
from hostile_pickles import VARIANTS, Call, Global, forbidden_global_pickle
from hostile_pickles import hostile_calls, hostile_message, named_globals
from zeo import message_shape
from zeo import wire
from zeo.error_replies import encode_error_reply

quick = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


# --- framing ---------------------------------------------------------------

def test_frame_prefix_is_big_endian_payload_length():
    assert wire.frame(b"Z5") == b"\x00\x00\x00\x02Z5"
    assert wire.frame(b"") == b"\x00\x00\x00\x00"
    assert wire.frame(b"x" * 0x01020304)[:4] == b"\x01\x02\x03\x04"


def test_reader_fed_byte_by_byte_returns_each_frame_on_its_last_byte():
    payloads = [b"Z5", b"", b"hello", bytes(range(256)) * 3]
    stream = b"".join(wire.frame(p) for p in payloads)
    ends = set()
    position = 0
    for payload in payloads:
        position += 4 + len(payload)
        ends.add(position)
    reader = wire.FrameReader()
    received = []
    for index in range(len(stream)):
        out = reader.feed(stream[index:index + 1])
        if index + 1 in ends:
            assert len(out) == 1, "frame ending at byte %d" % (index + 1)
        else:
            assert out == []
        received.extend(out)
    assert received == payloads
    assert reader.buffered == 0


def test_many_frames_in_one_chunk():
    payloads = [b"%d" % i * (i % 7) for i in range(500)]
    reader = wire.FrameReader()
    assert reader.feed(b"".join(wire.frame(p) for p in payloads)) == payloads
    assert reader.buffered == 0


def test_reader_accepts_bytearray_and_memoryview_chunks():
    reader = wire.FrameReader()
    data = wire.frame(b"abc") + wire.frame(b"de")
    assert reader.feed(bytearray(data[:5])) == []
    assert reader.feed(memoryview(data)[5:]) == [b"abc", b"de"]
    assert all(type(p) is bytes for p in reader.feed(wire.frame(b"f")))


def test_zero_length_frame_is_an_empty_payload():
    reader = wire.FrameReader()
    assert reader.feed(b"\0\0\0\0") == [b""]
    assert reader.feed(b"\0\0\0\0\0\0\0\0") == [b"", b""]
    assert reader.buffered == 0


def test_incomplete_frame_stays_buffered():
    reader = wire.FrameReader()
    assert reader.feed(b"\0\0\0\x05ab") == []
    assert reader.buffered > 0
    assert reader.feed(b"cd") == []
    assert reader.feed(b"e\0\0") == [b"abcde"]
    assert reader.feed(b"\0\x01!") == [b"!"]
    assert reader.buffered == 0


def test_payload_arriving_after_its_length_word_is_not_read_as_a_frame():
    reader = wire.FrameReader()
    assert reader.feed(b"\0\0\0\x08") == []
    assert reader.buffered == 0  # only the expected length is kept
    assert reader.feed(b"\0\0\0\x04abcd") == [b"\0\0\0\x04abcd"]
    assert reader.feed(memoryview(bytearray(b"\0\0\0\x02hi"))) == [b"hi"]
    assert type(reader.feed(b"\0\0\0\x01!")[0]) is bytes


@quick
@given(payloads=st.lists(st.binary(max_size=3000), max_size=12),
       cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_frames_split_anywhere_round_trip(payloads, cuts):
    stream = b"".join(wire.frame(p) for p in payloads)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    pieces = [stream[a:b]
              for a, b in zip([0] + points, points + [len(stream)])]
    reader = wire.FrameReader()
    received = []
    for piece in pieces:
        received.extend(reader.feed(piece))
    assert received == payloads
    assert reader.buffered == 0


@quick
@given(sizes=st.lists(st.integers(min_value=0, max_value=70000),
                      min_size=1, max_size=4),
       chunk=st.integers(min_value=1, max_value=9000))
def test_large_frames_in_fixed_size_chunks(sizes, chunk):
    payloads = [os.urandom(size) for size in sizes]
    stream = b"".join(wire.frame(p) for p in payloads)
    reader = wire.FrameReader()
    received = []
    for start in range(0, len(stream), chunk):
        received.extend(reader.feed(stream[start:start + chunk]))
    assert received == payloads


def test_length_over_limit_raises_as_soon_as_the_length_word_is_complete():
    reader = wire.FrameReader(max_frame_size=100)
    assert reader.feed(wire.frame(b"y" * 100)) == [b"y" * 100]
    assert reader.feed(b"\0\0\0") == []
    with pytest.raises(wire.ProtocolError):
        reader.feed(b"\x65")  # 101 bytes announced, none sent


def test_absurd_length_raises_without_buffering_anything():
    reader = wire.FrameReader()
    with pytest.raises(wire.ProtocolError):
        reader.feed(b"\xff\xff\xff\xf0")
    assert reader.buffered <= 4


def test_absurd_length_after_good_frames_in_the_same_chunk():
    reader = wire.FrameReader(max_frame_size=1024)
    with pytest.raises(wire.ProtocolError):
        reader.feed(wire.frame(b"ok") + b"\x80\0\0\0" + b"z" * 100)
    assert reader.buffered <= 4 + 4 + 2 + 100


def test_default_frame_limit_is_below_2_to_the_31():
    assert 0 < wire.DEFAULT_MAX_FRAME_SIZE < 2 ** 31
    reader = wire.FrameReader()
    with pytest.raises(wire.ProtocolError):
        reader.feed(struct.pack(">I", wire.DEFAULT_MAX_FRAME_SIZE + 1))


# --- message values --------------------------------------------------------

def typed(value, lists_as_tuples=False):
    """A structure that compares types as well as values (True != 1)."""
    if isinstance(value, (list, tuple)):
        kind = "seq" if lists_as_tuples else type(value).__name__
        return (kind, [typed(v, lists_as_tuples) for v in value])
    if isinstance(value, dict):
        return ("dict", [(typed(k, lists_as_tuples), typed(v, lists_as_tuples))
                         for k, v in value.items()])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


@quick
@given(msgid=msgids(), flag=flags(), name=st.text(max_size=30),
       args=st.lists(pickle_values(), max_size=5).map(tuple))
def test_pickle_codec_round_trip(msgid, flag, name, args):
    codec = wire.PickleCodec()
    payload = codec.encode(msgid, flag, name, args)
    assert payload[:2] == b"\x80\x03"
    message = codec.decode(payload)
    assert isinstance(message, wire.Message)
    assert typed(tuple(message)) == typed((msgid, flag, name, args))


@quick
@given(msgid=msgids(), flag=flags(), name=st.text(max_size=30),
       args=st.lists(msgpack_values(), max_size=5).map(tuple))
def test_msgpack_codec_round_trip_turns_lists_into_tuples(
        msgid, flag, name, args):
    codec = wire.MsgpackCodec()
    message = codec.decode(codec.encode(msgid, flag, name, args))
    assert typed(tuple(message), lists_as_tuples=True) == typed(
        (msgid, flag, name, args), lists_as_tuples=True)
    assert all(not isinstance(v, list) for v in _walk(tuple(message)))


def _walk(value):
    yield value
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _walk(item)


@quick
@given(value=pickle_values())
def test_pickle_reply_value_round_trip(value):
    codec = wire.PickleCodec()
    message = codec.decode(codec.encode((Z64, MAXTID), wire.REPLY,
                                        wire.REPLY_NAME, value))
    assert typed(message.args) == typed(value)
    assert message.msgid == (Z64, MAXTID)


@pytest.mark.parametrize("message", TYPICAL_MESSAGES)
def test_typical_messages_round_trip_with_pickle(message):
    codec = wire.PickleCodec()
    assert typed(tuple(codec.decode(codec.encode(*message)))) == typed(
        message)


@pytest.mark.parametrize("message", TYPICAL_MESSAGES)
def test_typical_messages_round_trip_with_msgpack(message):
    codec = wire.MsgpackCodec()
    decoded = codec.decode(codec.encode(*message))
    assert typed(tuple(decoded), True) == typed(message, True)


@pytest.mark.parametrize("message", TYPICAL_MESSAGES)
def test_real_zeo_reads_what_we_write_and_we_read_what_it_writes(message):
    ours = wire.PickleCodec()
    assert typed(zeo_marshal.pickle_server_decode(ours.encode(*message))) \
        == typed(message)
    assert typed(zeo_marshal.pickle_decode(ours.encode(*message))) \
        == typed(message)
    theirs = zeo_marshal.encoder(b"Z", server=True)(*message)
    assert typed(tuple(ours.decode(theirs))) == typed(message)


@pytest.mark.parametrize("message", TYPICAL_MESSAGES)
def test_real_zeo_msgpack_interoperates(message):
    ours = wire.MsgpackCodec()
    decode_theirs = zeo_marshal.decoder(b"M")
    assert typed(decode_theirs(ours.encode(*message)), True) == typed(
        message, True)
    theirs = zeo_marshal.encoder(b"M", server=True)(*message)
    assert typed(tuple(ours.decode(theirs)), True) == typed(message, True)


def test_pickle_encoding_uses_protocol_3_only():
    codec = wire.PickleCodec()
    payload = codec.encode(*TYPICAL_MESSAGES[4])
    protocols = {op.proto for op, _, _ in pickletools.genops(payload)}
    assert max(protocols) <= 3


# --- the examples of PROTOCOL.md ---------------------------------------------

REGISTER_FRAME = bytes.fromhex(
    "0000001e" "8003" "28" "4b01" "89"
    "5808000000") + b"register" + bytes.fromhex(
    "5801000000") + b"1" + bytes.fromhex("4b00" "86" "74" "2e")


def test_annotated_register_example_decodes_exactly():
    reader = wire.FrameReader()
    (payload,) = reader.feed(REGISTER_FRAME)
    assert len(payload) == 30
    message = wire.PickleCodec().decode(payload)
    assert message == wire.Message(1, False, "register", ("1", 0))
    assert type(message.flag) is bool and type(message.args[1]) is int


def test_load_before_example_decodes_with_tuple_msgid():
    payload = (b"\x80\x03(" + b"C\x08" + OID + b"C\x08" + TID + b"\x86"
               + b"\x89" + b"X\x0a\x00\x00\x00loadBefore"
               + b"C\x08" + OID + b"C\x08" + TID + b"\x86" + b"t.")
    message = wire.PickleCodec().decode(payload)
    assert message == ((OID, TID), False, "loadBefore", (OID, TID))


def test_heartbeat_example_decodes():
    payload = bytes.fromhex(
        "8003284affffffff4b0058060000002e7265706c794e742e")
    assert len(payload) == 24
    message = wire.PickleCodec().decode(payload)
    assert message == (wire.HEARTBEAT_MSGID, 0, wire.REPLY_NAME, None)


def test_msgpack_register_example_bytes():
    payload = b"\x94\x01\xc2\xa8register\x92\xa11\x00"
    codec = wire.MsgpackCodec()
    assert codec.decode(payload) == (1, False, "register", ("1", 0))
    assert codec.encode(1, False, "register", ("1", 0)) == payload


def test_msgpack_invalidation_example_bytes():
    payload = (b"\x94\x00\xc3\xb5invalidateTransaction\x92\xc4\x08" + TID
               + b"\x91\xc4\x08" + OID)
    codec = wire.MsgpackCodec()
    assert codec.encode(0, True, "invalidateTransaction",
                        (TID, [OID])) == payload
    assert codec.decode(payload) == (0, True, "invalidateTransaction",
                                     (TID, (OID,)))


def test_msgpack_encodes_sets_as_arrays():
    codec = wire.MsgpackCodec()
    message = codec.decode(codec.encode(3, 0, ".reply", {OID}))
    assert message.args == (OID,)


# --- the restricted unpickler ------------------------------------------------

HOSTILE_LABELS = list(hostile_calls("marker"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_forbidden_global_call_is_refused_naming_it_and_never_runs(
        tmp_path, label, variant):
    """Each way of calling a dangerous global, down to chains such as
    getattr(__import__("os"), "system")(...): the decoder refuses every
    global it names, says which, and runs none."""
    marker = str(tmp_path / "pwned")
    expression = hostile_calls(marker)[label]
    with pytest.raises(wire.RefusedGlobals) as refusal:
        wire.PickleCodec().decode(hostile_message(expression, variant))
    assert set(refusal.value.names) == named_globals(expression)
    for name in named_globals(expression):
        assert name in str(refusal.value)
    assert refusal.value.message.name == "register"
    assert not os.path.exists(marker)


def test_refusal_text_stays_short_however_many_globals():
    names = "".join("cm%d\nf%s\n0" % (number, "x" * 500)
                    for number in range(50))
    payload = (b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping(" + names.encode()
               + b"tt.")
    with pytest.raises(wire.RefusedGlobals) as refusal:
        wire.PickleCodec().decode(payload)
    assert len(refusal.value.names) == 50
    assert len(str(refusal.value)) < 700
    assert str(refusal.value).endswith("and 45 more")


@pytest.mark.parametrize("payload", [
    b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping(c__builtin__\nfrozenset\n}btt.",
    b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping(}cbuiltins\ndict\nNstt.",
    b"\x80\x02(K\x01\x89X\x04\x00\x00\x00ping(czodbpickle\nbinary\ntt.",
], ids=["BUILD", "dict-key", "bare"])
def test_an_allowed_global_left_uncalled_is_refused(payload):
    """Found by the fuzzer: a message could carry `frozenset` or
    `zodbpickle.binary` themselves, callables a method might call."""
    with pytest.raises(wire.RefusedGlobals) as refusal:
        wire.PickleCodec().decode(payload)
    assert "(as a value)" in str(refusal.value)
    assert refusal.value.message.name == "ping"


def test_refusal_text_is_one_line_whatever_the_names_hold():
    """A STACK_GLOBAL name may hold newlines: logged as is, it would
    forge log lines."""
    forged = "x\n2026-01-01 00:00:00,000 CRITICAL zeo.server forged"
    payload = hostile_message(Call(Global(forged, "y"), []),
                              "STACK_GLOBAL+REDUCE")
    with pytest.raises(wire.RefusedGlobals) as refusal:
        wire.PickleCodec().decode(payload)
    assert refusal.value.names == [forged + ".y"]
    assert "\n" not in str(refusal.value)
    assert "forged" in str(refusal.value)


def test_a_refused_global_that_breaks_decoding_is_still_named():
    payload = (b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping"
               b"cos\nsystem\n\x81t.")  # NEWOBJ needs a class
    with pytest.raises(wire.ProtocolError) as refusal:
        wire.PickleCodec().decode(payload)
    assert "os.system" in str(refusal.value)


class _Reducer:
    """Pickles as a call of `function(*args)`, like an attacker's object."""

    def __init__(self, function, *args):
        self.function = function
        self.args = args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4])
def test_pickler_made_hostile_messages_are_refused(tmp_path, protocol):
    marker = str(tmp_path / "pwned")
    attacks = [
        _Reducer(os.system, "touch " + marker),
        _Reducer(eval, "open(%r, 'w').close()" % marker),
        _Reducer(open, marker, "w"),
        _Reducer(subprocess.Popen, ["touch", marker]),
    ]
    codec = wire.PickleCodec()
    for attack in attacks:
        payload = pickle.dumps((1, False, "register", (attack, False)),
                               protocol)
        with pytest.raises(wire.ProtocolError):
            codec.decode(payload)
    assert not os.path.exists(marker)


def test_inst_and_obj_opcodes_are_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    command = ("touch " + marker).encode()
    inst = (b"(X" + struct.pack("<I", len(command)) + command
            + b"ios\nsystem\n.")
    obj = (b"(cos\nsystem\nX" + struct.pack("<I", len(command)) + command
           + b"o.")
    for payload in (inst, obj):
        with pytest.raises(wire.ProtocolError):
            wire.PickleCodec().decode(payload)
    assert not os.path.exists(marker)


def test_refused_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    module_name = "zeo_wire_test_trap"
    (tmp_path / (module_name + ".py")).write_text(textwrap.dedent("""
        open(%r, "w").close()
        def harmless(*args):
            return args
    """ % str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = forbidden_global_pickle(module_name, "harmless", "x")
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(payload)
    assert module_name not in sys.modules
    assert not marker.exists()


def test_persistent_id_opcodes_are_refused():
    payload = b"\x80\x03(K\x01\x89X\x04\x00\x00\x00pingX\x01\x00\x00\x00xQt."
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(payload)


@pytest.mark.parametrize("protocol", [1, 2, 3])
def test_sets_and_frozensets_are_accepted(protocol):
    """Python 3 pickles bytes below protocol 3 with _codecs.encode, which is
    rightly refused, so the members are str and int."""
    value = ({"a", 7}, frozenset(["b", 1]), set())
    payload = pickle.dumps((4, False, "undoInfo", value), protocol)
    message = wire.PickleCodec().decode(payload)
    assert message.args == value
    assert [type(v) for v in message.args] == [set, frozenset, set]


def test_python2_set_spelling_is_accepted():
    payload = (b"\x80\x02(K\x01\x89X\x04\x00\x00\x00ping"
               b"c__builtin__\nset\n]K\x07a\x85R\x85t.")
    assert wire.PickleCodec().decode(payload).args == ({7},)


def test_zodbpickle_binary_is_read_as_bytes():
    payload = (b"\x80\x02(K\x01\x89X\x04\x00\x00\x00ping"
               b"czodbpickle\nbinary\nC\x03abc\x85R\x85t.")
    message = wire.PickleCodec().decode(payload)
    assert message.args == (b"abc",) and type(message.args[0]) is bytes


def test_refused_global_in_an_extension_still_names_the_call():
    """PROTOCOL.md 15.2 B8: a datetime in a transaction extension is
    refused, but the decoded call stays readable so the receiver can give
    a clear error instead of a silent disconnect."""
    ext = {"when": datetime.datetime(2026, 11, 24, 12, 0),
           "amount": decimal.Decimal("1.50")}
    payload = pickle.dumps(
        (0, True, "tpc_begin", (1, b"", b"", ext, None, " ")), 3)
    with pytest.raises(wire.RefusedGlobals) as refusal:
        wire.PickleCodec().decode(payload)
    assert refusal.value.message.name == "tpc_begin"
    assert refusal.value.message.args[0] == 1
    assert set(refusal.value.names) == {"datetime.datetime",
                                        "decimal.Decimal"}


def test_python2_string_opcodes_decode_as_bytes():
    payload = b"\x80\x02(K\x01\x89X\x04\x00\x00\x00pingU\x03abc\x85t."
    assert wire.PickleCodec().decode(payload).args == (b"abc",)


def test_memo_opcodes_are_accepted():
    value = ("same", "same")
    payload = pickle.dumps((1, False, "x", value), 3)
    assert b"q" in payload or b"h" in payload  # BINPUT / BINGET present
    assert wire.PickleCodec().decode(payload).args == value


@pytest.mark.parametrize("callable_", [
    b"cbuiltins\nbytes\n", b"czodbpickle\nbinary\n"])
def test_allowed_constructors_cannot_allocate_far_beyond_the_frame(callable_):
    """bytes(N) via REDUCE turns a 40-byte frame into N bytes of memory,
    bypassing the frame size limit; such a call must be refused."""
    size = 64 * 1024 * 1024
    payload = (b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping" + callable_
               + b"J" + struct.pack("<i", size) + b"\x85R\x85t.")
    assert len(payload) < 64
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(payload)


def _bomb(depth=60):
    """Opcodes pushing a tuple tree with 2**depth leaves, all one object."""
    return b"N" + b"2\x86" * depth


def _ping(args_opcodes):
    return b"\x80\x03(K\x01\x89X\x04\x00\x00\x00ping" + args_opcodes + b"t."


BOMBS = {
    "not-a-message": b"\x80\x03" + _bomb() + b".",
    "argument": _ping(_bomb() + b"\x85"),
    "dict-key": _ping(b"}" + _bomb() + b"Ns\x85"),
    "set-member": _ping(b"cbuiltins\nset\n" + _bomb() + b"\x85\x85R\x85"),
    "str-of-it": _ping(b"cbuiltins\nstr\n" + _bomb() + b"\x85R\x85"),
}


@pytest.mark.parametrize("payload", BOMBS.values(), ids=BOMBS.keys())
def test_shared_reference_bomb_is_handled_in_bounded_time(payload):
    """A ~130-byte pickle whose value holds 2**60 references to None.

    Loading it is cheap thanks to the memo, but anything that walks,
    hashes or repr()s the value (a dict key, a set member, str(), a log
    line) never finishes, with the GIL held.  Decoding must either refuse
    it or return a message; run in a child with a memory cap and a
    deadline so a broken decoder cannot take the machine down.
    """
    script = CAP_ADDRESS_SPACE + textwrap.dedent("""
        import sys
        from zeo import wire
        try:
            wire.PickleCodec().decode(bytes.fromhex(sys.argv[1]))
        except wire.ProtocolError:
            pass
        print("done")
        """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, payload.hex()], cwd=root,
            capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("decoding a %d-byte message ran for more than 20 s"
                    % len(payload))
    assert result.stdout.strip() == "done", result.stderr[-2000:]


# --- the quick decoding path -------------------------------------------------
#
# `PickleCodec.decode` skips the restricted unpickler for a pickle whose
# quick opcode walk finds nothing that resolves a global or calls anything
# (and no memo get or DUP).  These tests prove that such a pickle decodes
# exactly as through the restricted unpickler, and that no pickle with a
# global or a call ever takes that path.

#: Opcodes that resolve a global or call something (pickletools' table).
CALLING_OPCODES = frozenset([
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ",
    "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"])
#: The opcodes that can reference a value a second time.
SHARING_OPCODES = frozenset(["DUP", "GET", "BINGET", "LONG_BINGET"])
#: The opcodes that size the unpickler's memo table.
MEMO_PUT_OPCODES = frozenset(["PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"])


def _opcode_names(payload):
    """The opcodes of a well-formed pickle that ends at its STOP, or None."""
    names = []
    try:
        for opcode, _arg, position in pickletools.genops(payload):
            names.append(opcode.name)
    except Exception:
        return None
    if not names or names[-1] != "STOP" or position + 1 != len(payload):
        return None
    return names


def test_every_calling_opcode_is_known_to_the_walk():
    known = {opcode.name for opcode in pickletools.opcodes}
    assert CALLING_OPCODES <= known
    assert message_shape.CALLING_OPCODES == CALLING_OPCODES
    for opcode in pickletools.opcodes:
        step = message_shape.SHAPE_STEPS[ord(opcode.code)]
        if opcode.name in CALLING_OPCODES:
            assert step in (0, message_shape.CALLING,
                            message_shape.TEXT_PAIR), opcode.name
        if opcode.name in SHARING_OPCODES | MEMO_PUT_OPCODES:
            assert step == 0, opcode.name


@quick
@given(msgid=msgids(), flag=flags(), name=st.text(max_size=30),
       args=st.lists(pickle_values(), max_size=5).map(tuple),
       protocol=st.sampled_from([3, 4, 5]), fast=st.booleans())
def test_quick_and_restricted_decoding_agree(msgid, flag, name, args,
                                             protocol, fast):
    message = (msgid, flag, name, args)
    payload = pickled(message, protocol, fast)
    codec = wire.PickleCodec()
    decoded = codec.decode(payload)
    message_shape.check_pickle_shape(payload)
    restricted = codec._decode_restricted(payload)
    assert type(decoded) is type(restricted) is wire.Message
    assert typed(tuple(decoded)) == typed(tuple(restricted)) == typed(message)
    if fast:  # how ZEO peers pickle: plain values take the quick path
        assert message_shape.pickle_shape(payload) == message_shape.CALL_FREE


@pytest.mark.parametrize("message", TYPICAL_MESSAGES)
def test_typical_messages_take_the_quick_path(message, monkeypatch):
    codec = wire.PickleCodec()
    payload = codec.encode(*message)
    assert message_shape.pickle_shape(payload) == message_shape.CALL_FREE
    monkeypatch.setattr(codec, "_decode_restricted", None)  # unreachable
    assert typed(tuple(codec.decode(payload))) == typed(message)


def _hand_made_calls():
    """Pickles with each calling opcode, built as an attacker would."""
    def ping(args):
        return _ping(args + b"\x85")
    builtin_set = b"cbuiltins\nset\n"
    return {
        "GLOBAL+REDUCE": ping(builtin_set + b")R"),
        "STACK_GLOBAL": ping(b"X\x08\x00\x00\x00builtinsX\x03\x00\x00\x00set"
                             b"\x93)R"),
        "INST": ping(b"(ibuiltins\nset\n"),
        "OBJ": ping(b"(" + builtin_set + b"o"),
        "NEWOBJ": ping(builtin_set + b")\x81"),
        "NEWOBJ_EX": ping(builtin_set + b")}\x92"),
        "BUILD": ping(builtin_set + b")R}b"),
        "EXT1": ping(b"\x82\x01"),
        "EXT2": ping(b"\x83\x01\x00"),
        "EXT4": ping(b"\x84\x01\x00\x00\x00"),
        "PERSID": ping(b"Pfoo\n"),
        "BINPERSID": ping(b"X\x03\x00\x00\x00fooQ"),
        "forbidden GLOBAL": forbidden_global_pickle("os", "system", "true"),
        "forbidden STACK_GLOBAL": forbidden_global_pickle(
            "os", "system", "true", stack_global=True),
        "set, protocol 3": pickle.dumps((1, False, "x", ({1},)), 3),
        "complex, protocol 4": pickle.dumps((1, False, "x", (1 + 2j,)), 4),
        "datetime": pickle.dumps(
            (1, False, "x", (datetime.datetime(2026, 1, 1),)), 3),
        "zodbpickle.binary": _ping(b"czodbpickle\nbinary\nC\x03abc\x85R\x85"),
    }


HAND_MADE_CALLS = _hand_made_calls()


@pytest.mark.parametrize("payload", HAND_MADE_CALLS.values(),
                         ids=HAND_MADE_CALLS.keys())
def test_a_pickle_with_a_global_or_call_never_takes_the_quick_path(
        payload, monkeypatch):
    names = _opcode_names(payload)
    assert names is not None and CALLING_OPCODES & set(names)
    assert message_shape.pickle_shape(payload) != message_shape.CALL_FREE
    plain_loads = []
    real_loads = pickle.loads
    monkeypatch.setattr(wire.pickle, "loads", lambda *args, **kwargs: (
        plain_loads.append(args), real_loads(*args, **kwargs))[1])
    try:
        wire.PickleCodec().decode(payload)
    except wire.ProtocolError:
        pass
    assert plain_loads == []
    # The spy does see the quick path:
    plain = wire.PickleCodec().encode(*TYPICAL_MESSAGES[2])
    wire.PickleCodec().decode(plain)
    assert plain_loads == [(plain,)]


@st.composite
def opcode_streams(draw):
    """Opcode sequences with well-formed arguments, usually ending at STOP,
    sometimes followed by more bytes: pickles a fuzzer would send."""
    plain = [opcode for opcode in pickletools.opcodes
             if opcode.name not in CALLING_OPCODES | SHARING_OPCODES
             and opcode.name != "STOP" and (
                 opcode.arg is None
                 or opcode.arg.n != pickletools.UP_TO_NEWLINE)]
    chosen = draw(st.lists(st.sampled_from(plain), max_size=12))
    suspects = [opcode for opcode in pickletools.opcodes
                if opcode.name in CALLING_OPCODES | SHARING_OPCODES]
    anything = st.sampled_from(suspects) | st.sampled_from(pickletools.opcodes)
    for _ in range(draw(st.integers(0, 2))):  # anywhere
        chosen.insert(draw(st.integers(0, len(chosen))), draw(anything))
    payload = b"".join(opcode.code.encode("latin-1")
                       + opcode_argument(draw, opcode) for opcode in chosen)
    return payload + draw(st.sampled_from([b".", b".", b".", b"", b".N",
                                           b".."]))


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(payload=opcode_streams())
def test_quick_walk_vouches_only_for_plain_call_free_pickles(payload):
    shape = message_shape.pickle_shape(payload)
    names = _opcode_names(payload)
    if shape == message_shape.CALL_FREE:
        assert names is not None
        assert not CALLING_OPCODES & set(names)
    if shape:  # _PLAIN or _CALL_FREE: shape checks may be skipped
        assert names is not None
        assert not (SHARING_OPCODES | MEMO_PUT_OPCODES) & set(names)
        assert len(names) <= message_shape.PLAIN_OPCODE_LIMIT
    try:
        wire.PickleCodec().decode(payload)
    except wire.ProtocolError:
        pass


def test_quick_walk_vouches_for_nothing_past_its_opcode_limit():
    values = list(range(message_shape.PLAIN_OPCODE_LIMIT))
    payload = wire.PickleCodec().encode(1, False, "x", (values,))
    assert message_shape.pickle_shape(payload) == message_shape.LOOK_CLOSER
    assert wire.PickleCodec().decode(payload).args == (values,)


def test_quick_walk_needs_the_stop_at_the_end():
    payload = wire.PickleCodec().encode(1, False, "ping", ())
    assert message_shape.pickle_shape(payload) == message_shape.CALL_FREE
    for suffix in (b"N", b".", b"\x80"):
        assert (message_shape.pickle_shape(payload + suffix)
                == message_shape.LOOK_CLOSER)
    assert (message_shape.pickle_shape(payload[:-1])
            == message_shape.LOOK_CLOSER)


def test_globals_do_not_prevent_the_shape_shortcut():
    payload = pickled((1, False, "x", ({1, 2}, b"\x00" * 5000)), 3, True)
    assert message_shape.pickle_shape(payload) == message_shape.PLAIN
    assert wire.PickleCodec().decode(payload).args == ({1, 2}, b"\x00" * 5000)


def test_one_codec_encodes_from_many_threads_at_once():
    codec = wire.PickleCodec()
    failures = []

    def encode_many(number):
        for index in range(300):
            message = (number, False, "x", (b"%d" % number * index, index))
            payload = codec.encode(*message)
            if tuple(pickle.loads(payload)) != message:
                failures.append(message)

    threads = [threading.Thread(target=encode_many, args=(number,))
               for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_an_encoding_that_fails_leaves_the_codec_usable():
    codec = wire.PickleCodec()
    kept = codec.encode(1, False, "x", (b"y" * 1000,))
    with pytest.raises(Exception):
        codec.encode(2, False, "x", (b"z" * 3000, lambda: None))
    assert codec.encode(3, False, "x", ()) == pickled(
        (3, False, "x", ()), 3, fast=True)
    assert pickle.loads(kept) == (1, False, "x", (b"y" * 1000,))


# --- malformed payloads ------------------------------------------------------

VALID_PAYLOAD = pickle.dumps(
    ((OID, TID), False, "loadBefore", (OID, TID)), 3)


@pytest.mark.parametrize("length", range(len(VALID_PAYLOAD)))
def test_truncated_pickle_raises_protocol_error(length):
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(VALID_PAYLOAD[:length])


@pytest.mark.parametrize("value", [
    None, 1, "register", b"register", [1, False, "register", ()],
    (1, False, "register"), (1, False, "register", (), None), (),
    {"msgid": 1}, {1, 2},
], ids=repr)
def test_value_that_is_not_a_4_tuple_raises_protocol_error(value):
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(pickle.dumps(value, 3))
    if not isinstance(value, (set, list)):  # msgpack: a list is an array
        with pytest.raises(wire.ProtocolError):
            wire.MsgpackCodec().decode(
                msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("name", [b"register", None, 7, ("register",)],
                         ids=repr)
def test_method_name_that_is_not_str_raises_protocol_error(name):
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(pickle.dumps((1, False, name, ()), 3))
    with pytest.raises(wire.ProtocolError):
        wire.MsgpackCodec().decode(
            msgpack.packb((1, False, name, ()), use_bin_type=True))


def test_empty_payload_raises_protocol_error():
    for codec in (wire.PickleCodec(), wire.MsgpackCodec()):
        with pytest.raises(wire.ProtocolError):
            codec.decode(b"")


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(payload):
    for codec in (wire.PickleCodec(), wire.MsgpackCodec()):
        try:
            message = codec.decode(payload)
        except wire.ProtocolError:
            continue
        assert type(message.name) is str


@settings(max_examples=400, deadline=None)
@given(position=st.integers(min_value=0), byte=st.integers(0, 255),
       cut=st.integers(min_value=0))
def test_corrupted_valid_pickle_raises_only_protocol_error(
        position, byte, cut):
    payload = bytearray(VALID_PAYLOAD)
    payload[position % len(payload)] = byte
    payload = bytes(payload[:len(payload) - cut % 4])
    try:
        message = wire.PickleCodec().decode(payload)
    except wire.ProtocolError:
        return
    assert type(message.name) is str


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_corrupted_valid_msgpack_raises_only_protocol_error(position, byte):
    payload = bytearray(wire.MsgpackCodec().encode(*TYPICAL_MESSAGES[4]))
    payload[position % len(payload)] = byte
    try:
        message = wire.MsgpackCodec().decode(bytes(payload))
    except wire.ProtocolError:
        return
    assert type(message.name) is str


def test_deeply_nested_msgpack_raises_protocol_error():
    payload = b"\x91" * 100000 + b"\xc0"
    with pytest.raises(wire.ProtocolError):
        wire.MsgpackCodec().decode(payload)


def test_deeply_nested_pickle_raises_protocol_error():
    payload = b"\x80\x03" + b"(" * 100000 + b"N" + b"t" * 100000 + b"."
    with pytest.raises(wire.ProtocolError):
        wire.PickleCodec().decode(payload)


# --- handshake ids -----------------------------------------------------------

def test_codec_for_accepts_z5_and_m5():
    assert isinstance(wire.codec_for(b"Z5"), wire.PickleCodec)
    assert isinstance(wire.codec_for(b"M5"), wire.MsgpackCodec)
    assert wire.codec_for(b"Z5").protocol == b"Z5"
    assert wire.codec_for(b"M5").protocol == b"M5"


@pytest.mark.parametrize("identifier", [
    b"Z4", b"X5", b"Z55", b"", b"Z", b"M", b"M4", b"Z3101", b"z5", b"ruok",
    b"Z5\0", b" Z5", b"\x80\x03N.", b"\xff" * 1000,
], ids=repr)
def test_codec_for_rejects_other_identifiers(identifier):
    with pytest.raises(wire.ProtocolError):
        wire.codec_for(identifier)


@quick
@given(identifier=st.binary(max_size=64))
def test_codec_for_rejects_random_garbage(identifier):
    assume(identifier not in (b"Z5", b"M5"))
    with pytest.raises(wire.ProtocolError):
        wire.codec_for(identifier)


# --- error replies -----------------------------------------------------------

CODECS = [wire.PickleCodec, wire.MsgpackCodec]


@pytest.mark.parametrize("codec_class", CODECS)
def test_error_reply_for_pos_key_error(codec_class):
    codec = codec_class()
    message = codec.decode(
        encode_error_reply(codec, (OID, MAXTID), POSKeyError(OID)))
    assert message == ((OID, MAXTID), wire.ERROR_REPLY, ".reply",
                       ("ZODB.POSException.POSKeyError", (OID,)))


@pytest.mark.parametrize("codec_class", CODECS)
def test_error_reply_for_conflict_error_carries_its_dict(codec_class):
    codec = codec_class()
    error = ConflictError(oid=OID, serials=(TID, Z64))
    error.class_name = "persistent.mapping.PersistentMapping"
    message = codec.decode(encode_error_reply(codec, 5, error))
    assert message.msgid == 5 and message.flag == 2
    assert message.name == ".reply"
    class_name, payload = message.args
    assert class_name == "ZODB.POSException.ConflictError"
    assert payload == {
        "message": "database conflict error", "oid": OID,
        "serials": (TID, Z64),
        "class_name": "persistent.mapping.PersistentMapping"}


@pytest.mark.parametrize("codec_class", CODECS)
def test_error_reply_for_read_only_error(codec_class):
    codec = codec_class()
    message = codec.decode(encode_error_reply(codec, 1, ReadOnlyError()))
    assert tuple(message) == (1, 2, ".reply",
                              ("ZODB.POSException.ReadOnlyError", ()))


def test_error_reply_is_understood_by_the_real_zeo_client():
    codec = wire.PickleCodec()
    payload = encode_error_reply(codec, 9, ValueError("unknown storage"))
    assert zeo_marshal.pickle_decode(payload) == (
        9, 2, ".reply", ("builtins.ValueError", ("unknown storage",)))


class _HoldsUnpicklable(Exception):
    """An application error whose attributes cannot be encoded."""

    def __init__(self, message, attribute):
        super().__init__(message)
        self.attribute = attribute


@pytest.mark.parametrize("codec_class", CODECS)
@pytest.mark.parametrize("attribute", [
    lambda: None, threading.Lock()], ids=["lambda", "lock"])
def test_error_reply_falls_back_when_attributes_cannot_be_encoded(
        codec_class, attribute):
    codec = codec_class()
    error = _HoldsUnpicklable("it broke", attribute)
    message = codec.decode(encode_error_reply(codec, 3, error))
    assert message.msgid == 3 and message.flag == 2
    assert message.name == ".reply"
    class_name, payload = message.args
    assert class_name.endswith("._HoldsUnpicklable")
    assert "it broke" in str(payload)


class _AppValue:
    """An application object: picklable, but only as a global."""


@pytest.mark.parametrize("attribute", [iter([1]), _AppValue()],
                         ids=["iterator", "app-object"])
def test_error_reply_decodes_in_the_real_zeo_client(attribute):
    """Picklable is not enough: the peer's unpickler refuses globals that
    are neither exceptions nor marked side-effect free, and a reply it
    cannot decode costs the client its connection instead of an error."""
    payload = encode_error_reply(
        wire.PickleCodec(), 3, _HoldsUnpicklable("it broke", attribute))
    msgid, flag, name, (class_name, _) = zeo_marshal.pickle_decode(payload)
    assert (msgid, flag, name) == (3, wire.ERROR_REPLY, ".reply")
    assert class_name.endswith("._HoldsUnpicklable")


@pytest.mark.parametrize("codec_class", CODECS)
def test_error_reply_falls_back_when_args_cannot_be_encoded(codec_class):
    codec = codec_class()
    error = KeyError(threading.Lock())
    message = codec.decode(encode_error_reply(codec, 4, error))
    assert message.args[0] == "builtins.KeyError"
    assert "lock" in str(message.args[1])


class _Unprintable:
    """Neither picklable nor convertible to a string."""

    def __reduce__(self):
        raise TypeError("not picklable")

    def __str__(self):
        raise RuntimeError("no string either")

    __repr__ = __str__


@pytest.mark.parametrize("codec_class", CODECS)
def test_error_reply_always_encodes_even_if_str_fails(codec_class):
    codec = codec_class()
    error = ValueError(_Unprintable())
    message = codec.decode(encode_error_reply(codec, 8, error))
    assert message.msgid == 8 and message.flag == wire.ERROR_REPLY
    class_name, payload = message.args
    assert isinstance(class_name, str)


def test_error_reply_float_payload_survives():
    codec = wire.PickleCodec()
    message = codec.decode(encode_error_reply(
        codec, 1, ValueError(math.inf)))
    assert message.args == ("builtins.ValueError", (math.inf,))
