"""What the server runs on, and whether its C extensions are safe there.

A thread per connection runs in parallel only on a free-threaded CPython
(PEP 703, `python3.13t`) with the GIL off.  Such an interpreter turns the
GIL back on when it imports a C extension that does not declare that it
can run without it, and none of ZODB's do (persistent, BTrees,
zodbpickle); `PYTHON_GIL=0` keeps the GIL off regardless, and the safety
of each such extension is then ours to show.  For the ones the server
uses, README.rst ("Free-threaded Python") has the argument; in short:

* BTrees (FileStorage's index, an `fsIndex` of `_fsBTree` buckets): a
  commit updates the index while readers look oids up in it.  FileStorage
  itself keeps them apart for its own reads (its file pool is a
  readers-writer lock: `tpc_finish` waits for every reading `loadBefore`,
  and the other reads hold the storage's lock, as does `tpc_finish`), and
  the two reads it leaves unlocked (`record_iternext`, `len`) run under
  our publication lock, which `ServedStorage.finish` holds around
  `tpc_finish`.  MappingStorage locks every call; any other storage gets
  our per-storage `access` lock around every call.
* persistent: `TimeStamp` values are immutable and made per call; the
  index's buckets are persistent objects without a database, so the
  state flag readers toggle never lets them be deactivated.
* zodbpickle (conflict resolution at vote, `referencesf` in pack): each
  call makes its own unpickler; nothing is shared between threads.

So the audited extensions below may run with the GIL off.  Any other
extension module loaded by then (a storage's, or one a
conflict-resolution class brought in) has not been checked: with the
GIL off the server logs, at WARNING level, each one it finds.
"""

import importlib.machinery
import logging
import os
import sys
import sysconfig

logger = logging.getLogger("zeo.server")

#: Packages (or top-level modules) whose C extensions we checked for use
#: by several server threads at once, or that declare free-threading
#: support themselves (zope.interface, msgpack).  `_cffi_backend` comes
#: with persistent, for a ring the server never uses.
AUDITED = frozenset("""
    BTrees persistent zodbpickle zope.interface _cffi_backend msgpack
""".split())


def gil_enabled():
    """Whether the GIL is on (always, before Python 3.13)."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else is_enabled()


def free_threaded_build():
    """Whether the interpreter was built with `--disable-gil`."""
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def usable_cpus():
    """The CPUs this process may run on (its affinity, where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe():
    """One line: the interpreter, its GIL, and the CPUs it may use."""
    if not free_threaded_build():
        gil = "GIL"
    elif gil_enabled():
        gil = "free-threaded build, GIL enabled"
    else:
        gil = "free-threaded build, GIL disabled"
    return "%s %s (%s), %d CPUs usable" % (
        sys.implementation.name, sys.version.split()[0], gil, usable_cpus())


def unaudited_extensions(modules=None):
    """Names of loaded C extension modules outside the standard library
    and `AUDITED`, sorted."""
    modules = sys.modules if modules is None else modules
    stdlib = getattr(sys, "stdlib_module_names", ())
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name, module in list(modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(suffixes) \
                or name.partition(".")[0] in stdlib:
            continue
        if any(name == package or name.startswith(package + ".")
               for package in AUDITED):
            continue
        found.append(name)
    return sorted(found)


def check_at_start():
    """Log what the server runs on; with the GIL off, warn about each
    loaded extension nobody checked for running without it.  Returns the
    names warned about."""
    logger.info("running on %s", describe())
    if gil_enabled():
        if free_threaded_build():
            logger.info("the GIL is on: an extension module that does not "
                        "declare free-threading support turned it on "
                        "(set PYTHON_GIL=0 to keep it off; see README.rst)")
        return []
    unchecked = unaudited_extensions()
    for name in unchecked:
        logger.warning(
            "the GIL is off, and C extension %s was not checked for use "
            "by several threads at once: it may crash the server or "
            "corrupt data; run with the GIL (PYTHON_GIL=1) unless you know "
            "it is safe", name)
    return unchecked
