"""How well did a client cache do?
``python -m zeo.scripts.cache_stats TRACE``.

Reads a cache trace (written with the ClientStorage's ``cache_trace``
option or ``ZEO_CACHE_TRACE``, by our client or the real ZEO's; see
`zeo.client.trace`) and prints the totals: loads, hits and hit ratio,
invalidations, stores, evictions, distinct objects and the time span;
then a table per interval (``-i MINUTES``) and the count of each record
code with its meaning.  ``-q`` prints the totals only, ``-v`` every
record as well.

A missing file, or one that is damaged or not a trace, is reported on
standard error with exit status 2; the figures then cover the records
before the damage, if any.
"""

import argparse
import collections
import sys
import time

from zeo.client import trace
from zeo.command_line import add_version_option, program_name
from zeo.scripts import positive_number

#: Exit status for a trace that is missing or damaged.
TRACE_ERROR = 2


class TraceStats:
    """Counts of record codes over a whole trace and per interval."""

    def __init__(self, interval=15 * 60):
        self.interval = interval
        self.codes = collections.Counter()
        self.oids = set()
        self.first = self.last = None
        self.intervals = {}  # interval number -> Counter of codes

    def add(self, record):
        self.codes[record.code] += 1
        if record.oid:
            self.oids.add(record.oid)
        if self.first is None:
            self.first = record.timestamp
        self.last = record.timestamp
        number = record.timestamp // self.interval
        counts = self.intervals.get(number)
        if counts is None:
            counts = self.intervals[number] = collections.Counter()
        counts[record.code] += 1

    @property
    def records(self):
        return sum(self.codes.values())


def loads_and_hits(codes):
    """`(loads, hits)` in a Counter of codes."""
    return (sum(codes[code] for code in trace.LOAD_CODES),
            sum(codes[code] for code in trace.HIT_CODES))


def ratio(hits, loads):
    return "%.1f%%" % (100.0 * hits / loads) if loads else "n/a"


def format_time(timestamp, form="%Y-%m-%d %H:%M:%S"):
    return time.strftime(form, time.localtime(timestamp))


def print_totals(stats, path):
    codes = stats.codes
    loads, hits = loads_and_hits(codes)
    invalidation_hits = sum(codes[code]
                            for code in trace.INVALIDATION_HIT_CODES)
    print("Trace:          %s, %d records" % (path, stats.records))
    if stats.first is not None:
        print("Time span:      %s to %s (%d s)" % (
            format_time(stats.first), format_time(stats.last),
            stats.last - stats.first))
    print("Loads:          %d (%d hits, %d misses)" % (
        loads, hits, loads - hits))
    print("Hit ratio:      %s" % ratio(hits, loads))
    print("Invalidations:  %d hits, %d misses" % (
        invalidation_hits, codes[trace.INVALIDATE_MISS]))
    print("Stores:         %d" % sum(codes[code]
                                     for code in trace.STORE_CODES))
    print("Evictions:      %d" % codes[trace.EVICT])
    print("Distinct oids:  %d" % len(stats.oids))
    print("Cache starts:   %d" % codes[trace.TRACE_OPENED])


def print_intervals(stats):
    print()
    print("%-22s %8s %8s %9s %8s %8s %8s" % (
        "Interval (%g min)" % (stats.interval / 60.0), "loads", "hits",
        "hit ratio", "inv(hit)", "stores", "evicts"))
    for number in sorted(stats.intervals):
        codes = stats.intervals[number]
        loads, hits = loads_and_hits(codes)
        print("%-22s %8d %8d %9s %8d %8d %8d" % (
            format_time(number * stats.interval, "%Y-%m-%d %H:%M"),
            loads, hits, ratio(hits, loads),
            sum(codes[code] for code in trace.INVALIDATION_HIT_CODES),
            sum(codes[code] for code in trace.STORE_CODES),
            codes[trace.EVICT]))


def print_codes(stats):
    print()
    print("%10s  %4s  %s" % ("count", "code", "meaning"))
    for code, count in sorted(stats.codes.items()):
        print("%10d  0x%02X  %s" % (
            count, code, trace.EXPLANATIONS.get(code, "unknown code")))


def print_record(record):
    print("%s 0x%02X %s %s %s %7d  %s" % (
        format_time(record.timestamp), record.code,
        _hex(record.oid), _hex(record.tid), _hex(record.end_tid),
        record.data_length,
        trace.EXPLANATIONS.get(record.code, "unknown code")))


def _hex(value):
    return value.hex() if value else "-" * 16


def read_into(path, consume):
    """Feed every record of the trace `path` to `consume`; return the
    `TraceError` that stopped the reading early, or None."""
    try:
        for record in trace.read_trace(path):
            consume(record)
    except trace.TraceError as error:
        return error
    return None


def report_error(program, error):
    """Say on standard error why a trace could not be read (whole);
    return the exit status."""
    print("%s: %s" % (program, error), file=sys.stderr)
    if error.offset:
        print("%s: the figures cover the %d bytes before that"
              % (program, error.offset), file=sys.stderr)
    return TRACE_ERROR


def build_argument_parser():
    parser = argparse.ArgumentParser(
        prog=program_name("zeo.scripts.cache_stats"),
        description="Statistics of a client cache trace (ours or ZEO's; "
                    "gzip'ed when named *.gz).")
    parser.add_argument("trace", help="the trace file")
    parser.add_argument(
        "-i", "--interval", type=positive_number, default=15.0,
        metavar="MINUTES",
        help="length of the intervals of the table (default 15)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("-q", "--quiet", action="store_true",
                        help="print the totals only")
    output.add_argument("-v", "--verbose", action="store_true",
                        help="print every record too")
    add_version_option(parser)
    return parser


def main(argv=None):
    options = build_argument_parser().parse_args(argv)
    stats = TraceStats(max(1, int(options.interval * 60)))

    def consume(record):
        if options.verbose:
            print_record(record)
        stats.add(record)

    error = read_into(options.trace, consume)
    if stats.records or error is None:
        print_totals(stats, options.trace)
        if not options.quiet:
            print_intervals(stats)
            print_codes(stats)
    if error is not None:
        return report_error("cache_stats", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
