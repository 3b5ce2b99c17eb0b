"""Parser for the cascade text form (see ``format_cascade`` for the printer).

Grammar, one statement per line (newlines inside brackets continue the line,
``#`` starts a comment)::

    param NAME: DTYPE
    input NAME[rank, ...]: DTYPE
    extent NAME [= expr]
    init NAME[rank | 0, ...] = expr
    [output] NAME[rank | rank + 1, ...][: DTYPE] = expr
    [output] NAME[ranks][: DTYPE], NAME[ranks][: DTYPE] = topk[rank](expr) | sort[rank](expr)

Inside expressions an identifier followed by ``[`` is a tensor access (or a
``sum`` / ``max`` / ``min`` reduction), followed by ``(`` a function, cast,
``where``, ``max``, ``min`` or ``cdiv`` call; otherwise it is a declared param, a
rank (lower-case first letter) or an extent (upper-case first letter).
Every error is an :class:`IRSyntaxError` with line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kascade.ir import expr as E
from kascade.ir.cascade import OPERATORS, Cascade, Einsum, ExtentDecl, Operator, Param, TensorDecl
from kascade.ir.dtypes import DType
from kascade.ir.errors import CascadeError, IRSyntaxError, KascadeError
from kascade.ir.expr import Expr, Op

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\f]+) | (?P<comment>\#[^\n]*) | (?P<nl>\n)
  | (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>//|<=|>=|==|!=|[-+*/%<>=\[\](),:])
""", re.VERBOSE)

_KEYWORDS = {"param", "input", "extent", "init", "output", "where", "not", "and", "or",
             "inf", "true", "false", "cdiv", *E.REDUCTIONS, *OPERATORS, *E.FUNCTIONS,
             *(d.value for d in DType)}
_CMP = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}
_MUL = {"*": Op.MUL, "/": Op.DIV, "//": Op.FLOORDIV, "%": Op.MOD}
# Each nesting level costs about ten Python frames here, and ==, hash, the printer and the
# checker recurse on the tree: both limits keep every consumer far from the recursion limit.
_MAX_DEPTH = 64      # nesting of (), [], calls, unary '-' and 'not'
_MAX_HEIGHT = 128    # height of one expression tree (a chain 'a + b + ...' is as tall as it is long)


@dataclass(frozen=True)
class Token:
    kind: str   # "num", "name", "op", "nl", "eof"
    text: str
    line: int
    col: int


def tokenize(text: str) -> list[Token]:
    tokens, line, line_start, pos, depth = [], 1, 0, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _error(text, f"unexpected character {text[pos]!r}", line, pos - line_start + 1)
        kind, tok = m.lastgroup, m.group()
        col = pos - line_start + 1
        if kind == "nl":
            if depth == 0:
                tokens.append(Token("nl", "\n", line, col))
            line, line_start = line + 1, m.end()
        elif kind in ("num", "name", "op"):
            if tok in "([":
                depth += 1
            elif tok in ")]":
                depth = max(0, depth - 1)
            tokens.append(Token(kind, tok, line, col))
        pos = m.end()
    tokens.append(Token("eof", "", line, pos - line_start + 1))
    return tokens


def _error(text: str, msg: str, line: int, col: int) -> IRSyntaxError:
    lines = text.split("\n")
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    return IRSyntaxError(msg, line, col, src)


