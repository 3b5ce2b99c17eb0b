"""Element types of the IR.

Three kinds matter to the type rules: ``bool`` < ``int`` < ``float``. Arithmetic
promotes to the larger kind; index expressions must be ``int``; conditions ``bool``.
"""

from __future__ import annotations

import enum

from kascade.ir.errors import DTypeError


class Kind(enum.IntEnum):
    BOOL = 0
    INT = 1
    FLOAT = 2


class DType(enum.Enum):
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"
    F64 = "f64"
    I32 = "i32"
    I64 = "i64"
    BOOL = "bool"

    @property
    def kind(self) -> Kind:
        if self is DType.BOOL:
            return Kind.BOOL
        return Kind.INT if self in (DType.I32, DType.I64) else Kind.FLOAT

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str) -> DType:
        try:
            return cls(name)
        except ValueError:
            accepted = ", ".join(d.value for d in cls)
            raise DTypeError(f"unknown dtype {name!r}; accepted: {accepted}") from None


_ITEMSIZE = {
    DType.BF16: 2, DType.F16: 2, DType.F32: 4, DType.F64: 8,
    DType.I32: 4, DType.I64: 8, DType.BOOL: 1,
}

bf16, f16, f32, f64 = DType.BF16, DType.F16, DType.F32, DType.F64
i32, i64, boolean = DType.I32, DType.I64, DType.BOOL

# The dtype an intermediate gets when its statement does not declare one.
DEFAULT_DTYPE = {Kind.BOOL: DType.BOOL, Kind.INT: DType.I64, Kind.FLOAT: DType.F32}
