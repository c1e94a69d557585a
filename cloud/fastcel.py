"""A common subset of CEL compiled to Python, exact where it answers; the Rust CEL library decides the rest.

Why: the Rust binding (``common-expression-language``) evaluates an
expression in ~0.3 us, but converting an event to its values costs ~16 us (a
few us per string), once per event and again for every expression that also
reads ``agg`` or ``window``. That conversion, not CEL, bounded the engine.
Expressions here read the event's Python values directly.

How: :func:`compile_fast` parses an expression (already accepted by the Rust
library, which stays the judge of syntax, variables and functions) and, if it
lies in the subset below, builds a Python function of the variables. Every
operation checks the types of its operands and *gives up* (raises
:class:`Fallback`) on anything whose CEL result it does not reproduce exactly:
mixed or unknown types, integers outside 64 bits, overflow, division by zero,
NaN in an ordering, a missing field. The caller then evaluates the same
expression with the Rust library, which returns CEL's value or its error. So
a value from here is always CEL's value (``tests/unit/cloud/test_cloud_fastcel.py``
checks it against the Rust library on thousands of random expressions), and
errors, ``&&``/``||`` absorbing errors, timestamps, regular expressions and
macros are always the library's.

The subset: literals (int, double, string with simple escapes, bool, null),
lists and maps of them, variables, field selection and indexing, ``has()``,
``!``, unary ``-``, ``* / % + -``, comparisons, ``in``, ``&&``, ``||``,
``?:``, and the functions ``size``, ``int``, ``double``, ``string``,
``startsWith``, ``endsWith``, ``contains``.

Safety: the Python source is generated from the parsed expression; names and
literals enter it only as Python literals (``repr``), operators only as calls
of the helpers below. Nothing of the expression text is executed as code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
_NONE = type(None)
_SCALARS = (int, float, str, bool, _NONE)


class Fallback(Exception):
    """This evaluation is not one the Python subset reproduces exactly: ask the Rust library."""


class _Unsupported(Exception):
    """The expression is outside the subset (compile time)."""


# ---- runtime helpers (each checks types; anything unusual -> Fallback) ---------------
def _int(a: Any) -> bool:
    return type(a) is int and INT_MIN <= a <= INT_MAX


def _cmp_args(a: Any, b: Any) -> tuple[Any, Any]:
    """Operands CEL orders the way Python does (int vs double: as doubles), or Fallback."""
    ta, tb = type(a), type(b)
    if ta is int:
        if not INT_MIN <= a <= INT_MAX:
            raise Fallback
        if tb is int:
            if not INT_MIN <= b <= INT_MAX:
                raise Fallback
            return a, b
        if tb is float and b == b:
            return float(a), b
        raise Fallback
    if ta is float:
        if a != a:
            raise Fallback  # CEL refuses to order NaN
        if tb is float and b == b:
            return a, b
        if tb is int and INT_MIN <= b <= INT_MAX:
            return a, float(b)
        raise Fallback
    if (ta is str or ta is bool) and tb is ta:
        return a, b
    raise Fallback


def _lt(a: Any, b: Any) -> bool:
    x, y = _cmp_args(a, b)
    return x < y


def _le(a: Any, b: Any) -> bool:
    x, y = _cmp_args(a, b)
    return x <= y


def _gt(a: Any, b: Any) -> bool:
    x, y = _cmp_args(a, b)
    return x > y


def _ge(a: Any, b: Any) -> bool:
    x, y = _cmp_args(a, b)
    return x >= y


def _eq(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    if ta is tb:
        if ta is int:
            if not (INT_MIN <= a <= INT_MAX and INT_MIN <= b <= INT_MAX):
                raise Fallback
            return a == b
        if ta is float or ta is str or ta is bool or ta is _NONE:
            return a == b
        raise Fallback
    if ta is int and tb is float:
        if not INT_MIN <= a <= INT_MAX:
            raise Fallback
        return float(a) == b
    if ta is float and tb is int:
        if not INT_MIN <= b <= INT_MAX:
            raise Fallback
        return a == float(b)
    if ta in _SCALARS and tb in _SCALARS:
        if (ta is int and not INT_MIN <= a <= INT_MAX) or (tb is int and not INT_MIN <= b <= INT_MAX):
            raise Fallback
        return False  # CEL: values of different kinds are not equal
    raise Fallback


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _in(a: Any, c: Any) -> bool:
    tc = type(c)
    if tc is list:
        return any(_eq(a, x) for x in c)
    if tc is dict and type(a) is str:
        return a in c
    raise Fallback


def _int64(a: int, b: int, r: int) -> int:
    """``r`` = ``a op b`` if operands and result are 64-bit integers (else the library reports overflow)."""
    if INT_MIN <= a <= INT_MAX and INT_MIN <= b <= INT_MAX and INT_MIN <= r <= INT_MAX:
        return r
    raise Fallback


def _add(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is int and tb is int:
        return _int64(a, b, a + b)
    if (ta is float or ta is str or ta is list) and tb is ta:
        return a + b
    raise Fallback


def _sub(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is int and tb is int:
        return _int64(a, b, a - b)
    if ta is float and tb is float:
        return a - b
    raise Fallback


def _mul(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is int and tb is int:
        return _int64(a, b, a * b)
    if ta is float and tb is float:
        return a * b
    raise Fallback


def _div(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is int and tb is int:
        if b == 0 or not (_int(a) and _int(b)) or (a == INT_MIN and b == -1):
            raise Fallback
        q = abs(a) // abs(b)  # CEL truncates towards zero
        return q if (a < 0) == (b < 0) else -q
    if ta is float and tb is float and b != 0.0:
        return a / b
    raise Fallback


def _mod(a: Any, b: Any) -> Any:
    if type(a) is int and type(b) is int:
        if b == 0 or not (_int(a) and _int(b)) or (a == INT_MIN and b == -1):
            raise Fallback
        r = abs(a) % abs(b)  # the sign of the dividend, as in C and Rust
        return -r if a < 0 else r
    raise Fallback


def _neg(a: Any) -> Any:
    ta = type(a)
    if ta is int and INT_MIN < a <= INT_MAX:
        return -a
    if ta is float:
        return -a
    raise Fallback


def _not(a: Any) -> bool:
    if type(a) is bool:
        return not a
    raise Fallback


def _bool(a: Any) -> bool:
    if type(a) is bool:
        return a
    raise Fallback


def _has(o: Any, name: str) -> bool:
    if type(o) is dict:
        return name in o
    raise Fallback


def _index(o: Any, k: Any) -> Any:
    to = type(o)
    if to is dict and type(k) is str:
        return o[k]
    if to is list and type(k) is int and 0 <= k < len(o):
        return o[k]
    raise Fallback


def _size(a: Any) -> int:
    ta = type(a)
    if ta is str:
        return len(a.encode())  # the library counts UTF-8 bytes
    if ta is list or ta is dict:
        return len(a)
    raise Fallback


def _double(a: Any) -> float:
    ta = type(a)
    if ta is float:
        return a
    if ta is int and INT_MIN <= a <= INT_MAX:
        return float(a)
    raise Fallback


def _to_int(a: Any) -> int:
    ta = type(a)
    if ta is int and INT_MIN <= a <= INT_MAX:
        return a
    if ta is float and -9.2e18 < a < 9.2e18:
        return int(a)  # truncates towards zero, as CEL
    raise Fallback


def _string(a: Any) -> str:
    ta = type(a)
    if ta is str:
        return a
    if ta is int and INT_MIN <= a <= INT_MAX:
        return str(a)
    raise Fallback


def _ok(v: Any) -> Any:
    """A result the library would give as is (it turns integers beyond 64 bits into doubles, ...)."""
    t = type(v)
    if t is bool or t is float or t is str or t is _NONE:
        return v
    if t is int:
        if INT_MIN <= v < 2**64:
            return v
        raise Fallback
    if t is list:
        for x in v:
            _ok(x)
        return v
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise Fallback
            _ok(x)
        return v
    raise Fallback  # timestamps, bytes, ...: the library's own conversion decides


def _starts(a: Any, b: Any) -> bool:
    if type(a) is str and type(b) is str:
        return a.startswith(b)
    raise Fallback


def _ends(a: Any, b: Any) -> bool:
    if type(a) is str and type(b) is str:
        return a.endswith(b)
    raise Fallback


def _contains(a: Any, b: Any) -> bool:
    if type(a) is str and type(b) is str:
        return b in a
    raise Fallback


_HELPERS: dict[str, Any] = {
    f.__name__: f
    for f in (
        _lt,
        _le,
        _gt,
        _ge,
        _eq,
        _ne,
        _in,
        _add,
        _sub,
        _mul,
        _div,
        _mod,
        _neg,
        _not,
        _bool,
        _has,
        _index,
        _size,
        _double,
        _to_int,
        _string,
        _ok,
        _starts,
        _ends,
        _contains,
    )
}
_BINARY = {
    "<": "_lt",
    "<=": "_le",
    ">": "_gt",
    ">=": "_ge",
    "==": "_eq",
    "!=": "_ne",
    "in": "_in",
    "+": "_add",
    "-": "_sub",
    "*": "_mul",
    "/": "_div",
    "%": "_mod",
}
_GLOBAL_FUNCS = {"size": "_size", "double": "_double", "int": "_to_int", "string": "_string"}
_METHODS = {"startsWith": "_starts", "endsWith": "_ends", "contains": "_contains", "size": "_size"}
# Integers that doubles hold exactly: CEL compares int with double as doubles, Python exactly;
# within this range the two agree, so the inline comparisons below may use Python's.
EXACT = 2**53
_LIT = object()  # no literal


# ---- tokens -------------------------------------------------------------------------
_TOKEN = re.compile(
    r"""(?P<ws>\s+|//[^\n]*)
      |(?P<float>\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)
      |(?P<int>\d+)(?P<suffix>[uU]|[xX][0-9a-fA-F]*)?
      |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      |(?P<op>\|\||&&|==|!=|<=|>=|[-+*/%<>!?:.,\[\](){}])
    """,
    re.VERBOSE,
)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    value: Any = None


def _unquote(text: str) -> str:
    body = text[1:-1]
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1] if i + 1 < len(body) else ""
            if nxt not in _ESCAPES:
                raise _Unsupported(f"escape \\{nxt}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _tokens(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            raise _Unsupported(f"character {src[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        text = m.group(0)
        if kind == "suffix" or m.group("suffix"):
            raise _Unsupported("uint or hex literal")
        if kind == "float":
            toks.append(_Tok("lit", text, float(text)))
        elif kind == "int":
            value = int(m.group("int"))
            if value > INT_MAX + 1:
                raise _Unsupported("integer literal out of range")
            toks.append(_Tok("lit", text, value))
        elif kind == "string":
            if toks and toks[-1].kind == "ident" and toks[-1].text in ("r", "R", "b", "B"):
                raise _Unsupported("raw or bytes literal")
            toks.append(_Tok("lit", text, _unquote(text)))
        elif kind == "ident":
            if text in ("true", "false"):
                toks.append(_Tok("lit", text, text == "true"))
            elif text == "null":
                toks.append(_Tok("lit", text, None))
            elif text == "in":
                toks.append(_Tok("op", text))
            else:
                toks.append(_Tok("ident", text))
        else:
            toks.append(_Tok("op", text))
    toks.append(_Tok("end", ""))
    return toks


# ---- parser: CEL's grammar, producing (python source, static type) ------------------
class _Parser:
    """Recursive descent over CEL's precedence levels; emits Python source for the subset."""

    def __init__(
        self, src: str, names: dict[str, str] | None = None, prefix: str = "_t", shared: dict[str, str] | None = None
    ) -> None:
        self.toks = _tokens(src)
        self.prefix = prefix
        # Field paths read once for several expressions: path code -> local name (see python_code).
        self.shared = shared
        self.pure = {code for code in (names or {}).values() if code.isidentifier()} | set((shared or {}).values())
        # Locals of shared field paths (their comparisons with literals share their type tests).
        self.shared_locals = set((shared or {}).values())
        # Variable -> the Python code that reads it (default: the variables dict ``V``).
        self.names = names
        self.i = 0
        # Code of each field selection -> (code of the object, field name), for has().
        self.selects: dict[str, tuple[str, str]] = {}
        # Code of each literal -> its value (for the inline forms of operations with a literal).
        self.literals: dict[str, Any] = {}
        self.temps = 0

    def temp(self) -> str:
        """A fresh local name for a value used more than once in an inline form."""
        self.temps += 1
        return f"{self.prefix}{self.temps}"

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self, text: str | None = None) -> _Tok:
        tok = self.toks[self.i]
        if text is not None and tok.text != text:
            raise _Unsupported(f"expected {text!r}, got {tok.text!r}")
        self.i += 1
        return tok

    def at(self, *texts: str) -> bool:
        tok = self.toks[self.i]
        return tok.kind == "op" and tok.text in texts

    def parse(self) -> tuple[str, str | None]:
        code = self.expr()
        if self.peek().kind != "end":
            raise _Unsupported("trailing input")
        return code

    def expr(self) -> tuple[str, str | None]:
        cond = self.or_()
        if self.at("?"):
            self.take("?")
            yes = self.or_()
            self.take(":")
            no = self.expr()
            typ = yes[1] if yes[1] == no[1] else None
            return f"({yes[0]} if {self._as_bool(cond)} else {no[0]})", typ
        return cond

    @staticmethod
    def _as_bool(node: tuple[str, str | None]) -> str:
        return node[0] if node[1] == "bool" else f"_bool({node[0]})"

    def or_(self) -> tuple[str, str | None]:
        left = self.and_()
        while self.at("||"):
            self.take()
            right = self.and_()
            left = f"({self._as_bool(left)} or {self._as_bool(right)})", "bool"
        return left

    def and_(self) -> tuple[str, str | None]:
        left = self.rel()
        while self.at("&&"):
            self.take()
            right = self.rel()
            left = f"({self._as_bool(left)} and {self._as_bool(right)})", "bool"
        return left

    def rel(self) -> tuple[str, str | None]:
        left = self.add()
        while self.at("<", "<=", ">", ">=", "==", "!=", "in"):
            op = self.take().text
            right = self.add()
            left = self._inline_compare(op, left[0], right[0]) or (f"{_BINARY[op]}({left[0]}, {right[0]})", "bool")
        return left

    def _inline_compare(self, op: str, left: str, right: str) -> tuple[str, str] | None:
        """``x OP literal`` as Python's own operator when x is of the literal's kind (the hot case), else the helper.

        The condition is evaluated first and binds ``x`` to a local, so ``x`` is computed once.
        """
        lit = self.literals.get(right, _LIT)
        if lit is _LIT or op == "in":
            return None
        if self.shared is not None and left in self.shared_locals:
            return self._guarded_compare(op, left, right, lit)
        k = self.temp()
        test = self._type_test(op, lit, f"{k} := {left}", k)
        if test is None:
            return None
        return f"({k} {op} {right} if {test} else {_BINARY[op]}({k}, {right}))", "bool"

    @staticmethod
    def _type_test(op: str, lit: Any, first: str, name: str) -> str | None:
        """Code testing that an operand is of a kind Python compares with ``lit`` as CEL does; None if none is.

        Doubles (not NaN for an ordering) and integers that doubles hold
        exactly, or strings with a string. ``first`` is the operand's code at
        its first mention (it may bind ``name``), ``name`` at the others.
        """
        if type(lit) in (int, float) and type(lit) is not bool and -EXACT <= lit <= EXACT:
            floats = f"type({name}) is float" + (f" and {name} == {name}" if op not in ("==", "!=") else "")
            return f"type({first}) is int and {-EXACT} <= {name} <= {EXACT} or {floats}"
        if type(lit) is str:
            return f"type({first}) is str"
        return None

    def _guarded_compare(self, op: str, left: str, right: str, lit: Any) -> tuple[str, str] | None:
        """:meth:`_inline_compare` of a shared path: its type test is shared too.

        The test (``_c1`` is an int that doubles hold exactly, or a float
        that is not NaN ...) is itself a shared value, computed once per event
        in the caller's prologue, so that many triggers comparing one field
        with their literals (thresholds) pay one test, not one each.
        """
        test = self._type_test(op, lit, left, left)
        if test is None:
            return None
        assert self.shared is not None
        guard = self.shared.setdefault(f"({test})", f"_c{len(self.shared)}")
        return f"({left} {op} {right} if {guard} else {_BINARY[op]}({left}, {right}))", "bool"

    def add(self) -> tuple[str, str | None]:
        left = self.mul()
        while self.at("+", "-"):
            op = self.take().text
            right = self.mul()
            left = f"{_BINARY[op]}({left[0]}, {right[0]})", None
        return left

    def mul(self) -> tuple[str, str | None]:
        left = self.unary()
        while self.at("*", "/", "%"):
            op = self.take().text
            right = self.unary()
            lit = self.literals.get(right[0], _LIT)
            if op == "%" and type(lit) is int and lit > 0:
                # A non-negative int modulo a positive literal: Python's % is C's (and CEL's) there.
                k = self.temp()
                left = (
                    (
                        f"({k} % {right[0]} if type({k} := {left[0]}) is int and 0 <= {k} <= {INT_MAX} "
                        f"else _mod({k}, {right[0]}))"
                    ),
                    "int",
                )
            else:
                left = f"{_BINARY[op]}({left[0]}, {right[0]})", None
        return left

    def unary(self) -> tuple[str, str | None]:
        if self.at("!"):
            self.take()
            inner = self.unary()
            return f"_not({inner[0]})", "bool"
        if self.at("-"):
            self.take()
            tok = self.peek()
            if tok.kind == "lit" and type(tok.value) in (int, float) and not self._member_follows():
                self.take()
                value = -tok.value
                if type(value) is int and value < INT_MIN:
                    raise _Unsupported("integer literal out of range")
                self.literals[repr(value)] = value
                return repr(value), type(value).__name__
            inner = self.unary()
            return f"_neg({inner[0]})", None
        return self.member()

    def _member_follows(self) -> bool:
        nxt = self.toks[self.i + 1]
        return nxt.kind == "op" and nxt.text in (".", "[")

    def member(self) -> tuple[str, str | None]:
        node = self.primary()
        while True:
            if self.at("."):
                self.take()
                name = self.take()
                if name.kind != "ident":
                    raise _Unsupported("field name")
                if self.at("("):
                    args = self.args(")")
                    func = _METHODS.get(name.text)
                    if func is None or len(args) != 1 - (name.text == "size"):
                        raise _Unsupported(f"method {name.text}")
                    typ = "int" if name.text == "size" else "bool"
                    node = f"{func}({', '.join([node[0], *(a[0] for a in args)])})", typ
                else:
                    # A plain subscript: every value here is JSON data, a dict of ours or a
                    # datetime, and all but a dict raise TypeError (-> the library decides).
                    code = f"{node[0]}[{name.text!r}]"
                    if self.shared is not None and node[0] in self.pure:
                        # A path from a variable: read once (in the caller's prologue), named here.
                        code = self.shared.setdefault(code, f"_c{len(self.shared)}")
                        self.pure.add(code)
                        self.shared_locals.add(code)
                    self.selects[code] = (node[0], name.text)
                    node = code, None
            elif self.at("["):
                self.take()
                key = self.expr()
                self.take("]")
                node = f"_index({node[0]}, {key[0]})", None
            else:
                return node

    def args(self, close: str) -> list[tuple[str, str | None]]:
        self.take("(" if close == ")" else "[")
        out: list[tuple[str, str | None]] = []
        while not self.at(close):
            out.append(self.expr())
            if not self.at(close):
                self.take(",")
        self.take(close)
        return out

    def primary(self) -> tuple[str, str | None]:
        tok = self.peek()
        if tok.kind == "lit":
            self.take()
            typ = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(tok.value))
            if type(tok.value) is int and tok.value > INT_MAX:
                raise _Unsupported("integer literal out of range")
            self.literals[repr(tok.value)] = tok.value
            return repr(tok.value), typ
        if tok.kind == "ident":
            self.take()
            if self.at("("):
                args = self.args(")")
                if tok.text == "has":
                    return self._has(args)
                func = _GLOBAL_FUNCS.get(tok.text)
                if func is None or len(args) != 1:
                    raise _Unsupported(f"function {tok.text}")
                typ = {"size": "int", "double": "float", "int": "int", "string": "str"}[tok.text]
                return f"{func}({args[0][0]})", typ
            if self.names is None:
                return f"V[{tok.text!r}]", None
            if tok.text not in self.names:
                raise _Unsupported(f"variable {tok.text} not bound")
            return self.names[tok.text], None
        if self.at("("):
            self.take()
            inner = self.expr()
            self.take(")")
            return inner
        if self.at("["):
            items = self.args("]")
            return "[" + ", ".join(a[0] for a in items) + "]", "list"
        if self.at("{"):
            return self._map()
        raise _Unsupported(f"token {tok.text!r}")

    def _has(self, args: list[tuple[str, str | None]]) -> tuple[str, str | None]:
        # has(x.f) was parsed as the selection x['f']: test presence instead of reading.
        if len(args) != 1 or args[0][0] not in self.selects:
            raise _Unsupported("has() of something other than a field")
        obj, name = self.selects[args[0][0]]
        k = self.temp()
        return f"({name!r} in {k} if type({k} := {obj}) is dict else _has({k}, {name!r}))", "bool"

    def _map(self) -> tuple[str, str | None]:
        self.take("{")
        parts = []
        while not self.at("}"):
            key = self.take()
            if key.kind != "lit" or type(key.value) is not str:
                raise _Unsupported("map key other than a string literal")
            self.take(":")
            parts.append(f"{key.value!r}: {self.expr()[0]}")
            if not self.at("}"):
                self.take(",")
        self.take("}")
        return "{" + ", ".join(parts) + "}", "map"


