"""The one checker of cascade validity, and dtype inference.

``validate`` runs after parsing, after building and (under ``KASCADE_CHECK_IR``) after
every pass. Each error names the statement it is about and says what is accepted.
"""

from __future__ import annotations

import re

from kascade.ir.cascade import OPERATORS, Cascade, Einsum, Operator, Statement
from kascade.ir.dtypes import DEFAULT_DTYPE, DType, Kind
from kascade.ir.errors import CascadeError
from kascade.ir.expr import COMPARISONS, FUNCTIONS, INTEGER_ONLY, LOGICAL, REDUCTIONS, Expr, Op, extent_of

_IDENT = re.compile(r"[A-Za-z][A-Za-z_0-9]*\Z")
_RESERVED = {"param", "input", "extent", "init", "output", "where", "not", "and", "or", "inf",
             "true", "false", "cdiv", *REDUCTIONS, *OPERATORS, *FUNCTIONS, *(d.value for d in DType)}
_EXTENT_OPS = {Op.CONST, Op.EXTENT, Op.ADD, Op.SUB, Op.MUL, Op.FLOORDIV, Op.MOD, Op.CDIV, Op.MAX, Op.MIN}


def _check_name(name: str, what: str, upper: bool | None = None) -> None:
    if not isinstance(name, str) or not _IDENT.match(name) or name in _RESERVED:
        raise CascadeError(f"{name!r} is not a valid {what}: names are letters, digits and '_', "
                           "start with a letter and are not keywords")
    if upper is True and not name[0].isupper():
        raise CascadeError(f"{what} {name!r} must start with an upper-case letter")
    if upper is False and not name[0].islower():
        raise CascadeError(f"{what} {name!r} must start with a lower-case letter "
                           "(its extent is the upper-case name)")


