"""zeo.bulk_frames: a frame built around an uncopied value decodes as
the ordinary frame of the same message, in both encodings."""

import pytest

from zeo import wire
from zeo.bulk_frames import Framer, frame_around

CODECS = [wire.PickleCodec(), wire.MsgpackCodec()]
OID, SERIAL = b"\0" * 7 + b"\1", b"\x03" * 8


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: codec.protocol)
@pytest.mark.parametrize("size", [0, 1, 255, 256, 59000, 70000])
def test_the_parts_decode_as_the_whole_message(codec, size):
    data = bytes(index * 7 % 256 for index in range(size))
    head, tail = frame_around(codec, 0, wire.ONEWAY, "receiveBlobChunk",
                              (OID, SERIAL), len(data))
    joined = head + data + tail
    reader = wire.FrameReader()
    [payload] = reader.feed(joined)
    message = codec.decode(payload)
    assert (message.msgid, message.flag, message.name) == (
        0, wire.ONEWAY, "receiveBlobChunk")
    assert tuple(message.args) == (OID, SERIAL, data)


def test_a_file_region_follows_its_frame_head_on_a_plain_socket(tmp_path):
    """An upload chunk goes from the file to the socket (os.sendfile):
    the bytes between the head and the tail are the file's, from the
    offset given, and the frame decodes as the whole message."""
    import socket

    from zeo.rpc import send_file_region

    content = bytes(index * 13 % 251 for index in range(200000))
    path = tmp_path / "blob"
    path.write_bytes(content)
    codec = wire.PickleCodec()
    ours, theirs = socket.socketpair()
    size = 59000
    head, tail = frame_around(codec, 0, wire.ONEWAY, "storeBlobChunk", (),
                              size)
    with open(path, "rb") as source:
        send_file_region(ours, [b"", head], source.fileno(), 70000, size)
    ours.sendall(tail)
    ours.close()
    received = b""
    while True:
        data = theirs.recv(1 << 16)
        if not data:
            break
        received += data
    theirs.close()
    [payload] = wire.FrameReader().feed(received)
    message = codec.decode(payload)
    assert message.name == "storeBlobChunk"
    assert message.args[0] == content[70000:70000 + size]


def test_a_file_shorter_than_its_region_is_an_error(tmp_path):
    import socket

    from zeo.rpc import send_file_region

    path = tmp_path / "short"
    path.write_bytes(b"x" * 1000)
    ours, theirs = socket.socketpair()
    with open(path, "rb") as source:
        with pytest.raises(OSError, match="ended 500 bytes early"):
            send_file_region(ours, [b"head"], source.fileno(), 500, 1000)
    ours.close()
    theirs.close()


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: codec.protocol)
def test_a_framer_encodes_once_per_size_and_frames_every_chunk(codec):
    """A blob's chunks: all full but the last.  Each frame decodes as its
    own whole message, and a size seen last time is not encoded again."""
    framer = Framer(codec, 0, wire.ONEWAY, "receiveBlobChunk",
                    (OID, SERIAL))
    chunks = [b"a" * 59000, b"b" * 59000, b"c" * 1234]
    frames = [framer.around(len(chunk)) for chunk in chunks]
    assert frames[1] is frames[0]  # the same encoding, reused
    reader = wire.FrameReader()
    for (head, tail), chunk in zip(frames, chunks):
        [payload] = reader.feed(head + chunk + tail)
        assert tuple(codec.decode(payload).args) == (OID, SERIAL, chunk)