def python_code(
    source: str, names: dict[str, str], prefix: str = "_t", shared: dict[str, str] | None = None
) -> str | None:
    """The Python expression for ``source`` with variables read as ``names`` give, or ``None`` outside the subset.

    For generated code that evaluates several expressions in one function (the
    engine's triggers without a window); it needs :data:`HELPERS` in its
    globals, and it returns CEL's value or raises one of :data:`GIVE_UP`.
    Temporaries are named ``prefix`` + a number.

    With ``shared``, field paths from a variable (``event.data.value``) are
    named instead of read: ``shared`` maps each path's code (``E['data']['value']``)
    to a local (``_c1``) that the caller assigns once, before the expressions,
    in insertion order (a path's parent comes first) - or assigns
    :data:`MISSING` when reading it raises. Every operation gives up on
    :data:`MISSING` (it is of no CEL type), so an expression reading a missing
    field still goes to the library, as it would have raised ``KeyError``.
    ``shared`` also receives the type tests of comparisons of such paths with
    literals (``_c2`` = whether ``_c1`` is a number Python compares as CEL
    does), assigned the same way after their path: then a hundred thresholds
    on one field test its type once.
    """
    try:
        code, typ = _Parser(source, names, prefix, shared).parse()
    except (_Unsupported, IndexError, ValueError, RecursionError):
        return None
    return code if typ in ("bool", "int", "float", "str") else f"_ok({code})"


