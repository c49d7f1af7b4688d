"""Fuzzing zeo.wire's decoders in process.

Whatever bytes arrive, a codec's `decode` either returns a `Message` made
only of plain value types or raises `ProtocolError` (`RefusedGlobals`
for a message that named globals outside the allow-list); any other
exception fails the test, and so does an example that takes more than
a second.  No input may run code: the fuzzed pickles name `os.system`,
`eval`, `subprocess.Popen`, ... with a command that would create a
marker file, and globals of this process (`fuzzing.plant_marker`,
`fuzzing.Trap`) that create it the moment they are resolved and used;
the file must never appear.

Example counts are small in `make test` and large in `make fuzz`
(tests/fuzzing.py).
"""

import os
import pickle
import shutil
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzzing
from fuzzing import (CLIENT_VALUE_TYPES, MSGPACK_VALUE_TYPES,
                     PICKLE_VALUE_TYPES, calling_messages, decode_checked,
                     fuzz_settings, fuzz_timeout, msgpack_payloads,
                     pickle_payloads)
from hostile_pickles import Call, Global, hostile_message
from zeo import wire

#: Per example: decoding a few kilobytes takes milliseconds.
DEADLINE_MS = 1000

pytestmark = fuzz_timeout(300)


@pytest.fixture(scope="module")
def marker():
    """The file a fuzzed pickle creates if it ever runs code; `Trap`
    creates it too."""
    directory = tempfile.mkdtemp(prefix="zeo-fuzz-wire-")
    path = os.path.join(directory, "pwned")
    fuzzing.Trap.marker = path
    try:
        yield path
    finally:
        fuzzing.Trap.marker = None
        shutil.rmtree(directory)


def test_the_marker_does_detect_code_that_ran(marker):
    """The fuzzer's proof works: an unrestricted unpickler that decodes
    one of its pickles creates the marker."""
    for target in (Call(Global("fuzzing", "plant_marker"), [marker]),
                   Call(Global("fuzzing", "Trap"), [])):
        pickle.loads(hostile_message(target))
        assert os.path.exists(marker)
        os.unlink(marker)


@fuzz_settings(500, DEADLINE_MS)
@given(data=st.data())
def test_pickle_decoding_returns_plain_values_or_refuses(marker, data):
    payload = data.draw(pickle_payloads(marker), label="payload")
    decode_checked(wire.PickleCodec(), payload, PICKLE_VALUE_TYPES)
    decode_checked(wire.PickleCodec(wire.CLIENT_GLOBALS), payload,
                   CLIENT_VALUE_TYPES)
    assert not os.path.exists(marker), "decoding %r ran code" % payload


@fuzz_settings(400, DEADLINE_MS)
@given(data=st.data())
def test_calls_of_any_global_are_refused_and_never_run(marker, data):
    """Well-formed messages calling dangerous, allowed and odd globals
    (any text, as STACK_GLOBAL allows) through every calling opcode."""
    payload = data.draw(calling_messages(marker), label="payload")
    decode_checked(wire.PickleCodec(), payload, PICKLE_VALUE_TYPES)
    assert not os.path.exists(marker), "decoding %r ran code" % payload


@fuzz_settings(600, DEADLINE_MS)
@given(payload=msgpack_payloads())
def test_msgpack_decoding_returns_plain_values_or_refuses(payload):
    decode_checked(wire.MsgpackCodec(), payload, MSGPACK_VALUE_TYPES)


@fuzz_settings(300, DEADLINE_MS)
@given(payload=msgpack_payloads() | st.binary(max_size=64))
def test_pickle_codec_refuses_what_is_not_a_pickle(payload):
    """A client that greets with Z5 and then speaks msgpack (or noise)."""
    decode_checked(wire.PickleCodec(), payload, PICKLE_VALUE_TYPES)
