"""User-facing errors: each names the file or input, what was found, what was expected and the fix."""
from __future__ import annotations


class ZImageError(Exception):
    """An error a ComfyUI user can act on. ComfyUI shows ``str(error)`` in the UI."""

    def __init__(self, what: str, *, found: str | None = None, expected: str | None = None,
                 fix: str | None = None) -> None:
        parts = [f"[Z-Image] {what}"]
        if found:
            parts.append(f"Found: {found}")
        if expected:
            parts.append(f"Expected: {expected}")
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n".join(parts))
        self.what, self.found, self.expected, self.fix = what, found, expected, fix


class CheckpointError(ZImageError):
    """A model file that cannot be used in the slot it was given to."""


class InputError(ZImageError):
    """A node input outside what the node accepts."""