def compile_fast(source: str) -> Callable[[dict[str, Any]], Any] | None:
    """A Python function of the variables for ``source``, or ``None`` if it is outside the subset.

    The function returns CEL's value or raises one of :data:`GIVE_UP`; then
    the caller asks the Rust library (see the module docstring).
    """
    try:
        code, typ = _Parser(source).parse()
    except (_Unsupported, IndexError, ValueError, RecursionError):
        return None
    if typ not in ("bool", "int", "float", "str"):
        code = f"_ok({code})"
    namespace: dict[str, Any] = dict(_HELPERS)
    # The source is generated (see the module docstring), not the expression's text.
    exec(compile(f"def _fast(V):\n    return {code}\n", "<cel-fast>", "exec"), namespace)
    fn: Callable[[dict[str, Any]], Any] = namespace["_fast"]
    fn.__doc__ = f"CEL {source!r} as Python: {code}"
    return fn


#: What a fast evaluation may raise instead of a value: the Rust library then decides.
GIVE_UP = (Fallback, LookupError, TypeError, ValueError, ArithmeticError, RecursionError)
#: The helpers generated code calls (the globals of a function built from :func:`python_code`).
HELPERS = dict(_HELPERS)
#: A shared path that could not be read (see :func:`python_code`): no operation accepts it.
MISSING = type("_Missing", (), {"__slots__": (), "__repr__": lambda self: "MISSING"})()

__all__ = ["GIVE_UP", "HELPERS", "INT_MAX", "INT_MIN", "MISSING", "Fallback", "compile_fast", "python_code"]
