"""What a call leaves behind: its reply, and hand-offs to run after it.

A session's method returns its value, raises, or returns a `Reply` when
something must run once the reply is queued (the commit lock handed to
the next voter), or `DEFERRED` when the reply comes later from another
thread.  The connection queues the reply
and then runs the hand-offs, outside every lock.
"""


class Reply:
    """A call's outcome: a value or an error, and what to run once sent.

    `after` is a commit-lock hand-off (see CommitLock.release):
    `run_handoffs` runs it after the reply is sent, outside every lock.
    `release`, for a commit, releases the commit lock once the reply is
    queued, before it is sent, and returns the hand-off.
    """

    __slots__ = ("value", "error", "after", "release")

    def __init__(self, value=None, error=None, after=None):
        self.value = value
        self.error = error
        self.after = after
        self.release = None


#: Returned by a call that will reply later (a parked vote, a pack).
DEFERRED = object()


def run_handoffs(granted):
    """Run commit-lock hand-offs until one keeps the lock."""
    while granted is not None:
        granted = granted()
