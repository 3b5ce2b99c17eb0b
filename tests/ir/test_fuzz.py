"""Whatever text it is given, ``parse`` returns a Cascade or raises a KascadeError, and nothing else.

No IndexError, RecursionError, ValueError or hang escapes it: users feed it text from files and
the CLI, and the error they see must point at their text. A text that parses prints back to itself.
"""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kascade.ir import Cascade, IRSyntaxError, KascadeError, parse, parse_expr

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# A small valid cascade with every kind of line: param, input, extent, init, recurrence, reduction,
# affine and indirect access, where, a cast and an operator.
SEED = """\
param scale: f32
input Q[p, e]: bf16
input K[m, e]: bf16
input BT[p]: i32
extent M0 = 16
extent M1 = cdiv(M, M0)
QK[m1, m0, p] = where(m1 * M0 + m0 < M, sum[e](Q[p, e] * K[m1 * M0 + m0, e]) * scale, -inf)
LM[m1, p] = max[m0](QK[m1, m0, p])
init RM[0, p] = -inf
RM[m1 + 1, p] = max(RM[m1, p], LM[m1, p])
G[p] = f32(K[BT[p], 0]) + 1e-05
TV[p, k], TI[p, k]: i32 = topk[m0](QK[0, m0, p])
output O[p]: f32 = RM[M1, p] - G[p] / 2.0
"""

VOCAB = [
    # keywords and built-in names
    "param", "input", "extent", "init", "output", "where", "not", "and", "or", "inf", "true", "false", "cdiv",
    "sum", "max", "min", "topk", "sort", "exp", "tanh", "softplus", "f32", "bf16", "i32", "i64", "bool",
    # names
    "X", "Q", "K", "RM", "p", "m", "m1", "m0", "e", "M", "M0", "M1", "scale", "_x",
    # punctuation and operators
    "(", ")", "[", "]", ",", ":", "=", "+", "-", "*", "/", "//", "%", "<", "<=", ">", ">=", "==", "!=",
    # numbers, line structure, comments, junk
    "0", "1", "2.5", "1e-05", ".5", "1e999", "\n", "# c", "$", "\t", "é",
]


def check(text: str) -> Cascade | None:
    """The property: a Cascade (that prints and reads back to itself) or a KascadeError."""
    try:
        out = parse(text)
    except KascadeError:
        return None
    assert isinstance(out, Cascade)
    again = parse(str(out))
    assert again == out and str(again) == str(out)
    return out


def check_expr(text: str) -> None:
    try:
        parse_expr(text)
    except KascadeError:
        pass


@contextmanager
def time_limit(seconds: float):
    """Fail instead of hanging: a parse that takes this long is a bug."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_seed_is_valid():
    assert check(SEED) is not None


# ---- (a) arbitrary text -----------------------------------------------------------------------------------------
@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text(text):
    check(text)
    check_expr(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from("()[]{},:=+-*/%<>!#$ \n\t.0123456789eEpmMXQ_"), max_size=120))
def test_arbitrary_text_of_language_characters(text):
    check(text)
    check_expr(text)


# ---- (b) text made of the language's tokens ---------------------------------------------------------------------
token_texts = st.lists(st.tuples(st.sampled_from(VOCAB), st.sampled_from([" ", " ", "", "\n"])), max_size=60).map(
    lambda pairs: "".join(t + sep for t, sep in pairs))


@FUZZ
@given(token_texts)
def test_token_soup(text):
    check(text)
    check_expr(text)


@FUZZ
@given(st.lists(st.sampled_from([line for line in SEED.splitlines() if line]), max_size=14))
def test_seed_lines_in_any_order(lines):
    """Whole valid lines, dropped, repeated and shuffled: this reaches the checker's every corner."""
    check("\n".join(lines))


# ---- (c) single-token edits of a valid cascade ------------------------------------------------------------------
PIECES = re.findall(r"\n|[ \t]+|[A-Za-z_][A-Za-z_0-9]*|\d+\.\d*(?:e-?\d+)?|\d+(?:e-?\d+)?|//|<=|>=|==|!=|.", SEED)
assert "".join(PIECES) == SEED
TOKENS = [i for i, t in enumerate(PIECES) if not t.isspace()]