class _Checker:
    def __init__(self, c: Cascade):
        self.c = c
        self.params = {p.name: p.dtype for p in c.params}
        self.dtypes: dict[str, DType] = {}
        self.ranks: dict[str, tuple[str, ...]] = {}
        self.steps: dict[str, str] = {}  # recurrent tensor -> its iterative rank
        self.known_extents = {x.name for x in c.extents}
        for t in c.inputs:
            self.known_extents |= {extent_of(r) for r in t.ranks}
        for s in c.stmts:
            self.known_extents |= {extent_of(r) for r in s.ranks}
            if isinstance(s, Operator):
                self.known_extents.add(extent_of(s.over))
        self.later = {n for s in c.stmts for n in s.outputs}
        # every rank name in use (declared, in statements, bound by reductions): params may not take one
        self.rank_names = {r for t in c.inputs for r in t.ranks}
        for s in c.stmts:
            self.rank_names |= set(s.ranks) | ({s.over} if isinstance(s, Operator) else set())
            inits = [s.init] if isinstance(s, Einsum) and s.init is not None else []
            for n in (n for x in (s.expr, *inits) for n in x.walk()):
                if n.op is Op.RANK:
                    self.rank_names.add(n.arg)
                elif n.op is Op.REDUCE:
                    self.rank_names.update(n.reduce_ranks)

    # ---- declarations -------------------------------------------------------------
    def declarations(self) -> None:
        c, seen = self.c, {}
        for p in c.params:
            _check_name(p.name, "param name")
            if p.name in seen:
                raise CascadeError(f"param {p.name!r} is declared twice")
            seen[p.name] = "param"
        for t in c.inputs:
            _check_name(t.name, "tensor name")
            if t.name in seen:
                raise CascadeError(f"input {t.name!r} clashes with a {seen[t.name]} of the same name")
            seen[t.name] = "input"
            self.rank_list(t.ranks, f"input {t.name!r}")
            self.dtypes[t.name], self.ranks[t.name] = t.dtype, t.ranks
        xs = {}
        for x in c.extents:
            _check_name(x.name, "extent name", upper=True)
            if x.name in xs:
                raise CascadeError(f"extent {x.name!r} is declared twice")
            xs[x.name] = x
            if x.value is not None:
                for n in x.value.walk():
                    if n.op not in _EXTENT_OPS:
                        raise CascadeError(f"extent {x.name!r}: its value may use integers, extents, "
                                           f"+ - * // % cdiv max min; found {n.op.value!r}")
                    if n.op is Op.CONST and (isinstance(n.arg, bool) or not isinstance(n.arg, int)):
                        raise CascadeError(f"extent {x.name!r}: constants in extents are integers, found {n.arg!r}")
                    if n.op is Op.EXTENT and n.arg not in self.known_extents:
                        raise CascadeError(f"extent {x.name!r} uses unknown extent {n.arg!r}")
        self._extent_cycles(xs)
        for p in c.params:  # the text form would read a rank or extent of the same name as the param
            if p.name in self.rank_names or p.name in self.known_extents:
                what = "a rank" if p.name in self.rank_names else "an extent"
                raise CascadeError(f"param {p.name!r} has the name of {what}; rename one of them")
        for s in c.stmts:
            for n in s.outputs:
                _check_name(n, "tensor name")
                if n in seen:
                    raise CascadeError(f"{s.label} redefines {n!r} (already a {seen[n]}); "
                                       "every tensor is defined once")
                seen[n] = "statement output"

    @staticmethod
    def _extent_cycles(xs) -> None:
        """Depth-first search over 'extent A = ... B ...'; iterative, each extent visited once
        (derived extents may share dependencies: walking every path would be exponential)."""
        def deps(name: str) -> list[str]:
            decl = xs.get(name)
            if decl is None or decl.value is None:
                return []
            return [n.arg for n in decl.value.walk() if n.op is Op.EXTENT]
        done: set[str] = set()
        for root in xs:
            if root in done:
                continue
            path, stack = [root], [iter(deps(root))]
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    done.add(path.pop())
                    stack.pop()
                elif nxt in path:
                    raise CascadeError(f"extent declarations form a cycle: {' -> '.join(path + [nxt])}")
                elif nxt not in done:
                    path.append(nxt)
                    stack.append(iter(deps(nxt)))

    def rank_list(self, ranks: tuple[str, ...], where: str) -> None:
        for r in ranks:
            _check_name(r, "rank name", upper=False)
        if len(set(ranks)) != len(ranks):
            raise CascadeError(f"{where} names a rank twice in {list(ranks)}; each rank appears once")

    # ---- statements ---------------------------------------------------------------
    def statement(self, s: Statement) -> None:
        if isinstance(s, Einsum):
            self.einsum(s)
        elif isinstance(s, Operator):
            self.operator(s)
        else:
            raise CascadeError(f"a cascade statement is an Einsum or an Operator, got {type(s).__name__}")
        self.later -= set(s.outputs)

    def einsum(self, s: Einsum) -> None:
        where = s.label
        self.rank_list(s.ranks, where)
        if s.step is not None and s.step not in s.ranks:
            raise CascadeError(f"{where}: iterative rank {s.step!r} is not one of its ranks {list(s.ranks)}")
        if s.step is not None and s.init is None:
            raise CascadeError(f"{where} is a recurrence over {s.step!r} without an initial value; "
                               f"add 'init {s.name}[{', '.join('0' if r == s.step else r for r in s.ranks)}] = ...'")
        if s.step is None and s.init is not None:
            raise CascadeError(f"{where} has an initial value but no iterative rank")
        self.ranks[s.name] = s.ranks
        init_kind = None
        if s.step is not None:
            self.steps[s.name] = s.step
            init_kind = self.expr(s.init, set(s.ranks) - {s.step}, where + " (init)", None)
            # the recurrence reads its own previous step: type it as the init (or declared) type
            self.dtypes[s.name] = s.dtype or DEFAULT_DTYPE[init_kind]
        kind = self.expr(s.expr, set(s.ranks), where, s)
        if init_kind is not None:
            kind = max(kind, init_kind)
        if s.dtype is not None and s.dtype.kind < kind:
            raise CascadeError(f"{where} declares {s.dtype.value} but its expression is "
                               f"{kind.name.lower()}-valued; declare a {kind.name.lower()} dtype or cast")
        self.dtypes[s.name] = s.dtype or DEFAULT_DTYPE[kind]

    def operator(self, s: Operator) -> None:
        where = s.label
        if s.kind not in OPERATORS:
            raise CascadeError(f"unknown operator {s.kind!r}; accepted: {', '.join(OPERATORS)}")
        self.rank_list(s.ranks, where)
        _check_name(s.over, "rank name", upper=False)
        if s.over in s.ranks:
            raise CascadeError(f"{where}: the rank it runs over ({s.over!r}) cannot also be an output rank")
        new = s.new_rank
        kind = self.expr(s.expr, (set(s.ranks) - {new}) | {s.over}, where, None)
        if kind is Kind.BOOL:
            raise CascadeError(f"{where}: the source must be numeric, found bool")
        values, indices = s.names
        vd, idd = s.dtypes
        if vd is not None and vd.kind < kind:
            raise CascadeError(f"{where}: values declared {vd.value} but the source is {kind.name.lower()}-valued")
        if idd is not None and idd.kind is not Kind.INT:
            raise CascadeError(f"{where}: indices must have an integer dtype (i32, i64), found {idd.value}")
        self.dtypes[values] = vd or DEFAULT_DTYPE[kind]
        self.dtypes[indices] = idd or DType.I64
        self.ranks[values] = self.ranks[indices] = s.ranks

    # ---- expressions --------------------------------------------------------------
    def expr(self, e: Expr, bound: set[str], where: str, stmt: Einsum | None) -> Kind:
        op = e.op
        if op is Op.CONST:
            v = e.arg
            return Kind.BOOL if isinstance(v, bool) else Kind.INT if isinstance(v, int) else Kind.FLOAT
        if op is Op.RANK:
            if e.arg not in bound:
                raise CascadeError(f"{where}: rank {e.arg!r} on the right is neither in the output "
                                   f"{sorted(bound)} nor reduced; add it to the output or reduce it "
                                   f"(sum[{e.arg}], max[{e.arg}], min[{e.arg}])")
            return Kind.INT
        if op is Op.EXTENT:
            if e.arg not in self.known_extents:
                raise CascadeError(f"{where}: unknown extent {e.arg!r}; extents are the upper-case names "
                                   "of the cascade's ranks or declared with 'extent'")
            return Kind.INT
        if op is Op.PARAM:
            if e.arg not in self.params:
                raise CascadeError(f"{where}: undeclared param {e.arg!r}")
            return self.params[e.arg].kind
        if op is Op.ACCESS:
            return self.access(e, bound, where, stmt)
        if op is Op.REDUCE:
            kind_name, over = e.arg
            if kind_name not in REDUCTIONS:
                raise CascadeError(f"{where}: unknown reduction {kind_name!r}; accepted: {', '.join(REDUCTIONS)}")
            for r in over:
                _check_name(r, "rank name", upper=False)
                if r in bound:
                    raise CascadeError(f"{where}: {kind_name}[{r}] reduces rank {r!r}, which is already "
                                       "an output rank or reduced by an enclosing reduction")
            if len(set(over)) != len(over):
                raise CascadeError(f"{where}: {kind_name}[...] names a rank twice")
            k = self.expr(e.args[0], bound | set(over), where, stmt)
            return max(k, Kind.INT) if kind_name == "sum" else k
        kinds = [self.expr(a, bound, where, stmt) for a in e.args]
        if op is Op.FUNC:
            if e.arg not in FUNCTIONS:
                raise CascadeError(f"{where}: unknown function {e.arg!r}; accepted: {', '.join(FUNCTIONS)}")
            return Kind.FLOAT
        if op is Op.CAST:
            if not isinstance(e.arg, DType):
                raise CascadeError(f"{where}: a cast needs a DType, got {e.arg!r}")
            return e.arg.kind
        if op is Op.NEG:
            return max(kinds[0], Kind.INT)
        if op in (Op.NOT, *LOGICAL):
            if any(k is not Kind.BOOL for k in kinds):
                raise CascadeError(f"{where}: '{op.value}' takes conditions (bool), found "
                                   f"{'/'.join(k.name.lower() for k in kinds)} in {e}")
            return Kind.BOOL
        if op is Op.WHERE:
            if kinds[0] is not Kind.BOOL:
                raise CascadeError(f"{where}: where's first argument must be a condition (bool), found "
                                   f"{kinds[0].name.lower()} in {e}")
            return max(kinds[1], kinds[2])
        if op in COMPARISONS:
            return Kind.BOOL
        if op in INTEGER_ONLY:
            if any(k is Kind.FLOAT for k in kinds):
                raise CascadeError(f"{where}: '{op.value}' is integer arithmetic; found a float operand in {e}")
            return Kind.INT
        if op is Op.DIV:
            return Kind.FLOAT
        return max(max(kinds), Kind.INT) if op is not Op.MAX and op is not Op.MIN else max(kinds)

    def access(self, e: Expr, bound: set[str], where: str, stmt: Einsum | None) -> Kind:
        name = e.arg
        is_self = stmt is not None and name == stmt.name
        if is_self and stmt.step is None:
            raise CascadeError(f"{where} reads its own output {name!r}; only a recurrence (an output "
                               "written with 'r + 1') may read its previous step")
        if name not in self.dtypes:
            if name in self.later:
                raise CascadeError(f"{where} uses {name!r} before the statement that defines it")
            raise CascadeError(f"{where} uses undefined tensor {name!r}; declare it as an input or define it first")
        dims = self.ranks[name]
        if len(e.args) != len(dims):
            raise CascadeError(f"{where}: {name} has {len(dims)} ranks {list(dims)} but is indexed "
                               f"with {len(e.args)} indices in {e}")
        for dim, idx in zip(dims, e.args):
            k = self.expr(idx, bound, where, stmt)
            if k is not Kind.INT:
                raise CascadeError(f"{where}: index {idx} of {name} is {k.name.lower()}-valued; "
                                   "indices are integer expressions")
            if is_self and dim == stmt.step and not (idx.op is Op.RANK and idx.arg == stmt.step):
                raise CascadeError(f"{where}: a recurrence reads its previous step as "
                                   f"{name}[..., {stmt.step}, ...], found index {idx}")
            if idx.op is Op.RANK and self.steps.get(name) != dim:
                mine, theirs = self.c.rank_extent(idx.arg), self.c.rank_extent(dim)
                if mine != theirs:
                    raise CascadeError(
                        f"{where}: {name}'s rank {dim!r} has extent {theirs} but is indexed by rank "
                        f"{idx.arg!r} of extent {mine}; use the same rank or declare 'extent {mine} = {theirs}'")
        return self.dtypes[name].kind


def validate(c: Cascade) -> Cascade:
    """Raise :class:`CascadeError` naming the first problem; return ``c`` when valid."""
    if not isinstance(c, Cascade):
        raise CascadeError(f"expected a Cascade, got {type(c).__name__}")
    chk = _Checker(c)
    chk.declarations()
    for s in c.stmts:
        chk.statement(s)
    if not c.outputs:
        raise CascadeError("the cascade has no output; mark at least one statement 'output'")
    return c


def infer_dtypes(c: Cascade) -> dict[str, DType]:
    """The dtype of every tensor: declared, or inferred from its expression's kind
    (float -> f32, int -> i64, bool -> bool; topk/sort indices -> i64)."""
    chk = _Checker(c)
    chk.declarations()
    for s in c.stmts:
        chk.statement(s)
    return dict(chk.dtypes)
