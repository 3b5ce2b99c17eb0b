"""Running generated Triton kernels: on the GPU (JIT) or under Triton's CPU interpreter.

Both paths run the *same* generated source file. A rendered module defines its kernel as
a plain function; this backend wraps it as ``triton.runtime.jit.JITFunction`` for the GPU
or as ``triton.runtime.interpreter.InterpretedFunction`` for the interpreter, so nothing
depends on ``TRITON_INTERPRET`` being set before triton is imported.

One detail makes the interpreter path work without that switch: the language's library
functions (``tl.max``, ``tl.sum`` ...) are themselves ``@triton.jit`` functions, created as
``JITFunction`` s when triton was imported, and a ``JITFunction`` refuses to be called from
Python. While an interpreted kernel runs, :func:`_interpreting` lets such calls through by
interpreting the callee (what ``TRITON_INTERPRET=1`` would have created in the first place),
and undoes the patching of ``triton.language`` that such a call does (Triton's own device-call
path never restores it: harmless when everything is interpreted, fatal to a later GPU compile).
It is scoped to the launch and serialised by a lock, like Triton's own patching of
``triton.language`` during interpretation. The same context also makes a scalar usable as
a ``range`` bound under triton 3.6 with NumPy >= 2.4 (3.6's interpreter converts the
1-element array with ``int()``, which NumPy 2.4 refuses; 3.9 squeezes it first).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kascade.codegen.paged_decode import PagedDecodeSources
from kascade.codegen.paths import kernel_cache_dir
from kascade.codegen.source import KernelSource
from kascade.ir.dtypes import DType, Kind
from kascade.ir.errors import KascadeError, ShapeError

_modules: dict[tuple[str, str, str], Any] = {}   # (directory, name, content hash) -> loaded module
_kernels: dict[tuple[int, bool], Any] = {}        # (id(module), interpret) -> wrapped kernel
_interpret_lock = threading.RLock()
_TORCH_DTYPES = {DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F32: torch.float32,
                 DType.F64: torch.float64}


def load_module(src: KernelSource, directory: Path | None = None):
    """Write ``src`` (if changed) and import it from its file; cached by place, name and content."""
    directory = directory or kernel_cache_dir()
    key = (str(directory), src.name, hashlib.sha256(src.text.encode()).hexdigest())
    if key not in _modules:
        path = src.write(directory)
        spec = importlib.util.spec_from_file_location(f"kascade_kernels.{src.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[key] = module
    return _modules[key]


def kernel(src: KernelSource, *, interpret: bool, directory: Path | None = None):
    """The kernel of ``src`` wrapped for the GPU JIT or for the interpreter (cached)."""
    module = load_module(src, directory)
    key = (id(module), interpret)   # modules stay alive in _modules, so ids are not reused
    if key not in _kernels:
        fn = getattr(module, src.name)
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _kernels[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction
            _kernels[key] = JITFunction(fn)
    return _kernels[key]


@contextlib.contextmanager
def _interpreting() -> Iterator[None]:
    """While an interpreted kernel runs, a call to a ``JITFunction`` (a ``tl`` library function)
    interprets it instead of refusing."""
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[int, tuple[Any, Any]] = {}   # id(JITFunction) -> (it, its interpreted twin)

    def call(self, *args, **kwargs):
        hit = wrapped.get(id(self))
        if hit is None or hit[0] is not self:
            hit = wrapped[id(self)] = (self, InterpretedFunction(self.fn))
        # what InterpretedFunction.__call__ does, but undoing its patch of triton.language afterwards
        # (it never restores it, which would break GPU compiles later in the same process)
        scope = interpreter._patch_lang(self.fn)
        try:
            return hit[1].rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)

    def patch_tensor_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    with _interpret_lock, np.errstate(all="ignore"):   # x / 0 in a branch that tl.where drops is no error
        original = JITFunction.__call__
        JITFunction.__call__ = call
        if patch_tensor is not None:
            interpreter._patch_lang_tensor = patch_tensor_index
        try:
            yield
        finally:
            JITFunction.__call__ = original
            if patch_tensor is not None:
                interpreter._patch_lang_tensor = patch_tensor


def launch_args(src: KernelSource, tensors: Mapping[str, torch.Tensor], params: Mapping[str, int | float],
                extents: Mapping[str, int]) -> list:
    """The kernel's positional arguments, in signature order."""
    out = []
    for a in src.args:
        if a.kind == "pointer":
            out.append(tensors[a.ref])
        elif a.kind == "stride":
            out.append(tensors[a.ref].stride(a.dim))
        elif a.kind == "extent":
            out.append(extents[a.ref])
        else:
            if a.ref not in params:
                raise KascadeError(f"kernel {src.name} needs param {a.ref!r}; given {sorted(params)}")
            value = params[a.ref]
            out.append(float(value) if a.dtype is not None and a.dtype.kind is Kind.FLOAT else int(value))
    return out


