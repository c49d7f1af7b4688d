"""What a call leaves behind: its reply, and hand-offs to run after it.

A session's method returns its value, raises, or returns a `Reply` when
something must run once the reply is queued (the commit lock handed to
the next voter, a commit's invalidations sent), or `DEFERRED` when the
reply comes later from another thread.  The connection queues the reply
and then runs the hand-offs, outside every lock.
"""


class Reply:
    """A call's outcome: a value or an error, and what to run once sent.

    `after` is a commit-lock hand-off (see CommitLock.release), or for a
    commit `hand_off_then_send`: `run_handoffs` runs it after the reply is
    queued, outside every lock.
    """

    __slots__ = ("value", "error", "after")

    def __init__(self, value=None, error=None, after=None):
        self.value = value
        self.error = error
        self.after = after


#: Returned by a call that will reply later (a parked vote, a pack).
DEFERRED = object()


def run_handoffs(granted):
    """Run commit-lock hand-offs until one keeps the lock."""
    while granted is not None:
        granted = granted()


def hand_off_then_send(granted, served, informed, times):
    """What a commit leaves to do once its reply is queued: hand the lock
    on, then send the invalidations queued on the `informed` sessions of
    `served` (marked in the commit's `times`).

    In that order because the next voter waits for the lock, and only for
    it: with several clients committing, sending every invalidation first
    would hold the lock for one socket send per client.  The invalidations
    were queued under the publication lock, so each session's outbox keeps
    them ahead of anything queued later, the next vote's reply included.
    """
    def after():
        try:
            run_handoffs(granted)
        finally:  # nobody else would send them before the next reply
            times.mark("sending")
            served.send_queued(informed)
            times.mark("sent")
    return after
