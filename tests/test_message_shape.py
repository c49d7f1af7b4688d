"""The shape checks of zeo.message_shape, rule by rule.

Each hostile payload is checked without being decoded (the check never
builds an object), and the codec's refusal is checked in a child process
with a memory cap, so that a broken check cannot take the machine down.
Well-formed pickles and msgpack documents, including those the real ZEO
client and server send, must still pass.
"""

import datetime
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capped_child import CAP_ADDRESS_SPACE
from fuzzing import msgpack_values, pickle_values, pickled
from test_wire import MEMO_PUT_OPCODES
from zeo import message_shape
from zeo import wire
from zeo.message_shape import ShapeError

PROTO3 = b"\x80\x03"


def long_binput(index):
    return PROTO3 + b"Nr" + struct.pack("<I", index) + b"."


def counted8(opcode, announced):
    return PROTO3 + opcode + struct.pack("<Q", announced) + b"abc."


def nested_msgpack_arrays(levels, announced, size):
    """`levels` array32 headers, each announcing `announced` items, padded
    with nils to `size` bytes: msgpack preallocates for every level."""
    data = (b"\xdd" + struct.pack(">I", announced)) * levels
    return data + b"\xc0" * (size - len(data))


#: Pickles that make CPython's unpickler allocate far beyond their size,
#: or announce more bytes than they hold.
HOSTILE_PICKLES = {
    "LONG_BINPUT 2**30": long_binput(2 ** 30),
    "LONG_BINPUT 2**31-1": long_binput(2 ** 31 - 1),
    "LONG_BINPUT 2**23": long_binput(2 ** 23),
    "BINPUT 5 first": PROTO3 + b"Nq\x05.",
    "PUT huge decimal": PROTO3 + b"Np99999999999999\n.",
    "PUT negative": PROTO3 + b"Np-1\n.",
    "MEMOIZE chain": b"\x80\x04N" + b"\x94" * 50000 + b".",
    "BINPUT chain": PROTO3 + b"N" + b"".join(
        b"q" + bytes([index]) for index in range(200)) + b".",
    "LONG4 of 2**31-1 bytes": PROTO3 + b"\x8b" + struct.pack(
        "<i", 2 ** 31 - 1) + b".",
    "LONG4 of 300 bytes": PROTO3 + b"\x8b" + struct.pack("<i", 300)
    + b"\x01" * 300 + b".",
    "BINBYTES8 past the end": counted8(b"\x8e", 2 ** 40),
    "BINUNICODE8 past the end": counted8(b"\x8d", 2 ** 40),
    "BYTEARRAY8 past the end": b"\x80\x05\x96" + struct.pack("<Q", 2 ** 40)
    + b".",
    "BINBYTES past the end": PROTO3 + b"B" + struct.pack("<I", 2 ** 31)
    + b".",
    "FRAME past the end": b"\x80\x04\x95" + struct.pack("<Q", 2 ** 40)
    + b"N.",
    "LONG_BINGET 2**30": PROTO3 + b"N\x94j" + struct.pack("<I", 2 ** 30)
    + b".",
    "empty lists in APPENDS": PROTO3 + b"](" + b"]" * 200000 + b"e.",
    "empty dicts in a tuple": PROTO3 + b"(" + b"}" * 200000 + b"t.",
}


@pytest.mark.parametrize("payload", HOSTILE_PICKLES.values(),
                         ids=HOSTILE_PICKLES.keys())
def test_hostile_pickle_is_refused_before_decoding(payload):
    assert message_shape.pickle_shape(payload) == message_shape.LOOK_CLOSER
    with pytest.raises(ShapeError):
        message_shape.check_pickle_closely(payload)


def decode_in_capped_child(codec_name, payload):
    """Decode `payload` with a fresh codec in a child allowed 1 GiB of
    address space more than it starts with (tests/capped_child.py);
    returns the child's report line."""
    script = CAP_ADDRESS_SPACE + textwrap.dedent("""
        import sys
        from zeo import wire
        codec = getattr(wire, sys.argv[1])()
        try:
            codec.decode(sys.stdin.buffer.read())
        except wire.ProtocolError as error:
            print("refused:", error)
        else:
            print("decoded")
        """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script, codec_name], input=payload, cwd=root,
        capture_output=True, timeout=60)
    return result.stdout.decode().strip() or result.stderr.decode()[-2000:]


