"""A TCP proxy on 127.0.0.1 that can play a network partition.

`SilentProxy(target)` listens on a port of its own and relays every
connection it accepts to `target`, both ways.  `silence()` makes it stop
relaying, in both directions, without closing anything: bytes that
arrive are held, as the network holds packets it cannot deliver, and
the peers see no FIN and no reset.  New connections are still accepted
(the kernel completes their handshake) but get nothing through either.
`heal()` lets everything held, and all that follows, through again, as
TCP's retransmissions do once a partition ends.

Its TCP stack still acknowledges what the peers send, so TCP keepalive
does not notice the silence; only an application-level check can.

Every thread is named; `close()` closes every socket and joins them.
"""

import socket
import threading

#: Seconds between looks at the stop flag of a thread that is waiting.
_TICK = 0.05
_CHUNK = 64 * 1024


class SilentProxy:

    def __init__(self, target):
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK)
        self.address = self._listener.getsockname()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # _sockets, _threads
        self._sockets = []
        self._threads = []
        self._start("silent-proxy-accept-%d" % self.address[1], self._accept)

    def silence(self):
        """Stop relaying (both ways), closing nothing."""
        self._flowing.clear()

    def heal(self):
        """Relay again, starting with what was held."""
        self._flowing.set()

    def _start(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name,
                                  daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self):
        while not self._stopping.is_set():
            try:
                client, _peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._open_pair(client)

    def _open_pair(self, client):
        """Connect to the target for `client` and relay between them.  The
        connection is made even while silent; only the bytes wait."""
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets += [client, server]
        port = client.getpeername()[1]
        self._start("silent-proxy-up-%d" % port, self._relay, client, server)
        self._start("silent-proxy-down-%d" % port, self._relay, server,
                    client)

    def _relay(self, source, destination):
        """Copy `source` to `destination`, holding each chunk while
        silent; pass on the end of the stream the same way."""
        while True:
            try:
                data = source.recv(_CHUNK)
            except OSError:
                data = b""
            if not self._wait_until_flowing():
                return
            try:
                if not data:
                    destination.shutdown(socket.SHUT_WR)
                    return
                destination.sendall(data)
            except OSError:
                return

    def _wait_until_flowing(self):
        """True once relaying may go on; False when the proxy closes."""
        while not self._flowing.wait(_TICK):
            if self._stopping.is_set():
                return False
        return not self._stopping.is_set()

    def close(self):
        self._stopping.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in threads:
            thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
