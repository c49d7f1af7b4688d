"""The names a record may use when the server resolves a write conflict.

ZODB resolves a conflict by unpickling three revisions of the record (the
one being stored, the one it was based on, the committed one) and calling
`_p_resolveConflict` of its class (`ZODB.ConflictResolution`).  Every
global those pickles name is looked up by `ZODB.ConflictResolution.
find_global`, which imports any module and returns anything.  Records are
written by clients, so without a limit any client that may write could
store a record that names `os.system` and have the server call it during
a later conflicting vote.

`TrustedGlobals` is the limit.  A record may name:

- a plain value type from the fixed `VALUE_TYPES` (sets, dates, decimals,
  and the helpers pickle itself uses to rebuild instances);
- anything defined in a trusted package (`conflict-resolution-modules`,
  default `BTrees persistent`): those modules may be imported, and an
  object found there counts only if its own ``__module__`` is trusted too,
  so a trusted module that imports `os` does not lend it out.

Any other name becomes an `UntrustedGlobal` placeholder, and nothing is
imported for it.  The placeholder is ZODB's own `BadClass`, so a
persistent reference that names an application class keeps working (ZODB
keeps the class as module and name); calling or instantiating it raises
`ConflictError`, so a record whose class is untrusted is not resolved and
the client gets the conflict, as from a storage that cannot resolve it.

The lookup applies only while a server thread votes (`resolving_with`);
other threads of the process keep ZODB's own lookup, so an application
that embeds a server and also opens local storages is not changed.

A second path runs a record: a `ConflictError` built with the record's data
names the record's class in its message, and ZODB's `get_pickle_metadata`
finds it by unpickling the record with no limit at all (unless it starts
with a plain GLOBAL opcode).  Every unresolved conflict, even with
`client-conflict-resolution`, builds one.  `install` replaces that function
for the whole process by `record_class_name`, which reads the same names
from the pickle's opcodes without running any.
"""

import contextlib
import importlib
import logging
import pickletools
import threading

import ZODB.ConflictResolution
import ZODB.utils
from ZODB.POSException import ConflictError

logger = logging.getLogger(__name__)

#: The packages trusted when `conflict-resolution-modules` is not given:
#: ZODB's own resolvable data (BTrees, BTrees.Length) and `persistent`.
DEFAULT_TRUSTED_MODULES = ("BTrees", "persistent")

#: Value types that records of resolvable objects contain, and pickle's own
#: rebuilding helpers.  None of them does anything but build a value from
#: its arguments.  `bytes` and `bytearray` are left out: called with an
#: integer they allocate that many bytes.
VALUE_TYPES = frozenset([
    ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"),
    ("builtins", "str"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "complex"), ("builtins", "bool"),
    ("copyreg", "_reconstructor"), ("_codecs", "encode"),
    ("datetime", "date"), ("datetime", "time"), ("datetime", "datetime"),
    ("datetime", "timedelta"), ("datetime", "timezone"),
    ("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID"),
    ("collections", "OrderedDict"), ("collections", "deque"),
    ("zodbpickle", "binary"),
])

#: How many distinct refused names are logged; past that, refusals are
#: still refused but no longer logged (a client inventing names must not
#: flood the log).
LOGGED_REFUSALS_LIMIT = 100


class UntrustedGlobal(ZODB.ConflictResolution.BadClass):
    """A name that a record may mention but the server will not use.

    ZODB builds the record's class with ``klass.__new__(klass)``; on this
    placeholder that, and calling it, raise `ConflictError`, which ZODB
    treats as "not resolvable" (logged at debug level), instead of a
    TypeError that it would log with a traceback for every conflict.
    """

    def __init__(self, trusted, module, name):
        super().__init__(module, name)
        self.__new__ = _refusal(trusted, "%s.%s" % (module, name))

    def __call__(self, *args, **kwargs):
        self.__new__()


def _refusal(trusted, dotted_name):
    """The function an `UntrustedGlobal` runs when used (a closure, not a
    bound method: no reference cycle to wait for the garbage collector)."""
    def refuse(*args, **kwargs):
        trusted.refused(dotted_name, "it is not a class or function defined "
                        "in conflict-resolution-modules")
        raise ConflictError("conflict resolution may not use %s"
                            % dotted_name)
    return refuse


