"""Shared fixtures. Every test runs with the IR checker after each pass switched on."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("KASCADE_CHECK_IR", "1")
sys.path.insert(0, os.path.dirname(__file__))   # shared test helpers (masks.py) import as top-level modules
# generated kernels and the default tuning database of the run stay out of the user's cache
os.environ.setdefault("KASCADE_CACHE_DIR", tempfile.mkdtemp(prefix="kascade-tests-"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where a CUDA GPU is present and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: random, reproducible, never zeros."""
    return torch.Generator().manual_seed(1234)


def make_paged_cache(lens: list[int], block: int, G: int, E: int, F: int, gen: torch.Generator,
                     dtype=torch.float64, spare_blocks: int = 3):
    """A paged KV cache holding sequences of ``lens`` tokens in shuffled blocks.

    Returns ``(KC, VC, BT, SL, K_dense, V_dense)`` where ``K_dense[i]`` is sequence i's keys
    ``(len, G, E)``; unused block-table entries point at random (valid) blocks, as a
    real allocator leaves them, so an unmasked read would pick up another sequence's data.
    """
    per_seq = [max(1, -(-n // block)) for n in lens]
    n_blocks = sum(per_seq) + spare_blocks
    KC = torch.randn(n_blocks, block, G, E, generator=gen, dtype=dtype)
    VC = torch.randn(n_blocks, block, G, F, generator=gen, dtype=dtype)
    perm = torch.randperm(n_blocks, generator=gen)
    width = max(per_seq)
    BT = torch.randint(0, n_blocks, (len(lens), width), generator=gen, dtype=torch.int32)
    K_dense, V_dense, used = [], [], 0
    for i, (n, nb) in enumerate(zip(lens, per_seq)):
        ids = perm[used:used + nb]
        used += nb
        BT[i, :nb] = ids.to(torch.int32)
        K_dense.append(KC[ids].reshape(nb * block, G, E)[:n])
        V_dense.append(VC[ids].reshape(nb * block, G, F)[:n])
    SL = torch.tensor(lens, dtype=torch.int32)
    return KC, VC, BT, SL, K_dense, V_dense


@pytest.fixture
def run_kascade():
    """Run the ``kascade`` command line in a subprocess, as a user would."""
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, COLUMNS="200")
        return subprocess.run([sys.executable, "-m", "kascade", *args], capture_output=True, text=True,
                              env=env, timeout=300)
    return run


@pytest.fixture
def paged_cache():
    """The :func:`make_paged_cache` builder (test modules cannot import conftest)."""
    return make_paged_cache


# ---- the examples of DESIGN.md, as cascade texts ---------------------------------------
# Verbatim from DESIGN.md, "The IR in one example".
ATTENTION_3PASS = """\
# attention, 3-pass form
param scale: f32
input Q[b, h, p, e]: bf16
input K[b, h, m, e]: bf16
input V[b, h, m, f]: bf16

QK[b, h, m, p] = sum[e](Q[b, h, p, e] * K[b, h, m, e]) * scale
GM[b, h, p]    = max[m](QK[b, h, m, p])
SN[b, h, m, p] = exp(QK[b, h, m, p] - GM[b, h, p])
SD[b, h, p]    = sum[m](SN[b, h, m, p])
AV[b, h, p, f] = sum[m](SN[b, h, m, p] * V[b, h, m, f])
output O[b, h, p, f]: bf16 = AV[b, h, p, f] / SD[b, h, p]
"""

# The FuseMax 1-pass cascade of DESIGN.md written out: m split into (m1, m0), the
# ragged last tile masked to -inf, running max RM, denominator RD and numerator RNV.
FUSEMAX_1PASS = """\
# attention, FuseMax 1-pass form
param scale: f32
input Q[b, h, p, e]: bf16
input K[b, h, m, e]: bf16
input V[b, h, m, f]: bf16
extent M0
extent M1 = cdiv(M, M0)

QK[b, h, m1, m0, p] = where(m1 * M0 + m0 < M,
                            sum[e](Q[b, h, p, e] * K[b, h, m1 * M0 + m0, e]) * scale,
                            -inf)
LM[b, h, m1, p] = max[m0](QK[b, h, m1, m0, p])
init RM[b, h, 0, p] = -inf
RM[b, h, m1 + 1, p] = max(RM[b, h, m1, p], LM[b, h, m1, p])
SLN[b, h, m1, m0, p] = exp(QK[b, h, m1, m0, p] - RM[b, h, m1 + 1, p])
PRM[b, h, m1, p] = exp(RM[b, h, m1, p] - RM[b, h, m1 + 1, p])
SLD[b, h, m1, p] = sum[m0](SLN[b, h, m1, m0, p])
init RD[b, h, 0, p] = 0.0
RD[b, h, m1 + 1, p] = PRM[b, h, m1, p] * RD[b, h, m1, p] + SLD[b, h, m1, p]
SLNV[b, h, m1, f, p] = sum[m0](where(m1 * M0 + m0 < M, SLN[b, h, m1, m0, p] * V[b, h, m1 * M0 + m0, f], 0.0))
init RNV[b, h, 0, f, p] = 0.0
RNV[b, h, m1 + 1, f, p] = PRM[b, h, m1, p] * RNV[b, h, m1, f, p] + SLNV[b, h, m1, f, p]
output O[b, h, p, f]: bf16 = RNV[b, h, M1, f, p] / RD[b, h, M1, p]
"""

# Each fragment of DESIGN.md's list "What the IR must express", in a minimal valid cascade.
FRAGMENTS = {
    "causal": """\
input QK[b, h, m, p]: f32
output S[b, h, m, p]: f32 = where(m <= p + M - P, QK[b, h, m, p], -inf)
""",
    "affine": """\
input K[b, h, m, e]: bf16
extent M0
extent M1 = cdiv(M, M0)
output KT[b, h, m1, m0, e]: bf16 = K[b, h, m1 * M0 + m0, e]
""",
    "indirect": """\
input KC[n, m0, g, e]: bf16
input BT[b, m1]: i32
output KV[b, m1, m0, g, e]: bf16 = KC[BT[b, m1], m0, g, e]
""",
    "alibi": """\
input X[h, p, m]: f32
input S[h]: f32
output Y[h, p, m]: f32 = X[h, p, m] - S[h] * (p - m)
""",
    "softcap": """\
param c: f32
input X[p, m]: f32
output Y[p, m]: f32 = c * tanh(X[p, m] / c)
""",
    "recurrence": """\
input LM[p, m1]: f32
init RM[p, 0] = -inf
RM[p, m1 + 1] = max(RM[p, m1], LM[p, m1])
output O[p]: f32 = RM[p, M1]
""",
    "topk": """\
input LG[t, x]: f32
output TV[t, k], TI[t, k] = topk[x](LG[t, x])
""",
    "sort": """\
input KEY[t]: i32
output SV[s], SI[s]: i32 = sort[t](KEY[t])
""",
}

EXAMPLES = {"attention_3pass": ATTENTION_3PASS, "fusemax_1pass": FUSEMAX_1PASS, **FRAGMENTS}


@pytest.fixture(scope="session")
def attention_text() -> str:
    return ATTENTION_3PASS


@pytest.fixture(scope="session")
def fusemax_text() -> str:
    return FUSEMAX_1PASS


@pytest.fixture(scope="session")
def fragments() -> dict[str, str]:
    return dict(FRAGMENTS)


@pytest.fixture(scope="session", params=sorted(EXAMPLES))
def example_text(request) -> str:
    """Every example cascade in turn (the test id names it)."""
    return EXAMPLES[request.param]


@pytest.fixture(scope="session")
def examples() -> dict[str, str]:
    return dict(EXAMPLES)


@pytest.fixture(scope="module")
def kascade_cache_dir(tmp_path_factory):
    """A fresh KASCADE_CACHE_DIR shared by one module's tests (generated sources, cubins, CPU
    builds), for modules whose module-scoped fixtures compile into it."""
    old = os.environ.get("KASCADE_CACHE_DIR")
    os.environ["KASCADE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kascade-cache"))
    yield os.environ["KASCADE_CACHE_DIR"]
    if old is None:
        os.environ.pop("KASCADE_CACHE_DIR", None)
    else:
        os.environ["KASCADE_CACHE_DIR"] = old
