"""The command line's error boundary: a user's mistake is one line that says what to do, never a traceback.

:func:`explain` turns the errors a user can fix into one line: reflexarc's own
errors (their text already names the file, field or value and what to do),
pydantic validation errors, broker connection errors and OS errors. Anything
else is a bug and keeps its traceback. ``RX_DEBUG=1`` shows the traceback of
every error.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

#: Exit code of a command that stopped on an error the user can fix (usage, configuration, I/O),
#: as click uses for usage errors; 1 is left to check verbs for "problems found".
USER_ERROR = 2

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def debug() -> bool:
    """True when ``RX_DEBUG`` asks for tracebacks."""
    return os.environ.get("RX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _validation(exc: Any) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        msg = str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}" if where else msg)
    more = len(exc.errors()) - 3
    tail = f" (and {more} more)" if more > 0 else ""
    return f"invalid {exc.title}: " + "; ".join(parts) + tail


def _os_error(exc: OSError) -> str:
    if exc.filename is None and exc.strerror is None:
        return str(exc)  # raised with a message of its own
    name = exc.filename if exc.filename is not None else ""
    if isinstance(exc, FileExistsError):
        return f"{name} already exists: choose another path, or pass --force where the command offers it"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or directory: {name}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {name} (check its owner and mode)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({exc}): is the broker or service running, on that host and port?"
    text = exc.strerror or str(exc)
    return f"{text}: {name}" if name else text


def explain(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None when it is a bug (show the traceback)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return _validation(exc)
    if isinstance(exc, ModuleNotFoundError):
        from reflexarc.extras import install_hint

        hint = install_hint(exc.name)  # a library of a tier extra this install lacks
        if hint is not None:
            return hint
    kafka = _kafka_error(exc)
    if kafka is not None:
        return kafka
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}" if str(exc) else "timed out waiting for a broker or service"
    # reflexarc's own errors say what is wrong and what to do; a bug in our code raises
    # builtin exceptions (KeyError, TypeError, ...) and keeps its traceback.
    if type(exc).__module__.startswith("reflexarc.") and isinstance(exc, ValueError | RuntimeError | LookupError):
        return str(exc) or type(exc).__name__
    return None


def _kafka_error(exc: BaseException) -> str | None:
    errors = sys.modules.get("aiokafka.errors")  # only when a command used Kafka
    if errors is None:
        return None
    if isinstance(exc, errors.KafkaConnectionError):
        return (
            f"cannot reach Kafka ({exc}): check the address and the TLS/SASL settings (kafka: in --config, "
            "RX_KAFKA_* or --bootstrap) and that the broker is running"
        )
    if isinstance(exc, errors.KafkaError):
        return f"Kafka refused the request: {exc}"
    return None


def report(exc: BaseException) -> int:
    """Print ``exc`` for a user (one line, or the traceback for a bug or with RX_DEBUG); return the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    line = explain(exc)
    if line is None or debug():
        traceback.print_exception(exc)
        return 1 if line is None else USER_ERROR
    print(f"error: {line}", file=sys.stderr)
    return USER_ERROR
