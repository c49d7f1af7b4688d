"""`zeo.tls_socket.TLSSocket` under the threads zeo gives it: one reader
while several threads send through an `Outbox` (non-blocking sends from
any thread, the writer thread for the rest), over a real TCP connection
on 127.0.0.1 whose peer reads slowly, so sends do not fit.
"""

import select
import socket
import struct
import threading

import pytest

from zeo import tls
from zeo.rpc import Outbox
from zeo.tls_socket import TLSSocket

#: Frames each sending thread queues, and how many threads send.
FRAMES = 400
SENDERS = 4


def tcp_pair():
    """A connected TCP pair on 127.0.0.1 with small kernel buffers, so
    that non-blocking sends often come up short.  (The sizes are set
    before connecting: shrinking a receive buffer afterwards makes Linux
    drop loopback segments larger than it.)"""
    with socket.socket() as listener:
        _small_buffers(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.socket()
        _small_buffers(client)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _small_buffers(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)


@pytest.fixture
def tls_pair(pki):
    """A handshaken (client, server) pair of TLSSockets."""
    raw_client, raw_server = tcp_pair()
    server = TLSSocket(raw_server, tls.server_context(
        *pki.server, authenticate=[pki.ca]), server_side=True)
    client = TLSSocket(raw_client, pki.client_context(),
                       server_hostname="127.0.0.1")
    handshaking = threading.Thread(target=server.handshake, args=(10,),
                                   name="test-tls-server-handshake")
    handshaking.start()
    client.handshake(10)
    handshaking.join(10)
    yield client, server
    client.close()
    server.close()


def frame(sender, number):
    padding = bytes([sender]) * (number * 37 % 9000)
    body = b"%d:%d:" % (sender, number) + padding
    return struct.pack(">I", len(body)) + body


def read_frames(sock, count):
    """Read `count` frames waiting for readiness with select on the raw
    socket only, as the client's reader thread does: if decrypted data
    were left behind in the SSL object, select would not see it and this
    would time out."""
    data = bytearray()
    buffer = bytearray(256 * 1024)
    frames = []
    while len(frames) < count:
        readable, _, _ = select.select([sock], [], [], 10)
        assert readable, "data left undelivered"
        try:
            received = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # part of a record came: wait for the rest
        assert received, "the peer closed"
        data += buffer[:received]
        while len(data) >= 4:
            size = struct.unpack(">I", data[:4])[0]
            if len(data) < 4 + size:
                break
            frames.append(bytes(data[:4 + size]))
            del data[:4 + size]
    return frames


def test_concurrent_senders_and_a_reader_keep_every_frame_in_order(
        tls_pair):
    client, server = tls_pair
    outbox = Outbox(server, "test-tls-outbox")

    def send(sender):
        for number in range(FRAMES):
            outbox.put(frame(sender, number), wake_writer=False)
            outbox.send_pending()  # non-blocking, from this thread
        outbox.put(b"", wake_writer=True)

    senders = [threading.Thread(target=send, args=(sender,),
                                name="test-tls-sender-%d" % sender)
               for sender in range(SENDERS)]
    # Meanwhile the client talks to the server, whose reader decrypts
    # while the senders encrypt on the same SSL object.
    echo = [frame(9, number) for number in range(FRAMES)]
    talking = threading.Thread(target=client.sendmsg, args=(echo,),
                               name="test-tls-client-sender")
    for thread in senders + [talking]:
        thread.start()
    received = read_frames(client, FRAMES * SENDERS)
    assert read_frames(server, FRAMES) == echo
    for thread in senders + [talking]:
        thread.join(10)
    outbox.close()
    for sender in range(SENDERS):
        mine = [item for item in received
                if item[4:].startswith(b"%d:" % sender)]
        assert mine == [frame(sender, number) for number in range(FRAMES)]


def test_end_of_stream_and_timeouts(tls_pair):
    client, server = tls_pair
    with pytest.raises(BlockingIOError):
        server.recv_into(bytearray(100), 0, socket.MSG_DONTWAIT)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_RDWR)
    assert server.recv(100) == b"last words"
    assert server.recv(100) == b""


def test_a_handshake_with_a_silent_peer_times_out(pki):
    raw_client, raw_server = tcp_pair()
    server = TLSSocket(raw_server, tls.server_context(*pki.server),
                       server_side=True)
    try:
        with pytest.raises(TimeoutError):
            server.handshake(0.2)
    finally:
        raw_client.close()
        server.close()