def run(src: KernelSource, tensors: Mapping[str, torch.Tensor], params: Mapping[str, int | float],
        extents: Mapping[str, int], *, interpret: bool, out: torch.Tensor | None = None,
        directory: Path | None = None) -> torch.Tensor:
    """Launch ``src`` on the inputs ``tensors`` (by cascade name) and return its output.

    ``extents`` binds every extent symbol (see :func:`kascade.ir.extents.bind_extents`);
    ``out``, if given, is written in place (its shape must follow the output's ranks) and
    returned; otherwise a fresh tensor in the inputs' dtype and device. GPU runs need CUDA
    tensors; interpreted runs take CPU tensors (CUDA ones are copied by the interpreter).
    """
    role = src.output
    shape = tuple(extents[x] for x in src.output_extents)
    first = next(iter(tensors.values()))
    if out is None:
        out = torch.empty(shape, dtype=_TORCH_DTYPES.get(role.dtype, first.dtype), device=first.device)
    elif tuple(out.shape) != shape:
        raise ShapeError(f"out= has shape {list(out.shape)}; the output {role.name}{list(role.ranks)} "
                         f"needs {list(shape)}")
    launch(src, {**tensors, role.name: out}, params, extents, interpret=interpret, directory=directory)
    return out


def launch(src: KernelSource, tensors: Mapping[str, torch.Tensor], params: Mapping[str, int | float],
           extents: Mapping[str, int], *, interpret: bool, directory: Path | None = None) -> None:
    """Launch ``src`` with every tensor it reads or writes given by name (outputs included)."""
    if not interpret and any(t.device.type != "cuda" for t in tensors.values()):
        raise KascadeError("the triton backend runs CUDA tensors; use backend='interpret' for CPU tensors")
    grid = src.grid_size(extents)
    if 0 in grid:
        return
    args = launch_args(src, tensors, params, extents)
    fn: Callable = kernel(src, interpret=interpret, directory=directory)[grid]
    consts = dict(src.constexprs)
    if interpret:
        with _interpreting():
            fn(*args, **consts)
    else:
        with torch.cuda.device(next(iter(tensors.values())).device):   # Triton launches on the current device
            fn(*args, **consts, num_warps=src.num_warps, num_stages=src.num_stages)


def run_paged_decode(sources: PagedDecodeSources, tensors: Mapping[str, torch.Tensor],
                     params: Mapping[str, int | float], extents: Mapping[str, int], num_splits: int, *,
                     interpret: bool, out: torch.Tensor | None = None, directory: Path | None = None) -> torch.Tensor:
    """Split-KV decode: the partial kernel writes each split's max, sum and numerator into a
    fresh fp32 workspace (from torch's allocator, so ordered on the current stream), the merge
    kernel reads them and writes the output. ``extents`` binds the cascade's extents; the
    split extent is bound to ``num_splits`` here."""
    extents = {**extents, sources.split_extent: num_splits}
    device = next(iter(tensors.values())).device
    workspace = {role.name: torch.empty(tuple(extents[x] for x in dims), dtype=torch.float32, device=device)
                 for role, dims in sources.workspace}
    launch(sources.partial, {**tensors, **workspace}, params, extents, interpret=interpret, directory=directory)
    return run(sources.merge, workspace, params, extents, interpret=interpret, out=out, directory=directory)
