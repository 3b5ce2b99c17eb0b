"""kascade: a compiler-style kernel and execution-plan autotuner for LLM workloads."""

from kascade.ir import Cascade, KascadeError, parse

__version__ = "0.1.0"

__all__ = ["Cascade", "KascadeError", "parse", "__version__"]