class TrustedGlobals:
    """The lookup of one server's conflict resolution (see module doc)."""

    def __init__(self, modules=DEFAULT_TRUSTED_MODULES, value_types=True):
        self.modules = tuple(modules)
        self._value_types = {}
        if value_types:
            for module, name in VALUE_TYPES:
                self._value_types[module, name] = getattr(
                    importlib.import_module(module), name)
        self._logged = set()
        self._logged_lock = threading.Lock()

    def find_global(self, *args):
        """What a pickle's GLOBAL `module name` stands for."""
        if len(args) != 2 or not all(isinstance(arg, str) for arg in args):
            raise ZODB.ConflictResolution.BadClassName(*args)
        module, name = args
        found = self._value_types.get(args)
        if found is None:
            found = self._from_trusted_module(module, name)
        if found is None:
            return UntrustedGlobal(self, module, name)
        return found

    def is_trusted_module(self, module):
        return any(module == trusted or module.startswith(trusted + ".")
                   for trusted in self.modules)

    def _from_trusted_module(self, module, name):
        if not self.is_trusted_module(module):
            return None
        try:
            found = getattr(importlib.import_module(module), name, None)
        except Exception as error:  # a trusted module's import may fail
            self.refused("%s.%s" % (module, name), "its module cannot be "
                         "imported (%s: %s)" % (type(error).__name__, error))
            return None
        defined_in = getattr(found, "__module__", None)
        if not isinstance(defined_in, str):
            return None
        if not self.is_trusted_module(defined_in):
            return None
        return found

    def refused(self, dotted_name, reason):
        """Log, once per name, that a record needed `dotted_name`, so an
        operator sees which package to add to the trusted ones."""
        with self._logged_lock:
            if (dotted_name in self._logged
                    or len(self._logged) >= LOGGED_REFUSALS_LIMIT):
                return
            self._logged.add(dotted_name)
        # INFO, not WARNING: most application classes have no resolver,
        # and their conflicts are meant to reach the client.
        logger.info(
            "conflict resolution does not use %r: %s (trusted: %s); such "
            "conflicts go back to the client", dotted_name, reason,
            " ".join(self.modules) or "nothing")


#: Client conflict resolution: the server resolves nothing at all.
NOTHING_TRUSTED = TrustedGlobals(modules=(), value_types=False)

_voting = threading.local()
_zodb_find_global = ZODB.ConflictResolution.find_global


def _find_global(*args):
    trusted = getattr(_voting, "trusted", None)
    if trusted is None:
        return _zodb_find_global(*args)
    return trusted.find_global(*args)


#: Opcodes that push a string: the class of ZODB's usual record format,
#: ``((module, name), None)``, is its first two.
_STRING_OPCODES = frozenset([
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES"])

#: Longer names are cut: the result only labels a ConflictError.
_NAME_LIMIT = 200


def record_class_name(data):
    """`(module, name)` of a record's class, as ZODB's
    `get_pickle_metadata` gives it, read from the opcodes of the first
    pickle without running them; ``("", "")`` when there is none."""
    strings = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                strings = argument.split(" ", 1)
                break
            if opcode.name in _STRING_OPCODES:
                if isinstance(argument, bytes):
                    argument = argument.decode("latin-1")
                strings.append(argument)
                if len(strings) == 2:
                    break
    except ValueError:  # not a pickle: no class to name
        pass
    if len(strings) != 2:
        return "", ""
    return tuple(text[:_NAME_LIMIT] for text in strings)


def install():
    """Make reading records safe in this process: ZODB's conflict-
    resolution lookup goes through `resolving_with` (threads outside it
    keep ZODB's), and ConflictError names classes by `record_class_name`.
    """
    ZODB.ConflictResolution.find_global = _find_global
    ZODB.utils.get_pickle_metadata = record_class_name


@contextlib.contextmanager
def resolving_with(trusted):
    """Resolve the conflicts of this thread's storage calls with
    `trusted` (a `TrustedGlobals`) until the block ends; needs `install`."""
    previous = getattr(_voting, "trusted", None)
    _voting.trusted = trusted
    try:
        yield
    finally:
        _voting.trusted = previous