@st.composite
def edited_seeds(draw):
    pieces = list(PIECES)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.sampled_from(TOKENS))
        action = draw(st.sampled_from(["delete", "replace", "insert", "duplicate"]))
        if action == "delete":
            pieces[i] = ""
        elif action == "replace":
            pieces[i] = draw(st.sampled_from(VOCAB))
        elif action == "insert":
            pieces[i] = draw(st.sampled_from(VOCAB)) + " " + pieces[i]
        else:
            pieces[i] = pieces[i] + " " + pieces[i]
    return "".join(pieces)


@FUZZ
@given(edited_seeds())
def test_token_edits_of_a_valid_cascade(text):
    check(text)


@pytest.mark.parametrize("i", TOKENS)
def test_every_single_token_deletion(i):
    check("".join(PIECES[:i] + PIECES[i + 1:]))


# ---- nesting, length and size -----------------------------------------------------------------------------------
DEEP = [
    "(" * 5000,
    "(" * 5000 + "x" + ")" * 5000,
    "[" * 5000,
    "not " * 5000 + "x",
    "-" * 5000 + "x",
    "X[" * 3000 + "p" + "]" * 3000,
    "exp(" * 3000 + "x" + ")" * 3000,
    "sum[e](" * 3000 + "x" + ")" * 3000,
    "where(" * 3000,
    "(-" * 3000 + "x" + ")" * 3000,
]


@pytest.mark.parametrize("body", DEEP, ids=lambda s: repr(s[:12]) + f"..{len(s)}")
def test_deep_nesting_is_a_syntax_error(body):
    with pytest.raises(IRSyntaxError):
        parse_expr(body)
    with pytest.raises(KascadeError):
        parse(f"input X[p]: f32\noutput O[p]: f32 = {body}\n")


@pytest.mark.parametrize("depth", [110, 150, 199])
def test_nesting_near_the_limit_never_crashes(depth):
    body = "(" * depth + "X[p]" + ")" * depth
    check(f"input X[p]: f32\noutput O[p]: f32 = {body}\n")


def test_moderate_nesting_parses():
    body = "(" * 40 + "X[p]" + ")" * 40
    assert check(f"input X[p]: f32\noutput O[p]: f32 = exp(-{body})\n") is not None


@pytest.mark.parametrize("terms", [300, 3000])
def test_long_operator_chains_never_crash(terms):
    """A chain builds a left-deep tree as tall as it is long; == / hash / the printer recurse on it."""
    check("input X[p]: f32\noutput O[p]: f32 = X[p]" + " + X[p]" * terms + "\n")
    check("input X[p]: f32\noutput O[p]: bool = X[p] < 0.0" + " and X[p] < 0.0" * terms + "\n")


def test_short_operator_chains_parse():
    assert check("input X[p]: f32\noutput O[p]: f32 = X[p]" + " * X[p]" * 50 + "\n") is not None


def test_huge_integer_literal():
    check_expr("1" * 5000)
    check("input X[p]: f32\noutput O[p]: f32 = X[p] * " + "9" * 5000 + "\n")


def test_huge_float_literal_is_inf():
    assert parse_expr("1e999") == parse_expr("inf")


def test_long_chain_of_extent_aliases():
    lines = ["input X[p]: f32", *(f"extent E{i} = E{i + 1}" for i in range(1500)), "extent E1500 = 4",
             "output O[p]: f32 = X[p]"]
    check("\n".join(lines))


def test_shared_extent_dependencies_are_checked_in_linear_time():
    """``extent E0 = E1 + E1``, ``extent E1 = E2 + E2`` ...: 40 lines must not take 2**40 steps."""
    lines = ["input X[p]: f32", *(f"extent E{i} = E{i + 1} + E{i + 1}" for i in range(40)), "extent E40 = 4",
             "output O[p]: f32 = X[p]"]
    with time_limit(5.0):
        check("\n".join(lines))


def test_many_statements():
    lines = ["input X[p]: f32", "A0[p] = X[p]", *(f"A{i + 1}[p] = A{i}[p] * 2.0" for i in range(2000)),
             "output O[p]: f32 = A2000[p]"]
    assert len(check("\n".join(lines)).stmts) == 2002
