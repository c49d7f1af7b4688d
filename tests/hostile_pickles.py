"""Pickles an attacker would send, written opcode by opcode.

A message pickle that names a global and calls it can run anything in the
process that decodes it.  These helpers build such pickles by hand (no
local object is pickled, so nothing about our own classes leaks in), for
the decoding tests (tests/test_wire.py), the live-server tests
(tests/test_hostile_input.py) and the fuzzers (tests/fuzzing.py).

An expression is a str, a list of str, an int, a `Global` (a name pushed
by GLOBAL or STACK_GLOBAL) or a `Call` of an expression with arguments.
`expression_opcodes(expression, variant)` writes it with one of
`VARIANTS`, the ways a pickle can call what it names: REDUCE after
GLOBAL or STACK_GLOBAL, INST (the name inline, arguments above a MARK)
and OBJ (the callable itself above the MARK).
"""

import collections
import struct

Global = collections.namedtuple("Global", "module name")
Call = collections.namedtuple("Call", "callee args")

VARIANTS = ("GLOBAL+REDUCE", "STACK_GLOBAL+REDUCE", "INST", "OBJ")
PROTOCOL_3 = b"\x80\x03"


def binunicode(text):
    """A BINUNICODE opcode pushing `text`."""
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def global_opcodes(name, stack_global):
    """Push the global `name` (a `Global`) with GLOBAL or STACK_GLOBAL."""
    if stack_global:
        return binunicode(name.module) + binunicode(name.name) + b"\x93"
    return b"c%s\n%s\n" % (name.module.encode(), name.name.encode())


def expression_opcodes(expression, variant="GLOBAL+REDUCE"):
    """The opcodes that push `expression`'s value, calling as `variant`."""
    if isinstance(expression, str):
        return binunicode(expression)
    if isinstance(expression, int):
        return b"J" + struct.pack("<i", expression)
    if isinstance(expression, list):
        return b"](" + b"".join(
            expression_opcodes(item, variant) for item in expression) + b"e"
    if isinstance(expression, Global):
        return global_opcodes(expression, variant == "STACK_GLOBAL+REDUCE")
    arguments = b"".join(expression_opcodes(argument, variant)
                         for argument in expression.args)
    callee = expression.callee
    if variant == "INST" and isinstance(callee, Global):
        return b"(%si%s\n%s\n" % (arguments, callee.module.encode(),
                                  callee.name.encode())
    if variant in ("INST", "OBJ"):
        return b"(" + expression_opcodes(callee, variant) + arguments + b"o"
    return (expression_opcodes(callee, variant) + b"(" + arguments
            + b"tR")


def named_globals(expression):
    """The `module.name` strings of every global `expression` names."""
    if isinstance(expression, Global):
        return {"%s.%s" % expression}
    if isinstance(expression, Call):
        names = named_globals(expression.callee)
        for argument in expression.args:
            names |= named_globals(argument)
        return names
    if isinstance(expression, list):
        return set().union(*map(named_globals, expression))
    return set()


def message_pickle(method, arguments_opcodes, msgid=1, oneway=False):
    """A protocol-3 message `(msgid, oneway, method, args)`, where
    `arguments_opcodes` push the items of the args tuple."""
    assert 0 <= msgid < 256
    flag = b"\x88" if oneway else b"\x89"
    return (PROTOCOL_3 + b"(K" + bytes([msgid]) + flag + binunicode(method)
            + b"(" + arguments_opcodes + b"tt.")


def hostile_message(expression, variant="GLOBAL+REDUCE", method="register",
                    msgid=1, oneway=False):
    """A call `method(expression, False)`: with `register` this is the
    first call a client makes, so it reaches a server before any other."""
    return message_pickle(
        method, expression_opcodes(expression, variant) + b"\x89",
        msgid, oneway)


def forbidden_global_pickle(module, name, *arguments, stack_global=False):
    """A `register` call whose storage name is module.name(*arguments)
    (each a str or a list of str), called with REDUCE."""
    variant = "STACK_GLOBAL+REDUCE" if stack_global else "GLOBAL+REDUCE"
    return hostile_message(Call(Global(module, name), list(arguments)),
                           variant)


def hostile_calls(marker):
    """`{label: expression}`: each expression, if a decoder ever evaluated
    it, would create the file `marker` (or at least import something)."""
    touch = "touch " + marker
    create = "open(%r, 'w').close()" % marker
    popen = Global("subprocess", "Popen")
    return {
        "os.system": Call(Global("os", "system"), [touch]),
        "posix.system": Call(Global("posix", "system"), [touch]),
        "builtins.eval": Call(Global("builtins", "eval"), [create]),
        "builtins.exec": Call(Global("builtins", "exec"), [create]),
        "__builtin__.eval": Call(Global("__builtin__", "eval"), [create]),
        "builtins.open": Call(Global("builtins", "open"), [marker, "w"]),
        "subprocess.Popen": Call(popen, [["touch", marker]]),
        "subprocess.getoutput": Call(Global("subprocess", "getoutput"),
                                     [touch]),
        # getattr(__import__("os"), "system")("touch MARKER")
        "builtins.getattr": Call(Call(Global("builtins", "getattr"), [
            Call(Global("builtins", "__import__"), ["os"]), "system"]),
            [touch]),
        # _reconstructor(Popen, Popen, args) calls Popen.__init__(args)
        "copyreg._reconstructor": Call(
            Global("copyreg", "_reconstructor"),
            [popen, popen, ["touch", marker]]),
        "copy_reg._reconstructor": Call(
            Global("copy_reg", "_reconstructor"),
            [popen, popen, ["touch", marker]]),
        # partial(os.system, "touch MARKER")()
        "functools.partial": Call(Call(Global("functools", "partial"), [
            Global("os", "system"), touch]), []),
        "zodbpickle.pickle": Call(Global("zodbpickle", "pickle"), ["x"]),
    }
