"""CEL expressions: compiled once at load, checked to be safe, evaluated per event.

The engine is ``common-expression-language`` (module ``cel``, Rust-backed);
``benchmarks/cel_compare.py`` measures it against ``cel-python`` (see
docs/triggers.md for the figures and the reasons). Expressions in a common
subset are also compiled to Python (:mod:`reflexarc.cloud.fastcel`), which
reads the event's values without converting them for the library; whatever
that subset cannot answer exactly, the library evaluates.

CEL itself cannot import, open files, loop without bound or call anything the
host did not register. On top of that every expression is checked at load:

* only the variables of its context (``event``, ``agg``, ...) may be read;
* only CEL's standard functions may be called (an unknown name like
  ``open(...)`` or ``os.system(...)`` is refused, not just left to fail later);
* comprehension macros (``all``, ``exists``, ``exists_one``, ``map``,
  ``filter``) may not be nested, and expressions are at most
  :data:`MAX_LENGTH` characters, so evaluation time stays linear in the event.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cel

from reflexarc.cloud.fastcel import GIVE_UP, compile_fast

MAX_LENGTH = 2000
MAX_MACRO_DEPTH = 1

# CEL standard functions (and the timestamp/duration accessors). Operators
# appear as `_+_`, `!_`, `@in`, ... and are always allowed.
STANDARD_FUNCTIONS = frozenset(
    {
        "size",
        "int",
        "uint",
        "double",
        "string",
        "bytes",
        "bool",
        "type",
        "dyn",
        "duration",
        "timestamp",
        "matches",
        "contains",
        "startsWith",
        "endsWith",
        "has",
        "all",
        "exists",
        "exists_one",
        "map",
        "filter",
        "getFullYear",
        "getMonth",
        "getDayOfYear",
        "getDayOfMonth",
        "getDate",
        "getDayOfWeek",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
    }
)
_MACROS = ("all", "exists_one", "exists", "map", "filter")
_MACRO_RE = re.compile(r"\.\s*(all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_POS_RE = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")


class CelError(ValueError):
    """An expression is invalid or unsafe. ``line``/``column`` are 1-based within the expression."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        self.message = message
        self.line = line
        self.column = column
        where = (
            f" at column {column}"
            if column and (line or 1) == 1
            else (f" at line {line}, column {column}" if column else "")
        )
        super().__init__(f"{message}{where}")


class CelEvalError(RuntimeError):
    """An expression failed on one event (missing field, wrong type, ...)."""


def _strip_strings(src: str) -> str:
    """The source with string literal contents blanked out (same length), for scanning."""
    out = list(src)
    i = 0
    n = len(src)
    while i < n:
        c = src[i]
        if c in "'\"":
            q = src[i : i + 3] if src[i : i + 3] in ("'''", '"""') else c
            j = i + len(q)
            while j < n and src[j : j + len(q)] != q:
                j += 2 if src[j] == "\\" else 1
            for k in range(i + len(q), min(j, n)):
                out[k] = " "
            i = j + len(q)
        else:
            i += 1
    return "".join(out)


def macro_depth(src: str) -> int:
    """How deeply comprehension macros are nested in ``src``."""
    text = _strip_strings(src)
    stack: list[bool] = []
    depth = best = 0
    i = 0
    while i < len(text):
        m = _MACRO_RE.match(text, i)
        if m:
            stack.append(True)
            depth += 1
            best = max(best, depth)
            i = m.end()
            continue
        c = text[i]
        if c in "([{":
            stack.append(False)
        elif c in ")]}" and stack and stack.pop():
            depth -= 1
        i += 1
    return best


def bound_names(src: str) -> set[str]:
    """Names bound by comprehension macros (the ``x`` of ``list.all(x, x > 0)``)."""
    return {m.group(2) for m in _MACRO_RE.finditer(_strip_strings(src))}


