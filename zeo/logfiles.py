"""The server's log: setting it up, and reopening its files on SIGUSR2.

Reopening is what log rotation needs: logrotate renames ``zeo.log`` and
sends SIGUSR2; the server must then write every later line to a new
``zeo.log``.  ZConfig's own `reopenFiles` does not quite do that:

* it reopens the handlers one after the other, each under its own lock,
  so with several log files (a DEBUG and an INFO log, say) a line logged
  by a connection thread meanwhile lands in the first handler's new file
  and in the second handler's renamed old one: written to an old stream
  after a new file exists;
* it closes a handler's stream before it opens the new one, so if the
  open fails (a directory left at the path, no permission, no file
  descriptor left) the handler keeps a closed stream and every later line
  is lost, and the error ends the signal loop, stopping the server.

`reopen_log_files` holds the lock of every file handler at once while it
opens the new files and swaps the streams, so a line goes either to all
old files or to all new ones, and it opens before it closes: a file that
cannot be opened keeps its old stream, and the failure is logged.
"""

import logging
import logging.handlers
import sys

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

logger = logging.getLogger(__name__)


def configure(eventlog):
    """Log as the ``<eventlog>`` section says (a ZConfig logger factory),
    or, without one, INFO and above to standard error.

    Raises OSError if a log file cannot be opened.
    """
    if eventlog is not None:
        eventlog()
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(DEFAULT_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def reopenable_handlers():
    """Every file handler of every logger that can reopen its file.

    ZConfig's file handlers have a ``reopen`` method; so are they found,
    whichever logger a configuration attached them to.  A plain
    `logging.FileHandler` (no ``reopen``) is left alone, as ZConfig does.
    """
    loggers = [logging.getLogger()] + [
        candidate for candidate in
        list(logging.Logger.manager.loggerDict.values())
        if isinstance(candidate, logging.Logger)]
    handlers = []
    for each in loggers:
        for handler in list(each.handlers):
            if isinstance(handler, logging.FileHandler) \
                    and callable(getattr(handler, "reopen", None)) \
                    and handler not in handlers:
                handlers.append(handler)
    return handlers


def reopen_log_files():
    """Switch every log file to a new one at the same path, all at once.

    Returns the number of files switched.  Locks are taken in one order
    and a logging call holds one handler lock at a time, so this cannot
    deadlock with them; nothing slower than an ``open`` happens under
    the locks.
    """
    handlers = reopenable_handlers()
    failures = []
    old_streams = []
    for handler in handlers:
        handler.acquire()
    try:
        for handler in handlers:
            try:
                old_streams.append(_switch(handler))
            except OSError as error:
                failures.append((handler, error))
    finally:
        for handler in reversed(handlers):
            handler.release()
    for stream in old_streams:
        if stream is not None:
            stream.close()
    for handler, error in failures:
        logger.error("cannot reopen the log file %s (%s); still writing "
                     "to the old one", handler.baseFilename, error)
    return len(handlers) - len(failures)


def _switch(handler):
    """Point `handler` at a new file (its lock held); return the old
    stream for the caller to close, or None."""
    if isinstance(handler, logging.handlers.BaseRotatingHandler):
        # ZConfig's size- and time-rotating handlers rotate by themselves
        # on reopen; rotating is their own job, done under their lock.
        handler.reopen()
        return None
    if handler.stream is None:
        return None  # opened lazily ("delay"): the next line opens it
    new = open(handler.baseFilename, handler.mode, encoding=handler.encoding,
               errors=handler.errors)
    return handler.setStream(new)
