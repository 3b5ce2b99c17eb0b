"""kascade: a compiler-style kernel and execution-plan autotuner for LLM workloads."""

from kascade.ir import Cascade, KascadeError, parse

__version__ = "0.1.0"

__all__ = ["Cascade", "KascadeError", "attention", "parse", "__version__"]


def __getattr__(name: str):
    # the kernels' API pulls in torch, triton and jinja2: only when first used
    if name == "attention":
        from kascade.api import attention
        return attention
    raise AttributeError(f"module 'kascade' has no attribute {name!r}")
