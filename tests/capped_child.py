"""The start of a child script that caps its own address space.

A decoding test runs the decoder in a child whose address space is
capped, so a broken decoder fails there instead of taking the machine
down.  The cap must be counted from what the interpreter has already
reserved: a free-threaded CPython reserves about 1 GB of address space
at start (its allocator's arenas, mostly never touched), so a fixed 1 GiB
limit, ample for a normal interpreter, leaves it nothing.
"""

#: Prepend to a `python -c` script: the child may reserve 1 GiB more than
#: it had when the script began.
CAP_ADDRESS_SPACE = """\
import resource
with open("/proc/self/status") as _status:
    _reserved = next(int(line.split()[1]) * 1024 for line in _status
                     if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (_reserved + (1 << 30),) * 2)
"""