@pytest.mark.parametrize("name", ["LONG_BINPUT 2**30", "PUT huge decimal",
                                  "MEMOIZE chain", "LONG4 of 300 bytes",
                                  "empty lists in APPENDS"])
def test_the_pickle_codec_refuses_with_a_protocol_error(name):
    report = decode_in_capped_child("PickleCodec", HOSTILE_PICKLES[name])
    assert report.startswith("refused: refused message:"), report


def test_a_bytearray_is_refused_as_its_global_is():
    """Found by the fuzzer: protocol 5's BYTEARRAY8 built a bytearray, a
    type that the allow-list keeps out when named by its global."""
    payload = (b"\x80\x05(K\x01\x89X\x04\x00\x00\x00ping("
               b"\x96\x03\x00\x00\x00\x00\x00\x00\x00abctt.")
    assert message_shape.pickle_shape(payload) == message_shape.LOOK_CLOSER
    with pytest.raises(wire.ProtocolError) as refusal:
        wire.PickleCodec().decode(payload)
    assert "BYTEARRAY8" in str(refusal.value)


def test_memo_index_must_not_run_ahead_of_the_entries():
    # Well-formed: entries 0, 1, then 0 again.
    accepted = PROTO3 + b"Nq\x00Nq\x01q\x00\x86."
    message_shape.check_pickle_closely(accepted)
    with pytest.raises(ShapeError, match="memo index 2"):
        message_shape.check_pickle_closely(PROTO3 + b"Nq\x00Nq\x02\x86.")


def test_each_value_may_be_memoized_once():
    message_shape.check_pickle_closely(b"\x80\x04N\x94N\x94\x86.")
    with pytest.raises(ShapeError, match="more memo entries than values"):
        message_shape.check_pickle_closely(b"\x80\x04N\x94\x94\x86.")


def test_memo_gets_of_scalars_still_pass():
    value = ("same", "same", b"oid00000", b"oid00000")
    payload = pickle.dumps((1, False, "x", value), 3)
    message_shape.check_pickle_closely(payload)
    assert wire.PickleCodec().decode(payload).args == value


def test_a_long4_integer_of_ordinary_size_passes():
    payload = pickle.dumps((1, False, "x", (2 ** 2040,)), 3)
    assert b"\x8b" in payload
    assert wire.PickleCodec().decode(payload).args == (2 ** 2040,)


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("values", [
    [os.urandom(8) for _ in range(100000)],  # a big invalidation
    list(range(256, 100256)),  # 2-byte ints: the densest ordinary list
    {"key%d" % number: number for number in range(10000)},
    [(os.urandom(8), os.urandom(8)) for _ in range(20000)],
], ids=["oids", "ints", "dict", "pairs"])
def test_large_ordinary_messages_pass(values, protocol, fast):
    payload = pickled((0, True, "invalidateTransaction",
                       (b"\0" * 8, values)), protocol, fast)
    message_shape.check_pickle_shape(payload)
    assert wire.PickleCodec().decode(payload).args[1] == values


def test_the_budget_scales_with_the_payload():
    """The same empty containers pass in a message that carries enough
    data to justify them."""
    payload = PROTO3 + b"(" + b"]" * 1000 + b"t."
    message_shape.check_pickle_closely(payload)
    many = PROTO3 + b"(" + b"]" * 100000 + b"t."
    with pytest.raises(ShapeError, match="would decode into more than"):
        message_shape.check_pickle_closely(many)
    padding = b"B" + struct.pack("<I", 400000) + b"\0" * 400000
    justified = PROTO3 + b"(" + padding + b"]" * 100000 + b"t."
    message_shape.check_pickle_closely(justified)


@settings(max_examples=200, deadline=None)
@given(value=pickle_values(), protocol=st.sampled_from([3, 4, 5]),
       fast=st.booleans())