def _describe(t: Token) -> str:
    return {"nl": "end of line", "eof": "end of input"}.get(t.kind, repr(t.text))


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0
        self.lines: dict[str, int] = {}  # statement output -> line, for the checker's errors
        self.params: set[str] = {
            self.toks[k + 1].text for k in range(len(self.toks) - 1)
            if self.toks[k].text == "param" and self.toks[k + 1].kind == "name"
            and (k == 0 or self.toks[k - 1].kind == "nl")}

    # ---- token helpers -------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def fail(self, msg: str, tok: Token | None = None) -> IRSyntaxError:
        tok = tok or self.tok
        return _error(self.text, msg, tok.line, tok.col)

    def next(self) -> Token:
        t = self.tok
        self.i += 1
        return t

    def at(self, text: str) -> bool:
        return self.tok.kind in ("op", "name") and self.tok.text == text

    def expect(self, text: str, what: str = "") -> Token:
        if not self.at(text):
            raise self.fail(f"expected {text!r}{' ' + what if what else ''}, found {_describe(self.tok)}")
        return self.next()

    def name(self, what: str) -> Token:
        if self.tok.kind != "name":
            raise self.fail(f"expected {what}, found {_describe(self.tok)}")
        return self.next()

    def ident(self, what: str) -> str:
        t = self.name(what)
        if t.text in _KEYWORDS:
            raise self.fail(f"{t.text!r} is a keyword and cannot be used as {what}", t)
        return t.text

    def rank_name(self) -> str:
        t = self.tok
        name = self.ident("a rank name")
        if not name[0].islower():
            raise self.fail(f"rank names start with a lower-case letter (their extent is the "
                            f"upper-case name), found {name!r}", t)
        return name

    def dtype(self) -> DType:
        t = self.name("a dtype")
        try:
            return DType.parse(t.text)
        except KascadeError as err:
            raise self.fail(str(err), t) from None

    def end_of_statement(self) -> None:
        if self.tok.kind not in ("nl", "eof"):
            raise self.fail(f"expected end of line, found {_describe(self.tok)}")

    # ---- statements ----------------------------------------------------------------
    def cascade(self, name: str) -> Cascade:
        params, inputs, extents, stmts, inits = [], [], [], [], {}
        while self.tok.kind != "eof":
            if self.tok.kind == "nl":
                self.next()
                continue
            start = self.tok
            kw = self.tok.text if self.tok.kind == "name" else ""
            if kw == "param":
                self.next()
                pname = self.ident("a param name")
                self.expect(":", "before the param's dtype")
                params.append(Param(pname, self.dtype()))
            elif kw == "input":
                self.next()
                tname = self.ident("a tensor name")
                ranks = self.rank_list()
                self.expect(":", "before the input's dtype")
                inputs.append(TensorDecl(tname, ranks, self.dtype()))
            elif kw == "extent":
                self.next()
                t = self.tok
                xname = self.ident("an extent name")
                if not xname[0].isupper():
                    raise self.fail(f"extent names start with an upper-case letter, found {xname!r}", t)
                value = None
                if self.at("="):
                    self.next()
                    value = self.expr()
                extents.append(ExtentDecl(xname, value))
            elif kw == "init":
                self.next()
                tname, idx = self.init_target()
                self.expect("=", "after the init target")
                if tname in inits:
                    raise self.fail(f"tensor {tname!r} has two init statements", start)
                inits[tname] = (idx, self.expr(), start)
            else:
                stmts.append(self.statement())
                for out in stmts[-1].outputs:
                    self.lines.setdefault(out, start.line)
            self.end_of_statement()
        stmts = self.attach_inits(stmts, inits)
        return Cascade(tuple(params), tuple(inputs), tuple(extents), tuple(stmts), name=name)

    def rank_list(self) -> tuple[str, ...]:
        self.expect("[", "to open the rank list")
        ranks = []
        while not self.at("]"):
            ranks.append(self.rank_name())
            if not self.at("]"):
                self.expect(",", "or ']' in the rank list")
        self.next()
        return tuple(ranks)

    def init_target(self) -> tuple[str, tuple[str | None, ...]]:
        tname = self.ident("a tensor name")
        self.expect("[", "to open the init's index list")
        idx: list[str | None] = []
        while not self.at("]"):
            if self.tok.kind == "num":
                if self.tok.text != "0":
                    raise self.fail(f"an init sets step 0 of the iterative rank; write 0, found {self.tok.text}")
                self.next()
                idx.append(None)
            else:
                idx.append(self.rank_name())
            if not self.at("]"):
                self.expect(",", "or ']' in the index list")
        self.next()
        if idx.count(None) != 1:
            raise self.fail("an init's index list has exactly one 0 (the step of the iterative rank)")
        return tname, tuple(idx)

    def target(self) -> tuple[str, tuple[str, ...], str | None, DType | None]:
        tname = self.ident("a tensor name")
        self.expect("[", "to open the output's index list")
        ranks, step = [], None
        while not self.at("]"):
            r = self.rank_name()
            if self.at("+"):
                plus = self.next()
                if self.tok.text != "1":
                    raise self.fail("an iterative rank is written 'r + 1'", self.tok)
                self.next()
                if step is not None:
                    raise self.fail("only one rank of an output may be iterative", plus)
                step = r
            ranks.append(r)
            if not self.at("]"):
                self.expect(",", "or ']' in the index list")
        self.next()
        dtype = None
        if self.at(":"):
            self.next()
            dtype = self.dtype()
        return tname, tuple(ranks), step, dtype

    def statement(self) -> Einsum | Operator:
        output = False
        if self.at("output"):
            self.next()
            output = True
        first = self.tok
        targets = [self.target()]
        while self.at(","):
            self.next()
            targets.append(self.target())
        self.expect("=", "after the statement's target")
        if self.tok.kind == "name" and self.tok.text in OPERATORS and self.peek().text == "[":
            kind = self.next().text
            if len(targets) != 2:
                raise self.fail(f"{kind} defines two tensors (values, indices), found {len(targets)}", first)
            (n1, r1, s1, d1), (n2, r2, s2, d2) = targets
            if r1 != r2 or s1 or s2:
                raise self.fail(f"both outputs of {kind} have the same ranks and no iterative rank", first)
            self.expect("[")
            over = self.rank_name()
            self.expect("]", f"after the rank {kind} runs over")
            self.expect("(", f"to open {kind}'s argument")
            src = self.expr()
            self.expect(")", f"to close {kind}'s argument")
            return Operator(kind, (n1, n2), r1, over, src, (d1, d2), output)
        if len(targets) != 1:
            raise self.fail("only topk and sort define two tensors", first)
        tname, ranks, step, dtype = targets[0]
        return Einsum(tname, ranks, self.expr(), dtype, output, step)

    def attach_inits(self, stmts, inits):
        out = []
        for s in stmts:
            if isinstance(s, Einsum) and s.name in inits:
                idx, value, tok = inits.pop(s.name)
                expected = tuple(None if r == s.step else r for r in s.ranks)
                if s.step is None or idx != expected:
                    want = ", ".join("0" if r is None else r for r in expected)
                    raise self.fail(f"init of {s.name!r} must be 'init {s.name}[{want}]' with 0 at its "
                                    "iterative rank" if s.step else
                                    f"{s.name!r} has an init but no iterative rank (write 'r + 1')", tok)
                s = Einsum(s.name, s.ranks, s.expr, s.dtype, s.output, s.step, value)
            out.append(s)
        for tname, (_, _, tok) in inits.items():
            raise self.fail(f"init of {tname!r}, but no statement defines {tname!r} with an iterative rank", tok)
        return out

    # ---- expressions ---------------------------------------------------------------
    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"expression nested more than {_MAX_DEPTH} deep")

    def expr(self) -> Expr:
        start = self.tok
        self.enter()
        try:
            e = self.disjunction()
        finally:
            self.depth -= 1
        if self.depth == 0 and _height(e) > _MAX_HEIGHT:
            raise self.fail(f"expression more than {_MAX_HEIGHT} operations deep; split it into several "
                            "statements", start)
        return e

    def disjunction(self) -> Expr:
        e = self.conjunction()
        while self.at("or"):
            self.next()
            e = E.binary(Op.OR, e, self.conjunction())
        return e

    def conjunction(self) -> Expr:
        e = self.negation()
        while self.at("and"):
            self.next()
            e = E.binary(Op.AND, e, self.negation())
        return e

    def negation(self) -> Expr:
        if self.at("not"):
            self.next()
            self.enter()
            try:
                return E.logical_not(self.negation())
            finally:
                self.depth -= 1
        return self.comparison()

    def comparison(self) -> Expr:
        e = self.additive()
        if self.tok.kind == "op" and self.tok.text in _CMP:
            op = _CMP[self.next().text]
            e = E.binary(op, e, self.additive())
            if self.tok.kind == "op" and self.tok.text in _CMP:
                raise self.fail("comparisons do not chain; use 'and'")
        return e

    def additive(self) -> Expr:
        e = self.multiplicative()
        while self.tok.kind == "op" and self.tok.text in "+-":
            op = Op.ADD if self.next().text == "+" else Op.SUB
            e = E.binary(op, e, self.multiplicative())
        return e

    def multiplicative(self) -> Expr:
        e = self.unary()
        while self.tok.kind == "op" and self.tok.text in _MUL:
            op = _MUL[self.next().text]
            e = E.binary(op, e, self.unary())
        return e

    def unary(self) -> Expr:
        if self.at("-"):
            self.next()
            # "-1" / "-inf" are negative constants; "-(1)" stays a negation (the printer writes a
            # NEG node over a constant that way)
            literal = self.tok.kind == "num" or self.at("inf")
            self.enter()
            try:
                x = self.unary()
            finally:
                self.depth -= 1
            return E.neg(x) if literal else Expr(Op.NEG, (x,))
        return self.primary()

    def args(self, n: int, what: str) -> list[Expr]:
        self.expect("(", f"to open {what}'s arguments")
        out = [self.expr()]
        while self.at(","):
            self.next()
            out.append(self.expr())
        self.expect(")", f"to close {what}'s arguments")
        if len(out) != n:
            raise self.fail(f"{what} takes {n} argument{'s' * (n != 1)}, found {len(out)}")
        return out

    def primary(self) -> Expr:
        t = self.tok
        if t.kind == "num":
            self.next()
            if any(c in t.text for c in ".eE"):
                return E.const(float(t.text))
            try:
                return E.const(int(t.text))
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                raise self.fail(f"integer literal of {len(t.text)} digits is too long", t) from None
        if self.at("("):
            self.next()
            e = self.expr()
            self.expect(")", "to close the parenthesis")
            return e
        if t.kind != "name":
            raise self.fail(f"expected an expression, found {_describe(t)}")
        word, nxt = t.text, self.peek().text
        self.next()
        if word == "inf":
            return E.INF
        if word in ("true", "false"):
            return E.const(word == "true")
        if word in E.REDUCTIONS and nxt == "[":
            self.next()
            over = [self.rank_name()]
            while self.at(","):
                self.next()
                over.append(self.rank_name())
            self.expect("]", "after the reduced ranks")
            self.expect("(", f"to open the body of {word}[...]")
            body = self.expr()
            self.expect(")", f"to close the body of {word}[...]")
            return E.reduce(word, tuple(over), body)
        if nxt == "(":
            if word in E.FUNCTIONS:
                return E.func(word, *self.args(1, word))
            if word in {d.value for d in DType}:
                return E.cast(DType(word), *self.args(1, f"cast to {word}"))
            if word == "where":
                return E.where(*self.args(3, "where"))
            calls = {"max": Op.MAX, "min": Op.MIN, "cdiv": Op.CDIV}
            if word in calls:
                return E.binary(calls[word], *self.args(2, word))
            accepted = ", ".join([*E.FUNCTIONS, "where", "max", "min", "cdiv",
                                  *(d.value for d in DType)])
            raise self.fail(f"unknown function {word!r}; accepted: {accepted}", t)
        if word in _KEYWORDS:
            raise self.fail(f"{word!r} cannot stand alone in an expression", t)
        if nxt == "[":
            self.next()
            idx = []
            while not self.at("]"):
                idx.append(self.expr())
                if not self.at("]"):
                    self.expect(",", "or ']' in the index list")
            self.next()
            return E.access(word, *idx)
        if word in self.params:
            return E.param(word)
        return E.rank(word) if word[0].islower() else E.extent(word)


