"""The transaction calls of a session, from tpc_begin to finish or abort.

A mixin of `Session`.  The client streams its changes as one-way calls
(`storea` and friends), which `zeo.server.commit.Buffering` only records;
`vote` asks for the storage's commit lock and replays them into the
storage once it holds it (or parks the vote until then, while the
connection goes on serving loads); `tpc_finish` commits, publishes the
invalidations and hands the lock on.  Each phase is timed
(`CommitTimes`) for the slow-operation log and the lock histograms.
"""

import functools
import logging

from ZODB.POSException import (ConflictError, ReadOnlyError,
                               StorageTransactionError)

from zeo.server.commit import Buffering, Voted
from zeo.server.outcome import DEFERRED, Reply
from zeo.server.timing import CommitTimes
from zeo.wire import short_repr


class CommitCalls:
    """tpc_begin, the stores, vote, tpc_finish and tpc_abort, for a
    `Session` (which provides `served`, `server`, `read_only`, `_txn`,
    `_txn_lock`, `stats`, `log`, `log_error`, `channel`, `commits` and
    `current_msgid`)."""

    def tpc_begin(self, txn_id, user, description, extension, tid=None,
                  status=" "):
        if self.read_only:
            raise ReadOnlyError()
        with self._txn_lock:
            if self._txn is not None:
                if self._txn.txn_id == txn_id:
                    self.log("duplicate tpc_begin(%s) ignored",
                             short_repr(txn_id), level=logging.WARNING)
                    return
                raise StorageTransactionError(
                    "Multiple simultaneous tpc_begin requests from one "
                    "client.")
            self._txn = Buffering(txn_id, user, description, extension, tid,
                                  status)
        self.stats.add("active_txns")

    def tpc_begin_refused(self, txn_id, error):
        """Open a transaction that will fail at vote with `error`.

        tpc_begin is one-way, so this is the first point where the client
        can hear why its transaction cannot commit.
        """
        self.tpc_begin(txn_id, b"", b"", {})
        self._txn.refused = error

    def _buffering(self, txn_id):
        """The open, not yet voting transaction `txn_id`, or an error."""
        if self.read_only:
            raise ReadOnlyError()
        txn = self._txn
        if txn is None or txn.txn_id != txn_id:
            raise StorageTransactionError(txn and txn.txn_id, txn_id)
        return txn

    def storea(self, oid, serial, data, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("store", oid, serial, data)
        self.stats.add("stores")

    def deleteObject(self, oid, serial, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("delete", oid, serial)
        self.stats.add("stores")

    def checkCurrentSerialInTransaction(self, oid, serial, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("checkread", oid, serial)

    def restorea(self, oid, serial, data, prev_txn, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("restore", oid, serial, data,
                                           prev_txn)
        self.stats.add("stores")

    def undoa(self, undo_id, txn_id):
        with self._txn_lock:
            self._buffering(txn_id).record("undo", undo_id)

    def vote(self, txn_id):
        with self._txn_lock:
            txn = self._buffering(txn_id)
            if txn.voting:
                holder = self.served.commit_lock.holder is self
                raise StorageTransactionError(
                    "Already voting (%s)"
                    % ("locked" if holder else "waiting"))
            txn.voting = True
            txn.times = CommitTimes()
            granted = functools.partial(self._vote_when_granted, txn,
                                        self.current_msgid)
            if not self.served.commit_lock.acquire_or_park(self, granted):
                self.log("vote waits for the commit lock (%d waiting)",
                         self.served.commit_lock.waiting, level=logging.DEBUG)
                return DEFERRED
            return self._vote_holding_lock(txn)

    def _vote_when_granted(self, txn, msgid):
        """Run a parked vote now that the lock is ours (any thread)."""
        with self._txn_lock:
            if self._txn is not txn or not self.connected:
                return self.served.commit_lock.release(self)
            reply = self._vote_holding_lock(txn)
        self.channel.reply(msgid, reply)
        return reply.after

    def _vote_holding_lock(self, txn):
        served = self.served
        txn.times.mark("granted")
        try:
            outcome = txn.vote(served, served.client_conflict_resolution)
        except Exception as error:
            self._discard_transaction()
            if isinstance(error, ConflictError):
                served.stats.add("conflicts")
            self.log_error("vote", error)
            if isinstance(error, OSError):
                error = served.could_not_write(error)
            return Reply(error=error,
                         after=self._release_commit_lock(txn, "vote failed"))
        txn.times.mark("voted")
        if isinstance(outcome, Voted):
            self._txn = outcome
            if outcome.resolved:
                served.stats.add("conflicts_resolved", len(outcome.resolved))
            return Reply(outcome.vote_result)
        # Conflicts for the client to resolve: it will store again and vote.
        txn.voting = False
        served.stats.add("conflicts")
        return Reply(outcome, after=self._release_commit_lock(
            txn, "conflicts for the client"))

    def _release_commit_lock(self, txn, outcome):
        """Release the commit lock that `txn` holds, log it if it was
        slow, and return the hand-off.  (The transaction lock held, or
        for a finished transaction, which is no longer the session's,
        once its reply is queued.)"""
        granted = self.served.commit_lock.release(self)
        txn.times.mark("released")
        self.server.slow_log.transaction_ended(self, txn.times, *txn.size,
                                               outcome)
        return granted

    def tpc_finish(self, txn_id):
        with self._txn_lock:
            txn = self._txn
            if txn is None or txn.txn_id != txn_id:
                return None
            if not isinstance(txn, Voted):
                raise AssertionError("finished called wo lock")
            self._txn = None
            self.stats.add("active_txns", -1)
            txn.times.mark("finish_called")
            try:
                outcome = Reply(txn.finish(self.served, self))
            except Exception as error:
                # The storage's failure is logged (CRITICAL) where it is
                # caught, with its traceback.
                self.log("tpc_finish failed: %s", error, level=logging.ERROR)
                outcome = Reply(error=error)
            txn.times.mark("finished")
            # The lock is released only once the reply is queued (the
            # connection runs `release` then): a commit that took it sooner
            # could publish its invalidation first, and an outbox queues
            # what its feed holds before anything put after it, so the
            # client would see a newer tid than its own commit's before
            # that commit's reply (PROTOCOL.md 9).  (The invalidations
            # are the fan-out thread's to send.)
            outcome.release = functools.partial(
                self._release_commit_lock, txn,
                "committed" if outcome.error is None else "failed")
        if outcome.error is None:
            self.commits += 1
            # The connection's thread sends it with the reply, right after.
            self.channel.push("info", (self.served.size_info(),),
                              wake_writer=False)
            self.log("committed %s", outcome.value.hex(), level=logging.DEBUG)
        return outcome

    def tpc_abort(self, txn_id):
        with self._txn_lock:
            txn = self._txn
            if txn is None or txn.txn_id != txn_id:
                return None
            granted = self._abort_transaction()
        return Reply(None, after=granted)

    def _abort_transaction(self):
        """Abort the open transaction and give up the commit lock.

        Called with the transaction lock held; returns the lock hand-off.
        The lock is released even if the storage fails to abort.
        """
        txn = self._txn
        try:
            txn.abort(self.served)
        except Exception:
            self.log("tpc_abort failed", level=logging.ERROR, exc_info=True)
        self._discard_transaction()
        self.stats.add("aborts")
        if txn.times is None:  # it never voted: no lock to release
            return self.served.commit_lock.release(self)
        return self._release_commit_lock(txn, "aborted")

    def _discard_transaction(self):
        if self._txn is not None:
            self._txn.close()
            self._txn = None
            self.stats.add("active_txns", -1)
