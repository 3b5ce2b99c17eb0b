"""kascade: a compiler-style kernel and execution-plan autotuner for LLM workloads.

``import kascade`` registers the ``torch.ops.kascade.*`` operators (their schemas only:
triton, jinja2 and the kernels load on the first call).
"""

from kascade.ir import Cascade, KascadeError, parse
from kascade.ops import attention, attention_varlen, moe, paged_decode_attention


def compile(cascade, target="h200"):  # noqa: A001 - the name users expect, as torch.compile
    """Schedule a cascade (text or value) for a target; see :mod:`kascade.compiled`."""
    from kascade.compiled import compile as compile_cascade
    return compile_cascade(cascade, target)

__version__ = "0.1.0"

__all__ = ["Cascade", "KascadeError", "attention", "attention_varlen", "compile", "moe", "paged_decode_attention",
           "parse", "__version__"]
