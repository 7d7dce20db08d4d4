"""Turn an exception raised inside a technique (a plugin's hook) into a message that names it.

A hook that raises during ``apply`` or generation would otherwise reach the user as a raw
traceback from deep inside pluggy. :func:`failure_message` finds, in the traceback, the
innermost frame that belongs to a registered technique (its class's methods or its plugin
module) and says which technique and plugin failed, what the error was, and where to look.
``EFFINFER_DEBUG=1`` keeps the full traceback (for plugin authors).
"""

from __future__ import annotations

import os
import traceback
from types import TracebackType
from typing import Any

__all__ = ["DEBUG_ENV", "culprit", "failure_message"]

DEBUG_ENV = "EFFINFER_DEBUG"


def culprit(error: BaseException, registry: Any) -> Any | None:
    """The registry entry of the technique whose code raised ``error``, or ``None``."""
    from effinfer.core.technique import Technique

    by_module: dict[str, Any] = {}
    for entry in registry.techniques.values():
        by_module.setdefault(entry.technique.__module__, entry)
    found = None
    tb: TracebackType | None = error.__traceback__
    while tb is not None:  # outermost to innermost; keep the innermost match
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, Technique) and owner.name in registry.techniques:
            found = registry.techniques[owner.name]
        elif frame.f_globals.get("__name__") in by_module:
            found = by_module[frame.f_globals["__name__"]]
        tb = tb.tb_next
    cause = error.__cause__ or error.__context__
    if found is None and cause is not None and cause is not error:
        return culprit(cause, registry)
    return found


def failure_message(error: BaseException, registry: Any, doing: str = "running the experiment") -> str:
    """``technique rtn (plugin rtn, distribution effinfer) failed …: ValueError: …`` plus the fix."""
    entry = culprit(error, registry)
    what = f"{type(error).__name__}: {error}"
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    trace = "\n" + "".join(traceback.format_exception(error)) if debug else ""
    hint = f" (set {DEBUG_ENV}=1 for the traceback)" if not debug else ""
    from effinfer.core.errors import EffinferError

    if entry is None:
        if isinstance(error, EffinferError):  # effinfer's own message names the problem and the fix
            return f"{error}{trace}"
        return f"{doing} failed: {what}{hint}{trace}"
    name = entry.technique.name
    where = f"technique {name} (plugin {entry.plugin!r}, distribution {entry.distribution})"
    if isinstance(error, EffinferError):  # a user-facing error raised by the technique: it names the fix
        return f"{where}: {error}{trace}"
    return (f"{where} failed while {doing}: {what}. Check its options with `effinfer plugins show {name}`; if they are valid, "
            f"this is a bug of that plugin{hint}{trace}")