def _position(text: str) -> tuple[str, int | None, int | None]:
    m = _POS_RE.search(text)
    if not m:
        return text.strip(), None, None
    return m.group(3).split("\n")[0].strip(), int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Expr:
    """A compiled, checked CEL expression (and its Python form, when it has one)."""

    source: str
    program: Any = field(repr=False, compare=False)
    variables: frozenset[str] = frozenset()
    fast: Callable[[dict[str, Any]], Any] | None = field(default=None, repr=False, compare=False)

    def eval(self, variables: dict[str, Any], scope: Scope | None = None) -> Any:
        """Evaluate with ``variables`` (Python values by name); :class:`CelEvalError` says what went wrong.

        ``scope`` lends the library a context converted once per event, for the
        evaluations the Python form cannot answer.
        """
        fast = self.fast
        if fast is not None:
            try:
                return fast(variables)
            except GIVE_UP:
                pass  # not a case the Python form reproduces exactly: the library decides
        context = (
            scope.context(self, variables)
            if scope is not None
            else {k: variables[k] for k in self.variables if k in variables}
        )
        try:
            return self.program.execute(context)
        except KeyError as exc:
            raise CelEvalError(f"{self.source!r}: no such field {exc.args[0]!r}") from None
        except Exception as exc:  # the Rust binding raises several built-in types
            raise CelEvalError(f"{self.source!r}: {type(exc).__name__}: {exc}") from None

    def truth(self, variables: dict[str, Any], scope: Scope | None = None) -> bool:
        """Evaluate a condition; anything but a boolean is an error (CEL does not coerce)."""
        fast = self.fast
        if fast is not None:
            # eval()'s first step, inline: conditions are evaluated for every event.
            try:
                value = fast(variables)
            except GIVE_UP:
                pass
            else:
                if value is True or value is False:
                    return value
        value = self.eval(variables, scope)
        if type(value) is not bool:
            raise CelEvalError(f"{self.source!r} gave {type(value).__name__} {value!r}, not true/false")
        return value


def compile_expr(source: str, variables: frozenset[str] | set[str], what: str = "expression") -> Expr:
    """Compile and check one expression that may read only ``variables``.

    Raises :class:`CelError` naming the problem (and its column for syntax
    errors) and what would be valid.
    """
    if not isinstance(source, str) or not source.strip():
        raise CelError(f"{what} must be a non-empty CEL expression string")
    if len(source) > MAX_LENGTH:
        raise CelError(f"{what} is {len(source)} characters long; the limit is {MAX_LENGTH}")
    try:
        program = cel.compile(source)
    except (ValueError, RuntimeError) as exc:
        msg, line, col = _position(str(exc))
        raise CelError(f"invalid CEL: {msg}", line, col) from None
    bound = bound_names(source)
    used = set(program.variables()) - bound
    unknown = sorted(used - set(variables))
    if unknown:
        raise CelError(f"unknown variable(s) {', '.join(unknown)} in {what}; available: {', '.join(sorted(variables))}")
    # Operators are reported as `_+_`, `@in`, `!_`...; every plain identifier is a function call.
    calls = {f for f in program.functions() if _IDENT_RE.fullmatch(f)}
    bad = sorted(calls - STANDARD_FUNCTIONS)
    if bad:
        raise CelError(
            f"function(s) {', '.join(bad)} are not allowed: expressions may only call CEL's "
            f"standard functions ({', '.join(sorted(STANDARD_FUNCTIONS - set(_MACROS)))})"
        )
    depth = macro_depth(source)
    if depth > MAX_MACRO_DEPTH:
        raise CelError(
            f"comprehensions ({', '.join(_MACROS)}) are nested {depth} deep; at most "
            f"{MAX_MACRO_DEPTH} level is allowed so that evaluation time stays bounded"
        )
    return Expr(source, program, frozenset(used), compile_fast(source))


class Scope:
    """The library's view of one event's variables, converted at most once.

    Converting Python values to CEL dominates the cost of a library evaluation,
    so the event is converted once (a ``cel.Context``), when an expression the
    Python form cannot answer first needs it, and shared by every such
    expression that reads nothing else; other expressions get only the
    variables they use.
    """

    __slots__ = ("_ctx", "event")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event  # the `event` variable (created per event: nothing else happens here)
        self._ctx: Any = None

    def context(self, expr: Expr, variables: dict[str, Any]) -> Any:
        """A library context for ``expr``: the shared one, or a dict of exactly the variables it reads."""
        if expr.variables <= _EVENT_ONLY:
            if self._ctx is None:
                self._ctx = cel.Context({"event": self.event})
            return self._ctx
        return {k: variables[k] for k in expr.variables if k in variables}


_EVENT_ONLY = frozenset({"event"})


@dataclass(frozen=True)
class ArgTemplate:
    """Task or command arguments: CEL strings are evaluated, other YAML values taken literally."""

    exprs: dict[str, Expr]
    literals: dict[str, Any]

    def render(self, context: dict[str, Any]) -> dict[str, Any]:
        """The argument values for one firing (JSON-ready)."""
        out = dict(self.literals)
        for name, expr in self.exprs.items():
            out[name] = to_json(expr.eval(context))
        return out


def to_json(value: Any) -> Any:
    """A CEL result as plain JSON data (timestamps and durations as text / seconds)."""
    from datetime import datetime, timedelta

    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
