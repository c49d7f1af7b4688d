"""zeo.bulk_frames: a frame built around an uncopied value decodes as
the ordinary frame of the same message, in both encodings."""

import pytest

from zeo import wire
from zeo.bulk_frames import frame_parts_ending_with

CODECS = [wire.PickleCodec(), wire.MsgpackCodec()]
OID, SERIAL = b"\0" * 7 + b"\1", b"\x03" * 8


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: codec.protocol)
@pytest.mark.parametrize("size", [0, 1, 255, 256, 59000, 70000])
def test_the_parts_decode_as_the_whole_message(codec, size):
    data = bytes(index * 7 % 256 for index in range(size))
    parts = frame_parts_ending_with(codec, 0, wire.ONEWAY,
                                    "receiveBlobChunk", (OID, SERIAL), data)
    assert parts[1] is data  # sent as it is, not copied
    joined = b"".join(parts)
    reader = wire.FrameReader()
    [payload] = reader.feed(joined)
    message = codec.decode(payload)
    assert (message.msgid, message.flag, message.name) == (
        0, wire.ONEWAY, "receiveBlobChunk")
    assert tuple(message.args) == (OID, SERIAL, data)
