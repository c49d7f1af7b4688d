"""Passes over a bench section's measurements, in alternating order."""

import sys


def alternating_passes(items, count, label=""):
    """`(pass number, items)` for each of `count` passes, every other pass
    going backwards: slow drift of the shared machine then hits both sides
    of every comparison alike.  Each pass is announced on stderr, after
    `label` (e.g. "blobs, ")."""
    for number in range(count):
        print("%spass %d/%d ..." % (label, number + 1, count),
              file=sys.stderr, flush=True)
        yield number, items if number % 2 == 0 else items[::-1]