def _height(e: Expr) -> int:
    """Height of a tree, without recursion (the tree may be too tall to recurse on)."""
    height, stack = 0, [(e, 1)]
    while stack:
        node, d = stack.pop()
        height = max(height, d)
        stack.extend((a, d + 1) for a in node.args)
    return height


def parse(text: str, name: str = "cascade", validate: bool = True) -> Cascade:
    """Parse cascade text; by default also check the result (see ``ir.validate``).

    A checker error about a statement is prefixed with that statement's line."""
    if not isinstance(text, str):
        raise IRSyntaxError(f"cascade text must be a str, got {type(text).__name__}", 1, 1)
    parser = _Parser(text)
    cascade = parser.cascade(name)
    if validate:
        from kascade.ir.validate import validate as check
        try:
            check(cascade)
        except CascadeError as err:
            named = re.match(r"(?:Einsum|topk|sort) '(\w+)'", str(err))
            if named and named.group(1) in parser.lines:
                raise CascadeError(f"line {parser.lines[named.group(1)]}: {err}") from None
            raise
    return cascade


def parse_expr(text: str) -> Expr:
    """Parse one expression (no declarations, so no params: every name is a rank or extent)."""
    p = _Parser(text)
    while p.tok.kind == "nl":
        p.next()
    e = p.expr()
    while p.tok.kind == "nl":
        p.next()
    if p.tok.kind != "eof":
        raise p.fail(f"expected end of expression, found {_describe(p.tok)}")
    return e
