"""One error type for every refusal: what is wrong, where, what was found, what is allowed.

A refusal is raised before anything is built or deleted (DESIGN.md rule 7); the message is meant to
be read by the person who wrote the alloy or typed the override, so it names the file and the JSON
path or the override, not a Python traceback.
"""
from __future__ import annotations


class ForgeError(Exception):
    def __init__(self, what: str, *, where: str | None = None, found=None, allowed=None, hint: str | None = None):
        self.what = what
        self.where = where
        self.found = found
        self.allowed = allowed
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        lines = [head]
        if self.found is not None:
            lines.append(f"  found:   {self.found}")
        if self.allowed is not None:
            allowed = self.allowed
            if isinstance(allowed, (list, tuple, set, frozenset)):
                allowed = ", ".join(str(a) for a in sorted(allowed, key=str))
            lines.append(f"  allowed: {allowed}")
        if self.hint:
            lines.append(f"  hint:    {self.hint}")
        return "\n".join(lines)


class SourceUnreachable(ForgeError):
    """The alloy's source cannot be fetched (no network, private or gated repo, bad revision)."""


class OutOfSpace(ForgeError):
    """A file system filled up while a step wrote to it (ENOSPC), or would by the preflight's count."""