def test_any_pickled_value_passes_the_checks(value, protocol, fast):
    payload = pickled((7, False, "x", (value,)), protocol, fast)
    message_shape.check_pickle_closely(payload)
    message_shape.check_pickle_shape(payload)


@pytest.mark.parametrize("server", [False, True])
@pytest.mark.parametrize("protocol", [b"Z", b"M"])
def test_what_the_real_zeo_sends_passes(protocol, server):
    """The real ZEO client's and server's encoders pass, on short messages
    (pickles by the quick walk) and on the longest ones."""
    from ZEO.asyncio.marshal import encoder
    encode = encoder(protocol, server)
    oids = [os.urandom(8) for _ in range(50000)]
    for message in [(1, False, "register", ("1", False)),
                    (2, False, "loadBefore", (b"\0" * 8, b"\x7f" * 8)),
                    (0, True, "invalidateTransaction", (b"\1" * 8, oids)),
                    (3, 0, ".reply", (b"\1" * 8, oids))]:
        payload = encode(*message)
        if protocol == b"M":
            message_shape.check_msgpack_shape(payload)
            continue
        assert not MEMO_PUT_OPCODES & _opcode_names(payload)
        if len(payload) < 1000:
            assert (message_shape.pickle_shape(payload)
                    == message_shape.CALL_FREE), message[2]
        message_shape.check_pickle_closely(payload)


def _opcode_names(payload):
    return {opcode.name for opcode, _arg, _pos in pickletools.genops(payload)}


# --- msgpack ---------------------------------------------------------------

HOSTILE_MSGPACK = {
    "nested preallocations": nested_msgpack_arrays(1000, 10000, 60000),
    "nested preallocations, big": nested_msgpack_arrays(1000, 10000,
                                                        2000000),
    "items past the end": b"\xdd" + struct.pack(">I", 100000)
    + b"\xc0" * 1000,
    "empty maps": b"\xdd" + struct.pack(">I", 200000) + b"\x80" * 200000,
    "deep": b"\x91" * 2000 + b"\xc0",
    "bin past the end": b"\x92\xc0\xc6" + struct.pack(">I", 2 ** 31)
    + b"\0" * 1000,
    "unused type byte": b"\x92\xc0\xc1" + b"\0" * 1000,
}


@pytest.mark.parametrize("payload", HOSTILE_MSGPACK.values(),
                         ids=HOSTILE_MSGPACK.keys())
def test_hostile_msgpack_is_refused_before_decoding(payload):
    with pytest.raises(ShapeError):
        message_shape.check_msgpack_shape(payload)


def test_the_msgpack_codec_refuses_nested_preallocations():
    report = decode_in_capped_child(
        "MsgpackCodec", HOSTILE_MSGPACK["nested preallocations"])
    assert report.startswith("refused: refused message:"), report


@settings(max_examples=300, deadline=None)
@given(value=msgpack_values())
def test_any_msgpack_value_passes_the_check(value):
    payload = msgpack.packb([value, b"x" * message_shape.
                             MSGPACK_UNCHECKED_SIZE], use_bin_type=True)
    message_shape.check_msgpack_shape(payload)


def test_msgpack_extension_types_pass_the_check():
    moment = datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc)
    payload = msgpack.packb(
        [msgpack.ExtType(5, b"x" * 1000), moment, msgpack.ExtType(1, b"ab"),
         1.5, -3, 2 ** 40, -(2 ** 40)], use_bin_type=True, datetime=True)
    message_shape.check_msgpack_shape(payload)


def test_large_ordinary_msgpack_messages_pass():
    codec = wire.MsgpackCodec()
    oids = tuple(os.urandom(8) for _ in range(100000))
    payload = codec.encode(0, True, "invalidateTransaction",
                           (b"\0" * 8, oids))
    assert codec.decode(payload).args == (b"\0" * 8, oids)
    mapping = {"key%d" % number: number for number in range(10000)}
    payload = codec.encode(3, False, ".reply", mapping)
    assert codec.decode(payload).args == mapping
