"""The rewrite engine: a canonical graph as an egglog e-graph, one e-class per graph node.

Every canonical node ``i`` becomes ``(union (Node i) (OpK "op" child...))`` where a child is
``(Node j)`` for a reference or ``(Lit "text")`` for a constant, so the e-graph is built with
flat actions, never one nested expression: deep graphs cannot overflow a recursion limit, and
structurally equal nodes fall into one e-class (common subexpressions for free).

Each rule's pattern compiles to an egglog rule that records ``(hit "rule#k" root inputs)`` and
adds a ``hypatia.<rule>`` e-node to the root's e-class, so later families can match on earlier
fusions. Graph patterns found by networkx are fed in the same way. The engine only *finds*
candidates; :mod:`hypatia.planner.extract` chooses among them by cost.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from itertools import count
from typing import Any, Iterable

from hypatia.canonical import CanonicalGraph, is_ref, refs
from hypatia.planner.rules import Family, Kw, Lit, Pattern, Rewrite, Rule

MAX_ARITY = 10

# Ops whose two results are not equal even when their arguments are: never merged by the
# e-graph's congruence (random number generation, uninitialized memory, in-place updates).
_UNIQUE_OP = re.compile(r"rand|dropout|bernoulli|normal|uniform|multinomial|empty|^placeholder$|_\.")

# Dropout that draws nothing: probability 0 or not training (``dropout(x, p, train)``). Its value
# is its input, so it is an ordinary term that rules may match through.
_DROPOUT = ("aten.native_dropout.default", "aten.dropout.default")

# Ops whose first two arguments commute (as long as nothing follows them).
COMMUTATIVE_OPS = ("aten.add.Tensor", "aten.mul.Tensor")


class RuleCompileError(ValueError):
    """A rule's pattern is not well formed (unknown element, too many children)."""


