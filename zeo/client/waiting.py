"""What a caller of `zeo.client.connection.Connection` waits on: its
reply (`Waiter`), and, for the reader thread, data on the socket
(`Readiness`)."""

import select
import threading

from zeo.Exceptions import ClientDisconnected


class Waiter:
    """One outstanding two-way call, finished exactly once by whoever reads
    its reply.

    Several threads may wait on one waiter (concurrent loads of the same
    revision share a request): each passes the released lock on to the
    next.  A plain lock costs less than an Event on every call.  `lead`,
    if given, is called with the waiter by an untimed `wait` before it
    sleeps: it reads replies on the caller's thread while nobody else
    does (see `zeo.client.connection`).
    """

    __slots__ = ("method", "apply", "_done", "_lead", "finished", "result",
                 "error")

    def __init__(self, method, apply=None, lead=None):
        self.method = method
        self.apply = apply
        self._done = threading.Lock()
        self._done.acquire()
        self._lead = lead
        self.finished = False
        self.result = None
        self.error = None

    def finish(self, result=None, error=None):
        self.result = result
        self.error = error
        self.finished = True
        self._done.release()

    def wait(self, timeout=None):
        """The call's result; its error is raised.  ClientDisconnected if
        no reply came within `timeout` seconds (None: no limit)."""
        if timeout is None and self._lead is not None and not self.finished:
            self._lead(self)
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise ClientDisconnected("no reply to %s within %s seconds"
                                     % (self.method, timeout))
        self._done.release()
        if self.error is not None:
            raise self.error
        return self.result


class Readiness:
    """Tells the reader thread that the socket has data, one-shot: after
    each notification it must be re-armed, and a leading caller disarms it
    so the reader thread is not woken for data the caller reads itself."""

    def __init__(self, sock):
        self._fd = sock.fileno()
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLIN | select.EPOLLONESHOT)

    def wait(self):
        self._epoll.poll()

    def arm(self):
        self._epoll.modify(self._fd, select.EPOLLIN | select.EPOLLONESHOT)

    def disarm(self):
        self._epoll.modify(self._fd, 0)

    def close(self):
        self._epoll.close()
