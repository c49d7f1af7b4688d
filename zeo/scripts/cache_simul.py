"""Would another cache size do better?  ``python -m zeo.scripts.cache_simul
TRACE -s MB [MB ...]``.

Replays the loads, stores and invalidations of a cache trace (see
`zeo.client.trace`) through one simulated cache per size and prints the
hit ratio and evictions each would have had, next to the traced cache's
own hit ratio.  The simulated caches are this package's cache
(`zeo.client.cache.RevisionCache`, the rules of ClientStorage's cache,
least recently used out first, `ENTRY_OVERHEAD` bytes per entry on top
of the data) holding data lengths instead of data, so the answer is
about our cache policy, whoever wrote the trace.

A load the traced cache missed is followed in the trace by the store of
what the server sent; a load it answered but a simulated cache cannot is
counted as a miss there and the revision stored, as the server's answer
would be.  Contents are kept across "trace opened" records (as for a
persistent cache).
"""

import argparse
import sys

from zeo.client import trace
from zeo.client.cache import ClientCache, next_tid
from zeo.command_line import add_version_option, program_name
from zeo.scripts import positive_number
from zeo.scripts.cache_stats import ratio, read_into, report_error

MB = 2 ** 20

_INVALIDATIONS = frozenset((trace.INVALIDATE_MISS, trace.INVALIDATE_KEEP,
                            trace.INVALIDATE_DISCARD))
_CURRENT_LOADS = frozenset((trace.LOAD_MISS, trace.LOAD_HIT))


class SimulatedCache(ClientCache):
    """Our cache's rules with a data length as the data of each entry."""

    def _data_size(self, location):
        return location


class _EvictionCounter:
    """A tracer that counts the evictions of a simulated cache."""

    def __init__(self):
        self.evictions = 0

    def record(self, code, *fields):
        if code == trace.EVICT:
            self.evictions += 1


class Simulation:
    """One simulated cache of `size` bytes fed trace records."""

    def __init__(self, size):
        self.size = size
        self.cache = SimulatedCache(size)
        self._evictions = _EvictionCounter()
        self.cache.set_tracer(self._evictions)
        self.loads = self.hits = 0

    @property
    def evictions(self):
        return self._evictions.evictions

    def replay(self, record):
        code, oid = record.code, record.oid
        if code in trace.LOAD_CODES:
            self._load(record)
        elif code in trace.STORE_CODES:
            self._store(oid, record.tid, record.end_tid, record.data_length)
        elif code in _INVALIDATIONS:
            if record.tid is None:
                self.cache.forget(oid)
            else:
                self.cache.invalidate(oid, record.tid)
                self.cache.set_last_tid(record.tid)

    def _load(self, record):
        """Current loads ask as ClientStorage.load does; older ones use
        the end tid (the tid asked for by a miss, the end of the revision
        that answered a hit)."""
        self.loads += 1
        if record.code in _CURRENT_LOADS:
            last = self.cache.last_tid()
            before = None if last is None else next_tid(last)
        else:
            before = record.end_tid
        if before is not None and \
                self.cache.load_before(record.oid, before) is not None:
            self.hits += 1
        elif record.code in trace.HIT_CODES and record.tid is not None:
            self._store(record.oid, record.tid, record.end_tid,
                        record.data_length)

    def _store(self, oid, start, end, length):
        self.cache.store(oid, start, end, length)
        if end is None:
            self.cache.set_last_tid(start)


class _TracedLoads:
    """The traced cache's own loads and hits, counted on the way."""

    def __init__(self):
        self.loads = self.hits = 0

    def count(self, record):
        if record.code in trace.LOAD_CODES:
            self.loads += 1
            self.hits += record.code in trace.HIT_CODES


def build_argument_parser():
    parser = argparse.ArgumentParser(
        prog=program_name("zeo.scripts.cache_simul"),
        description="Simulate our client cache at other sizes on a cache "
                    "trace (ours or ZEO's; gzip'ed when named *.gz).")
    parser.add_argument("trace", help="the trace file")
    parser.add_argument(
        "-s", "--size", type=positive_number, nargs="+", default=[20.0],
        metavar="MB", help="cache sizes to simulate, in MB (default 20)")
    add_version_option(parser)
    return parser


def main(argv=None):
    options = build_argument_parser().parse_args(argv)
    simulations = [Simulation(int(size * MB)) for size in options.size]
    traced = _TracedLoads()

    def replay(record):
        traced.count(record)
        for simulation in simulations:
            simulation.replay(record)

    error = read_into(options.trace, replay)
    if traced.loads or error is None:
        print("%s: %d loads, %s hits in the traced cache"
              % (options.trace, traced.loads,
                 ratio(traced.hits, traced.loads)))
        print("%12s %10s %10s %10s %10s" % (
            "size", "loads", "hits", "hit ratio", "evictions"))
        for size, simulation in zip(options.size, simulations):
            print("%12s %10d %10d %10s %10d" % (
                "%g MB" % size, simulation.loads, simulation.hits,
                ratio(simulation.hits, simulation.loads),
                simulation.evictions))
    if error is not None:
        return report_error("cache_simul", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