def lit_text(value: Any) -> str:
    """The constant's text in the e-graph; double quotes are swapped out because egglog string
    literals do not escape them."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).replace('"', "'")


def _op(arity: int) -> str:
    return f"Op{arity}"


DECLARATIONS = "\n".join(
    [
        "(datatype Term (Node i64) (Lit String) "
        + " ".join(f"({_op(k)} String{' Term' * k})" for k in range(MAX_ARITY + 1))
        + ")",
        "(sort IVec (Vec i64))",
        "(relation hit (String i64 IVec))",
        "(ruleset canonical)",
        *(
            f'(rewrite ({_op(2)} "{op}" a b) ({_op(2)} "{op}" b a) :ruleset canonical :name "commute {op}")'
            for op in COMMUTATIVE_OPS
        ),
    ]
)


# -- compiling patterns ----------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledRule:
    """One egglog rule: ``tag`` names it in the hit relation; ``inputs`` are the pattern's
    input names in the order the hit records them."""

    tag: str
    rule: Rule | None
    inputs: tuple[str, ...]
    text: str


def _term(pattern: Pattern, inputs: list[str], fresh) -> str:
    if isinstance(pattern, tuple):
        op, *children = pattern
        if len(children) > MAX_ARITY:
            raise RuleCompileError(f"pattern for {op} has {len(children)} children; at most {MAX_ARITY}")
        return f'({_op(len(children))} "{op}"' + "".join(" " + _term(c, inputs, fresh) for c in children) + ")"
    if isinstance(pattern, Lit):
        return f'(Lit "{lit_text(pattern.value)}")'
    if isinstance(pattern, Kw):
        return f'(Lit "{pattern.name}={lit_text(pattern.value)}")'
    if pattern == "_":
        return f"_w{next(fresh)}"
    if isinstance(pattern, str) and pattern.startswith("$") and pattern[1:].isidentifier():
        name = pattern[1:]
        if name not in inputs:
            inputs.append(name)
        return f"v_{name}"
    raise RuleCompileError(f"unknown pattern element {pattern!r}")


def compile_rule(rule: Rule, k: int, ruleset: str) -> CompiledRule:
    tag = f"{rule.name}#{k}"
    inputs: list[str] = []
    term = _term(rule.patterns[k], inputs, count())
    body = [f"(= root (Node ri)) (= root {term})"] + [f"(= v_{n} (Node i_{n}))" for n in inputs]
    fused = f'({_op(len(inputs))} "hypatia.{rule.name}"' + "".join(f" v_{n}" for n in inputs) + ")"
    head = f'(hit "{tag}" ri (vec-of' + "".join(f" i_{n}" for n in inputs) + f")) (union root {fused})"
    text = f'(rule ({" ".join(body)}) ({head}) :ruleset {ruleset} :name "{tag}")'
    return CompiledRule(tag, rule, tuple(inputs), text)


def compile_rewrite(rewrite: Rewrite, ruleset: str) -> str:
    inputs: list[str] = []
    fresh = count()
    lhs = _term(rewrite.lhs, inputs, fresh)
    known = list(inputs)
    rhs = _term(rewrite.rhs, inputs, fresh)
    if inputs != known:
        raise RuleCompileError(f"rewrite {rewrite.name}: right side uses variables the left side does not bind")
    return f'(rule ((= e {lhs})) ((union e {rhs})) :ruleset {ruleset} :name "{rewrite.name}")'


@dataclass(frozen=True)
class Program:
    """The compiled declarations and rules of a set of families (built once per process)."""

    text: str
    compiled: dict[str, CompiledRule]
    families: tuple[Family, ...]


_programs: dict[tuple[str, ...], Program] = {}
_programs_lock = threading.Lock()


def program_for(families: tuple[Family, ...]) -> Program:
    key = tuple(f.name for f in families)
    with _programs_lock:
        if key not in _programs:
            lines = [DECLARATIONS]
            compiled: dict[str, CompiledRule] = {}
            for family in families:
                lines.append(f"(ruleset {family.name})")
                lines.extend(compile_rewrite(rw, family.name) for rw in family.rewrites)
                for rule in family.rules:
                    for k in range(len(rule.patterns)):
                        c = compile_rule(rule, k, family.name)
                        compiled[c.tag] = c
                        lines.append(c.text)
            _programs[key] = Program("\n".join(lines), compiled, families)
        return _programs[key]


# -- the e-graph of one canonical graph --------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    rule: str
    tag: str
    root: int
    inputs: dict[str, int]


_HIT = re.compile(r'\(hit "([^"]+)" (\d+) \(vec-of((?: \d+)*)\)\)')


class EGraph:
    """One canonical graph in egglog, ready to run the families of ``program``."""

    def __init__(self, graph: CanonicalGraph, program: Program):
        from egglog import bindings

        self._b = bindings
        self._span = bindings.PanicSpan()
        self.graph = graph
        self.program = program
        self._extra: dict[str, CompiledRule] = {}
        self.egraph = bindings.EGraph()
        self.egraph.run_program(*self.egraph.parse_program(program.text))
        self._build()

    def close(self) -> None:
        """Drop the egglog e-graph now, on this thread: egglog's e-graph may only be freed on the
        thread that made it, and a frame kept alive by a traceback could otherwise carry it to
        whichever thread the garbage collector next runs on."""
        self.__dict__.pop("egraph", None)

    # -- building ------------------------------------------------------------------------------
    def _call(self, name: str, *args):
        return self._b.Call(self._span, name, list(args))

    def _lit(self, text: str):
        return self._call("Lit", self._b.Lit(self._span, self._b.String(text)))

    def _node(self, i: int):
        return self._call("Node", self._b.Lit(self._span, self._b.Int(i)))

    def _opterm(self, name: str, *children):
        return self._call(_op(len(children)), self._b.Lit(self._span, self._b.String(name)), *children)

    def _child(self, arg: Any):
        if is_ref(arg):
            return self._node(arg[1])
        if _has_ref(arg):
            if arg[0] == "l" and len(arg[1]) <= MAX_ARITY:
                return self._opterm("list", *map(self._child, arg[1]))
            return None
        return self._lit(lit_text(arg))

    def node_term(self, i: int):
        """The e-node of canonical node ``i`` over its children's e-classes."""
        node = self.graph.nodes[i]
        if node.op == "get_attr":  # a constant: equal contents (same digest) may share a class
            return self._opterm(node.op, self._lit(lit_text(node.args)))
        if _UNIQUE_OP.search(node.op) and not identity_dropout(node):
            return self._opterm(f"unique:{node.op}", self._lit(str(i)))
        children = [self._child(a) for a in node.args]
        for name in sorted(node.kwargs):
            value = node.kwargs[name]
            children.append(self._lit(f"{name}={lit_text(value)}") if not _has_ref(value) else None)
        if any(c is None for c in children) or len(children) > MAX_ARITY:
            # Not representable faithfully: a unique opaque term, so it never merges wrongly.
            return self._opterm(f"opaque:{node.op}", self._lit(str(i)))
        return self._opterm(node.op, *children)

    def _build(self) -> None:
        b = self._b
        actions = [b.Union(self._span, self._node(i), self.node_term(i)) for i in range(len(self.graph.nodes))]
        self.egraph.run_program(
            b.AddRuleset(self._span, "build"),
            b.RuleCommand(b.Rule(self._span, actions, [], "build graph", "build")),
            b.RunSchedule(b.Run(self._span, b.RunConfig("build"))),
        )

    # -- running -------------------------------------------------------------------------------
    def run(self, ruleset: str, iterations: int = 8) -> dict[str, int]:
        """Run one ruleset to saturation (bounded); returns matches per egglog rule name."""
        out = self.egraph.run_program(
            *self.egraph.parse_program(f"(run-schedule (repeat {iterations} (run {ruleset})))")
        )
        report = out[-1].report if out else None
        return dict(report.num_matches_per_rule) if report is not None else {}

    def feed(self, rule: Rule, root: int, inputs: dict[str, int]) -> None:
        """Add a match found outside egglog (networkx): a hit and the fused e-node."""
        names = tuple(inputs)
        tag = f"{rule.name}#graph:{','.join(names)}"
        self._extra.setdefault(tag, CompiledRule(tag, rule, names, ""))
        b = self._b
        ints = [b.Lit(self._span, b.Int(inputs[n])) for n in names]
        fused = self._opterm(f"hypatia.{rule.name}", *(self._node(inputs[n]) for n in names))
        hit = self._call("hit", b.Lit(self._span, b.String(tag)), b.Lit(self._span, b.Int(root)), self._call("vec-of", *ints))
        self.egraph.run_program(
            b.ActionCommand(b.Expr_(self._span, hit)),
            b.ActionCommand(b.Union(self._span, self._node(root), fused)),
        )

    def hits(self) -> list[Hit]:
        """Every recorded match, in a deterministic order."""
        b = self._b
        out = self.egraph.run_program(b.PrintFunction(self._span, "hit", 10**9, None, b.DefaultPrintFunctionMode()))
        found = set()
        for tag, root, ints in _HIT.findall(str(out[0])):
            found.add((tag, int(root), tuple(int(v) for v in ints.split())))
        result = []
        for tag, root, ints in sorted(found):
            compiled = self.program.compiled.get(tag) or self._extra[tag]
            result.append(Hit(compiled.rule.name, tag, root, dict(zip(compiled.inputs, ints))))
        return result

    def same_class(self, i: int, j: int) -> bool:
        """True when nodes ``i`` and ``j`` ended up in one e-class (proved equal)."""
        try:
            self.egraph.run_program(*self.egraph.parse_program(f"(check (= (Node {i}) (Node {j})))"))
            return True
        except self._b.EggSmolError:
            return False


def identity_dropout(node) -> bool:
    """True for a dropout node that draws no random numbers: ``p == 0`` or ``train`` False."""
    if node.op not in _DROPOUT or len(node.args) != 3 or node.kwargs:
        return False
    p, train = node.args[1], node.args[2]
    zero = isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0
    return zero or train is False


def _has_ref(arg: Any) -> bool:
    if is_ref(arg):
        return True
    if isinstance(arg, list):
        return any(_has_ref(a) for a in arg)
    if isinstance(arg, dict):
        return any(_has_ref(a) for a in arg.values())
    return False


def closure(graph: CanonicalGraph, root: int, inputs: Iterable[int]) -> frozenset[int] | None:
    """Every node computed between ``inputs`` and ``root`` (the region a match replaces), or
    None when the walk reaches a graph input that is not one of ``inputs``."""
    stop = set(inputs)
    seen = {root}
    stack = [root]
    while stack:
        i = stack.pop()
        node = graph.nodes[i]
        if node.op in ("placeholder", "get_attr"):
            return None
        for j in [*refs(node.args), *refs(list(node.kwargs.values()))]:
            if j not in stop and j not in seen:
                seen.add(j)
                stack.append(j)
    return frozenset(seen)

