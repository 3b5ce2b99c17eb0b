"""kascade's exception types.

Every error a user can cause (IR text, cascades, shapes, dtypes, unbound extents)
is raised as a subclass of :class:`KascadeError`, with a message that says what was
wrong and what is accepted. They live in ``ir`` because it is the lowest layer:
every other layer may raise them.
"""

from __future__ import annotations


class KascadeError(Exception):
    """Base class of every error kascade raises on purpose."""


class IRSyntaxError(KascadeError):
    """IR text that does not parse; carries the 1-based line and column."""

    def __init__(self, message: str, line: int, column: int, source_line: str = ""):
        self.line, self.column, self.source_line = line, column, source_line
        where = f"line {line}, column {column}: {message}"
        if source_line:
            where += f"\n  {source_line}\n  {' ' * (column - 1)}^"
        super().__init__(where)


class CascadeError(KascadeError):
    """A cascade that is not well formed; the message names the offending statement."""


class ShapeError(KascadeError):
    """Concrete inputs whose shapes disagree with the declared ranks, or unbound extents."""


class DTypeError(KascadeError):
    """A dtype that is not accepted where it was used."""


class RewriteError(KascadeError):
    """A pass that cannot apply to the cascade it was given (the message says why)."""


class CodegenError(KascadeError):
    """A schedule or expression that a code generator cannot render (the message names the op)."""


class DeviceError(KascadeError):
    """Tensors on a device the chosen backend cannot use, or on different devices."""
