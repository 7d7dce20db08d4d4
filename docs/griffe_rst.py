"""A griffe extension for the API reference: effinfer's docstrings use reST roles and ``::`` blocks.

``:class:`~effinfer.core.technique.Technique``` becomes an autorefs cross-reference when the
target is part of the documented ``effinfer.core`` API, and inline code otherwise; a paragraph
ending in ``::`` ends in ``:`` (the indented block after it is already a markdown code block).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([\w.]+)(\(\))?`")
LITERAL_BLOCK = re.compile(r"::\n(\s*\n)")
DOCUMENTED = "effinfer.core"


def resolve(name: str, obj: griffe.Object) -> str | None:
    """The full path of ``name`` as seen from ``obj``, if it is an ``effinfer.core`` object."""
    if name.startswith(DOCUMENTED + ".") or name == DOCUMENTED:
        return name
    scope: Any = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        member = scope.members.get(name.split(".")[0]) if hasattr(scope, "members") else None
        if member is not None:
            base = member.target_path if member.is_alias else member.path
            path = f"{base}.{name.split('.', 1)[1]}" if "." in name else base
            return path if path.startswith(DOCUMENTED) else None
        scope = scope.parent
    return None


def convert(text: str, obj: griffe.Object) -> str:
    def role(match: re.Match[str]) -> str:
        tilde, name, call = match.groups()
        shown = (name.rsplit(".", 1)[-1] if tilde else name) + (call or "")
        target = resolve(name, obj)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    text = ROLE.sub(role, text)
    return LITERAL_BLOCK.sub(r":\n\1", text)


class ReSTRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = convert(obj.docstring.value, obj)
