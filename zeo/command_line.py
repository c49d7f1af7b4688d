"""What every command of ours shares: its name and its version.

Each command runs two ways, as a console script installed by pip
(``zeo-runzeo``, ``zeo-pack``, ...; see `COMMANDS`) and as ``python -m
MODULE``.  Help and usage lines name it the way the user ran it.
"""

import importlib.metadata
import os
import sys

DISTRIBUTION = "zeo-threaded"

#: Console script name -> the module whose `main` it runs.  Every name
#: starts with "zeo-": the real ZEO installs ``runzeo``, ``zeopack`` and
#: ``zeoctl``, and the two packages must be installable side by side.
COMMANDS = {
    "zeo-runzeo": "zeo.runzeo",
    "zeo-pack": "zeo.scripts.zeopack",
    "zeo-up": "zeo.scripts.zeoup",
    "zeo-ctl": "zeo.zeoctl",
    "zeo-cache-stats": "zeo.scripts.cache_stats",
    "zeo-cache-simul": "zeo.scripts.cache_simul",
}


def installed_version():
    """Our version, from the installed distribution's metadata; None when
    it is not installed (run from a checkout)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def distribution_version():
    """Our version, or what to say instead, for --version and the log."""
    return (installed_version()
            or "unknown (%s is not installed)" % DISTRIBUTION)


def program_name(module):
    """The command's name as the user typed it: the console script's
    name, or ``python -m MODULE``."""
    invoked = os.path.basename(sys.argv[0] if sys.argv else "")
    if invoked in COMMANDS:
        return invoked
    return "python -m %s" % module


def add_version_option(parser):
    """``--version``: the distribution and its version, then exit."""
    parser.add_argument(
        "--version", action="version",
        version="%s %s" % (DISTRIBUTION, distribution_version()))
